"""Sweep 25, offline side (train, export, evaluate, augment): each bad input is one line naming
the option or key, exit 2, no traceback, nothing written.

- B2 / C4: ``evaluate --resize 0x0``, ``100000x100000`` (cv2 tracebacks) and ``abc`` (a bare
  int() message).
- B4: ``export onnx --opset 99`` / ``5``: a Torch IR dump and a traceback.
- B5: ``train arcd`` took ``model.tile: [0, 224]``, trained, and the export crashed.
- B7: ``evaluate --record --record-key validation`` replaced the exporter's training record.
- B8: ``train clgan`` with ``data.crop`` larger than every image padded each image to it (all the
  memory, an empty run folder).
- C4: ``export onnx --out`` under a file or in /proc; ``augment ... sample --out`` the same;
  ``--seed -1``; ``anomalyalign sample --steps`` past the run's timesteps.
- C6: ``evaluate --set bogus=1`` said "kind 'arcd' takes no kind_params".
- C12: ARCD with no steps at all trained nothing and exited 0.
- C14: ``anomalyalign sample --guidance inf`` wrote black images.
- C15: ``defectgan sample --grid <folder>`` wrote the pairs, then failed.
- C18: the advice for a corrupt metrics.json ("delete it") led to another refusal.
- C19: ``train arcd --resume`` on a CLGAN run dumped the model section, "trained with None".
- C20: a corrupt losses.jsonl row was reported as a row "past step N".
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_BUNDLE, run_cli

torch = pytest.importorskip("torch")

from test_arcd_neu import neu_folder  # noqa: E402
from test_walkE_fixes import tiny_config  # noqa: E402


def one_error(res, *words: str) -> str:
    """The run's single error line (argparse's or inspector's), exit 2, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, res.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def neu(tmp_path_factory) -> Path:
    return neu_folder(tmp_path_factory.mktemp("neu") / "neu", n=6)


# ----------------------------------------------------------------------------- B2, C4 --resize

@pytest.mark.parametrize("bad", ["0x0", "100000x100000", "abc", "256x", "nanxnan", "64x0"])
def test_b2_evaluate_resize_out_of_range_or_not_a_size_names_the_option(bad, neu):
    res = run_cli("evaluate", "--bundle", str(DEMO_BUNDLE), "--format", "neu-seg", "--data", str(neu),
                  "--resize", bad)
    one_error(res, "--resize")


def test_b2_resize_type_takes_a_size():
    from inspector.evaluation.options import resize_size

    assert resize_size("64X48") == (64, 48)


# ----------------------------------------------------------------------------- B4 --opset

@pytest.mark.parametrize("bad", ["99", "5"])
def test_b4_export_opset_outside_the_exporters_range_names_the_option(bad, tmp_path):
    res = run_cli("export", "onnx", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "b"),
                  "--opset", bad)
    line = one_error(res, "--opset")
    assert "11.." in line, line
    assert not (tmp_path / "b").exists()


def test_b4_python_m_export_opset_is_checked_too(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "export.onnx_export", "--run-dir", str(tmp_path),
                          "--out", str(tmp_path / "b"), "--opset", "99"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    one_error(res, "--opset")


# ----------------------------------------------------------------------------- B5, C12 ARCD config

def test_b5_a_tile_of_zero_is_refused_by_key_before_a_run_folder(tmp_path, neu):
    cfg = tiny_config(tmp_path / "t.yaml", neu, model={"tile": [0, 64]})
    res = run_cli("train", "arcd", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))
    one_error(res, str(cfg), "model.tile", ">= 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("unet", [False, True])
def test_c12_no_steps_at_all_is_refused_naming_the_key(tmp_path, neu, unet):
    cfg = tiny_config(tmp_path / "t.yaml", neu, model={"reconstruction": not unet})
    raw = yaml.safe_load(cfg.read_text())
    raw["stage1"]["steps"] = 0
    raw["stage2"]["steps"] = 0
    cfg.write_text(yaml.safe_dump(raw))
    res = run_cli("train", "arcd", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))
    one_error(res, str(cfg), "stage2.steps", "nothing would be trained")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- B7 --record-key

@pytest.fixture()
def demo_copy(tmp_path) -> Path:
    return Path(shutil.copytree(DEMO_BUNDLE, tmp_path / "demo"))


@pytest.mark.parametrize("key", ["validation", "params", "finished"])
def test_b7_record_key_of_the_training_record_is_refused_before_the_evaluation(demo_copy, neu, key, tmp_path):
    before = (demo_copy / "bundle.yaml").read_bytes()
    res = run_cli("evaluate", "--bundle", str(demo_copy), "--format", "neu-seg", "--data", str(neu),
                  "--record", "--record-key", key, "--out", str(tmp_path / "eval-out"))
    one_error(res, "--record-key", "training record")
    assert (demo_copy / "bundle.yaml").read_bytes() == before
    assert not (tmp_path / "eval-out").exists()  # the refusal leaves no new --out folder


