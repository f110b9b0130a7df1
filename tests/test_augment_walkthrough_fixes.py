"""``inspector augment defectgan|anomalyalign train|sample``: what a user walkthrough found.

* AnomalyAlign stopped (Ctrl-C, SIGTERM) in its first stage, the segmenter, saved nothing: exit
  130 with only config.yaml in the run folder, no "stopping after this step" line, and
  ``--resume`` then said "nothing to resume". Now the segmenter's step under way finishes, its
  state is saved (``stage: segmenter``), and ``--resume`` goes on from that step to the weights
  of an uninterrupted run. A bare Ctrl-C (outside a step: the prompt stage) read "stopped ()".
* A missing data root was ``inspector: error: /x: expected images/ ...`` without the config
  file and key, after an empty run folder had been made.
* ``sample`` stopped by Ctrl-C said "continue with --resume"; sample has no --resume.

The stops are real signals sent to ``python -m inspector`` in a subprocess (from inside the
chosen optimiser update, so the step they land in is known).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli, checkpoint_differences

torch = pytest.importorskip("torch", reason="the trainers need the train extra (torch)")
pytest.importorskip("diffusers", reason="AnomalyAlign needs the augment extra (diffusers)")

from test_anomalyalign import TINY  # noqa: E402
from test_defectgan import make_neu, tiny_config as defectgan_config  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
SEG_STEPS = 8

#: ``python -c`` this with: the Adam update (1-based, over every Adam / AdamW of the process)
#: after which the signal is sent, the signal's name, then ``inspector``'s arguments
SIGNAL_AFTER_UPDATE = textwrap.dedent("""
    import os, signal, sys
    import torch
    at, sig, argv = int(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3:]
    # Ctrl-C at a terminal: a suite started in a script's background inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real, calls = torch.optim.Adam.step, [0]

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), sig)  # a real signal, in the middle of the step
        return out

    torch.optim.Adam.step = step
    from inspector.cli import main
    sys.exit(main(argv))
""")

#: ``python -c`` this with ``inspector``'s arguments: SIGTERM while the first pair is written
SIGTERM_IN_SAMPLE = textwrap.dedent("""
    import os, signal, sys
    from export.augment import dataset
    real = dataset.PairWriter.add

    def add(self, *a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)

    dataset.PairWriter.add = add
    from inspector.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def signalled(at: int, sig: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIGNAL_AFTER_UPDATE, str(at), sig, *argv],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def in_process(fn, *args, **kw):
    """The trainers set torch's thread count from their config; keep this process's."""
    threads = torch.get_num_threads()
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(threads)


def load(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)




def assert_same_run(a: Path, b: Path) -> None:
    """Bit-equal networks (segmenter, TinyClip, UNet, ControlNet, EMA), optimiser, prompts and
    logged losses."""
    ca, cb = load(a), load(b)
    keys = ("step", "stage", "segmenter", "clip", "text_emb", "prompt_idx", "unet", "controlnet",
            "ema", "optimizer", "history", "loss_ema", "epoch_acc", "epoch_losses")
    assert not checkpoint_differences({k: ca[k] for k in keys}, {k: cb[k] for k in keys})
    rows = lambda run: [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}  # noqa: E731
                        for x in (run / "losses.jsonl").read_text().splitlines()]
    assert rows(a) == rows(b)
    assert (a / "prompts.json").read_text() == (b / "prompts.json").read_text()


def anomalyalign_config(path: Path, root: Path) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["log_every"] = 1
    cfg["data"] = {**cfg["data"], "root": str(root), "label_fraction": 1.0}
    cfg["segmenter"] = {**cfg["segmenter"], "steps": SEG_STEPS}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def aa(tmp_path_factory) -> tuple[Path, Path]:
    """(config on a tiny NEU-Seg folder, its uninterrupted run of 2 diffusion iterations)."""
    from export.augment.anomalyalign.train import train

    base = tmp_path_factory.mktemp("aa-walkthrough")
    cfg = anomalyalign_config(base / "aa.yaml", make_neu(base / "neu"))
    return cfg, in_process(train, cfg, base / "whole", max_iters=2)


def train_argv(kind: str, cfg: Path, run: Path, *more: str) -> list[str]:
    return ["augment", kind, "train", "--config", str(cfg), "--run-dir", str(run), *more]


# ---------------------------------------------------------------------------------------------
# 1. AnomalyAlign stopped before its diffusion stage
# ---------------------------------------------------------------------------------------------

