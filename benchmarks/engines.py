"""Compare inference backends on model bundles: latency (JSON + PNG), parity, and the GPU check.

Backends, each skipped with its reason where it cannot run here:

==============  =================================================================================
torch-eager     the bundle's network in torch (architecture from the bundle's provenance; trained
                weights where the run's checkpoint is at hand, else random: timing only), CUDA if
                torch sees a GPU
ort-cpu         ONNX Runtime, CPU execution provider (the reference for parity)
ort-cuda        ONNX Runtime, CUDA execution provider (needs an onnxruntime-gpu build), strict fp32
ort-cuda-tf32   the same with TF32 tensor-core math (onnxruntime's own default; the runtime's is off)
ort-trt         ONNX Runtime, TensorRT execution provider
trt-fp32/16/i8  native TensorRT engine (inspector.engines.tensorrt) at that precision; int8 is
                calibrated on rendered synthetic strip frames
==============  =================================================================================

Frame shapes: ``256x256`` (one 256-px tile) and ``256x1600`` (the line camera's frame, 7 tiles).
Per backend and shape it times ``adapter.infer`` (preprocess + engine + decode, what the infer
stage does per frame) and post-processing, p50/p90/p99 over ``--iters`` frames after warm-up.

    python benchmarks/engines.py bench --out bench-engines            # shipped bundles
    python benchmarks/engines.py bench --bundle deploy/models/demo-arcd --backends ort-cpu,trt-fp16
    python benchmarks/engines.py gpu-check --out gpu-check.json       # what gpu_check.sh runs

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks.engines")

BACKENDS = ("torch-eager", "ort-cpu", "ort-cuda", "ort-cuda-tf32", "ort-trt", "trt-fp32", "trt-fp16",
            "trt-int8")
SHAPES = ((256, 256), (256, 1600))
FP32_TOL = 1e-3      # max abs difference of probabilities, fp32 backends against ORT CPU
FP16_IOU = 0.99      # published-mask IoU, fp16 against fp32
TRT_BATCH = "1:7:8"  # the 256x1600 frame is 7 tiles; 8 leaves room for a 1-tile frame's pad


class Skip(Exception):
    """A backend cannot run here; the message is the recorded reason."""


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3),
            "n": int(a.size)}


# -- environment ---------------------------------------------------------------------------------
def _try_version(module: str) -> tuple[str | None, str | None]:
    try:
        importlib.import_module(module)
        top = sys.modules[module.split(".")[0]]
        return str(getattr(top, "__version__", None) or getattr(top, "VERSION_TEXT", "?")), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _cmd(args: list[str], timeout: float = 20) -> str | None:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        return (r.stdout or r.stderr).strip()[:2000]
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__})"


def environment() -> dict[str, Any]:
    """What this machine has, for the record (and for the skip reasons)."""
    import onnxruntime as ort

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu_cores": os.cpu_count(), "numpy": np.__version__,
                           "onnxruntime": ort.__version__,
                           "onnxruntime_providers": ort.get_available_providers()}
    for mod in ("torch", "tensorrt", "pycuda.driver", "onnx", "cupy", "zmq"):
        v, err = _try_version(mod)
        env[mod] = v if v else f"not importable ({err})"
    if env["torch"] and not str(env["torch"]).startswith("not importable"):
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["torch_sees_gpu"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    env["nvidia_smi"] = _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"]) if shutil.which("nvidia-smi") else "not found"
    env["nvcc"] = (_cmd(["nvcc", "--version"]) or "").splitlines()[-1:] if shutil.which("nvcc") else "not found"
    return env


# -- bundles -------------------------------------------------------------------------------------
def shipped_bundles() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "deploy" / "models").glob("*/bundle.yaml"))


def toy_bundle(work: Path) -> Path:
    """The tests' hand-built dark-spot graph (256-px tiles), where no bundle is shipped."""
    sys.path.insert(0, str(ROOT / "tests"))
    from toy_models import dark_spot_bundle

    return dark_spot_bundle(work / "toy-darkspot", tile=256,
                            classes=("background", "inclusion", "patches", "scratches"))


