"""The ``inspector`` console command.

Subcommands import what they need when they run, so ``inspector run`` on a line PC never imports
torch, and ``inspector train`` only fails (with a clear message) where torch is missing.

Exit codes: 0 done; 1 runtime failure (camera, engine); 2 bad input (config, bundle, arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from inspector import __version__
from inspector.argtypes import (finite_float_at_most, non_negative_int, positive_finite_float, positive_float,
                                positive_int)
from inspector.errors import (BindError, BundleError, ConfigError, EngineError, InspectorError, MissingPackageError,
                              SourceError)
from inspector.evaluation.options import onnx_opset, resize_size
from inspector.logs import set_level
from inspector.reload_state import request_reload, runtime_dir_from_env
from inspector.signals import relay_signals

log = logging.getLogger("inspector")

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
#: a command stopped by Ctrl-C or SIGTERM (128 + SIGINT; the trainers' export.training too)
EXIT_INTERRUPTED = 130


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    set_level(level)


def _fail(msg: str, code: int) -> int:
    print(f"inspector: error: {msg}", file=sys.stderr)
    return code


def _out_folder(path: str | None, option: str = "--out") -> Path | None:
    """Create an output folder before any work is done: one line naming the option, exit 2, when
    it cannot be (it was a bare errno, exit 1, after the whole run)."""
    from calibration.outputs import make_out_dir

    return None if path is None else make_out_dir(path, option)


def _load(path: str):
    from inspector.config import load_config
    return load_config(path)


def status_line(p) -> str:
    s = p.stats.summary()
    c = p.counters.snapshot()
    drops = sum(c["dropped"].values())
    why = ", ".join(f"{k} {v}" for k, v in c["dropped"].items() if v)
    lat = (f"p50 {s['p50_ms']:.1f} ms p99 {s['p99_ms']:.1f} ms" if s["p50_ms"] is not None
           else "p50 - p99 -")
    dpf = f"{s['defects_per_frame']:.2f}" if s["defects_per_frame"] is not None else "-"
    return (f"[{p.cfg.camera_id}] {s['fps']:5.1f} fps | latency {lat} | defects/frame {dpf} | "
            f"grabbed {c['grabbed']} published {c['published']} dropped {drops}"
            + (f" ({why})" if why else "") + f" | camera {p.camera_state}")


def cmd_run(args: argparse.Namespace) -> int:
    from inspector.pipeline import Pipeline

    cfg = _load(args.config)
    if args.log_level:
        set_level(args.log_level)
    if cfg.alarms.rules or cfg.alarms.drivers or cfg.metrics.enabled:
        log.warning("%s: alarms and metrics run under `inspector daemon`, not `inspector run`",
                    cfg.source_file)
    tty = sys.stderr.isatty()

    def tick(p) -> None:
        if args.quiet:
            return
        line = status_line(p)
        sys.stderr.write(("\r" + line + "\x1b[K") if tty else line + "\n")
        sys.stderr.flush()

    pipe = Pipeline(cfg)
    # Ctrl-C and SIGTERM drain, then exit 0
    relay_signals({signal.SIGINT: pipe.stop, signal.SIGTERM: pipe.stop})
    try:
        pipe.open()
        counters = pipe.run(frames=args.frames, seconds=args.seconds, tick=tick,
                            tick_s=cfg.status.interval_s)
    finally:
        pipe.close()
    if tty and not args.quiet:
        sys.stderr.write("\n")
    log.info("stopped: %s", json.dumps(counters))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    try:
        return _check(args)
    except InspectorError as e:
        if args.json:  # a script reading stdout gets the verdict too, not an empty line
            print(json.dumps({"config": args.config, "result": "error", "error": str(e)}))
        raise


def _check(args: argparse.Namespace) -> int:
    from inspector.pipeline import load_model
    from inspector.postprocess import Geometry
    from inspector.sources import make_source

    if args.user is not None and not args.user.strip():
        # `--user "$SVC_USER"` with the variable unset quietly skipped the check it asked for
        raise InspectorError("--user: empty; give the unit's User= (a user name or a numeric UID)")
    cfg = _load(args.config)
    unit_env = _take_unit_environment(args.config) if args.user else []
    as_user, hidden = _check_user(cfg, args.user) if args.user else (None, [])  # before root opens anything
    model = load_model(cfg)
    spec = model.bundle.spec
    _check_alarms(cfg, spec.classes)  # what `inspector daemon` refuses at start, exit 2
    warnings = (_check_endpoint(cfg) + _check_metrics_address(cfg) + hidden + _unfinished_training(model.bundle)
                + list(model.adapter.engine.warnings))
    if as_user is None and os.geteuid() == 0:
        warnings.append("checked as root, who can open every file: add --user <the unit's User=> "
                        "to check the service user's access")
    if args.no_source:
        return _check_report(args, _static_summary(cfg, model, warnings, as_user, unit_env))
    src = make_source(cfg.source, cfg.camera_id, cfg.base_dir, cfg.source_file)
    with src:
        frame, problem = None, "the source ended before its first frame"
        for _ in range(10):  # a replay may start with unreadable files; a camera may need a moment
            try:
                frame = src.read()
                break
            except InspectorError as e:
                problem = str(e)
        if frame is None:
            raise SourceError(f"source gave no frame: {problem}")
        fs = cfg.pipeline.frame
        if fs is not None:
            want = (fs.height, fs.width) if fs.channels == 1 else (fs.height, fs.width, 3)
            if frame.image.shape != want:
                raise ConfigError(cfg.source_file, "pipeline.frame", f"the source delivers "
                                  f"{list(frame.image.shape)} frames, not {list(want)}: the pipeline "
                                  "would drop every frame as bad_frame (fix it, or leave it out to take "
                                  "the first frame's shape)")
        out = model.adapter.infer(frame.image)  # first call also warms the engine up
        t0 = time.perf_counter()
        out = model.adapter.infer(frame.image)
        infer_ms = (time.perf_counter() - t0) * 1e3
        label = model.post.mask(out.probs, out.residual, out.score_map)
        defects, total = model.post.defects(label, out.score_map)
        # copied before the adapter gets its buffer back
        out_region = None if out.region is None else out.region.copy()
        if out.release:
            out.release()
        described = src.describe()  # while open: a camera reports what it runs at
    geometry = Geometry.of(cfg.geometry)
    warnings.extend(f"{cfg.source_file}: {line}" for line in geometry.overridden_by(frame.meta))
    used = geometry.for_frame(frame.meta)
    summary = {
        "config": cfg.source_file, "camera_id": cfg.camera_id,
        "source": described, "frame_shape": list(frame.image.shape),
        **_model_fields(model),
        "input": _check_input(model, frame.image.shape[:2]),
        **({"region": f"{spec.region.name} (threshold {spec.region.threshold:g}): "
                      f"{float((out_region >= spec.region.threshold).mean()):.1%} of this frame"}
           if spec.region is not None and out_region is not None else {}),
        "infer_ms": round(infer_ms, 1), "defects_in_frame": total,
        "geometry": _describe_geometry(used, geometry, frame.meta),
        **_output_fields(cfg, spec.classes, warnings, as_user, unit_env),
    }
    return _check_report(args, summary)


def _model_fields(model) -> dict:
    spec = model.bundle.spec
    return {"bundle": os.path.normpath(model.bundle.path), "model": f"{spec.name} ({spec.kind})",
            "classes": spec.classes, "engine": model.backend}


def _output_fields(cfg, classes: list[str], warnings: list[str], as_user: str | None,
                   unit_env: list[str]) -> dict:
    """The summary's end: where results go (stream, PLC, latch file, recorder), the warnings
    gathered (the recorder's check adds its own), and the verdict."""
    record = _check_record(cfg, classes, warnings, root_note=as_user is None)
    return {
        "publish": cfg.publish.endpoint,
        "alarms": f"{len(cfg.alarms.rules)} rule(s), {len(cfg.alarms.drivers)} PLC driver(s)" + _check_latch(cfg),
        "record": record,
        **({"user": as_user} if as_user else {}),
        **({"unit_environment": ", ".join(unit_env)} if unit_env else {}),
        "warnings": warnings, "result": "ok",
    }


def _static_summary(cfg, model, warnings: list[str], as_user: str | None, unit_env: list[str]) -> dict:
    """``check --no-source``: what the next start would refuse, without the camera (a running
    daemon holds it) and without a frame: the config, the model loaded on its engine, the alarm
    rules and PLC maps, the recorder and the latch file."""
    from inspector.postprocess import Geometry

    fs = cfg.pipeline.frame
    geometry = Geometry.of(cfg.geometry)
    return {
        "config": cfg.source_file, "camera_id": cfg.camera_id,
        "source": f"{cfg.source.type}: not opened (--no-source)",
        **_model_fields(model),
        **({"input": _check_input(model, (fs.height, fs.width))} if fs is not None else {}),
        "geometry": _describe_geometry(geometry, geometry, {}),
        **_output_fields(cfg, model.bundle.spec.classes, warnings, as_user, unit_env),
    }


def _check_report(args: argparse.Namespace, summary: dict) -> int:
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            for line in (v if k == "warnings" else [v]):
                print(f"{'warning' if k == 'warnings' else k:>16}: {line}")
    return EXIT_OK


def _describe_geometry(used, configured, meta: dict) -> str:
    """The pixel size areas and positions are measured with, and where it comes from."""
    def one(key: str) -> str:
        v = getattr(used, key)
        return "-" if v is None else f"{v:.4g}"
    if used.mm_per_px_across is None and used.mm_per_px_along is None:
        return "not set: areas in px only, no positions along the strip (rules in mm² cannot fire)"
    src = [k.split("_")[-1] for k in ("mm_per_px_across", "mm_per_px_along") if meta.get(k) is not None]
    whence = (f"{' and '.join(src)} from the source" if src else "from geometry")
    return f"{one('mm_per_px_across')} x {one('mm_per_px_along')} mm/px (across x along; {whence})"


def _unfinished_training(bundle) -> list[str]:
    """A warning when the bundle was exported from a run that had not finished (its provenance
    says so): stopped by a time limit as planned, or cut short before D saw a label."""
    prov = bundle.spec.provenance or {}
    if prov.get("training_complete") is not False:
        return []
    t, at = prov.get("training") or {}, prov.get("checkpoint_at") or {}
    # stopped_by is absent where the run recorded no reason (stopped before it wrote metrics.json)
    why = f"stopped by {t['stopped_by']}" if t.get("stopped_by") else "stopped, no reason recorded,"
    if t.get("iterations") is not None and t.get("planned_iterations"):
        where = f"{why} at iteration {t['iterations']} of {t['planned_iterations']}"
    elif at.get("stage") is not None:
        where = f"at stage {at['stage']} step {at.get('step')}"
    elif at.get("step") is not None:
        where = f"{why} at step {at['step']}" + (f" of {at['planned']}" if at.get("planned") else "")
    else:
        where = ""
    return [f"model.bundle: {os.path.normpath(bundle.path)} was exported from a training run that "
            f"had not finished{f' ({where})' if where else ''}: check its figures (`inspector "
            "evaluate`) before trusting it on the line"]


def _check_input(model, shape: tuple[int, ...]) -> str:
    """How the model sees a frame of ``shape``: tiled (how many) or squared (the thesis's way)."""
    inp = model.bundle.spec.input
    th, tw = inp.tile
    n = model.adapter.grid(*shape[:2]).count
    if getattr(inp, "fit", "tile") == "square_pad":
        return f"square_pad ({inp.pad_align}) to {th}x{tw}: {n} input per frame"
    return f"tiles {th}x{tw}, overlap {model.bundle.spec.tiling.overlap}: {n} per frame"


def _check_alarms(cfg, classes: list[str]) -> None:
    """Alarm rules against the model's classes and each PLC driver's package: the daemon's own
    start-up checks (without connecting), so `check` cannot pass a config the unit refuses."""
    from inspector.alarms import AlarmEngine, make_link

    if cfg.alarms.rules or cfg.alarms.drivers:
        AlarmEngine(cfg.alarms, classes, cfg.source_file)
    for i, d in enumerate(cfg.alarms.drivers):
        make_link(d, cfg.camera_id, cfg.source_file, i)


def _check_latch(cfg) -> str:
    """Where latched alarms are kept across a restart (said only when a rule latches); nothing is
    created here: a folder made by root would be one the service user cannot write."""
    from inspector.alarms.latch_store import STATE_ENV, latch_path, _where

    if not any(r.latch for r in cfg.alarms.rules):
        return ""
    path = latch_path(cfg.alarms.latch_file, cfg.camera_id, cfg.base_dir)
    if path is None:
        return (f"; latched alarms NOT kept across a restart when run like this (no alarms.latch_file, "
                f"{STATE_ENV} unset; the unit sets it: --user reads it from the installed unit)")
    if path.is_dir():  # the daemon refuses it at start (exit 2)
        raise ConfigError(cfg.source_file, _where(cfg.alarms.latch_file), f"{path} is a folder: name a "
                          f"file in it, such as {path / (cfg.camera_id + '.json')}")
    return f"; latched alarms kept in {path}"


#: the unit's environment a `check --user` takes where the shell does not set it: the paths the
#: service's defaults come from (recordings, latched alarms)
UNIT_ENV_KEYS = ("INSPECTOR_STATE", "INSPECTOR_RECORDINGS", "INSPECTOR_ENGINE_CACHE")
#: where install.sh puts the unit (UNITDIR); INSPECTOR_UNIT names another
DEFAULT_UNIT = "/etc/systemd/system/inspector@.service"


#: systemd's specifiers for a system unit that a path in Environment= may use (systemd.unit(5));
#: %i and the unit names are filled in from the camera
_SYSTEM_SPECIFIERS = {"%": "%", "S": "/var/lib", "C": "/var/cache", "L": "/var/log", "t": "/run",
                      "T": "/tmp", "V": "/var/tmp", "p": "inspector", "P": "inspector"}


#: where systemd looks for a system unit's drop-ins, highest priority first (systemd.unit(5))
_SYSTEM_UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                     "/usr/lib/systemd/system")


