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
