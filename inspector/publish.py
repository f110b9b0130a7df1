"""ZeroMQ publishing of defect reports, and the subscriber client.

Every report is one multipart message ``[topic, header, mask]``, or ``[topic, header, mask,
region]`` when the model bundle has a region head:

* ``topic`` — UTF-8 bytes, by default ``defects.<camera_id>``; subscribe to a prefix.
* ``header`` — UTF-8 JSON, schema ``inspector.defects/1`` (see ``docs/zmq-schema.md``).
* ``mask`` — the class-index mask (uint8, 0 = no defect, k = class k of ``header["classes"]``),
  encoded as ``header["mask_encoding"]``: ``png`` (8-bit single-channel PNG) or ``raw``
  (``shape[0]*shape[1]`` bytes, row-major).
* ``region`` — only when ``header["region"]`` is present (ARCD's machine-region head): the region
  mask, uint8 0/1 (1 = region), same shape, encoded as ``header["region"]["encoding"]`` (the
  same as ``mask_encoding``). The header block also carries the region's name, threshold, the
  share of frame pixels in it and its bounding box.

The publisher binds an XPUB socket. It sees subscriptions, so a subscriber that connected before
the stream started is known before the first frame (no slow-joiner loss), and with
``ZMQ_XPUB_NODROP`` a subscriber that cannot keep up makes the send fail instead of losing the
message silently: the pipeline counts that frame as dropped (``subscriber_slow``) and goes on.

Under NODROP one subscriber whose queue is full holds back every subscriber (ZeroMQ refuses the
whole message). A subscriber that is merely slow costs a few frames now and then; one that has
stopped reading (a viewer paused in a debugger, a hung recorder, a laptop asleep) would cost every
frame for as long as it stays connected. So when every send has failed for
``publish.stuck_subscriber_s`` the publisher closes and re-binds its socket: all subscribers are
disconnected, the healthy ones reconnect and resubscribe by themselves within a fraction of a
second, and the stuck one's queue is discarded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
import re
from typing import Any, Literal

import cv2
import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from inspector.errors import BindError

log = logging.getLogger(__name__)

SCHEMA = "inspector.defects/1"


class PublishConfig(BaseModel):
    """``publish:`` section of a camera config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    endpoint: str = Field("tcp://127.0.0.1:5556", pattern=r"^(tcp|ipc|inproc)://.+",
                          description="ZeroMQ endpoint the publisher binds")
    topic: str | None = Field(None, description="default: defects.<camera_id>")
    mask_encoding: Literal["png", "raw"] = "png"
    sndhwm: int = Field(100, ge=1, description="messages queued per subscriber before sends fail")
    nodrop: bool = Field(True, description="count frames a slow subscriber cannot take as dropped; "
                                           "false = ZeroMQ drops them for that subscriber alone, uncounted")
    wait_for_subscribers: int = Field(0, ge=0, description="hold the first frame until this many subscribed")
    wait_timeout_s: float = Field(10.0, ge=0)
    connect_grace_s: float = Field(0.3, ge=0, description="time given to already-running subscribers "
                                                          "to (re)connect before the first frame")
    linger_ms: int = Field(2000, ge=0, description="how long a clean stop waits to deliver queued messages")
    stuck_subscriber_s: float = Field(10.0, ge=0, description="with nodrop: when every send has failed "
                                      "this long, disconnect all subscribers (they reconnect) so one that "
                                      "stopped reading no longer holds back the others; 0 = never")

    @field_validator("endpoint")
    @classmethod
    def _tcp_port(cls, v: str) -> str:
        # ZeroMQ binds an out-of-range port to a random one without a word: subscribers would
        # never find the stream
        m = re.match(r"^tcp://.*:(\d+)$", v)
        if m and not 1 <= int(m.group(1)) <= 65535:
            raise ValueError(f"port {m.group(1)} is out of range 1-65535")
        return v


#: the PNG of an all-background mask, per shape: most frames of a strip have no defect, and
#: deflating 400 k zero bytes still costs ~0.5 ms of the pipeline's CPU budget per 256x1600 frame
_EMPTY_PNG: dict[tuple, bytes] = {}


