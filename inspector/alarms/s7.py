"""Siemens S7 link (python-snap7, put/get): the word table of :mod:`inspector.alarms.layout`
written into data block ``db`` from byte ``start`` (big-endian WORDs, word w at ``start + 2*w``).

The DB must be a non-optimised ("standard") block of at least ``2 * (16 + classes)`` bytes and the
CPU must allow PUT/GET access. python-snap7 is imported when the link is built.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from inspector.alarms.config import S7DriverConfig
from inspector.alarms.driver import RefusedError
from inspector.alarms.layout import (ACK, COUNTS, LAST_SCORE, PlcState, ack_indices, decode_words, encode_words,
                                     words_to_bytes)


class S7Link:
    def __init__(self, cfg: S7DriverConfig):
        import snap7  # ImportError handled by make_link

        self.cfg = cfg
        self.label = f"s7 {cfg.host}:{cfg.port} rack {cfg.rack} slot {cfg.slot} DB{cfg.db}"
        self._snap7 = snap7
        # python-snap7 >= 3 raises S7ProtocolError; the ctypes-based 1.x/2.x raise RuntimeError
        # with the CPU's words ("CPU : Address out of range")
        self._protocol_error = getattr(getattr(snap7, "error", None), "S7ProtocolError", RuntimeError)
        self._client = None
        self._map_bytes = 2 * COUNTS   # the map's size as last written (grows with the classes)

    def connect(self) -> None:
        c = self.cfg
        client = self._snap7.Client()
        self._client = client
        client.connect(c.host, c.rack, c.slot, c.port)
        # The pure-Python client (python-snap7 >= 3) keeps its socket timeout on the connection;
        # shorten it so a slow PLC fails a write instead of holding it for the default 5 s.
        conn = getattr(client, "connection", None)
        sock = getattr(conn, "socket", None)
        if conn is not None and hasattr(conn, "timeout"):
            conn.timeout = c.timeout_s
        if sock is not None:
            sock.settimeout(c.timeout_s)

    @contextmanager
    def _refusal(self, what: str) -> Iterator[None]:
        """Turn the CPU's refusal of a DB access into a :class:`RefusedError` that says what the
        DB must be. The CPU gives one code for a DB too short, missing or optimised, and for
        PUT/GET not permitted, so the message names them all."""
        try:
            yield
        except self._protocol_error as e:
            # A header error code (class/code) or an item return code ("... operation failed:
            # Invalid address") is the CPU's answer; other protocol errors (a short or garbled
            # PDU) mean the stream is out of step, and the driver reconnects.
            text = str(e)
            if getattr(e, "error_code", None) is None and not text.startswith(
                    ("Write operation failed", "Read operation failed")) and "CPU :" not in text:
                raise
            c = self.cfg
            raise RefusedError(
                f"{what} refused by the PLC ({text}); DB{c.db} must exist and hold at least "
                f"{self._map_bytes} bytes from byte {c.start} (DBB{c.start}..DBB{c.start + self._map_bytes - 1}), "
                "as a standard (not optimised) block, and the CPU must permit PUT/GET") from None

    def write(self, state: PlcState, heartbeat: int) -> None:
        c, cl = self.cfg, self._client
        if cl is None:
            raise ConnectionError("not connected")
        words = encode_words(state, heartbeat)
        self._map_bytes = 2 * len(words)
        # Counts first, heartbeat/frames block last: a PLC that sees a new heartbeat or frame
        # count then also sees the counts that belong to it.
        if len(words) > COUNTS:
            at = c.start + 2 * COUNTS
            with self._refusal(f"write DB{c.db}.DBB{at}..DBB{at + 2 * (len(words) - COUNTS) - 1}"):
                cl.db_write(c.db, at, words_to_bytes(words[COUNTS:]))
        with self._refusal(f"write DB{c.db}.DBB{c.start}..DBB{c.start + 2 * (LAST_SCORE + 1) - 1}"):
            cl.db_write(c.db, c.start, words_to_bytes(words[:LAST_SCORE + 1]))

    def read_acks(self) -> list[int]:
        c, cl = self.cfg, self._client
        at = c.start + 2 * ACK
        with self._refusal(f"read DB{c.db}.DBB{at}..DBB{at + 3}"):
            raw = cl.db_read(c.db, at, 4)
        idx = ack_indices([int.from_bytes(raw[0:2], "big"), int.from_bytes(raw[2:4], "big")])
        if idx:
            with self._refusal(f"write DB{c.db}.DBB{at}..DBB{at + 3}"):
                cl.db_write(c.db, at, bytearray(4))
        return idx

    def read_state(self, alarm_names: tuple[str, ...], classes: tuple[str, ...]) -> tuple[PlcState, int]:
        """The map as the PLC holds it now, decoded (``inspector alarms test`` restores it)."""
        c, cl = self.cfg, self._client
        self._map_bytes = 2 * (COUNTS + len(classes))
        with self._refusal(f"read DB{c.db}.DBB{c.start}..DBB{c.start + self._map_bytes - 1}"):
            raw = cl.db_read(c.db, c.start, self._map_bytes)
        words = [int.from_bytes(raw[i:i + 2], "big") for i in range(0, self._map_bytes, 2)]
        return decode_words(words, alarm_names, classes)

    def close(self) -> None:
        cl, self._client = self._client, None
        if cl is not None:
            cl.disconnect()
