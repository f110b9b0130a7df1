"""Export a trained ARCD run to a runtime model bundle (``model.onnx`` + ``bundle.yaml``).

The fused graph (R then D, see :class:`export.arcd.torch_model.ARCDInference`) takes ``image``
``[N, C, th, tw]`` (normalised as the bundle's ``input.mean``/``input.std`` say; only the batch
axis is dynamic) and returns ``reconstruction`` and ``probs``. Before the bundle is written the
graph is run in ONNX Runtime's CPU provider and compared with torch on random inputs and on
rendered synthetic strip tiles; a difference above the tolerance raises
:class:`ExportParityError` and leaves no bundle behind. Thresholds for the bundle's
post-processing come from the run's ``metrics.json`` (chosen on calibration frames), but only
when it was written for the checkpoint being exported (its ``checkpoint`` entry: stage, step
and a digest of the weights); otherwise :class:`StaleMetricsError`, unless
``--allow-stale-metrics`` exports with default thresholds and no metrics.

Example::

    python -m export.onnx_export --run-dir runs/arcd-demo --out deploy/models/demo-arcd
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from inspector.bundle import (BundleSpec, GraphRef, InputSpec, RegionSpec, TilingSpec, export_left,
                             folder_state, load_bundle, write_bundle)
from inspector.signals import signals_held
from inspector.errors import InspectorError
from inspector.postprocess import PostprocessConfig
from inspector.sources.synthetic import CLASS_NAMES, StripRenderer

from export.arcd.data import to_float01, to_tensor
from export.arcd.evaluate import tile_frame
from export.arcd.torch_model import ARCDInference
from export.arcd.train import (CHECKPOINT, METRICS, TrainConfig, build_models, checkpoint_ref,
                               load_checkpoint)
from export.training import git_commit, read_metrics

log = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAMES = ("reconstruction", "probs")
#: the third output of a graph with the machine-region head (model.region_head)
REGION_OUTPUT = "region"


def output_names(model: ARCDInference) -> tuple[str, ...]:
    """The graph's outputs, in the order the fused module returns them."""
    return OUTPUT_NAMES + ((REGION_OUTPUT,) if model.region_head else ())
PARITY_TOL = 1e-4

__all__ = ["ExportParityError", "StaleMetricsError", "fold_batchnorm", "export_onnx", "check_parity", "export_bundle", "ort_latency", "main"]


class ExportParityError(RuntimeError):
    """ONNX Runtime's output differs from torch's by more than the tolerance."""


