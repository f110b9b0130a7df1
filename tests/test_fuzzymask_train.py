"""Fuzzy-mask inpainter, training side: training steps, tau, the bundle export with its parity
check, and ``inspector train fuzzymask`` -> ``inspector export onnx`` as commands on a tiny
synthetic folder. The magnetic-tile checks skip when ../shared/data is not on this machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import ROOT, SHARED_DATA

torch = pytest.importorskip("torch", reason="training and export need the train extra (torch)")

from export.fuzzymask.data import NormalCrops, StepBatches, load_normal_images  # noqa: E402
from export.fuzzymask.loss import TYPE_WEIGHTS, FuzzyMaskLoss  # noqa: E402
from export.fuzzymask.masking import FuzzyMaskConfig, fuzzy_mask  # noqa: E402
from export.fuzzymask.torch_model import FuzzyMaskNet  # noqa: E402

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
MT = SHARED_DATA / "magnetic_tile"
needs_mt = pytest.mark.skipif(not (MT / "MT_Free").is_dir(),
                              reason=f"magnetic-tile data not found at {MT} (../shared/data absent)")


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspector", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grey vertical streaks with noise, roughly the look of a magnetic-tile surface."""
    img = np.tile(rng.normal(120, 14, w), (h, 1)) + rng.normal(0, 5, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root: Path, n: int = 6, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(root / f"normal_{i}.png"), texture(rng, 56, 80))  # smaller than a crop: padded
    return root