def thesis_bundle(work: Path, channels: int = 1) -> Path:
    """ARCD at the thesis widths (R 128, D 64; untrained, seeded) as a bundle, for timing only."""
    import torch

    from export.arcd.torch_model import ARCDInference
    from export.arcd.train import ModelConfig, TrainConfig, build_models
    from export.onnx_export import GRAPH_FILE, INPUT_NAME, export_onnx
    from inspector.bundle import BundleSpec, GraphRef, InputSpec, write_bundle
    from inspector.postprocess import PostprocessConfig

    out = work / "arcd-thesis-untrained"
    if (out / "bundle.yaml").is_file():
        return out
    torch.manual_seed(0)
    mc = ModelConfig(in_channels=channels, mean=[0.0] * channels, std=[1.0] * channels)
    r, d = build_models(mc)
    model = ARCDInference(r, d).eval()
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out / GRAPH_FILE, channels, tuple(mc.tile))
    tc = TrainConfig(model=mc)
    spec = BundleSpec(name=out.name, kind="arcd", graphs={"model": GraphRef(file=GRAPH_FILE, sha256="")},
                      input=InputSpec(name=INPUT_NAME, tile=tuple(mc.tile), channels=channels,
                                      mean=list(mc.mean), std=list(mc.std)),
                      outputs={"probabilities": "probs", "reconstruction": "reconstruction"},
                      classes=list(mc.classes), postprocess=PostprocessConfig(type="probability"),
                      provenance={"training_config": tc.model_dump(mode="json"),
                                  "note": "untrained thesis-width ARCD for latency only"})
    write_bundle(out, spec)
    return out


def synthetic_frames(h: int, w: int, count: int, seed: int = 7, defect_rate: float = 1.0) -> list[np.ndarray]:
    from inspector.sources.synthetic import StripRenderer

    r = StripRenderer(w, h, seed=seed)
    rng = np.random.default_rng(seed)
    return [r.render(rng, defect_rate)[0] for _ in range(count)]


def calibration_folder(work: Path, frames: int = 16) -> Path:
    import cv2

    d = work / "calib-synthetic"
    if d.is_dir() and len(list(d.glob("*.png"))) >= frames:
        return d
    d.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(synthetic_frames(256, 1600, frames, seed=11, defect_rate=0.5)):
        cv2.imwrite(str(d / f"frame{i:03d}.png"), f)
    return d


# -- backends ------------------------------------------------------------------------------------
def torch_engine(bundle: Any) -> Any:
    """The bundle's ARCD network in torch eager (``export.arcd.torch_engine``), CUDA if torch sees
    a GPU; the run's checkpoint where it is at hand, else random weights (timing only)."""
    try:
        import torch  # noqa: F401

        from export.arcd.torch_engine import TorchArcdEngine
    except Exception as e:
        raise Skip(f"torch or the training code not importable ({type(e).__name__}: {e})") from None
    from inspector.errors import EngineError

    try:
        return TorchArcdEngine(bundle, allow_random=True)
    except EngineError as e:
        raise Skip(str(e)) from None


def open_backend(name: str, bundle: Any, work: Path) -> Any:
    """An engine for backend ``name`` on ``bundle``, or Skip with the reason."""
    import onnxruntime as ort

    from inspector.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine
    from inspector.errors import EngineError

    graph = bundle.graph_path("model")
    avail = ort.get_available_providers()
    if name == "torch-eager":
        return torch_engine(bundle)
    if name == "ort-cpu":
        return OnnxRuntimeEngine(graph, OnnxRuntimeConfig(providers=["cpu"]))
    if name in ("ort-cuda", "ort-cuda-tf32", "ort-trt"):
        want = "TensorrtExecutionProvider" if name == "ort-trt" else "CUDAExecutionProvider"
        if want not in avail:
            raise Skip(f"this onnxruntime {ort.__version__} build has no {want} (it has "
                       f"{', '.join(avail)}); onnxruntime-gpu is needed, built for this CUDA")
        cfg = OnnxRuntimeConfig(providers=["tensorrt", "cuda"] if name == "ort-trt" else ["cuda"],
                                cuda_tf32=name == "ort-cuda-tf32", trt_engine_cache=str(work / "ort-trt-cache"))
        try:
            eng = OnnxRuntimeEngine(graph, cfg)
        except EngineError as e:  # in the build, but CUDA would not start: no figure, not a fault
            raise Skip(f"asked onnxruntime for {want}: {e}") from None
        if want not in eng.backend:
            raise Skip(f"asked onnxruntime for {want}, the session runs on {eng.backend}")
        return eng
    if name.startswith("trt-"):
        from inspector.engines.tensorrt import TensorRTConfig, TensorRTEngine
        from inspector.engines.trt_build import parse_shapes

        from inspector.engines.trt_build import import_pycuda, import_tensorrt

        try:
            import_tensorrt()
            import_pycuda()
        except EngineError as e:
            raise Skip(str(e)) from None
        precision = {"trt-fp32": "fp32", "trt-fp16": "fp16", "trt-int8": "int8"}[name]
        p = parse_shapes(TRT_BATCH)[0]
        cfg = TensorRTConfig(precision=precision, min_batch=p.min, opt_batch=p.opt, max_batch=p.max,
                             cache_dir=str(work / "engines"),
                             calib_dir=str(calibration_folder(work)) if precision == "int8" else None)
        try:
            return TensorRTEngine(graph, cfg)
        except EngineError as e:
            raise Skip(str(e)) from None
    raise ValueError(f"unknown backend {name}; known: {', '.join(BACKENDS)}")


