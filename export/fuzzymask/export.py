"""Fuzzy-mask inpainter run -> model bundle of kind ``fuzzymask``: the network as ONNX, checked
against torch.

The graph takes ``image`` [N, C, T, T] (pixel/255 in [0, 1]: mean 0, std 1 in the bundle) and
returns ``reconstruction`` [N, C, T, T] in [0, 1]; the batch axis is dynamic, so the runtime can
batch the tiles of a frame and the variants of dynamic inference into one engine call. BatchNorm
is folded into the convolutions in float64 before export (the float32 fold of the exporter alone
moves outputs by ~1e-5..1e-4).

Parity: onnxruntime (CPU) and torch must agree to ``atol`` (default 1e-4 on the [0, 1] output) on
random tiles, flat / gradient / striped tiles, batches of several tiles, and real crops of the
training data when it is on this machine; otherwise the export fails and no bundle is written.

``kind_params`` follow :class:`inspector.models.fuzzymask.FuzzymaskParams` (validated with it):
the run's cell size, SSIM weights, the training mask's overlay (``w_max``, ``sigma_w``, ``fill``,
``sigma_z``: what ``inference_fill: fuzzy`` overlays at run time), the inference flags of the
training config and tau (``train_envelope``: from the run's metrics.json when its
``checkpoint_step`` is the exported checkpoint's; recomputed here from tile-sized training crops
when it is missing or belongs to another step, which needs the training data on this machine:
without it the export is refused, naming metrics.json and both steps). Post-processing is
``score_threshold`` at tau, a first value that ``inspector calibrate thresholds`` refines. With
``tau_mode: per_image_sigma`` the bundle has no tau (each tile gets its own), but the score map
still needs a threshold: the first ``score_threshold`` is then the same train-envelope tau (the
99th percentile of the normal crops' per-crop maximum of D), never 0 (D >= 0: a threshold of 0
marks every pixel). ``provenance.split_fractions`` records the run's hash split (warned about
when it is not the evaluation commands' default). A checkpoint before the planned last step
exports with a warning and ``provenance.checkpoint_at`` (its step and the planned steps).

Example::

    inspector export onnx --run-dir runs/fuzzymask-mt --out deploy/models/fuzzymask-mt
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from inspector.bundle import BundleSpec, GraphRef, InputSpec, TilingSpec, load_bundle, write_bundle
from inspector.signals import signals_held
from inspector.errors import CheckpointError
from inspector.evaluation.datasets import SplitFractions
from inspector.postprocess import PostprocessConfig

from export.fuzzymask.data import NormalCrops, load_normal_images
from export.fuzzymask.torch_model import FuzzyMaskNet
from export.fuzzymask.train import (CHECKPOINT, METRICS, FuzzymaskTrainConfig, build_model, compute_tau,
                                    load_checkpoint, load_tau_images, ssim_weights)
from export.onnx_export import ExportParityError as OnnxExportParityError
from export.onnx_export import removed_on_failure
from export.training import git_commit, metrics_for_checkpoint, run_kind, split_provenance

log = logging.getLogger(__name__)

__all__ = ["ExportParityError", "is_fuzzymask_run", "fold_batchnorm", "export_graph", "parity_check",
           "kind_params", "export_bundle"]

GRAPH = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "reconstruction"
PARITY_ATOL = 1e-4


class ExportParityError(OnnxExportParityError):
    """ONNX Runtime's output differs from torch's by more than the tolerance."""


def is_fuzzymask_run(run_dir: Path) -> bool:
    """True when the run's checkpoint (else its config.yaml) says ``kind: fuzzymask`` (how the CLI
    picks the exporter; :func:`export.training.run_kind`, which raises a one-line
    CheckpointError for a folder that names no kind)."""
    return run_kind(run_dir) == "fuzzymask"


def fold_batchnorm(net: FuzzyMaskNet) -> nn.Module:
    """An eval-mode copy of ``net`` with every BatchNorm merged into the conv before it, in float64.

    Conv-BN pairs are found by module order: in this network every BatchNorm2d directly follows
    the Conv2d that feeds it (``conv1``/``bn1``, ``conv2``/``bn2``, ``downsample.0``/``.1``,
    conv-BN-ReLU stages).
    """
    folded = copy.deepcopy(net).eval().double()
    parents = {m: (parent, name) for parent in folded.modules() for name, m in parent.named_children()}
    prev: nn.Module | None = None
    for m in list(folded.modules()):
        if isinstance(m, nn.BatchNorm2d):
            if not isinstance(prev, nn.Conv2d) or prev.out_channels != m.num_features:
                raise RuntimeError(f"BatchNorm {parents[m][1]} does not follow a matching conv")
            with torch.no_grad():
                scale = m.weight / torch.sqrt(m.running_var + m.eps)
                bias = prev.bias if prev.bias is not None else torch.zeros_like(m.running_mean)
                prev.weight.mul_(scale.view(-1, 1, 1, 1))
                prev.bias = nn.Parameter((bias - m.running_mean) * scale + m.bias)
            parent, name = parents[m]
            setattr(parent, name, nn.Identity())
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
            prev = m
    return folded.float()


def export_graph(net: FuzzyMaskNet, path: Path, tile: int, opset: int = 17) -> Path:
    """Write ``net`` (BN folded) to ``path`` as ONNX with a dynamic batch axis."""
    model = fold_batchnorm(net)
    dummy = torch.zeros(1, net.in_channels, tile, tile)
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript (not
        # installed here); this graph is plain convs, resizes and a sigmoid, exported exactly
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    try:
        import onnx
    except ImportError:  # a bare GPU box may lack it; the onnxruntime parity check still runs
        log.warning("onnx not installed: graph checker skipped")
        return path
    onnx.checker.check_model(onnx.load(str(path)))
    return path


def _probe_tiles(channels: int, tile: int, seed: int = 0) -> np.ndarray:
    """Random, flat, gradient and striped tiles in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32)
    t = [rng.random((channels, tile, tile)),
         np.full((channels, tile, tile), 0.45),
         np.broadcast_to((xx / tile)[None], (channels, tile, tile)),
         np.broadcast_to(0.5 + 0.4 * np.sin(yy / 3.0)[None], (channels, tile, tile))]
    return np.stack(t).astype(np.float32)


