"""CLGAN run -> model bundle of kind ``clgan``: the generator as ONNX, checked against torch.

Only G ships (spec §1.5: D and H are discarded at test time). The graph takes normalised tiles
``image`` [N, C, th, tw] (pixel/255, mean 0.5, std 0.5, i.e. [-1, 1]) and returns
``reconstruction`` [N, C, th, tw] in [-1, 1]; the batch axis is dynamic. The runtime adapter
(``inspector.models.clgan``) turns it into the spec's residual and the dual-threshold mask, with
the detection parameters of the run's config written into the bundle.

Parity: onnxruntime and torch must agree on random tiles and on near-flat, gradient and striped
tiles to ``atol`` (default 1e-3 on the [-1, 1] output, i.e. 0.13 grey levels); the measured
maximum is recorded in the bundle's provenance.

The training figures come from the run's ``metrics.json`` only when its ``checkpoint_step`` is
the exported checkpoint's step; otherwise (a run stopped after a later ``--resume``) they are
dropped with a warning and the provenance keeps what the checkpoint itself says (iterations,
train time, ``training_complete``). A checkpoint before the planned last iteration exports with a
warning and ``provenance.checkpoint_at`` (its step and the planned iterations), as ARCD's exporter
records where an unfinished run stood. ``provenance.split_fractions`` records the run's hash split.

Example::

    inspector export onnx --run-dir runs/clgan-mt --out deploy/models/clgan-mt
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspector.bundle import BundleSpec, GraphRef, InputSpec, TilingSpec, write_bundle
from inspector.signals import signals_held
from inspector.postprocess import PostprocessConfig

from export.clgan.torch_model import ResnetGenerator
from export.clgan.train import CHECKPOINT, METRICS, ClganTrainConfig, build_networks, load_checkpoint
from export.onnx_export import ExportParityError, removed_on_failure
from export.training import git_commit, metrics_for_checkpoint, run_kind, split_provenance

log = logging.getLogger(__name__)

__all__ = ["is_clgan_run", "export_generator", "parity_check", "export_bundle", "detection_kind_params"]

GRAPH = "model.onnx"


def is_clgan_run(run_dir: Path) -> bool:
    """True when the run's checkpoint (else its config.yaml) says ``kind: clgan`` (how the CLI
    picks the exporter; :func:`export.training.run_kind`)."""
    return run_kind(run_dir) == "clgan"


def export_generator(G: ResnetGenerator, path: Path, tile: tuple[int, int], opset: int = 17) -> Path:
    """Write G (eval mode) to ``path`` as ONNX with a dynamic batch axis."""
    G = G.eval()
    dummy = torch.zeros(1, G.in_channels, *tile)
    # The TorchScript-based exporter: it needs no onnxscript, and the graph is plain convs,
    # instance norms, pads and Tanh, which it maps one to one. Its deprecation and
    # instance-norm-in-eval notices are expected here (G normalises per image by design).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(G, (dummy,), str(path), input_names=["image"], output_names=["reconstruction"],
                          dynamic_axes={"image": {0: "N"}, "reconstruction": {0: "N"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    return path


def _probe_tiles(channels: int, tile: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random, near-flat, gradient and striped tiles in [-1, 1]: the inputs the parity check compares."""
    th, tw = tile
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:th, 0:tw].astype(np.float32)
    tiles = [rng.uniform(-1, 1, (channels, th, tw)),
             # near-flat, not flat: on an exactly constant tile every instance norm divides
             # rounding noise by sqrt(eps), so torch and onnxruntime legitimately disagree there
             0.2 + rng.normal(0, 0.02, (channels, th, tw)),
             np.broadcast_to((xx / tw * 2 - 1)[None], (channels, th, tw)),
             np.broadcast_to(np.sin(yy / 3.0)[None] * 0.8, (channels, th, tw))]
    return np.stack(tiles).astype(np.float32)


def parity_check(G: ResnetGenerator, graph: Path, tile: tuple[int, int], atol: float = 1e-3,
                 named: Path | None = None) -> dict:
    """Run the probe tiles through torch and onnxruntime; raise when they differ by > ``atol``,
    naming ``named`` (the bundle's graph a staged ``graph`` would have become) or ``graph``."""
    import onnxruntime as ort

    x = _probe_tiles(G.in_channels, tile)
    with torch.no_grad():
        ref = G.eval()(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"image": x[i:i + 1]})[0] for i in range(len(x))]
                         + [sess.run(None, {"image": x[:2]})[0]])  # batch 1 and a batch of 2
    ref = np.concatenate([ref, ref[:2]])
    diff = float(np.abs(got - ref).max())
    result = {"max_abs_diff": diff, "atol": atol, "tiles": int(len(x)) + 2, "tile": list(tile)}
    if not np.isfinite(diff) or diff > atol:
        raise ExportParityError(f"{named or graph}: ONNX and torch differ by {diff:.3g} > {atol} on the parity "
                                "tiles; the graph was not bundled")
    return result