# -- measuring -----------------------------------------------------------------------------------
def time_backend(adapter: Any, post: Any, frames: list[np.ndarray], warmup: int, iters: int,
                 deadline: float) -> dict[str, Any]:
    parts: dict[str, list[float]] = {"infer": [], "preprocess": [], "engine": [], "decode": [], "post": []}
    for i in range(warmup + iters):
        if i >= warmup + 2 and time.monotonic() > deadline:
            break
        f = frames[i % len(frames)]
        t0 = time.perf_counter()
        out = adapter.infer(f)
        t1 = time.perf_counter()
        label = post.mask(out.probs, out.residual, out.score_map)
        post.defects(label, out.score_map)
        t2 = time.perf_counter()
        if out.release:
            out.release()
        if i < warmup:
            continue
        parts["infer"].append((t1 - t0) * 1e3)
        parts["post"].append((t2 - t1) * 1e3)
        for k in ("preprocess", "engine", "decode"):
            parts[k].append(out.timings_ms.get(k, float("nan")))
    return {f"{k}_ms": _pct(v) for k, v in parts.items() if v}


def outputs_on(adapter: Any, post: Any, frames: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probabilities or residual or score map, published class mask) per frame, copied."""
    res = []
    for f in frames:
        out = adapter.infer(f)
        maps = out.probs if out.probs is not None else (out.residual if out.residual is not None
                                                       else out.score_map)
        label = post.mask(out.probs, out.residual, out.score_map)
        res.append((np.array(maps, np.float32, copy=True), label.copy()))
        if out.release:
            out.release()
    return res


def compare(ref: list[tuple[np.ndarray, np.ndarray]], got: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    diff = max(float(np.max(np.abs(a[0] - b[0]))) for a, b in zip(ref, got))
    inter = sum(int(np.count_nonzero((a[1] > 0) & (b[1] > 0))) for a, b in zip(ref, got))
    union = sum(int(np.count_nonzero((a[1] > 0) | (b[1] > 0))) for a, b in zip(ref, got))
    same_class = sum(int(np.count_nonzero(a[1] == b[1])) for a, b in zip(ref, got))
    total = sum(a[1].size for a in ref)
    return {"max_abs_diff": diff, "mask_iou": 1.0 if union == 0 else inter / union,
            "mask_pixels_ref": sum(int(np.count_nonzero(a[1])) for a in ref),
            "mask_union_px": union, "class_agreement": same_class / total}


def e2e_bench(bundle_dir: Path, engine_cfg: dict, frames: int, work: Path) -> dict:
    """Grab to publish on the synthetic 256x1600 strip through the real pipeline (needs pyzmq)."""
    from inspector.bench import run_bench
    from inspector.config import parse_config

    raw = {"camera_id": "bench", "source": {"type": "synthetic", "width": 1600, "height": 256, "fps": 0,
                                            "defect_rate": 0.5, "seed": 5},
           "model": {"bundle": str(bundle_dir), "engine": engine_cfg},
           "publish": {"endpoint": "tcp://127.0.0.1:*"}}
    cfg = parse_config(raw, "<bench>", base_dir=ROOT)
    out = work / f"e2e-{bundle_dir.name}-{engine_cfg.get('type')}-{engine_cfg.get('precision', '')}"
    res = run_bench(cfg, frames=frames, out_dir=out, throughput_frames=frames)
    return {"summary": res["summary"], "stages_ms": res["latency"]["stages_ms"],
            "throughput_fps": res.get("throughput", {}).get("fps")}


E2E_CONFIGS = {
    "ort-cpu": {"type": "onnxruntime", "providers": ["cpu"]},
    "ort-cuda": {"type": "onnxruntime", "providers": ["cuda"]},
    "ort-cuda-tf32": {"type": "onnxruntime", "providers": ["cuda"], "cuda_tf32": True},
    "trt-fp16": {"type": "tensorrt", "precision": "fp16", "min_batch": 1, "opt_batch": 7, "max_batch": 8},
    "trt-fp32": {"type": "tensorrt", "precision": "fp32", "min_batch": 1, "opt_batch": 7, "max_batch": 8},
}


def bench_bundle(bundle_dir: Path, backends: list[str], work: Path, iters: int, warmup: int,
                 deadline: float, parity_frames: int = 3, e2e_frames: int = 0,
                 e2e_backends: tuple[str, ...] = ("ort-cpu", "ort-cuda", "trt-fp16"),
                 iters_for: Callable[[str], int] | None = None) -> dict[str, Any]:
    """Every backend on one bundle: timings per frame shape, parity against ORT CPU."""
    from inspector.bundle import load_bundle
    from inspector.models import make_adapter
    from inspector.postprocess import Postprocessor

    bundle = load_bundle(bundle_dir)
    post = Postprocessor(bundle.spec.postprocess, bundle.spec.classes)
    graph = bundle.graph_path("model")
    res: dict[str, Any] = {"path": str(bundle_dir), "kind": bundle.spec.kind,
                           "input": {"tile": list(bundle.spec.input.tile),
                                     "channels": bundle.spec.input.channels},
                           "graph_mb": round(graph.stat().st_size / 1e6, 2), "backends": {}}
    frames = {shape: synthetic_frames(*shape, count=4, seed=3) for shape in SHAPES}
    pframes = synthetic_frames(256, 1600, parity_frames, seed=21, defect_rate=1.0)
    refs: dict[str, list] = {}
    for name in backends:
        entry: dict[str, Any] = {}
        res["backends"][name] = entry
        if time.monotonic() > deadline:
            entry.update(status="skipped", reason="time budget of the run spent before this backend")
            continue
        t0 = time.perf_counter()
        eng = None
        try:
            eng = open_backend(name, bundle, work)
            entry["open_s"] = round(time.perf_counter() - t0, 2)
            entry["backend"] = eng.backend
            for attr in ("how", "engine_path", "provider_notes"):
                if hasattr(eng, attr):
                    entry[attr] = str(getattr(eng, attr))
            adapter = make_adapter(bundle, eng, 0)
            n_iter = iters_for(name) if iters_for else iters
            entry["shapes"] = {}
            for shape in SHAPES:
                g = adapter.grid(*shape)
                entry["shapes"][f"{shape[0]}x{shape[1]}"] = {
                    "tiles": g.count, **time_backend(adapter, post, frames[shape], warmup, n_iter, deadline)}
            if not name.startswith("torch") or "checkpoint" in getattr(eng, "weights", ""):
                refs[name] = outputs_on(adapter, post, pframes)
            entry["status"] = "ok"
        except Skip as e:
            entry.update(status="skipped", reason=str(e))
        except Exception as e:  # a backend that breaks is recorded, the others still run
            entry.update(status="error", reason=f"{type(e).__name__}: {e}",
                         traceback=traceback.format_exc()[-2000:])
        finally:
            if eng is not None:
                with contextlib.suppress(Exception):
                    eng.close()
        if e2e_frames and entry.get("status") == "ok" and name in e2e_backends and name in E2E_CONFIGS:
            if time.monotonic() < deadline:
                ecfg = dict(E2E_CONFIGS[name])
                if ecfg["type"] == "tensorrt":  # the engine just timed, from the same cache
                    ecfg["cache_dir"] = str(work / "engines")
                try:
                    entry["e2e"] = e2e_bench(bundle_dir, ecfg, e2e_frames, work)
                except Exception as e:
                    entry["e2e"] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
            else:
                entry["e2e"] = {"status": "skipped", "reason": "time budget spent"}
    res["parity"] = parity(refs, parity_frames)
    return res


def parity(refs: dict[str, list], frames: int) -> dict[str, Any]:
    """fp32 backends against ORT CPU (probabilities); fp16/int8 against fp32 (published mask)."""
    out: dict[str, Any] = {"frames": f"{frames} synthetic 256x1600 frame(s) with defects",
                           "reference": "ort-cpu", "checks": {}}
    if "ort-cpu" not in refs:
        out["note"] = "ort-cpu did not run: no parity reference"
        return out
    ref = refs["ort-cpu"]
    fp32_ref_name = "trt-fp32" if "trt-fp32" in refs else "ort-cpu"
    for name, got in refs.items():
        if name == "ort-cpu":
            continue
        c = compare(ref, got)
        if name in ("trt-fp16", "trt-int8", "ort-cuda-tf32"):
            c16 = compare(refs[fp32_ref_name], got)
            c.update(mask_iou_vs_fp32=c16["mask_iou"], fp32_reference=fp32_ref_name)
            if name in ("trt-fp16", "ort-cuda-tf32"):  # reduced-precision math: judged by the mask
                c.update(criterion=f"published-mask IoU vs {fp32_ref_name} >= {FP16_IOU}",
                         passed=bool(c16["mask_iou"] >= FP16_IOU))
            else:
                c.update(criterion="none (recorded only)", passed=None)
        else:
            c.update(criterion=f"max abs diff of probabilities (residual for clgan) vs ort-cpu <= {FP32_TOL}",
                     passed=bool(c["max_abs_diff"] <= FP32_TOL))
        out["checks"][name] = c
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(b, s) for b in result["bundles"] for s in (f"{h}x{w}" for h, w in SHAPES)]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 + 0.5 * len(BACKENDS) * len(panels) / 2),
                             squeeze=False)
    for ax, (b, s) in zip(axes[:, 0], panels):
        names, p50, p99, notes = [], [], [], []
        for name, e in result["bundles"][b]["backends"].items():
            st = e.get("shapes", {}).get(s)
            if e.get("status") == "ok" and st and "infer_ms" in st:
                names.append(name)
                p50.append(st["infer_ms"]["p50"])
                p99.append(st["infer_ms"]["p99"])
            else:
                notes.append(f"{name}: {e.get('status', '?')}")
        y = np.arange(len(names))
        ax.barh(y, p50, color="tab:blue", label="p50")
        ax.errorbar(p50, y, xerr=[np.zeros(len(p50)), np.maximum(0, np.subtract(p99, p50))],
                    fmt="none", ecolor="k", capsize=3, label="to p99")
        ax.set_yticks(y, names)
        ax.set_xscale("log" if p50 and max(p50) / max(min(p50), 1e-3) > 30 else "linear")
        ax.set_xlabel("ms per frame (preprocess + engine + decode)")
        ax.set_title(f"{b} | frame {s}" + (f" | not run: {', '.join(notes)}" if notes else ""), fontsize=8)
        if names:
            ax.legend(fontsize=7, loc="lower right")
    env = result.get("env", {})
    fig.suptitle(f"{env.get('gpu', 'no GPU')} | {env.get('cpu_cores')} cores | onnxruntime "
                 f"{env.get('onnxruntime')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- pycuda on a GPU without TensorRT: the engine's stream and buffer plumbing -------------------
def _cuda_paths(root: Path, work: Path) -> tuple[Path | None, Path | None]:
    """The folder with cuda.h, and one with an unversioned libcuda.so to link pycuda against."""
    incs = [root / "include", root / "targets" / "x86_64-linux" / "include",
            *sorted(Path("/usr/local").glob("cuda*/include"))]
    inc = next((d for d in incs if (d / "cuda.h").is_file()), None)
    libs = [root / "lib64" / "stubs", root / "targets" / "x86_64-linux" / "lib" / "stubs",
            root / "lib" / "stubs", root / "lib64", *sorted(Path("/usr/local").glob("cuda*/lib64/stubs"))]
    libdir = next((d for d in libs if (d / "libcuda.so").exists()), None)
    if libdir is None:
        # only the driver's libcuda.so.1: link against it through a private unversioned name
        found = [Path(line.split("=>")[-1].strip()) for line in (_cmd(["ldconfig", "-p"]) or "").splitlines()
                 if "libcuda.so.1" in line and "=>" in line]
        found += [Path(p) for p in ("/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1")]
        so1 = next((f for f in found if f.exists()), None)
        if so1 is not None:
            libdir = work / "libcuda-link"
            libdir.mkdir(parents=True, exist_ok=True)
            link = libdir / "libcuda.so"
            if not link.exists():
                link.symlink_to(so1)
    return inc, libdir


def build_pycuda(sdist: Path, work: Path, timeout_s: float) -> dict[str, Any]:
    """Build pycuda from its sdist with this machine's nvcc (no network); put it on sys.path."""
    info: dict[str, Any] = {"sdist": str(sdist)}
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {**info, "status": "skipped", "reason": "nvcc not on PATH"}
    src = work / "pycuda-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    with tarfile.open(sdist) as t:
        t.extractall(src, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(src)
    top = next(p for p in src.iterdir() if p.is_dir())
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             str(Path(nvcc).resolve().parent.parent)]
    cuda_root = next((Path(r) for r in roots if r and (Path(r) / "include" / "cuda.h").is_file()),
                     Path(nvcc).resolve().parent.parent)
    inc, libdir = _cuda_paths(cuda_root, work)
    info.update(cuda_root=str(cuda_root), cuda_h=str(inc), libcuda_dir=str(libdir))
    if inc is None or libdir is None:
        return {**info, "status": "skipped", "reason": "cuda.h or libcuda.so not found for linking"}
    logf = work / "pycuda-build.log"
    t0 = time.perf_counter()
    steps = [[sys.executable, "configure.py", f"--cuda-root={cuda_root}", f"--cuda-inc-dir={inc}",
              f"--cudadrv-lib-dir={libdir}", "--no-cuda-enable-curand"],
             [sys.executable, "setup.py", "build_ext", "--inplace", "-j", str(os.cpu_count() or 4)]]
    with open(logf, "w") as lf:
        for cmd in steps:
            left = timeout_s - (time.perf_counter() - t0)
            try:
                r = subprocess.run(cmd, cwd=top, stdout=lf, stderr=subprocess.STDOUT, timeout=max(5, left))
            except subprocess.TimeoutExpired:
                return {**info, "status": "error", "reason": f"build exceeded {timeout_s:.0f} s",
                        "log_tail": logf.read_text()[-1500:]}
            if r.returncode != 0:
                return {**info, "status": "error", "reason": f"{cmd[1]} exited {r.returncode}",
                        "log_tail": logf.read_text()[-3000:]}
    sys.path.insert(0, str(top))
    info["build_s"] = round(time.perf_counter() - t0, 1)
    info["path"] = str(top)
    v, err = _try_version("pycuda.driver")
    if v is None:
        return {**info, "status": "error", "reason": f"built but not importable: {err}",
                "log_tail": logf.read_text()[-1500:]}
    return {**info, "status": "ok", "version": v}


