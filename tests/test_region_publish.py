"""ARCD's machine-region head on the output side: the header's ``region`` block, the 4th message
part, the subscriber client, the recorder's ``regions/`` folder and ``inspector subscribe``.

Real parts throughout: a real onnxruntime session on ``region_bundle`` (bright pixels are region),
the real pipeline, real ZeroMQ sockets on loopback, the real recorder on a temporary folder.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from conftest import ROOT, free_endpoint, subscribed
from inspector.config import parse_config
from inspector.frame import Frame
from inspector.pipeline import Pipeline
from inspector.publish import SCHEMA, PublishConfig, Publisher, Subscriber, region_summary
from inspector.recorder import GB, Recorder, RecordConfig
from inspector.sources.base import Source

DARK, BRIGHT = 100, 200  # region_bundle: p(region) ~0.013 at grey 100, ~1.0 at grey 200
#: the first frame waits for the test's subscription (the product's own option): ZeroMQ drops what
#: is sent before a subscription arrives, yet the frame counts as published
WAIT_FOR_SUBSCRIBER = {"wait_for_subscribers": 1, "wait_timeout_s": 60}


class ListSource(Source):
    """Hands given images to the pipeline, then ends."""

    def __init__(self, images: list[np.ndarray]):
        self.camera_id = "test"
        self.images = list(images)
        self.i = 0

    def open(self) -> None:
        pass

    def read(self) -> Frame | None:
        if self.i >= len(self.images):
            return None
        self.i += 1
        return Frame("test", self.i - 1, time.time_ns(), self.images[self.i - 1])

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def region_model(tmp_path_factory) -> Path:
    from toy_models import region_bundle
    return region_bundle(tmp_path_factory.mktemp("bundles") / "region", tile=64,
                         name="machine region", threshold=0.5)


def bright_frame(h: int, w: int, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """A DARK frame with a BRIGHT rectangle ``box`` = (x0, y0, x1, y1), inclusive-exclusive."""
    img = np.full((h, w), DARK, np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        img[y0:y1, x0:x1] = BRIGHT
    return img


def region_cfg(synthetic_cfg, bundle: Path, h: int, w: int, **over):
    # the synthetic source section only sizes the warm-up; the frames come from ListSource
    return parse_config(synthetic_cfg(model={"bundle": str(bundle)},
                                      source={"width": w, "height": h},
                                      pipeline={"backpressure": True}, **over), "t.yaml")


def run_frames(cfg, images: list[np.ndarray], n_msgs: int | None = None):
    assert cfg.publish.wait_for_subscribers == 1, "give region_cfg publish=WAIT_FOR_SUBSCRIBER"
    got, t = subscribed(cfg.publish.endpoint, len(images) if n_msgs is None else n_msgs, timeout_s=60)
    reports: list[dict] = []
    bufs: list[int] = []
    with Pipeline(cfg, on_report=lambda h: (reports.append(h), bufs.append(id(p._region_buf))),
                  source=ListSource(images)) as p:
        counters = p.run()
    t.join()
    return got, counters, bufs, p


def test_region_png_header_block_and_fourth_part(synthetic_cfg, region_model):
    h, w = 128, 256
    box = (30, 20, 110, 60)
    images = [bright_frame(h, w, box), bright_frame(h, w, None), bright_frame(h, w, (0, 0, w, h))]
    cfg = region_cfg(synthetic_cfg, region_model, h, w, publish=WAIT_FOR_SUBSCRIBER)
    got, counters, bufs, _ = run_frames(cfg, images)
    assert counters["published"] == 3 and len(got) == 3
    assert len(set(bufs)) == 1, "the region mask buffer is reused, not allocated per frame"

    m0, m1, m2 = got
    # the header block, exactly the contract's keys
    assert m0.header["schema"] == SCHEMA
    assert m0.header["region"] == {"name": "machine region", "threshold": 0.5,
                                   "fraction": round(80 * 40 / (h * w), 6), "bbox": [30, 20, 110, 60],
                                   "encoding": "png"}
    # the 4th part, decoded by the client and, as a subscriber from the docs would, by OpenCV alone
    expected = (images[0] == BRIGHT).astype(np.uint8)
    region = m0.region()
    assert region.dtype == np.uint8 and region.shape == (h, w)
    np.testing.assert_array_equal(region, expected)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(m0.region_bytes, np.uint8),
                                               cv2.IMREAD_UNCHANGED), expected)
    # the defect mask is still the 3rd part, unchanged in kind
    assert m0.mask().shape == (h, w)
    # a frame without any region pixel: still 4 parts, an empty mask, bbox null
    assert m1.header["region"]["fraction"] == 0.0 and m1.header["region"]["bbox"] is None
    assert m1.region_bytes is not None and not m1.region().any()
    # the whole frame
    assert m2.header["region"]["fraction"] == 1.0 and m2.header["region"]["bbox"] == [0, 0, w, h]
    assert m2.region().all()


def test_region_raw_encoding_on_a_frame_smaller_than_a_tile(synthetic_cfg, region_model):
    # 48 rows < the 64-pixel tile: the adapter pads and crops its maps back; the region must
    # come out at the frame's size, in raw bytes
    h, w = 48, 200
    box = (150, 10, 200, 48)
    images = [bright_frame(h, w, box), bright_frame(h, w, (5, 5, 6, 6))]
    cfg = region_cfg(synthetic_cfg, region_model, h, w, publish={"mask_encoding": "raw", **WAIT_FOR_SUBSCRIBER})
    got, counters, _, _ = run_frames(cfg, images)
    assert counters["published"] == 2
    m0, m1 = got
    assert m0.header["region"]["encoding"] == "raw" and m0.header["mask_encoding"] == "raw"
    assert len(m0.region_bytes) == h * w
    expected = (images[0] == BRIGHT).astype(np.uint8)
    np.testing.assert_array_equal(np.frombuffer(m0.region_bytes, np.uint8).reshape(h, w), expected)
    np.testing.assert_array_equal(m0.region(), expected)
    assert m0.header["region"]["bbox"] == [150, 10, 200, 48]
    assert m1.header["region"]["bbox"] == [5, 5, 6, 6]
    assert m1.header["region"]["fraction"] == round(1 / (h * w), 6)


def test_threshold_comes_from_the_bundle(synthetic_cfg, tmp_path):
    # grey 140: p = sigmoid(40 * (140/255 - 0.5)) ~ 0.87 -> region at threshold 0.5, not at 0.95
    from toy_models import region_bundle
    bundle = region_bundle(tmp_path / "strict", tile=64, threshold=0.95, name="roll")
    img = np.full((64, 128), 140, np.uint8)
    img[:, 100:] = BRIGHT
    cfg = region_cfg(synthetic_cfg, bundle, 64, 128, publish=WAIT_FOR_SUBSCRIBER)
    got, _, _, _ = run_frames(cfg, [img])
    block = got[0].header["region"]
    assert block["name"] == "roll" and block["threshold"] == 0.95
    assert block["bbox"] == [100, 0, 128, 64]
    np.testing.assert_array_equal(got[0].region(), (img == BRIGHT).astype(np.uint8))


def test_bundle_without_region_sends_three_parts_and_no_key(synthetic_cfg):
    # the toy (dark spot) bundle has no region head: the message is as before, 3 parts
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}, publish=WAIT_FOR_SUBSCRIBER), "t.yaml")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(cfg.publish.endpoint)
    raw: list[list[bytes]] = []

    def read() -> None:
        while len(raw) < 3 and sock.poll(30000):
            raw.append(sock.recv_multipart())

    t = threading.Thread(target=read)
    t.start()
    with Pipeline(cfg) as p:
        p.run(frames=3)
    t.join()
    sock.close()
    assert p._region_buf is None
    assert len(raw) == 3
    for parts in raw:
        assert len(parts) == 3
        header = json.loads(parts[1])
        assert "region" not in header


def test_client_returns_none_region_for_three_part_messages(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}, publish=WAIT_FOR_SUBSCRIBER), "t.yaml")
    got, t = subscribed(cfg.publish.endpoint, 2, timeout_s=60)
    with Pipeline(cfg) as p:
        p.run(frames=2)
    t.join()
    assert len(got) == 2
    assert all(m.region_bytes is None and m.region() is None for m in got)


def _send_until_received(pub: zmq.Socket, sub: Subscriber, parts: list[bytes]):
    """Send ``parts`` until the subscriber's recv returns or raises (ZeroMQ's slow joiner)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pub.send_multipart(parts)
        msg = sub.recv(timeout_s=0.1)
        if msg is not None:
            return msg
    raise AssertionError("nothing arrived")