class StaleMetricsError(InspectorError, ValueError):
    """The run's metrics.json was written for another checkpoint than the one exported (the
    message names both and what to do). An InspectorError and a ValueError, so that both
    ``inspector export onnx`` and ``python -m export.onnx_export`` report it as one line, exit 2."""


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval) with every Conv2d -> BatchNorm2d pair merged into the conv.

    The exporter folds BN itself, but in float32; on the demo network that rounding alone moved
    the output probabilities by ~1e-4 against torch, the parity tolerance. Folding in float64
    here and rounding once brought ORT within ~1e-5 of torch.
    """
    folded = copy.deepcopy(model).eval().double()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            seq[i + 1] = nn.Identity()
    return folded.float()


def export_onnx(model: ARCDInference, path: Path, channels: int, tile: tuple[int, int],
                opset: int = 17) -> None:
    """Write the fused graph; batch is the only dynamic axis (tiles have one fixed size).

    BatchNorm is folded into the convs first (in float64, see :func:`fold_batchnorm`).
    """
    names = output_names(model)
    model = fold_batchnorm(model)
    dummy = torch.zeros(1, channels, *tile)
    axes = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript (not installed here); this graph is plain convs and exports exactly.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(names),
                          dynamic_axes=axes, do_constant_folding=True)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def _session(path: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _synthetic_tiles(cfg: TrainConfig, seed: int = 12345) -> np.ndarray:
    """Normalised tiles of one rendered synthetic strip frame with defects, cut as at runtime."""
    mc = cfg.model
    th, tw = mc.tile
    width = max(tw, 1600)
    r = StripRenderer(width, th, seed=seed)
    img, _ = r.render(np.random.default_rng(seed), defect_rate=1.0)
    if mc.in_channels == 3:
        img = np.repeat(img[:, :, None], 3, axis=2)
    tiles, _, _ = tile_frame(to_float01(img, mc.in_channels), (th, tw), cfg.evaluation.overlap)
    return np.stack([to_tensor(t.transpose(1, 2, 0), mc.mean, mc.std).numpy() for t in tiles])


def _real_tiles(cfg: TrainConfig, n: int = 4) -> np.ndarray | None:
    """Normalised tiles of the first ``n`` held-out images of a folder data source (None when
    the source is synthetic or its folder is not on this machine)."""
    data = cfg.data
    if getattr(data, "source", "synthetic") == "synthetic":
        return None
    from inspector.evaluation.datasets import open_dataset

    try:
        ds = open_dataset(data.source, data.root, split=data.val_split)
    except FileNotFoundError as e:
        log.warning("parity on real images skipped: %s", e)
        return None
    mc = cfg.model
    out = []
    for i in range(min(n, len(ds))):
        tiles, _, _ = tile_frame(to_float01(ds.load(i).image, mc.in_channels), tuple(mc.tile),
                                 cfg.evaluation.overlap)
        out.extend(to_tensor(t.transpose(1, 2, 0), mc.mean, mc.std).numpy() for t in tiles)
    return np.stack(out) if out else None


def check_parity(model: ARCDInference, onnx_path: Path, inputs: dict[str, np.ndarray],
                 tol: float = PARITY_TOL, named: Path | None = None) -> dict[str, dict[str, float]]:
    """Max |torch - ORT| per output for each named input batch; raises above ``tol``, naming
    ``named`` (the bundle's graph file a staged ``onnx_path`` would have become) or ``onnx_path``."""
    sess = _session(onnx_path)
    report: dict[str, dict[str, float]] = {}
    model = model.eval()
    names = output_names(model)
    for label, x in inputs.items():
        with torch.no_grad():
            ref = [t.numpy() for t in model(torch.from_numpy(x))]
        got = sess.run(list(names), {INPUT_NAME: x})
        report[label] = {n: float(np.abs(r - g).max()) for n, r, g in zip(names, ref, got)}
    worst = max((v, f"{label}/{n}") for label, d in report.items() for n, v in d.items())
    if not worst[0] <= tol:  # also catches NaN
        raise ExportParityError(
            f"{named or onnx_path}: ONNX Runtime differs from torch by {worst[0]:.3g} on {worst[1]} "
            f"(tolerance {tol:g}); full report {report}. The graph was not bundled.")
    return report


def ort_latency(onnx_path: Path, batch: np.ndarray, runs: int = 20, warmup: int = 3,
                threads: int = 2) -> dict[str, float]:
    """Wall time of one ``session.run`` on ``batch`` (ms: median, min, p90). For reporting only."""
    sess = _session(onnx_path, threads)
    for _ in range(warmup):
        sess.run(None, {INPUT_NAME: batch})
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {INPUT_NAME: batch})
        ts.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": float(np.median(ts)), "min_ms": float(np.min(ts)),
            "p90_ms": float(np.percentile(ts, 90)), "runs": runs, "batch": int(batch.shape[0]),
            "threads": threads}


def _fit(cfg: TrainConfig) -> dict[str, str]:
    """The bundle's ``input.fit``: a model trained on square-padded images (``data.square_pad``)
    must see line frames padded and resized the same way, not tiled; otherwise nothing (tile)."""
    align = getattr(cfg.data, "square_pad", "none")
    return {} if align == "none" else {"fit": "square_pad", "pad_align": align}


def _region_spec(metrics: dict | None, cfg: TrainConfig) -> RegionSpec | None:
    """The bundle's ``region`` key: the head's name and the threshold training chose on its
    calibration frames (evaluation.default_threshold without metrics, as the defect classes)."""
    if not cfg.model.region_head:
        return None
    chosen = ((metrics or {}).get("validation") or {}).get("region") or {}
    thr = chosen.get("threshold", cfg.evaluation.default_threshold)
    return RegionSpec(name=cfg.model.region_name, threshold=round(float(thr), 4))