def _unit_files(unit: Path, instance: str | None) -> list[Path]:
    """The unit file, then its drop-ins as systemd orders them: the ``*.conf`` of the camera's
    own ``inspector@<instance>.service.d``, the template's ``inspector@.service.d`` and the
    ``service.d`` of every service, in each unit folder (the installed unit's, and for the
    default unit systemd's other folders), sorted together by file name, a name in a folder of
    higher priority hiding the others of that name."""
    roots = [unit.parent]
    if "INSPECTOR_UNIT" not in os.environ:
        roots += [Path(d) for d in _SYSTEM_UNIT_DIRS if Path(d) != unit.parent]
    names = ([unit.name.replace("@.", f"@{instance}.")] if instance else []) + [unit.name]
    by_name: dict[str, Path] = {}
    for root in roots:
        for d in [root / f"{n}.d" for n in names] + [root / "service.d"]:
            for f in (sorted(d.glob("*.conf")) if d.is_dir() else []):
                by_name.setdefault(f.name, f)
    return [unit] + [by_name[n] for n in sorted(by_name)]


def _unescape_instance(instance: str) -> str:
    """``%I``: systemd's unescaping of an instance name ("-" is "/", ``\\xNN`` a byte)."""
    out = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), instance.replace("-", "/"))
    return out


def _expand_specifiers(value: str, instance: str | None) -> str | None:
    """``value`` with systemd's specifiers filled in; None when it uses one not known here."""
    spec = dict(_SYSTEM_SPECIFIERS)
    if instance:
        spec.update({"i": instance, "I": _unescape_instance(instance),
                     "n": f"inspector@{instance}.service", "N": f"inspector@{instance}"})
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        key = value[i + 1:i + 2]
        if key not in spec:
            return None
        out.append(spec[key])
        i += 2
    return "".join(out)


def _assignments(words: list[str], instance: str | None, where: Path, env: dict[str, str]) -> None:
    """``KEY=value`` words into ``env``, specifiers filled in; one with a specifier this check
    does not know is skipped, as systemd skips an assignment it cannot resolve."""
    for w in words:
        key, eq, val = w.partition("=")
        if not eq:
            continue
        expanded = _expand_specifiers(val, instance)
        if expanded is None:
            if key in UNIT_ENV_KEYS:
                log.warning("check --user: %s: %s=%s uses a specifier this check does not know; "
                            "set %s in the shell to check that folder", where, key, val, key)
            continue
        env[key] = expanded


