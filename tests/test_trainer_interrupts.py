"""The trainers' stop and resume paths: a stop signal in the middle of a step, a crash after the
last checkpoint, and ``--resume`` without a run folder.

* A SIGTERM (or Ctrl-C) that arrives between the two halves of a step (after the critic's
  update, before the generator's; after ``opt.step()``, before the step counter) used to make
  the trainer save weights one update ahead of its step count, so ``--resume`` repeated that
  update. Each trainer runs as ``python -m export.<kind>.train`` in a subprocess whose
  ``torch.optim.Adam.step`` sends the process a real SIGTERM right after one chosen update; the
  interrupted run, resumed, must end with the very tensors (weights, optimiser state and step
  counts) of an uninterrupted run.
* ``losses.jsonl`` is appended to while training, a checkpoint written only every
  ``checkpoint_every`` steps: after a crash, the resumed run wrote the rows past the checkpoint a
  second time.
* ``--resume`` without ``--run-dir`` trained a new run in ``runs/<name>-<time>`` and exited 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, checkpoint_differences

torch = pytest.importorskip("torch", reason="the trainers need the train extra (torch)")

from test_clgan_train_export import _tiny_cfg as clgan_config  # noqa: E402
from test_clgan_train_export import make_magnetic_tile_root  # noqa: E402
from test_defectgan import make_neu, tiny_config as defectgan_config  # noqa: E402
from test_fuzzymask_train import make_folder, tiny_config as fuzzymask_config  # noqa: E402

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

#: ``python -c`` this with: the trainer module, the Adam update after which SIGTERM arrives
#: (1-based, counted over every Adam optimiser of the process), then the trainer's arguments
SIGTERM_AFTER_UPDATE = textwrap.dedent("""
    import importlib, os, signal, sys
    import torch
    module, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    real, calls = torch.optim.Adam.step, [0]

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, in the middle of the step
        return out

    torch.optim.Adam.step = step
    sys.exit(importlib.import_module(module).main(argv))
""")


def sigterm_after_update(module: str, at: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIGTERM_AFTER_UPDATE, module, str(at), *argv],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)




def load(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def adam_steps(opt_state: dict) -> set[float]:
    return {float(s["step"]) for s in opt_state["state"].values()}


def in_process(train, *args, **kw) -> Path:
    """The trainers set torch's thread count from their config; keep this process's."""
    threads = torch.get_num_threads()
    try:
        return train(*args, **kw)
    finally:
        torch.set_num_threads(threads)


def interrupted(r: subprocess.CompletedProcess, run: Path) -> int:
    """The step of the checkpoint the stopped run saved (checked by the caller after the
    resumed run's tensors, which are the point)."""
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return load(run)["step"]


def check_stopped_after_the_step(r: subprocess.CompletedProcess, saved: int, step: int) -> None:
    assert saved == step, "the interrupted step was not completed before saving"
    assert "SIGTERM: stopping after this step" in r.stderr, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# A SIGTERM in the middle of a step, then --resume: the uninterrupted run's tensors
# ---------------------------------------------------------------------------------------------

def test_defectgan_sigterm_between_the_critic_and_the_generator_update(tmp_path):
    """n_critic 2: Adam updates D, D+G, D, D+G...; the 5th update is iteration 3's critic, and
    the signal lands before its G update. The saved checkpoint is of 4 whole iterations."""
    from export.augment.defectgan.train import train

    make_neu(tmp_path / "neu")
    cfg = defectgan_config(tmp_path, log_every=1,
                           optim={"iterations": 8, "n_critic": 2, "batch_size": 2})
    whole = in_process(train, cfg, tmp_path / "whole")
    run = tmp_path / "run"
    r = sigterm_after_update("export.augment.defectgan.train", 5, "--config", str(cfg),
                             "--run-dir", str(run))
    saved = interrupted(r, run)
    in_process(train, cfg, run, resume=True)
    a, b = load(whole), load(run)
    assert a["step"] == b["step"] == 8
    assert not checkpoint_differences({k: a[k] for k in ("G", "D", "optimizers", "history", "ema", "first_g")},
                           {k: b[k] for k in ("G", "D", "optimizers", "history", "ema", "first_g")})
    assert adam_steps(b["optimizers"]["D"]) == {8.0} and adam_steps(b["optimizers"]["G"]) == {4.0}
    rows = [json.loads(x) for x in (run / "losses.jsonl").read_text().splitlines()]
    assert [x["it"] for x in rows] == list(range(1, 9))
    check_stopped_after_the_step(r, saved, 4)


def test_clgan_sigterm_between_the_d_and_the_g_update(tmp_path):
    """Adam updates D, G, H per iteration; the 4th update is iteration 1's D."""
    from export.clgan.train import train

    data = make_magnetic_tile_root(tmp_path / "mt")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump(dict(clgan_config(tmp_path, data), checkpoint_every=100)))
    whole = in_process(train, cfg, tmp_path / "whole", max_iters=4)
    run = tmp_path / "run"
    r = sigterm_after_update("export.clgan.train", 4, "--config", str(cfg), "--run-dir", str(run),
                             "--max-iters", "4")
    saved = interrupted(r, run)
    in_process(train, cfg, run, resume=True, max_iters=4 - saved)
    a, b = load(whole), load(run)
    assert a["step"] == b["step"] == 4
    # the loss averages (and with them history) are not in the checkpoint: weights and
    # optimisers only
    assert not checkpoint_differences({k: a[k] for k in ("G", "D", "H", "optimizers")},
                           {k: b[k] for k in ("G", "D", "H", "optimizers")})
    assert all(adam_steps(b["optimizers"][k]) == {4.0} for k in "GDH")
    check_stopped_after_the_step(r, saved, 2)


