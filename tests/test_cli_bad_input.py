"""Command-line input a line engineer types by hand: `inspector subscribe` pointed at the wrong
place, and counts or durations that cannot be meant (zero, negative). One line naming the option
and the right exit code, never a traceback or a run that silently does nothing."""

from __future__ import annotations

import threading

import pytest
import zmq

from conftest import run_cli
from ports import free_port




def test_bad_endpoint_is_named():
    r = run_cli("subscribe", "--endpoint", "nonsense", "--count", "1", timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "'nonsense': not a ZeroMQ endpoint" in r.stderr


@pytest.mark.parametrize("args, why", [
    (["run", "--config", "configs/demo.yaml", "--frames", "0"], "--frames: must be >= 1, got 0"),
    (["run", "--config", "configs/demo.yaml", "--seconds", "-2"], "--seconds: must be > 0, got -2"),
    (["subscribe", "--count", "-1"], "--count: must be >= 1, got -1"),
    (["subscribe", "--timeout", "0"], "--timeout: must be > 0, got 0"),
    (["bench", "--config", "configs/demo.yaml", "--frames", "x"], "--frames: not a whole number: 'x'"),
    (["bench", "--config", "configs/demo.yaml", "--fps", "0"], "--fps: must be > 0, got 0"),
    (["alarms", "test", "--config", "configs/demo.yaml", "--hold", "-1"], "--hold: must be >= 0, got -1"),
    (["evaluate", "--bundle", "deploy/models/demo-arcd", "--data", ".", "--format", "folder",
      "--overlays", "-2"], "--overlays: must be >= 0, got -2"),
    (["train", "clgan", "--config", "configs/train/clgan-mt.yaml", "--max-iters", "0"],
     "--max-iters: must be >= 1, got 0"),
    # ignored for ARCD: the whole schedule ran (17 min of the demo config for a "1-step" smoke run)
    (["train", "arcd", "--config", "configs/train/arcd-demo.yaml", "--max-iters", "1"],
     "--max-iters: clgan and fuzzymask only"),
    (["calibrate", "thresholds", "--config", "configs/demo.yaml", "--frames", "20", "--target-fpr",
      "0.02", "--threads", "-1", "--dry-run"], "--threads: must be >= 0, got -1"),
])
def test_counts_and_durations_must_make_sense(args, why):
    """`--frames -3` used to run zero frames and exit 0 as if it had worked."""
    r = run_cli(*args, timeout=60)
    assert r.returncode == 2 and why in r.stderr, r.stderr


def test_unwritable_mask_folder_is_named(tmp_path):
    blocker = tmp_path / "masks"
    blocker.write_text("a file where the folder should be")
    r = run_cli("subscribe", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--count", "1",
                "--save-masks", str(blocker), timeout=60)
    assert r.returncode == 2 and f"--save-masks {blocker}: cannot create the folder" in r.stderr, r.stderr


def test_foreign_publisher_is_one_line_not_a_traceback():
    """Pointed at a ZeroMQ publisher that is not an inspector (wrong port, another system)."""
    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def publish() -> None:  # until the subscriber has joined and read one
        while not stop.is_set():
            pub.send_multipart([b"plc", b'{"tag": "speed", "value": 3.2}', b"\x00"])
            stop.wait(0.05)

    t = threading.Thread(target=publish, daemon=True)
    t.start()
    try:
        r = run_cli("subscribe", "--endpoint", f"tcp://127.0.0.1:{port}", "--count", "3",
                    "--timeout", "30", timeout=60)
    finally:
        stop.set()
        t.join(5)
        pub.close()
        ctx.term()
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"tcp://127.0.0.1:{port}: message 1 is not an inspector defect message" in r.stderr
    assert "unknown schema None" in r.stderr and "0 received" in r.stderr


def test_argtypes_bounds_and_messages():
    import argparse

    from inspector.argtypes import non_negative_float, non_negative_int, positive_float, positive_int

    assert positive_int("3") == 3 and non_negative_int("0") == 0
    assert positive_float("0.5") == 0.5 and non_negative_float("0") == 0.0
    for parse, text, why in [(positive_int, "0", "must be >= 1, got 0"),
                             (positive_int, "2.5", "not a whole number: '2.5'"),
                             (non_negative_int, "-1", "must be >= 0, got -1"),
                             (positive_float, "0", "must be > 0, got 0"),
                             (positive_float, "nan", "must be > 0, got nan"),
                             (non_negative_float, "-0.1", "must be >= 0, got -0.1"),
                             (non_negative_float, "soon", "not a number: 'soon'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=why.replace(".", r"\.")):
            parse(text)


def test_evaluating_a_class_model_on_data_of_other_classes_is_refused(tmp_path):
    # arcd-neu on magnetic-tile data exited 0 and scored Blowhole pixels as NEU's "inclusion"
    # (MIoU 0.143); with --record those figures would have gone into the bundle.
    import cv2
    import numpy as np
    for cat, defect in (("Free", False), ("Blowhole", True)):
        d = tmp_path / f"MT_{cat}" / "Imgs"
        d.mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(d / f"{cat}{i}.jpg"), np.full((40, 50), 120, np.uint8))
            m = np.zeros((40, 50), np.uint8)
            if defect:
                m[5:10, 5:10] = 255
            cv2.imwrite(str(d / f"{cat}{i}.png"), m)
    r = run_cli("evaluate", "--bundle", "deploy/models/arcd-neu", "--data", str(tmp_path),
                "--format", "magnetic-tile", "--split", "all", "--json", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "data set's classes ['background', 'Blowhole'" in r.stderr
    assert "are not the bundle's ['background', 'inclusion', 'patches', 'scratches']" in r.stderr


def test_training_on_a_missing_data_root_exits_2(tmp_path):
    # FileNotFoundError is an OSError, which the CLI counted as a runtime fault (exit 1)
    from conftest import ROOT
    text = (ROOT / "configs/train/arcd-neu.yaml").read_text()
    cfg = tmp_path / "arcd.yaml"
    cfg.write_text("\n".join(("  root: " + str(tmp_path / "no_such_data")) if line.strip().startswith("root:")
                             else line for line in text.splitlines()) + "\n")
    r = run_cli("train", "arcd", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2, r.stderr
    assert (f"{tmp_path / 'no_such_data'}: NEU-Seg root not found (expected images/ and annotations/"
            in r.stderr.strip().splitlines()[-1])
