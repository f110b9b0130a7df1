"""Walkthrough E (ARCD offline workflow): the fixes of E3, E4, E5, E6, E7 (stops of export and
evaluate), E9, E10 and E12, each on tiny real runs (2 + 2 steps, real ONNX Runtime).

- E3: after a copied stage-1 checkpoint, or a finished run resumed with another data root,
  metrics.json's ``data`` (and so the bundle's ``provenance.data``) described the new config's
  data, not what trained the weights.
- E4: a finished checkpoint without metrics.json (stopped in its final validation) exported with
  default thresholds, marked complete; now refused like stale metrics unless
  ``--allow-stale-metrics``.
- E5: ``train arcd`` into a folder that holds a run exited 1 and said "pass resume=True".
- E6: a stop said "the trainer's last log line says whether a checkpoint was saved; continue
  with --resume" where that line said nothing of the kind; a stop before the first step left an
  empty run folder.
- E7: Ctrl-C / SIGTERM during ``export onnx`` / ``evaluate`` printed a traceback.
- E9: magnetic-tile validation leaves MT_Free out without saying so.
- E10: "split 'train' is the hash share(s) ['train', 'test']".
- E12: a plain U-Net run recorded stage-1 data it never used.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, run_cli

torch = pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")

from test_arcd_neu import CLASSES, neu_folder  # noqa: E402


def tiny_config(path: Path, root: Path, classes=CLASSES, model: dict | None = None, **data) -> Path:
    cfg = {"name": "tiny", "threads": 1, "log_every": 1, "checkpoint_every": 1,
           "model": {"in_channels": 1, "classes": list(classes), "tile": [64, 64], "r_base_width": 2,
                     "r_depth": 3, "d_base_channels": 2, "d_depth": 3, **(model or {})},
           "data": {"source": "neu-seg", "root": str(root), "calib_images": 1, "val_images": 0,
                    "normal_patch": 16, "train_crop": [32, 32], **data},
           "stage1": {"steps": 2, "batch_size": 2},
           "stage2": {"steps": 2, "batch_size": 2},
           "evaluation": {"threshold_candidates": [0.3, 0.5]}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def stage_parts(text: str) -> tuple[str, str]:
    """(stage 2's, stage 1's) wording of a metrics.json ``data`` text."""
    s2, rest = text.split("; stage 1: ", 1)
    return s2.removeprefix("stage 2: "), rest.split("; thresholds from ", 1)[0]


@pytest.fixture(scope="module")
def neu(tmp_path_factory) -> Path:
    return neu_folder(tmp_path_factory.mktemp("neu") / "neu", n=16)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, neu) -> Path:
    """A finished tiny run (with checkpoint-stage1.pt) and its config."""
    from export.arcd.train import train

    base = tmp_path_factory.mktemp("finished")
    return train(tiny_config(base / "t.yaml", neu), base / "run")


def _cli_script(patch: str, argv: list[str]) -> str:
    """``python -c`` text: apply ``patch`` (real code with a real signal sent from inside it),
    then run ``inspector`` with ``argv`` as its command line does."""
    return textwrap.dedent(f"""
        import os, signal, sys, time
        {textwrap.indent(textwrap.dedent(patch), '        ').strip()}
        from inspector.cli import main
        sys.exit(main({argv!r}))
    """)


def run_patched(patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _cli_script(patch, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("inspector: error:")]


# ----------------------------------------------------------------------------- E3

def test_e3_data_text_says_what_trained_the_weights_after_a_copied_stage1_checkpoint(tmp_path, finished, neu):
    from export.arcd.train import train

    first = metrics_of(finished)
    s2_first, s1_first = stage_parts(first["data"])
    # the README's reuse recipe, with another label rate and windows from the labelled images
    run = tmp_path / "s1r"
    run.mkdir()
    shutil.copy(finished / "checkpoint-stage1.pt", run / "checkpoint.pt")
    cfg = tiny_config(tmp_path / "l50.yaml", neu, label_fraction=0.5, stage1_windows="labelled")
    train(cfg, run, resume=True)
    m = metrics_of(run)
    s2, s1 = stage_parts(m["data"])
    assert m["stage1"]["data"] == first["stage1"]["data"]  # as before
    assert s1 == s1_first  # was this config's stage 1 (labelled windows, half the images)
    assert "label rate 0.5" in s2 and s2 != s2_first  # stage 2 did train on the new data

    # a finished run resumed with another data root trains nothing: the data stays the old one
    other = tmp_path / "other"
    shutil.copytree(neu, other)
    again = tmp_path / "again"
    shutil.copytree(finished, again)
    train(tiny_config(tmp_path / "other.yaml", other), again, resume=True)
    s2, s1 = stage_parts(metrics_of(again)["data"])
    assert (s2, s1) == (s2_first, s1_first) and str(other) not in s2 + s1
    assert "split 'val'" in metrics_of(again)["data"]  # the figures: this config's val images


def test_e3_a_resume_that_trains_on_other_data_mid_stage2_says_both(tmp_path, neu):
    from export.arcd.train import train

    cfg = tiny_config(tmp_path / "a.yaml", neu)
    run = train(cfg, tmp_path / "run")
    # two more stage-2 steps on another root: steps 1-2 on the first, 3-4 on the second
    other = tmp_path / "other"
    shutil.copytree(neu, other)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["root"], raw["stage2"]["steps"] = str(other), 4
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    train(tmp_path / "b.yaml", run, resume=True)
    s2, s1 = stage_parts(metrics_of(run)["data"])
    assert f"{neu} " in s2 and f"{other} " in s2 and "(steps 1-2), then" in s2 and "(steps 3-4)" in s2
    assert str(other) not in s1


# ----------------------------------------------------------------------------- E4

def test_e4_a_finished_run_without_metrics_json_is_refused_unless_allowed(tmp_path, finished):
    from export.onnx_export import export_bundle
    from inspector.bundle import load_bundle

    run = tmp_path / "vi"
    shutil.copytree(finished, run)
    (run / "metrics.json").unlink()  # what a stop during the final validation leaves
    r = run_cli("export", "onnx", "--run-dir", str(run), "--out", str(tmp_path / "b"))
    assert r.returncode == 2, r.stderr
    (line,) = error_lines(r.stderr)
    assert str(run / "metrics.json") in line and "missing" in line
    assert "--resume" in line and "--allow-stale-metrics" in line
    assert not (tmp_path / "b").exists()
    out = export_bundle(run, tmp_path / "b2", allow_stale_metrics=True)
    prov = load_bundle(out).spec.provenance
    assert prov["metrics"] is None and prov["metrics_check"].startswith("missing, dropped")


# ----------------------------------------------------------------------------- E5

def test_e5_a_new_run_in_a_folder_holding_one_is_bad_input(tmp_path, neu):
    run = tmp_path / "full"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"a run")
    r = run_cli("train", "arcd", "--config", str(tiny_config(tmp_path / "t.yaml", neu)),
                "--run-dir", str(run))
    assert r.returncode == 2, r.stderr
    (line,) = error_lines(r.stderr)
    assert line == (f"inspector: error: {run / 'checkpoint.pt'}: a run is already here; pass "
                    f"--resume to continue it or choose another run folder")


# ----------------------------------------------------------------------------- E6

STOP_BEFORE_FIRST_STEP = """
    import export.arcd.train as t
    real = t._settle_stage1_data
    def settle(*a):  # between the data check and the first step
        real(*a)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    t._settle_stage1_data = settle
