"""Prometheus metrics of one camera's daemon (``metrics:`` config section).

Histograms are fed per published frame (:meth:`Metrics.observe`, from the pipeline's report
callback); everything else is read from the pipeline, the alarm engine and the PLC workers when
Prometheus scrapes, so nothing is counted twice and the figures always agree with the headers.

========================================== ======= ==============================================
metric                                     type    labels
========================================== ======= ==============================================
inspector_stage_latency_seconds            hist.   camera, stage (queue, preprocess, engine, ...,
                                                   postprocess, encode, pipeline, e2e)
inspector_frames_grabbed_total             counter camera
inspector_frames_published_total           counter camera
inspector_frames_dropped_total             counter camera, reason
inspector_fps                              gauge   camera (over the status window)
inspector_defects_total                    counter camera, class
inspector_camera_up                        gauge   camera (1 = delivering, 0 = down/reopening)
inspector_camera_source_errors_total       counter camera
inspector_camera_reopens_total             counter camera
inspector_camera_skipped_frames_total      counter camera (frames the camera lost before the
                                                   grab: device frame id gaps; not in grabbed)
inspector_alarm_active                     gauge   camera, alarm
inspector_alarm_raised_total               counter camera, alarm
inspector_plc_connected                    gauge   camera, driver
inspector_plc_writes_total                 counter camera, driver
inspector_plc_errors_total                 counter camera, driver
inspector_plc_skipped_total                counter camera, driver (states dropped, PLC behind)
inspector_model_info                       gauge   camera, name, kind, sha256, backend (always 1)
inspector_reloads_total                    counter camera, result (ok, failed)
inspector_recorded_frames_total            counter camera, kind (defects, normal)   } with
inspector_record_skipped_total             counter camera, reason (queue_full,      } record.enabled
                                                   disk_low, write_error, shutdown)  }
inspector_recordings_bytes                 gauge   camera (the camera's recordings folder)   }
========================================== ======= ==============================================

prometheus-client is imported when metrics are enabled.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

if TYPE_CHECKING:  # the runtime imports these modules anyway; only the type checker needs them here
    from inspector.alarms import AlarmEngine, DriverWorker
    from inspector.pipeline import Pipeline

log = logging.getLogger(__name__)

DEFAULT_BUCKETS_MS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)


class MetricsConfig(BaseModel):
    """``metrics:`` section of a camera config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = False
    address: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 = all)")
    port: int = Field(9108, ge=0, le=65535, description="one port per camera; 0 = any free port")
    buckets_ms: list[float] = Field(default_factory=lambda: list(DEFAULT_BUCKETS_MS), min_length=1,
                                    description="latency histogram bucket bounds, ms")

    @field_validator("address")
    @classmethod
    def _address_is_a_name(cls, v: str, info: ValidationInfo) -> str:
        # the form only: a config load must not wait on DNS, nor refuse (exit 2: no restart) a
        # name that resolves once the network is up; `check` and the start resolve it
        problem = address_form_problem(v) if info.data.get("enabled") else None
        if problem:
            raise ValueError(problem)
        return v


_EXPECTED = "expected an IP address of this machine, e.g. 127.0.0.1, or 0.0.0.0 for all interfaces"


def address_form_problem(address: str) -> str | None:
    """Why ``address`` cannot be an interface to listen on, by its form alone (None: an IP
    address, or a well-formed host name)."""
    import ipaddress
    import re

    try:
        ipaddress.ip_address(address)
        return None
    except ValueError:
        pass
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    if len(address) <= 253 and re.fullmatch(rf"{label}(\.{label})*\.?", address):
        return None
    return f"{address!r} is neither an IP address nor a host name; {_EXPECTED}"


def address_problem(address: str) -> tuple[str, bool] | None:
    """Why ``address`` is no interface to listen on, and whether that lasts (a name DNS says does
    not exist) or may pass (no answer yet: a line PC started before its network); None: an IP
    address, or a name that resolves."""
    import socket

    form = address_form_problem(address)
    if form:
        return form, True
    try:
        socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        lasting = isinstance(e, socket.gaierror) and e.errno == socket.EAI_NONAME
        return (f"{address!r} does not resolve ({getattr(e, 'strerror', None) or e}); {_EXPECTED}",
                lasting)
    return None


