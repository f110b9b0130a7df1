import json

import pytest

from conftest import run_cli, write_config


def test_bench_writes_json_and_png(tmp_path, synthetic_cfg):
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg())
    out = tmp_path / "bench"
    r = run_cli("bench", "--config", str(p), "--frames", "30", "--throughput-frames", "20",
                "--out", str(out), timeout=180)
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "bench.json").read_text())
    assert data["throughput"]["fps"] > 0
    st = data["latency"]["stages_ms"]
    for k in ("engine", "postprocess", "e2e"):
        assert st[k]["p50"] <= st[k]["p90"] <= st[k]["p99"]
    # every frame published or counted as dropped (a loaded box may drop a few at the paced rate)
    c = data["latency"]["counters"]
    assert c["grabbed"] == 30 and c["published"] + sum(c["dropped"].values()) == 30 and c["published"] >= 15
    assert (out / "bench.png").stat().st_size > 10_000


def test_mt_class_auroc_ranks_each_class_against_the_normals(tmp_path):
    """benchmarks/mt_class_auroc.py on a tiny magnetic-tile layout with the shipped CLGAN bundle:
    one row per defect class, and the local-contrast reference finds a dark blob."""
    import sys

    import cv2
    import numpy as np

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mt_class_auroc import main

    rng = np.random.default_rng(0)
    for cat, n in (("MT_Blowhole", 2), ("MT_Crack", 2), ("MT_Free", 2)):
        d = tmp_path / "mt" / cat / "Imgs"
        d.mkdir(parents=True)
        for i in range(n):
            img = rng.integers(100, 140, (96, 128), dtype=np.uint8)
            mask = np.zeros_like(img)
            if cat == "MT_Blowhole":
                cv2.circle(mask, (40 + 20 * i, 50), 6, 255, -1)
            elif cat == "MT_Crack":
                cv2.line(mask, (10, 20 + 30 * i), (110, 30 + 30 * i), 255, 2)
            img[mask > 0] = 20
            cv2.imwrite(str(d / f"{cat}_{i}.jpg"), img)
            cv2.imwrite(str(d / f"{cat}_{i}.png"), mask)
    out = tmp_path / "res.json"
    assert main(["--bundle", str(ROOT / "deploy" / "models" / "clgan-mt"), "--data", str(tmp_path / "mt"),
                 "--split", "all", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["classes"]) == {"MT_Blowhole", "MT_Crack"} and res["normal_images"] == 2
    shares = [r["defect_pixel_share"] for r in res["classes"].values()]
    assert abs(sum(shares) - 1) < 1e-6
    for row in res["classes"].values():
        assert row["images"] == 2 and 0 <= row["pixel_auroc_model"] <= 1
        assert row["pixel_auroc_local_contrast"] > 0.9
    # a missing bundle is a clear error (exit 2), not a traceback
    assert main(["--bundle", str(tmp_path / "nope"), "--data", str(tmp_path / "mt"), "--split", "all"]) == 2


def test_arcd_residual_auroc_scores_d_r_and_the_reference_per_class(tmp_path):
    """benchmarks/arcd_residual_auroc.py on a tiny NEU-Seg layout with the shipped ARCD bundle:
    one row per defect class plus all defects, three scores each; the plain U-Net (no R) and a
    missing bundle are clear errors (exit 2)."""
    import sys

    from conftest import ROOT
    from test_arcd_neu import neu_folder

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from arcd_residual_auroc import main

    data = neu_folder(tmp_path / "neu", n=6, size=96)
    out = tmp_path / "res.json"
    assert main(["--bundle", str(ROOT / "deploy" / "models" / "arcd-neu"), "--data", str(data),
                 "--split", "all", "--stride", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 6
    assert list(res["classes"]) == ["inclusion", "patches", "scratches", "all defects"]
    assert res["classes"]["all defects"]["pixels"] == sum(
        r["pixels"] for k, r in res["classes"].items() if k != "all defects") == 6 * 10 * 32
    for row in res["classes"].values():
        for k in ("discriminator", "reconstruction_residual"):
            assert 0 <= row[f"pixel_auroc_{k}"] <= 1
        # a dark band on a flat background: the model-free reference finds it
        assert row["pixel_auroc_local_contrast"] > 0.9
    # --simulate: the bundle's own simulated anomalies, pasted into the background only
    assert main(["--bundle", str(ROOT / "deploy" / "models" / "arcd-neu"), "--data", str(data),
                 "--split", "all", "--simulate", "--out", str(out)]) == 0
    sim = json.loads(out.read_text())
    assert sim["simulated"] is True and list(sim["classes"]) == ["simulated"]
    row = sim["classes"]["simulated"]
    assert 0 < row["pixels"] < 6 * (96 * 96 - 10 * 32) and 0 <= row["pixel_auroc_reconstruction_residual"] <= 1
    assert main(["--bundle", str(ROOT / "deploy" / "models" / "unet-neu"), "--data", str(data),
                 "--split", "all"]) == 2
    assert main(["--bundle", str(tmp_path / "nope"), "--data", str(data), "--split", "all"]) == 2
    with pytest.raises(SystemExit):  # a stride of 0 is refused by name, not a numpy error
        main(["--bundle", str(ROOT / "deploy" / "models" / "arcd-neu"), "--data", str(data),
              "--stride", "0"])


def test_arcd_backbones_benchmark_writes_json_and_png(tmp_path):
    """benchmarks/arcd_backbones.py at tiny widths: one row per backbone and model (ARCD, D
    alone), each exported with parity and timed; an unknown backbone is refused by name."""
    pytest.importorskip("torch", reason="the backbone benchmark builds the networks in torch")
    pytest.importorskip("onnx", reason="the backbone benchmark exports to ONNX")
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from arcd_backbones import main

    out = tmp_path / "bb"
    assert main(["--out", str(out), "--iters", "2", "--steps", "1", "--warmup", "2", "--batch", "2",
                 "--crop", "64", "--tile", "64", "--d-width", "4", "--r-width", "2",
                 "--resnet-layers", "1", "1", "1", "1", "--threads", "1"]) == 0
    res = json.loads((out / "arcd-backbones.json").read_text())
    assert [(r["backbone"], r["model"]) for r in res["rows"]] == [
        (b, m) for b in ("unet", "segnet", "pspnet", "deeplabv3plus") for m in ("arcd", "plain")]
    for row in res["rows"]:
        assert row["parity_max_abs"] <= 1e-4 and row["onnx_mb"] > 0
        assert row["ort_tile_ms"]["p50"] <= row["ort_tile_ms"]["p90"] and row["ort_tile_ms"]["n"] == 2
        assert (row["r_parameters"] > 0) == (row["model"] == "arcd")
    assert (out / "arcd-backbones.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--backbones", "unet,fcn"])
    with pytest.raises(SystemExit):  # a tile the U-Net's stride (32) does not divide: usage error
        main(["--out", str(out), "--tile", "72", "--backbones", "unet"])


def test_bench_on_a_camera_runs_at_the_pace_asked_and_says_what_ran(tmp_path):
    # --fps was ignored for a GenICam source (the camera kept its own rate) but written into the
    # JSON as the pace of the latency figures
    from inspector.sources.genicam import default_viky_cti

    if default_viky_cti() is None:
        pytest.skip("viky.cti not found in the installed genicam package")
    import yaml

    from conftest import ROOT

    raw = yaml.safe_load((ROOT / "configs/viky.yaml").read_text())
    raw["source"].update(width=320, height=256, fps=20)
    raw["model"]["bundle"] = str(ROOT / "deploy/models/demo-arcd")
    p = write_config(tmp_path / "cam.yaml", raw)
    out = tmp_path / "bench"
    r = run_cli("bench", "--config", str(p), "--frames", "12", "--fps", "4", "--out", str(out), timeout=180)
    assert r.returncode == 0, r.stderr
    lat = json.loads((out / "bench.json").read_text())["latency"]
    assert lat["paced_fps"] == 4 and lat["frames_requested"] == 12
    assert lat["frames"] == lat["counters"]["published"]
    # the camera framed at 4/s, not its configured 20/s: 12 frames take at least 10 periods of
    # 0.25 s (one frame may wait in the camera's buffer), against 0.6 s at 20/s. Only a lower
    # bound on the time: a loaded machine makes the run slower, never faster.
    assert lat["wall_s"] >= 10 / 4, lat
    assert lat["counters"]["grabbed"] == 12
    assert lat["grabbed_fps"] == pytest.approx(12 / lat["wall_s"], abs=0.01), lat


def test_mt_class_auroc_splits_as_the_bundle_was_trained(tmp_path):
    """Its "test" set is evaluate's: the bundle's recorded fractions, not the defaults (which would
    put training images of a model trained with smaller shares into it)."""
    import shutil
    import sys

    import cv2
    import numpy as np
    import yaml

    from conftest import ROOT
    from inspector.evaluation.datasets import SplitFractions, magnetic_tile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mt_class_auroc import main

    bundle = tmp_path / "b"
    shutil.copytree(ROOT / "deploy" / "models" / "clgan-mt", bundle)
    meta = yaml.safe_load((bundle / "bundle.yaml").read_text())
    meta["provenance"]["split_fractions"] = {"test": 0.2, "val": 0.1}
    (bundle / "bundle.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    rng = np.random.default_rng(0)
    for cat, n in (("MT_Crack", 12), ("MT_Free", 40)):
        d = tmp_path / "mt" / cat / "Imgs"
        d.mkdir(parents=True)
        for i in range(n):
            img = rng.integers(100, 140, (64, 64), dtype=np.uint8)
            mask = np.zeros_like(img)
            if cat == "MT_Crack":
                mask[30:33, 5:60] = 255
            img[mask > 0] = 20
            cv2.imwrite(str(d / f"{cat}_{i}.jpg"), img)
            cv2.imwrite(str(d / f"{cat}_{i}.png"), mask)
    out = tmp_path / "res.json"
    assert main(["--bundle", str(bundle), "--data", str(tmp_path / "mt"), "--split", "test", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    trained = magnetic_tile(tmp_path / "mt", split="test", fractions=SplitFractions(0.2, 0.1))
    default = magnetic_tile(tmp_path / "mt", split="test")
    free = [e for e in trained.entries if e.category == "MT_Free"]
    assert len(free) != sum(e.category == "MT_Free" for e in default.entries)  # the case matters here
    assert res["normal_images"] == len(free) and res["split_fractions"] == {"test": 0.2, "val": 0.1}
