"""What the PLC sees: one :class:`PlcState` snapshot, and its 16-bit word image.

Modbus holding registers and the S7 data block carry the same words (S7: big-endian, word ``w``
at byte ``start + 2*w``); the README's PLC maps are this table:

====== ======================== ===============================================================
word   name                     meaning
====== ======================== ===============================================================
0      heartbeat                +1 on every write (at least every ``heartbeat_s``), wraps at 65535
1      alarms 0-15              bit i = alarm i (rule order in ``alarms.rules``) is active
2      alarms 16-31
3      status                   bit 0 inspector running, bit 1 camera ok, bit 2 any alarm active
4-5    frames published         u32, high word first
6-7    defects total            u32, high word first
8      last defect class        class index in the model (1 = first defect class), 0 = none yet
9-10   last defect position     u32, mm along the strip
11     last defect across       u16, px: centroid column of the defect in the frame
12     last defect area         u16, mm² (saturates at 65535), px where no geometry is known
13     last defect score        u16, score x 1000
14     acknowledge 0-15         written by the PLC: bit i = acknowledge alarm i; the inspector
15     acknowledge 16-31        takes the request and writes the word back to 0
16+k   defects of class k+1     u16 count since start, wraps (k = 0 for the first defect class)
====== ======================== ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

HEARTBEAT = 0
ALARMS = 1
STATUS = 3
FRAMES = 4
DEFECTS = 6
LAST_CLASS = 8
LAST_POS = 9
LAST_ACROSS = 11
LAST_AREA = 12
LAST_SCORE = 13
ACK = 14
COUNTS = 16

STATUS_RUNNING = 1
STATUS_CAMERA_OK = 2
STATUS_ANY_ALARM = 4


@dataclass(frozen=True)
class PlcState:
    """Everything the drivers write, as of one moment. Immutable: drivers keep the latest one."""

    alarm_names: tuple[str, ...] = ()
    alarms: tuple[bool, ...] = ()
    classes: tuple[str, ...] = ()            # defect classes, background excluded
    counts: tuple[int, ...] = ()             # defects per class since start
    frames: int = 0
    defects_total: int = 0
    running: bool = False
    camera_ok: bool = False
    last_class: int = 0                      # 1-based defect class index, 0 = none yet
    last_pos_mm: float = 0.0
    last_across_px: float = 0.0             # centroid column of the last defect
    last_area: float = 0.0                   # mm² where known, else px
    last_score: float = 0.0

    @property
    def alarm_bits(self) -> int:
        return sum(1 << i for i, on in enumerate(self.alarms) if on)

    def with_alarms(self, alarms: tuple[bool, ...]) -> "PlcState":
        """A copy with other alarm bits (for ``inspector alarms test``)."""
        return replace(self, alarms=alarms)


def _u16(v: float) -> int:
    return max(0, min(0xFFFF, int(round(v))))


def _u32(v: float) -> tuple[int, int]:
    n = max(0, min(0xFFFFFFFF, int(round(v))))
    return n >> 16, n & 0xFFFF


def encode_words(state: PlcState, heartbeat: int) -> list[int]:
    """The full word image (acknowledge words as 0) of ``state``; length ``16 + len(classes)``."""
    w = [0] * (COUNTS + len(state.classes))
    bits = state.alarm_bits
    w[HEARTBEAT] = heartbeat & 0xFFFF
    w[ALARMS], w[ALARMS + 1] = bits & 0xFFFF, (bits >> 16) & 0xFFFF
    w[STATUS] = ((STATUS_RUNNING if state.running else 0) | (STATUS_CAMERA_OK if state.camera_ok else 0)
                 | (STATUS_ANY_ALARM if bits else 0))
    w[FRAMES], w[FRAMES + 1] = _u32(state.frames % (1 << 32))
    w[DEFECTS], w[DEFECTS + 1] = _u32(state.defects_total % (1 << 32))
    w[LAST_CLASS] = _u16(state.last_class)
    w[LAST_POS], w[LAST_POS + 1] = _u32(state.last_pos_mm)
    w[LAST_ACROSS] = _u16(state.last_across_px)
    w[LAST_AREA] = _u16(state.last_area)
    w[LAST_SCORE] = _u16(state.last_score * 1000)
    for k, n in enumerate(state.counts):
        w[COUNTS + k] = n & 0xFFFF
    return w


def decode_words(words: list[int], alarm_names: tuple[str, ...], classes: tuple[str, ...]
                 ) -> tuple[PlcState, int]:
    """The inverse of :func:`encode_words`: ``(state, heartbeat)`` read back from a PLC map.

    Last defect position, area and score come back as written (integers; score / 1000)."""
    bits = words[ALARMS] | (words[ALARMS + 1] << 16)
    status = words[STATUS]
    state = PlcState(alarm_names=tuple(alarm_names),
                     alarms=tuple(bool(bits >> i & 1) for i in range(len(alarm_names))),
                     classes=tuple(classes), counts=tuple(words[COUNTS:COUNTS + len(classes)]),
                     frames=(words[FRAMES] << 16) | words[FRAMES + 1],
                     defects_total=(words[DEFECTS] << 16) | words[DEFECTS + 1],
                     running=bool(status & STATUS_RUNNING), camera_ok=bool(status & STATUS_CAMERA_OK),
                     last_class=words[LAST_CLASS], last_pos_mm=(words[LAST_POS] << 16) | words[LAST_POS + 1],
                     last_across_px=words[LAST_ACROSS], last_area=words[LAST_AREA],
                     last_score=words[LAST_SCORE] / 1000)
    return state, words[HEARTBEAT]


def ack_indices(words: list[int]) -> list[int]:
    """Alarm indices whose acknowledge bit is set in the two acknowledge words."""
    bits = (words[0] & 0xFFFF) | ((words[1] & 0xFFFF) << 16)
    return [i for i in range(32) if bits >> i & 1]


def words_to_bytes(words: list[int]) -> bytearray:
    """Big-endian bytes, as an S7 CPU stores WORDs."""
    out = bytearray()
    for v in words:
        out += int(v & 0xFFFF).to_bytes(2, "big")
    return out