class Metrics:
    """One registry per daemon (tests run several in one process)."""

    def __init__(self, cfg: MetricsConfig, camera_id: str, config_file: str | None = None):
        from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

        self.cfg = cfg
        self.camera = camera_id
        self.config_file = config_file  # named with the key when the port cannot be bound
        self.registry = CollectorRegistry()
        self.latency = Histogram("inspector_stage_latency_seconds", "per-stage latency of published frames",
                                 ["camera", "stage"], buckets=[b / 1000 for b in sorted(cfg.buckets_ms)],
                                 registry=self.registry)
        self.defects = Counter("inspector_defects", "defects found, by class", ["camera", "class"],
                               registry=self.registry)
        self.pipeline: Pipeline | None = None
        self.engine: AlarmEngine | None = None
        self.workers: list[DriverWorker] = []
        self.reloads = {"ok": 0, "failed": 0}
        self.registry.register(_Collector(self))
        # the daemon's own memory, open files and CPU: a leak on a line PC shows as a slope here
        # long before the box swaps (Linux only: elsewhere the collector reports nothing)
        ProcessCollector(registry=self.registry)
        self._httpd: Any = None

    def bind(self, pipeline: "Pipeline | None" = None, engine: "AlarmEngine | None" = None,
             workers: "list[DriverWorker] | None" = None) -> None:
        if pipeline is not None:
            self.pipeline = pipeline
        if engine is not None:
            self.engine = engine
        if workers is not None:
            self.workers = list(workers)

    def observe(self, header: dict) -> None:
        """Per published frame: stage latencies and defect counts."""
        cam = self.camera
        for stage, ms in (header.get("timings_ms") or {}).items():
            self.latency.labels(cam, stage).observe(ms / 1000.0)
        for d in header.get("defects") or ():
            self.defects.labels(cam, d.get("class", "?")).inc()

    def start(self) -> int:
        """Serve ``/metrics``; returns the port. Fails with the config key when it cannot bind."""
        from prometheus_client import start_http_server

        try:
            self._httpd, _ = start_http_server(self.cfg.port, self.cfg.address, registry=self.registry)
        except OSError as e:
            problem = address_problem(self.cfg.address)
            where = f"{self.config_file}: " if self.config_file else ""
            if problem and problem[1]:  # bad input, exit 2: no restart makes the name exist
                from inspector.errors import ConfigError
                raise ConfigError(self.config_file or "<memory>", "metrics.address", problem[0]) from None
            if problem:  # no answer from DNS yet: a runtime fault, which systemd retries
                raise OSError(f"{where}metrics.address: {problem[0]}") from e
            raise OSError(f"{where}metrics.port: cannot listen on {self.cfg.address}:{self.cfg.port}: "
                          f"{e.strerror or e}") from e
        port = self._httpd.server_address[1]
        log.info("metrics on http://%s:%d/metrics", self.cfg.address, port)
        return port

    @property
    def port(self) -> int | None:
        return self._httpd.server_address[1] if self._httpd is not None else None

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def text(self) -> str:
        from prometheus_client import generate_latest
        return generate_latest(self.registry).decode()


class _Collector:
    """Scrape-time values from the live objects."""

    def __init__(self, m: Metrics):
        self.m = m

    def describe(self) -> list:
        return []  # values appear only once bound; no duplicate-name checks needed

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m, cam = self.m, self.m.camera
        p = m.pipeline
        if p is not None:
            c = p.counters.snapshot()
            for name, value, doc in (("inspector_frames_grabbed", c["grabbed"], "frames taken from the source"),
                                     ("inspector_frames_published", c["published"], "frames published"),
                                     ("inspector_camera_source_errors", c["source_errors"],
                                      "failed reads (lost or timed-out camera)"),
                                     ("inspector_camera_reopens", c["reopens"], "successful camera reopens"),
                                     ("inspector_camera_skipped_frames", c["camera_skipped"],
                                      "frames the camera or its producer lost before the grab "
                                      "(device frame id gaps); not in grabbed")):
                f = CounterMetricFamily(name, doc, labels=["camera"])
                f.add_metric([cam], value)
                yield f
            f = CounterMetricFamily("inspector_frames_dropped", "frames dropped, by reason",
                                    labels=["camera", "reason"])
            for reason, n in c["dropped"].items():
                f.add_metric([cam, reason], n)
            yield f
            g = GaugeMetricFamily("inspector_fps", "frames per second over the status window", labels=["camera"])
            g.add_metric([cam], p.stats.summary()["fps"])
            yield g
            g = GaugeMetricFamily("inspector_camera_up", "1 while the camera delivers", labels=["camera"])
            g.add_metric([cam], 1.0 if p.camera_state == "ok" else 0.0)
            yield g
            r = p.recorder
            if r is not None:
                rs = r.snapshot()
                f = CounterMetricFamily("inspector_recorded_frames", "frames written by the recorder",
                                        labels=["camera", "kind"])
                for kind, n in rs["recorded"].items():
                    f.add_metric([cam, kind], n)
                yield f
                f = CounterMetricFamily("inspector_record_skipped", "frames the recorder wanted but did "
                                        "not write, by reason", labels=["camera", "reason"])
                for reason, n in rs["skipped"].items():
                    f.add_metric([cam, reason], n)
                yield f
                g = GaugeMetricFamily("inspector_recordings_bytes", "size of the camera's recordings",
                                      labels=["camera"])
                g.add_metric([cam], rs["bytes"])
                yield g
            model = p.model
            if model is not None:
                spec = model.bundle.spec
                g = GaugeMetricFamily("inspector_model_info", "the model running now",
                                      labels=["camera", "name", "kind", "sha256", "backend"])
                g.add_metric([cam, spec.name, spec.kind, spec.graphs["model"].sha256[:16], model.backend], 1.0)
                yield g
        e = m.engine
        if e is not None:
            g = GaugeMetricFamily("inspector_alarm_active", "1 while the alarm is on", labels=["camera", "alarm"])
            for name, on in e.active().items():
                g.add_metric([cam, name], 1.0 if on else 0.0)
            yield g
            f = CounterMetricFamily("inspector_alarm_raised", "times the alarm went on", labels=["camera", "alarm"])
            for name, n in e.raised_counts().items():
                f.add_metric([cam, name], n)
            yield f
        if m.workers:
            fams = {k: (CounterMetricFamily if k != "connected" else GaugeMetricFamily)(
                        f"inspector_plc_{k}", doc, labels=["camera", "driver"])
                    for k, doc in (("connected", "1 while the PLC link is up"),
                                   ("writes", "alarm states written"), ("errors", "failed connects and writes"),
                                   ("skipped", "alarm states dropped because the PLC was behind"))}
            for w in m.workers:
                fams["connected"].add_metric([cam, w.label], 1.0 if w.connected else 0.0)
                fams["writes"].add_metric([cam, w.label], w.writes)
                fams["errors"].add_metric([cam, w.label], w.errors)
                fams["skipped"].add_metric([cam, w.label], w.skipped)
            yield from fams.values()
        f = CounterMetricFamily("inspector_reloads", "SIGHUP reloads, by result", labels=["camera", "result"])
        for result, n in m.reloads.items():
            f.add_metric([cam, result], n)
        yield f