def _environment_file(spec: str, instance: str | None, where: Path) -> tuple[dict[str, str], Path | None]:
    """The variables of one ``EnvironmentFile=`` (``-`` in front: a missing file is no error)."""
    import shlex

    optional = spec.startswith("-")
    name = _expand_specifiers(spec.lstrip("-"), instance)
    env: dict[str, str] = {}
    if name is None:
        return env, None
    path = Path(name)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        if not optional:
            log.warning("check --user: %s: EnvironmentFile=%s cannot be read (%s): systemd would not "
                        "start the service", where, spec, e.strerror or e)
        return env, None
    for line in lines:
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        for w in words:  # the file's values are taken as they are: no specifiers there
            key, eq, val = w.partition("=")
            if eq:
                env[key] = val
    return env, path


def _unit_environment(config: str | None = None) -> tuple[dict[str, str], list[Path]]:
    """What the installed unit sets of the paths the service's defaults come from
    (:data:`UNIT_ENV_KEYS`), and the files read. The unit file, then its drop-ins
    (:func:`_unit_files`), as systemd reads them: the ``[Service]`` section only, quoted and
    several assignments per line, the last one winning, an empty ``Environment=`` clearing what
    came before, specifiers (``%S``, ``%i``, ``%%``, ...) filled in, and the files
    ``EnvironmentFile=`` names read last, over ``Environment=``."""
    import shlex

    unit = Path(os.environ.get("INSPECTOR_UNIT", DEFAULT_UNIT))
    instance = Path(config).stem if config else None
    env: dict[str, str] = {}
    env_files: list[tuple[str, Path]] = []
    read = []
    for f in _unit_files(unit, instance):
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        read.append(f)
        section = ""
        for line in lines:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
                continue
            if section != "[Service]":
                continue
            if line.startswith("EnvironmentFile="):
                value = line[len("EnvironmentFile="):].strip()
                if value:
                    env_files.append((value, f))
                else:
                    env_files.clear()
                continue
            if not line.startswith("Environment="):
                continue
            value = line[len("Environment="):]
            if not value.strip():
                env.clear()  # systemd: an empty assignment resets the list
                continue
            try:
                words = shlex.split(value)
            except ValueError:
                continue  # unbalanced quotes: systemd refuses the line as well
            _assignments(words, instance, f, env)
    for spec, where in env_files:
        more, path = _environment_file(spec, instance, where)
        env.update(more)
        if path is not None:
            read.append(path)
    return {k: env[k] for k in UNIT_ENV_KEYS if k in env}, read


def _take_unit_environment(config: str | None) -> list[str]:
    """``check --user`` asks as the service: take the installed unit's paths (see
    :func:`_unit_environment`) that this shell does not set (a root shell has none of them), so
    the defaults resolve as under the unit; a one-shot command, so into ``os.environ``. Returns
    what was taken, for the summary."""
    env, read = _unit_environment(config)
    taken = []
    for key, val in env.items():
        if key not in os.environ:
            os.environ[key] = val
            taken.append(f"{key}={val}")
    if taken:
        log.info("check --user: from %s: %s", ", ".join(str(f) for f in read), ", ".join(taken))
    return taken


def _check_user(cfg, user: str) -> tuple[str, list[str]]:
    """The daemon's file access asked as ``user`` (the unit's ``User=``): see inspector.access_check."""
    from inspector.access_check import check_as_user
    from inspector.recorder import recordings_root

    record_root = recordings_root(cfg.record, cfg.camera_id, cfg.base_dir) if cfg.record.enabled else None
    return check_as_user(cfg, user, record_root)


def _check_record(cfg, classes: list[str], warnings: list[str], root_note: bool = True) -> str:
    """The recorder's start-up checks (folder writable, classes known): what it would record; a
    folder another running recorder holds (the daemon would refuse to start) goes to ``warnings``."""
    if not cfg.record.enabled:
        return "off"
    from inspector.recorder import describe, preflight

    # nothing is created: a folder made here by root would be one the service user cannot write
    root, notes = preflight(cfg.record, cfg.camera_id, classes, cfg.base_dir, cfg.source_file,
                            root_note=root_note)
    state = "" if root.is_dir() else ", created at the daemon's start"
    held = [n for n in notes if n.startswith("a running recorder holds")]
    warnings += [f"record.dir: {n}: a second daemon of this camera_id would exit 2 (if it is this "
                 "camera's own daemon, running while its config is checked, all is well)" for n in held]
    return f"{describe(cfg.record)} into {root}{state}" + "".join(f"; {n}" for n in notes if n not in held)


def _check_metrics_address(cfg) -> list[str]:
    """``metrics.address`` resolved as the daemon's start will: a name DNS says does not exist is
    bad config (exit 2), one DNS does not answer for yet a warning (the daemon retries)."""
    from inspector.metrics import address_problem

    problem = address_problem(cfg.metrics.address) if cfg.metrics.enabled else None
    if problem is None:
        return []
    if problem[1]:
        raise ConfigError(cfg.source_file, "metrics.address", problem[0])
    return [f"metrics.address: {problem[0]}; the daemon exits 1 and is restarted until it resolves"]


def _check_endpoint(cfg) -> list[str]:
    """A tcp publish endpoint another process holds (a warning: it may be this camera's own
    daemon, running while its config is checked)."""
    import zmq

    if not cfg.publish.endpoint.startswith("tcp://"):
        return []
    sock = zmq.Context.instance().socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(cfg.publish.endpoint)
    except zmq.ZMQError as e:
        held = (": another process holds it (this camera's daemon, already running?)"
                if e.errno == zmq.EADDRINUSE else "")
        return [f"publish.endpoint {cfg.publish.endpoint}: cannot bind now ({e}){held}; "
                "`run` and `daemon` would exit 1"]
    finally:
        sock.close()
    return []


#: how long `subscribe` without --timeout waits before saying, once, that nothing has come
SUBSCRIBE_HINT_S = 5.0
#: the longest --timeout (subscribe, reload): ZeroMQ polls in whole milliseconds of a C int
SUBSCRIBE_MAX_TIMEOUT_S = 1e6
#: the longest `alarms test --hold`: the drivers put the clear time on the clock
ALARM_TEST_MAX_HOLD_S = 86400.0


def _why_unwritable(folder: Path) -> str:
    """The errno text of a failed write into ``folder`` (cv2.imwrite only says False)."""
    import tempfile
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".inspector-subscribe-"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return "the PNG encoder failed, or the disk is full"


