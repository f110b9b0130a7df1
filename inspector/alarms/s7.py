"""Siemens S7 link (python-snap7, put/get): the word table of :mod:`inspector.alarms.layout`
written into data block ``db`` from byte ``start`` (big-endian WORDs, word w at ``start + 2*w``).

The DB must be a non-optimised ("standard") block of at least ``2 * (16 + classes)`` bytes and the
CPU must allow PUT/GET access. python-snap7 is imported when the link is built.
"""

from __future__ import annotations

from inspector.alarms.config import S7DriverConfig
from inspector.alarms.layout import ACK, COUNTS, LAST_SCORE, PlcState, ack_indices, encode_words, words_to_bytes


class S7Link:
    def __init__(self, cfg: S7DriverConfig):
        import snap7  # ImportError handled by make_link

        self.cfg = cfg
        self.label = f"s7 {cfg.host}:{cfg.port} rack {cfg.rack} slot {cfg.slot} DB{cfg.db}"
        self._snap7 = snap7
        self._client = None

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

    def write(self, state: PlcState, heartbeat: int) -> None:
        c, cl = self.cfg, self._client
        if cl is None:
            raise ConnectionError("not connected")
        words = encode_words(state, heartbeat)
        # Counts first, heartbeat/frames block last: a PLC that sees a new heartbeat or frame
        # count then also sees the counts that belong to it.
        if len(words) > COUNTS:
            cl.db_write(c.db, c.start + 2 * COUNTS, words_to_bytes(words[COUNTS:]))
        cl.db_write(c.db, c.start, words_to_bytes(words[:LAST_SCORE + 1]))

    def read_acks(self) -> list[int]:
        c, cl = self.cfg, self._client
        raw = cl.db_read(c.db, c.start + 2 * ACK, 4)
        idx = ack_indices([int.from_bytes(raw[0:2], "big"), int.from_bytes(raw[2:4], "big")])
        if idx:
            cl.db_write(c.db, c.start + 2 * ACK, bytearray(4))
        return idx

    def close(self) -> None:
        cl, self._client = self._client, None
        if cl is not None:
            cl.disconnect()