def pycuda_plumbing() -> dict[str, Any]:
    """The TensorRT engine's CUDA side on a real GPU, with a copy standing in for TensorRT:
    primary context push/pop from another thread, pinned and device buffers, two streams,
    event ordering, tickets, chunked runs. Checks exact round trips and records timings."""
    import pycuda.driver as cuda

    from inspector.engines.tensorrt import CudaContext, StreamPipeline, run_chunked
    from inspector.errors import EngineError

    res: dict[str, Any] = {}
    ctx = CudaContext.acquire(cuda, 0)
    try:
        with ctx:
            res["gpu"] = ctx.device.name()
            res["compute_capability"] = ".".join(map(str, ctx.device.compute_capability()))
            size = 8 * 1 * 256 * 256

            def execute(slot: Any, shapes: dict) -> dict:
                s = shapes["x"]
                cuda.memcpy_dtod_async(slot.dev_out["y"], slot.dev_in["x"], int(np.prod(s)) * 4, slot.stream)
                return {"y": s}

            pipe = StreamPipeline(cuda, {"x": (size, np.dtype(np.float32))},
                                  {"y": (size, np.dtype(np.float32))}, execute, depth=2)
            data = np.random.default_rng(0).random((21, 1, 256, 256), dtype=np.float32)
            chunks = [(0, 8), (8, 8), (16, 5)]
            out = run_chunked(pipe.submit, pipe.collect, 2, {"x": data}, chunks, {})
            res["round_trip_exact"] = bool(np.array_equal(out["y"], data))
            t1 = pipe.submit({"x": data[:4]})
            pipe.submit({"x": data[4:8]})
            pipe.submit({"x": data[8:12]})
            try:
                pipe.collect(t1)
                res["stale_ticket_refused"] = False
            except EngineError:
                res["stale_ticket_refused"] = True
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                run_chunked(pipe.submit, pipe.collect, 2, {"x": data}, chunks, {})
                times.append((time.perf_counter() - t0) * 1e3)
            res["chunked_21_tiles_ms"] = _pct(times)
        box: dict[str, Any] = {}

        def worker() -> None:  # the daemon's infer thread is not the thread that opened the engine
            try:
                with ctx:
                    o = pipe.collect(pipe.submit({"x": data[:7]}))
                    box["ok"] = bool(np.array_equal(o["y"], data[:7]))
            except Exception as e:
                box["error"] = f"{type(e).__name__}: {e}"

        th = threading.Thread(target=worker)
        th.start()
        th.join(60)
        res["other_thread"] = box
        with ctx:
            pipe.close()
        res["status"] = "ok" if res["round_trip_exact"] and box.get("ok") and res["stale_ticket_refused"] \
            else "failed"
    finally:
        ctx.release()
    return res


