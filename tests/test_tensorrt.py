"""TensorRT engines: what can be checked without a GPU, and the GPU checks that skip without one.

No GPU here, so the engine cache's decisions (cached, stale, foreign, corrupt, missing), the cache
key, shape-profile planning, config validation, calibration preprocessing and ONNX Runtime's
provider fallback run for real with the builder and loader injected. The double-buffered stream
pipeline runs over a stand-in for ``pycuda.driver`` (synchronous copies into numpy memory): the
same class runs on a real GPU in ``benchmarks/gpu_check.sh`` (``pycuda_plumbing``).
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

from conftest import run_cli, write_config
from inspector.config import parse_config
from inspector.engines import OnnxRuntimeConfig, TensorRTConfig, make_engine
from inspector.engines.onnxruntime import OnnxRuntimeEngine
from inspector.engines.tensorrt import StreamPipeline, run_chunked
from inspector.engines.trt_build import (BatchProfile, DeviceFacts, EngineCache, EngineSpec,
                                         cache_key, calibration_batches, calibration_files,
                                         calibration_id, engine_name, parse_shapes, plan_batches,
                                         select_profile, stale_reason)
from inspector.errors import ConfigError, EngineError

H100 = DeviceFacts("NVIDIA H100 80GB HBM3", (9, 0), "10.8.0.43")
SPEC = EngineSpec(graph_sha256="ab" * 32, input_name="image", input_chw=(1, 256, 256),
                  precision="fp16", profiles=(BatchProfile(1, 7, 8),))


def _gpu_stack() -> str | None:
    """None where TensorRT, pycuda and a GPU are all there, else why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:
        return f"needs TensorRT (the gpu extra): {type(e).__name__}: {e}"
    try:
        import pycuda.driver as cuda
        cuda.init()
        if cuda.Device.count() < 1:
            return "needs an NVIDIA GPU: pycuda sees none"
    except Exception as e:
        return f"needs pycuda and an NVIDIA GPU: {type(e).__name__}: {e}"
    return None


GPU_SKIP = _gpu_stack()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")


# -- config -----------------------------------------------------------------------------------
def _cfg(engine: dict) -> dict:
    return {"camera_id": "c", "source": {"type": "synthetic"},
            "model": {"bundle": "b", "engine": engine}}


def test_tensorrt_config_parses_and_bad_values_name_the_key():
    cfg = parse_config(_cfg({"type": "tensorrt", "precision": "fp16", "max_batch": 8, "opt_batch": 7}),
                       "cam.yaml", check_paths=False)
    assert isinstance(cfg.model.engine, TensorRTConfig)
    assert cfg.model.engine.profiles() == (BatchProfile(1, 7, 8),)
    cases = {
        "precision": ({"type": "tensorrt", "precision": "fp8"}, "'fp32', 'fp16' or 'int8'"),
        "calib_dir": ({"type": "tensorrt", "precision": "int8"}, "required for precision int8"),
        "opt_batch": ({"type": "tensorrt", "opt_batch": 9}, "between min_batch 1 and max_batch 8"),
        "extra_profiles": ({"type": "tensorrt", "extra_profiles": ["4:2"]}, "MIN:OPT:MAX"),
        "workspace": ({"type": "tensorrt", "workspace": 1}, "unknown key"),
    }
    for key, (engine, words) in cases.items():
        with pytest.raises(ConfigError) as e:
            parse_config(_cfg(engine), "cam.yaml", check_paths=False)
        assert e.value.key == f"model.engine.{key}", str(e.value)
        assert words in e.value.problem
    # no type: onnxruntime, as before
    assert isinstance(parse_config(_cfg({"providers": ["cpu"]}), "c.yaml", check_paths=False).model.engine,
                      OnnxRuntimeConfig)


