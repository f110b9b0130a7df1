import json

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
    assert data["latency"]["counters"]["published"] == 30
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
