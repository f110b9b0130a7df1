"""`inspector export onnx` that fails (a parity miss) leaves no --out folder it created behind,
and never removes one that was there before."""

from __future__ import annotations

import pytest
import yaml

torch = pytest.importorskip("torch", reason="torch is needed for the offline ARCD code (pip install .[train])")
pytest.importorskip("onnx", reason="onnx is needed for the ARCD export")

# a run just long enough to leave a checkpoint (the export only needs the weights)
TINY = {
    "name": "tiny-out", "seed": 0, "threads": 1, "device": "cpu", "log_every": 1, "checkpoint_every": 2,
    "model": {"in_channels": 1, "tile": [32, 32], "r_base_width": 2, "r_depth": 3,
              "d_base_channels": 2, "d_depth": 3},
    "data": {"frame_size": [32, 64], "renderer_seeds": [0], "contrasts": [1.5],
             "val_frames": 1, "val_renderer_seeds": [5], "calib_frames": 1,
             "calib_renderer_seeds": [6], "focus_prob": 1.0},
    "simulation": {"clean_prob": 0.0},
    "stage1": {"steps": 1, "batch_size": 2, "lr": 0.005},
    "stage2": {"steps": 1, "batch_size": 2, "lr": 0.005, "focal_alpha": "balanced"},
    "evaluation": {"threshold_candidates": [0.5], "per_class_thresholds": False},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from export.arcd.train import train

    root = tmp_path_factory.mktemp("arcd-out")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    return train(cfg, root / "run")


def test_removed_on_failure_removes_only_what_the_block_created(tmp_path):
    from export.onnx_export import removed_on_failure

    new = tmp_path / "a" / "b" / "bundle"
    with pytest.raises(RuntimeError):
        with removed_on_failure(new):
            new.mkdir(parents=True)
            (new / "model.onnx").write_bytes(b"half")
            raise RuntimeError("parity")
    assert not (tmp_path / "a").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("x")
    with pytest.raises(KeyboardInterrupt):
        with removed_on_failure(old):
            (old / "model.onnx").write_bytes(b"half")
            raise KeyboardInterrupt
    assert (old / "keep.txt").read_text() == "x"
    ok = tmp_path / "ok"
    with removed_on_failure(ok):
        ok.mkdir()
    assert ok.is_dir()


def test_export_parity_miss_leaves_no_out_folder_behind(tiny_run, tmp_path, capsys):
    from inspector.cli import main as cli_main

    out = tmp_path / "nested" / "strict"
    assert cli_main(["export", "onnx", "--run-dir", str(tiny_run), "--out", str(out),
                     "--parity-tol", "1e-12"]) == 2
    assert "differs from torch" in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()
    # a folder that was there before stays, empty or not
    for pre in (tmp_path / "empty", tmp_path / "full"):
        pre.mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for pre in (tmp_path / "empty", tmp_path / "full"):
        assert cli_main(["export", "onnx", "--run-dir", str(tiny_run), "--out", str(pre),
                         "--parity-tol", "1e-12"]) == 2
        assert pre.is_dir() and not (pre / "bundle.yaml").exists()
    assert [p.name for p in (tmp_path / "empty").iterdir()] == []
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]



@pytest.fixture(scope="module")
def exportable_run(tmp_path_factory):
    """The tiny run with an overlap its 32-px tile allows, so that it exports."""
    from export.arcd.train import train

    root = tmp_path_factory.mktemp("arcd-exportable")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "evaluation": {**TINY["evaluation"], "overlap": 8}}))
    return train(cfg, root / "run")


def test_an_existing_bundle_is_not_overwritten_without_replace(exportable_run, tmp_path):
    from inspector.cli import main as cli_main

    out = tmp_path / "bundle"
    assert cli_main(["export", "onnx", "--run-dir", str(exportable_run), "--out", str(out)]) == 0
    (out / "note.txt").write_text("evaluated on the line")
    before = (out / "bundle.yaml").read_text()
    assert cli_main(["export", "onnx", "--run-dir", str(exportable_run), "--out", str(out)]) == 2
    assert (out / "bundle.yaml").read_text() == before and (out / "note.txt").is_file()
    assert cli_main(["export", "onnx", "--run-dir", str(exportable_run), "--out", str(out), "--replace"]) == 0


def test_an_unfinished_arcd_run_records_where_it_stood(exportable_run, tmp_path):
    import shutil

    from export.arcd.train import load_checkpoint
    from export.onnx_export import export_bundle
    from inspector.bundle import load_bundle

    run = tmp_path / "run"
    shutil.copytree(exportable_run, run)
    ck = load_checkpoint(run / "checkpoint.pt")
    ck["done"] = False
    torch.save(ck, run / "checkpoint.pt")
    prov = load_bundle(export_bundle(run, tmp_path / "b", allow_stale_metrics=True)).spec.provenance
    assert prov["training_complete"] is False
    assert prov["checkpoint_at"] == {"stage": ck["stage"], "step": ck["step"]}