# -- shapes -----------------------------------------------------------------------------------
def test_batch_profiles_parse_and_plan():
    assert parse_shapes("1:7:8, 16:16:32") == (BatchProfile(1, 7, 8), BatchProfile(16, 16, 32))
    assert parse_shapes(["8"]) == (BatchProfile(1, 8, 8),)
    for bad in ("8:1:4", "1:2", "a:b:c", ""):
        with pytest.raises(ValueError):
            parse_shapes(bad)
    one = parse_shapes("1:7:8")
    assert plan_batches(one, 7) == [(0, 0, 7)]
    assert plan_batches(one, 10) == [(0, 0, 5), (0, 5, 5)]          # balanced halves, not 8 + 2
    assert plan_batches(one, 17) == [(0, 0, 6), (0, 6, 6), (0, 12, 5)]
    two = parse_shapes("1:7:8,16:28:32")
    assert select_profile(two, 7) == 0 and select_profile(two, 20) == 1 and select_profile(two, 40) is None
    assert select_profile(parse_shapes("1:8:32,1:4:8"), 6) == 1      # the tightest profile holding it
    assert plan_batches(two, 40) == [(1, 0, 20), (1, 20, 20)]
    with pytest.raises(EngineError, match="below every profile"):
        plan_batches(parse_shapes("4:4:8"), 2)


# -- cache key --------------------------------------------------------------------------------
def test_cache_key_changes_with_everything_an_engine_depends_on():
    base = engine_name(SPEC, H100)
    assert base.startswith("nvidia-h100-80gb-hbm3-sm90-trt10.8.0.43-fp16-b1.7.8-")
    variants = [
        (SPEC, DeviceFacts("NVIDIA A2", (8, 6), "10.8.0.43")),
        (SPEC, DeviceFacts(H100.gpu_name, (9, 0), "10.9.0.34")),
        (EngineSpec(**{**SPEC.__dict__, "precision": "fp32"}), H100),
        (EngineSpec(**{**SPEC.__dict__, "profiles": (BatchProfile(1, 8, 8),)}), H100),
        (EngineSpec(**{**SPEC.__dict__, "graph_sha256": "cd" * 32}), H100),
        (EngineSpec(**{**SPEC.__dict__, "input_chw": (3, 256, 256)}), H100),
    ]
    names = {engine_name(s, f) for s, f in variants}
    assert base not in names and len(names) == len(variants)
    assert stale_reason({"key": cache_key(SPEC, H100)}, cache_key(SPEC, H100)) is None
    other = {"key": cache_key(*variants[1])}
    assert "TensorRT 10.9.0.34, this needs 10.8.0.43" in stale_reason(other, cache_key(SPEC, H100))
    foreign = stale_reason({"key": cache_key(*variants[0])}, cache_key(SPEC, H100))
    assert "GPU NVIDIA A2" in foreign and "compute capability 8.6" in foreign
    assert "another graph" in stale_reason({"key": cache_key(*variants[4])}, cache_key(SPEC, H100))
    assert stale_reason(None, cache_key(SPEC, H100)) == "its record is missing or unreadable"


# -- the cache's decisions, builder and loader injected ------------------------------------------
class Recorder:
    """A builder and a loader that record their calls; the 'engine' is the bytes themselves."""

    def __init__(self, payload: bytes = b"ENGINE-v1", refuse: tuple[bytes, ...] = ()):
        self.payload, self.refuse = payload, refuse
        self.built = 0
        self.loaded: list[bytes] = []

    def build(self) -> bytes:
        self.built += 1
        return self.payload

    def load(self, blob: bytes) -> bytes:
        self.loaded.append(blob)
        if blob in self.refuse or not blob.startswith(b"ENGINE"):
            raise RuntimeError("deserialize failed")
        return blob


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "inspector.engines.trt_build" and r.levelno >= logging.WARNING]


def test_cache_builds_once_then_loads(tmp_path, caplog):
    cache = EngineCache(tmp_path / "engines")
    rec = Recorder()
    with caplog.at_level(logging.INFO):
        got, how = cache.load_or_build(SPEC, H100, rec.build, rec.load)
    assert (got, how, rec.built) == (b"ENGINE-v1", "built", 1)
    eng, meta = cache.paths(engine_name(SPEC, H100))
    record = json.loads(meta.read_text())
    assert eng.read_bytes() == b"ENGINE-v1" and record["key"] == cache_key(SPEC, H100)
    assert len(_warnings(caplog)) == 1 and "building" in _warnings(caplog)[0]
    caplog.clear()
    got, how = EngineCache(tmp_path / "engines").load_or_build(SPEC, H100, rec.build, rec.load)
    assert (how, rec.built, _warnings(caplog)) == ("cached", 1, [])


