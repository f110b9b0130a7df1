"""ONNX Runtime engine: CPU everywhere, CUDA or TensorRT execution providers where present."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from inspector.engines.base import Engine, TensorSpec, config_where
from inspector.errors import BundleError, EngineError

log = logging.getLogger(__name__)

# onnxruntime (1.32 here) starts its telemetry when imported, and under a user without a writable
# home (the unit's `inspector` user) warns on every start, in raw ANSI colour codes, that it
# cannot persist a device ID: a line in the journal no log level here can stop, as it comes
# before any session or logger setting. A line PC has no use for the upload either; the switch
# is read at import, and every runtime import of onnxruntime comes after this module's (the
# engines package imports it). An operator's own ORT_DISABLE_TELEMETRY is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}


#: onnxruntime's exceptions for a graph it cannot parse or does not implement, whatever provider
_GRAPH_ERRORS = ("InvalidProtobuf", "InvalidGraph", "NoModel", "NotImplemented")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ")
_LOAD_PREFIX = re.compile(r"^Load model from .*? failed:")
#: the C++ source place and signature onnxruntime puts before some messages
_CXX_WHERE = re.compile(r"^/\S+:\d+ [^()]*\((?:[^()]|\([^()]*\))*\)(?: const)? ")
#: a load step cut short by the machine, not by the graph: memory (``std::bad_alloc``, onnxruntime's
#: allocator), or the file system (``system error number <errno>`` is how onnxruntime reports a
#: failed read of the file: ENOMEM, EIO, ...). The bytes are the right ones (their sha256 is
#: checked before), so a restart may well load them: exit 1, not a bad graph
_SYSTEM_ERRORS = re.compile(
    r"bad_alloc|out of memory|cannot allocate memory|failed to allocate|system error number \d+"
    r"|input/output error|\bENOMEM\b|\bEIO\b|too many open files|resource temporarily unavailable",
    re.IGNORECASE)
_ERRNO = re.compile(r"system error number (\d+)")


def _load_failure(e: Exception) -> tuple[bool, str]:
    """Whether an ``InferenceSession`` error means a bad graph, and its text in one line.

    A bad graph is one onnxruntime cannot parse (INVALID_PROTOBUF), that is not a valid model
    (INVALID_GRAPH), whose opset, IR version or operators this onnxruntime does not implement:
    the errors of its model load step (``Load model from <graph> failed:``) and NOT_IMPLEMENTED
    (no kernel, CPU included). Anything else is not: a provider or device that fails, and a load
    step that ran out of memory or hit a system error reading the file (``_SYSTEM_ERRORS``), even
    under onnxruntime's ``Load model from <graph> failed:``.
    """
    text = " ".join(str(e).split())
    m = _ORT_PREFIX.match(text)
    code = m.group(1) if m else type(e).__name__
    text = text[m.end():] if m else text
    loading = _LOAD_PREFIX.match(text)
    if loading:
        text = text[loading.end():].strip()
    text = _CXX_WHERE.sub("", text) or code
    errno_m = _ERRNO.search(text)
    if errno_m and int(errno_m.group(1)) in (1, 13):
        # EPERM, EACCES: the install's fault, like an unreadable config (exit 2): a restart
        # would find the same permissions
        text = _ERRNO.sub(lambda n: f"{n.group(0)} ({os.strerror(int(n.group(1)))})", text)
        return True, (f"{code}: {text}; the service runs as its own user: make the graph "
                      "readable to it")
    if _SYSTEM_ERRORS.search(text):
        text = _ERRNO.sub(lambda n: f"{n.group(0)} ({os.strerror(int(n.group(1)))})", text)
        return False, f"{code}: {text}; a memory or system error, not a bad graph"
    bad = bool(loading) or type(e).__name__ in _GRAPH_ERRORS
    return bad, f"{code}: {text}"


class OnnxRuntimeConfig(BaseModel):
    """``model.engine`` for ``type: onnxruntime``.

    ``providers`` are tried in order; those this onnxruntime build lacks are skipped with a
    warning. A list that names ``cpu`` falls back to it, so such a GPU config still runs
    (slowly) on a PC without a GPU; a list of GPU providers only fails when none of them can
    run (exit 1), rather than run 10-20x slower unnoticed. What actually ran is logged and shown
    by ``inspector check``, with a warning line for each provider skipped.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["onnxruntime"] = "onnxruntime"
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = Field(default_factory=lambda: ["cpu"], min_length=1)
    device_id: int = Field(0, ge=0)
    intra_op_threads: int = Field(0, ge=0, description="0 = onnxruntime's choice (all cores)")
    inter_op_threads: int = Field(1, ge=0)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    allow_spinning: bool = Field(False, description="let idle intra-op threads spin-wait; lowers "
                                 "engine latency on a PC with cores to spare, but on a small PC "
                                 "the spinning threads starve the grab and publish stages")
    cuda_tf32: bool = Field(False, description="TF32 tensor-core math for fp32 convolutions and "
                            "matmuls on Ampere and later GPUs (onnxruntime's own default is on): "
                            "faster, but on an H100 it moved the shipped bundles' probabilities by "
                            "up to 1.3e-2 against the CPU; off keeps them within 1e-3")
    cuda_conv_algo_search: Literal["exhaustive", "heuristic", "default"] = Field(
        "exhaustive", description="how cuDNN picks convolution algorithms: exhaustive benchmarks "
        "them once per input shape (slow first frame, fastest after), heuristic asks cuDNN")
    trt_fp16: bool = False
    trt_engine_cache: str | None = Field(None, description="folder for TensorRT EP engine cache")
    trt_workspace_mb: int = Field(2048, ge=64)