def tiny_config(base: Path, **over) -> Path:
    cfg = {
        "kind": "fuzzymask", "name": "tiny", "seed": 0, "threads": 1, "device": "cpu",
        "log_every": 1, "checkpoint_every": 2,
        # every image in training (split all): the folder is tiny
        "data": {"sources": [{"format": "folder", "root": "imgs", "split": "all"}],
                 "crop": 64, "channels": 1, "flip": True},
        "model": {"width": 4, "blocks": [1, 1, 1, 1]},
        "optim": {"batch_size": 3, "epochs": 2, "iters_per_epoch": 3},
        "inference": {"tau_images": 12, "overlap": 16},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One tiny run through the commands, shared by the export checks below."""
    base = tmp_path_factory.mktemp("fuzzymask")
    make_folder(base / "imgs")
    config = tiny_config(base)
    run, bundle = base / "run", base / "bundle"
    r = cli("train", "fuzzymask", "--config", str(config), "--run-dir", str(run), "--max-iters", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    r2 = cli("export", "onnx", "--run-dir", str(run), "--out", str(bundle))
    assert r2.returncode == 0, r2.stderr[-3000:]
    from export.fuzzymask.train import load_checkpoint

    # the exported state: a later test resumes the run and moves its checkpoint on
    metrics = json.loads((run / "metrics.json").read_text())
    ck = load_checkpoint(run / "checkpoint.pt")
    return {"base": base, "config": config, "run": run, "bundle": bundle, "train": r, "export": r2,
            "metrics": metrics, "checkpoint": ck}


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.stack([texture(rng, 64, 64)[None] for _ in range(4)]).astype(np.float32) / 255)
    net = FuzzyMaskNet(1, 4, blocks=(1, 1, 1, 1))
    crit = FuzzyMaskLoss(*TYPE_WEIGHTS["I"], lam=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        xt, _ = fuzzy_mask(x, FuzzyMaskConfig(), np.random.default_rng(step))
        opt.zero_grad()
        loss, _ = crit(net, x, xt)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses


def test_step_batches_are_a_function_of_the_step():
    from export.clgan.data import NormalImage

    rng = np.random.default_rng(1)
    images = [NormalImage(texture(rng, 50, 70)[:, :, None], None, f"i{i}") for i in range(3)]
    a = StepBatches(NormalCrops(images, 64, 1, seed=3), 2, FuzzyMaskConfig(), 10)
    b = StepBatches(NormalCrops(images, 64, 1, seed=3), 2, FuzzyMaskConfig(), 10)
    (x1, t1), (x2, t2) = a[5], b[5]
    assert torch.equal(x1, x2) and torch.equal(t1, t2) and x1.shape == (2, 1, 64, 64)
    assert not torch.equal(a[4][0], x1)


def test_cli_train_writes_the_run_folder(trained):
    run = trained["run"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["kind"] == "fuzzymask" and cfg["optim"]["lr"] == 2e-4 and cfg["loss"]["lambda_inpaint"] == 0.1
    m = trained["metrics"]
    assert m["iterations"] == 4 and m["stopped_by"] == "max_iters" and m["tau"] > 0
    assert m["checkpoint_step"] == 4  # what the export checks its tau against
    assert m["tau_stats"]["images"] == 12
    assert (run / "checkpoint.pt").is_file() and (run / "preview.png").is_file()
    lines = (run / "losses.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "loss" in json.loads(lines[-1])
    assert "eta" in trained["train"].stderr  # progress lines


def test_cli_refuses_to_overwrite_and_resumes(trained):
    r = cli("train", "fuzzymask", "--config", str(trained["config"]), "--run-dir", str(trained["run"]),
            "--max-iters", "1")
    assert r.returncode != 0 and "--resume" in r.stderr
    r = cli("train", "fuzzymask", "--config", str(trained["config"]), "--run-dir", str(trained["run"]),
            "--resume", "--max-iters", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((trained["run"] / "metrics.json").read_text())["iterations"] == 5


def test_a_refused_export_leaves_no_bundle_folder(trained, tmp_path):
    out = tmp_path / "new" / "bundle"
    r = cli("export", "onnx", "--run-dir", str(trained["run"]), "--out", str(out), "--parity-tol", "1e-15")
    assert r.returncode == 2 and "parity" in r.stderr.lower(), r.stderr[-2000:]
    assert not (tmp_path / "new").exists()


def test_resume_with_another_network_names_the_key(trained, tmp_path):
    # the checkpoint holds the saved network's tensors: say which key changed, before any tensor
    # is loaded (it used to say only "model: differs")
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    (tmp_path / "imgs").symlink_to(trained["config"].parent / "imgs")
    wider = tiny_config(tmp_path, model={"width": 8})
    r = cli("train", "fuzzymask", "--config", str(wider), "--run-dir", str(run), "--resume", "--max-iters", "1")
    assert r.returncode == 2
    assert f"{wider}: model.width: 8, but the checkpoint {run / 'checkpoint.pt'} was trained with 4" in r.stderr


def test_bundle_follows_the_contract(trained):
    from inspector.bundle import load_bundle

    b = load_bundle(trained["bundle"])
    s = b.spec
    assert s.kind == "fuzzymask" and s.input.tile == (64, 64) and s.input.channels == 1
    assert s.input.mean == [0.0] and s.input.std == [1.0] and s.input.batch == 0
    assert s.outputs == {"reconstruction": "reconstruction"} and s.tiling.overlap == 16
    kp = s.kind_params
    assert kp["cell"] == 16 and (kp["ssim_alpha"], kp["ssim_beta"], kp["ssim_gamma"]) == TYPE_WEIGHTS["I"]
    assert kp["tau_mode"] == "fixed" and kp["tau"] == trained["metrics"]["tau"] > 0
    assert s.postprocess.type == "score_threshold" and s.postprocess.score_threshold == kp["tau"]
    par = s.provenance["parity"]
    assert par["max_abs_diff"] <= 1e-4 and par["atol"] == 1e-4
    try:
        from inspector.models.fuzzymask import FuzzymaskParams
    except ImportError:
        return
    FuzzymaskParams.model_validate(kp)


def test_bundle_records_the_checkpoint_and_the_default_split(trained):
    from inspector.bundle import load_bundle

    p = load_bundle(trained["bundle"]).spec.provenance
    assert p["split_fractions"] == {"test": 0.3, "val": 0.2}
    assert p["training"]["checkpoint_step"] == 4 and p["training"]["metrics_json"] == "current"
    assert p["training_complete"] is False  # 4 of 6 planned steps
    assert "not the default" not in trained["export"].stderr


def test_stale_metrics_tau_is_recomputed_or_refused(tmp_path, monkeypatch, caplog, capsys):
    """metrics.json of a 1-step run beside the checkpoint of step 3 (resumed, then preempted
    before writing metrics): the bundle gets the tau of the step-3 network, not the stale one;
    without the training images the export is refused in one line naming metrics.json, both
    steps and --resume. The run's non-default split is warned about and recorded."""
    import shutil

    import export.fuzzymask.train as T
    from export.fuzzymask.export import export_bundle, is_fuzzymask_run
    from inspector.bundle import load_bundle
    from inspector.cli import main as cli_main
    from inspector.errors import CheckpointError
    from inspector.evaluation.datasets import SplitFractions

    make_folder(tmp_path / "imgs", n=4)
    config = tiny_config(tmp_path, checkpoint_every=1, data={"split_test": 0.1}, optim={"epochs": 10})
    run = tmp_path / "run"
    T.train(config, run, max_iters=1)
    stale = json.loads((run / "metrics.json").read_text())
    real = T.atomic_save

    def save_then_stop(obj, path):
        real(obj, path)
        if obj["step"] == 3:
            raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(T, "atomic_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        T.train(config, run, resume=True)
    monkeypatch.setattr(T, "atomic_save", real)
    ck = T.load_checkpoint(run / "checkpoint.pt")
    assert ck["step"] == 3 and stale["checkpoint_step"] == 1

    with caplog.at_level("WARNING"):
        export_bundle(run, tmp_path / "b")
    s = load_bundle(tmp_path / "b").spec
    cfg = T.load_config(config)
    net = T.build_model(cfg, load_pretrained=False)
    net.load_state_dict(ck["model"])
    images, _ = load_normal_images(cfg.data.sources, Path(cfg.base_dir), 1, cfg.data.crop,
                                   SplitFractions(cfg.data.split_test, cfg.data.split_val))
    want = T.compute_tau(net, NormalCrops(images, cfg.tile(), 1, cfg.seed, 0, True, False), cfg,
                         torch.device("cpu"))["tau"]
    assert s.kind_params["tau"] == want == s.postprocess.score_threshold != stale["tau"]
    p = s.provenance
    assert p["tau"]["stats"]["computed_by"] == "export" and p["training_complete"] is False
    assert p["training"]["iterations"] == 3 and p["training"]["metrics_json"] == "stale: left out"
    assert p["split_fractions"] == {"test": 0.1, "val": 0.2}
    assert "tau of step 1" in caplog.text and "at step 3" in caplog.text
    assert "split_test 0.1" in caplog.text and "calibrate on images this model was trained on" in caplog.text

    # without the training images there is no tau for step 3: refused, one line, exit 2
    shutil.move(tmp_path / "imgs", tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="step 1 .* step 3"):
        export_bundle(run, tmp_path / "c")
    capsys.readouterr()
    assert cli_main(["export", "onnx", "--run-dir", str(run), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert str(run / "metrics.json") in err and "--resume" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "bundle.yaml").exists()

    # the exporter is chosen by the checkpoint when config.yaml is gone
    (run / "config.yaml").unlink()
    assert is_fuzzymask_run(run)


def test_onnx_matches_torch_with_a_dynamic_batch(trained):
    import onnxruntime as ort

    from export.fuzzymask.train import FuzzymaskTrainConfig, build_model

    ck = trained["checkpoint"]
    net = build_model(FuzzymaskTrainConfig.model_validate(ck["config"]))
    net.load_state_dict(ck["model"])
    sess = ort.InferenceSession(str(trained["bundle"] / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(9).random((5, 1, 64, 64), dtype=np.float32)
    got = sess.run(["reconstruction"], {"image": x})[0]
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 1, 64, 64)
    assert float(np.abs(got - ref).max()) <= 1e-4


def test_parity_failure_writes_no_bundle(trained, tmp_path):
    from export.fuzzymask.export import ExportParityError, export_bundle

    with pytest.raises(ExportParityError, match="differs from torch") as e:
        export_bundle(trained["run"], tmp_path / "b", atol=-1.0)  # nothing can pass a negative tolerance
    # named as the bundle's graph, not the staged temporary file (gone by then)
    assert str(e.value).startswith(f"{tmp_path / 'b' / 'model.onnx'}: ")
    assert not (tmp_path / "b" / "bundle.yaml").exists() and not (tmp_path / "b" / "model.onnx").exists()


def test_max_minutes_stops_cleanly(tmp_path):
    from export.fuzzymask.train import train

    make_folder(tmp_path / "imgs", n=3)
    config = tiny_config(tmp_path, max_minutes=1e-4, data={"crop": 32},
                         inference={"tau_images": 4, "tile": 64})
    run = train(config, tmp_path / "run")
    m = json.loads((run / "metrics.json").read_text())
    assert m["stopped_by"] == "max_minutes" and m["iterations"] == 1
    assert m["tau_stats"]["tile"] == 64  # tau on runtime-sized tiles, not training crops
    assert (run / "checkpoint.pt").is_file()


def test_config_errors_name_the_key(tmp_path):
    make_folder(tmp_path / "imgs", n=1)
    bad = tiny_config(tmp_path, data={"crop": 48})
    r = cli("train", "fuzzymask", "--config", str(bad), "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "data" in r.stderr and "multiple of 32" in r.stderr
    bad = tiny_config(tmp_path, loss={"ssim_type": "IV"})
    r = cli("train", "fuzzymask", "--config", str(bad), "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "loss.ssim_type" in r.stderr


def test_shipped_configs_validate():
    from export.fuzzymask.train import load_config

    for name in ("fuzzymask-mt.yaml", "fuzzymask-mt-gpu.yaml"):
        cfg = load_config(ROOT / "configs" / "train" / name)
        assert cfg.kind == "fuzzymask" and cfg.data.sources[0].split == "train"
        assert cfg.data.channels == 1 and cfg.max_minutes


@needs_mt
def test_magnetic_tile_training_crops_are_train_split_normals():
    from inspector.evaluation.datasets import SplitFractions, split_of

    from export.fuzzymask.train import load_config

    cfg = load_config(ROOT / "configs" / "train" / "fuzzymask-mt-gpu.yaml")
    fr = SplitFractions(cfg.data.split_test, cfg.data.split_val)
    images, desc = load_normal_images(cfg.data.sources, Path(cfg.base_dir), 1, 256, fr)
    assert len(images) > 100 and "split=train" in desc[0]
    assert all(split_of(Path(im.name).stem, fr) == "train" for im in images)
    x = NormalCrops(images, 256, 1, seed=0).stack(range(4))
    assert x.shape == (4, 1, 256, 256) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_resume_continues_the_running_loss_averages(trained, tmp_path):
    """2 steps, then --resume for the other 4, report the loss averages one run of 6 does (step
    batches are functions of the step, so the two runs see the same losses); they used to restart
    at the resume, so a resumed run's final_losses_ema was its last steps' alone."""
    from export.fuzzymask.train import train

    config = tiny_config(tmp_path)
    (tmp_path / "imgs").symlink_to(trained["base"] / "imgs")
    whole = train(config, tmp_path / "whole", max_iters=6)
    train(config, tmp_path / "split", max_iters=2)
    parts = train(config, tmp_path / "split", resume=True, max_iters=4)
    ema = [json.loads((d / "metrics.json").read_text())["final_losses_ema"] for d in (whole, parts)]
    assert ema[0].keys() == ema[1].keys() and ema[0]
    for k in ema[0]:
        assert ema[0][k] == pytest.approx(ema[1][k], rel=1e-4, abs=1e-6), k
