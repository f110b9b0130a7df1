"""A subscriber written from docs/zmq-schema.md alone must work: run its snippet verbatim."""

import re
import threading

from conftest import ROOT
from inspector.config import parse_config
from inspector.pipeline import Pipeline


def test_doc_snippet_reads_a_live_stream(synthetic_cfg):
    doc = (ROOT / "docs" / "zmq-schema.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    # the first frame waits for the snippet's subscription, however late its thread connects
    cfg = parse_config(synthetic_cfg(source={"fps": 20},
                                     publish={"wait_for_subscribers": 1, "wait_timeout_s": 60}), "t.yaml")
    snippet = snippet.replace("tcp://127.0.0.1:5556", cfg.publish.endpoint)
    snippet = snippet.replace("print(", "result.append((").replace("m.shape)", "m.shape))")
    result: list = []
    t = threading.Thread(target=exec, args=(snippet, {"result": result}))
    t.start()
    with Pipeline(cfg) as p:
        p.run(frames=10)
    t.join(timeout=30)
    assert result and result[0][2] == (128, 512)


def test_two_subscribers_of_one_topic_count_as_two_and_leaving_is_seen(caplog):
    # Without XPUB_VERBOSE ZeroMQ passes a duplicate subscription up once: wait_for_subscribers: 2
    # waited its whole timeout with both connected, and a leaving subscriber went unnoticed.
    import time

    from conftest import free_endpoint
    from inspector.publish import PublishConfig, Publisher, Subscriber
    ep = free_endpoint()
    caplog.set_level("INFO", logger="inspector.publish")
    pub = Publisher(PublishConfig(endpoint=ep, wait_for_subscribers=2, wait_timeout_s=10,
                                  connect_grace_s=0.1), "cam")
    subs = [Subscriber(ep, topic="defects.") for _ in range(2)]
    try:
        # both subscriptions seen: the wait ended on the second, not on its timeout
        assert pub.wait_ready() == 2
        ours = [r.getMessage() for r in caplog.records if r.name == "inspector.publish"]
        assert [m for m in ours if "subscriber joined" in m] == ["subscriber joined (1 subscribed)",
                                                                  "subscriber joined (2 subscribed)"], ours
        assert not any("starting anyway" in m for m in ours), ours
        subs.pop().close()
        deadline = time.monotonic() + 5
        while pub.poll_subscriptions(0.1) != 1:
            assert time.monotonic() < deadline, pub.subscribers
    finally:
        for s in subs:
            s.close()
        pub.close()


def test_after_a_stuck_subscriber_reset_every_frame_counted_as_sent_reaches_the_healthy_one():
    # Right after the re-bind the subscribers are not back yet: a send then reached no one but
    # counted as published. The publisher now waits for them (once per reset).
    import time

    import zmq

    from conftest import free_endpoint
    from inspector.publish import PublishConfig, Publisher
    ep = free_endpoint()
    pub = Publisher(PublishConfig(endpoint=ep, sndhwm=5, stuck_subscriber_s=0.5, connect_grace_s=0.2), "cam")
    ctx = zmq.Context()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 5)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(ep)
    good = ctx.socket(zmq.SUB)
    good.setsockopt(zmq.SUBSCRIBE, b"")
    good.connect(ep)
    try:
        pub.wait_ready()
        sent, got = [], set()
        for i in range(150):
            if pub.send({"i": i}, b"x" * 200_000):
                sent.append(i)
            while good.poll(0):
                got.add(int(good.recv_multipart()[1][5:-1]))
            time.sleep(0.01)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            while good.poll(50):
                got.add(int(good.recv_multipart()[1][5:-1]))
        assert pub.resets >= 1
        assert [i for i in sent if i not in got] == []
        # the healthy subscriber was not starved: sends went through again after the first stall
        first_fail = next(i for i in range(150) if i not in sent)
        assert sum(1 for i in sent if i > first_fail) >= 20, (first_fail, len(sent))
    finally:
        stuck.close(0)
        good.close(0)
        pub.close()
        ctx.term()


def test_an_empty_mask_encodes_once_per_shape_and_decodes_like_any_other():
    import numpy as np

    from inspector.publish import decode_mask, encode_mask

    empty = np.zeros((37, 91), np.uint8)
    first, again = encode_mask(empty, "png"), encode_mask(empty.copy(), "png")
    assert first is again  # kept, not deflated again
    header = {"shape": [37, 91], "mask_encoding": "png"}
    assert np.array_equal(decode_mask(again, header), empty)
    marked = empty.copy()
    marked[5, 7] = 3  # a mask of the same shape with a defect is encoded afresh
    assert decode_mask(encode_mask(marked, "png"), header)[5, 7] == 3
    other = np.zeros((37, 92), np.uint8)
    assert decode_mask(encode_mask(other, "png"), {**header, "shape": [37, 92]}).shape == (37, 92)
