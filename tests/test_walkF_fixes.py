"""Walkthrough F findings F3, F4, F5, F8, F9, F12 and F16 (``/work/notes/walkF.md``), on tiny
synthetic data written here (no ../shared/data), with real tiny training runs and real exports
(torch -> ONNX -> onnxruntime parity):

* F3: a CLGAN config with 0 planned epochs (or a schedule that rounds to 0 iterations) is refused
  naming ``optim.n_epochs``, exit 2, and no run folder is made;
* F4 / F5: exporting an unfinished fuzzymask or CLGAN run warns, and both record where the run
  stood in ``provenance.checkpoint_at`` (a finished run has none);
* F8: ``categories`` on a folder source is refused naming ``data.sources.<i>.categories``;
* F9: magnetic-tile defect images are reported as such, not as images without a window;
* F12: fuzzymask's ``last_epoch_loss`` of a run resumed mid-epoch equals an uninterrupted run's;
* F16: CLGAN's last checkpoint log line and metrics.json give the same preview |I - G(I)|.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import run_cli, write_config

torch = pytest.importorskip("torch", reason="training and export need the train extra (torch)")

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.tile(rng.normal(120, 14, w), (h, 1)) + rng.normal(0, 5, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``plain/`` (6 images, 2 more in ``plain/sub``) and a magnetic-tile root ``mt/`` with 4
    MT_Free images (empty masks) and 2 MT_Crack images (masks that mark a defect)."""
    base = tmp_path_factory.mktemp("walkF")
    rng = np.random.default_rng(0)
    (base / "plain" / "sub").mkdir(parents=True)
    for i in range(8):
        where = base / "plain" / ("sub" if i >= 6 else "")
        cv2.imwrite(str(where / f"img{i}.png"), _texture(rng, 48, 64))
    for cat, n in (("MT_Free", 4), ("MT_Crack", 2)):
        d = base / "mt" / cat / "Imgs"
        d.mkdir(parents=True)
        for i in range(n):
            img = _texture(rng, 48, 64)
            mask = np.zeros_like(img)
            if cat != "MT_Free":
                mask[10:20, 10:30] = 255
            cv2.imwrite(str(d / f"{cat}_{i}.jpg"), img)
            cv2.imwrite(str(d / f"{cat}_{i}.png"), mask)
    return base


def _config(kind: str, base: Path, name: str = "tiny.yaml", source: dict | None = None,
            **optim) -> Path:
    src = source or {"format": "folder", "root": "plain", "split": "all"}
    common = {"kind": kind, "name": "tiny", "seed": 0, "threads": 1, "device": "cpu",
              "log_every": 1, "checkpoint_every": 2}
    if kind == "clgan":
        cfg = {**common,
               "data": {"sources": [src], "crop": 32, "channels": 1},
               "generator": {"ngf": 4, "n_resblocks": 1},
               "discriminator": {"ndf": 4},
               "nce": {"nce_layers": ["input", "E2", "E3", "R1"], "num_patches": 16, "mlp_dim": 8},
               "optim": {"n_epochs": 1, "n_epochs_decay": 1, "iters_per_epoch": 2, **optim},
               "detection": {"tile": [32, 32], "overlap": 8}}
    else:
        cfg = {**common, "data_workers": 0,
               "data": {"sources": [src], "crop": 32, "channels": 1, "flip": True},
               "model": {"width": 4, "blocks": [1, 1, 1, 1]},
               "optim": {"batch_size": 2, "epochs": 2, "iters_per_epoch": 3, **optim},
               "inference": {"tau_images": 4, "overlap": 8}}
    return write_config(base / name, cfg)


def _link_data(tmp: Path, data: Path) -> None:
    for d in ("plain", "mt"):
        (tmp / d).symlink_to(data / d)


def _provenance(bundle: Path) -> dict:
    return yaml.safe_load((bundle / "bundle.yaml").read_text())["provenance"]


# ---------------------------------------------------------------------------------------------
# F3: 0 planned CLGAN epochs
# ---------------------------------------------------------------------------------------------

def test_F3_clgan_zero_epochs_is_refused_naming_optim_n_epochs(tmp_path, data):
    _link_data(tmp_path, data)
    config = _config("clgan", tmp_path, n_epochs=0, n_epochs_decay=0)
    run = tmp_path / "run"
    r = run_cli("train", "clgan", "--config", str(config), "--run-dir", str(run), env=ENV)
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert r.returncode == 2, r.stderr[-3000:]
    assert last.startswith(f"inspector: error: {config}: optim.n_epochs: "), last
    assert not run.exists()


def test_F3_clgan_schedule_rounding_to_zero_iterations_is_refused(tmp_path, data):
    from export.clgan.train import train
    from inspector.errors import ConfigError

    _link_data(tmp_path, data)
    # 0.1 epochs of 2 iterations rounds to 0 iterations
    config = _config("clgan", tmp_path, n_epochs=0.1, n_epochs_decay=0)
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(config, run)
    assert e.value.file == str(config) and e.value.key == "optim.n_epochs", str(e.value)
    assert not run.exists()