def test_foreign_and_stale_engines_are_rebuilt_never_loaded(tmp_path, caplog):
    folder = tmp_path / "engines"
    a2 = DeviceFacts("NVIDIA A2", (8, 6), "10.3.0.26")
    old = Recorder(b"ENGINE-from-A2")
    EngineCache(folder).load_or_build(SPEC, a2, old.build, old.load)   # a bundle copied from another PC
    rec = Recorder()
    caplog.clear()
    got, how = EngineCache(folder).load_or_build(SPEC, H100, rec.build, rec.load)
    assert got == b"ENGINE-v1" and rec.built == 1
    assert b"ENGINE-from-A2" not in rec.loaded
    (line,) = _warnings(caplog)
    assert "stale or foreign" in line and "GPU NVIDIA A2" in line and "building" in line
    # a prebuilt engine file named in the config whose record says another TensorRT
    prebuilt = tmp_path / "shipped.engine"
    prebuilt.write_bytes(b"ENGINE-old-trt")
    prebuilt.with_suffix(".json").write_text(json.dumps(
        {"key": cache_key(SPEC, DeviceFacts(H100.gpu_name, (9, 0), "10.0.1.6")), "engine_sha256": "x"}))
    rec2 = Recorder(b"ENGINE-v2")
    caplog.clear()
    got, how = EngineCache(folder).load_or_build(SPEC, H100, rec2.build, rec2.load, engine_file=prebuilt)
    assert (got, how) == (b"ENGINE-v2", "rebuilt") and b"ENGINE-old-trt" not in rec2.loaded
    (line,) = _warnings(caplog)
    assert "TensorRT 10.0.1.6, this needs 10.8.0.43" in line and "rebuilding" in line


