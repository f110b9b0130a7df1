"""Native TensorRT engine (TensorRT 10+ name-based tensor API, pycuda for memory and streams).

``model.engine`` with ``type: tensorrt``::

    engine:
      type: tensorrt
      precision: fp16            # fp32 | fp16 | int8 (int8 needs calib_dir)
      max_batch: 8               # tiles per engine call the engine is built for (opt_batch: tuned for)
      cache_dir: engines         # default <bundle>/engines; relative to the bundle folder

At start the engine for this GPU, TensorRT version, precision, shapes and graph is loaded from
the bundle's engine cache, or built there when missing, stale, foreign or corrupt (see
:mod:`inspector.engines.trt_build`). Running it:

* one CUDA context per process: the device's primary context, retained once and shared by every
  engine (and by ONNX Runtime or torch in the same process); pushed and popped around each call,
  so it works from whichever thread runs inference;
* per optimisation profile one execution context and two slots, each with its own stream,
  page-locked host buffers and device buffers, allocated once at start for the profile's MAX;
* ``run_async`` uploads into one slot while the other slot's inference runs; the two slots'
  inferences are ordered by an event, since they share one execution context (and so one
  activation memory); ``collect`` waits for a slot's download only.

TensorRT and pycuda are imported when such an engine is opened; without them it fails with an
:class:`~inspector.errors.EngineError` naming the ``gpu`` extra, or, with ``fallback:
onnxruntime``, runs the graph in ONNX Runtime (CUDA, else CPU) with a warning.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from inspector.engines.base import Engine, MissingPackageConfigError, TensorSpec
from inspector.engines.trt_build import (GPU_EXTRA, BatchProfile, DeviceFacts, EngineCache,
                                         EngineSpec, build_serialized_engine, calibration_batches,
                                         calibration_files, calibration_id, engine_name,
                                         file_sha256,
                                         import_pycuda, import_tensorrt, make_entropy_calibrator,
                                         plan_batches, trt_logger)
from inspector.errors import EngineError, InspectorError, MissingPackageError, first_line

log = logging.getLogger(__name__)


class TensorRTConfig(BaseModel):
    """``model.engine`` for ``type: tensorrt``. Relative paths resolve against the bundle folder."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["tensorrt"] = "tensorrt"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    device_id: int = Field(0, ge=0, description="CUDA device ordinal")
    workspace_mb: int = Field(1024, ge=16, description="builder workspace limit")
    min_batch: int = Field(1, ge=1, description="smallest tile batch of the main profile")
    max_batch: int = Field(8, ge=1, le=4096, description="largest tile batch of the main profile")
    opt_batch: int | None = Field(None, ge=1, validate_default=True,
                                  description="batch the kernels are timed for; default max_batch")
    extra_profiles: list[str] = Field(default_factory=list,
                                      description="more profiles, MIN:OPT:MAX tile batches each")
    cache_dir: str | None = Field(None, description="engine cache; default <bundle>/engines, or "
                                                    "/var/lib/inspector/engines/<bundle> where the "
                                                    "bundle folder is read-only")
    engine_file: str | None = Field(None, description="a prebuilt engine (with its .json record) "
                                                      "to use when it fits; default: the cache")
    timing_cache: bool = Field(True, description="reuse the cache folder's timing cache")
    build: Literal["on_miss", "never"] = Field(
        "on_miss", description="never: fail at start rather than build (a build takes minutes)")
    calib_dir: str | None = Field(None, validate_default=True,
                                  description="folder of frames for INT8 calibration")
    calib_batch: int = Field(8, ge=1, description="tiles per calibration batch")
    calib_max_batches: int = Field(64, ge=1, description="calibration batches at most")
    fallback: Literal["none", "onnxruntime"] = Field(
        "none", description="onnxruntime: run the graph in ONNX Runtime when TensorRT, pycuda "
                            "or the GPU is missing (with a warning) instead of failing")

    @field_validator("opt_batch")
    @classmethod
    def _opt_in_range(cls, v: int | None, info: ValidationInfo) -> int | None:
        lo, hi = info.data.get("min_batch"), info.data.get("max_batch")
        if lo is not None and hi is not None:
            if lo > hi:
                raise ValueError(f"min_batch {lo} is above max_batch {hi}")
            if v is not None and not lo <= v <= hi:
                raise ValueError(f"must lie between min_batch {lo} and max_batch {hi}")
        return v

    @field_validator("extra_profiles")
    @classmethod
    def _profiles_parse(cls, v: list[str]) -> list[str]:
        for text in v:
            BatchProfile.parse(text)
        return v

    @field_validator("calib_dir")
    @classmethod
    def _int8_needs_frames(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("precision") == "int8":
            raise ValueError("required for precision int8: a folder of frames to calibrate on "
                             "(a stale int8 engine must be rebuildable)")
        return v

    def profiles(self) -> tuple[BatchProfile, ...]:
        main = BatchProfile(self.min_batch, self.opt_batch or self.max_batch, self.max_batch)
        return (main, *(BatchProfile.parse(t) for t in self.extra_profiles))


# -- graph facts -------------------------------------------------------------------------------
def graph_input(graph: Path) -> tuple[Path, str, tuple[int, int, int], str, Any]:
    """(bundle folder, input name, (C, H, W), graph sha256, bundle or None) of ``graph``.

    From ``bundle.yaml`` beside the graph where there is one (its sha256 was checked at load);
    a bare graph is asked through ONNX Runtime, and must have a fixed C, H and W.
    """
    from inspector.bundle import BUNDLE_FILE, load_bundle

    if (graph.parent / BUNDLE_FILE).is_file():
        try:  # read as every other reader of a bundle reads it (its errors name the file and key)
            bundle = load_bundle(graph.parent, verify=False)
        except InspectorError as e:
            raise EngineError(str(e)) from e
        spec = bundle.spec
        sha = next((g.sha256 for g in spec.graphs.values() if g.file == graph.name), None)
        chw = (spec.input.channels, *spec.input.tile)
        return graph.parent, spec.input.name, chw, sha or file_sha256(graph), bundle
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()
    if len(inp) != 1 or len(inp[0].shape) != 4 or not all(isinstance(d, int) for d in inp[0].shape[1:]):
        raise EngineError(f"{graph}: the tensorrt engine wants one NCHW input with fixed C, H, W "
                          f"(got {[(i.name, i.shape) for i in inp]})")
    c, h, w = inp[0].shape[1:]
    return graph.parent, inp[0].name, (c, h, w), file_sha256(graph), None


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists writable, or could be made in its nearest existing parent."""
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK)


def resolve_in(base: Path, p: str | None, default: Path) -> Path:
    if p is None:
        return default
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


# -- CUDA: one context per process, streams and buffers -------------------------------------------
class CudaContext:
    """The device's primary context, retained once per process and shared (reference counted).

    ``with ctx:`` makes it current on the calling thread and restores the previous one after,
    so the daemon's grab, infer and publish threads can each use it.
    """

    _shared: dict[int, "CudaContext"] = {}
    _lock = threading.Lock()

    def __init__(self, cuda: Any, device_id: int):
        self.cuda = cuda
        self.device_id = device_id
        self.device = cuda.Device(device_id)
        self.context = self.device.retain_primary_context()
        self.refs = 0

    @classmethod
    def acquire(cls, cuda: Any, device_id: int) -> "CudaContext":
        with cls._lock:
            c = cls._shared.get(device_id)
            if c is None:
                try:
                    cuda.init()
                    count = cuda.Device.count()
                    if device_id >= count:
                        raise EngineError(f"model.engine.device_id: CUDA device {device_id} asked "
                                          f"for, this machine has {count}")
                    c = cls(cuda, device_id)
                except EngineError:
                    raise
                except Exception as e:  # pycuda's LogicError/RuntimeError: no driver, no GPU
                    raise EngineError(f"CUDA is not usable ({type(e).__name__}: {e})") from None
                cls._shared[device_id] = c
            c.refs += 1
            return c

    def release(self) -> None:
        with self._lock:
            self.refs -= 1
            if self.refs <= 0 and self._shared.get(self.device_id) is self:
                del self._shared[self.device_id]
                self.context.detach()

    def __enter__(self) -> "CudaContext":
        self.context.push()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cuda.Context.pop()


class _Slot:
    """One of the double buffers: a stream, its host and device buffers, two events."""

    def __init__(self, cuda: Any, inputs: dict[str, tuple[int, np.dtype]],
                 outputs: dict[str, tuple[int, np.dtype]]):
        self.stream = cuda.Stream()
        # flat page-locked buffers, viewed in the shape of each call (async copies need pinned)
        self.host_in = {k: cuda.pagelocked_empty(n, dt) for k, (n, dt) in inputs.items()}
        self.host_out = {k: cuda.pagelocked_empty(n, dt) for k, (n, dt) in outputs.items()}
        self.dev_in = {k: cuda.mem_alloc(max(1, n * np.dtype(dt).itemsize)) for k, (n, dt) in inputs.items()}
        self.dev_out = {k: cuda.mem_alloc(max(1, n * np.dtype(dt).itemsize)) for k, (n, dt) in outputs.items()}
        self.executed = cuda.Event()
        self.done = cuda.Event()
        self.ticket: int | None = None
        self.views: dict[str, np.ndarray] = {}

    def free(self) -> None:
        """Give the memory back now, while the context is current (not at garbage collection)."""
        for d in (*self.dev_in.values(), *self.dev_out.values()):
            d.free()
        for h in (*self.host_in.values(), *self.host_out.values()):
            free = getattr(h.base, "free", None)  # pycuda's HostAllocation behind the array
            if free is not None:
                free()
        self.dev_in, self.dev_out, self.host_in, self.host_out, self.views = {}, {}, {}, {}, {}
        self.stream = self.executed = self.done = None


class StreamPipeline:
    """Double-buffered upload, execute, download over ``depth`` slots (CUDA calls through ``cuda``).

    ``execute(slot, input_shapes)`` enqueues the work on ``slot.stream`` reading
    ``slot.dev_in`` and writing ``slot.dev_out``, and returns the output shapes. Executions are
    ordered across slots (they share one execution context); copies are not, which is the
    overlap. The caller keeps the CUDA context current.
    """

    def __init__(self, cuda: Any, inputs: dict[str, tuple[int, np.dtype]],
                 outputs: dict[str, tuple[int, np.dtype]],
                 execute: Callable[[_Slot, dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]],
                 depth: int = 2):
        self.cuda = cuda
        self.execute = execute
        self.depth = depth
        self.slots = [_Slot(cuda, inputs, outputs) for _ in range(depth)]
        self._next = 0
        self._last_exec: tuple[_Slot, Any] | None = None

    def submit(self, feeds: dict[str, np.ndarray]) -> int:
        ticket = self._next
        self._next += 1
        slot = self.slots[ticket % self.depth]
        if slot.ticket is not None:
            # reusing the slot: its last download must be over (those outputs are given up)
            slot.done.synchronize()
        slot.ticket = ticket
        shapes: dict[str, tuple[int, ...]] = {}
        for name, host in slot.host_in.items():
            arr = feeds.get(name)
            if arr is None:
                raise EngineError(f"input '{name}' not fed (got {sorted(feeds)})")
            if arr.size > host.size:
                raise EngineError(f"input '{name}' of shape {arr.shape} exceeds the buffer "
                                  f"allocated for the profile's MAX ({host.size} values)")
            view = host[:arr.size].reshape(arr.shape)
            np.copyto(view, arr, casting="same_kind")
            self.cuda.memcpy_htod_async(slot.dev_in[name], view, slot.stream)
            shapes[name] = tuple(arr.shape)
        if self._last_exec is not None and self._last_exec[0] is not slot:
            slot.stream.wait_for_event(self._last_exec[1])
        out_shapes = self.execute(slot, shapes)
        slot.executed.record(slot.stream)
        self._last_exec = (slot, slot.executed)
        slot.views = {}
        for name, shape in out_shapes.items():
            size = int(np.prod(shape))
            view = slot.host_out[name][:size].reshape(shape)
            self.cuda.memcpy_dtoh_async(view, slot.dev_out[name], slot.stream)
            slot.views[name] = view
        slot.done.record(slot.stream)
        return ticket

    def collect(self, ticket: int) -> dict[str, np.ndarray]:
        slot = self.slots[ticket % self.depth]
        if slot.ticket != ticket:
            raise EngineError(f"ticket {ticket} was overwritten by ticket {slot.ticket}: collect "
                              f"at most {self.depth} submissions behind")
        slot.done.synchronize()
        return dict(slot.views)

    def close(self) -> None:
        for s in self.slots:
            s.done.synchronize()
            s.free()


def run_chunked(submit: Callable[[dict[str, np.ndarray]], int],
                collect: Callable[[int], dict[str, np.ndarray]], depth: int,
                feeds: dict[str, np.ndarray], chunks: list[tuple[int, int]],
                out_cache: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Run ``feeds`` chunk by chunk (``(start, count)`` along axis 0), ``depth`` in flight,
    gathering each collected chunk into one array per output (allocated once per batch size)."""
    n = next(iter(feeds.values())).shape[0]
    outs = out_cache.get(n)
    pending: list[tuple[int, int]] = []

    def take(start: int, ticket: int) -> None:
        nonlocal outs
        res = collect(ticket)
        if outs is None:
            outs = {k: np.empty((n, *v.shape[1:]), v.dtype) for k, v in res.items()}
            out_cache[n] = outs
        for k, v in res.items():
            outs[k][start:start + len(v)] = v

    for start, count in chunks:
        if len(pending) >= depth:
            take(*pending.pop(0))
        pending.append((start, submit({k: v[start:start + count] for k, v in feeds.items()})))
    while pending:
        take(*pending.pop(0))
    assert outs is not None
    return outs


# -- the engine --------------------------------------------------------------------------------
class TensorRTEngine(Engine):
    """A cached (or freshly built) TensorRT engine over one bundle graph.

    Example (on a machine with a GPU, TensorRT and pycuda)::

        eng = TensorRTEngine("deploy/models/demo-arcd/model.onnx", TensorRTConfig(precision="fp16"))
        probs = eng.run({"image": tiles})["probs"]      # tiles: N x C x H x W float32
    """

    async_depth = 2

    def __init__(self, graph: str | Path, cfg: TensorRTConfig | None = None):
        cfg = cfg or TensorRTConfig()
        self.cfg = cfg
        graph = Path(graph)
        if not graph.is_file():
            raise EngineError(f"{graph}: ONNX graph not found")
        trt = import_tensorrt()
        cuda = import_pycuda()
        self._cuda = cuda
        self._ctx = CudaContext.acquire(cuda, cfg.device_id)
        self._pipes: list[StreamPipeline] = []
        self._contexts: list[Any] = []
        self._run_out: dict[int, dict[str, np.ndarray]] = {}
        try:
            with self._ctx:
                self._open(trt, cuda, graph, cfg)
        except BaseException:
            self.close()
            raise

    def _open(self, trt: Any, cuda: Any, graph: Path, cfg: TensorRTConfig) -> None:
        dev = self._ctx.device
        facts = DeviceFacts(str(dev.name()), tuple(int(x) for x in dev.compute_capability()),
                            str(trt.__version__))
        bundle_dir, input_name, chw, sha, bundle = graph_input(graph)
        calib_files = calibration_files(resolve_in(bundle_dir, cfg.calib_dir, bundle_dir)) \
            if cfg.precision == "int8" else []
        profiles = cfg.profiles()
        fixed = bundle.spec.input.batch if bundle is not None else 0
        if fixed and profiles != (BatchProfile(fixed, fixed, fixed),):
            # a graph exported with a fixed batch admits that batch only
            log.info("%s has a fixed batch of %d: building for %d:%d:%d", graph, fixed, fixed, fixed, fixed)
            profiles = (BatchProfile(fixed, fixed, fixed),)
        spec = EngineSpec(graph_sha256=sha, input_name=input_name, input_chw=chw,
                          precision=cfg.precision, profiles=profiles,
                          calibration=calibration_id(calib_files) if calib_files else None)
        cache_dir = resolve_in(bundle_dir, cfg.cache_dir, bundle_dir / "engines")
        if cfg.cache_dir is None and not _writable(cache_dir):
            # an installed bundle is read-only (systemd ProtectSystem=strict); deploy/install.sh
            # gives the service a writable engine cache under /var/lib/inspector instead
            alt = Path(os.environ.get("INSPECTOR_ENGINE_CACHE", "/var/lib/inspector/engines")) / bundle_dir.name
            if _writable(alt):
                log.info("%s is read-only; TensorRT engines are cached in %s", cache_dir, alt)
                cache_dir = alt
        engine_file = resolve_in(bundle_dir, cfg.engine_file, bundle_dir) if cfg.engine_file else None
        cache = EngineCache(cache_dir)
        runtime = trt.Runtime(trt_logger(trt))
        self._runtime = runtime

        def load(blob: bytes) -> Any:
            eng = runtime.deserialize_cuda_engine(blob)
            if eng is None:
                raise EngineError("TensorRT could not deserialize it (see the tensorrt log line)")
            return eng

        def build() -> bytes:
            factory = None
            if spec.precision == "int8":
                if bundle is None:
                    raise EngineError(f"{graph}: INT8 calibration needs the bundle's preprocessing "
                                      f"(bundle.yaml beside the graph)")
                tag = f"calib-{sha[:12]}-{spec.calibration}.cache"
                factory = lambda: make_entropy_calibrator(  # noqa: E731
                    trt, cuda, calibration_batches(bundle, calib_files, cfg.calib_batch,
                                                   cfg.calib_max_batches),
                    cfg.calib_batch, chw, cache_dir / tag)
            timing = cache_dir / f"timing-{facts.sm}-trt{facts.tensorrt_version}.cache" \
                if cfg.timing_cache else None
            return build_serialized_engine(graph, spec, cfg.workspace_mb, timing, factory)

        self._engine, how = cache.load_or_build(
            spec, facts, build, load, allow_build=cfg.build == "on_miss", engine_file=engine_file,
            info={"graph": str(graph), "workspace_mb": cfg.workspace_mb})
        self._setup_io(trt, cuda)
        self.facts, self.spec, self.how = facts, spec, how
        # a prebuilt engine_file is used as it is; anything built goes into the cache folder
        self.engine_path = engine_file if how == "cached" and engine_file is not None \
            else cache.paths(engine_name(spec, facts))[0]
        self.backend = f"tensorrt:{cfg.precision}:{facts.gpu_name}"
        log.info("engine %s (TensorRT %s, %s, %s) for %s; batch profiles %s", self.backend,
                 facts.tensorrt_version, facts.sm, how, graph.name,
                 ", ".join(str(p) for p in self.profiles))

    def _setup_io(self, trt: Any, cuda: Any) -> None:
        eng = self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        ins = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        dtypes = {n: np.dtype(trt.nptype(eng.get_tensor_dtype(n))) for n in names}

        def spec_of(n: str) -> TensorSpec:
            shape = tuple(None if int(d) < 0 else int(d) for d in eng.get_tensor_shape(n))
            return TensorSpec(n, shape, dtypes[n].name)

        self.inputs = [spec_of(n) for n in ins]
        self.outputs = [spec_of(n) for n in outs]
        self._input_names, self._output_names = ins, outs
        profiles = []
        for p in range(eng.num_optimization_profiles):
            # the engine's own profile shapes (not the config's): right for any engine file
            lo, opt, hi = (tuple(s) for s in eng.get_tensor_profile_shape(ins[0], p))
            profiles.append(BatchProfile(int(lo[0]), int(opt[0]), int(hi[0])))
            ctx = eng.create_execution_context()
            if ctx is None:
                raise EngineError("TensorRT could not create an execution context (GPU memory?)")
            maxes: dict[str, tuple[int, ...]] = {}
            for n in ins:
                maxes[n] = tuple(int(d) for d in eng.get_tensor_profile_shape(n, p)[2])
            pipe = self._make_pipe(cuda, ctx, p, maxes, dtypes)
            self._contexts.append(ctx)
            self._pipes.append(pipe)
        self.profiles = tuple(profiles)
        self.max_batch = max(p.max for p in profiles)

    def _make_pipe(self, cuda: Any, ctx: Any, p: int, maxes: dict[str, tuple[int, ...]],
                   dtypes: dict[str, np.dtype]) -> StreamPipeline:
        setup = cuda.Stream()
        if p > 0:
            ctx.set_optimization_profile_async(p, setup.handle)
        for n, shape in maxes.items():
            if not ctx.set_input_shape(n, shape):
                raise EngineError(f"TensorRT refused input shape {shape} for '{n}' (profile {p})")
        out_max = {n: tuple(int(d) for d in ctx.get_tensor_shape(n)) for n in self._output_names}
        setup.synchronize()
        in_sizes = {n: (int(np.prod(s)), dtypes[n]) for n, s in maxes.items()}
        out_sizes = {n: (int(np.prod(s)), dtypes[n]) for n, s in out_max.items()}
        current: dict[str, tuple[int, ...]] = dict(maxes)
        shape_memo: dict[tuple, dict[str, tuple[int, ...]]] = {}
        outputs = self._output_names

        def execute(slot: _Slot, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
            for n, s in shapes.items():
                if current.get(n) != s:
                    if not ctx.set_input_shape(n, s):
                        raise EngineError(f"TensorRT refused input shape {s} for '{n}'")
                    current[n] = s
            for n, d in slot.dev_in.items():
                ctx.set_tensor_address(n, int(d))
            for n, d in slot.dev_out.items():
                ctx.set_tensor_address(n, int(d))
            key = tuple(sorted(shapes.items()))
            out_shapes = shape_memo.get(key)
            if out_shapes is None:
                out_shapes = {n: tuple(int(d) for d in ctx.get_tensor_shape(n)) for n in outputs}
                shape_memo[key] = out_shapes
            if not ctx.execute_async_v3(slot.stream.handle):
                raise EngineError("TensorRT execute_async_v3 failed (see the tensorrt log line)")
            return out_shapes

        return StreamPipeline(cuda, in_sizes, out_sizes, execute, depth=self.async_depth)

    # -- Engine interface ----------------------------------------------------------------------
    def _batch(self, feeds: dict[str, np.ndarray]) -> int:
        try:
            return int(feeds[self._input_names[0]].shape[0])
        except KeyError:
            raise EngineError(f"input '{self._input_names[0]}' not fed (got {sorted(feeds)})") from None

    def run_async(self, feeds: dict[str, np.ndarray]) -> int:
        n = self._batch(feeds)
        plan = plan_batches(self.profiles, n)
        if len(plan) > 1:
            raise EngineError(f"a batch of {n} tiles exceeds the engine's largest profile "
                              f"({self.max_batch}): set model.max_batch <= {self.max_batch} or "
                              f"rebuild with a larger max_batch")
        p = plan[0][0]
        try:
            with self._ctx:
                inner = self._pipes[p].submit(feeds)
        except EngineError:
            raise
        except Exception as e:  # pycuda errors
            raise EngineError(f"CUDA error while queueing a batch: {e}") from e
        return inner * len(self._pipes) + p

    def collect(self, ticket: int) -> dict[str, np.ndarray]:
        p, inner = ticket % len(self._pipes), ticket // len(self._pipes)
        try:
            with self._ctx:
                return self._pipes[p].collect(inner)
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"CUDA error while waiting for a batch: {e}") from e

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch of any size; above the largest profile it runs in overlapped chunks."""
        n = self._batch(feeds)
        plan = plan_batches(self.profiles, n)
        if len(plan) == 1:
            return self.collect(self.run_async(feeds))
        return run_chunked(self.run_async, self.collect, self.async_depth, feeds,
                           [(s, c) for _, s, c in plan], self._run_out)

    def close(self) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx is None:
            return
        try:
            with ctx:
                for pipe in self._pipes:
                    pipe.close()
                self._pipes, self._contexts = [], []
                self._engine = None
        except Exception as e:  # closing at exit must not mask the original error
            log.debug("closing the TensorRT engine: %s", e)
        finally:
            self._ctx = None
            ctx.release()


def export_engine(bundle_dir: str | Path, cfg: TensorRTConfig) -> dict[str, Any]:
    """``inspector export tensorrt``: load the bundle's engine for ``cfg`` from its cache, or build
    and cache it; returns what was done. A daemon with the same engine config then loads it."""
    from inspector.bundle import load_bundle

    bundle = load_bundle(bundle_dir)  # the graph's sha256 is checked before anything is built
    if cfg.fallback != "none":
        cfg = cfg.model_copy(update={"fallback": "none"})
    eng = TensorRTEngine(bundle.graph_path("model"), cfg)
    try:
        return {"bundle": str(bundle.path), "engine": str(eng.engine_path), "how": eng.how,
                "backend": eng.backend, "gpu": eng.facts.gpu_name, "sm": eng.facts.sm,
                "tensorrt": eng.facts.tensorrt_version, "precision": cfg.precision,
                "profiles": [str(p) for p in eng.profiles]}
    finally:
        eng.close()


def open_tensorrt(graph: str | Path, cfg: TensorRTConfig, config_file: str | None = None) -> Engine:
    """The tensorrt engine, or with ``fallback: onnxruntime`` ONNX Runtime where it cannot run.

    ``config_file``: the camera config ``cfg`` comes from; a missing TensorRT or pycuda is then
    reported naming it and ``model.engine.type`` (exit 2 either way)."""
    try:
        return TensorRTEngine(graph, cfg)
    except EngineError as e:
        if cfg.fallback != "onnxruntime":
            if isinstance(e, MissingPackageError):
                problem = (f"tensorrt, but {e}; or set model.engine.fallback: onnxruntime to run "
                           "the graph in ONNX Runtime meanwhile")
                if config_file:
                    raise MissingPackageConfigError(config_file, "model.engine.type", problem) from None
                raise MissingPackageError(f"model.engine.type: {problem}") from None
            raise
        from inspector.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine

        log.warning("TensorRT engine unavailable (%s); falling back to ONNX Runtime as "
                    "model.engine.fallback says", e)
        eng = OnnxRuntimeEngine(graph, OnnxRuntimeConfig(providers=["cuda", "cpu"],
                                                         device_id=cfg.device_id), config_file)
        # one line for what ran: the fallback's own provider notes name a key this config lacks
        eng.warnings = (f"TensorRT engine unavailable ({first_line(e)}); running on {eng.backend} "
                        "(model.engine.fallback)",)
        return eng


__all__ = ["TensorRTConfig", "TensorRTEngine", "StreamPipeline", "CudaContext", "open_tensorrt",
           "export_engine", "GPU_EXTRA"]