def encode_mask(mask: np.ndarray, encoding: str) -> bytes:
    if encoding == "png":
        empty = not mask.any()
        key = mask.shape + (mask.dtype.str,)
        if empty and key in _EMPTY_PNG:
            return _EMPTY_PNG[key]
        # Masks are mostly zeros: no row filter plus run-length deflate is about 4x faster than
        # OpenCV's default adaptive filtering, at a similar size (measured on 256x1600 masks).
        ok, buf = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
                                              cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE])
        if not ok:
            raise ValueError("PNG encoding of the mask failed")
        data = buf.tobytes()
        if empty and len(_EMPTY_PNG) < 16:  # a few frame shapes per camera; bounded all the same
            _EMPTY_PNG[key] = data
        return data
    if encoding == "raw":
        return np.ascontiguousarray(mask, np.uint8).tobytes()
    raise ValueError(f"unknown mask encoding {encoding!r}")


def region_summary(region: np.ndarray) -> dict[str, Any]:
    """``fraction`` and ``bbox`` of a 0/1 region mask, as the header's ``region`` block has them.

    ``bbox`` is ``[x0, y0, x1, y1]``, inclusive-exclusive (``region[y0:y1, x0:x1]`` holds every
    region pixel), or None when no pixel is region.

    >>> m = np.zeros((4, 6), np.uint8); m[1:3, 2:5] = 1
    >>> region_summary(m)
    {'fraction': 0.25, 'bbox': [2, 1, 5, 3]}
    """
    # OpenCV's count and box of nonzero pixels: no temporary arrays of the frame's size
    n = cv2.countNonZero(region)
    if n == 0:
        return {"fraction": 0.0, "bbox": None}
    x, y, w, h = cv2.boundingRect(region)
    return {"fraction": round(n / region.size, 6), "bbox": [x, y, x + w, y + h]}


def _decode(data: bytes, enc: Any, header: dict[str, Any], what: str, key: str) -> np.ndarray:
    h, w = header["shape"][:2]
    fid = header.get("frame_id")
    if enc == "png":
        mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise ValueError(f"frame {fid}: {what} is not a valid PNG")
    elif enc == "raw":
        if len(data) != h * w:
            raise ValueError(f"frame {fid}: raw {what} has {len(data)} bytes, expected {h * w}")
        mask = np.frombuffer(data, np.uint8).reshape(h, w)
    else:
        raise ValueError(f"frame {fid}: unknown {key} {enc!r}")
    if mask.shape != (h, w):
        raise ValueError(f"frame {fid}: {what} shape {mask.shape} != header shape {(h, w)}")
    return mask


def decode_mask(data: bytes, header: dict[str, Any]) -> np.ndarray:
    """The class-index mask of a message, HxW uint8, checked against ``header["shape"]``."""
    return _decode(data, header["mask_encoding"], header, "mask", "mask_encoding")


def decode_region(data: bytes, header: dict[str, Any]) -> np.ndarray:
    """The region mask of a message (4th part), HxW uint8 0/1, checked against ``header["shape"]``."""
    block = header.get("region")
    if not isinstance(block, dict):
        raise ValueError(f"frame {header.get('frame_id')}: header has no region object")
    return _decode(data, block.get("encoding"), header, "region mask", "region.encoding")