# -- commands ------------------------------------------------------------------------------------
def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)


def _skipped(result: dict) -> list[dict]:
    out = []
    for b, br in result.get("bundles", {}).items():
        for name, e in br.get("backends", {}).items():
            if e.get("status") != "ok":
                out.append({"bundle": b, "backend": name, "status": e.get("status"), "reason": e.get("reason")})
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="engines-bench-"))
    deadline = time.monotonic() + args.budget_s
    bundles = [Path(b) for b in args.bundle] or shipped_bundles()
    result: dict[str, Any] = {"tool": "benchmarks/engines.py bench", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "env": environment(), "bundles": {}}
    if not bundles:
        result["note"] = "no shipped bundle in deploy/models; ran the hand-built toy graph"
        bundles = [toy_bundle(work)]
    backends = args.backends.split(",")
    for b in bundles:
        result["bundles"][b.name] = bench_bundle(b, backends, work, args.iters, args.warmup, deadline,
                                                 e2e_frames=args.e2e_frames)
    result["skipped"] = _skipped(result)
    _write(out / "engines.json", result)
    plot(result, out / "engines.png")
    print(json.dumps({"json": str(out / "engines.json"), "png": str(out / "engines.png"),
                      "skipped": len(result["skipped"])}))
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    """Everything the GPU check records, in one JSON written after every step."""
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    out = Path(args.out)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"tool": "benchmarks/gpu_check.sh", "mode": "dry-run" if args.dry_run else "gpu",
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": {}, "bundles": {}}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            val = fn()
            result["steps"][name] = {"status": "ok", "s": round(time.perf_counter() - t0, 1)}
            return val
        except Skip as e:
            result["steps"][name] = {"status": "skipped", "reason": str(e)}
        except Exception as e:
            result["steps"][name] = {"status": "error", "reason": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-2500:]}
        finally:
            _write(out, result)
        return None

    result["env"] = step("environment", environment) or {}
    if args.install_log and Path(args.install_log).is_file():
        result["install_log"] = Path(args.install_log).read_text()[-3000:]
    # pycuda: the engine's CUDA half can be checked even where TensorRT cannot be installed
    if args.dry_run:
        result["pycuda_build"] = {"status": "skipped", "reason": "dry run"}
    elif _try_version("pycuda.driver")[0] is None and args.pycuda_sdist and Path(args.pycuda_sdist).is_file():
        result["pycuda_build"] = step("pycuda_build", lambda: build_pycuda(
            Path(args.pycuda_sdist), work, min(args.pycuda_timeout_s, max(10.0, deadline - time.monotonic() - 200))))
    else:
        v, err = _try_version("pycuda.driver")
        result["pycuda_build"] = {"status": "skipped", "reason": f"pycuda already importable ({v})" if v
                                  else f"no pycuda sdist given or found ({err})"}
    sees_gpu = bool(result["env"].get("torch_sees_gpu")) or bool(
        result["env"].get("nvidia_smi") and "not found" not in str(result["env"].get("nvidia_smi"))
        and "unavailable" not in str(result["env"].get("nvidia_smi")))
    if args.dry_run or not sees_gpu:
        result["pycuda_plumbing"] = {"status": "skipped", "reason": "dry run" if args.dry_run else "no GPU"}
    elif _try_version("pycuda.driver")[0] is None:
        result["pycuda_plumbing"] = {"status": "skipped", "reason": f"pycuda not importable "
                                                                    f"({_try_version('pycuda.driver')[1]})"}
    else:
        result["pycuda_plumbing"] = step("pycuda_plumbing", pycuda_plumbing)

    bundles = shipped_bundles()
    if not bundles:
        result["note"] = "no shipped bundle in deploy/models: the hand-built toy graph stands in"
        tb = step("toy_bundle", lambda: toy_bundle(work))
        bundles = [tb] if tb else []
    if args.thesis and not args.dry_run:
        tb = step("thesis_bundle", lambda: thesis_bundle(work))
        if tb:
            bundles.insert(0, tb)  # the performance target's network: first, before the budget runs out
    backends = list(BACKENDS) if not args.backends else args.backends.split(",")
    iters = 2 if args.dry_run else args.iters  # a dry run checks the script, not the speed
    warmup = 1 if args.dry_run else 2
    for b in bundles:
        thesis = b.name.startswith("arcd-thesis")

        def iters_for(name: str, thesis: bool = thesis) -> int:
            # the thesis network on a CPU costs seconds per frame: a few frames give its order
            on_cpu = name == "ort-cpu" or (name == "torch-eager" and not result["env"].get("torch_sees_gpu"))
            return 3 if thesis and on_cpu else iters

        result["bundles"][b.name] = step(f"bundle:{b.name}", lambda b=b, f=iters_for: bench_bundle(
            b, backends, work, iters, warmup, deadline, parity_frames=1 if thesis or args.dry_run else 3,
            e2e_frames=0 if args.dry_run else args.e2e_frames,
            # the thesis network through the pipeline on a CPU would take minutes: GPU paths only
            e2e_backends=("ort-cuda", "ort-cuda-tf32", "trt-fp16") if thesis
            else ("ort-cpu", "ort-cuda", "trt-fp16"),
            iters_for=f)) or {}
        result["skipped"] = _skipped(result)
    result["skipped"] = _skipped(result)
    verdicts = {}
    for b, br in result["bundles"].items():
        for name, c in br.get("parity", {}).get("checks", {}).items():
            verdicts[f"{b}:{name}"] = c.get("passed")
    result["parity_verdicts"] = verdicts
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    step("plot", lambda: plot(result, out.with_suffix(".png")))
    _write(out, result)
    failed = [k for k, v in verdicts.items() if v is False]
    print(json.dumps({"json": str(out), "wall_s": result["wall_s"], "parity_failed": failed,
                      "skipped": [f"{s['bundle']}:{s['backend']}" for s in result["skipped"]]}, indent=1))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bench", help="compare backends on bundles (JSON + PNG)")
    p.add_argument("--bundle", action="append", default=[], help="bundle folder (default: deploy/models/*)")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--out", default="bench-engines")
    p.add_argument("--work", help="folder for engines and scratch (default: a temporary one)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--e2e-frames", type=int, default=0, help="also grab-to-publish through the pipeline")
    p.add_argument("--budget-s", type=float, default=1800)
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("gpu-check", help="what benchmarks/gpu_check.sh runs")
    p.add_argument("--out", required=True, help="the JSON file to write (a PNG goes beside it)")
    p.add_argument("--work", help="scratch folder")
    p.add_argument("--dry-run", action="store_true", help="CPU only, few iterations: checks the script")
    p.add_argument("--backends", default="")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--e2e-frames", type=int, default=60)
    p.add_argument("--thesis", action="store_true", help="also time an untrained thesis-width ARCD")
    p.add_argument("--pycuda-sdist", help="pycuda source archive to build when pycuda is missing")
    p.add_argument("--pycuda-timeout-s", type=float, default=240)
    p.add_argument("--install-log", help="log of the wheel install, kept in the JSON")
    p.add_argument("--budget-s", type=float, default=420)
    p.set_defaults(fn=cmd_gpu_check)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
