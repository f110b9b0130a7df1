"""`inspector train clgan` -> `export onnx` -> `evaluate` / `calibrate dual-threshold`, as commands.

A tiny CLGAN trains for a few iterations on a small synthetic magnetic-tile folder (written to a
temporary directory); the export's ONNX graph must match torch, and the bundle must run through the
evaluation and calibration commands.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import ROOT, sigterm_when

pytest.importorskip("torch", reason="training and export need the train extra (torch)")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: extra threads only spin on a busy box


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspector", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grey vertical streaks with noise, roughly the look of a magnetic-tile surface."""
    cols = rng.normal(120, 12, w)
    img = np.tile(cols, (h, 1)) + rng.normal(0, 6, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_magnetic_tile_root(root: Path, normals: int = 8, defects: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    free, crack = root / "MT_Free" / "Imgs", root / "MT_Crack" / "Imgs"
    free.mkdir(parents=True)
    crack.mkdir(parents=True)
    for i in range(normals):
        img = texture(rng, 72, 96)
        cv2.imwrite(str(free / f"free_{i}.jpg"), img)
        cv2.imwrite(str(free / f"free_{i}.png"), np.zeros_like(img))
    for i in range(defects):
        img = texture(rng, 72, 96)
        mask = np.zeros_like(img)
        cv2.line(mask, (20 + 10 * i, 10), (60, 60), 255, 3)
        img[mask > 0] = 30  # a dark crack
        cv2.imwrite(str(crack / f"crack_{i}.jpg"), img)
        cv2.imwrite(str(crack / f"crack_{i}.png"), mask)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("clgan")
    data = make_magnetic_tile_root(base / "mt")
    cfg = {
        "kind": "clgan", "name": "tiny", "seed": 0, "threads": 1, "device": "cpu",
        "log_every": 1, "checkpoint_every": 2,
        # every image in training (split all): the folder is tiny
        "data": {"sources": [{"format": "magnetic-tile", "root": "mt", "split": "all"}],
                 "crop": 32, "channels": 1, "flip": True},
        "generator": {"ngf": 4, "n_resblocks": 1},
        "discriminator": {"ndf": 4},
        "nce": {"nce_layers": ["input", "E2", "E3", "R1"], "num_patches": 16, "mlp_dim": 8},
        "optim": {"n_epochs": 1, "n_epochs_decay": 1, "iters_per_epoch": 5},
        "detection": {"tile": [64, 64], "overlap": 16},
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"base": base, "data": data, "config": path, "run": base / "run", "bundle": base / "bundle"}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def trained_run(trained) -> dict:
    """The run every later test of the chain uses, trained once for the module: 3 iterations by
    the command, then resumed in-process (saves a torch start-up) up to the planned 10. A test
    that needs it fails, not skips, when training breaks, whichever tests are selected."""
    run = trained["run"]
    first = cli("train", "clgan", "--config", str(trained["config"]), "--run-dir", str(run), "--max-iters", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    metrics_at_3 = json.loads((run / "metrics.json").read_text())
    import torch

    from export.clgan.train import train
    logger = logging.getLogger("export.clgan.train")
    lines, level = _Lines(), logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    threads = torch.get_num_threads()
    try:
        train(trained["config"], run, resume=True)
    finally:
        torch.set_num_threads(threads)
        logger.removeHandler(lines)
        logger.setLevel(level)
    return {**trained, "first": first, "metrics_at_3": metrics_at_3, "resume_log": "\n".join(lines.lines)}


@pytest.fixture(scope="module")
def exported(trained_run) -> dict:
    """The bundle exported once from the run. Tests that write into a bundle take a copy."""
    r = cli("export", "onnx", "--run-dir", str(trained_run["run"]), "--out", str(trained_run["bundle"]))
    assert r.returncode == 0, r.stderr[-3000:]
    return trained_run


def copy_bundle(exported, dest: Path) -> Path:
    import shutil
    shutil.copytree(exported["bundle"], dest)
    return dest


def test_train_checkpoints_and_resumes(trained_run):
    run, r = trained_run["run"], trained_run["first"]
    assert (run / "checkpoint.pt").is_file() and (run / "preview.png").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["kind"] == "clgan"
    m = trained_run["metrics_at_3"]
    assert m["iterations"] == 3 and m["planned_iterations"] == 10
    assert "it 3/10" in r.stderr and "NCE_X" in r.stderr  # progress lines
    # the resume (in the fixture) continued at iteration 3 up to the planned 10 ...
    log = trained_run["resume_log"]
    assert "resuming" in log and "at iteration 3 of 10" in log, log
    m = json.loads((run / "metrics.json").read_text())
    assert m["iterations"] == 10
    lines = [json.loads(x) for x in (run / "losses.jsonl").read_text().splitlines()]
    assert [x["it"] for x in lines] == list(range(1, 11))
    assert lines[-1]["lr"] < lines[0]["lr"]  # the linear decay of the second "epoch"
    # ... and a second run into the same folder without --resume must not overwrite it
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        _train_quietly(trained_run["config"], run)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_a_refused_export_leaves_no_bundle_folder(trained_run, tmp_path):
    # the folder was made before the parity check: a later model.bundle found it, without bundle.yaml
    out = tmp_path / "new" / "bundle"
    r = cli("export", "onnx", "--run-dir", str(trained_run["run"]), "--out", str(out), "--parity-tol", "1e-15")
    assert r.returncode == 2 and "parity" in r.stderr.lower(), r.stderr[-2000:]
    assert f"error: {out / 'model.onnx'}: ONNX and torch differ" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "new").exists()


def test_sigterm_saves_a_checkpoint_that_resumes(trained, tmp_path):
    """`kill` stops `python -m export.clgan.train` (SIGINT ignored, as in a script's background
    job) with a checkpoint of the iteration reached and exit 130; --resume continues there."""
    import torch

    cfg = yaml.safe_load(trained["config"].read_text())
    cfg.update(checkpoint_every=10 ** 6, optim=dict(cfg["optim"], n_epochs=2000))
    cfg["data"]["sources"][0]["root"] = str(trained["data"])
    path = tmp_path / "term.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    rc, err = sigterm_when(["export.clgan.train", "--config", str(path), "--run-dir", str(run)],
                           tmp_path / "train.log", r" it [3-9]/")
    assert rc == 130, err[-2000:]
    saved = re.search(r"interrupted at iteration (\d+); checkpoint saved", err)
    assert saved and "signal SIGTERM" in err and "Traceback" not in err, err[-2000:]
    step = int(saved.group(1))
    assert torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["step"] == step
    r = cli("train", "clgan", "--config", str(path), "--run-dir", str(run), "--resume",
            "--max-iters", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["iterations"] == step + 2


def test_bad_training_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"sources": [{"format": "folder", "root": "x"}]},
                                   "nce": {"nce_T": -1}}))
    r = cli("train", "clgan", "--config", str(bad), "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "nce.nce_T" in r.stderr
    bad.write_text(yaml.safe_dump({"data": {"sources": [{"format": "folder", "root": "x"}]},
                                   "detection": {"local_mean_window": 4}}))
    r = cli("train", "clgan", "--config", str(bad), "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "local_mean_window" in r.stderr


def test_export_parity_and_bundle(exported):
    trained = exported
    from inspector.bundle import load_bundle
    b = load_bundle(trained["bundle"])
    s = b.spec
    assert s.kind == "clgan" and s.input.channels == 1 and tuple(s.input.tile) == (64, 64)
    assert s.outputs == {"reconstruction": "reconstruction"} and s.tiling.overlap == 16
    assert s.postprocess.type == "dual_threshold" and (s.postprocess.k1, s.postprocess.k2) == (3.0, 1.0)
    assert s.kind_params["residual_mode"] == "abs" and s.kind_params["gauss_ksize"] == 3
    assert s.kind_params["local_mean_window"] == 0  # the spec's residual unless the config says
    assert s.provenance["parity"]["max_abs_diff"] < 1e-3
    assert s.provenance["training"]["iterations"] == 10

    # parity once more, independently: the generator from the checkpoint against onnxruntime
    import onnxruntime as ort
    import torch

    from export.clgan.train import ClganTrainConfig, build_networks, load_checkpoint
    ck = load_checkpoint(trained["run"] / "checkpoint.pt")
    G, _, _ = build_networks(ClganTrainConfig.model_validate(ck["config"]))
    G.load_state_dict(ck["G"])
    x = np.random.default_rng(5).uniform(-1, 1, (3, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = G.eval()(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(b.graph_path()), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_evaluate_and_calibrate_commands_on_the_exported_bundle(exported, tmp_path):
    trained = exported
    bundle = copy_bundle(exported, tmp_path / "bundle")  # --record and --write change it
    out = tmp_path / "eval"
    r = cli("evaluate", "--bundle", str(bundle), "--data", str(trained["data"]), "--format",
            "magnetic-tile", "--json", "--out", str(out), "--overlays", "3", "--threads", "1", "--record")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    from inspector.bundle import load_bundle
    rec = load_bundle(bundle).spec.provenance["metrics"]["magnetic-tile/all"]
    assert rec["f1"] == res["f1"] and rec["postprocess"]["k1"] == 3.0
    assert rec["kind_params"]["local_mean_window"] == 0 and rec["kind_params"]["residual_mode"] == "abs"
    for key in ("precision", "recall", "f1", "iou", "acc", "pixel_auroc", "false_alarm_rate"):
        assert isinstance(res[key], float) and 0.0 <= res[key] <= 1.0, key
    assert res["defective_images"] == 3 and res["normal_images"] == 8
    assert res["false_alarm_px_per_mpx"] >= 0
    assert (out / "metrics.json").is_file() and len(list((out / "overlays").glob("*.png"))) == 3
    assert len((out / "per_image.jsonl").read_text().splitlines()) == 11

    # defect-free images only: defect metrics are null, the false-alarm rate is still there
    r = cli("evaluate", "--bundle", str(bundle), "--data", str(trained["data"]), "--format",
            "magnetic-tile", "--categories", "MT_Free", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert all(res[k] is None for k in ("precision", "recall", "f1", "iou", "acc", "pixel_auroc"))
    assert isinstance(res["false_alarm_rate"], float)

    # the k1 sweep: JSON + PNG; --write stores the best k1 and keeps the old section
    cal = tmp_path / "cal"
    r = cli("calibrate", "dual-threshold", "--bundle", str(bundle), "--data", str(trained["data"]),
            "--format", "magnetic-tile", "--split", "all", "--range", "2:4:0.5", "--out", str(cal),
            "--write", "--json")
    assert r.returncode == 0, r.stderr
    sw = json.loads(r.stdout)
    assert [row["k1"] for row in sw["rows"]] == [2.0, 2.5, 3.0, 3.5, 4.0]
    assert (cal / "sweep_k1.png").stat().st_size > 1000 and (cal / "sweep_k1.json").is_file()
    spec = load_bundle(bundle).spec  # the sha256 still matches after the rewrite
    assert spec.postprocess.k1 == sw["best_value"]
    assert spec.postprocess_history[-1]["k1"] == 3.0
    assert spec.postprocess_history[-1]["calibration"]["objective"] == "f1"


def test_calibrate_residual_window_sweeps_writes_and_resets_the_floor(exported, tmp_path):
    from inspector.bundle import BundleSpec, load_bundle, write_bundle
    trained = exported
    bundle = copy_bundle(exported, tmp_path / "b")
    b = load_bundle(bundle)  # as if `calibrate thresholds` had set a floor on the old residual
    write_bundle(bundle, BundleSpec.model_validate({**b.spec.model_dump(mode="json"), "postprocess": {
        **b.spec.postprocess.model_dump(mode="json"), "min_residual": 12.5}}))
    out = tmp_path / "cal"
    r = cli("calibrate", "residual-window", "--bundle", str(bundle), "--data", str(trained["data"]),
            "--format", "magnetic-tile", "--split", "all", "--windows", "0,7,15", "--out", str(out),
            "--write", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [row["local_mean_window"] for row in res["rows"]] == [0, 7, 15]
    for row in res["rows"]:
        assert set(row["per_class_auroc"]) == {"Crack"}
        assert row["class_mean_auroc"] == row["per_class_auroc"]["Crack"]  # one class: its own
        assert 0 <= row["pixel_auroc"] <= 1 and row["normal_images"] == 8
    best = max(res["rows"], key=lambda row: row["class_mean_auroc"])["local_mean_window"]
    assert res["best_value"] == best and res["objective"] == "class_mean_auroc"
    assert (out / "sweep_local_mean_window.png").stat().st_size > 1000
    assert json.loads((out / "sweep_local_mean_window.json").read_text())["best_value"] == best
    spec = load_bundle(bundle).spec  # loads and verifies after the rewrite
    assert spec.kind_params["local_mean_window"] == best
    cal = spec.provenance["residual_window_calibration"]
    assert cal["previous"] == 0 and cal["objective"] == "class_mean_auroc"
    if best:  # a floor in the old residual's units no longer applies: reset, kept in the history
        assert spec.postprocess.min_residual == 0.0
        assert spec.postprocess_history[-1]["min_residual"] == 12.5
    # the window changes the residual the runtime computes, exactly as the sweep measured it
    r = cli("evaluate", "--bundle", str(bundle), "--data", str(trained["data"]), "--format",
            "magnetic-tile", "--split", "all", "--json", "--threads", "1", "--set", "min_residual=0")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    row = next(x for x in res["rows"] if x["local_mean_window"] == best)
    assert ev["kind_params"]["local_mean_window"] == best
    assert ev["f1"] == pytest.approx(row["f1"], abs=1e-9)
    assert ev["false_alarm_rate"] == pytest.approx(row["false_alarm_rate"])
    # reported defects too (the sweep built no defect list: 0 where every normal image alarmed)
    assert ev["false_alarm_rate_reported"] > 0
    assert ev["false_alarm_rate_reported"] == pytest.approx(row["false_alarm_rate_reported"])


@pytest.mark.parametrize("windows, says", [("0,4", "odd"), ("x", "comma list"), ("1", "odd side >= 3")])
def test_calibrate_residual_window_bad_input_exits_2(exported, tmp_path, windows, says):
    trained = exported
    r = cli("calibrate", "residual-window", "--bundle", str(trained["bundle"]), "--data",
            str(trained["data"]), "--format", "magnetic-tile", "--windows", windows, "--out", str(tmp_path))
    assert r.returncode == 2 and says in r.stderr and windows in r.stderr


def test_calibrate_residual_window_refuses_other_kinds(trained, tmp_path):
    demo = ROOT / "deploy" / "models" / "demo-arcd"
    if not (demo / "bundle.yaml").is_file():
        pytest.skip("the shipped demo bundle is missing")
    r = cli("calibrate", "residual-window", "--bundle", str(demo), "--data", str(trained["data"]),
            "--format", "magnetic-tile", "--out", str(tmp_path))
    assert r.returncode == 2 and "clgan" in r.stderr and "bundle.yaml" in r.stderr
    # a kind without kind_params does not ignore an unknown --set key
    r = cli("evaluate", "--bundle", str(demo), "--data", str(trained["data"]), "--format",
            "magnetic-tile", "--set", "local_mean_window=31")
    assert r.returncode == 2 and "--set local_mean_window" in r.stderr and "takes no kind_params" in r.stderr


def test_evaluate_set_overrides_kind_params_for_one_run(exported):
    trained = exported
    bundle = trained["bundle"]
    before = (bundle / "bundle.yaml").read_text()
    args = ("evaluate", "--bundle", str(bundle), "--data", str(trained["data"]), "--format",
            "magnetic-tile", "--json", "--threads", "1")
    r = cli(*args, "--set", "local_mean_window=7", "--set", "k1=2.5")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kind_params"]["local_mean_window"] == 7 and res["postprocess"]["k1"] == 2.5
    assert (bundle / "bundle.yaml").read_text() == before  # for this run only
    for bad, says in (("bogus=1", "--set bogus: neither a post-processing key"),
                      ("local_mean_window=4", "--set local_mean_window: must be 0 (off) or an odd side >= 3, got 4"),
                      ("k1=abc", "--set k1:")):
        r = cli(*args, "--set", bad)
        assert r.returncode == 2 and says in r.stderr, (bad, r.stderr)


def test_evaluate_bad_input_exits_2(exported, tmp_path):
    trained = exported
    r = cli("evaluate", "--bundle", str(tmp_path / "nope"), "--data", str(trained["data"]),
            "--format", "magnetic-tile")
    assert r.returncode == 2 and "nope" in r.stderr
    r = cli("evaluate", "--bundle", str(trained["bundle"]), "--data", str(tmp_path / "missing"),
            "--format", "magnetic-tile")
    assert r.returncode == 2 and "missing" in r.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu_keep_one_generator(trained, tmp_path):
    """`torchrun` multi-process training (gloo on CPU; NCCL on GPUs): gradients are averaged, so
    both ranks end with the same weights (checked inside train(), logged by rank 0)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun not installed beside this python")
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "export.clgan.train", "--config",
                        str(trained["config"]), "--run-dir", str(tmp_path / "ddp"), "--max-iters", "3"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**ENV, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["iterations"] == 3
    line = next(x for x in r.stderr.splitlines() if "checksum per rank" in x)
    a, b = line.rsplit(":", 1)[1].split(",")
    assert float(a) == float(b)


# ---------------------------------------------------------------------------------------------
# Resume, stale metrics, split fractions, the exporter's choice
# ---------------------------------------------------------------------------------------------

def _tiny_cfg(base: Path, data: Path, **data_over) -> dict:
    return {
        "kind": "clgan", "name": "tiny", "seed": 0, "threads": 1, "device": "cpu",
        "log_every": 1, "checkpoint_every": 2,
        "data": {"sources": [{"format": "magnetic-tile", "root": str(data), "split": "all"}],
                 "crop": 32, "channels": 1, "flip": True, **data_over},
        "generator": {"ngf": 4, "n_resblocks": 1},
        "discriminator": {"ndf": 4},
        "nce": {"nce_layers": ["input", "E2", "E3", "R1"], "num_patches": 16, "mlp_dim": 8},
        "optim": {"n_epochs": 1, "n_epochs_decay": 1, "iters_per_epoch": 5},
        "detection": {"tile": [32, 32], "overlap": 8},
    }


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_quietly(*args, **kw):
    import torch

    from export.clgan.train import train
    threads = torch.get_num_threads()
    try:
        return train(*args, **kw)
    finally:
        torch.set_num_threads(threads)


def _preempted_at(config: Path, run: Path, at: int, monkeypatch) -> None:
    """Resume ``run`` and stop it (as SIGTERM would) right after the checkpoint of ``at``:
    metrics.json is not rewritten, so it still describes the earlier invocation."""
    import export.clgan.train as T

    real = T.atomic_save

    def save_then_stop(obj, path):
        real(obj, path)
        if obj["step"] == at:
            raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(T, "atomic_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _train_quietly(config, run, resume=True)
    monkeypatch.setattr(T, "atomic_save", real)


@pytest.fixture(scope="module")
def stale_run(trained, tmp_path_factory) -> dict:
    """A run with split_test 0.1: 2 iterations with metrics.json, then resumed and preempted at
    4 (checkpoint at 4, metrics.json still of 2)."""
    base = tmp_path_factory.mktemp("clgan-stale")
    config = _write(base / "split.yaml", _tiny_cfg(base, trained["data"], split_test=0.1))
    run = base / "run"
    _train_quietly(config, run, max_iters=2)
    mp = pytest.MonkeyPatch()
    try:
        _preempted_at(config, run, 4, mp)
    finally:
        mp.undo()
    return {"base": base, "config": config, "run": run}


def test_metrics_json_records_the_checkpoint_step(stale_run):
    m = json.loads((stale_run["run"] / "metrics.json").read_text())
    assert m["checkpoint_step"] == 2 == m["iterations"] and m["stopped_by"] == "max_iters"
    import torch
    assert torch.load(stale_run["run"] / "checkpoint.pt", weights_only=True)["step"] == 4


def test_export_leaves_out_stale_metrics_and_records_the_split(stale_run, tmp_path, caplog):
    """metrics.json of iteration 2 beside a checkpoint of 4: the bundle says 4 and not complete,
    without the stale figures; the non-default split is warned about and recorded."""
    from export.clgan.export import export_bundle
    from inspector.bundle import load_bundle

    with caplog.at_level(logging.WARNING):
        export_bundle(stale_run["run"], tmp_path / "b")
    p = load_bundle(tmp_path / "b").spec.provenance
    tr = p["training"]
    assert tr["iterations"] == 4 == tr["checkpoint_step"] and tr["planned_iterations"] == 10
    assert tr["metrics_json"] == "stale: left out" and tr["final_losses_ema"] is None
    assert p["training_complete"] is False
    assert p["split_fractions"] == {"test": 0.1, "val": 0.2}
    assert "describes iteration 2" in caplog.text and "at iteration 4" in caplog.text
    assert "split_test 0.1" in caplog.text and "calibrate on images this model was trained on" in caplog.text

    # a metrics.json of an older trainer (no checkpoint_step): one warning, used as before
    old = tmp_path / "old"
    old.mkdir()
    for f in ("checkpoint.pt", "config.yaml"):
        (old / f).write_bytes((stale_run["run"] / f).read_bytes())
    m = json.loads((stale_run["run"] / "metrics.json").read_text())
    m.pop("checkpoint_step")
    (old / "metrics.json").write_text(json.dumps(m))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        export_bundle(old, tmp_path / "b2")
    assert caplog.text.count("no checkpoint_step") == 1
    tr = load_bundle(tmp_path / "b2").spec.provenance["training"]
    assert tr["final_losses_ema"] == m["final_losses_ema"] and tr["metrics_json"].startswith("unchecked")


def test_default_split_is_recorded_without_warning(exported):
    from inspector.bundle import load_bundle
    p = load_bundle(exported["bundle"]).spec.provenance
    assert p["split_fractions"] == {"test": 0.3, "val": 0.2}
    assert p["training_complete"] is True and p["training"]["metrics_json"] == "current"


def test_resume_is_bit_exact(trained, tmp_path):
    """2 iterations + --resume for the remaining 8 ends with the very weights of one run of 10
    (crops and PatchNCE locations are functions of the iteration, not of the global RNG)."""
    import torch

    config = _write(tmp_path / "t.yaml", _tiny_cfg(tmp_path, trained["data"]))
    whole = _train_quietly(config, tmp_path / "whole")
    _train_quietly(config, tmp_path / "split", max_iters=2)
    torch.manual_seed(123)  # whatever the process drew meanwhile must not matter
    torch.rand(7)
    parts = _train_quietly(config, tmp_path / "split", resume=True)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(parts / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 10
    for net in ("G", "D", "H"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    # the running loss averages continue over the resume: the resumed run reports the whole's
    import json

    ema = [json.loads((d / "metrics.json").read_text())["final_losses_ema"] for d in (whole, parts)]
    assert ema[0] == ema[1] and a["ema"] == b["ema"]


@pytest.mark.parametrize("section, key, value", [("discriminator", "ndf", 8),
                                                 ("nce", "mlp_dim", 16),
                                                 ("generator", "ngf", 8)])
def test_resume_with_another_architecture_names_the_key(trained, tmp_path, section, key, value):
    """A resume whose config changed a network width: exit 2, one line naming the dotted key,
    no load_state_dict traceback; the checkpoint is left as it was."""
    from export.clgan.train import main

    cfg = _tiny_cfg(tmp_path, trained["data"])
    config = _write(tmp_path / "t.yaml", cfg)
    run = tmp_path / "run"
    _train_quietly(config, run, max_iters=1)
    before = (run / "checkpoint.pt").read_bytes()
    cfg[section][key] = value
    changed = _write(tmp_path / "changed.yaml", cfg)
    import torch
    threads = torch.get_num_threads()
    try:
        assert main(["--config", str(changed), "--run-dir", str(run), "--resume"]) == 2
    finally:
        torch.set_num_threads(threads)
    assert (run / "checkpoint.pt").read_bytes() == before
    from inspector.errors import ConfigError
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: {value}, but the checkpoint"):
        _train_quietly(changed, run, resume=True)
    # a key that shapes nothing may change
    cfg = _tiny_cfg(tmp_path, trained["data"])
    cfg["nce"]["num_patches"] = 8
    _train_quietly(_write(tmp_path / "ok.yaml", cfg), run, resume=True, max_iters=1)


def test_export_takes_the_kind_from_the_checkpoint(stale_run, tmp_path, capsys):
    """A CLGAN run folder without config.yaml (or with another run's) still goes to the CLGAN
    exporter; a folder where neither file names a kind is one line naming it, exit 2."""
    import shutil

    import torch

    from export.clgan.export import is_clgan_run
    from export.fuzzymask.export import is_fuzzymask_run
    from inspector.cli import main as cli_main

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(stale_run["run"] / "checkpoint.pt", bare / "checkpoint.pt")
    assert is_clgan_run(bare) and not is_fuzzymask_run(bare)
    assert cli_main(["export", "onnx", "--run-dir", str(bare), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "bundle.yaml").is_file()
    (bare / "config.yaml").write_text("kind: fuzzymask\n")  # another run's config
    assert is_clgan_run(bare) and not is_fuzzymask_run(bare)
    capsys.readouterr()

    anon = tmp_path / "anon"
    anon.mkdir()
    ck = torch.load(stale_run["run"] / "checkpoint.pt", weights_only=True)
    ck.pop("kind")
    torch.save(ck, anon / "checkpoint.pt")
    assert cli_main(["export", "onnx", "--run-dir", str(anon), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert str(anon) in err and "config.yaml" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