def _thresholds(metrics: dict | None, cfg: TrainConfig) -> tuple[float, dict[str, float]]:
    val = (metrics or {}).get("validation") or {}
    per = val.get("thresholds") or {}
    g = val.get("global_threshold", cfg.evaluation.default_threshold)
    return round(float(g), 4), {k: round(float(v), 4) for k, v in per.items()}


def _metrics_for(run_dir: Path, ck: dict, allow_stale: bool) -> tuple[dict | None, str]:
    """The run's metrics.json if it belongs to checkpoint ``ck``, and what was found (recorded
    in the bundle's provenance as ``metrics_check``).

    A metrics.json of another checkpoint (a finished run resumed longer and stopped before it
    wrote new metrics) would put the old network's thresholds and scores into the bundle: refused
    (:class:`StaleMetricsError`), or with ``allow_stale`` dropped, so the bundle gets default
    thresholds and no metrics as when metrics.json is missing. A finished checkpoint without
    metrics.json (a run stopped in its final validation) is refused the same way: its bundle
    would ship default thresholds marked ``training_complete``. An unfinished one without it
    exports with default thresholds and a warning (``checkpoint_at`` says where it stood). A
    metrics.json written before the trainer recorded its checkpoint is used as before, with a
    warning: it cannot be checked.
    """
    path, ck_path = run_dir / METRICS, run_dir / CHECKPOINT
    # the advice for a damaged one must hold when followed: a finished checkpoint without
    # metrics.json is refused below (it said "delete it, the exporter then works from the checkpoint")
    deleted = (f"restore it, or delete it and then either finish the run (inspector train arcd "
               f"--config <its config> --run-dir {run_dir} --resume trains nothing and writes "
               f"{METRICS} again) or export without it (default thresholds, no metrics): "
               f"inspector export onnx ... --allow-stale-metrics" if ck.get("done") else
               "restore it, or delete it (the bundle then gets default thresholds and no metrics)")
    metrics = read_metrics(run_dir, deleted)
    if metrics is None:
        if ck.get("done"):
            # a finished run writes metrics.json last, after its final validation chose the
            # thresholds: one stopped there (Ctrl-C, SIGTERM) shipped default thresholds while
            # saying training_complete, with nothing but a log line about it
            why = (f"{path}: missing, but {ck_path} is finished (stage {ck.get('stage')} step "
                   f"{ck.get('step')}): the run was stopped before its final validation wrote the "
                   f"thresholds and metrics")
            if not allow_stale:
                raise StaleMetricsError(
                    f"{why}. Finish the run (inspector train arcd --config <its config> --run-dir "
                    f"{run_dir} --resume trains nothing and writes {METRICS}), or export without "
                    f"them (default thresholds, no metrics): inspector export onnx ... "
                    f"--allow-stale-metrics")
            log.warning("%s; --allow-stale-metrics: the bundle gets default thresholds and no "
                        "metrics", why)
            return None, f"missing, dropped: {why}"
        log.warning("%s: missing; the bundle gets default thresholds and no metrics", path)
        return None, "missing"
    written = metrics.get("checkpoint")
    if not isinstance(written, dict):
        log.warning("%s records no checkpoint step (written by an older trainer): cannot check "
                    "that its thresholds and metrics are those of %s (stage %s step %s); using "
                    "them as before", path, ck_path, ck.get("stage"), ck.get("step"))
        return metrics, "unchecked (metrics.json records no checkpoint)"
    here = checkpoint_ref(ck)

    def at(ref: dict) -> str:
        return f"stage {ref.get('stage')} step {ref.get('step')}{'' if ref.get('done') else ' (unfinished)'}"

    if (written.get("stage"), written.get("step")) != (here["stage"], here["step"]):
        why = f"{path} was written at {at(written)}, but {ck_path} is at {at(here)}"
    elif written.get("weights_sha256") != here["weights_sha256"]:
        why = (f"{path} was written for other weights than those of {ck_path} (both at "
               f"{at(here)}: the run was trained again after metrics.json was written)")
    else:
        return metrics, "matches the checkpoint"
    if not allow_stale:
        raise StaleMetricsError(
            f"{why}: its thresholds and metrics are not this network's. Finish the run "
            f"(inspector train arcd --config <its config> --run-dir {run_dir} --resume writes "
            f"metrics.json for the final checkpoint), or export without them (default "
            f"thresholds, no metrics): inspector export onnx ... --allow-stale-metrics")
    log.warning("%s; --allow-stale-metrics: the bundle gets default thresholds and no metrics", why)
    return None, f"stale, dropped: {why}"