def test_fuzzymask_sigterm_after_the_update_before_the_counter(tmp_path):
    """One Adam update per step; the signal lands right after step 1's ``opt.step()``."""
    from export.fuzzymask.train import train

    make_folder(tmp_path / "imgs")
    cfg = fuzzymask_config(tmp_path, checkpoint_every=100)
    whole = in_process(train, cfg, tmp_path / "whole", max_iters=4)
    run = tmp_path / "run"
    r = sigterm_after_update("export.fuzzymask.train", 2, "--config", str(cfg), "--run-dir", str(run),
                             "--max-iters", "4")
    saved = interrupted(r, run)
    in_process(train, cfg, run, resume=True, max_iters=4 - saved)
    a, b = load(whole), load(run)
    assert a["step"] == b["step"] == 4
    assert not checkpoint_differences({k: a[k] for k in ("model", "optimizer")},
                           {k: b[k] for k in ("model", "optimizer")})
    assert adam_steps(b["optimizer"]) == {4.0}
    check_stopped_after_the_step(r, saved, 2)


ARCD_TINY = {
    "name": "tiny-arcd", "seed": 0, "threads": 1, "log_every": 1, "checkpoint_every": 100,
    "model": {"in_channels": 1, "tile": [64, 64], "r_base_width": 4, "r_depth": 4,
              "d_base_channels": 4, "d_depth": 4},
    "data": {"frame_size": [64, 192], "renderer_seeds": [0], "contrasts": [1.5],
             "val_frames": 1, "val_renderer_seeds": [5], "calib_frames": 1,
             "calib_renderer_seeds": [6], "focus_prob": 1.0},
    "simulation": {"clean_prob": 0.0},
    "stage1": {"steps": 4, "batch_size": 2, "lr": 0.005},
    "stage2": {"steps": 3, "batch_size": 2, "lr": 0.005, "focal_alpha": "balanced"},
    "evaluation": {"threshold_candidates": [0.5], "per_class_thresholds": False},
}


def test_arcd_sigterm_after_the_update_before_the_schedule_and_the_counter(tmp_path):
    """Stage 1, step 1: the signal lands after ``opt.step()``, before ``sched.step()`` and the
    step counter; the resumed run finishes both stages."""
    from export.arcd.train import train

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(ARCD_TINY))
    whole = in_process(train, cfg, tmp_path / "whole")
    run = tmp_path / "run"
    r = sigterm_after_update("export.arcd.train", 2, "--config", str(cfg), "--run-dir", str(run))
    saved = interrupted(r, run)
    assert load(run)["stage"] == 1
    in_process(train, cfg, run, resume=True)
    a, b = load(whole), load(run)
    assert (a["stage"], a["step"], a["done"]) == (b["stage"], b["step"], b["done"]) == (2, 3, True)
    keys = ("reconstruction", "discrimination", "optimizer", "scheduler", "history")
    assert not checkpoint_differences({k: a[k] for k in keys}, {k: b[k] for k in keys})
    assert adam_steps(b["optimizer"]["stage1"]) == {4.0}
    check_stopped_after_the_step(r, saved, 2)


# ---------------------------------------------------------------------------------------------
# A crash after the last checkpoint: losses.jsonl is cut back to it on resume
# ---------------------------------------------------------------------------------------------

def test_trim_losses_keeps_the_rows_up_to_the_step(tmp_path):
    from export.training import trim_losses

    p = tmp_path / "losses.jsonl"
    assert trim_losses(p, 3) == 0 and not p.exists()
    rows = [json.dumps({"it": i, "loss": i / 10}) for i in range(1, 7)]
    p.write_text("\n".join(rows) + "\n" + '{"it": 7, "lo')  # the torn row of a killed write
    assert trim_losses(p, 4) == 3
    assert p.read_text() == "\n".join(rows[:4]) + "\n"
    before = p.stat().st_mtime_ns
    assert trim_losses(p, 4) == 0 and p.stat().st_mtime_ns == before  # nothing to do: untouched
    assert trim_losses(p, 0) == 4 and p.read_text() == ""


