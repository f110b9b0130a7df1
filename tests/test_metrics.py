"""The Prometheus endpoint, scraped over real HTTP after a real pipeline run."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from inspector.alarms import AlarmEngine, make_drivers
from inspector.config import parse_config
from inspector.metrics import Metrics
from inspector.pipeline import Pipeline
from plc_servers import ModbusPlc, wait_for

prometheus_client = pytest.importorskip("prometheus_client")


def scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(samples: dict, metric: str, **labels) -> float:
    hits = [v for lab, v in samples[metric] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (metric, labels, samples.get(metric))
    return hits[0]


def test_endpoint_reports_stages_drops_alarms_camera_and_plc(synthetic_cfg):
    plc = ModbusPlc(n_classes=3).start()
    try:
        cfg = parse_config(synthetic_cfg(
            source={"defect_rate": 1.0}, pipeline={"queue_size": 1},
            metrics={"enabled": True, "port": 0},
            alarms={"rules": [{"name": "any_defect", "latch": True}],
                    "drivers": [plc.driver_cfg(heartbeat_s=0.1)]}), "t.yaml")
        engine = AlarmEngine(cfg.alarms, ["background", "inclusion", "patches", "scratches"], "t.yaml")
        workers = make_drivers(cfg, engine)
        m = Metrics(cfg.metrics, cfg.camera_id)

        def report(h):
            m.observe(h)
            engine.on_frame(h)
        with Pipeline(cfg, on_report=report) as p:
            m.bind(p, engine, workers)
            port = m.start()
            workers[0].start()
            real = p.model.adapter.infer

            def slow(img):  # an engine slower than the camera: queue_full drops to count
                import time
                time.sleep(0.01)
                return real(img)
            p.model.adapter.infer = slow
            c = p.run(frames=60)
            wait_for(lambda: workers[0].writes > 0, what="a PLC write")
            s = scrape(port)
        workers[0].stop()
        m.stop()
    finally:
        plc.stop()
    cam = {"camera": "test"}
    assert one(s, "inspector_frames_grabbed_total", **cam) == c["grabbed"] == 60
    assert one(s, "inspector_frames_published_total", **cam) == c["published"]
    assert one(s, "inspector_frames_dropped_total", reason="queue_full", **cam) == c["dropped"]["queue_full"] > 0
    assert one(s, "inspector_stage_latency_seconds_count", stage="engine", **cam) == c["published"]
    assert one(s, "inspector_stage_latency_seconds_count", stage="e2e", **cam) == c["published"]
    assert one(s, "inspector_stage_latency_seconds_sum", stage="engine", **cam) > 0
    total_defects = sum(v for lab, v in s["inspector_defects_total"])
    assert total_defects == engine.state().defects_total > 0
    assert one(s, "inspector_camera_up", **cam) == 1.0
    assert one(s, "inspector_alarm_active", alarm="any_defect", **cam) == 1.0
    assert one(s, "inspector_alarm_raised_total", alarm="any_defect", **cam) == 1.0
    assert one(s, "inspector_plc_connected", **cam) == 1.0
    assert one(s, "inspector_plc_writes_total", **cam) >= 1
    assert one(s, "inspector_model_info", name="toy", **cam) == 1.0
    assert one(s, "inspector_fps", **cam) > 0
    # the process's own figures, for watching a leak on a line PC (Linux /proc)
    assert one(s, "process_resident_memory_bytes") > 10e6
    assert one(s, "process_open_fds") > 3
    assert one(s, "process_cpu_seconds_total") > 0


def test_camera_down_shows_in_metrics(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(metrics={"enabled": True, "port": 0}), "t.yaml")
    m = Metrics(cfg.metrics, cfg.camera_id)
    with Pipeline(cfg) as p:
        m.bind(p)
        port = m.start()
        assert one(scrape(port), "inspector_camera_up", camera="test") == 1.0
        p.camera_state = "down"  # what Pipeline._read sets while it reopens a lost camera
        assert one(scrape(port), "inspector_camera_up", camera="test") == 0.0
    m.stop()


def test_port_in_use_names_the_key(synthetic_cfg):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = parse_config(synthetic_cfg(metrics={"enabled": True, "port": port}), "t.yaml")
        with pytest.raises(OSError, match=rf"metrics.port: cannot listen on 127.0.0.1:{port}"):
            Metrics(cfg.metrics, cfg.camera_id).start()


def test_recorder_figures_in_metrics_and_status(synthetic_cfg, tmp_path):
    from inspector.daemon import status_text

    cfg = parse_config(synthetic_cfg(source={"defect_rate": 1.0}, pipeline={"backpressure": True},
                                     metrics={"enabled": True, "port": 0},
                                     record={"enabled": True, "dir": str(tmp_path), "min_free_gb": 0}),
                       "t.yaml")
    m = Metrics(cfg.metrics, cfg.camera_id)
    with Pipeline(cfg) as p:
        m.bind(p)
        port = m.start()
        p.run(frames=6)
        p.recorder.close()  # what close() does at the stop: the queue written out
        s = scrape(port)
        rs = p.recorder.snapshot()
        status = status_text(p, None)
    m.stop()
    cam = {"camera": "test"}
    recorded = rs["recorded"]["defects"]
    assert recorded > 0
    assert one(s, "inspector_recorded_frames_total", kind="defects", **cam) == recorded
    assert one(s, "inspector_recorded_frames_total", kind="normal", **cam) == 0
    assert one(s, "inspector_record_skipped_total", reason="queue_full", **cam) == 0
    on_disk = sum(f.stat().st_size for f in (tmp_path / "test").rglob("*")
                  if f.is_file() and f.name != ".lock")
    assert one(s, "inspector_recordings_bytes", **cam) == on_disk > 0
    assert status.endswith(f"camera ok, recorded {recorded}")
