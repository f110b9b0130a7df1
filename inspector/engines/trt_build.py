"""How TensorRT engines come to exist: shapes, cache keys, the engine cache, the builder.

An engine is built on the target machine from a bundle's ONNX graph and cached beside the bundle
(``<bundle>/engines/<name>.engine`` plus ``<name>.json``). It is keyed by everything that makes a
serialized engine valid: GPU name, compute capability, TensorRT version, precision, input shapes
(one optimisation profile per ``MIN:OPT:MAX`` tile batch range), the graph's sha256 and, for INT8,
the calibration set. A cached engine whose key differs is stale or foreign: it is rebuilt (one log
line) and never loaded; one whose bytes do not match its record, or that TensorRT cannot
deserialize, is corrupt: it is rebuilt too.

Everything above the ``build_serialized_engine`` line is plain Python (no GPU, no TensorRT) so it
is tested anywhere; the cache takes the builder and the loader as functions. Example::

    >>> p = parse_shapes("1:7:8")
    >>> plan_batches(p, 10)
    [(0, 0, 5), (0, 5, 5)]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from inspector.engines.base import Engine, TensorSpec
from inspector.errors import EngineError, MissingPackageError
from inspector.fileio import atomic_write_bytes, missing_folder

log = logging.getLogger(__name__)

#: bumped when the cache's file layout or key changes; older records are then stale
CACHE_FORMAT = 1
#: how to get TensorRT and pycuda. Not `pip install -e '.[gpu]'`: that puts onnxruntime-gpu beside
#: the CPU onnxruntime the runtime requires, and the CPU build left there hides the GPU providers;
#: install.sh swaps them, and the engine itself needs only the two packages
GPU_EXTRA = ("the `gpu` extra (TensorRT >= 10 and pycuda): EXTRAS=plc,gpu deploy/install.sh, which "
             "also puts onnxruntime-gpu in place of the CPU onnxruntime; or for this engine alone: "
             "pip install 'tensorrt>=10' 'pycuda>=2024.1'")
PRECISIONS = ("fp32", "fp16", "int8")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

T = TypeVar("T")


# -- lazy imports of the GPU stack -------------------------------------------------------------
def _package_missing(e: ImportError, package: str) -> bool:
    """The package itself is not installed (exit 2: install the extra), as against an installed
    one whose shared library cannot be loaded (a driver not installed yet: exit 1, restarted)."""
    return isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == package


def import_tensorrt() -> Any:
    """``tensorrt`` (10 or later), or an EngineError naming the gpu extra."""
    try:
        import tensorrt as trt
    except ImportError as e:
        if not _package_missing(e, "tensorrt"):  # installed, its libnvinfer is not loadable
            raise EngineError(f"TensorRT is installed but does not load ({e}); check the CUDA / "
                              "TensorRT libraries of this machine") from None
        raise MissingPackageError(f"TensorRT is not importable ({type(e).__name__}: {e}); the tensorrt "
                                  f"engine needs {GPU_EXTRA}") from None
    except Exception as e:  # OSError from a missing libnvinfer
        raise EngineError(f"TensorRT is not importable ({type(e).__name__}: {e}); the tensorrt "
                          f"engine needs {GPU_EXTRA}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old: the tensorrt engine uses the "
                          f"name-based tensor API of TensorRT 10 and later ({GPU_EXTRA})")
    return trt


def import_pycuda() -> Any:
    """``pycuda.driver``, or an EngineError naming the gpu extra."""
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        if not _package_missing(e, "pycuda"):  # installed, libcuda.so (the driver) is not loadable
            raise EngineError(f"pycuda is installed but does not load ({e}); check the NVIDIA "
                              "driver of this machine") from None
        raise MissingPackageError(f"pycuda is not importable ({type(e).__name__}: {e}); the tensorrt "
                                  f"engine needs {GPU_EXTRA}") from None
    except Exception as e:  # OSError from a missing libcuda
        raise EngineError(f"pycuda is not importable ({type(e).__name__}: {e}); the tensorrt "
                          f"engine needs {GPU_EXTRA}") from None
    return cuda


# -- shapes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchProfile:
    """One optimisation profile: the smallest, the tuned-for and the largest tile batch."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"batch profile {self.min}:{self.opt}:{self.max}: expected "
                             f"1 <= MIN <= OPT <= MAX")

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """``MIN:OPT:MAX``, or ``N`` for 1:N:N (every batch up to N, tuned for N)."""
        parts = str(text).strip().split(":")
        if not all(re.fullmatch(r"\d+", p) for p in parts) or len(parts) not in (1, 3):
            raise ValueError(f"batch profile {text!r}: expected MIN:OPT:MAX or N (tile batch "
                             f"sizes, e.g. 1:7:8)")
        nums = [int(p) for p in parts]
        return cls(1, nums[0], nums[0]) if len(nums) == 1 else cls(*nums)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def shapes(self, chw: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) NCHW shapes for an input of ``chw``."""
        c = tuple(int(x) for x in chw)
        return (self.min, *c), (self.opt, *c), (self.max, *c)

    def fits(self, n: int) -> bool:
        return self.min <= n <= self.max


def parse_shapes(text: str | Iterable[str]) -> tuple[BatchProfile, ...]:
    """``"1:7:8,16:16:32"`` (or a list of such) -> profiles, in order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    profiles = tuple(BatchProfile.parse(t) for t in items if str(t).strip())
    if not profiles:
        raise ValueError("no batch profile given (expected MIN:OPT:MAX, e.g. 1:7:8)")
    return profiles