def _crash_at_update(monkeypatch, at: int) -> None:
    """The ``at``-th Adam update of this process raises (a crash: no checkpoint is saved)."""
    real, calls = torch.optim.Adam.step, [0]

    def step(self, *a, **kw):
        calls[0] += 1
        if calls[0] == at:
            raise RuntimeError("simulated crash")
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", step)


def _defectgan(tmp_path: Path) -> tuple[Any, Path, int]:
    from export.augment.defectgan.train import train

    make_neu(tmp_path / "neu")
    # n_critic 1: 2 updates per iteration; the 11th is iteration 5's critic
    return train, defectgan_config(tmp_path, log_every=1, checkpoint_every=3,
                                   optim={"iterations": 7, "n_critic": 1, "batch_size": 2}), 11


def _clgan(tmp_path: Path) -> tuple[Any, Path, int]:
    from export.clgan.train import train

    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump(clgan_config(tmp_path, make_magnetic_tile_root(tmp_path / "mt"))))
    return train, cfg, 10  # 3 updates per iteration; the 10th is iteration 3's D


def _fuzzymask(tmp_path: Path) -> tuple[Any, Path, int]:
    from export.fuzzymask.train import train

    make_folder(tmp_path / "imgs")
    return train, fuzzymask_config(tmp_path), 4  # one update per step: step 3's


@pytest.mark.parametrize("setup", [_defectgan, _clgan, _fuzzymask], ids=["defectgan", "clgan", "fuzzymask"])
def test_losses_jsonl_has_each_step_once_after_a_crash_and_resume(setup, tmp_path, monkeypatch):
    """log_every 1, checkpoint_every 2 or 3: the crash comes after rows past the checkpoint
    were written; the resumed run writes them again, and the file holds each step once."""
    train, cfg, at = setup(tmp_path)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_at_update(m, at)
        with pytest.raises(RuntimeError, match="simulated crash"):
            in_process(train, cfg, run, max_iters=6)
    saved = load(run)["step"]
    written = [json.loads(x)["it"] for x in (run / "losses.jsonl").read_text().splitlines()]
    assert written[-1] > saved, "the crash must come after rows past the checkpoint"
    in_process(train, cfg, run, resume=True, max_iters=6 - saved)
    its = [json.loads(x)["it"] for x in (run / "losses.jsonl").read_text().splitlines()]
    assert its == list(range(1, 7))


# ---------------------------------------------------------------------------------------------
# --resume needs --run-dir
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["train", "arcd"], ["train", "clgan"], ["train", "fuzzymask"],
                                  ["augment", "defectgan", "train"],
                                  ["augment", "anomalyalign", "train"]])
def test_inspector_resume_without_run_dir_is_a_usage_error(argv, tmp_path, monkeypatch, capsys):
    from inspector.cli import main

    monkeypatch.chdir(tmp_path)
    # refused before the config is read (a missing one: a regression fails fast, not training)
    assert main([*argv, "--config", "t.yaml", "--resume"]) == 2
    assert capsys.readouterr().err == "inspector: error: --resume needs --run-dir\n"
    assert list(tmp_path.iterdir()) == []  # no runs/<name>-<time>


@pytest.mark.parametrize("module", ["export.arcd.train", "export.clgan.train", "export.fuzzymask.train",
                                    "export.augment.defectgan.train",
                                    "export.augment.anomalyalign.train"])
def test_python_m_resume_without_run_dir_is_a_usage_error(module, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    assert importlib.import_module(module).main(["--config", "t.yaml", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m {module}: error: --resume needs --run-dir\n"
    assert list(tmp_path.iterdir()) == []


def test_resume_into_a_run_dir_without_a_checkpoint_starts_the_run(tmp_path, caplog):
    """Scripts pass --resume on every start: a run folder with no checkpoint yet (or none at
    all) is trained from step 0, with a warning, as before."""
    import logging

    from inspector.cli import main

    make_neu(tmp_path / "neu")
    cfg = defectgan_config(tmp_path)
    (tmp_path / "empty").mkdir()
    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING):
            for run in ("empty", "new"):
                assert main(["augment", "defectgan", "train", "--config", str(cfg), "--run-dir",
                             str(tmp_path / run), "--resume", "--max-iters", "1"]) == 0
                assert load(tmp_path / run)["step"] == 1
    finally:
        torch.set_num_threads(threads)
    assert caplog.text.count("nothing to resume, starting a new run") == 2