def test_client_refuses_a_region_header_without_its_part_and_the_reverse():
    ep = free_endpoint()
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(ep)
    sub = Subscriber(ep)
    mask = np.zeros((4, 6), np.uint8).tobytes()
    base = {"schema": SCHEMA, "frame_id": 17, "shape": [4, 6], "mask_encoding": "raw", "defects": []}
    block = {"name": "machine region", "threshold": 0.5, "fraction": 0.0, "bbox": None, "encoding": "raw"}
    try:
        with pytest.raises(ValueError, match=r"^frame 17: header has a region block but the message "
                                             r"has no 4th part"):
            _send_until_received(pub, sub, [b"defects.x", json.dumps({**base, "region": block}).encode(),
                                            mask])
        with pytest.raises(ValueError, match=r"^frame 17: message has a 4th part but the header has "
                                             r"no region block"):
            _send_until_received(pub, sub, [b"defects.x", json.dumps(base).encode(), mask, mask])
        with pytest.raises(ValueError, match=r"expected 3 or 4 message parts"):
            _send_until_received(pub, sub, [b"defects.x", json.dumps(base).encode(), mask, mask, mask])
        # a region part of the wrong size names the frame too, when decoded
        msg = _send_until_received(pub, sub, [b"defects.x", json.dumps({**base, "region": block}).encode(),
                                              mask, b"\x00" * 5])
        with pytest.raises(ValueError, match=r"^frame 17: raw region mask has 5 bytes, expected 24"):
            msg.region()
        # and a well-formed one decodes
        region = np.zeros((4, 6), np.uint8)
        region[1:3, 2:5] = 1
        msg = _send_until_received(pub, sub, [b"defects.x", json.dumps({**base, "region": block}).encode(),
                                              mask, region.tobytes()])
        np.testing.assert_array_equal(msg.region(), region)
    finally:
        sub.close()
        pub.close()