def detection_kind_params(cfg: ClganTrainConfig) -> dict[str, Any]:
    d = cfg.detection
    return {"gauss_ksize": d.gauss_ksize, "gauss_sigma": d.gauss_sigma,
            "residual_mode": d.residual_mode, "local_mean_window": d.local_mean_window,
            "output_range": [-1.0, 1.0]}


def checkpoint_at(step: int, total: int) -> dict[str, int]:
    """``provenance.checkpoint_at`` of a run exported before it finished: the checkpoint's step
    and the planned steps (ARCD's records ``stage`` and ``step``; CLGAN and fuzzymask have one
    stage)."""
    return {"step": int(step), "planned": int(total)}


def _metrics_status(metrics: dict, fresh: bool | None) -> str:
    """How the bundle's training figures relate to the checkpoint, for the provenance."""
    if fresh is None:
        return "unchecked (no checkpoint_step)" if metrics else "missing"
    return "current" if fresh else "stale: left out"


def export_bundle(run_dir: Path, out: Path, name: str | None = None, opset: int = 17,
                  atol: float = 1e-3, tile: tuple[int, int] | None = None) -> Path:
    """Export the run's generator into the bundle folder ``out`` (created or overwritten); a
    refused export (parity miss) removes the folders it created."""
    with removed_on_failure(Path(out)):
        return _export_bundle(run_dir, out, name, opset, atol, tile)


def _export_bundle(run_dir: Path, out: Path, name: str | None, opset: int, atol: float,
                   tile: tuple[int, int] | None) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    ck = load_checkpoint(run_dir / CHECKPOINT)
    cfg = ClganTrainConfig.model_validate(ck["config"])
    G, _, _ = build_networks(cfg)
    G.load_state_dict(ck["G"])
    G.eval()
    tile = tuple(tile or cfg.detection.tile)
    # from the graph moved in to bundle.yaml written, a stop waits: a stopped --replace
    # must not leave the new graph beside the old bundle.yaml (refused at load)
    with ExitStack() as hold:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            staged = export_generator(G, Path(tmp) / GRAPH, tile, opset)
            parity = parity_check(G, staged, tile, atol, named=out / GRAPH)
            hold.enter_context(signals_held())
            staged.replace(out / GRAPH)
        log.info("parity torch vs onnxruntime: max |diff| %.2e (atol %g)", parity["max_abs_diff"], atol)
        step, total = int(ck["step"]), int(ck["total"])
        metrics, fresh = metrics_for_checkpoint(run_dir, ck)
        if fresh is False:
            log.warning("%s describes iteration %s but %s is at iteration %d (the run went on after "
                        "its metrics were written and stopped before writing new ones): its figures "
                        "are left out of the bundle; finish the run with --resume for fresh ones",
                        run_dir / METRICS, metrics.get("checkpoint_step"), run_dir / CHECKPOINT, step)
            metrics = {}
        training = {k: metrics.get(k) for k in ("iterations", "stopped_by", "train_seconds", "device",
                                                "threads", "params", "final_losses_ema",
                                                "preview_abs_error_grey")}
        # what the checkpoint itself knows: right even when metrics.json is stale or missing
        training.update(iterations=step, planned_iterations=total, checkpoint_step=step,
                        metrics_json=_metrics_status(metrics, fresh))
        if training["train_seconds"] is None:
            training["train_seconds"] = round(float(ck.get("elapsed_s", 0.0)), 1)
        if step < total:
            log.warning("%s: training has not finished (iteration %d of %d); exporting it anyway",
                        run_dir / CHECKPOINT, step, total)
        d = cfg.detection
        n = cfg.data.channels
        spec = BundleSpec(
            name=name or out.name, kind="clgan",
            graphs={"model": GraphRef(file=GRAPH, sha256="")},
            input=InputSpec(name="image", tile=tile, channels=n, mean=[0.5] * n, std=[0.5] * n, batch=0),
            outputs={"reconstruction": "reconstruction"},
            classes=["background", "defect"],
            tiling=TilingSpec(overlap=d.overlap),
            postprocess=PostprocessConfig(type="dual_threshold", k1=d.k1, k2=d.k2, kernel_size=d.kernel_size),
            kind_params=detection_kind_params(cfg),
            provenance={
                "method": "CLGAN (../shared/seeds/002_spec.md): contrastive GAN reconstruction, "
                          "trained on defect-free images only",
                "data": metrics.get("data") or [s.model_dump(mode="json") for s in cfg.data.sources],
                "training_config": cfg.model_dump(mode="json", exclude={"base_dir"}),
                "training": training,
                "training_complete": step >= total,
                # where an unfinished run stood (as ARCD's exporter records it), for `inspector check`
                **({} if step >= total else {"checkpoint_at": checkpoint_at(step, total)}),
                "split_fractions": split_provenance(cfg.data.split_test, cfg.data.split_val,
                                                    str(run_dir / CHECKPOINT)),
                "commit": git_commit(Path(__file__).resolve().parents[2])[0],
                "parity": parity,
                "opset": opset,
                "torch": str(torch.__version__),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "metrics": {},
            },
        )
        write_bundle(out, spec)
    log.info("bundle %s written (kind clgan, tile %s, %d channel(s))", out, list(tile), n)
    return out
