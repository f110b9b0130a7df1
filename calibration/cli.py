"""``inspector calibrate thresholds | convergence | flat-field | geometry | int8-set``.

Only argparse at import time: :func:`add_calibrate_commands` is called while the ``inspector``
parser is built, and each command imports what it needs when it runs. Bad input raises
:class:`calibration.frames.CalibrationInputError` (an ``InspectorError``), which ``inspector``
turns into exit code 2 with the message naming the argument or file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from inspector.argtypes import non_negative_int
from inspector.fileio import missing_folder

log = logging.getLogger("inspector.calibrate")

__all__ = ["add_calibrate_commands", "comma_floats", "comma_ints"]


def comma_floats(text: str | None, arg: str) -> list[float] | None:
    from calibration.values import comma_floats as parse
    return parse(text, arg)


def comma_ints(text: str | None, arg: str) -> list[int] | None:
    from calibration.values import comma_ints as parse
    return parse(text, arg)


def _load_config(path: str, bundle: str | None = None):
    from inspector.config import load_config

    cfg = load_config(path)
    # model.bundle is relative to the config file, --bundle to the working directory
    if bundle and Path(bundle).resolve() != cfg.resolve(cfg.model.bundle).resolve():
        # allowed (calibrate a new bundle on the camera's own frames before switching it), but
        # never unnoticed: the camera's overrides were set for the bundle it runs
        overrides = dict(cfg.model.postprocess)
        log.warning("--bundle %s is not the bundle %s runs (model.bundle %s): calibrating it on "
                    "this camera's frames%s; the camera runs it only once its model.bundle names it",
                    bundle, path, cfg.model.bundle,
                    f", with the camera's model.postprocess overrides {overrides} (not written)"
                    if overrides else "")
    if bundle:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"bundle": str(Path(bundle).resolve())})})
    return cfg


def _model(args: argparse.Namespace):
    """The bundle's model as the runtime builds it: from the camera config (engine, flat-field,
    post-processing overrides) or from the bundle alone."""
    from calibration.frames import CalibrationInputError
    from calibration.thresholds import CalibModel

    if args.config:
        from inspector.pipeline import load_model
        cfg = _load_config(args.config, args.bundle)
        lm = load_model(cfg)
        return (CalibModel(lm.bundle, lm.adapter, lm.post.cfg, dict(cfg.model.postprocess),
                           cfg.source_file), cfg)
    from inspector.engines.onnxruntime import OnnxRuntimeConfig
    from inspector.evaluation.evaluate import Runner
    from inspector.flatfield import FlatField

    runner = Runner(args.bundle, engine=OnnxRuntimeConfig(intra_op_threads=args.threads))
    if args.flat_field:
        try:
            runner.adapter.flat_field = FlatField.load(args.flat_field)
        except ValueError as e:
            raise CalibrationInputError(f"--flat-field {e}") from None
    return CalibModel(runner.bundle, runner.adapter, runner.pp_config), None


def _check_frame_sources(args: argparse.Namespace) -> None:
    """The argument checks ``thresholds`` and ``convergence`` share (before any model load)."""
    from calibration.frames import CalibrationInputError
    from calibration.values import check_count
    check_count(args.frames, "--frames")  # 0 is a value refused, not "required"
    if not args.bundle and not args.config:
        raise CalibrationInputError("--bundle: required (or --config, whose model.bundle is used)")
    if args.config and args.frames is None:
        raise CalibrationInputError("--frames: required with --config (how many frames to grab)")
    if args.defects and not args.format:
        raise CalibrationInputError("--format: required with --defects (magnetic-tile or neu-seg)")
    if args.format and not args.defects:
        raise CalibrationInputError("--format: the layout of --defects, which is not given")
    if args.normal and not Path(args.normal).is_dir():
        raise CalibrationInputError(f"--normal {args.normal}: {missing_folder(args.normal, 'folder')}")


def _check_bundle_writable(args: argparse.Namespace, model, cfg) -> None:
    """The bundle a run without --dry-run writes must be writable, before any frame is read."""
    from calibration.outputs import check_bundle_writable
    if args.dry_run:
        return
    arg = "--bundle" if args.bundle else f"{cfg.source_file if cfg else args.config}: model.bundle"
    check_bundle_writable(model.bundle.path, arg, "; --dry-run reports without writing it")


def _warn_training_share(model, split, normal: str | None) -> None:
    """Warn where --normal's calibration part may be the model's own training images."""
    from calibration.frames import training_share_warning

    if normal:
        said = training_share_warning(model.bundle.spec.provenance or {}, split, f"--normal {normal}")
        if said:
            log.warning("%s", said)


# -- thresholds -----------------------------------------------------------------------------------
def cmd_thresholds(args: argparse.Namespace) -> int:
    from calibration.frames import CalibrationInputError, Split, defect_set, live_frames, normal_folder
    from calibration.outputs import check_out_dir, make_out_dir
    from calibration.thresholds import (SearchGrid, calibrate_thresholds, check_recipe, save_report,
                                        write_postprocess_section)
    from calibration.values import MAX_AREA_PX, MAX_KERNEL_SIZE, check_k, check_number, check_values

    # cheap checks first: a typo should not cost a model load
    if not 0 < args.target_fpr < 1:
        raise CalibrationInputError(f"--target-fpr: must be in (0, 1), got {args.target_fpr}")
    if args.confidence is not None and not 0 < args.confidence < 1:
        raise CalibrationInputError(f"--confidence: must be in (0, 1), got {args.confidence}")
    check_number(args.min_threshold, "--min-threshold", 0, False, 1, True)
    _check_frame_sources(args)
    # every value a search can write into the bundle is checked here, whatever the bundle's own
    # validation says later: a k1 of nan used to be written and then found nothing at all
    grid = SearchGrid(check_k(comma_floats(args.k1, "--k1"), "--k1"), check_k(comma_floats(args.k2, "--k2"), "--k2"),
                      check_values(comma_ints(args.kernel_size, "--kernel-size"), "--kernel-size", 0, True,
                                   MAX_KERNEL_SIZE),
                      check_values(comma_ints(args.min_area_px, "--min-area-px"), "--min-area-px", 0, True,
                                   MAX_AREA_PX))
    # the report must be writable before anything is computed or the bundle is touched
    out = check_out_dir(args.out)
    split = Split(args.check_fraction, args.calib_fraction)
    model, cfg = _model(args)
    check_recipe(model)  # before frames are grabbed
    _check_bundle_writable(args, model, cfg)
    _warn_training_share(model, split, args.normal)
    normals = normal_folder(args.normal, split) if args.normal else live_frames(cfg, args.frames, split)
    defects = None
    if args.defects:
        cats = args.categories.split(",") if args.categories else None
        defects = defect_set(args.defects, args.format, split, cats)
    log.info("normal frames %s; defects %s", normals.counts(), defects.counts() if defects else None)
    report = calibrate_thresholds(model, normals, args.target_fpr, defects, grid, args.min_threshold,
                                  args.confidence)
    own = (report.get("check") or {}).get("bundle_setting")
    refused = None
    if report["feasible"] and own is not None and not own["meets_target"]:
        # the values suit this camera's overrides, not the bundle's own section that every other
        # camera sharing the bundle runs: not written (the report still is)
        measured = (f"alarms on {own['alarmed']} of {own['normal_images']} held-back normal frames "
                    f"(FPR {own['fpr']}, target {args.target_fpr})" if own["normal_images"]
                    else "cannot be measured: no held-back normal frame")
        refused = (f"{cfg.source_file if cfg else 'config'}: model.postprocess: the camera's overrides "
                   f"{own['camera_overrides_that_shape']} change what alarms, and the bundle's own "
                   f"section with the values calibrated under them {measured}; nothing written to "
                   f"{model.bundle.path}. Remove the overrides, give them as a search grid (e.g. "
                   f"--min-area-px) to calibrate the bundle with them, or keep the report (--dry-run)")
    if report["feasible"] and not args.dry_run and refused is None:
        make_out_dir(out)  # the folder the note points to exists before the bundle names it
        chk, cal = report["check"], report["calibration"]
        from inspector.postprocess import PostprocessConfig
        note = {"tool": "inspector calibrate thresholds", "target_fpr": args.target_fpr,
                "normal": normals.source, "split": split.describe(),
                "fpr_calibration": cal["fpr"], "normal_images_calibration": cal["normal_images"],
                "fpr_check": chk["fpr"], "normal_images_check": chk["normal_images"],
                "recall_check": chk["recall"], "defect_images_check": chk["defect_images"],
                "report": str((out / "thresholds.json").resolve())}
        report["written"] = write_postprocess_section(model.bundle.path,
                                                      PostprocessConfig.model_validate(report["chosen"]), note)
        hidden = sorted(set(model.overrides) & set(report["changed"]))
        if hidden:
            log.warning("%s: model.postprocess overrides %s, which hide the calibrated value(s) "
                        "written to the bundle: remove them from the camera config",
                        cfg.source_file if cfg else "config", hidden)
    else:
        report["written"] = None
    files = save_report(report, out)
    if args.json:
        print(json.dumps(json.loads(files["report"].read_text()), indent=2))
    else:
        _print_thresholds(report, files)
    if not report["feasible"]:
        print(f"inspector: error: target FPR {args.target_fpr} cannot be met: {report['reason']}",
              file=sys.stderr)
        return 1
    if refused is not None and not args.dry_run:
        print(f"inspector: error: {refused}", file=sys.stderr)
        return 2
    return 0


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _print_thresholds(r: dict[str, Any], files: dict[str, Path]) -> None:
    name = Path(r["bundle"]).name
    print(f"calibrated {name} ({r['recipe']}) for target FPR {r['target_fpr']}:")
    if not r["feasible"]:
        print(f"  not feasible: {r['reason']}")
        return
    c = r.get("effective") or r["chosen"]  # what this camera runs with (overrides included)
    if r["recipe"] == "dual_threshold":
        print(f"  min_residual {c['min_residual']}  (k1 {c['k1']}, k2 {c['k2']}, kernel_size "
              f"{c['kernel_size']}, min_area_px {c['min_area_px']})")
    elif r["recipe"] == "score_threshold":
        print(f"  score_threshold {c['score_threshold']}  (min_area_px {c['min_area_px']}, open_kernel "
              f"{c['open_kernel']}, close_kernel {c['close_kernel']})")
    else:
        print("  class thresholds " + ", ".join(f"{k} {v}" for k, v in c["class_thresholds"].items()))
    for part, label in (("calibration", "calibration"), ("check", "held back  ")):
        f = r[part]
        line = (f"  {label}: {f['alarmed']}/{f['normal_images']} normal images alarm (FPR {_pct(f['fpr'])}"
                + (f", 95% CI {f['fpr_ci95'][0]:.3f}-{f['fpr_ci95'][1]:.3f}" if f.get("fpr_ci95") else "") + ")")
        if f.get("recall") is not None:
            line += f" | detection recall {_pct(f['recall'])} on {f['defect_images']} defect images"
        print(line)
    w = r.get("written")
    if w:
        print(f"  written: {w['bundle_yaml']} (post-processing version {w['version']}; version "
              f"{w['previous_version']} kept in postprocess_history)")
    else:
        print("  not written (--dry-run)")
    print("  report: " + ", ".join(str(p) for p in files.values()))


# -- flat-field -----------------------------------------------------------------------------------
def _read_frame(it, arg: str):
    """The image of a frame-set item; an unreadable file is bad input (exit 2 naming it), not a
    crash. Skipping it would be wrong here: the maps and the INT8 set describe the files given."""
    from calibration.frames import CalibrationInputError

    try:
        return it.load()[0]
    except CalibrationInputError:
        raise
    except ValueError as e:  # read_image names the file and what is wrong with it
        raise CalibrationInputError(f"{arg} {e}") from None


def _folder_frames(folder: str, arg: str):
    from calibration.frames import Split, normal_folder

    fs = normal_folder(folder, Split(), arg)
    for it in fs.items:
        yield it.name, _read_frame(it, arg)


def cmd_flat_field(args: argparse.Namespace) -> int:
    import numpy as np

    from calibration.flat_field import FlatFieldSettings, compute_flat_field, flatness, stack_frames
    from calibration.frames import CalibrationInputError, Split, live_frames
    from calibration.outputs import check_out_file
    from inspector.fileio import atomic_path

    from calibration.values import check_count, check_number

    modes = [m for m in ("bright", "normal", "config") if getattr(args, m)]
    if len(modes) != 1:
        raise CalibrationInputError("give exactly one of --bright DIR (with --dark DIR: references), "
                                    "--normal DIR or --config F --frames N (median of normal frames)")
    # before any frame is read: nan used to be taken as no smoothing (and written into the .npz
    # as NaN), a huge value crashed in OpenCV, a max gain of nan crashed on the maps
    check_count(args.frames, "--frames")
    check_number(args.smooth_px, "--smooth-px", 0, True)
    check_number(args.max_gain, "--max-gain", 1, False)
    check_number(args.target_level, "--target-level", 0, False, 255, True)
    if not str(args.out).endswith(".npz"):
        raise CalibrationInputError(f"--out {args.out}: expected a file name ending in .npz")
    check_out_file(args.out)  # before the frames are read (the .png goes beside it)
    dark = None
    meta: dict[str, Any] = {}
    if args.dark:
        d, names = stack_frames(_folder_frames(args.dark, "--dark"), f"--dark {args.dark}")
        dark = d.mean(axis=0)
        meta["dark_frames"] = len(names)
    if args.bright:
        frames, names = stack_frames(_folder_frames(args.bright, "--bright"), f"--bright {args.bright}")
        bright = frames.mean(axis=0)
        meta.update(method="dark/bright references" if dark is not None else "bright references",
                    bright_frames=len(names), source=str(args.bright))
    else:
        if args.normal:
            it = _folder_frames(args.normal, "--normal")
            src = str(args.normal)
        else:
            if args.frames is None:
                raise CalibrationInputError("--frames: required with --config (how many frames to grab)")
            cfg = _load_config(args.config)
            fs = live_frames(cfg, args.frames, Split())
            it = ((x.name, x.load()[0]) for x in fs.items)
            src = fs.source
        frames, names = stack_frames(it, src)
        if len(names) < 3:
            raise CalibrationInputError(f"{src}: {len(names)} frame(s); the median needs at least 3 "
                                        f"(dozens: each pixel must see mostly normal strip)")
        bright = np.median(frames, axis=0)
        meta.update(method="median of normal frames", frames=len(names), source=src)
    smooth = args.smooth_px
    if smooth is None:
        smooth = 0.0 if args.bright else max(2.0, 0.02 * bright.shape[1])
    settings = FlatFieldSettings(profile=args.profile, smooth_px=smooth, target=args.target_level,
                                 max_gain=args.max_gain)
    ff = compute_flat_field(bright, dark, settings, meta)
    figs = flatness(ff, frames)
    ff.meta.update(figs)
    out = Path(args.out)
    # a camera config may already name this file: it is replaced whole or not at all
    with atomic_path(out) as tmp:
        ff.save(tmp)
    png = _plot_flat_field(ff, frames.mean(axis=0), Path(str(out)[:-4] + ".png"))
    result = {"file": str(out), "plot": str(png), "shape": list(ff.shape), **ff.meta,
              "config": {"preprocess": {"flat_field": str(out)}},
              # also logged by save(); here for whoever reads the JSON
              **({"warning": ff.spread_warning()} if ff.spread_warning() else {})}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"flat-field {ff.shape[0]}x{ff.shape[1]} (HxW; {meta['method']}, profile {args.profile}) -> {out}")
        print(f"  column brightness spread {figs['column_spread_before_pct']:.2f} % -> "
              f"{figs['column_spread_after_pct']:.2f} %; gain {ff.meta['gain_range'][0]:.3f}.."
              f"{ff.meta['gain_range'][1]:.3f}; plot {png}")
        print("camera config:\npreprocess:\n  flat_field: " + str(Path(out).resolve()))
    return 0


def _plot_flat_field(ff, mean_frame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = mean_frame.mean(axis=0)
    after = ff.apply_float(mean_frame).mean(axis=0)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    ax.plot(before, label="before (column means)")
    ax.plot(after, label="after")
    ax.set_xlabel("column")
    ax.set_ylabel("grey level")
    ax2 = ax.twinx()
    ax2.plot(ff.gain.mean(axis=0), color="grey", alpha=0.6, lw=1, label="gain")
    ax2.set_ylabel("gain", color="grey")
    ax.legend(fontsize=8, loc="lower center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- geometry -------------------------------------------------------------------------------------
def cmd_geometry(args: argparse.Namespace) -> int:
    from calibration.frames import CalibrationInputError
    from calibration.geometry import (GeometryResult, across_from_strip, across_from_target,
                                      along_from_encoder, along_from_speed, check_result, snippet)
    from calibration.outputs import check_out_file
    from inspector.evaluation.datasets import read_image
    from inspector.fileio import atomic_write_text

    from calibration.values import check_count
    check_count(args.frame_height, "--frame-height")  # 0 was taken as "not given"
    if args.out:
        check_out_file(args.out)
    image = None
    if args.image:
        try:
            image = read_image(Path(args.image))
        except ValueError as e:
            raise CalibrationInputError(f"--image {e}") from None
    height = args.frame_height if args.frame_height is not None else (image.shape[0] if image is not None else None)
    res = GeometryResult()
    if args.strip_width_mm is not None and args.target_mm is not None:
        raise CalibrationInputError("give --strip-width-mm or --target-mm, not both")
    if args.strip_width_mm is not None:
        res.mm_per_px_across, m = across_from_strip(args.strip_width_mm, args.strip_width_px, image)
        res.how["mm_per_px_across"] = f"strip width {args.strip_width_mm} mm over {m.get('strip_width_px', args.strip_width_px)} px"
        res.measured.update(m)
    elif args.target_mm is not None:
        try:
            parts = [float(v) for v in args.target_mm.lower().split("x")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2):
            raise CalibrationInputError(f"--target-mm: expected W or WxH in mm, got {args.target_mm!r}")
        across, along_t, m = across_from_target((parts[0], parts[1] if len(parts) == 2 else None),
                                                args.target_px, image)
        res.mm_per_px_across = across
        res.how["mm_per_px_across"] = f"target {args.target_mm} mm, measured {m.get('target_px', args.target_px)} px"
        res.measured.update(m)
        if along_t is not None:
            res.mm_per_px_along = along_t
            res.how["mm_per_px_along"] = "target height"
    along_ways = [w for w in ("line_speed_m_min", "encoder_mm_per_count", "square_pixels") if getattr(args, w)]
    if len(along_ways) > 1:
        raise CalibrationInputError("along the strip: give one of --line-speed-m-min, "
                                    "--encoder-mm-per-count, --square-pixels")
    if args.line_speed_m_min is not None:
        res.mm_per_px_along, m = along_from_speed(args.line_speed_m_min, args.line_rate, args.frame_rate, height)
        res.how["mm_per_px_along"] = (f"{args.line_speed_m_min} m/min at {m['line_rate_hz']:g} lines/s")
        res.measured.update(m)
    elif args.encoder_mm_per_count is not None:
        res.mm_per_encoder_count = args.encoder_mm_per_count
        res.how["mm_per_encoder_count"] = "strip position from frame.meta['encoder_count']"
        along, m = along_from_encoder(args.encoder_mm_per_count, args.counts_per_frame, height)
        if along is not None:
            res.mm_per_px_along = along
            res.how["mm_per_px_along"] = f"{args.counts_per_frame:g} counts per {height}-row frame"
        res.measured.update(m)
    elif args.square_pixels:
        if res.mm_per_px_across is None:
            raise CalibrationInputError("--square-pixels needs the size across (--strip-width-mm or --target-mm)")
        res.mm_per_px_along = res.mm_per_px_across
        res.how["mm_per_px_along"] = "square pixels"
    if res.mm_per_px_across is None and res.mm_per_px_along is None and res.mm_per_encoder_count is None:
        raise CalibrationInputError("nothing to calibrate: give --strip-width-mm or --target-mm (across) "
                                    "and/or --line-speed-m-min, --encoder-mm-per-count (along)")
    check_result(res)  # a finite, positive size, or no file and no snippet
    text = snippet(res)
    if args.out:
        atomic_write_text(args.out, text)
    if args.json:
        print(json.dumps({"geometry": res.section(), "how": res.how, "measured": res.measured,
                          "file": args.out}, indent=2))
    else:
        print(text, end="")
    return 0


# -- int8-set -------------------------------------------------------------------------------------
def cmd_int8_set(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from calibration.frames import CalibrationInputError, Split, live_frames, normal_folder
    from calibration.int8_set import select_int8_set
    from calibration.outputs import check_out_dir
    from inspector.flatfield import FlatField

    from calibration.values import check_count

    if args.count < 1:
        raise CalibrationInputError(f"--count: must be >= 1, got {args.count}")
    check_count(args.pool, "--pool")  # it was named --frames, and 0 meant the default
    check_out_dir(args.out)  # before a pool is grabbed (select_int8_set checks what it holds)
    transform = None
    if args.source:
        fs = normal_folder(args.source, Split(), "--source")
        pool = [(it.name, (lambda it=it: _read_frame(it, "--source")), it.path) for it in fs.items]
        source = str(args.source)
        ff_path = args.flat_field
    else:
        cfg = _load_config(args.config)
        n = args.pool if args.pool is not None else 10 * args.count
        fs = live_frames(cfg, n, Split())
        pool = []
        for it in fs.items:
            img = it.load()[0]
            ok, buf = cv2.imencode(".png", img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            # encoded in memory: a pool of full frames would not fit otherwise
            pool.append((it.name, (lambda b=buf: _decode(b)), None))
        source = fs.source
        ff_path = args.flat_field or (str(cfg.resolve(cfg.preprocess.flat_field)) if cfg.preprocess.flat_field else None)
    if ff_path:
        try:
            ff = FlatField.load(ff_path)
        except ValueError as e:
            raise CalibrationInputError(f"--flat-field {e}") from None
        transform = lambda img: np.array(ff.apply(img), copy=True)  # noqa: E731 - apply reuses its buffer
    rep = select_int8_set(pool, args.count, Path(args.out), source, args.overwrite, transform)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"{rep['count']} of {rep['pool']} frames -> {args.out} (coverage radius "
              f"{rep['coverage_radius']:.2f} in standardised feature units)")
        for k, v in rep["range_covered"].items():
            r = rep["ranges"][k]
            print(f"  {k:>12}: pool {r['pool'][0]}..{r['pool'][2]}, selected {r['selected'][0]}.."
                  f"{r['selected'][2]} ({v * 100:.0f} % of the pool's 2-98 % range)")
        print(f"  report {Path(args.out) / 'selection.json'}; use it as model.engine.calib_dir")
    return 0


def _decode(buf):
    import cv2
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# -- convergence (fuzzymask) ----------------------------------------------------------------------
def cmd_convergence(args: argparse.Namespace) -> int:
    from calibration.convergence import calibrate_convergence, save_report, write_m
    from calibration.frames import CalibrationInputError, Split, defect_set, live_frames, normal_folder
    from calibration.outputs import check_out_dir, make_out_dir

    if not 0 < args.quantile <= 1:
        raise CalibrationInputError(f"--quantile: must be in (0, 1], got {args.quantile}")
    if args.within < 1:
        raise CalibrationInputError(f"--within: must be >= 1, got {args.within}")
    if args.passes is not None and args.passes < args.within:
        # the passes measured include those m is chosen within: fewer (0, -1) were taken silently
        raise CalibrationInputError(f"--passes: must be >= --within ({args.within}), got {args.passes}")
    _check_frame_sources(args)
    # the report must be writable before anything is computed or the bundle is touched
    out = check_out_dir(args.out)
    split = Split(args.check_fraction, args.calib_fraction)
    model, cfg = _model(args)
    _check_bundle_writable(args, model, cfg)
    _warn_training_share(model, split, args.normal)
    normals = normal_folder(args.normal, split) if args.normal else live_frames(cfg, args.frames, split)
    defects = defect_set(args.defects, args.format, split) if args.defects else None
    report = calibrate_convergence(model.adapter, normals, args.quantile, args.within, defects,
                                   args.passes)
    report["written"] = None
    if not args.dry_run:
        make_out_dir(out)  # the folder the note points to exists before the bundle names it
        note = {"tool": "inspector calibrate convergence", "quantile": args.quantile,
                "within": args.within, "normal": normals.source, "split": split.describe(),
                "check": report["check"], "report": str((out / "convergence.json").resolve())}
        report["written"] = write_m(model.bundle.path, report["m"], note)
    files = save_report(report, out)
    if args.json:
        print(files["report"].read_text())
    else:
        chk = report["check"]
        # with apply_line18 the runtime tests only the first pass, whatever --within asked
        within = report.get("within_runtime", args.within)
        passes = f"within {within} pass{'es' if within != 1 else ''}"
        print(f"m = {report['m']:.4g} (was {report['previous_m']:.4g}): "
              f"{report['calibration']['converged_within']:.1%} of {report['calibration']['tiles']} "
              f"calibration tiles converge {passes}; held-back check: "
              f"{_pct(chk.get('converged_within'))} of {chk['tiles']} tiles")
        if "defect_tiles" in report:
            d = report["defect_tiles"]
            print(f"tiles holding a defect (check part): {_pct(d.get('converged_within'))} of "
                  f"{d['tiles']} converge {passes}")
        print(f"report: {files['report']}  plot: {files['plot']}"
              + ("" if report["written"] else "  (dry run: bundle not changed)"))
    return 0


# -- parser ---------------------------------------------------------------------------------------
def add_calibrate_commands(csub: argparse._SubParsersAction) -> None:
    """Add the calibration subcommands to ``inspector calibrate``."""
    q = csub.add_parser("thresholds", help="post-processing thresholds from normal frames at a target "
                                           "false-alarm rate; writes a new bundle post-processing version")
    q.add_argument("--bundle", help="model bundle folder (default with --config: its model.bundle)")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--normal", metavar="DIR", help="folder of defect-free frames (recursive)")
    src.add_argument("--config", metavar="F", help="camera config: grab --frames normal frames from its source")
    q.add_argument("--frames", type=int, help="with --config: frames to grab")
    q.add_argument("--target-fpr", type=float, required=True,
                   help="largest share of normal frames allowed to report a defect, e.g. 0.02")
    q.add_argument("--confidence", type=float,
                   help="ask for P(true FPR <= target) >= this (e.g. 0.9) instead of letting at most "
                        "target x n calibration frames alarm; needs more frames, costs recall")
    q.add_argument("--defects", metavar="DIR", help="labelled defect images, for recall and the trade-off curve")
    q.add_argument("--format", choices=["magnetic-tile", "neu-seg"], help="layout of --defects")
    q.add_argument("--categories", help="comma list of --defects folders (magnetic-tile: default all "
                                        "but MT_Free) or neu-seg subsets")
    q.add_argument("--check-fraction", type=float, default=0.3,
                   help="share of frames held back to check the FPR (by a hash of the path below "
                        "--normal without extension, as --format folder splits; 0.3 = the shared "
                        "'test' split)")
    q.add_argument("--calib-fraction", type=float,
                   help="share used to calibrate (default: all not held back; 0.2 = the shared 'val' "
                        "split, leaving out the 'train' split a model was trained on)")
    q.add_argument("--k1", help="residual models: k1 values to try, e.g. 2.5,3,3.5 (needs --defects)")
    q.add_argument("--k2", help="residual models: k2 values to try")
    q.add_argument("--kernel-size", help="residual models: closing kernel sizes to try")
    q.add_argument("--min-area-px", help="min_area_px values to try")
    q.add_argument("--min-threshold", type=float, default=0.5,
                   help="probability models: lowest class threshold calibration may set")
    q.add_argument("--flat-field", metavar="NPZ", help="with --normal: apply these flat-field maps "
                                                       "(--config uses its preprocess.flat_field)")
    q.add_argument("--threads", type=non_negative_int, default=0, help="onnxruntime intra-op threads (0 = all)")
    q.add_argument("--out", default="calib-out/thresholds", help="report folder (thresholds.json, PNGs)")
    q.add_argument("--dry-run", action="store_true", help="report only; do not write the bundle")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(fn=cmd_thresholds)

    q = csub.add_parser("convergence", help="fuzzymask: the convergence threshold m of dynamic inference "
                                            "from normal frames; writes kind_params.m")
    q.add_argument("--bundle", help="fuzzymask bundle folder (default with --config: its model.bundle)")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--normal", metavar="DIR", help="folder of defect-free frames (recursive)")
    src.add_argument("--config", metavar="F", help="camera config: grab --frames normal frames from its source")
    q.add_argument("--frames", type=int, help="with --config: frames to grab")
    q.add_argument("--quantile", type=float, default=0.95,
                   help="share of normal tiles that must converge within --within passes")
    q.add_argument("--within", type=int, default=2, help="model passes by which they must converge")
    q.add_argument("--passes", type=int, help="passes to measure (default --within; more shows the tail)")
    q.add_argument("--defects", metavar="DIR", help="labelled defect images: report how their tiles converge")
    q.add_argument("--format", choices=["magnetic-tile", "neu-seg"], help="layout of --defects")
    q.add_argument("--check-fraction", type=float, default=0.3,
                   help="share of frames held back (hash of the path below --normal, as thresholds)")
    q.add_argument("--calib-fraction", type=float, help="share used to calibrate (default: the rest)")
    q.add_argument("--flat-field", metavar="NPZ", help="with --normal: apply these flat-field maps")
    q.add_argument("--threads", type=non_negative_int, default=0, help="onnxruntime intra-op threads (0 = all)")
    q.add_argument("--out", default="calib-out/convergence", help="report folder (convergence.json, .png)")
    q.add_argument("--dry-run", action="store_true", help="report only; do not write the bundle")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(fn=cmd_convergence)

    q = csub.add_parser("flat-field", help="gain/offset maps from dark+bright references or the median "
                                           "of normal frames (.npz for preprocess.flat_field)")
    q.add_argument("--dark", metavar="DIR", help="dark reference frames (optional)")
    q.add_argument("--bright", metavar="DIR", help="bright reference frames of a uniform surface")
    q.add_argument("--normal", metavar="DIR", help="normal frames of the moving strip (per-pixel median)")
    q.add_argument("--config", metavar="F", help="camera config: median of --frames frames of its source")
    q.add_argument("--frames", type=int, help="with --config: frames to grab")
    q.add_argument("--out", required=True, help="the .npz to write (a .png of the profiles goes beside it)")
    q.add_argument("--profile", choices=["2d", "columns"], default="2d",
                   help="2d: a map per pixel; columns: one gain per column (line-scan, lighting across only)")
    q.add_argument("--smooth-px", type=float, help="Gaussian smoothing of the gain (default 0 for "
                                                   "references, 2%% of the width for the median)")
    q.add_argument("--target-level", type=float, help="grey level of a uniform surface after correction "
                                                      "(default: its mean level before)")
    q.add_argument("--max-gain", type=float, default=8.0)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_flat_field)

    q = csub.add_parser("geometry", help="pixel-to-mm across and along the strip; prints the config's "
                                         "geometry section")
    q.add_argument("--strip-width-mm", type=float, help="known strip width")
    q.add_argument("--strip-width-px", type=float, help="strip width in pixels (or measure it on --image)")
    q.add_argument("--target-mm", help="known target size: W or WxH (mm)")
    q.add_argument("--target-px", type=float, help="target width in pixels (or measure it on --image)")
    q.add_argument("--image", help="a frame showing both strip edges, or the target")
    q.add_argument("--line-speed-m-min", type=float, help="line speed, m/min")
    q.add_argument("--line-rate", type=float, help="camera line rate, lines/s (line-scan)")
    q.add_argument("--frame-rate", type=float, help="frames/s (area camera: line rate = fps x frame height)")
    q.add_argument("--frame-height", type=int, help="rows per frame (default: --image's height)")
    q.add_argument("--encoder-mm-per-count", type=float, help="encoder: strip travel per count, mm")
    q.add_argument("--counts-per-frame", type=float, help="encoder counts between two frames")
    q.add_argument("--square-pixels", action="store_true", help="along = across")
    q.add_argument("--out", help="write the YAML snippet here too")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_geometry)

    q = csub.add_parser("int8-set", help="a representative, diverse frame set for TensorRT INT8 calibration")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", metavar="DIR", help="folder of frames to choose from (recursive)")
    g.add_argument("--config", metavar="F", help="camera config: choose from --pool frames of its source")
    q.add_argument("--pool", type=int, help="with --config: frames to grab (default 10 x --count)")
    q.add_argument("--count", type=int, required=True, help="frames to select")
    q.add_argument("--out", required=True, help="folder for the frames and selection.json (calib_dir)")
    q.add_argument("--flat-field", metavar="NPZ", help="correct frames with these maps before selecting "
                                                       "and writing (--config: its preprocess.flat_field)")
    q.add_argument("--overwrite", action="store_true", help="remove images already in --out")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_int8_set)