def _real_tiles(cfg: FuzzymaskTrainConfig, n: int = 6) -> np.ndarray | None:
    """Tiles of the run's held-out normal images (val split), or of its training images when the
    val split is empty; None when the data is not on this machine."""
    d = cfg.data
    fractions = SplitFractions(d.split_test, d.split_val)
    for split in ("val", None):
        sources = [s.model_copy(update={"split": split}) if split else s for s in d.sources]
        try:
            images, _ = load_normal_images(sources, Path(cfg.base_dir), d.channels, cfg.tile(), fractions)
        except (FileNotFoundError, ValueError, OSError) as e:
            log.info("parity on real images (%s split): %s", split or "training", e)
            continue
        crops = NormalCrops(images, cfg.tile(), d.channels, seed=12345)
        return crops.stack(range(n)).numpy()
    return None


def parity_check(net: FuzzyMaskNet, graph: Path, inputs: dict[str, np.ndarray],
                 atol: float = PARITY_ATOL, named: Path | None = None) -> dict[str, Any]:
    """Max |torch - ORT| per named input batch (each run as one batch and tile by tile);
    raises :class:`ExportParityError` above ``atol`` (NaN included), naming ``named`` (the
    bundle's graph a staged ``graph`` would have become) or ``graph``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    net = net.eval()
    report: dict[str, float] = {}
    for label, x in inputs.items():
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        single = sess.run([OUTPUT_NAME], {INPUT_NAME: x[:1]})[0]
        report[label] = float(max(np.abs(got - ref).max(), np.abs(single - ref[:1]).max()))
    worst = max(report.values())
    if not worst <= atol:
        raise ExportParityError(f"{named or graph}: ONNX Runtime differs from torch by {worst:.3g} (tolerance "
                                f"{atol:g}): {report}. No bundle was written.")
    return {"max_abs_diff": worst, "per_input": report, "atol": atol,
            "provider": "CPUExecutionProvider", "tiles": int(sum(len(v) for v in inputs.values()))}


def kind_params(cfg: FuzzymaskTrainConfig, tau: float | None) -> dict[str, Any]:
    """The bundle's ``kind_params`` (contract keys), validated by the runtime's FuzzymaskParams."""
    ic, lc, mk = cfg.inference, cfg.loss, cfg.mask
    a, b, g = ssim_weights(cfg)
    params: dict[str, Any] = {
        "cell": mk.cell, "ssim_alpha": a, "ssim_beta": b, "ssim_gamma": g,
        "ssim_window": lc.ssim_window, "ssim_sigma": lc.ssim_sigma, "ssim_structure": lc.ssim_structure,
        "c1": lc.c1, "c2": lc.c2, "c3": lc.c3,
        "max_iterations": ic.max_iterations, "m": ic.m, "conv_metric": ic.conv_metric,
        "first_check_from": ic.first_check_from,
        # train_envelope computes one tau for every tile: at run time that is a fixed threshold
        "tau_mode": "per_image_sigma" if ic.tau_mode == "per_image_sigma" else "fixed",
        "tau": tau, "max_mask_frac": ic.max_mask_frac, "inference_fill": ic.inference_fill,
        # the training overlay, for inference_fill fuzzy: the interference the network learnt to repair
        "w_max": mk.w_max, "sigma_w": mk.sigma_w, "fill": mk.fill, "sigma_z": mk.sigma_z,
        "iter_target": ic.iter_target, "apply_line18": ic.apply_line18,
        "smooth_sigma": ic.smooth_sigma, "clamp_negative": ic.clamp_negative,
    }
    try:
        from inspector.models.fuzzymask import FuzzymaskParams
    except ImportError:  # runtime side not present: the dict above follows the contract
        log.warning("inspector.models.fuzzymask not importable; kind_params written unvalidated")
        return params
    return FuzzymaskParams.model_validate(params).model_dump(mode="json")


def _tau(run_dir: Path, cfg: FuzzymaskTrainConfig, net: FuzzyMaskNet, metrics: dict,
         fresh: bool | None, step: int) -> tuple[float | None, dict | None]:
    """(tau, its statistics) for the exported network ``net`` at checkpoint step ``step``.

    ``train_envelope`` takes metrics.json's tau unless ``fresh`` is False (it was computed for
    another step's network). Otherwise it is computed here as training does (same tile-sized
    crops, same percentile), which needs the training images; without them a stale tau is
    refused rather than shipped: a threshold of another network flags or misses whole frames.
    ``per_image_sigma`` needs the same envelope, as the bundle's first ``score_threshold`` (not
    as a kind_params tau; see :func:`_first_threshold`); ``fixed`` returns the config's tau.
    """
    ic = cfg.inference
    if ic.tau_mode == "fixed":
        return ic.tau, None
    if fresh is not False and metrics.get("tau") is not None:
        return float(metrics["tau"]), metrics.get("tau_stats")
    use = ("" if ic.tau_mode == "train_envelope" else
           " (tau_mode per_image_sigma: the train-envelope tau is the bundle's first score_threshold)")
    if fresh is False:
        why = (f"{run_dir / METRICS} holds the tau of step {metrics.get('checkpoint_step')} but "
               f"{run_dir / CHECKPOINT} is at step {step} (the run went on after its metrics were "
               f"written and stopped before writing new ones){use}")
        log.warning("%s: recomputing tau for the checkpoint from the training crops", why)
    else:
        why = f"{run_dir / METRICS} has no tau for step {step} (training did not finish?){use}"
        log.warning("%s: computing it now from the training crops", why)
    d = cfg.data
    try:
        # as train() loads them for its tau: tile-sized crops, from defect-free windows of the
        # tile's size where a source has windows (NEU-Seg)
        images, _ = load_tau_images(cfg, f"{run_dir / CHECKPOINT} (its training config)")
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{why}, and tau cannot be computed here: the training images are not readable "
            f"({e}). Finish the run with --resume (it writes metrics.json with the tau of its final "
            f"checkpoint), or export on the machine that has the training data") from e
    crops = NormalCrops(images, cfg.tile(), d.channels, cfg.seed, 0, d.flip, d.vflip)
    stats = compute_tau(net, crops, cfg, torch.device("cpu"))
    stats["computed_by"] = "export"
    log.info("tau for step %d: %.5f (P%g over %d crops)", step, stats["tau"], ic.tau_percentile,
             stats["images"])
    return stats["tau"], stats


def _first_threshold(cfg: FuzzymaskTrainConfig, tau: float) -> float:
    """The bundle's first ``postprocess.score_threshold``: tau (``train_envelope``, ``fixed``);
    with ``per_image_sigma`` the train-envelope tau, which the bundle does not otherwise use. A
    value of 0 or less (a ``fixed`` tau of 0, say) is written with a warning: D >= 0,
    so it marks every pixel of every frame until ``inspector calibrate thresholds`` replaces it."""
    ic = cfg.inference
    if ic.tau_mode == "per_image_sigma":
        log.warning("inference.tau_mode per_image_sigma: the bundle has no kind_params.tau (each tile "
                    "thresholds its own D(R1, x) at mean + 3 std); postprocess.score_threshold is set "
                    "to the train-envelope tau %.5f (P%g of the normal crops' per-crop max of D), a "
                    "first value: run `inspector calibrate thresholds` on the line's normal frames",
                    tau, ic.tau_percentile)
    if not tau > 0:
        log.warning("postprocess.score_threshold %s (inference.tau of tau_mode %s): the score map is "
                    ">= 0, so this threshold marks every pixel of every frame; run `inspector calibrate "
                    "thresholds` before using the bundle", tau, ic.tau_mode)
    return float(tau)


def export_bundle(run_dir: Path, out: Path, name: str | None = None, opset: int = 17,
                  atol: float = PARITY_ATOL) -> Path:
    """Export the run's network into the bundle folder ``out`` (created or overwritten); a
    refused export (parity miss) removes the folders it created."""
    with removed_on_failure(Path(out)):
        return _export_bundle(run_dir, out, name, opset, atol)


def _export_bundle(run_dir: Path, out: Path, name: str | None, opset: int, atol: float) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    ck = load_checkpoint(run_dir / CHECKPOINT)
    cfg = FuzzymaskTrainConfig.model_validate(ck["config"])
    net = build_model(cfg, load_pretrained=False)  # the checkpoint holds every weight
    net.load_state_dict(ck["model"])
    net.eval()
    step, total = int(ck["step"]), int(ck["total"])
    metrics, fresh = metrics_for_checkpoint(run_dir, ck)
    envelope, tau_stats = _tau(run_dir, cfg, net, metrics, fresh, step)
    threshold = _first_threshold(cfg, envelope)
    # per_image_sigma: each tile thresholds its own D(R1, x); the envelope is only the first threshold
    tau = None if cfg.inference.tau_mode == "per_image_sigma" else envelope
    if fresh is False:
        log.warning("%s describes step %s, not the checkpoint's %d: its training figures are left "
                    "out of the bundle", run_dir / METRICS, metrics.get("checkpoint_step"), step)
        metrics = {}
    training = {k: metrics.get(k) for k in (
        "iterations", "planned_iterations", "epochs_done", "stopped_by", "train_seconds",
        "device", "world_size", "params", "final_losses_ema", "last_epoch_loss",
        "last_epoch_loss_steps", "preview_abs_error_grey")}
    # what the checkpoint itself knows: right even when metrics.json is stale or missing
    training.update(iterations=step, planned_iterations=total, checkpoint_step=step,
                    metrics_json=("unchecked (no checkpoint_step)" if metrics else "missing")
                    if fresh is None else ("current" if fresh else "stale: left out"))
    if training["train_seconds"] is None:
        training["train_seconds"] = round(float(ck.get("elapsed_s", 0.0)), 1)
    if step < total:  # as export.clgan.export warns
        log.warning("%s: training has not finished (step %d of %d); exporting it anyway",
                    run_dir / CHECKPOINT, step, total)
    split = split_provenance(cfg.data.split_test, cfg.data.split_val, str(run_dir / CHECKPOINT))
    params = kind_params(cfg, tau)
    ic, n, tile = cfg.inference, cfg.data.channels, cfg.tile()
    pp = PostprocessConfig.model_validate({
        "type": "score_threshold", "score_threshold": threshold,
        "open_kernel": ic.open_kernel, "close_kernel": ic.close_kernel, "min_area_px": ic.min_area_px})

    # from the graph moved in to bundle.yaml written, a stop waits: a stopped --replace
    # must not leave the new graph beside the old bundle.yaml (refused at load)
    with ExitStack() as hold:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
            staged = export_graph(net, Path(tmp) / GRAPH, tile, opset)
            inputs = {"probe": _probe_tiles(n, tile),
                      "random_batch": np.random.default_rng(1).random((3, n, tile, tile), dtype=np.float32)}
            real = _real_tiles(cfg)
            if real is not None:
                inputs["real"] = real
            else:
                log.warning("parity on real images skipped: the training data is not on this machine")
            parity = parity_check(net, staged, inputs, atol, named=out / GRAPH)
            hold.enter_context(signals_held())
            staged.replace(out / GRAPH)
        log.info("parity torch vs onnxruntime: max |diff| %.2e (atol %g) over %d tiles",
                 parity["max_abs_diff"], atol, parity["tiles"])

        import onnxruntime

        commit, dirty = git_commit(Path(__file__).resolve().parents[2])
        spec = BundleSpec(
            name=name or out.name, kind="fuzzymask",
            graphs={"model": GraphRef(file=GRAPH, sha256="")},
            input=InputSpec(name=INPUT_NAME, tile=(tile, tile), channels=n, mean=[0.0] * n, std=[1.0] * n,
                            batch=0),
            outputs={"reconstruction": OUTPUT_NAME},
            classes=["background", "defect"],
            tiling=TilingSpec(overlap=ic.overlap),
            postprocess=pp,
            kind_params=params,
            provenance={
                "method": "fuzzy-mask inpainter with multi-branch dynamic inference "
                          "(../shared/seeds/001_spec.md), trained on defect-free images only",
                "data": metrics.get("data") or [s.model_dump(mode="json") for s in cfg.data.sources],
                "training_config": cfg.model_dump(mode="json", exclude={"base_dir"}),
                "training": training,
                "tau": {"value": tau, "mode": ic.tau_mode, "stats": tau_stats,
                        # what the first postprocess.score_threshold is (calibrate thresholds replaces it)
                        "score_threshold": {"value": threshold,
                                            "from": "inference.tau" if ic.tau_mode == "fixed"
                                            else "train_envelope tau"}},
                # from the checkpoint: a stale metrics.json must not call a preempted run complete
                "training_complete": step >= total,
                # where an unfinished run stood (as the ARCD and CLGAN exporters record it)
                **({} if step >= total else {"checkpoint_at": {"step": step, "planned": total}}),
                "split_fractions": split,
                "run_dir": str(run_dir),
                "commit": commit, "commit_dirty": dirty,
                "parity": parity,
                "exporter": {"torch": str(torch.__version__), "onnxruntime": onnxruntime.__version__,
                             "opset": opset},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "metrics": {},
            },
        )
        write_bundle(out, spec)
    load_bundle(out)  # what the runtime does first: fail here rather than on the line
    log.info("bundle %s written (kind fuzzymask, tile %d, %d channel(s), graph %.2f MB, tau %s)", out,
             tile, n, (out / GRAPH).stat().st_size / 1e6, tau)
    return out