class Publisher:
    """Binds the XPUB socket and sends reports without ever blocking the pipeline."""

    def __init__(self, cfg: PublishConfig, camera_id: str, context: zmq.Context | None = None):
        self.cfg = cfg
        self.topic = (cfg.topic or f"defects.{camera_id}").encode()
        self._ctx = context or zmq.Context.instance()
        self.sock: zmq.Socket | None = self._bind(cfg.endpoint)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.subscribers = 0
        self.resets = 0                          # times stuck subscribers were disconnected
        self._failing_since: float | None = None  # first failed send of the current run of failures
        self._last_fail = 0.0
        self._rebind_at = 0.0                     # earliest retry of a failed re-bind
        self._inproc_warned = False
        log.info("publishing on %s, topic %s", self.endpoint, self.topic.decode())

    def _bind(self, endpoint: str) -> zmq.Socket:
        cfg = self.cfg
        sock = self._ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, cfg.sndhwm)
        sock.setsockopt(zmq.LINGER, cfg.linger_ms)
        # every (un)subscription passes up, duplicates included: without these, two subscribers
        # of the same topic count as one and a leaving one goes unnoticed
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        if cfg.nodrop:
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            sock.close(0)
            raise BindError(e.errno, f"publish.endpoint: cannot bind {endpoint}: {e.strerror}") from e
        return sock

    def _drop_stuck_subscribers(self, failing_s: float) -> None:
        """Close and re-bind at the same address (see module doc)."""
        before = self.subscribers
        log.error("no subscriber could take a frame for %.1f s (publish.stuck_subscriber_s): one has "
                  "stopped reading and, with publish.nodrop, holds back all %d; disconnecting them all "
                  "(they reconnect by themselves; the stuck one's queued frames are discarded)",
                  failing_s, before)
        # a short linger: what is queued for the healthy subscribers still goes out (it was
        # counted as published); the stuck one's queue is dropped when it runs out
        self.sock.close(linger=min(self.cfg.linger_ms, 500))
        self.sock = None
        self.subscribers = 0
        self.resets += 1
        deadline = time.monotonic() + 2.0
        while not self._rebind():
            if time.monotonic() > deadline:
                log.error("cannot re-bind %s after disconnecting the subscribers; frames count as "
                          "subscriber_slow until it can, retried every second", self.endpoint)
                self._rebind_at = time.monotonic() + 1.0
                return
            time.sleep(0.02)  # the old listener closes in ZeroMQ's I/O thread, a moment after close()
        # Until the subscribers are back (ZeroMQ reconnects after 0.1 s) a send would reach no
        # one yet count as published: wait for them, briefly, once per reset.
        deadline = time.monotonic() + max(1.0, self.cfg.connect_grace_s)
        while self.subscribers < before and time.monotonic() < deadline:
            self.poll_subscriptions(0.05)

    def _rebind(self) -> bool:
        try:
            self.sock = self._bind(self.endpoint)
            return True
        except BindError:
            return False

    def poll_subscriptions(self, timeout_s: float = 0.0) -> int:
        """Read pending (un)subscribe notices; returns the current subscription count."""
        if self.sock is None:
            return self.subscribers
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not self.sock.poll(int(left * 1000), zmq.POLLIN):
                return self.subscribers
            msg = self.sock.recv()
            if msg[:1] == b"\x01":
                self.subscribers += 1
                log.info("subscriber joined (%d subscribed)", self.subscribers)
            elif msg[:1] == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)
                log.info("subscriber left (%d subscribed)", self.subscribers)

    def wait_ready(self, stop: threading.Event | None = None) -> int:
        """Before the first frame: let connected subscribers register; optionally wait for N,
        unless ``stop`` is set meanwhile (a stop requested during the wait)."""
        self.poll_subscriptions(self.cfg.connect_grace_s)
        want = self.cfg.wait_for_subscribers
        if want and self.subscribers < want:
            # said, or a daemon waiting here shows nothing but its warm-up line for up to
            # wait_timeout_s
            log.info("waiting up to %gs for %d subscriber(s) on %s (publish.wait_for_subscribers); "
                     "%d so far", self.cfg.wait_timeout_s, want, self.endpoint, self.subscribers)
            deadline = time.monotonic() + self.cfg.wait_timeout_s
            while (self.subscribers < want and time.monotonic() < deadline
                   and not (stop is not None and stop.is_set())):
                self.poll_subscriptions(min(0.1, max(0.0, deadline - time.monotonic())))
            if stop is not None and stop.is_set():
                return self.subscribers
            if self.subscribers < want:
                log.warning("only %d of %d subscribers after %.1fs; starting anyway",
                            self.subscribers, self.cfg.wait_for_subscribers, self.cfg.wait_timeout_s)
        return self.subscribers

    def send(self, header: dict[str, Any], mask_bytes: bytes, region_bytes: bytes | None = None) -> bool:
        """Send one report; False when a subscriber's queue is full (the frame is not delivered).

        ``region_bytes`` (the encoded region mask) goes out as a 4th part; the header must then
        have its ``region`` block, and must not without it (subscribers rely on the pairing)."""
        if ("region" in header) != (region_bytes is not None):
            raise ValueError(f"frame {header.get('frame_id')}: header region block and region part "
                             "must come together")
        if self.sock is None:  # a re-bind after a reset failed: try again, at most once a second
            if time.monotonic() < self._rebind_at or not self._rebind():
                self._rebind_at = max(self._rebind_at, time.monotonic() + 1.0)
                return False
            log.warning("re-bound %s", self.endpoint)
        if self.sock.poll(0, zmq.POLLIN):
            self.poll_subscriptions(0.0)
        try:
            parts = [self.topic, json.dumps(header, separators=(",", ":")).encode(), mask_bytes]
            if region_bytes is not None:
                parts.append(region_bytes)
            self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._failed_send(time.monotonic())
            return False
        self._failing_since = None
        return True

    def _failed_send(self, now: float) -> None:
        stuck_s = self.cfg.stuck_subscriber_s
        # A run of failures is "every send failing": two failures with a long pause between
        # (the camera was down) are not one.
        if self._failing_since is None or now - self._last_fail > max(1.0, stuck_s / 2):
            self._failing_since = now
        self._last_fail = now
        if not stuck_s or now - self._failing_since < stuck_s:
            return
        if self.endpoint.startswith("inproc://"):
            if not self._inproc_warned:  # inproc peers do not reconnect: a reset would lose them
                log.error("no subscriber could take a frame for %.1f s; an inproc:// endpoint "
                          "cannot disconnect a stuck subscriber", now - self._failing_since)
                self._inproc_warned = True
            return
        self._drop_stuck_subscribers(now - self._failing_since)
        self._failing_since = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