"""


@pytest.mark.parametrize("existed", [False, True])
def test_e6_a_stop_before_the_first_step_says_nothing_was_saved_and_leaves_no_run_folder(tmp_path, neu,
                                                                                         existed):
    run = tmp_path / "int3"
    if existed:
        run.mkdir()
    r = run_patched(STOP_BEFORE_FIRST_STEP, ["train", "arcd", "--config",
                                             str(tiny_config(tmp_path / "t.yaml", neu)), "--run-dir", str(run)])
    assert r.returncode == 130, r.stderr
    (line,) = error_lines(r.stderr)
    assert line.startswith("inspector: error: stopped (signal SIGTERM); no checkpoint saved")
    assert "continue with --resume" not in line
    if existed:  # the user's folder stays, as it was
        assert run.is_dir() and list(run.iterdir()) == [] and "was left as it was" in line
    else:
        assert not run.exists() and "was removed" in line
    # the trainer's own last line says it too
    trainer = [ln for ln in r.stderr.splitlines() if "export.arcd.train" in ln][-1]
    assert "no checkpoint saved" in trainer


STOP_IN_FINAL_VALIDATION = """
    import export.arcd.train as t
    real = t._evaluate
    def evaluate(*a):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        return real(*a)
    t._evaluate = evaluate
