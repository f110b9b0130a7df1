"""Evaluate a model bundle on a labelled image folder, exactly as the runtime would run it.

Each image goes through the bundle's adapter (tiling, engine, decoding) and the bundle's
:class:`~inspector.postprocess.Postprocessor` (optionally overridden), then through the metric
accumulators registered for the bundle's kind in :data:`METRICS_BY_KIND`. The result is one
JSON-ready dict; with ``out_dir`` it is also written as ``metrics.json``, with each defective
image's scores in ``per_image.jsonl`` and overlay PNGs (input | score heat map | truth in green,
prediction in red) in ``overlays/``.

A bundle with a region head (``region:`` in bundle.yaml) adds ``"region"``: its
:class:`~inspector.evaluation.metrics.RegionMetrics` on a data set with region labels, null
(and a log line saying why) on one without; bundles without a head add no such key.

Adding metrics for a kind: append a factory to ``METRICS_BY_KIND[kind]`` (or call
:func:`register_metric`); its ``result()`` keys join the top level of the JSON.

Example::

    from inspector.evaluation.datasets import open_dataset
    from inspector.evaluation.evaluate import evaluate_bundle
    ds = open_dataset("magnetic-tile", "../shared/data/magnetic_tile", split="test")
    res = evaluate_bundle("deploy/models/clgan-mt", ds, out_dir=Path("eval-out"), overlays=16)
    res["f1"], res["pixel_auroc"], res["false_alarm_rate"]
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from inspector.bundle import BUNDLE_FILE, Bundle, load_bundle
from inspector.engines.base import Engine
from inspector.errors import BundleError
from inspector.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine
from inspector.evaluation.datasets import Dataset, Sample
from inspector.evaluation.metrics import (ClassConfusion, Counts, DefectPixelMetrics,
                                          DynamicInferenceStats, FalseAlarm, FrameResult, Metric,
                                          PerClassAUROC, PixelAUROC, RegionMetrics,
                                          confusion_matrix, scores)
from inspector.models import ModelAdapter, make_adapter
from inspector.postprocess import (RECIPE_KEYS, PostprocessConfig, Postprocessor, keys_unused_by, recipe_misfit,
                                   shadowed_threshold)

log = logging.getLogger(__name__)

__all__ = ["METRICS_BY_KIND", "register_metric", "Runner", "evaluate_bundle", "overlay"]

#: metric accumulators per model kind; every kind gets the binary defect-mask metrics
METRICS_BY_KIND: dict[str, list[Callable[[], Metric]]] = {
    "clgan": [DefectPixelMetrics, PixelAUROC, FalseAlarm],
    # class-probability bundles: also the thesis's MIoU / MPA over all classes; the AUROC is of
    # the adapter's score map, 1 - p(background), and per class one-vs-rest (the thesis's columns)
    "arcd": [DefectPixelMetrics, PixelAUROC, FalseAlarm, ClassConfusion, PerClassAUROC],
    # the same figures as clgan (pixel AUROC is the paper's metric), plus the branch statistics
    # of dynamic inference
    "fuzzymask": [DefectPixelMetrics, PixelAUROC, FalseAlarm, DynamicInferenceStats],
}


def register_metric(kind: str, factory: Callable[[], Metric]) -> None:
    METRICS_BY_KIND.setdefault(kind, []).append(factory)


class Runner:
    """A bundle loaded for offline use: adapter + post-processing, one image at a time.

    ``engine``: ONNX Runtime settings for the bundle's graph, or an engine already open on it
    (``export.arcd.torch_engine.TorchArcdEngine`` on a training GPU, say); that one needs
    ``bundle`` as a loaded :class:`Bundle`."""

    def __init__(self, bundle: str | Path | Bundle, postprocess: dict[str, Any] | None = None,
                 engine: OnnxRuntimeConfig | Engine | None = None, max_batch: int = 0,
                 kind_params: dict[str, Any] | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if kind_params:  # a copy: the caller's bundle object keeps its own parameters
            spec = self.bundle.spec.model_copy(update={
                "kind_params": {**self.bundle.spec.kind_params, **kind_params}})
            self.bundle = Bundle(self.bundle.path, spec)
        spec = self.bundle.spec
        merged = spec.postprocess.model_dump() | (postprocess or {})
        self.pp_config = PostprocessConfig.model_validate(merged)
        shadowed = shadowed_threshold(self.pp_config, postprocess or {}, spec.classes)
        if shadowed:
            raise BundleError(f"threshold (override): {shadowed}")
        unused = keys_unused_by(self.pp_config.type, postprocess or {})
        if unused:
            # a camera config refuses the same key: here it changed nothing and scored as if it had
            raise BundleError(f"{unused[0]} (override): the {self.pp_config.type} post-processing of "
                              f"{self.bundle.path.name} does not read it; it reads "
                              f"{', '.join(RECIPE_KEYS[self.pp_config.type])} and min_area_px, "
                              "connectivity, max_defects")
        self.post = Postprocessor(self.pp_config, spec.classes)
        self.engine = engine if isinstance(engine, Engine) else \
            OnnxRuntimeEngine(self.bundle.graph_path("model"), engine)
        self.adapter: ModelAdapter = make_adapter(self.bundle, self.engine, max_batch)
        misfit = recipe_misfit(self.pp_config.type, self.adapter.outputs)
        if misfit:
            where = "--set type" if "type" in (postprocess or {}) else \
                f"{self.bundle.path / BUNDLE_FILE}: postprocess.type"
            raise BundleError(f"{where}: {misfit}")
        if kind_params and getattr(self.adapter, "params", None) is None:
            # a kind without parameters would ignore them: refuse, naming the first key
            key = sorted(kind_params)[0]
            raise BundleError(f"{self.bundle.path / BUNDLE_FILE}: kind_params.{key}: kind "
                              f"'{spec.kind}' takes no kind_params")

    def run(self, image: np.ndarray, keep_maps: bool = False) -> FrameResult:
        """Post-processed result of one image. The adapter's pooled buffers are copied out when
        ``keep_maps`` (the caller keeps them past the next call) and handed back either way."""
        out = self.adapter.infer(image)
        try:
            label = self.post.mask(out.probs, out.residual, out.score_map)
            defects, _ = self.post.defects(label, out.score_map)
            cp = (lambda a: None if a is None else np.array(a, copy=True)) if keep_maps else (lambda a: a)
            # the region map is copied like the score map: the adapter's buffer goes back below
            region = None if out.region is None else np.array(out.region, copy=True)
            return FrameResult(label=label, score_map=np.array(out.score_map, copy=True),
                               probs=cp(out.probs), residual=cp(out.residual), defects=defects,
                               stats=dict(out.stats), region=region)
        finally:
            if out.release:
                out.release()


def _resize(sample: Sample, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    if size is None:
        return sample.image, sample.mask
    h, w = size
    img = cv2.resize(sample.image, (w, h), interpolation=cv2.INTER_AREA)
    # nearest keeps class indices intact (spec §3.2: GT resized nearest-neighbour)
    mask = cv2.resize(sample.mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return img, mask


def _resize_region(region: np.ndarray | None, size: tuple[int, int] | None) -> np.ndarray | None:
    if region is None or size is None:
        return region
    h, w = size
    # nearest, as the class mask: the label stays 0/1
    return cv2.resize(region, (w, h), interpolation=cv2.INTER_NEAREST)


def overlay(image: np.ndarray, score: np.ndarray, truth: np.ndarray, label: np.ndarray) -> np.ndarray:
    """BGR panel: input | score heat map (scaled to this image's max) | truth contour (green)
    over prediction (red)."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    base = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    top = float(score.max())
    heat = np.zeros(score.shape, np.uint8) if top <= 0 else \
        np.clip(score * (255.0 / top), 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(heat, cv2.COLORMAP_INFERNO)
    mix = base.copy()
    pred = label > 0
    mix[pred] = (0.45 * mix[pred] + 0.55 * np.array([0, 0, 255])).astype(np.uint8)
    contours, _ = cv2.findContours((truth > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(mix, contours, -1, (0, 255, 0), 1)
    return np.concatenate([base, heat, mix], axis=1)


def evaluate_bundle(bundle: str | Path | Bundle | Runner, dataset: Dataset, out_dir: Path | None = None,
                    overlays: int = 0, postprocess: dict[str, Any] | None = None,
                    resize: tuple[int, int] | None = None, engine: OnnxRuntimeConfig | None = None,
                    auroc_stride: int = 1, overlay_pick: str | None = None,
                    kind_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``dataset`` through the bundle and return the metrics of its kind (see module doc).

    ``postprocess`` and ``kind_params`` override the bundle's sections for this run only.

    ``auroc_stride``: the pixel and per-class AUROC keep every ``auroc_stride``-th pixel of each
    image (row-major), which divides their memory by it; 1 (default) is exact. Recorded in the
    result as ``auroc_stride``.

    ``overlay_pick``: ``"spread"`` draws the ``overlays`` images evenly over the data set,
    ``"worst-best"`` the defective images with the lowest and highest defect IoU (half each,
    named ``worst_NN_*`` / ``best_NN_*``); default worst-best for class-probability kinds."""
    try:
        return _evaluate_bundle(bundle, dataset, out_dir, overlays, postprocess, resize, engine,
                                auroc_stride, overlay_pick, kind_params)
    except BaseException:
        # stopped or failed anywhere (the image loop, the overlay pass, the final figures): no
        # per_image file that looks whole, and no partial one left either
        if out_dir is not None:
            (out_dir / "per_image.jsonl.partial").unlink(missing_ok=True)
        raise


def _evaluate_bundle(bundle, dataset: Dataset, out_dir: Path | None, overlays: int,
                     postprocess: dict[str, Any] | None, resize: tuple[int, int] | None,
                     engine: OnnxRuntimeConfig | None, auroc_stride: int, overlay_pick: str | None,
                     kind_params: dict[str, Any] | None) -> dict[str, Any]:
    if int(auroc_stride) < 1:
        raise ValueError(f"auroc_stride {auroc_stride}: expected 1 (every pixel) or more")
    runner = bundle if isinstance(bundle, Runner) else Runner(bundle, postprocess, engine,
                                                              kind_params=kind_params)
    spec = runner.bundle.spec
    factories = METRICS_BY_KIND.get(spec.kind, METRICS_BY_KIND["clgan"])
    # the AUROC accumulators keep every auroc_stride-th pixel of each image (memory / stride)
    metrics = [f(auroc_stride) if f in (PixelAUROC, PerClassAUROC) else f() for f in factories]
    if len(dataset) == 0:
        raise ValueError(f"{dataset.root}: no images in split '{dataset.split}' ({dataset.format} layout)")
    if spec.kind == "arcd" and list(dataset.classes) != list(spec.classes):
        # Class-index masks are compared index by index: a magnetic-tile Blowhole would be
        # scored as NEU's "inclusion", and the figures (with --record, stored in the bundle)
        # would mean nothing. Residual kinds only tell defect from background: any masks do.
        raise ValueError(f"{dataset.root}: the {dataset.format} data set's classes {list(dataset.classes)} "
                         f"are not the bundle's {list(spec.classes)} ({runner.bundle.path}); "
                         "evaluate a class-probability model on data labelled with its own classes")
    region_metric: RegionMetrics | None = None
    if spec.region is not None:
        if dataset.has_regions:
            region_metric = RegionMetrics(spec.region.name, spec.region.threshold, auroc_stride)
        else:
            log.warning("%s: the bundle's region head (%s) is not scored (\"region\": null): the %s "
                        "data set %s has no region labels (NEU-Seg: regions/<subset>/<stem>.png)",
                        runner.bundle.path, spec.region.name, dataset.format, dataset.root)
    if overlay_pick is None:
        overlay_pick = "worst-best" if spec.kind == "arcd" else "spread"
    if overlay_pick not in ("spread", "worst-best"):
        raise ValueError(f"overlay_pick {overlay_pick!r}: expected 'spread' or 'worst-best'")
    image_iou: list[tuple[float, int]] = []  # (defect IoU, index) of defective images
    pick = set()
    if overlays > 0 and overlay_pick == "spread":
        pick = {int(i) for i in np.linspace(0, len(dataset) - 1, min(overlays, len(dataset)))}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if overlays > 0:
            (out_dir / "overlays").mkdir(exist_ok=True)
    # written under another name and renamed with metrics.json: a run stopped part-way (Ctrl-C, a
    # bad image) must not leave a per_image.jsonl that looks whole to compare_bundles.py
    partial = out_dir / "per_image.jsonl.partial" if out_dir is not None else None
    per_image_f = open(partial, "w") if partial is not None else None
    t0 = time.perf_counter()
    infer_ms: list[float] = []
    try:
        for i in range(len(dataset)):
            sample = dataset.load(i)
            img, truth = _resize(sample, resize)
            t = time.perf_counter()
            res = runner.run(img)
            infer_ms.append((time.perf_counter() - t) * 1e3)
            for m in metrics:
                m.update(truth, res, sample.name)
            if region_metric is not None:
                if res.region is None:
                    raise BundleError(f"{runner.bundle.path / BUNDLE_FILE}: region: set, but the "
                                      f"engine ({runner.engine.backend}) gave no region map")
                region_metric.update(_resize_region(sample.region, resize), res.region)
            if truth.any():
                image_iou.append((scores(Counts.of(res.label > 0, truth > 0))["iou"], i))
            if per_image_f is not None:
                n_pred = int(np.count_nonzero(res.label))
                row = {"image": sample.name, "defective": bool(truth.any()),
                       "truth_px": int(np.count_nonzero(truth)), "pred_px": n_pred,
                       "defects": len(res.defects), "score_max": round(float(res.score_map.max()), 3)}
                if res.stats:  # fuzzymask: engine rounds, converged tiles of this image
                    row["model_stats"] = res.stats
                if res.probs is not None:
                    # class-index kinds: this image's K x K pixel confusion (rows truth), so two
                    # bundles can be compared image by image (benchmarks/compare_bundles.py)
                    k = max(len(spec.classes), int(truth.max()) + 1)
                    row["confusion"] = confusion_matrix(res.label, truth, k).tolist()
                per_image_f.write(json.dumps(row) + "\n")
            if out_dir is not None and i in pick:
                name = f"{sample.entry.category}_{sample.entry.stem}.png".replace("/", "_")
                cv2.imwrite(str(out_dir / "overlays" / name), overlay(img, res.score_map, truth, res.label))
            if (i + 1) % 50 == 0:
                log.info("evaluated %d/%d images", i + 1, len(dataset))
    finally:
        if per_image_f is not None:
            per_image_f.close()
    if out_dir is not None and overlays > 0 and overlay_pick == "worst-best" and image_iou:
        # a second pass over a handful of images is cheaper than keeping every map in memory
        ranked = sorted(image_iou)
        n_worst = min(len(ranked), (overlays + 1) // 2)
        n_best = min(len(ranked) - n_worst, overlays - n_worst)
        chosen = [("worst", r, ranked[r]) for r in range(n_worst)] + \
                 [("best", r, ranked[-1 - r]) for r in range(n_best)]
        for tag, rank, (iou_i, i) in chosen:
            sample = dataset.load(i)
            img, truth = _resize(sample, resize)
            res = runner.run(img)
            name = f"{tag}_{rank + 1:02d}_{sample.entry.category}_{sample.entry.stem}.png".replace("/", "_")
            cv2.imwrite(str(out_dir / "overlays" / name), overlay(img, res.score_map, truth, res.label))
    result: dict[str, Any] = {}
    for m in metrics:
        part = m.result()
        clash = set(part) & set(result)
        if clash:
            raise RuntimeError(f"metric {type(m).__name__} repeats keys {sorted(clash)}")
        result.update(part)
    if "per_class_iou" in result:
        # the accumulator counts classes by index; name them with the bundle's class list
        names = list(spec.classes)
        for key in ("per_class_iou", "per_class_pa", "per_class_auroc"):
            if result.get(key) is not None:
                result[key] = {(names[c] if c < len(names) else str(c)): v
                               for c, v in enumerate(result[key])}
    if spec.region is not None:
        result["region"] = region_metric.result() if region_metric is not None else None
    pp = runner.pp_config
    result.update({
        "bundle": str(runner.bundle.path), "kind": spec.kind,
        "data": {**dataset.summary(), "resize": list(resize) if resize else None, "notes": dataset.notes},
        # what decided the figures: the keys its recipe reads (the class thresholds too), not
        # the other recipes' defaults
        "postprocess": {"type": pp.type,
                        **{k: getattr(pp, k) for k in RECIPE_KEYS[pp.type]}, "min_area_px": pp.min_area_px},
        "images": len(dataset),
        # 1: the AUROCs are exact; N: of every N-th pixel of each image
        "auroc_stride": int(auroc_stride),
        # the parameters that decide the anomaly map (fuzzymask: m, tau, flags), as run
        "kind_params": _kind_params(runner.adapter, spec.kind_params),
        "ms_per_image": round(float(np.mean(infer_ms)), 2),
        "engine": runner.engine.backend,
        "seconds": round(time.perf_counter() - t0, 1),
    })
    if out_dir is not None:
        os.replace(partial, out_dir / "per_image.jsonl")
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if "min_area_px" in (postprocess or {}):
        log.warning("min_area_px (override) thins the defect lists (per_image.jsonl's defects, "
                    "false_alarm_rate_reported on normal images), not the mask: the pixel figures "
                    "are of the mask before it, as the runtime publishes it")
    return result


def _kind_params(adapter: ModelAdapter, raw: dict[str, Any]) -> dict[str, Any] | None:
    """The kind's parameters with the defaults filled in where the adapter validated them."""
    params = getattr(adapter, "params", None)
    if params is not None and hasattr(params, "model_dump"):
        return params.model_dump(mode="json")
    return dict(raw) or None


RECORD_KEYS = ("precision", "recall", "f1", "iou", "acc", "pixel_auroc", "false_alarm_rate",
               "false_alarm_px_per_mpx", "false_alarm_rate_reported", "defective_images",
               "normal_images", "ms_per_image", "miou", "miou_defects", "mpa", "per_class_iou",
               "per_class_auroc", "dynamic_inference")


def record_metrics(bundle: str | Path, result: dict[str, Any], key: str | None = None) -> str:
    """Store the headline figures of ``result`` in the bundle's ``provenance.metrics[key]``
    (default key ``<format>/<split>``), with the post-processing and the kind's parameters (the
    residual / anomaly-map settings) they were measured with."""
    from datetime import datetime, timezone

    from inspector.bundle import BundleSpec, write_bundle

    from inspector.evaluation.options import check_record_key

    b = load_bundle(bundle)
    d = result["data"]
    # never over an entry the exporter wrote (the trainer's validation record and the like)
    check_record_key(key, (b.spec.provenance or {}).get("metrics"), str(bundle))
    key = key or f"{d['format']}/{d['split']}"
    entry = {k: result.get(k) for k in RECORD_KEYS}
    entry.update(postprocess=result["postprocess"], data_root=d["root"], images=result["images"],
                 # AUROCs of a subsample say so; exact ones (stride 1) keep the entry as it was
                 **({"auroc_stride": result["auroc_stride"]} if result.get("auroc_stride", 1) != 1 else {}),
                 **({"kind_params": result["kind_params"]} if result.get("kind_params") else {}),
                 # the region head's figures, where it was scored (a bundle without one: no key)
                 **({"region": result["region"]} if result.get("region") else {}),
                 measured=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    raw = b.spec.model_dump(mode="json")
    raw.setdefault("provenance", {}).setdefault("metrics", {})[key] = entry
    write_bundle(b.path, BundleSpec.model_validate(raw))
    return key