# ---------------------------------------------------------------------------------------------
# F8 / F9: data sources
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clgan", "fuzzymask"])
def test_F8_categories_on_a_folder_source_names_the_key(tmp_path, data, kind):
    from inspector.errors import ConfigError

    if kind == "clgan":
        from export.clgan.train import train
    else:
        from export.fuzzymask.train import train
    _link_data(tmp_path, data)
    config = _config(kind, tmp_path, source={"format": "folder", "root": "plain", "split": "all",
                                             "categories": ["sub"]})
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(config, run, max_iters=1)
    assert e.value.file == str(config) and e.value.key == "data.sources.0.categories", str(e.value)
    assert "folder" in e.value.problem
    assert not run.exists()


def test_F9_magnetic_tile_defect_images_are_named_as_such(data):
    from export.clgan.data import DataSource, load_normal_images
    from inspector.evaluation.datasets import SplitFractions

    src = DataSource(format="magnetic-tile", root=str(data / "mt"), split="all",
                     categories=["MT_Free", "MT_Crack"])
    images, desc = load_normal_images([src], data, 1, 32, SplitFractions(0.3, 0.2))
    assert len(images) == 4, desc
    assert "2 defect images" in desc[0] and "window" not in desc[0], desc


# ---------------------------------------------------------------------------------------------
# F4 / F5 / F12: fuzzymask (one uninterrupted run, one stopped mid-epoch)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fm_runs(tmp_path_factory, data) -> dict:
    from export.fuzzymask.train import train

    base = tmp_path_factory.mktemp("fm")
    _link_data(base, data)
    config = _config("fuzzymask", base)  # 2 epochs of 3 steps
    whole = train(config, base / "whole")
    part = train(config, base / "part", max_iters=4)  # stops in the 2nd epoch
    return {"base": base, "config": config, "whole": whole, "part": part}