@contextlib.contextmanager
def removed_on_failure(out_dir: Path) -> Iterator[Path]:
    """When the block fails, remove ``out_dir`` and its parents if the block created them, so a
    refused export leaves no empty or half-written bundle folder that a later ``model.bundle``
    would find. A folder that existed before the block is never removed."""
    out_dir = Path(out_dir)
    new: list[Path] = []  # missing now; deepest first
    p = out_dir
    while not p.exists() and p != p.parent:
        new.append(p)
        p = p.parent
    try:
        yield out_dir
    except BaseException:
        for d in new:
            if d == out_dir:
                shutil.rmtree(d, ignore_errors=True)  # made by the block: all it holds is its own
            else:
                with contextlib.suppress(OSError):
                    d.rmdir()  # a parent made by the block, if nothing else was put in it
        raise


def export_bundle(run_dir: Path, out_dir: Path, name: str | None = None, opset: int = 17,
                  atol: float = PARITY_TOL, allow_stale_metrics: bool = False) -> Path:
    """Export ``run_dir``'s checkpoint to a bundle in ``out_dir``; returns ``out_dir``.

    The parity check runs on a temporary copy of the graph; only a graph that passed is moved
    into ``out_dir`` and described by ``bundle.yaml``. A metrics.json written for another
    checkpoint is refused (:class:`StaleMetricsError`) unless ``allow_stale_metrics``, which
    exports with default thresholds and no metrics instead. An export that fails (a parity
    miss, interrupted) removes ``out_dir`` again if it created it (:func:`removed_on_failure`).
    """
    with removed_on_failure(Path(out_dir)):
        return _export_bundle(Path(run_dir), Path(out_dir), name, opset, atol, allow_stale_metrics)