def test_corrupt_engines_are_rebuilt_with_a_clear_line(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    rec = Recorder()
    cache.load_or_build(SPEC, H100, rec.build, rec.load)
    eng, meta = cache.paths(engine_name(SPEC, H100))
    eng.write_bytes(b"ENGINE-v1-truncat")                    # bytes no longer match the record
    caplog.clear()
    _, how = cache.load_or_build(SPEC, H100, rec.build, rec.load)
    (line,) = _warnings(caplog)
    assert how == "rebuilt" and "corrupt engine" in line and "sha256" in line and rec.built == 2
    # bytes match their record but TensorRT refuses them (another build of the same version, say)
    bad = Recorder(b"ENGINE-v1", refuse=(b"ENGINE-v1",))
    caplog.clear()
    with pytest.raises(EngineError, match="just built .* does not load"):
        cache.load_or_build(SPEC, H100, bad.build, bad.load)
    (line,) = _warnings(caplog)
    assert "does not deserialize" in line and bad.built == 1


def test_cache_without_building_and_unwritable_folder(tmp_path, caplog):
    with pytest.raises(EngineError, match="inspector export tensorrt .*--precision fp16 --shapes 1:7:8"):
        EngineCache(tmp_path / "e").load_or_build(SPEC, H100, Recorder().build, Recorder().load,
                                                  allow_build=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rec = Recorder()
    caplog.clear()
    got, how = EngineCache(blocker / "engines").load_or_build(SPEC, H100, rec.build, rec.load)
    assert got == b"ENGINE-v1" and how == "built"
    assert any("could not cache" in w for w in _warnings(caplog))


# -- double buffering over a stand-in for pycuda.driver -------------------------------------------
class FakeCuda:
    """Synchronous copies into numpy memory, with the call shapes of pycuda.driver."""

    class Stream:
        def __init__(self) -> None:
            self.handle = id(self)
            self.waited: list = []

        def wait_for_event(self, ev) -> None:
            self.waited.append(ev)

        def synchronize(self) -> None:
            pass

    class Event:
        def record(self, stream=None) -> None:
            self.stream = stream

        def synchronize(self) -> None:
            pass

    class Dev:
        def __init__(self, nbytes: int) -> None:
            self.buf = np.zeros(nbytes, np.uint8)

        def __int__(self) -> int:
            return id(self)

        def free(self) -> None:
            self.buf = None

    @staticmethod
    def pagelocked_empty(n, dtype):
        return np.empty(n, dtype)

    @classmethod
    def mem_alloc(cls, nbytes):
        return cls.Dev(nbytes)

    @staticmethod
    def memcpy_htod_async(dev, host, stream=None):
        raw = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        dev.buf[:raw.size] = raw

    @staticmethod
    def memcpy_dtoh_async(host, dev, stream=None):
        flat = host.reshape(-1).view(np.uint8)
        flat[:] = dev.buf[:flat.size]


def _doubler_pipe(calls: list) -> StreamPipeline:
    def execute(slot, shapes):  # stands in for execute_async_v3: y = 2x
        n = int(np.prod(shapes["x"]))
        x = slot.dev_in["x"].buf[:4 * n].view(np.float32)
        slot.dev_out["y"].buf[:4 * n] = (2 * x).view(np.uint8)
        calls.append(slot)
        return {"y": shapes["x"]}

    size = 8 * 3
    return StreamPipeline(FakeCuda, {"x": (size, np.dtype(np.float32))},
                          {"y": (size, np.dtype(np.float32))}, execute, depth=2)


def test_stream_pipeline_double_buffers_and_guards_tickets():
    calls: list = []
    pipe = _doubler_pipe(calls)
    data = np.arange(60, dtype=np.float32).reshape(20, 3)
    out = run_chunked(pipe.submit, pipe.collect, 2, {"x": data}, [(0, 8), (8, 8), (16, 4)], {})
    np.testing.assert_array_equal(out["y"], 2 * data)
    assert [pipe.slots.index(s) for s in calls] == [0, 1, 0]
    # each execution waits for the previous one on the other slot's stream (one context)
    assert pipe.slots[1].stream.waited == [pipe.slots[0].executed]
    t0 = pipe.submit({"x": data[:2]})
    t1 = pipe.submit({"x": data[2:5]})
    np.testing.assert_array_equal(pipe.collect(t1)["y"], 2 * data[2:5])
    np.testing.assert_array_equal(pipe.collect(t0)["y"], 2 * data[:2])
    pipe.submit({"x": data[:1]})
    with pytest.raises(EngineError, match="overwritten"):
        pipe.collect(t0)
    with pytest.raises(EngineError, match="exceeds the buffer"):
        pipe.submit({"x": np.zeros((9, 3), np.float32)})
    with pytest.raises(EngineError, match="not fed"):
        pipe.submit({"other": data[:1]})
    pipe.close()


class OverlapEngine:
    """ONNX Runtime behind the async interface, reusing two output buffers like TensorRT does."""

    async_depth = 2

    def __init__(self, inner: OnnxRuntimeEngine):
        self.inner, self.inputs, self.outputs = inner, inner.inputs, inner.outputs
        self.backend = "test-overlap"
        self.slots: list[dict] = [{}, {}]
        self.next = 0
        self.submits = 0

    def run(self, feeds):
        return self.collect(self.run_async(feeds))

    def run_async(self, feeds):
        t = self.next
        self.next += 1
        self.submits += 1
        out = self.inner.run(feeds)
        slot = self.slots[t % 2]
        for k, v in out.items():
            buf = slot.setdefault(k, np.empty((16, *v.shape[1:]), v.dtype))
            buf[:len(v)] = v
            slot[k + "#n"] = len(v)
        slot["ticket"] = t
        return t

    def collect(self, ticket):
        slot = self.slots[ticket % 2]
        assert slot["ticket"] == ticket
        return {k: slot[k][:slot[k + "#n"]] for k in slot if "#" not in k and k != "ticket"}

    def close(self):
        pass


def test_adapter_overlaps_chunks_on_async_engines(toy_bundle):
    from inspector.bundle import load_bundle
    from inspector.models import make_adapter
    from inspector.sources.synthetic import StripRenderer

    bundle = load_bundle(toy_bundle)
    ort_engine = OnnxRuntimeEngine(bundle.graph_path("model"))
    frame = StripRenderer(640, 128, seed=1).render(np.random.default_rng(1), 1.0)[0]
    ref = make_adapter(bundle, ort_engine, 0).infer(frame)
    eng = OverlapEngine(ort_engine)
    adapter = make_adapter(bundle, eng, 2)                  # 7 tiles in chunks of 2
    for _ in range(2):                                      # the second frame reuses the buffers
        got = adapter.infer(frame)
        np.testing.assert_allclose(got.probs, ref.probs, atol=1e-6)
    assert eng.submits == 2 * -(-adapter.grid(128, 640).count // 2)


# -- calibration frames go through the bundle's preprocessing ------------------------------------
def test_calibration_batches_use_the_bundle_preprocessing(tmp_path, toy_bundle):
    import cv2

    from inspector.bundle import load_bundle
    from inspector.models import make_adapter
    from inspector.engines.trt_build import PreprocessOnly
    from inspector.sources.synthetic import StripRenderer

    bundle = load_bundle(toy_bundle)
    folder = tmp_path / "calib"
    folder.mkdir()
    r, rng = StripRenderer(384, 128, seed=2), np.random.default_rng(2)
    frames = [r.render(rng, 0.5)[0] for _ in range(3)]
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"f{i}.png"), f)
    files = calibration_files(folder)
    batches = list(calibration_batches(bundle, files, batch=4))
    tiles = np.concatenate([make_adapter(bundle, PreprocessOnly(bundle)).fill_batch(f)[0].copy()
                            for f in frames])
    assert len(batches) == len(tiles) // 4 and batches[0].shape == (4, 1, 128, 128)
    np.testing.assert_array_equal(np.concatenate(batches), tiles[:4 * len(batches)])
    before = calibration_id(files)
    cv2.imwrite(str(folder / "f3.png"), frames[0])
    assert calibration_id(calibration_files(folder)) != before
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="no calibration frames"):
        calibration_files(tmp_path / "empty")
    with pytest.raises(EngineError, match="fewer than 64 tiles"):
        list(calibration_batches(bundle, files, batch=64))