def select_profile(profiles: Sequence[BatchProfile], n: int) -> int | None:
    """The profile a batch of ``n`` tiles runs in: the tightest one that holds it, else None.

    Tightest (smallest MAX, then OPT nearest ``n``) because its buffers and kernels were sized
    and timed closest to this batch.
    """
    fitting = [i for i, p in enumerate(profiles) if p.fits(n)]
    if not fitting:
        return None
    return min(fitting, key=lambda i: (profiles[i].max, abs(profiles[i].opt - n), i))


def plan_batches(profiles: Sequence[BatchProfile], n: int) -> list[tuple[int, int, int]]:
    """How ``n`` tiles run: ``[(profile, start, count), ...]``.

    One call where a profile holds ``n``; otherwise near-equal chunks of the largest profile, so
    that double buffering has two halves of similar cost to overlap (10 tiles at MAX 8 run as
    5 + 5, not 8 + 2).
    """
    if n < 1:
        raise EngineError(f"empty batch ({n} tiles)")
    p = select_profile(profiles, n)
    if p is not None:
        return [(p, 0, n)]
    big = max(range(len(profiles)), key=lambda i: (profiles[i].max, -i))
    cap = profiles[big].max
    if n < profiles[big].min:
        raise EngineError(f"a batch of {n} tiles is below every profile's MIN "
                          f"({', '.join(str(q) for q in profiles)}); rebuild with MIN 1")
    chunks = -(-n // cap)
    base, extra = divmod(n, chunks)
    plan, start = [], 0
    for k in range(chunks):
        count = base + (1 if k < extra else 0)
        q = select_profile(profiles, count)
        if q is None:
            raise EngineError(f"a chunk of {count} tiles fits no profile "
                              f"({', '.join(str(x) for x in profiles)})")
        plan.append((q, start, count))
        start += count
    return plan


# -- what an engine is built for ---------------------------------------------------------------
@dataclass(frozen=True)
class DeviceFacts:
    """The facts of the machine that a serialized engine is only valid for."""

    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    def describe(self) -> str:
        return f"{self.gpu_name} ({self.sm}), TensorRT {self.tensorrt_version}"


@dataclass(frozen=True)
class EngineSpec:
    """What is built: which graph, for which input shapes, at which precision."""

    graph_sha256: str
    input_name: str
    input_chw: tuple[int, int, int]
    precision: str
    profiles: tuple[BatchProfile, ...]
    #: INT8 only: identity of the calibration frame set (see :func:`calibration_id`)
    calibration: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {PRECISIONS}")
        if not self.profiles:
            raise ValueError("at least one batch profile is needed")

    def describe(self) -> str:
        return (f"{self.precision}, input {self.input_name} {list(self.input_chw)}, batch "
                f"{', '.join(str(p) for p in self.profiles)}, graph {self.graph_sha256[:12]}")


def cache_key(spec: EngineSpec, facts: DeviceFacts) -> dict[str, Any]:
    """Everything a cached engine must match, as a JSON-able dict (the record's ``key``)."""
    return {
        "format": CACHE_FORMAT,
        "gpu": facts.gpu_name,
        "compute_capability": f"{facts.compute_capability[0]}.{facts.compute_capability[1]}",
        "tensorrt": facts.tensorrt_version,
        "precision": spec.precision,
        "input": spec.input_name,
        "input_chw": list(spec.input_chw),
        "profiles": [str(p) for p in spec.profiles],
        "graph_sha256": spec.graph_sha256,
        "calibration": spec.calibration,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "gpu"


def engine_name(spec: EngineSpec, facts: DeviceFacts) -> str:
    """File stem: readable facts, then a digest of the whole key (so any change is a new file)."""
    key = json.dumps(cache_key(spec, facts), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    batches = "_".join(str(p).replace(":", ".") for p in spec.profiles)
    return (f"{_slug(facts.gpu_name)}-{facts.sm}-trt{_slug(facts.tensorrt_version)}-"
            f"{spec.precision}-b{batches}-{digest}")


_FIELD_WORDS = {
    "format": "cache format",
    "gpu": "GPU",
    "compute_capability": "compute capability",
    "tensorrt": "TensorRT",
    "precision": "precision",
    "input": "input tensor",
    "input_chw": "input shape",
    "profiles": "batch profiles",
    "graph_sha256": "graph sha256",
    "calibration": "INT8 calibration set",
}


def stale_reason(record: dict[str, Any] | None, expected: dict[str, Any]) -> str | None:
    """Why a cached engine's record does not fit ``expected`` (None when it fits).

    Foreign (another GPU or TensorRT) is named before stale (another graph, shape or
    precision), as it is the likelier cause when a bundle folder is copied between machines.
    """
    if not isinstance(record, dict) or not isinstance(record.get("key"), dict):
        return "its record is missing or unreadable"
    have = record["key"]
    diffs = []
    for field in _FIELD_WORDS:
        a, b = have.get(field), expected.get(field)
        if a != b:
            if field == "graph_sha256":
                diffs.append(f"built from another graph (sha256 {str(a)[:12]}…, the bundle's is "
                             f"{str(b)[:12]}…)")
            else:
                diffs.append(f"built for {_FIELD_WORDS[field]} {a}, this needs {b}")
    return "; ".join(diffs) if diffs else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EngineCache:
    """Serialized engines in one folder, each beside a JSON record of its key.

    ``load_or_build`` takes the builder and the loader as functions, so the whole decision
    (cached, stale, foreign, corrupt, missing) runs without TensorRT. Builds of one folder are
    serialised with a file lock, so two daemons of one bundle build once, not twice.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.engine", self.folder / f"{name}.json"

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        try:
            import fcntl

            self.folder.mkdir(parents=True, exist_ok=True)
            f = open(self.folder / ".lock", "a")
        except (OSError, ImportError):  # read-only bundle or no fcntl: build without the lock
            yield
            return
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _others(self, name: str, expected: dict[str, Any]) -> list[str]:
        """Records of other engines for the same input and precision (stale or foreign)."""
        found = []
        for rec_path in sorted(self.folder.glob("*.json")):
            if rec_path.stem == name:
                continue
            try:
                rec = json.loads(rec_path.read_text())
            except (OSError, ValueError):
                continue
            key = rec.get("key") if isinstance(rec, dict) else None
            if not isinstance(key, dict) or key.get("input") != expected["input"] \
                    or key.get("precision") != expected["precision"]:
                continue
            why = stale_reason(rec, expected)
            if why:
                found.append(f"{rec_path.stem}: {why}")
        return found

    def check(self, spec: EngineSpec, facts: DeviceFacts, engine_file: Path | None = None,
              ) -> tuple[Path, str | None]:
        """The engine file to use and why it cannot be used as it is (None = load it).

        ``engine_file`` names a prebuilt engine (its record is ``<stem>.json`` beside it);
        default: the cache's own file for this key.
        """
        expected = cache_key(spec, facts)
        name = engine_name(spec, facts)
        eng, rec_path = self.paths(name)
        if engine_file is not None:
            eng, rec_path = Path(engine_file), Path(engine_file).with_suffix(".json")
        if not eng.is_file():
            others = self._others(name, expected) if self.folder.is_dir() else []
            if others:
                return eng, (f"no engine for this key; ignoring {len(others)} stale or foreign: "
                             + " | ".join(others[:2]) + (" | …" if len(others) > 2 else ""))
            return eng, "no engine for this key yet"
        try:
            record = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            record = None
        why = stale_reason(record, expected)
        if why:
            return eng, f"stale or foreign engine {eng.name}: {why}"
        digest = file_sha256(eng)
        if record.get("engine_sha256") != digest:
            return eng, (f"corrupt engine {eng.name}: sha256 {digest[:12]}… does not match its "
                         f"record ({str(record.get('engine_sha256'))[:12]}…)")
        return eng, None

    def load_or_build(self, spec: EngineSpec, facts: DeviceFacts, build: Callable[[], bytes],
                      load: Callable[[bytes], T], allow_build: bool = True,
                      engine_file: Path | None = None, info: dict[str, Any] | None = None,
                      ) -> tuple[T, str]:
        """The engine for ``spec`` on ``facts``: loaded if a valid one is cached, else built.

        Returns ``(loaded, how)`` with ``how`` one of ``cached``, ``built``, ``rebuilt``.
        ``load`` must raise (any exception) on bytes it cannot deserialize.
        """
        with self._lock():
            eng, why = self.check(spec, facts, engine_file)
            rebuilt = why is not None and not why.startswith("no engine for this key yet")
            if why is None:
                blob = eng.read_bytes()
                try:
                    return load(blob), "cached"
                except Exception as e:
                    why, rebuilt = f"corrupt engine {eng.name}: it does not deserialize ({e})", True
            if not allow_build:
                raise EngineError(f"{eng}: no usable TensorRT engine ({why}) and building is "
                                  f"off (model.engine.build: never); build it with `inspector "
                                  f"export tensorrt --bundle ... --precision {spec.precision} "
                                  f"--shapes {','.join(str(p) for p in spec.profiles)}`")
            # the one line an operator sees for a (re)build; the build itself may take minutes
            log.warning("TensorRT engine for %s on %s: %s; %s", spec.describe(), facts.describe(),
                        why, "rebuilding" if rebuilt else "building")
            t0 = time.perf_counter()
            blob = bytes(build())
            build_s = time.perf_counter() - t0
            try:
                loaded = load(blob)
            except Exception as e:
                raise EngineError(f"the TensorRT engine just built for {spec.describe()} does not "
                                  f"load: {e}") from e
            name = engine_name(spec, facts)
            eng, rec_path = self.paths(name)
            record = {"key": cache_key(spec, facts), "engine_sha256": hashlib.sha256(blob).hexdigest(),
                      "engine_bytes": len(blob), "build_s": round(build_s, 2),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})}
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(eng, blob)
                atomic_write_bytes(rec_path, (json.dumps(record, indent=2) + "\n").encode())
                log.info("cached TensorRT engine %s (%.1f MB, built in %.1f s)", eng,
                         len(blob) / 1e6, build_s)
            except OSError as e:
                log.warning("could not cache the TensorRT engine in %s (%s); it will be built "
                            "again at the next start", self.folder, e)
            return loaded, "rebuilt" if rebuilt else "built"


# -- INT8 calibration frames (plain Python: they go through the bundle's preprocessing) --------
def calibration_files(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise EngineError(f"{root}: {missing_folder(root, 'INT8 calibration folder')} (expected a "
                          "folder of frames)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise EngineError(f"{root}: no calibration frames in it (expected {', '.join(IMAGE_SUFFIXES)})")
    return files


def calibration_id(files: Sequence[Path]) -> str:
    """Names and sizes of the frames: a changed set gives another engine and calibration cache."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def read_frame(path: Path) -> np.ndarray:
    """An image file as uint8 HxW (grey) or HxWx3 (RGB), like a camera frame."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise EngineError(f"{path}: not a readable image")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.dtype != np.uint8:
        raise EngineError(f"{path}: {img.dtype} pixels; expected 8- or 16-bit")
    if img.ndim == 3:
        img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB) if img.shape[2] >= 3 else img[:, :, 0]
    return img


def calibration_batches(bundle: Any, files: Sequence[Path], batch: int,
                        max_batches: int | None = None) -> Iterator[np.ndarray]:
    """Normalised NCHW tile batches of exactly ``batch`` tiles from ``files``.

    Frames are tiled and normalised by the bundle's own adapter, the code the daemon runs, so
    INT8 ranges are measured on what the engine will be fed. Leftover tiles are dropped.
    """
    from inspector.models import make_adapter

    adapter = make_adapter(bundle, PreprocessOnly(bundle))
    spec = bundle.spec.input
    buf = np.empty((batch, spec.channels, *spec.tile), np.float32)
    k = made = 0
    for f in files:
        tiles, g = adapter.fill_batch(read_frame(f))
        for t in tiles[:g.count]:
            buf[k] = t
            k += 1
            if k == batch:
                yield buf.copy()
                made += 1
                k = 0
                if max_batches is not None and made >= max_batches:
                    return
    if made == 0:
        raise EngineError(f"{len(files)} calibration frame(s) gave fewer than {batch} tiles: "
                          f"add frames or lower calib_batch")


class PreprocessOnly(Engine):
    """Stands in for an engine where only the bundle's preprocessing is wanted (calibration)."""

    backend = "none"

    def __init__(self, bundle: Any):
        spec = bundle.spec.input
        self.inputs = [TensorSpec(spec.name, (None, spec.channels, *spec.tile), "float32")]
        self.outputs = [TensorSpec(n, (None,), "float32") for n in bundle.spec.outputs.values()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise EngineError("this engine only describes a bundle's tensors; it does not run")


# ============================ below: needs TensorRT (and a GPU) ===============================
_TRT_LOGGER: Any = None


def trt_logger(trt: Any) -> Any:
    """One process-wide TensorRT logger that forwards into ``logging`` (logger ``tensorrt``)."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        sev = trt.ILogger.Severity
        levels = {sev.INTERNAL_ERROR: logging.ERROR, sev.ERROR: logging.ERROR,
                  sev.WARNING: logging.WARNING, sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG}
        out = logging.getLogger("tensorrt")

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                out.log(levels.get(severity, logging.INFO), "%s", msg)

        _TRT_LOGGER = _Logger()
    return _TRT_LOGGER


def make_entropy_calibrator(trt: Any, cuda: Any, batches: Iterator[np.ndarray], batch: int,
                            chw: Sequence[int], cache_file: Path | None) -> Any:
    """An ``IInt8EntropyCalibrator2`` fed from ``batches``; its table is cached in ``cache_file``."""
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise EngineError(f"TensorRT {trt.__version__} has no implicit INT8 calibration "
                          f"(removed in TensorRT 11: it wants Q/DQ nodes in the ONNX graph); "
                          f"use precision fp16 or fp32, or TensorRT 10")

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.batches = iter(batches)
            self.host = cuda.pagelocked_empty((batch, *chw), np.float32)
            self.device = cuda.mem_alloc(self.host.nbytes)
            self.count = 0

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                b = next(self.batches)
            except StopIteration:
                log.info("INT8 calibration used %d batch(es) of %d tiles", self.count, batch)
                return None
            np.copyto(self.host, b)
            cuda.memcpy_htod(self.device, self.host)
            self.count += 1
            return [int(self.device)] * len(names)

        def read_calibration_cache(self) -> bytes | None:
            if cache_file is not None and cache_file.is_file():
                log.info("INT8 calibration table from %s", cache_file)
                return cache_file.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_file is None:
                return
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(cache_file, bytes(cache))
            except OSError as e:
                log.warning("could not write the INT8 calibration table %s: %s", cache_file, e)

    return EntropyCalibrator()


def build_serialized_engine(graph: Path, spec: EngineSpec, workspace_mb: int = 1024,
                            timing_cache: Path | None = None,
                            calibrator_factory: Callable[[], Any] | None = None) -> bytes:
    """Build ``spec`` from the ONNX ``graph``; run with the target device's CUDA context current.

    ``timing_cache`` is read if present and written back after the build, so rebuilding after a
    TensorRT or graph update re-times only what changed. INT8 needs ``calibrator_factory``.
    """
    trt = import_tensorrt()
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    # explicit batch is the only mode since TensorRT 10, so no creation flags are needed
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{graph}: TensorRT's ONNX parser refused the graph: {errs or 'no detail'}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [spec.input_name]:
        raise EngineError(f"{graph}: graph inputs {names}; the engine is built for one input "
                          f"'{spec.input_name}'")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for p in spec.profiles:
        prof = builder.create_optimization_profile()
        prof.set_shape(spec.input_name, *p.shapes(spec.input_chw))
        config.add_optimization_profile(prof)
    if spec.precision in ("fp16", "int8"):
        flag = getattr(trt.BuilderFlag, "FP16", None)
        if flag is None:
            raise EngineError(f"TensorRT {trt.__version__} removed the fp16/int8 precision flags "
                              f"(TensorRT 11 builds strongly typed networks only): build "
                              f"precision fp32 from this graph, or use TensorRT 10")
        # int8 keeps fp16 allowed so layers INT8 cannot do do not fall back to fp32
        config.set_flag(flag)
    if spec.precision == "int8":
        if calibrator_factory is None:
            raise EngineError("precision int8 needs calibration frames (calib_dir / --calib)")
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = calibrator_factory()
        config.int8_calibrator = calibrator
        batch = calibrator.get_batch_size()
        cprof = builder.create_optimization_profile()
        fixed = (batch, *spec.input_chw)
        cprof.set_shape(spec.input_name, fixed, fixed, fixed)
        config.set_calibration_profile(cprof)
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s does not fit this GPU/TensorRT; starting a new one",
                        timing_cache)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building TensorRT engine from %s: %s, workspace %d MB", graph, spec.describe(),
             workspace_mb)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{graph}: TensorRT could not build the engine ({spec.describe()}); "
                          f"the `tensorrt` log lines above say why")
    if timing_cache is not None and cache is not None:
        try:
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
        except OSError as e:
            log.warning("could not write the timing cache %s: %s", timing_cache, e)
    return bytes(serialized)