def test_b7_record_key_empty_or_with_a_newline_is_refused(demo_copy, neu):
    for key in ("", " ", "a\nb"):
        res = run_cli("evaluate", "--bundle", str(demo_copy), "--format", "neu-seg", "--data", str(neu),
                      "--record", "--record-key", key)
        one_error(res, "--record-key")


def test_b7_an_evaluate_record_may_be_replaced_and_the_api_refuses_training_keys(demo_copy, neu):
    from inspector.evaluation.evaluate import record_metrics

    res = run_cli("evaluate", "--bundle", str(demo_copy), "--format", "neu-seg", "--data", str(neu),
                  "--record", "--record-key", "mine", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    again = run_cli("evaluate", "--bundle", str(demo_copy), "--format", "neu-seg", "--data", str(neu),
                    "--record", "--record-key", "mine")
    assert again.returncode == 0, again.stderr[-2000:]
    with pytest.raises(ValueError, match="--record-key validation"):
        record_metrics(demo_copy, result, "validation")
    metrics = yaml.safe_load((demo_copy / "bundle.yaml").read_text())["provenance"]["metrics"]
    assert "mean_defect_iou" in metrics["validation"] and "measured" in metrics["mine"]


# ----------------------------------------------------------------------------- C6 --set

def test_c6_set_of_an_unknown_key_says_unknown_key(neu):
    res = run_cli("evaluate", "--bundle", str(DEMO_BUNDLE), "--format", "neu-seg", "--data", str(neu),
                  "--set", "bogus=1")
    line = one_error(res, "--set bogus", "unknown key", "k1")
    assert not line.split("error: ", 1)[1].startswith(str(DEMO_BUNDLE)), line


# ----------------------------------------------------------------------------- B8 clgan crop

def test_b8_clgan_crop_larger_than_every_image_is_refused_before_the_run_folder(tmp_path):
    from test_clgan_train_export import make_magnetic_tile_root

    make_magnetic_tile_root(tmp_path / "mt", normals=3, defects=1)  # 72 x 96 px images
    cfg = {"kind": "clgan", "name": "tiny", "seed": 0, "threads": 1, "device": "cpu",
           "data": {"sources": [{"format": "magnetic-tile", "root": "mt", "split": "all"}],
                    "crop": 100000, "channels": 1},
           "generator": {"ngf": 4, "n_resblocks": 1}, "discriminator": {"ndf": 4},
           "nce": {"nce_layers": ["input", "E2", "E3", "R1"], "num_patches": 16, "mlp_dim": 8},
           "optim": {"n_epochs": 1, "n_epochs_decay": 0, "iters_per_epoch": 2},
           "detection": {"tile": [64, 64], "overlap": 16}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from export.clgan.train import load_config, open_training_images
    from inspector.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.crop: 100000 px is larger than every training image "
                                          r"\(the smallest is 72x96"):
        open_training_images(load_config(path), path)  # in-process: the old code padded, no OOM here
    cfg["data"]["crop"] = 72  # the largest that fits
    path.write_text(yaml.safe_dump(cfg))
    images, _ = open_training_images(load_config(path), path)
    assert len(images) == 3


# ----------------------------------------------------------------------------- C4 export/augment --out

def test_c4_export_out_under_a_file_or_in_proc_names_the_option(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "x", Path("/proc/xb_sweep25")):
        res = run_cli("export", "onnx", "--run-dir", str(tmp_path / "run"), "--out", str(out))
        one_error(res, f"--out {out}")


@pytest.mark.parametrize("gen", ["defectgan", "anomalyalign"])
def test_c4_c15_sample_paths_and_seed_are_checked_before_anything_is_sampled(tmp_path, gen):
    (tmp_path / "file").write_text("x")
    (tmp_path / "adir").mkdir()
    run = tmp_path / "no-run"
    cases = [(["--out", str(tmp_path / "file" / "x")], "--out"),
             (["--out", "/proc/dgs_sweep25"], "--out"),
             (["--out", str(tmp_path / "o"), "--grid", str(tmp_path / "adir")], "--grid"),
             (["--out", str(tmp_path / "o"), "--grid", str(tmp_path / "file" / "g.png")], "--grid"),
             (["--out", str(tmp_path / "o"), "--seed", "-1"], "--seed"),
             (["--out", str(tmp_path / "o"), "--seed", "99999999999999999999"], "--seed")]
    for extra, option in cases:
        res = run_cli("augment", gen, "sample", "--run-dir", str(run), "--n", "1", *extra)
        one_error(res, option)
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "file"]


def test_c4_measure_out_in_proc_names_the_option(tmp_path):
    from export.augment.measure_cli import check_out

    with pytest.raises(ValueError, match="--out /proc/x.json: cannot write in /proc"):
        check_out("/proc/x.json")