def test_anomalyalign_sigterm_in_the_segmenter_stage_saves_the_step_and_resumes_exactly(aa, tmp_path,
                                                                                      capsys):
    from inspector.cli import main

    cfg, whole = aa
    run = tmp_path / "run"
    # the 3rd Adam update is the segmenter's 3rd step (the first optimiser of the run)
    r = signalled(3, "SIGTERM", *train_argv("anomalyalign", cfg, run))
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "SIGTERM: stopping after this step" in r.stderr
    assert f"interrupted at segmenter step 3 of {SEG_STEPS}" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("inspector: error: stopped (signal SIGTERM); ")
    ck = load(run)
    st = ck["segmenter_training"]
    assert (ck["stage"], st["step"], st["steps"]) == ("segmenter", 3, SEG_STEPS)
    assert {float(s["step"]) for s in st["optimizer"]["state"].values()} == {3.0}  # no update beyond

    # sample refuses it by name (no diffusion weights yet), and nothing is written
    assert main(["augment", "anomalyalign", "sample", "--run-dir", str(run), "--out",
                 str(tmp_path / "pairs"), "--n", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped while training its segmenter (step 3 of 8)" in err and "--resume" in err
    assert not (tmp_path / "pairs").exists()

    r = run_cli(*train_argv("anomalyalign", cfg, run, "--resume", "--max-iters", "2"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming the segmenter at step 3 of 8" in r.stderr
    assert "nothing to resume" not in r.stderr
    assert_same_run(whole, run)


def test_anomalyalign_bare_ctrl_c_in_the_prompt_stage_is_named_and_keeps_the_segmenter(aa, tmp_path):
    """Ctrl-C while TinyClip trains (no whole_step there: Python's own KeyboardInterrupt, no
    message) read "stopped ()" and lost the trained segmenter."""
    from export.augment.anomalyalign.train import train

    cfg, whole = aa
    run = tmp_path / "run"
    r = signalled(SEG_STEPS + 2, "SIGINT", *train_argv("anomalyalign", cfg, run))
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "stopped ()" not in r.stderr
    assert r.stderr.splitlines()[-1].startswith("inspector: error: stopped (signal SIGINT); ")
    assert f"interrupted after the segmenter (step {SEG_STEPS} of {SEG_STEPS})" in r.stderr
    ck = load(run)
    assert (ck["stage"], ck["segmenter_training"]["step"]) == ("segmenter", SEG_STEPS)
    in_process(train, cfg, run, resume=True, max_iters=2)
    assert_same_run(whole, run)


# ---------------------------------------------------------------------------------------------
# 2. A bad data root: the config file and key, exit 2, no run folder
# ---------------------------------------------------------------------------------------------

def write_config(kind: str, base: Path, root: Path) -> Path:
    if kind == "anomalyalign":
        return anomalyalign_config(base / "aa.yaml", root)
    cfg = defectgan_config(base)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["root"] = str(root)
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg


@pytest.mark.parametrize("kind", ["defectgan", "anomalyalign"])
def test_missing_data_root_names_the_config_key_and_makes_no_run_folder(kind, tmp_path):
    cfg = write_config(kind, tmp_path, tmp_path / "nope")
    r = run_cli(*train_argv(kind, cfg, tmp_path / "run"), env=ENV)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"inspector: error: {cfg}: data.root: {tmp_path / 'nope'}: NEU-Seg root not "
                    "found (expected images/ and annotations/ folders in it)")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["defectgan", "anomalyalign"])
def test_bad_data_keeps_a_resumed_run_folder_and_makes_no_default_one(kind, tmp_path, monkeypatch,
                                                                    capsys):
    from inspector.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty" / "images").mkdir(parents=True)  # not the NEU-Seg layout
    cfg = write_config(kind, tmp_path, tmp_path / "empty")
    before = sorted(tmp_path.rglob("*"))
    assert in_process(main, ["augment", kind, "train", "--config", str(cfg)]) == 2  # runs/<name>-<time>
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"inspector: error: {cfg}: data.root: {tmp_path / 'empty'}: expected images/")
    assert sorted(tmp_path.rglob("*")) == before  # no runs/ folder

    run = tmp_path / "run"  # a run folder given with --resume is left as it was
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"a run's checkpoint")
    (run / "config.yaml").write_text("kind: x\n")
    assert in_process(main, train_argv(kind, cfg, run, "--resume")) == 2
    assert "data.root" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.yaml"]
    assert (run / "checkpoint.pt").read_bytes() == b"a run's checkpoint"


def test_defectgan_unknown_split_names_data_splits(tmp_path, capsys):
    from inspector.cli import main

    cfg = write_config("defectgan", tmp_path, make_neu(tmp_path / "neu"))
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["splits"] = ["training"]  # the NEU-Seg folder's name, not a split
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(train_argv("defectgan", cfg, tmp_path / "run")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"inspector: error: {cfg}: data.splits: ") and "'training'" in last
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 3. sample stopped: no --resume advice
# ---------------------------------------------------------------------------------------------

def test_sample_stopped_by_sigterm_says_nothing_was_written(aa, tmp_path):
    _, whole = aa
    out = tmp_path / "pairs"
    r = subprocess.run([sys.executable, "-c", SIGTERM_IN_SAMPLE, "augment", "anomalyalign", "sample",
                        "--run-dir", str(whole), "--out", str(out), "--n", "2"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 130, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("inspector: error: stopped (signal SIGTERM); nothing was written to "
                           f"{out}") and last.endswith("run sample again")
    # the stop line gives no --resume advice (sample has none; the WARNING before it that this
    # 2-of-6-iteration run is unfinished does name the trainer's --resume)
    assert "--resume" not in last and "Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial folder either


def test_defectgan_sample_bare_ctrl_c_is_named(tmp_path, monkeypatch, capsys):
    from export.augment import dataset
    from export.augment.defectgan.train import train
    from inspector.cli import main

    run = in_process(train, write_config("defectgan", tmp_path, make_neu(tmp_path / "neu")),
                     tmp_path / "run", max_iters=1)

    def add(self, *a, **kw):
        raise KeyboardInterrupt  # what Python's SIGINT handler raises: no message

    monkeypatch.setattr(dataset.PairWriter, "add", add)
    assert main(["augment", "defectgan", "sample", "--run-dir", str(run), "--out",
                 str(tmp_path / "pairs"), "--n", "1"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("inspector: error: stopped (signal SIGINT); nothing was written")
    assert not (tmp_path / "pairs").exists()