"""


def test_e6_a_stop_in_the_final_validation_says_metrics_json_is_missing_and_resume_writes_it(tmp_path, neu):
    from export.arcd.train import train

    cfg = tiny_config(tmp_path / "t.yaml", neu)
    run = tmp_path / "vi"
    r = run_patched(STOP_IN_FINAL_VALIDATION, ["train", "arcd", "--config", str(cfg), "--run-dir", str(run)])
    assert r.returncode == 130, r.stderr
    (line,) = error_lines(r.stderr)
    assert "stage 2 step 2 (training finished)" in line and "final validation was not written" in line
    assert "--resume (trains nothing) writes metrics.json" in line
    trainer = [ln for ln in r.stderr.splitlines() if "export.arcd.train" in ln][-1]
    assert "final validation was not written" in trainer
    assert (run / "checkpoint.pt").is_file() and not (run / "metrics.json").exists()
    train(cfg, run, resume=True)
    assert metrics_of(run)["checkpoint"]["done"] is True


def test_e6_a_stop_in_stage2_names_the_step_saved(tmp_path, neu):
    patch = """
        import export.arcd.train as t
        real = t._loop
        def loop(state, stage, *a, **k):
            if stage == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # before stage 2's first step: at step 0
                time.sleep(5)
            return real(state, stage, *a, **k)
        t._loop = loop
    """
    run = tmp_path / "s2"
    r = run_patched(patch, ["train", "arcd", "--config", str(tiny_config(tmp_path / "t.yaml", neu)),
                            "--run-dir", str(run)])
    assert r.returncode == 130, r.stderr
    (line,) = error_lines(r.stderr)
    assert f"checkpoint of stage 2 step 0 saved in {run / 'checkpoint.pt'}; continue with --resume" in line


def test_e6_a_second_signal_in_a_step_says_what_the_folder_keeps():
    script = textwrap.dedent("""
        import logging, os, signal, time
        from export.training import whole_step
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        with whole_step(kept=lambda: "run/checkpoint.pt keeps the checkpoint of stage 2 step 4"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == -signal.SIGINT, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert "SIGINT again: stopping at once, nothing saved of this step" in last
    assert "keeps the checkpoint of stage 2 step 4" in last


def test_e6_kept_names_the_checkpoint_on_disk(tmp_path):
    from export.arcd.train import _kept

    class S:
        saved_at = None
        resumed_at = None

    s = S()
    assert "no checkpoint was saved (none yet)" in _kept(s, tmp_path / "checkpoint.pt")
    s.resumed_at = {"stage": 1, "step": 3, "done": False}
    assert "keeps the checkpoint of stage 1 step 3" in _kept(s, tmp_path / "checkpoint.pt")
    s.saved_at = {"stage": 2, "step": 5, "done": False}
    assert "keeps the checkpoint of stage 2 step 5" in _kept(s, tmp_path / "checkpoint.pt")


# ----------------------------------------------------------------------------- E7

def test_e7_a_stopped_export_is_one_line_exit_130(tmp_path, finished):
    patch = """
        import export.onnx_export as x
        def parity(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        x.check_parity = parity
    """
    out = tmp_path / "bsig"
    r = run_patched(patch, ["export", "onnx", "--run-dir", str(finished), "--out", str(out)])
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr
    assert error_lines(r.stderr) == ["inspector: error: export stopped (Ctrl-C); nothing written "
                                     "(the --out folder it had made was removed)"]
    assert not out.exists()


def test_e7_a_replace_stopped_after_the_graph_moved_in_still_writes_a_whole_bundle(tmp_path, finished):
    # a stop between the graph moved in and bundle.yaml written waits for both: the old
    # bundle.yaml beside the new graph would be refused at load (and the line said "left as it was")
    from export.onnx_export import export_bundle
    from inspector.bundle import load_bundle

    out = export_bundle(finished, tmp_path / "b")
    patch = """
        import export.onnx_export as x
        real = x._thresholds
        def thresholds(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)
        x._thresholds = thresholds
    """
    before = (out / "bundle.yaml").read_bytes()
    r = run_patched(patch, ["export", "onnx", "--run-dir", str(finished), "--out", str(out), "--replace"])
    assert r.returncode == 130, r.stderr
    [line] = error_lines(r.stderr)
    assert line == (f"inspector: error: export stopped (Ctrl-C); {out} holds the new bundle, written whole "
                    "before the stop took effect (it loads)"), line
    assert (out / "bundle.yaml").read_bytes() != before
    load_bundle(out)


def test_e7_python_m_export_stopped_is_one_line_exit_130(tmp_path, finished):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import export.onnx_export as x
        def parity(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        x.check_parity = parity
        sys.exit(x.main(["--run-dir", {str(finished)!r}, "--out", {str(tmp_path / "b")!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(
        "export stopped (signal SIGTERM); nothing written (the --out folder it had made was removed)")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, finished) -> Path:
    from export.onnx_export import export_bundle

    return export_bundle(finished, tmp_path_factory.mktemp("bundle") / "b")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_e7_a_stopped_evaluate_is_one_line_exit_130(tmp_path, bundle, neu, sig):
    patch = f"""
        import inspector.evaluation.evaluate as ev
        real = ev.evaluate_bundle
        def evaluate_bundle(*a, **k):
            os.kill(os.getpid(), signal.{sig})
            time.sleep(5)
            return real(*a, **k)
        ev.evaluate_bundle = evaluate_bundle
    """
    before = (bundle / "bundle.yaml").read_bytes()
    r = run_patched(patch, ["evaluate", "--bundle", str(bundle), "--data", str(neu), "--format", "neu-seg",
                            "--split", "val", "--json", "--record", "--out", str(tmp_path / "ev")])
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    want = "Ctrl-C" if sig == "SIGINT" else "signal SIGTERM"
    assert error_lines(r.stderr) == [f"inspector: error: evaluate stopped ({want}); no figures reported, "
                                     f"nothing recorded in the bundle; nothing written to {tmp_path / 'ev'}"]
    assert (bundle / "bundle.yaml").read_bytes() == before


# ----------------------------------------------------------------------------- E9

MT_CLASSES = ["background", "Blowhole", "Break", "Crack", "Fray", "Uneven"]


def mt_folder(root: Path, n: int = 14) -> Path:
    rng = np.random.default_rng(0)
    for cat, defect in (("MT_Crack", True), ("MT_Fray", True), ("MT_Free", False)):
        d = root / cat / "Imgs"
        d.mkdir(parents=True)
        for i in range(n):
            img = rng.integers(110, 150, (64, 64), dtype=np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            if defect:
                mask[4:12, 8:30] = 255
                img[mask > 0] = 30
            cv2.imwrite(str(d / f"{cat}_{i:03d}.jpg"), img)
            cv2.imwrite(str(d / f"{cat}_{i:03d}.png"), mask)
    return root


def test_e9_magnetic_tile_metrics_say_mt_free_is_left_out_of_validation(tmp_path):
    from export.arcd.train import train
    from inspector.evaluation.datasets import open_dataset

    root = mt_folder(tmp_path / "mt")
    free = len(open_dataset("magnetic-tile", root, split="val", categories=["MT_Free"]))
    assert free > 0  # the fixture's hash split puts some MT_Free images in val
    cfg = tiny_config(tmp_path / "mt.yaml", root, classes=MT_CLASSES, source="magnetic-tile",
                      train_splits=["train"])
    m = metrics_of(train(cfg, tmp_path / "run"))
    assert m["validation"]["excluded"] == {"MT_Free": free}
    assert f"the split's {free} MT_Free image(s) are left out" in m["data"]


# ----------------------------------------------------------------------------- E10

def test_e10_the_split_warning_says_one_of_the_shares():
    from inspector.cli import _trained_on_note

    prov = {"training_config": {"data": {"source": "neu-seg", "root": "r", "train_splits": ["train", "test"]}}}
    note = _trained_on_note(prov, "train", "hash", "neu-seg")
    assert "split 'train' is one of the hash shares ['train', 'test'] this model was trained on" in note
    assert "holds the hash share(s) ['train', 'test']" in _trained_on_note(prov, "all", "hash", "neu-seg")
    one = {"training_config": {"data": {"source": "neu-seg", "root": "r", "train_splits": ["train"]}}}
    assert "split 'train' is the hash share ['train']" in _trained_on_note(one, "train", "hash", "neu-seg")


# ----------------------------------------------------------------------------- E12

def test_e12_a_plain_unet_run_records_no_stage1_data(tmp_path, neu):
    from export.arcd.train import train
    from export.onnx_export import export_bundle
    from inspector.bundle import load_bundle

    cfg = tiny_config(tmp_path / "unet.yaml", neu, model={"reconstruction": False})
    run = train(cfg, tmp_path / "unet")
    m = metrics_of(run)
    assert m["stage1"]["steps"] == 0 and m["stage1"]["data"] is None
    assert "stage 1: none (no R" in m["data"]
    prov = load_bundle(export_bundle(run, tmp_path / "b")).spec.provenance
    assert prov["metrics"]["stage1"]["data"] is None and "stage 1: none" in prov["data"]