@dataclass
class Message:
    topic: str
    header: dict[str, Any]
    mask_bytes: bytes
    #: the 4th part, the encoded region mask; None for messages without a region
    region_bytes: bytes | None = None

    def mask(self) -> np.ndarray:
        return decode_mask(self.mask_bytes, self.header)

    def region(self) -> np.ndarray | None:
        """The region mask (HxW uint8, 1 = region), or None when the message has no region."""
        if self.region_bytes is None:
            return None
        return decode_region(self.region_bytes, self.header)


class Subscriber:
    """Client for the defect stream.

    Example::

        sub = Subscriber("tcp://127.0.0.1:5556")
        msg = sub.recv(timeout_s=5)       # None on timeout
        print(msg.header["frame_id"], msg.header["defects"], msg.mask().shape)
        if msg.region_bytes is not None:  # the bundle has a region head
            print(msg.header["region"]["fraction"], msg.region().shape)
    """

    def __init__(self, endpoint: str, topic: str = "", rcvhwm: int = 1000,
                 context: zmq.Context | None = None):
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as e:
            self.sock.close()
            raise ValueError(f"{endpoint!r}: not a ZeroMQ endpoint to connect to ({e.strerror}); "
                             "expected e.g. tcp://127.0.0.1:5556 or ipc:///run/inspector/cam1/defects") from None

    def recv(self, timeout_s: float | None = None) -> Message | None:
        if timeout_s is not None and not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        parts = self.sock.recv_multipart()
        if len(parts) not in (3, 4):
            raise ValueError(f"expected 3 or 4 message parts [topic, header, mask(, region)], "
                             f"got {len(parts)}")
        header = json.loads(parts[1])
        if not isinstance(header, dict) or header.get("schema") != SCHEMA:
            found = header.get("schema") if isinstance(header, dict) else type(header).__name__
            raise ValueError(f"unknown schema {found!r}, this client reads {SCHEMA}")
        # the header's region block and the 4th part come together (docs/zmq-schema.md); one
        # without the other is a broken publisher, not a frame without a region
        has_block = header.get("region") is not None
        if has_block and len(parts) == 3:
            raise ValueError(f"frame {header.get('frame_id')}: header has a region block but the "
                             "message has no 4th part (region mask)")
        if len(parts) == 4 and not has_block:
            raise ValueError(f"frame {header.get('frame_id')}: message has a 4th part but the "
                             "header has no region block")
        return Message(parts[0].decode(), header, parts[2], parts[3] if len(parts) == 4 else None)

    def close(self) -> None:
        self.sock.close()