def test_publisher_refuses_a_region_block_without_its_part():
    pub = Publisher(PublishConfig(endpoint=free_endpoint(), connect_grace_s=0), "cam")
    try:
        header = {"schema": SCHEMA, "frame_id": 3, "region": {"name": "r"}}
        with pytest.raises(ValueError, match="^frame 3: header region block and region part"):
            pub.send(header, b"")
        with pytest.raises(ValueError, match="^frame 3: header region block and region part"):
            pub.send({"schema": SCHEMA, "frame_id": 3}, b"", b"")
    finally:
        pub.close()


def test_region_summary_box_is_inclusive_exclusive():
    m = np.zeros((10, 20), np.uint8)
    assert region_summary(m) == {"fraction": 0.0, "bbox": None}
    m[9, 19] = 1
    assert region_summary(m) == {"fraction": 0.005, "bbox": [19, 9, 20, 10]}
    m[0, 0] = 1
    assert region_summary(m)["bbox"] == [0, 0, 20, 10]


def _disk_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name != ".lock")


def test_recorder_writes_the_region_png_beside_the_others(synthetic_cfg, region_model, tmp_path):
    h, w = 64, 256
    # a dark spot (the toy's defect class) in frame 0 only; every frame has a bright region.
    # The toy flags pixels darker than their 9x9 neighbourhood: beside a wide bright area the dark
    # side is a "defect", beside a line 1 or 2 pixels wide it is not, so frames 1 and 2 stay normal
    spotted = bright_frame(h, w, (200, 0, 256, 64))
    spotted[30:34, 50:54] = 10
    images = [spotted, bright_frame(h, w, (0, 10, 256, 12)), bright_frame(h, w, (100, 0, 101, 64))]
    rec_dir = tmp_path / "rec"
    cfg = region_cfg(synthetic_cfg, region_model, h, w, publish=WAIT_FOR_SUBSCRIBER,
                     record={"enabled": True, "dir": str(rec_dir), "normal_every": 1})
    got, counters, _, p = run_frames(cfg, images)
    assert counters["published"] == 3
    root = rec_dir / "test"
    kinds = {m.header["frame_id"]: ("defects" if m.header["defects"] else "normal") for m in got}
    assert kinds[0] == "defects" and kinds[1] == kinds[2] == "normal", kinds
    for m in got:
        fid, kind = m.header["frame_id"], kinds[m.header["frame_id"]]
        (image,) = (root / kind / "images").glob(f"*-f{fid:09d}.png")
        region_png = root / kind / "regions" / image.name
        saved = cv2.imread(str(region_png), cv2.IMREAD_UNCHANGED)
        # 0/255, so it is viewable; the published region scaled
        assert saved.dtype == np.uint8 and set(np.unique(saved)) <= {0, 255}
        np.testing.assert_array_equal(saved, m.region() * 255)
        meta = json.loads((root / kind / "meta" / f"{image.stem}.json").read_text())
        assert meta["region"] == m.header["region"]
    snap = p.recorder.snapshot()
    assert snap["recorded"] == {"defects": 1, "normal": 2} and sum(snap["skipped"].values()) == 0
    # the disk accounting counts the region PNGs
    assert snap["bytes"] == _disk_bytes(root)

    # a restart takes stock of regions/ too: a region without its image (killed between its
    # renames) and a hidden part-file are removed, the rest is counted
    (root / "normal" / "regions" / "20000101T000000000Z-f000000099.png").write_bytes(b"x" * 10)
    (root / "defects" / "regions" / ".20000101T000000000Z-f000000098.png.part").write_bytes(b"x")
    rec = Recorder(RecordConfig(enabled=True, dir=str(rec_dir), normal_every=1), "test",
                   ["background", "dark"])
    try:
        assert not (root / "normal" / "regions" / "20000101T000000000Z-f000000099.png").exists()
        assert not list((root / "defects" / "regions").glob(".*"))
        assert rec.used == _disk_bytes(root) == snap["bytes"]
    finally:
        rec.close()

    # removing the oldest records removes their region PNGs with them
    rec = Recorder(RecordConfig(enabled=True, dir=str(rec_dir), normal_every=1, max_gb=1 / GB),
                   "test", ["background", "dark"])
    rec.start()
    region = np.zeros((h, w), np.uint8)
    region[:5, :5] = 1
    frame = Frame("test", 500, time.time_ns(), bright_frame(h, w, (0, 0, 5, 5)))
    assert rec.offer(frame, np.zeros((h, w), np.uint8), {"defects": []}, region) == "normal"
    region[:] = 0  # the pipeline reuses its buffer at once: the recorder must have copied it
    rec.close()
    left = sorted(p.name for p in root.rglob("*.png"))
    assert len(left) == 2 and all(n.endswith("-f000000500.png") for n in left), left
    saved = cv2.imread(str(root / "normal" / "regions" / left[0]), cv2.IMREAD_UNCHANGED)
    assert int(saved[:5, :5].min()) == 255 and int(saved.sum()) == 25 * 255
    assert rec.used == _disk_bytes(root)