# -- without TensorRT: clear errors, optional fallback; ONNX Runtime providers fall back to CPU ---
def test_tensorrt_missing_names_the_gpu_extra_or_falls_back(toy_bundle, caplog):
    if GPU_SKIP is None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be shown")
    graph = toy_bundle / "model.onnx"
    with pytest.raises(EngineError, match=r"gpu. extra"):
        make_engine(TensorRTConfig(), graph)
    with caplog.at_level(logging.WARNING):
        eng = make_engine(TensorRTConfig(fallback="onnxruntime"), graph)
    assert eng.backend == "onnxruntime:CPUExecutionProvider"
    assert any("falling back to ONNX Runtime" in r.getMessage() for r in caplog.records)
    assert "tensorrt" not in sys.modules and "pycuda" not in sys.modules


@pytest.mark.parametrize("providers", [["cuda", "cpu"], ["tensorrt", "cuda", "cpu"], ["tensorrt", "cpu"]])
def test_ort_gpu_providers_fall_back_to_cpu_with_a_warning(toy_bundle, caplog, providers):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has GPU providers: no fallback to show")
    with caplog.at_level(logging.WARNING, logger="inspector.engines.onnxruntime"):
        eng = OnnxRuntimeEngine(toy_bundle / "model.onnx", OnnxRuntimeConfig(providers=providers))
    assert eng.backend == "onnxruntime:CPUExecutionProvider"
    msgs = " ".join(r.getMessage() for r in caplog.records)
    first = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[providers[0]]
    assert f"provider {first} requested but not in this build" in msgs


def test_the_log_names_the_gpu_provider_options_that_ran():
    from inspector.engines.onnxruntime import describe_provider_options

    reported = {"CPUExecutionProvider": {},
                "CUDAExecutionProvider": {"device_id": "0", "use_tf32": "0", "gpu_mem_limit": "184467",
                                          "cudnn_conv_algo_search": "EXHAUSTIVE"}}
    assert describe_provider_options(reported) == \
        "CUDA: device_id=0 use_tf32=0 cudnn_conv_algo_search=EXHAUSTIVE"
    assert describe_provider_options({"CPUExecutionProvider": {}}) == ""