def _export_warnings(export_bundle, run: Path, out: Path, caplog) -> tuple[Path, list[str]]:
    caplog.set_level(logging.INFO)
    caplog.clear()
    bundle = export_bundle(run, out)
    return bundle, [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_F4_fuzzymask_unfinished_run_exports_with_a_warning(fm_runs, tmp_path, caplog):
    from export.fuzzymask.export import export_bundle

    _, warned = _export_warnings(export_bundle, fm_runs["part"], tmp_path / "b-part", caplog)
    assert any(f"{fm_runs['part'] / 'checkpoint.pt'}: training has not finished (step 4 of 6); "
               "exporting it anyway" in m for m in warned), warned
    _, warned = _export_warnings(export_bundle, fm_runs["whole"], tmp_path / "b-whole", caplog)
    assert not any("has not finished" in m for m in warned), warned


def test_F5_fuzzymask_bundle_records_checkpoint_at(fm_runs, tmp_path):
    from export.fuzzymask.export import export_bundle

    prov = _provenance(export_bundle(fm_runs["part"], tmp_path / "b-part"))
    assert prov["training_complete"] is False
    assert prov["checkpoint_at"] == {"step": 4, "planned": 6}
    assert "checkpoint_at" not in _provenance(export_bundle(fm_runs["whole"], tmp_path / "b-whole"))


def test_F12_fuzzymask_resumed_mid_epoch_records_the_same_last_epoch_loss(fm_runs, tmp_path):
    from export.fuzzymask.train import train

    part = tmp_path / "part"
    shutil.copytree(fm_runs["part"], part)
    train(fm_runs["config"], part, resume=True)  # steps 5 and 6: the second epoch's last two
    m_whole, m_part = (json.loads((d / "metrics.json").read_text()) for d in (fm_runs["whole"], part))
    assert m_part["iterations"] == m_whole["iterations"] == 6
    assert m_whole["last_epoch_loss"] is not None
    assert m_part["last_epoch_loss"] == pytest.approx(m_whole["last_epoch_loss"], rel=1e-9)
    assert m_part.get("last_epoch_loss_steps") == m_whole.get("last_epoch_loss_steps") == 3


# ---------------------------------------------------------------------------------------------
# F4 / F5 / F16: CLGAN (a run stopped at 2 of 4 iterations)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clgan_run(tmp_path_factory, data) -> dict:
    from export.clgan.train import train

    base = tmp_path_factory.mktemp("clgan")
    _link_data(base, data)
    config = _config("clgan", base)  # 1 + 1 epochs of 2 iterations
    return {"config": config, "part": train(config, base / "part", max_iters=2)}


def test_F5_clgan_unfinished_export_warns_and_records_checkpoint_at(clgan_run, tmp_path, caplog):
    from export.clgan.export import export_bundle

    bundle, warned = _export_warnings(export_bundle, clgan_run["part"], tmp_path / "b-part", caplog)
    assert any("training has not finished (iteration 2 of 4)" in m for m in warned), warned
    prov = _provenance(bundle)
    assert prov["training_complete"] is False
    assert prov["checkpoint_at"] == {"step": 2, "planned": 4}


def test_F16_clgan_last_checkpoint_line_and_metrics_agree(clgan_run, tmp_path, caplog):
    from export.clgan.export import export_bundle
    from export.clgan.train import train

    run = tmp_path / "run"
    shutil.copytree(clgan_run["part"], run)
    caplog.set_level(logging.INFO)
    caplog.clear()
    train(clgan_run["config"], run, resume=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint at 4:")]
    assert lines, [r.getMessage() for r in caplog.records]
    logged = float(re.search(r"\|I - G\(I\)\| ([0-9.]+) grey levels", lines[-1]).group(1))
    metrics = json.loads((run / "metrics.json").read_text())
    assert logged == pytest.approx(metrics["preview_abs_error_grey"], abs=0.006), (lines[-1], metrics)
    # the finished run's bundle has no checkpoint_at
    assert "checkpoint_at" not in _provenance(export_bundle(run, tmp_path / "b-whole"))


# ---------------------------------------------------------------------------------------------
# F6, F7, F10, F11: what the commands say
# ---------------------------------------------------------------------------------------------

def test_F6_an_unfinished_bundle_without_a_recorded_reason_is_not_said_stopped_by_a_stop():
    from types import SimpleNamespace

    from inspector.cli import _unfinished_training

    def said(prov):
        return _unfinished_training(SimpleNamespace(path="b", spec=SimpleNamespace(provenance=prov)))[0]
    no_reason = said({"training_complete": False, "training": {"iterations": 76, "planned_iterations": 228}})
    assert "(stopped, no reason recorded, at iteration 76 of 228)" in no_reason and "a stop" not in no_reason
    assert "(stopped by max_iters at iteration 5 of 9)" in said(
        {"training_complete": False, "training": {"iterations": 5, "planned_iterations": 9, "stopped_by": "max_iters"}})
    # counts missing: checkpoint_at says where it stood
    assert "(stopped, no reason recorded, at step 4 of 12)" in said(
        {"training_complete": False, "training": {}, "checkpoint_at": {"step": 4, "planned": 12}})
    assert "(at stage 2 step 30)" in said({"training_complete": False, "checkpoint_at": {"stage": 2, "step": 30}})


def test_F7_residual_window_write_with_nothing_to_score_says_so_and_exits_1(tmp_path, data):
    from conftest import ROOT

    bundle = tmp_path / "b"
    shutil.copytree(ROOT / "deploy" / "models" / "clgan-mt", bundle)
    before = (bundle / "bundle.yaml").read_bytes()
    r = run_cli("calibrate", "residual-window", "--bundle", str(bundle), "--data", str(data / "plain"),
                "--format", "folder", "--split", "all", "--windows", "0,7", "--write", "--out",
                str(tmp_path / "out"), env=ENV)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "no local_mean_window could be scored by class_mean_auroc on these images (it needs defect " \
           "pixels in --data): nothing chosen, nothing written" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == ("inspector: error: --write: no local_mean_window could be "
                                                "scored by class_mean_auroc; the bundle is unchanged")
    assert (bundle / "bundle.yaml").read_bytes() == before


def test_F10_a_run_dir_or_out_that_is_a_file_is_bad_input_naming_the_option(tmp_path, data):
    from export.training import prepare_run_dir

    _link_data(tmp_path, data)
    config = _config("clgan", tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run_cli("train", "clgan", "--config", str(config), "--run-dir", str(afile), env=ENV)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"inspector: error: --run-dir {afile}: is a file, not a "
                                                "folder; choose another run folder")
    with pytest.raises(FileExistsError, match=f"--run-dir {afile / 'run'}: cannot create the folder"):
        prepare_run_dir(afile / "run", "x", resume=False)
    r = run_cli("export", "onnx", "--run-dir", str(tmp_path), "--out", str(afile), env=ENV)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"inspector: error: --out {afile}: is a file, not a "
                                                "folder (a bundle is a folder)")


def test_F11_fuzzymask_says_its_checkpoint_is_saved_before_tau(tmp_path, data, caplog):
    from export.fuzzymask.train import train

    _link_data(tmp_path, data)
    config = _config("fuzzymask", tmp_path)
    caplog.set_level(logging.INFO, logger="export.fuzzymask.train")
    train(config, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.name == "export.fuzzymask.train"]
    ended = next(i for i, m in enumerate(lines) if m.startswith("training ended at step 6: checkpoint saved"))
    assert any(m.startswith("tau (train_envelope") for m in lines[ended:])  # said before tau