def cmd_subscribe(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from inspector.publish import Subscriber

    save = Path(args.save_masks) if args.save_masks else None
    m = re.match(r"^tcp://.*:(\d+)$", args.endpoint)
    if m and not 1 <= int(m.group(1)) <= 65535:  # ZeroMQ would connect and wait for ever
        return _fail(f"--endpoint {args.endpoint}: port {m.group(1)} is out of range 1-65535", EXIT_BAD_INPUT)
    if save:
        if save.exists() and not save.is_dir():
            return _fail(f"--save-masks {save}: cannot create the folder (it is a file, not a folder)",
                         EXIT_BAD_INPUT)
        try:
            save.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return _fail(f"--save-masks {save}: cannot create the folder ({e.strerror or e})", EXIT_BAD_INPUT)
        try:  # found now, not at the first mask after a long wait
            import tempfile
            with tempfile.TemporaryFile(dir=save, prefix=".inspector-subscribe-"):
                pass
        except OSError as e:
            return _fail(f"--save-masks {save}: cannot write into the folder ({e.strerror or e})",
                         EXIT_BAD_INPUT)
    try:
        sub = Subscriber(args.endpoint, args.topic)
    except ValueError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    n = 0
    hinted = False
    try:
        while args.count is None or n < args.count:
            # without --timeout it waits for ever, as a subscriber may; but a silent wait on a
            # wrong port or topic looks like a hang, so say once what it waits for
            first_wait = args.timeout is None and n == 0 and not hinted
            try:
                msg = sub.recv(timeout_s=SUBSCRIBE_HINT_S if first_wait else args.timeout)
                if msg is None and first_wait:
                    hinted = True
                    print(f"inspector subscribe: nothing from {args.endpoint}"
                          + (f" on topic prefix {args.topic!r}" if args.topic else "")
                          + f" after {SUBSCRIBE_HINT_S:g} s; still waiting (Ctrl-C stops; --timeout S "
                          "gives up)", file=sys.stderr, flush=True)
                    continue
                if msg is not None:
                    h = msg.header
                    mask = msg.mask() if save else None
                    region = msg.region() if save else None
            except (ValueError, KeyError) as e:  # not an inspector.defects/1 publisher
                return _fail(f"{args.endpoint}: message {n + 1} is not an inspector defect message "
                             f"({e}); {n} received", EXIT_FAIL)
            if msg is None:
                return _fail(f"no message from {args.endpoint}"
                             + (f" on topic prefix {args.topic!r}" if args.topic else "")
                             + f" within {args.timeout}s ({n} received; nothing listening there, "
                             "another topic, or not an inspector publisher)", EXIT_FAIL)
            n += 1
            if save:
                name = save / f"{h['camera_id']}_{h['frame_id']:08d}.png"
                if not cv2.imwrite(str(name), mask):
                    return _fail(f"--save-masks: could not write {name} ({_why_unwritable(save)}); "
                                 f"{n} received", EXIT_FAIL)
                if region is not None:
                    # 0/255, viewable as is (the recorder's regions/ PNGs are the same)
                    name = save / f"{h['camera_id']}_{h['frame_id']:08d}_region.png"
                    if not cv2.imwrite(str(name), region * np.uint8(255)):
                        return _fail(f"--save-masks: could not write {name} ({_why_unwritable(save)}); "
                                     f"{n} received", EXIT_FAIL)
            if args.json:
                print(json.dumps(h), flush=True)
            else:
                print(f"{h['camera_id']} frame {h['frame_id']} at {h['strip_pos_mm']:.0f} mm: "
                      f"{len(h['defects'])} defect(s), e2e {h['timings_ms'].get('e2e', 0):.1f} ms",
                      flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    return EXIT_OK


def _remove_empty_folders(made: Path | None, top: Path) -> None:
    """Remove the folder ``made`` for a command's output, and the parents made with it up to
    ``top`` (which existed before), where each is still empty."""
    p = made
    while p is not None and p != top and top in p.parents:
        try:
            p.rmdir()
        except OSError:
            return
        p = p.parent


def cmd_bench(args: argparse.Namespace) -> int:
    from inspector.bench import run_bench
    from inspector.errors import SourceConfigError

    from inspector.fileio import nearest_existing

    cfg = _load(args.config)
    want = Path(args.out)
    if want.exists() and not want.is_dir():
        return _fail(f"--out {want}: cannot create the folder (it is a file, not a folder)", EXIT_BAD_INPUT)
    made = None if want.exists() else want.absolute()  # removed again if the run writes nothing
    top = nearest_existing(want.absolute())
    out = _out_folder(args.out)
    assert out is not None
    try:
        result = run_bench(cfg, frames=args.frames, out_dir=out, fps=args.fps,
                           throughput_frames=args.throughput_frames)
    except SourceConfigError as e:
        _remove_empty_folders(made, top)
        if args.fps is None or e.key != "source.fps" or cfg.source.type != "genicam":
            raise
        # --fps replaced the config's source.fps as the camera's AcquisitionFrameRate: the value
        # refused is the option's, and the file does not hold it
        return _fail(f"--fps: {e.problem}", EXIT_BAD_INPUT)
    except BaseException:
        _remove_empty_folders(made, top)  # a bundle or source that fails left an empty --out
        raise
    print(json.dumps(result["summary"], indent=2))
    return EXIT_OK


def _runtime_dir_problem(folder: Path | None, write: bool) -> str | None:
    """Why ``--runtime-dir`` cannot hold (``write``) or give (not ``write``) the reload record;
    None when it can. One line naming the option: a daemon that only warned ran on, and every
    `inspector reload` (the unit's ExecReload=) then failed with "no reload record"."""
    if folder is None:
        return None
    env = runtime_dir_from_env()
    option = "--runtime-dir" + (" (RUNTIME_DIRECTORY)" if env is not None and env == folder else "")
    if folder.exists() and not folder.is_dir():
        return f"{option} {folder}: is not a folder"
    if not write:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{option} {folder}: cannot create the folder ({e.strerror or e})"
    try:
        import tempfile
        with tempfile.TemporaryFile(dir=folder, prefix=".inspector-daemon-"):
            pass
    except OSError as e:
        return f"{option} {folder}: cannot write the reload record there ({e.strerror or e})"
    return None


def cmd_daemon(args: argparse.Namespace) -> int:
    from inspector.daemon import Daemon, setup_logging

    problem = _runtime_dir_problem(args.runtime_dir, write=True)
    if problem:
        return _fail(problem, EXIT_BAD_INPUT)
    journal = {"auto": None, "journal": True, "text": False}[args.log_format]
    setup_logging(args.log_level or "INFO", journal)
    daemon = Daemon(args.config, runtime_dir=args.runtime_dir)
    daemon.log_level_override = args.log_level
    set_level(args.log_level or daemon.cfg.log_level)
    try:
        return daemon.run()
    finally:
        daemon.notifier.close()  # else a ResourceWarning for it lands in the journal at exit


def cmd_reload(args: argparse.Namespace) -> int:
    if args.runtime_dir is None:
        return _fail("--runtime-dir is needed outside systemd (under the unit, RUNTIME_DIRECTORY "
                     "names it)", EXIT_BAD_INPUT)
    problem = _runtime_dir_problem(args.runtime_dir, write=False)
    if problem:
        return _fail(problem, EXIT_BAD_INPUT)
    try:
        record = request_reload(args.pid, args.runtime_dir, args.timeout)
    except InspectorError as e:
        return _fail(str(e), EXIT_FAIL)
    if not record.ok:
        return _fail(record.message, EXIT_FAIL)
    print(record.message, flush=True)
    return EXIT_OK


def cmd_alarms(args: argparse.Namespace) -> int:
    from inspector.alarms.commission import run_alarm_test
    from inspector.signals import sigterm_as_interrupt

    cfg = _load(args.config)
    try:
        # SIGTERM as Ctrl-C: the test's restore write runs either way (its lines say whether)
        with sigterm_as_interrupt():
            failed = run_alarm_test(cfg, hold_s=args.hold, out=lambda line: print(line, flush=True))
    except KeyboardInterrupt as e:
        # 130, as the training commands stopped the same way
        return _fail(f"alarms test stopped ({str(e) or 'Ctrl-C'}); a map it had written to was "
                     "restored, unless a line above says not", 130)
    return EXIT_FAIL if failed else EXIT_OK


def _needs_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InspectorError("this command needs the training extra (torch): "
                             "pip install -e '.[train]'  (torch==2.13.0 for the CPU build)") from None


def _stoppable(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a training-type command so that Ctrl-C and SIGTERM (kill, timeout, systemd) stop it
    after its trainer saved a checkpoint: one line, exit 130, instead of a traceback."""
    from export.training import TrainingStopped, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            return command(args)
    except TrainingStopped as e:  # the trainer says what it saved (ARCD)
        return _fail(f"stopped ({e.reason}); {e.saved}", EXIT_INTERRUPTED)
    except KeyboardInterrupt as e:
        return _fail(f"stopped ({str(e) or 'Ctrl-C'}); the trainer's log says which checkpoint it saved, "
                     "if any (its 'checkpoint saved' / 'checkpoint at N' lines); continue with --resume",
                     EXIT_INTERRUPTED)


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume and not args.run_dir:  # it used to train a new run in runs/<name>-<time>
        return _fail("--resume needs --run-dir", EXIT_BAD_INPUT)
    if args.kind == "arcd" and args.max_iters:  # it was ignored: the whole schedule ran
        return _fail("--max-iters: clgan and fuzzymask only; ARCD's steps are the config's "
                     "stage1.steps and stage2.steps", EXIT_BAD_INPUT)
    _needs_torch()
    try:
        return _stoppable(_train, args)
    except (FileNotFoundError, FileExistsError) as e:
        # a data root or run folder the user named; a --run-dir that holds a run already
        return _fail(str(e), EXIT_BAD_INPUT)


def _train(args: argparse.Namespace) -> int:
    if args.kind == "arcd":
        from export.arcd.train import train
        run_dir = train(Path(args.config), Path(args.run_dir) if args.run_dir else None, args.resume)
        print(run_dir)
        return EXIT_OK
    if args.kind == "clgan":
        from export.clgan.train import train as train_clgan
        run_dir = train_clgan(Path(args.config), Path(args.run_dir) if args.run_dir else None,
                              args.resume, getattr(args, "max_iters", None))
        print(run_dir)
        return EXIT_OK
    if args.kind == "fuzzymask":
        from export.fuzzymask.train import train as train_fuzzymask
        run_dir = train_fuzzymask(Path(args.config), Path(args.run_dir) if args.run_dir else None,
                                  args.resume, getattr(args, "max_iters", None))
        print(run_dir)
        return EXIT_OK
    return _fail(f"unknown model kind {args.kind}", EXIT_BAD_INPUT)


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "tensorrt":  # runtime only: TensorRT and pycuda, no torch
        return _export_tensorrt(args)
    if not (args.run_dir and args.out):
        return _fail("export onnx needs --run-dir and --out", EXIT_BAD_INPUT)
    held = Path(args.out) / "bundle.yaml"
    if args.format == "onnx" and held.is_file() and not args.replace:
        # a shipped or evaluated bundle (its recorded evaluation, calibrated post-processing) is
        # not overwritten by a mistyped --out
        return _fail(f"--out {args.out}: holds a model bundle already ({held}); pass --replace to "
                     "overwrite it, or export into a new folder", EXIT_BAD_INPUT)
    _needs_torch()
    if args.format == "onnx":
        from export.onnx_export import ExportParityError
        from inspector.signals import sigterm_as_interrupt

        if Path(args.out).exists() and not Path(args.out).is_dir():
            return _fail(f"--out {args.out}: is a file, not a folder (a bundle is a folder)", EXIT_BAD_INPUT)
        from export.augment.cli_common import writable_place
        try:  # under a file, or in /proc: it was a bare errno (exit 1), after the checkpoint was read
            writable_place(Path(args.out), "--out")
        except ValueError as e:
            return _fail(str(e), EXIT_BAD_INPUT)
        from inspector.bundle import export_left, folder_state

        before = folder_state(Path(args.out))
        try:
            with sigterm_as_interrupt():
                print(_export_onnx(args))
        except KeyboardInterrupt as e:
            return _fail(f"export stopped ({str(e) or 'Ctrl-C'}); {export_left(Path(args.out), before)}",
                         EXIT_INTERRUPTED)
        except ExportParityError as e:  # the message names the graph, the output and the tolerance
            return _fail(f"{e} (--parity-tol loosens the check, recorded in the bundle)", EXIT_BAD_INPUT)
        except FileNotFoundError as e:  # the run folder or its checkpoint
            return _fail(str(e), EXIT_BAD_INPUT)
        return EXIT_OK
    return _fail(f"unknown export format {args.format}", EXIT_BAD_INPUT)


def _export_onnx(args: argparse.Namespace) -> Path:
    """The run's kind (its checkpoint, else config.yaml) picks the exporter; --parity-tol, when given, replaces
    that exporter's own tolerance (``atol`` of every kind's export_bundle)."""
    run, out = Path(args.run_dir), Path(args.out)
    tol = {} if args.parity_tol is None else {"atol": args.parity_tol}
    from export.training import run_kind
    kind = run_kind(run)
    if kind == "fuzzymask":
        from export.fuzzymask.export import export_bundle as export_fuzzymask
        return export_fuzzymask(run, out, name=args.name, opset=args.opset, **tol)
    if kind == "clgan":
        from export.clgan.export import export_bundle as export_clgan
        return export_clgan(run, out, name=args.name, opset=args.opset, **tol)
    from export.onnx_export import export_bundle
    return export_bundle(run, out, name=args.name, opset=args.opset,
                         allow_stale_metrics=args.allow_stale_metrics, **tol)


#: modules that register ``inspector augment <generator> ...`` (argparse only at import; each
#: defines ``add_commands(subparsers)`` and sets ``augment_fn`` on its commands). A generator adds
#: its module here.
AUGMENT_GENERATORS: tuple[str, ...] = ("export.augment.defectgan.cli",
                                       "export.augment.anomalyalign.cli",
                                       "export.augment.measure_cli")


def _add_augment_commands(sub: argparse._SubParsersAction) -> None:
    import importlib

    p = sub.add_parser("augment", help="offline defect synthesis: train a generator, write "
                                       "synthetic NEU-Seg pairs (train extra)")
    gsub = p.add_subparsers(dest="generator", required=True)
    for name in AUGMENT_GENERATORS:
        try:
            importlib.import_module(name).add_commands(gsub)
        except ModuleNotFoundError as e:  # a runtime install without the export/ tree
            log.debug("augment generator %s not available: %s", name, e)
    p.set_defaults(fn=cmd_augment)


def cmd_augment(args: argparse.Namespace) -> int:
    _needs_torch()
    try:
        return _stoppable(args.augment_fn, args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # messages name the argument/file
        return _fail(str(e), EXIT_BAD_INPUT)


def _export_tensorrt(args: argparse.Namespace) -> int:
    from inspector.engines.tensorrt import TensorRTConfig, export_engine
    from inspector.engines.trt_build import parse_shapes

    if args.config:
        cfg = _load(args.config)
        eng = cfg.model.engine
        if not isinstance(eng, TensorRTConfig):
            raise ConfigError(cfg.source_file, "model.engine.type", "export tensorrt needs an "
                              f"engine of type tensorrt (this config's is {eng.type})")
        bundle = cfg.resolve(cfg.model.bundle)
        if eng.calib_dir and not Path(eng.calib_dir).is_absolute():
            # the config's paths resolve against the config file; the engine's against the bundle
            eng = eng.model_copy(update={"calib_dir": str(cfg.resolve(eng.calib_dir).resolve())})
    else:
        if not (args.bundle and args.precision):
            return _fail("export tensorrt needs --bundle and --precision (or --config)", EXIT_BAD_INPUT)
        bundle = Path(args.bundle)
        try:
            profiles = parse_shapes(args.shapes)
        except ValueError as e:
            return _fail(f"--shapes: {e}", EXIT_BAD_INPUT)
        first = profiles[0]
        from pydantic import ValidationError
        try:
            eng = TensorRTConfig(precision=args.precision, device_id=args.device,
                                 workspace_mb=args.workspace_mb, min_batch=first.min,
                                 opt_batch=first.opt, max_batch=first.max,
                                 extra_profiles=[str(p) for p in profiles[1:]],
                                 cache_dir=str(Path(args.cache_dir).resolve()) if args.cache_dir else None,
                                 calib_dir=str(Path(args.calib).resolve()) if args.calib else None)
        except ValidationError as e:
            err = e.errors()[0]
            key = {"calib_dir": "--calib"}.get(str(err["loc"][-1]), f"--{err['loc'][-1]}")
            return _fail(f"{key}: {err['msg'].removeprefix('Value error, ')}", EXIT_BAD_INPUT)
    result = export_engine(bundle, eng)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>10}: {v}" for k, v in result.items()))
    return EXIT_OK


def _bundle_split(bundle_dir: str | Path, prov: dict):
    """The hash-split fractions the bundle's model was trained with (``inspector.evaluation.
    datasets.trained_split``), said when they are not the defaults: splitting with other
    fractions than training did would score images the model was trained on."""
    from inspector.evaluation.datasets import DEFAULT_SPLIT, trained_split

    fr = trained_split(prov)
    if fr != DEFAULT_SPLIT:
        log.warning("splitting --data with the fractions %s was trained with: test %g, val %g",
                    bundle_dir, fr.test, fr.val)
    return fr


def _data_args(args: argparse.Namespace):
    """The data set named by --data/--format/--split (and --categories) of evaluate/calibrate,
    split with the fractions the bundle's model was trained with."""
    from inspector.evaluation.datasets import DEFAULT_SPLIT, open_dataset

    kw = {}
    if args.categories:
        kw["categories" if args.format == "magnetic-tile" else "subsets"] = args.categories.split(",")
    from inspector.bundle import load_bundle

    prov = load_bundle(args.bundle, verify=False).spec.provenance or {}
    fractions = _bundle_split(args.bundle, prov) if args.split != "all" else DEFAULT_SPLIT
    ds = open_dataset(args.format, Path(args.data), split=args.split, fractions=fractions, **kw)
    note = _trained_on_note(prov, args.split, ds.split_by, args.format)
    if note:
        log.warning("%s", note)
        ds.notes.append(note)
    return ds


def _trained_on_note(prov: dict, split: str, split_by: str, fmt: str | None = None) -> str | None:
    """A warning where the split asked for is one the bundle's model was trained on (ARCD trains
    on the hash ``train`` + ``test`` shares; ``test`` is meant to be the data set's own test
    folder): on a root without that folder, ``--split test`` scored training images, silently."""
    data = (prov.get("training_config") or {}).get("data") or {}
    trained = data.get("train_splits") if isinstance(data, dict) else None
    if not trained or split_by != "hash" or (split != "all" and split not in trained):
        return None
    if fmt and data.get("source") not in (None, fmt):  # another data set's layout: not its training data
        return None
    shares = list(trained)
    what = ("holds the hash share(s)" if split == "all" else "is the hash share" if shares == [split]
            else "is one of the hash shares")
    return (f"split {split!r} {what} {shares} this model "
            f"was trained on (provenance.training_config.data.train_splits) if --data is its training data "
            f"({data.get('root')}): those figures are on training images, not held-out ones")


def _overrides(pairs: list[str] | None) -> dict:
    import yaml

    out = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. k1=3.5")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _split_overrides(pairs: list[str] | None) -> tuple[dict, dict]:
    """``--set`` pairs -> (post-processing keys, the rest: the bundle's ``kind_params``, which
    the model kind validates and names in its error)."""
    from inspector.postprocess import PostprocessConfig

    post, kind = {}, {}
    for key, value in _overrides(pairs).items():
        (post if key in PostprocessConfig.model_fields else kind)[key] = value
    return post, kind


def _evaluation_engine(args: argparse.Namespace):
    """(bundle, torch engine) for ``--engine torch``; None for the runtime's ONNX Runtime."""
    if args.engine != "torch":
        if args.checkpoint or args.torch_device:
            raise BundleError("--checkpoint and --torch-device apply to --engine torch only")
        return None
    from inspector.bundle import load_bundle

    from export.arcd.torch_engine import TorchArcdEngine

    bundle = load_bundle(args.bundle)
    # one random tile through the graph too: the run folder must still hold the exported weights
    eng = TorchArcdEngine(bundle, device=args.torch_device, checkpoint=args.checkpoint,
                          check_against_graph=True)
    log.info("evaluating with %s", eng.backend)
    return bundle, eng


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from inspector.engines.onnxruntime import OnnxRuntimeConfig
    from inspector.evaluation.evaluate import evaluate_bundle

    if args.overlays and not args.out:
        return _fail("--overlays: needs --out (the folder the overlay PNGs go into)", EXIT_BAD_INPUT)
    try:
        ds = _data_args(args)
        post, kind = _split_overrides(args.set)
        size = args.resize  # (h, w), range-checked by its argparse type
        if args.record:  # before the evaluation: a refused key used to be found after it, or
            # silently replaced the exporter's training record
            from inspector.bundle import load_bundle as _lb
            from inspector.evaluation.options import check_record_key
            check_record_key(args.record_key, (_lb(args.bundle, verify=False).spec.provenance or {}).get("metrics"),
                             args.bundle)
        elif args.record_key is not None:
            raise ValueError("--record-key: applies with --record only")
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    out = _out_folder(args.out)  # after the checks: a refused run leaves no new folder
    try:
        engine = _evaluation_engine(args)
    except (BundleError, EngineError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except ImportError as e:
        return _fail(f"--engine torch needs the training extra (pip install -e '.[train]'): {e}",
                     EXIT_BAD_INPUT)
    bundle = engine[0] if engine else args.bundle
    from inspector.signals import sigterm_as_interrupt

    before = _files_in(out) if out is not None else {}

    try:
        with sigterm_as_interrupt():
            res = evaluate_bundle(bundle, ds, out_dir=out,
                                  overlays=args.overlays, postprocess=post, resize=size,
                                  engine=engine[1] if engine else OnnxRuntimeConfig(intra_op_threads=args.threads),
                                  overlay_pick=args.overlay_pick, kind_params=kind,
                                  auroc_stride=args.auroc_stride)
    except KeyboardInterrupt as e:
        # one line, as the trainers; --record runs after the evaluation: the bundle is unchanged
        left = ""
        if out is not None:
            changed = [p for p, t in _files_in(out).items() if before.get(p) != t]
            left = (f"; {out}: {len(changed)} file(s) written before the stop, incomplete (no "
                    f"metrics.json of this evaluation)" if changed else f"; nothing written to {out}")
        return _fail(f"evaluate stopped ({str(e) or 'Ctrl-C'}); no figures reported"
                     f"{', nothing recorded in the bundle' if args.record else ''}{left}",
                     EXIT_INTERRUPTED)
    except ValidationError as e:  # a post-processing value of --set
        err = e.errors()[0]
        return _fail(f"--set {'.'.join(str(x) for x in err['loc'])}: {err['msg']}", EXIT_BAD_INPUT)
    except BundleError as e:  # the model kind refused a kind_params key of --set
        bad = [k for k in kind if f"kind_params.{k}:" in str(e)]
        if not bad:
            raise
        detail = str(e).split(f"kind_params.{bad[0]}: ", 1)[1].removeprefix("Value error, ")
        if "takes no kind_params" in detail:  # it read as if --set itself were refused
            from inspector.postprocess import PostprocessConfig
            return _fail(f"--set {bad[0]}: unknown key: not a post-processing key, and the "
                         f"bundle's {detail}; --set takes "
                         f"{', '.join(sorted(PostprocessConfig.model_fields))}", EXIT_BAD_INPUT)
        if "Extra inputs are not permitted" not in detail:
            # a key the kind takes, with a value it refuses: say what is wrong with the value
            return _fail(f"--set {bad[0]}: {detail}", EXIT_BAD_INPUT)
        return _fail(f"--set {bad[0]}: neither a post-processing key nor one the bundle's kind takes "
                     f"({e})", EXIT_BAD_INPUT)
    except ValueError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    if args.record:
        from inspector.evaluation.evaluate import record_metrics
        res["recorded_as"] = record_metrics(args.bundle, res, args.record_key)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
        for k in ("miou", "miou_defects", "mpa", "precision", "recall", "f1", "iou", "acc",
                  "pixel_auroc", "false_alarm_rate", "false_alarm_px_per_mpx",
                  "false_alarm_rate_reported", "defective_images", "normal_images", "ms_per_image"):
            if k in res:  # the class metrics exist for class-probability kinds only
                print(f"{k:>24}: {fmt(res.get(k))}")
        di = res.get("dynamic_inference")
        if di:  # fuzzymask: which branch the tiles took, engine rounds per frame
            print(f"{'converged tiles':>24}: {fmt(di['converged_tile_fraction'])}")
            print(f"{'engine calls per frame':>24}: {di['engine_calls_per_frame']['mean']:.2f} "
                  f"(max {di['engine_calls_per_frame']['max']})")
        if "region" in res:  # arcd bundles with the machine-region head
            reg = res["region"]
            if reg is None:
                print(f"{'region':>24}: not scored (the data has no region labels)")
            else:
                print(f"{'region':>24}: {reg['name']} (threshold {fmt(reg['threshold'])}): "
                      + ", ".join(f"{k} {fmt(reg[k])}" for k in ("mpa", "miou", "iou", "auroc")))
    return EXIT_OK


def _files_in(folder: Path) -> dict[Path, int]:
    """Every file under ``folder`` with its modification time (ns), to tell what a stopped
    command wrote there."""
    out: dict[Path, int] = {}
    for p in Path(folder).rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                out[p] = p.stat().st_mtime_ns
    return out


def cmd_calibrate_window(args: argparse.Namespace) -> int:
    from calibration.outputs import check_bundle_writable, check_out_dir
    from calibration.residual_window import parse_windows, save_result, sweep_window, write_window

    try:
        windows = parse_windows(args.windows)  # before any image is read
    except ValueError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    # an --out or a bundle that cannot be written: refused now, not after the sweep (exit 1, Errno 13)
    check_out_dir(args.out)
    if args.write:
        check_bundle_writable(args.bundle, "--bundle", "; without --write the sweep only reports")
    try:
        ds = _data_args(args)
        res = sweep_window(args.bundle, ds, windows, objective=args.objective, stride=args.stride)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    files = save_result(res, Path(args.out))
    res["files"] = {k: str(v) for k, v in files.items()}
    if args.write and res["best_value"] is not None:
        res["written"] = write_window(args.bundle, res["best_value"],
                                      {"tool": "inspector calibrate residual-window", "data": res["data"],
                                       "objective": args.objective, "best": res["best"],
                                       "windows": windows})
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        pct = lambda v: "     -" if v is None else f"{v * 100:6.2f} %"  # noqa: E731
        au = lambda v: "    -" if v is None else f"{v:.3f}"  # noqa: E731
        for r in res["rows"]:
            print(f"window {r['local_mean_window']:3d}  AUROC class mean {au(r['class_mean_auroc'])} "
                  f"pooled {au(r['pixel_auroc'])}  F1 {pct(r['f1'])}  IoU {pct(r['iou'])}"
                  f"  false alarms {pct(r['false_alarm_rate'])} of normals")
        if res["best_value"] is None:
            # e.g. data without a defect pixel: no AUROC, nothing to rank the windows by
            print(f"no local_mean_window could be scored by {args.objective} on these images (it "
                  f"needs defect pixels in --data): nothing chosen"
                  f"{', nothing written' if args.write else ''}; plot {files['png']}")
        else:
            print(f"best local_mean_window = {res['best_value']} by {args.objective}"
                  + (" (at the edge of the list: extend it)" if res["at_edge"] else "")
                  + f"; plot {files['png']}" + (f"; written to {args.bundle}" if "written" in res else ""))
    if args.write and res["best_value"] is None:
        return _fail(f"--write: no local_mean_window could be scored by {args.objective}; the bundle "
                     "is unchanged", EXIT_FAIL)
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from calibration.dual_threshold import parse_range, save_result, sweep, write_k
    from calibration.outputs import check_bundle_writable, check_out_dir

    try:
        values = parse_range(args.range)  # before any image is read (and at most MAX_RANGE_VALUES)
    except ValueError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    # an --out or a bundle that cannot be written: refused now, not after the sweep (exit 1, Errno 13)
    check_out_dir(args.out)
    if args.write:
        check_bundle_writable(args.bundle, "--bundle", "; without --write the sweep only reports")
    try:
        ds = _data_args(args)
        res = sweep(args.bundle, ds, values, param=args.param, objective=args.objective)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    files = save_result(res, Path(args.out))
    res["files"] = {k: str(v) for k, v in files.items()}
    floor, current = res["fixed"]["min_residual"], res["fixed"][args.param]
    resets = bool(floor) and res["best_value"] is not None and res["best_value"] != current
    if args.write and res["best_value"] is not None:
        write_k(args.bundle, args.param, res["best_value"],
                {"data": res["data"], "objective": args.objective, "best": res["best"],
                 "range": args.range})
        res["written"] = {args.param: res["best_value"]}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for r in res["rows"]:
            f1 = "-" if r["f1"] is None else f"{r['f1'] * 100:6.2f} %"
            iou = "-" if r["iou"] is None else f"{r['iou'] * 100:6.2f} %"
            fa = "-" if r["false_alarm_px_per_mpx"] is None else f"{r['false_alarm_px_per_mpx']:9.0f}"
            print(f"{args.param} {r[args.param]:5.2f}  F1 {f1}  IoU {iou}  normals: px/Mpx {fa}")
        if res["best_value"] is None:
            print(f"no {args.param} scores above 0 by {args.objective} on these images"
                  + (f" (the bundle's min_residual floor {floor:g} applies to every row)" if floor else "")
                  + f": nothing chosen{', nothing written' if args.write else ''}; curve {files['png']}")
        else:
            print(f"best {args.param} = {res['best_value']} by {args.objective}"
                  + (" (at the edge of the range: extend it)" if res["at_edge"] else "")
                  + f"; curve {files['png']}" + (f"; written to {args.bundle}" if "written" in res else ""))
        if resets:
            print(f"note: the rows kept the bundle's min_residual floor {floor:g}, calibrated for "
                  f"{args.param} {current:g}; " + ("writing" if "written" in res else "--write")
                  + f" {args.param} {res['best_value']:g} resets it to 0: run `inspector calibrate "
                  "thresholds` again afterwards")
    if args.write and res["best_value"] is None:
        return _fail(f"--write: no {args.param} scored above 0 by {args.objective}; the bundle is "
                     "unchanged", EXIT_FAIL)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="inspector", description=__doc__.split("\n")[0])
    ap.add_argument("--version", action="version", version=f"inspector {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline of one camera")
    p.add_argument("--config", required=True, help="camera config YAML")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--frames", type=positive_int, help="grab this many frames, drain, exit")
    g.add_argument("--seconds", type=positive_float, help="run this long, drain, exit")
    p.add_argument("--quiet", action="store_true", help="no status line")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("check", help="validate a config, open the source, run one frame")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--user", metavar="NAME", help="also check, as this user (the unit's User=; needs "
                   "root), that it can read the config, runtime, bundle and inputs and write the "
                   "recordings")
    p.add_argument("--no-source", action="store_true", help="do not open the camera (a running "
                   "daemon holds it) nor run a frame: check the config, model, alarms, recorder and "
                   "latch file as the next start would (after an upgrade, before the restart)")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("subscribe", help="print (and save) the defect stream")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5556")
    p.add_argument("--topic", default="", help="topic prefix, e.g. defects.cam1")
    p.add_argument("--count", type=positive_int, help="exit after this many messages")
    p.add_argument("--timeout", type=finite_float_at_most(SUBSCRIBE_MAX_TIMEOUT_S),
                   help="fail if no message arrives within this many seconds")
    p.add_argument("--json", action="store_true", help="one header JSON per line")
    p.add_argument("--save-masks", metavar="DIR", help="write each mask as PNG into DIR "
                   "(<camera>_<frame>.png; with a region head also <camera>_<frame>_region.png, 0/255)")
    p.set_defaults(fn=cmd_subscribe)

    p = sub.add_parser("bench", help="latency and throughput benchmark (JSON + PNG)")
    p.add_argument("--config", required=True)
    p.add_argument("--frames", type=positive_int, default=200, help="frames in the latency phase")
    p.add_argument("--throughput-frames", type=positive_int, default=100, help="frames in the throughput phase")
    p.add_argument("--fps", type=positive_finite_float, help="pace of the latency phase (default: 70%% of throughput)")
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("daemon", help="run one camera as a service: systemd notify and watchdog, "
                                      "SIGHUP reload, PLC alarms, metrics")
    p.add_argument("--config", required=True, help="camera config YAML")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="wins over the config's log_level, also after a reload (default: the config's)")
    p.add_argument("--log-format", choices=["auto", "journal", "text"], default="auto",
                   help="journal: syslog priority prefixes for journald; auto: journal under systemd")
    p.add_argument("--runtime-dir", type=Path, default=runtime_dir_from_env(), metavar="DIR",
                   help="where to keep reload.json, which `inspector reload` waits on "
                        "(default: RUNTIME_DIRECTORY, set by systemd; none: no record)")
    p.set_defaults(fn=cmd_daemon)

    p = sub.add_parser("reload", help="reload a running daemon and wait for the outcome: exit 0 when "
                                      "the new config and model run, 1 when the daemon refused them "
                                      "(ExecReload= of the unit)")
    p.add_argument("--pid", type=positive_int, required=True, help="the daemon's PID ($MAINPID)")
    p.add_argument("--runtime-dir", type=Path, default=runtime_dir_from_env(), metavar="DIR",
                   help="the daemon's --runtime-dir (default: RUNTIME_DIRECTORY, set by systemd)")
    p.add_argument("--timeout", type=finite_float_at_most(SUBSCRIBE_MAX_TIMEOUT_S), default=590.0,
                   help="seconds to wait (the unit's TimeoutStartSec, 600 s, also bounds a reload)")
    p.set_defaults(fn=cmd_reload)

    p = sub.add_parser("alarms", help="PLC alarm tools")
    asub = p.add_subparsers(dest="action", required=True)
    q = asub.add_parser("test", help="set and clear each alarm once on every configured PLC (commissioning)")
    q.add_argument("--config", required=True, help="camera config YAML")
    q.add_argument("--hold", type=finite_float_at_most(ALARM_TEST_MAX_HOLD_S, inclusive_zero=True), default=1.0,
                   help="seconds each alarm stays set")
    q.set_defaults(fn=cmd_alarms)

    p = sub.add_parser("train", help="train a model (needs the train extra)")
    p.add_argument("kind", choices=["arcd", "clgan", "fuzzymask"])
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("--run-dir", help="run folder (default: runs/<name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--max-iters", type=positive_int, help="clgan, fuzzymask: stop after this many iterations "
                                                 "(smoke runs)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("export", help="onnx: a trained run to a model bundle (train extra); "
                                      "tensorrt: build and cache a bundle's engine (gpu extra)")
    p.add_argument("format", choices=["onnx", "tensorrt"])
    p.add_argument("--run-dir", help="onnx: the training run folder")
    p.add_argument("--out", help="onnx: bundle folder to write")
    p.add_argument("--bundle", help="tensorrt: the model bundle folder")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="tensorrt: engine precision")
    p.add_argument("--calib", metavar="DIR", help="tensorrt int8: folder of calibration frames")
    p.add_argument("--shapes", default="1:8:8", help="tensorrt: tile batch profiles MIN:OPT:MAX[,...] "
                                                     "(a 256x1600 frame in 256-px tiles is 7 tiles)")
    p.add_argument("--workspace-mb", type=positive_int, default=1024, help="tensorrt: builder workspace")
    p.add_argument("--device", type=non_negative_int, default=0, help="tensorrt: CUDA device")
    p.add_argument("--cache-dir", help="tensorrt: engine cache (default <bundle>/engines)")
    p.add_argument("--parity-tol", type=positive_float, default=None, metavar="TOL",
                   help="onnx: max |torch - ONNX Runtime| allowed (default: the kind's own, "
                        "1e-4 for arcd); the value used is recorded in the bundle")
    p.add_argument("--config", help="tensorrt: build exactly what this camera config's engine loads")
    p.add_argument("--json", action="store_true", help="tensorrt: print the result as JSON")
    p.add_argument("--allow-stale-metrics", action="store_true",
                   help="onnx, arcd: export although metrics.json belongs to another checkpoint, "
                        "or is missing beside a finished one (default thresholds, no metrics in "
                        "the bundle)")
    p.add_argument("--name", help="bundle name (default: the folder name)")
    p.add_argument("--opset", type=onnx_opset, default=17,
                   help="ONNX opset of the graph (default 17; the range this torch exports)")
    p.add_argument("--replace", action="store_true",
                   help="onnx: overwrite a bundle already in --out (refused without it)")
    p.set_defaults(fn=cmd_export)

    _add_augment_commands(sub)

    def data_opts(q: argparse.ArgumentParser, split: str) -> None:
        q.add_argument("--bundle", required=True, help="model bundle folder")
        q.add_argument("--data", required=True, help="data root")
        q.add_argument("--format", required=True, choices=["magnetic-tile", "neu-seg", "folder"],
                       help="layout of --data (folder: defect-free images only)")
        q.add_argument("--split", default=split, choices=["all", "train", "val", "test"],
                       help=f"hash split of the file stems (default {split})")
        q.add_argument("--categories", help="comma list: magnetic-tile folders (MT_Crack,MT_Free) "
                                            "or neu-seg subsets")
        q.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("evaluate", help="run a bundle over a labelled image folder: pixel metrics, "
                                        "AUROC, false alarms (JSON, overlays)")
    data_opts(p, "all")
    p.add_argument("--out", help="folder for metrics.json, per_image.jsonl and overlays/")
    p.add_argument("--overlays", type=non_negative_int, default=0, help="overlay PNGs to write into --out")
    p.add_argument("--overlay-pick", choices=["spread", "worst-best"], default=None,
                   help="which images get overlays (default: worst-best for arcd, else spread)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a post-processing or kind_params key of the bundle for this run, "
                        "e.g. k1=3.5 or local_mean_window=31 (repeatable)")
    p.add_argument("--resize", metavar="HxW", type=resize_size,
                   help="resize images (masks nearest) before the model; sides 1..16384 px")
    p.add_argument("--threads", type=non_negative_int, default=0, help="onnxruntime intra-op threads (0 = all)")
    p.add_argument("--auroc-stride", type=positive_int, default=1, metavar="N",
                   help="the pixel and per-class AUROC of every N-th pixel of each image (row-major): "
                        "their memory, about 5 bytes a pixel plus 4 per class and 1 for arcd bundles, "
                        "divided by N; 1 = every pixel, exact (default). Recorded as auroc_stride")
    p.add_argument("--engine", choices=["onnxruntime", "torch"], default="onnxruntime",
                   help="torch: an arcd bundle's training checkpoint in torch (GPU when present; "
                        "needs the train extra), checked against the graph on one tile first")
    p.add_argument("--checkpoint", help="--engine torch: checkpoint.pt (default: the bundle's run_dir)")
    p.add_argument("--torch-device", help="--engine torch: cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--record", action="store_true",
                   help="store the figures in the bundle's provenance.metrics (key: format/split)")
    p.add_argument("--record-key", help="key for --record instead of format/split")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("calibrate", help="calibrate post-processing parameters")
    csub = p.add_subparsers(dest="action", required=True)
    q = csub.add_parser("dual-threshold", help="sweep k1 (or k2) of a residual bundle; JSON + PNG curve")
    data_opts(q, "val")
    q.add_argument("--param", choices=["k1", "k2"], default="k1")
    q.add_argument("--range", default="2.0:4.0:0.1", help="start:stop:step or a comma list")
    q.add_argument("--objective", choices=["f1", "iou"], default="f1")
    q.add_argument("--out", default="calib-out", help="folder for sweep_<param>.json and .png")
    q.add_argument("--write", action="store_true", help="store the best value in the bundle "
                                                        "(the old section goes to postprocess_history)")
    q.set_defaults(fn=cmd_calibrate)
    q = csub.add_parser("residual-window", help="clgan: sweep local_mean_window (the reconstruction "
                                                "takes the input's local grey level); JSON + PNG")
    data_opts(q, "val")
    q.add_argument("--windows", default="0,15,31,63", help="comma list of window sides (0 = off, "
                                                         "the spec; else odd >= 3)")
    q.add_argument("--objective", choices=["class_mean_auroc", "pixel_auroc", "f1", "iou"],
                   default="class_mean_auroc", help="what picks the window (default: pixel AUROC per "
                                                    "defect class, averaged over the classes)")
    q.add_argument("--stride", type=positive_int, default=2, help="AUROC on every n-th pixel (memory)")
    q.add_argument("--out", default="calib-out", help="folder for sweep_local_mean_window.json and .png")
    q.add_argument("--write", action="store_true", help="store the best window in the bundle (resets "
                                                        "an absolute floor calibrated on the old residual)")
    q.set_defaults(fn=cmd_calibrate_window)
    from calibration.cli import add_calibrate_commands  # argparse only; each command imports on use
    add_calibrate_commands(csub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", None) or "INFO")
    try:
        return args.fn(args)
    except (ConfigError, BundleError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except BindError as e:
        # the endpoint is a config key: name the file (exit 1 all the same: an address that is
        # busy or an interface not up yet may be there on the next start)
        cfg_file = getattr(args, "config", None)
        return _fail(f"{cfg_file}: {e}" if cfg_file else str(e), EXIT_FAIL)
    except MissingPackageError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except (SourceError, EngineError, OSError) as e:
        return _fail(str(e), EXIT_FAIL)
    except InspectorError as e:
        return _fail(str(e), EXIT_BAD_INPUT)


if __name__ == "__main__":
    sys.exit(main())