def test_ort_tensorrt_provider_options():
    cfg = OnnxRuntimeConfig(providers=["tensorrt", "cuda", "cpu"], device_id=1, trt_fp16=True,
                            trt_engine_cache="/var/cache/ort-trt", trt_workspace_mb=512)
    eng = OnnxRuntimeEngine.__new__(OnnxRuntimeEngine)
    eng.cfg = cfg
    chosen = eng._providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    (trt_name, trt_opts), (cuda_name, cuda_opts), cpu = chosen
    assert trt_name == "TensorrtExecutionProvider" and cuda_name == "CUDAExecutionProvider"
    assert trt_opts == {"device_id": 1, "trt_fp16_enable": True, "trt_max_workspace_size": 512 << 20,
                        "trt_engine_cache_enable": True, "trt_engine_cache_path": "/var/cache/ort-trt"}
    # strict fp32 unless TF32 is asked for: onnxruntime's own default would turn it on
    assert cuda_opts == {"device_id": 1, "use_tf32": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert cpu == "CPUExecutionProvider"
    eng.cfg = OnnxRuntimeConfig(providers=["cuda"], cuda_tf32=True, cuda_conv_algo_search="heuristic")
    (cuda_name, cuda_opts), cpu = eng._providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cuda_opts == {"device_id": 0, "use_tf32": 1, "cudnn_conv_algo_search": "HEURISTIC"}


def test_check_with_a_tensorrt_config_fails_clearly_without_it(tmp_path, synthetic_cfg):
    if GPU_SKIP is None:
        pytest.skip("TensorRT is installed here")
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"engine": {"type": "tensorrt",
                                                                           "precision": "fp16"}}))
    r = run_cli("check", "--config", str(p))
    # exit 2: a restart cannot install it (exit 1 had systemd restart the daemon for ever)
    assert r.returncode == 2 and "gpu" in r.stderr and "TensorRT is not importable" in r.stderr
    r = run_cli("export", "tensorrt", "--bundle", str(tmp_path), "--precision", "fp16", "--shapes", "8:1:4")
    assert r.returncode == 2 and "--shapes" in r.stderr


# -- on a GPU with TensorRT (skipped here, with the reason) ------------------------------------
@needs_gpu
@pytest.mark.gpu
def test_native_engine_matches_onnxruntime_and_is_cached(tmp_path, toy_bundle):
    from inspector.bundle import load_bundle
    from inspector.engines.tensorrt import TensorRTEngine

    bundle = load_bundle(toy_bundle)
    x = np.random.default_rng(0).random((10, 1, 128, 128), dtype=np.float32)
    ref = OnnxRuntimeEngine(bundle.graph_path("model")).run({"image": x})["probs"]
    cfg = TensorRTConfig(precision="fp32", max_batch=4, cache_dir=str(tmp_path / "engines"))
    eng = TensorRTEngine(bundle.graph_path("model"), cfg)
    try:
        assert eng.how == "built"
        got = eng.run({"image": x})["probs"]                   # 10 tiles at MAX 4: 3 chunks
        assert float(np.max(np.abs(got - ref))) <= 1e-3
    finally:
        eng.close()
    eng = TensorRTEngine(bundle.graph_path("model"), cfg)
    try:
        assert eng.how == "cached"
    finally:
        eng.close()


def test_a_missing_package_and_a_missing_library_are_told_apart(tmp_path, monkeypatch):
    # a package that is not installed: exit 2 (install the extra); an installed one whose shared
    # library does not load (libcuda.so.1 before the driver is installed): exit 1, restarted
    import sys

    from inspector.engines.trt_build import import_pycuda
    from inspector.errors import EngineError, MissingPackageError

    pkg = tmp_path / "site" / "pycuda"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "driver.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object file: "
                                   "No such file or directory')\n")
    for name in [m for m in sys.modules if m == "pycuda" or m.startswith("pycuda.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(EngineError, match="installed but does not load") as e:
        import_pycuda()
    assert not isinstance(e.value, MissingPackageError)
    for name in [m for m in sys.modules if m == "pycuda" or m.startswith("pycuda.")]:
        monkeypatch.delitem(sys.modules, name)
    (pkg / "__init__.py").unlink()
    (pkg / "driver.py").unlink()
    pkg.rmdir()
    import importlib

    importlib.invalidate_caches()
    if importlib.util.find_spec("pycuda") is None:
        with pytest.raises(MissingPackageError, match="gpu"):
            import_pycuda()


def test_the_graph_facts_come_from_the_bundle_as_every_reader_takes_it(tmp_path, toy_bundle):
    """graph_input reads bundle.yaml through load_bundle: the graph's input, and the same clear
    refusal of a key given twice (its own parse used to keep the last one)."""
    import shutil

    from inspector.engines.tensorrt import graph_input

    b = shutil.copytree(toy_bundle, tmp_path / "b")
    graph = b / "model.onnx"
    folder, name, chw, sha, bundle = graph_input(graph)
    assert folder == b and bundle.spec.input.name == name and len(chw) == 3 and len(sha) == 64
    meta = b / "bundle.yaml"
    meta.write_text(meta.read_text() + "name: again\n")
    with pytest.raises(EngineError, match="bundle.yaml.*duplicate key 'name'"):
        graph_input(graph)
