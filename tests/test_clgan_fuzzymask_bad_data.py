"""Bad training data for ``inspector train clgan`` and ``inspector train fuzzymask``: every image
and mask training reads is read before the run folder is created, so a mask of another size than
its image, an unreadable image, a missing data root or an unknown category is one line naming
the config file, the dotted key and the file (exit 2), and no run folder is left behind; a
``--resume`` folder keeps what it held.

The fixtures are tiny magnetic-tile folders written here (a few MT_Free images); the configs are
the smallest the trainers accept, though the runs stop before any network is built.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import run_cli, write_config

pytest.importorskip("torch", reason="training needs the train extra (torch)")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

KINDS = ("clgan", "fuzzymask")


def make_mt_root(root: Path, n: int = 4, seed: int = 0) -> Path:
    """A magnetic-tile root with ``n`` defect-free images (and their empty masks) in MT_Free."""
    free = root / "MT_Free" / "Imgs"
    free.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.clip(rng.normal(120, 10, (40, 48)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(free / f"free_{i}.jpg"), img)
        cv2.imwrite(str(free / f"free_{i}.png"), np.zeros_like(img))
    return root


def tiny_config(kind: str, path: Path, root: str, **source) -> Path:
    src = {"format": "magnetic-tile", "root": root, "split": "all", **source}
    common = {"kind": kind, "name": "tiny", "seed": 0, "threads": 1, "device": "cpu",
              "log_every": 1, "checkpoint_every": 2}
    if kind == "clgan":
        cfg = {**common,
               "data": {"sources": [src], "crop": 32, "channels": 1},
               "generator": {"ngf": 4, "n_resblocks": 1},
               "discriminator": {"ndf": 4},
               "nce": {"nce_layers": ["input", "E2", "E3", "R1"], "num_patches": 16, "mlp_dim": 8},
               "optim": {"n_epochs": 1, "n_epochs_decay": 1, "iters_per_epoch": 2},
               "detection": {"tile": [32, 32], "overlap": 8}}
    else:
        cfg = {**common,
               "data": {"sources": [src], "crop": 32, "channels": 1},
               "model": {"width": 4, "blocks": [1, 1, 1, 1]},
               "optim": {"batch_size": 2, "epochs": 1, "iters_per_epoch": 2},
               "inference": {"tau_images": 4, "overlap": 8}}
    return write_config(path, cfg)


def _wrong_size_mask(root: Path) -> Path:
    bad = root / "MT_Free" / "Imgs" / "free_1.png"
    cv2.imwrite(str(bad), np.zeros((20, 20), np.uint8))
    return bad


def _unreadable_image(root: Path) -> Path:
    bad = root / "MT_Free" / "Imgs" / "free_2.jpg"
    bad.write_bytes(b"not a jpeg at all")
    return bad


BREAKS = {"wrong_size_mask": _wrong_size_mask, "unreadable_image": _unreadable_image}


def _last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _train(kind: str, config: Path, run: Path, *extra: str):
    return run_cli("train", kind, "--config", str(config), "--run-dir", str(run),
                   "--max-iters", "1", *extra, env=ENV)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", sorted(BREAKS))
def test_a_bad_training_file_is_one_line_and_no_run_folder(tmp_path, kind, how):
    root = make_mt_root(tmp_path / "mt")
    bad = BREAKS[how](root)
    config = tiny_config(kind, tmp_path / "tiny.yaml", "mt")
    run = tmp_path / "run"
    r = _train(kind, config, run)
    last = _last_line(r.stderr)
    assert r.returncode == 2, r.stderr[-3000:]
    assert last.startswith(f"inspector: error: {config}: data.sources.0.root: "), r.stderr[-3000:]
    assert str(bad) in last, last
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not run.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_data_root_names_the_config_and_key(tmp_path, kind):
    gone = tmp_path / "nope"
    config = tiny_config(kind, tmp_path / "tiny.yaml", str(gone))
    run = tmp_path / "run"
    r = _train(kind, config, run)
    last = _last_line(r.stderr)
    assert r.returncode == 2, r.stderr[-3000:]
    assert last.startswith(f"inspector: error: {config}: data.sources.0.root: {gone}"), last
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not run.exists()


# in-process from here (no subprocess start-up): the trainers' own errors

@pytest.mark.parametrize("kind", KINDS)
def test_an_unknown_category_names_the_categories_key(tmp_path, kind):
    from inspector.errors import ConfigError

    train = _trainer(kind)
    make_mt_root(tmp_path / "mt")
    config = tiny_config(kind, tmp_path / "tiny.yaml", "mt", categories=["MT_Nope"])
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(config, run, max_iters=1)
    assert e.value.file == str(config) and e.value.key == "data.sources.0.categories"
    assert "MT_Nope" in e.value.problem and str(tmp_path / "mt") in e.value.problem
    assert not run.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_resume_with_bad_data_keeps_the_run_folder(tmp_path, kind):
    """--resume into an existing folder: the data is refused, the folder stays as it was."""
    from inspector.errors import ConfigError

    train = _trainer(kind)
    root = make_mt_root(tmp_path / "mt")
    bad = _wrong_size_mask(root)
    config = tiny_config(kind, tmp_path / "tiny.yaml", "mt")
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("kept")
    with pytest.raises(ConfigError) as e:
        train(config, run, resume=True, max_iters=1)
    assert e.value.key == "data.sources.0.root" and str(bad) in e.value.problem
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert (run / "notes.txt").read_text() == "kept"


def test_no_training_image_names_data_sources(tmp_path):
    """A readable root whose split holds no image: nothing to train on, said before the folder."""
    from inspector.errors import ConfigError

    train = _trainer("clgan")
    make_mt_root(tmp_path / "mt", n=2)
    config = tiny_config("clgan", tmp_path / "tiny.yaml", "mt", split="val")
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["split_val"] = 0.0  # the val share is empty
    write_config(config, cfg)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="no defect-free training images") as e:
        train(config, run, max_iters=1)
    assert e.value.key == "data.sources"
    assert not run.exists()


def _trainer(kind: str):
    if kind == "clgan":
        from export.clgan.train import train
    else:
        from export.fuzzymask.train import train
    return train