#: provider options worth a line in the log: the ones that change numbers or speed
_NOTED_OPTIONS = {
    "CUDAExecutionProvider": ("device_id", "use_tf32", "cudnn_conv_algo_search"),
    "TensorrtExecutionProvider": ("device_id", "trt_fp16_enable", "trt_engine_cache_enable"),
}


def describe_provider_options(options: dict[str, dict[str, str]]) -> str:
    """'CUDA: device_id=0 use_tf32=0 ...' from ``InferenceSession.get_provider_options()``."""
    parts = []
    for name, keys in _NOTED_OPTIONS.items():
        opts = options.get(name)
        if opts:
            shown = " ".join(f"{k}={opts[k]}" for k in keys if k in opts)
            parts.append(f"{name.removesuffix('ExecutionProvider')}: {shown}")
    return "; ".join(parts)


class OnnxRuntimeEngine(Engine):
    """One onnxruntime InferenceSession over one graph."""

    def __init__(self, graph: str | Path, cfg: OnnxRuntimeConfig | None = None,
                 config_file: str | None = None):
        """``config_file``: the camera config ``cfg`` comes from, named in its errors."""
        import onnxruntime as ort

        cfg = cfg or OnnxRuntimeConfig()
        self.cfg = cfg
        self.config_file = config_file
        graph = Path(graph)
        if not graph.is_file():
            raise EngineError(f"{graph}: ONNX graph not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.intra_op_threads
        opts.inter_op_num_threads = cfg.inter_op_threads
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[cfg.graph_optimization]
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      "1" if cfg.allow_spinning else "0")
        providers = self._providers(ort.get_available_providers(), ort.__version__)
        try:
            self.session = ort.InferenceSession(str(graph), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt graphs
            bad_graph, detail = _load_failure(e)
            if bad_graph:  # bad input, exit 2: a restart loads the same bytes again
                raise BundleError(f"{graph}: onnxruntime {ort.__version__} cannot load this graph "
                                  f"({detail})") from None
            raise EngineError(f"{graph}: onnxruntime could not load the graph: {detail}") from e
        ran = self.session.get_providers()
        self.backend = "onnxruntime:" + ",".join(ran)
        wanted = [p if isinstance(p, str) else p[0] for p in providers]
        requested = [PROVIDER_NAMES[k] for k in cfg.providers]
        if "cpu" not in cfg.providers and not set(requested) & set(ran):
            # in the build but not started (CUDA libraries or driver missing): onnxruntime went
            # on with the CPU alone, which the list did not ask for
            raise EngineError(f"{config_where(config_file, 'model.engine.providers')}: onnxruntime "
                              f"could not start {', '.join(requested)} (it would run on "
                              f"{', '.join(ran)}; see its warning above); check the GPU driver and "
                              "CUDA libraries, or add cpu to the list to run on the CPU meanwhile")
        if ran[0] != wanted[0]:
            note = f"asked onnxruntime for {wanted[0]}, it runs on {ran[0]}"
            log.warning("%s", note)
            self.warnings = (*self.warnings, note)
        #: the options the GPU providers actually run with, as onnxruntime reports them
        self.provider_notes = describe_provider_options(self.session.get_provider_options())
        log.info("engine %s for %s%s", self.backend, graph.name,
                 f" ({self.provider_notes})" if self.provider_notes else "")
        self.inputs = [TensorSpec(i.name, tuple(i.shape), _ORT_TYPES.get(i.type, i.type))
                       for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), _ORT_TYPES.get(o.type, o.type))
                        for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def _providers(self, available: list[str], version: str = "") -> list:
        """The ``providers`` argument for the session; sets ``warnings`` for those skipped."""
        chosen: list = []
        skipped: list[str] = []
        for key in self.cfg.providers:
            name = PROVIDER_NAMES[key]
            if name not in available:
                log.warning("onnxruntime provider %s requested but not in this build (%s); skipped",
                            name, ", ".join(available))
                skipped.append(name)
                continue
            if key == "tensorrt":
                opts = {"device_id": self.cfg.device_id, "trt_fp16_enable": self.cfg.trt_fp16,
                        "trt_max_workspace_size": self.cfg.trt_workspace_mb << 20}
                if self.cfg.trt_engine_cache:
                    opts.update(trt_engine_cache_enable=True,
                                trt_engine_cache_path=self.cfg.trt_engine_cache)
                chosen.append((name, opts))
            elif key == "cuda":
                # onnxruntime turns TF32 on unless told: fp32 here means fp32 unless asked
                chosen.append((name, {"device_id": self.cfg.device_id,
                                      "use_tf32": int(self.cfg.cuda_tf32),
                                      "cudnn_conv_algo_search": self.cfg.cuda_conv_algo_search.upper()}))
            else:
                chosen.append(name)
        if not chosen and "cpu" not in self.cfg.providers:
            # a list of GPU providers only: running it on the CPU would be 10-20x slower with
            # `check` saying ok. Exit 1, as the README has it for a provider that fails (a
            # restart after the install is mended finds it)
            where = config_where(getattr(self, "config_file", None), "model.engine.providers")
            raise EngineError(
                f"{where}: none of the requested providers ({', '.join(skipped)}) is in this "
                f"onnxruntime{' ' + version if version else ''} build, which has "
                f"{', '.join(available)}; install onnxruntime-gpu in place of onnxruntime "
                "(EXTRAS=plc,ort-gpu deploy/install.sh), or add cpu to the list to run on the CPU")
        self.warnings = tuple(f"model.engine.providers: {name} requested but not in this onnxruntime "
                              f"build ({', '.join(available)}); skipped" for name in skipped)
        if not any((c if isinstance(c, str) else c[0]) == PROVIDER_NAMES["cpu"] for c in chosen):
            chosen.append(PROVIDER_NAMES["cpu"])
        return chosen

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(self._output_names, feeds)
        except Exception as e:
            raise EngineError(f"onnxruntime run failed: {e}") from e
        return dict(zip(self._output_names, outs))