def test_c15_grid_checks_unit(tmp_path):
    from export.augment.cli_common import check_sample_paths

    check_sample_paths(tmp_path / "o", tmp_path / "g.png")
    with pytest.raises(ValueError, match="--grid .*: expected a .png"):
        check_sample_paths(tmp_path / "o", tmp_path / "g")
    with pytest.raises(ValueError, match="inside --out"):
        check_sample_paths(tmp_path / "o", tmp_path / "o" / "g.png")
    assert list(tmp_path.iterdir()) == []  # the probes leave nothing


# ----------------------------------------------------------------------------- C14 --guidance inf

def test_c14_guidance_inf_is_refused(tmp_path):
    from export.augment.anomalyalign.cli import guidance_scale
    from export.augment.anomalyalign.sample import check_guidance

    with pytest.raises(ValueError, match="--guidance: must be a finite number"):
        check_guidance(float("inf"))
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        guidance_scale("inf")
    res = run_cli("augment", "anomalyalign", "sample", "--run-dir", str(tmp_path), "--out",
                  str(tmp_path / "o"), "--n", "1", "--guidance", "inf")
    one_error(res, "--guidance")


# ----------------------------------------------------------------------------- C18, C19 (ARCD runs)

@pytest.fixture(scope="module")
def finished(tmp_path_factory, neu) -> Path:
    from export.arcd.train import train

    base = tmp_path_factory.mktemp("finished")
    return train(tiny_config(base / "t.yaml", neu), base / "run")


def test_c18_the_advice_for_a_corrupt_metrics_json_holds_when_followed(tmp_path, finished):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / "metrics.json").write_bytes(b"\x00{not json")
    res = run_cli("export", "onnx", "--run-dir", str(run), "--out", str(tmp_path / "b"))
    line = one_error(res, "metrics.json", "not valid JSON")
    assert "--allow-stale-metrics" in line and "--resume" in line, line
    assert "works from the checkpoint" not in line, line
    (run / "metrics.json").unlink()  # followed: delete it, export with --allow-stale-metrics
    ok = run_cli("export", "onnx", "--run-dir", str(run), "--out", str(tmp_path / "b"),
                 "--allow-stale-metrics")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "b" / "bundle.yaml").is_file()


def test_c18_opset_11_is_within_the_range_and_exports(tmp_path, finished):
    res = run_cli("export", "onnx", "--run-dir", str(finished), "--out", str(tmp_path / "b"),
                  "--opset", "11")
    assert res.returncode == 0, res.stderr[-2000:]


def test_c19_resume_of_a_clgan_run_says_it_is_a_clgan_checkpoint(tmp_path, neu):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": 1, "kind": "clgan", "step": 2, "config": {"kind": "clgan"}}, run / "checkpoint.pt")
    cfg = tiny_config(tmp_path / "t.yaml", neu)
    res = run_cli("train", "arcd", "--config", str(cfg), "--run-dir", str(run), "--resume")
    line = one_error(res, "checkpoint.pt", "clgan checkpoint, not an ARCD one", "inspector train clgan")
    assert "None" not in line and "in_channels" not in line, line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


# ----------------------------------------------------------------------------- C20 losses.jsonl

def test_c20_a_corrupt_row_is_reported_as_corrupt_with_its_line(tmp_path, caplog):
    from export.training import trim_losses

    path = tmp_path / "losses.jsonl"
    path.write_text('{"it": 1}\n{"it": 2, "lo\n{"it": 3}\n{"it": 4}\n{"it": 5}\n')
    with caplog.at_level(logging.INFO, logger="export.training"):
        assert trim_losses(path, 4) == 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{path}: dropped 1 corrupt row(s)" in text and "line(s) 2 of 5" in text, text
    assert "dropped 1 row(s) past step 4" in text, text
    assert [json.loads(ln)["it"] for ln in path.read_text().splitlines()] == [1, 3, 4]


# ----------------------------------------------------------------------------- C4 --steps

try:  # the tiny AnomalyAlign run fixture (its module skips itself without diffusers)
    from test_anomalyalign import tiny_run, tiny_sources  # noqa: E402,F401
except pytest.skip.Exception:
    tiny_sources = None

if tiny_sources is not None:
    def test_c4_anomalyalign_steps_past_the_runs_timesteps_names_the_option(tiny_run, tmp_path):  # noqa: F811
        from export.augment.anomalyalign.sample import sample

        with pytest.raises(ValueError, match=r"--steps 100000: more than the 1000 diffusion timesteps"):
            sample(tiny_run, tmp_path / "o", 1, steps=100000, sources=tiny_sources())
        assert not (tmp_path / "o").exists()
        man = json.loads(sample(tiny_run, tmp_path / "g", 1, steps=2, sources=tiny_sources()).read_text())
        assert man["sampling"]["ddim_steps"] == 2


def test_b7_record_key_without_record_is_refused(neu):
    res = run_cli("evaluate", "--bundle", str(DEMO_BUNDLE), "--format", "neu-seg", "--data", str(neu),
                  "--record-key", "mine")
    one_error(res, "--record-key", "--record")