def _export_bundle(run_dir: Path, out_dir: Path, name: str | None, opset: int, atol: float,
                   allow_stale_metrics: bool) -> Path:
    ck = load_checkpoint(run_dir / CHECKPOINT)
    cfg = TrainConfig.model_validate(ck["config"])
    mc = cfg.model
    if not ck.get("done"):
        log.warning("%s: training has not finished (stage %s step %s); exporting it anyway",
                    run_dir / CHECKPOINT, ck.get("stage"), ck.get("step"))
    r, d = build_models(mc)
    r.load_state_dict(ck["reconstruction"])
    d.load_state_dict(ck["discrimination"])
    model = ARCDInference(r, d, region_head=mc.region_head).eval()
    # before anything is written: a refused export leaves no bundle folder behind
    metrics, metrics_check = _metrics_for(run_dir, ck, allow_stale_metrics)

    # from the graph moved in to bundle.yaml written, a stop waits: a stopped --replace
    # must not leave the new graph beside the old bundle.yaml (refused at load)
    with ExitStack() as hold:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
            tmp_graph = Path(tmp) / GRAPH_FILE
            export_onnx(model, tmp_graph, mc.in_channels, tuple(mc.tile), opset)
            rng = np.random.default_rng(0)
            th, tw = mc.tile
            rand01 = rng.random((2, mc.in_channels, th, tw), dtype=np.float32)
            mean = np.broadcast_to(np.asarray(mc.mean, np.float32), (mc.in_channels,)).reshape(1, -1, 1, 1)
            std = np.broadcast_to(np.asarray(mc.std, np.float32), (mc.in_channels,)).reshape(1, -1, 1, 1)
            inputs = {"random": ((rand01 - mean) / std).astype(np.float32),
                      "synthetic_tiles": _synthetic_tiles(cfg)}
            real = _real_tiles(cfg)
            if real is not None:
                inputs["real_tiles"] = real
            # a miss names the graph the bundle would have had, not the staged file, gone by then
            parity = check_parity(model, tmp_graph, inputs, atol, named=out_dir / GRAPH_FILE)
            log.info("parity ok (tolerance %g): %s", atol, parity)
            hold.enter_context(signals_held())
            tmp_graph.replace(out_dir / GRAPH_FILE)

        g, per = _thresholds(metrics, cfg)
        ec = cfg.evaluation
        pp = PostprocessConfig(type="probability", threshold=g,
                               class_thresholds={k: v for k, v in per.items() if k in mc.classes},
                               open_kernel=ec.open_kernel, close_kernel=ec.close_kernel,
                               min_area_px=ec.min_area_px)
        import onnxruntime

        commit, dirty = git_commit(Path(__file__).resolve().parent)
        provenance: dict[str, Any] = {
            "data": metrics.get("data") if metrics else cfg.data.model_dump(mode="json"),
            "training_config": cfg.model_dump(mode="json"),
            "commit": commit,
            "commit_dirty": dirty,
            "metrics": metrics,
            "metrics_check": metrics_check,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run_dir),
            "training_complete": bool(ck.get("done")),
            # a config changed on --resume: training_config is the last one, these the earlier values
            **({"config_changes": ck["config_changes"]} if ck.get("config_changes") else {}),
            # where an unfinished run stood, for `inspector check`'s warning
            **({} if ck.get("done") else {"checkpoint_at": {"stage": ck.get("stage"), "step": ck.get("step")}}),
            "parity": {"tolerance": atol, "max_abs_diff": parity,
                       "provider": "CPUExecutionProvider"},
            "exporter": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                         "opset": opset},
        }
        classes = list(mc.classes)
        if mc.in_channels == 1 and classes != list(CLASS_NAMES):
            log.info("classes %s differ from the synthetic strip's %s", classes, list(CLASS_NAMES))
        spec = BundleSpec(
            name=name or cfg.name,
            kind="arcd",
            graphs={"model": GraphRef(file=GRAPH_FILE, sha256="")},
            input=InputSpec(name=INPUT_NAME, tile=tuple(mc.tile), channels=mc.in_channels,
                            mean=list(mc.mean), std=list(mc.std), batch=0, **_fit(cfg)),
            outputs={"probabilities": "probs", "reconstruction": "reconstruction",
                     **({"region": REGION_OUTPUT} if mc.region_head else {})},
            region=_region_spec(metrics, cfg),
            classes=classes,
            tiling=TilingSpec(overlap=ec.overlap),
            postprocess=pp,
            provenance=provenance,
        )
        write_bundle(out_dir, spec)
    load_bundle(out_dir)  # what the runtime will do: fails here rather than on the line
    log.info("bundle written: %s (%.2f MB graph)", out_dir,
             (out_dir / GRAPH_FILE).stat().st_size / 1e6)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    from inspector.evaluation.options import onnx_opset

    p = argparse.ArgumentParser(prog="python -m export.onnx_export",
                                description="Export a trained ARCD run to a model bundle")
    p.add_argument("--run-dir", required=True, type=Path, help="training run folder")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--name", default=None, help="bundle name (default: the training config's)")
    p.add_argument("--opset", type=onnx_opset, default=17)
    p.add_argument("--bench", type=int, default=0, metavar="N",
                   help="after export, time ORT CPU on N synthetic tiles (logged, not stored)")
    p.add_argument("--parity-tol", type=float, default=PARITY_TOL,
                   help="max |torch - ONNX Runtime| allowed (recorded in the bundle)")
    p.add_argument("--allow-stale-metrics", action="store_true",
                   help="export even when metrics.json was written for another checkpoint (a "
                        "resumed run stopped early) or is missing beside a finished one (a run "
                        "stopped in its final validation): default thresholds, no metrics")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from inspector.signals import sigterm_as_interrupt

    before = folder_state(a.out)
    try:
        with sigterm_as_interrupt():
            out = export_bundle(a.run_dir, a.out, a.name, a.opset, a.parity_tol,
                                allow_stale_metrics=a.allow_stale_metrics)
    except (FileNotFoundError, ExportParityError, ValueError) as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt as e:  # one line, as `inspector export onnx`, not a traceback
        log.error("export stopped (%s); %s", str(e) or "Ctrl-C", export_left(a.out, before))
        return 130
    if a.bench:
        b = load_bundle(out)
        th, tw = b.spec.input.tile
        x = np.random.default_rng(0).random((a.bench, b.spec.input.channels, th, tw), dtype=np.float32)
        log.info("ORT CPU latency, batch %d: %s", a.bench, ort_latency(out / GRAPH_FILE, x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
