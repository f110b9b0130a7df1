"""An ARCD bundle's network in torch, behind the runtime's engine interface.

For offline work only (needs torch and the bundle's training run): ``inspector evaluate --engine
torch`` scores a bundle on a training GPU, where ONNX Runtime has no GPU build or a thesis-width
graph (97 M parameters) would take minutes per data set on the CPU; ``benchmarks/engines.py``
times torch eager beside the other backends.

The network is rebuilt from the bundle's provenance (``training_config``) and loaded from the
run's checkpoint (``provenance.run_dir``, or ``checkpoint=``). ``check_against_graph`` runs one
random tile through both this engine and the bundle's ONNX graph on ONNX Runtime's CPU provider
and refuses a checkpoint whose outputs differ: a run folder retrained after the export would
otherwise be scored under the bundle's name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from inspector.engines.base import Engine, TensorSpec
from inspector.errors import EngineError, first_line

log = logging.getLogger(__name__)

__all__ = ["TorchArcdEngine"]


class TorchArcdEngine(Engine):
    """``bundle``'s R + D in torch eager (CUDA when torch sees a GPU, unless ``device`` says).

    ``allow_random``: without a checkpoint, run random weights (latency only) instead of failing.
    ``tf32``: leave torch's TF32 convolutions on (faster on a GPU, ~1e-3 off the fp32 graph); off,
    the engine computes in strict fp32 like the runtime's engines. The switch is process-wide.
    """

    async_depth = 0

    def __init__(self, bundle: Any, device: str | None = None, checkpoint: str | Path | None = None,
                 allow_random: bool = False, check_against_graph: bool = False,
                 check_tol: float = 1e-3, tf32: bool = False):
        import torch

        from export.arcd.torch_model import ARCDInference
        from export.arcd.train import CHECKPOINT, TrainConfig, build_models, load_checkpoint

        where = bundle.path
        if bundle.spec.kind != "arcd":
            raise EngineError(f"{where}: kind '{bundle.spec.kind}' has no torch network here (arcd only)")
        tc_raw = bundle.spec.provenance.get("training_config")
        if not isinstance(tc_raw, dict):
            raise EngineError(f"{where}: provenance has no training_config, so the architecture "
                              "is unknown")
        tc = TrainConfig.model_validate(tc_raw)
        r, d = build_models(tc.model)
        if checkpoint is None:
            run_dir = bundle.spec.provenance.get("run_dir")
            checkpoint = Path(run_dir) / CHECKPOINT if run_dir else None
        if checkpoint is not None and Path(checkpoint).is_file():
            try:
                ck = load_checkpoint(Path(checkpoint))
                r.load_state_dict(ck["reconstruction"])
                d.load_state_dict(ck["discrimination"])
            except (RuntimeError, KeyError, ValueError, OSError) as e:
                raise EngineError(f"{checkpoint}: not a checkpoint of {where}'s networks "
                                  f"({first_line(e)})") from None
            self.weights = f"checkpoint {checkpoint}"
        elif allow_random:
            self.weights = "random (timing only)"
        elif checkpoint is not None and Path(checkpoint).is_dir():
            raise EngineError(f"{where}: training checkpoint {checkpoint} is a folder, expected the "
                              f"{CHECKPOINT} file in a run folder (inspector evaluate --checkpoint)")
        else:
            raise EngineError(f"{where}: training checkpoint {checkpoint or '(provenance names no run_dir)'} "
                              "not found; pass checkpoint= (inspector evaluate --checkpoint)")
        self.torch = torch
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise EngineError(f"torch device {device!r}: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"torch device {device!r}: this torch {torch.__version__} sees no CUDA GPU")
        if self.device.type == "cuda" and not tf32:
            # torch runs cuDNN convolutions in TF32 by default: probabilities then move by ~1e-3
            # against the fp32 graph (seen on an H200), as ONNX Runtime's CUDA default did (#8)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model = ARCDInference(r, d, region_head=tc.model.region_head).eval().to(self.device)
        spec = bundle.spec.input
        self.input_name = spec.name
        self.tile = tuple(spec.tile)
        self.channels = spec.channels
        self.inputs = [TensorSpec(spec.name, (None, spec.channels, *spec.tile), "float32")]
        self.outputs = [TensorSpec("reconstruction", (None,), "float32"),
                        TensorSpec(bundle.spec.outputs["probabilities"], (None,), "float32")]
        if tc.model.region_head:
            self.outputs.append(TensorSpec(bundle.spec.outputs.get("region", "region"), (None,),
                                           "float32"))
        precision = "tf32" if self.device.type == "cuda" and tf32 else "fp32"
        self.backend = f"torch-eager:{self.device.type}:{precision} {torch.__version__} ({self.weights})"
        if check_against_graph:
            self.parity = self._check(bundle.graph_path("model"), check_tol)

    def _check(self, graph: Path, tol: float) -> float:
        from inspector.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine

        x = np.random.default_rng(0).random((1, self.channels, *self.tile), dtype=np.float32)
        ref = OnnxRuntimeEngine(graph, OnnxRuntimeConfig(providers=["cpu"]))
        try:
            want = ref.run({self.input_name: x})
        finally:
            ref.close()
        got = self.run({self.input_name: x})
        name = self.outputs[1].name
        diff = float(np.max(np.abs(want[name] - got[name])))
        if not diff <= tol:  # NaN fails too
            raise EngineError(f"{graph}: the torch network from {self.weights} differs from the graph "
                              f"by {diff:.2e} (> {tol:g}) on a random tile; was the run retrained "
                              "after the export?")
        log.info("torch engine matches %s: max |diff| %.2e on a random tile", graph, diff)
        return diff

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(feeds[self.input_name], dtype=np.float32))
            outs = self.model(x.to(self.device))
            return {spec.name: t.float().cpu().numpy() for spec, t in zip(self.outputs, outs)}

    def close(self) -> None:
        self.model = None