def test_recorder_without_region_makes_no_regions_folder(synthetic_cfg, tmp_path):
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}, source={"defect_rate": 0.5},
                                     record={"enabled": True, "dir": str(tmp_path / "rec"),
                                             "normal_every": 1}), "t.yaml")
    with Pipeline(cfg) as p:
        p.run(frames=6)
    root = tmp_path / "rec" / "test"
    assert sum(p.recorder.snapshot()["recorded"].values()) == 6
    assert not list(root.rglob("regions"))


def test_doc_snippet_reads_the_region(synthetic_cfg, region_model):
    # docs/zmq-schema.md's subscriber, verbatim but for the endpoint, on a stream with a region
    doc = (ROOT / "docs" / "zmq-schema.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    h, w = 64, 128
    img = bright_frame(h, w, (10, 20, 30, 40))
    # the first frame waits for the snippet's subscription (no sleep to guess a connect time)
    cfg = region_cfg(synthetic_cfg, region_model, h, w, publish=WAIT_FOR_SUBSCRIBER)
    snippet = snippet.replace("tcp://127.0.0.1:5556", cfg.publish.endpoint)
    scope: dict = {}
    # a daemon thread: a snippet that never gets its message fails the test, not pytest's exit
    t = threading.Thread(target=exec, args=(snippet, scope), daemon=True)
    t.start()
    with Pipeline(cfg, source=ListSource([img] * 5)) as p:
        p.run()
    t.join(timeout=30)
    assert scope["h"]["region"]["bbox"] == [10, 20, 30, 40]
    np.testing.assert_array_equal(scope["r"], (img == BRIGHT).astype(np.uint8))


def test_subscribe_command_saves_the_region_png(synthetic_cfg, region_model, tmp_path):
    h, w = 64, 128
    img = bright_frame(h, w, (64, 0, 128, 64))
    cfg = region_cfg(synthetic_cfg, region_model, h, w, publish=WAIT_FOR_SUBSCRIBER)
    out = tmp_path / "masks"
    proc = subprocess.Popen([sys.executable, "-m", "inspector", "subscribe", "--endpoint",
                             cfg.publish.endpoint, "--count", "2", "--timeout", "60", "--json",
                             "--save-masks", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with Pipeline(cfg, source=ListSource([img, img])) as p:
            p.run()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    headers = [json.loads(line) for line in stdout.splitlines()]
    assert [x["region"]["bbox"] for x in headers] == [[64, 0, 128, 64]] * 2
    for x in headers:
        saved = cv2.imread(str(out / f"test_{x['frame_id']:08d}_region.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(saved, (img == BRIGHT).astype(np.uint8) * 255)
        assert (out / f"test_{x['frame_id']:08d}.png").is_file()


def test_a_hot_swap_between_bundles_with_and_without_a_region(synthetic_cfg, region_model, tmp_path):
    """The daemon's reload swaps the model between frames: a message carries the region exactly
    when the bundle that inspected its frame has one (3 parts, 4, then 3 again), and the recorder
    keeps a region PNG only for those frames."""
    from inspector.pipeline import load_model
    from toy_models import dark_spot_bundle

    plain = dark_spot_bundle(tmp_path / "plain", tile=64, classes=("background", "dark"))
    h, w = 64, 128
    over = {"record": {"enabled": True, "dir": str(tmp_path / "rec"), "normal_every": 1, "min_free_gb": 0}}
    cfg = region_cfg(synthetic_cfg, plain, h, w, publish=WAIT_FOR_SUBSCRIBER, **over)
    swaps = {3: region_model, 6: plain}
    holder: list[Pipeline] = []
    published: list[int] = []

    class SwappingSource(ListSource):
        def read(self) -> Frame | None:
            # lockstep: each frame is read once the one before is published, so the frames a
            # swap applies to are known exactly (with frames in flight it would depend on timing)
            deadline = time.monotonic() + 30
            while len(published) < self.i and time.monotonic() < deadline:
                time.sleep(0.002)
            if self.i in swaps:
                holder[0].swap_model(load_model(region_cfg(synthetic_cfg, swaps[self.i], h, w, **over)))
            return super().read()

    got, t = subscribed(cfg.publish.endpoint, 9, timeout_s=60)
    with Pipeline(cfg, source=SwappingSource([bright_frame(h, w, (0, 0, 32, h))] * 9),
                  on_report=lambda hdr: published.append(hdr["frame_id"])) as p:
        holder.append(p)
        counters = p.run()
    t.join()
    assert counters["published"] == 9 and len(got) == 9
    got.sort(key=lambda m: m.header["frame_id"])
    assert [m.region_bytes is not None for m in got] == [False] * 3 + [True] * 3 + [False] * 3
    assert ["region" in m.header for m in got] == [False] * 3 + [True] * 3 + [False] * 3
    assert all(m.header["region"]["bbox"] == [0, 0, 32, h] for m in got[3:6])
    rec = tmp_path / "rec" / "test"
    assert len(list(rec.rglob("images/*.png"))) == 9
    assert len(list(rec.rglob("regions/*.png"))) == 3
