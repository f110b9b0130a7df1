"""Small real ONNX graphs for tests that must not depend on a trained model.

``dark_spot_bundle`` writes a bundle whose graph flags pixels much darker than their 9x9
neighbourhood as class 1 — a real graph that onnxruntime runs, with known behaviour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def dark_spot_bundle(root: Path, tile: int = 64, classes=("background", "dark")) -> Path:
    import onnx
    from onnx import TensorProto, helper

    from inspector.bundle import BundleSpec, GraphRef, InputSpec, write_bundle
    from inspector.postprocess import PostprocessConfig

    k = len(classes)
    # logits: background 0, class 1 = 40*(local_mean - x) - 4, other classes far below
    w = np.zeros((k, 1, 1, 1), np.float32)
    b = np.full((k,), -50.0, np.float32)
    w[0, 0, 0, 0], b[0] = 0.0, 0.0
    w[1, 0, 0, 0], b[1] = 40.0, -4.0
    nodes = [
        helper.make_node("AveragePool", ["image"], ["mean"], kernel_shape=[9, 9], pads=[4, 4, 4, 4],
                         count_include_pad=0),
        helper.make_node("Sub", ["mean", "image"], ["contrast"]),
        helper.make_node("Conv", ["contrast", "W", "B"], ["logits"], kernel_shape=[1, 1]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("Identity", ["image"], ["reconstruction"]),
    ]
    graph = helper.make_graph(
        nodes, "dark_spot",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, tile, tile])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", k, tile, tile]),
         helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, ["N", 1, tile, tile])],
        [helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.ravel()),
         helper.make_tensor("B", TensorProto.FLOAT, b.shape, b)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / "model.onnx"))
    spec = BundleSpec(name=root.name, kind="arcd", graphs={"model": GraphRef(file="model.onnx", sha256="")},
                      input=InputSpec(name="image", tile=(tile, tile), channels=1, mean=[0.0], std=[1.0]),
                      outputs={"probabilities": "probs", "reconstruction": "reconstruction"},
                      classes=list(classes), postprocess=PostprocessConfig(type="probability", threshold=0.5),
                      provenance={"note": "hand-built test graph"})
    write_bundle(root, spec)
    return root


def fuzzymask_toy_bundle(root: Path, tile: int = 64, cell: int = 8, kernel: int = 9, blend: float = 0.5,
                         channels: int = 1, overlap: int = 16, **kind_params) -> Path:
    """A fuzzymask-kind bundle whose "reconstruction" is a real ONNX graph with known behaviour:
    ``R = (1 - blend) * x + blend * close(x)``, ``close`` the grey closing (max-pool dilation, then
    min-pool erosion) with a ``kernel`` x ``kernel`` square.

    The closing fills dark spots smaller than the kernel and, with ``kernel > cell``, a zeroed
    k x k cell; it leaves smooth texture almost unchanged. The blend makes it a partial repair, so
    iterating the model on its own output converges geometrically (a few iterations, like a
    trained inpainter) instead of at once. ``kind_params`` override the bundle's (tau defaults
    to 0.05, above the D(R1, x) of the test textures, below that of a pasted dark spot).
    """
    import onnx
    from onnx import TensorProto, helper

    from inspector.bundle import BundleSpec, GraphRef, InputSpec, TilingSpec, write_bundle
    from inspector.postprocess import PostprocessConfig

    pad = kernel // 2
    pool = dict(kernel_shape=[kernel, kernel], pads=[pad] * 4, strides=[1, 1])
    nodes = [
        helper.make_node("MaxPool", ["image"], ["dilated"], **pool),
        helper.make_node("Neg", ["dilated"], ["neg"]),
        helper.make_node("MaxPool", ["neg"], ["neg_closed"], **pool),
        helper.make_node("Neg", ["neg_closed"], ["closed"]),
        helper.make_node("Sub", ["closed", "image"], ["lift"]),
        helper.make_node("Mul", ["lift", "blend"], ["step"]),
        helper.make_node("Add", ["image", "step"], ["reconstruction"]),
    ]
    shape = ["N", channels, tile, tile]
    graph = helper.make_graph(
        nodes, "blended_closing",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, shape)],
        [helper.make_tensor("blend", TensorProto.FLOAT, [], [blend])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / "model.onnx"))
    kp = {"cell": cell, "tau": 0.05, **kind_params}
    spec = BundleSpec(name=root.name, kind="fuzzymask",
                      graphs={"model": GraphRef(file="model.onnx", sha256="")},
                      input=InputSpec(name="image", tile=(tile, tile), channels=channels,
                                      mean=[0.0] * channels, std=[1.0] * channels),
                      outputs={"reconstruction": "reconstruction"}, classes=["background", "defect"],
                      tiling=TilingSpec(overlap=overlap),
                      postprocess=PostprocessConfig(type="score_threshold", score_threshold=0.05),
                      kind_params=kp, provenance={"note": "hand-built test graph"})
    write_bundle(root, spec)
    return root


def region_bundle(root: Path, tile: int = 64, classes=("background", "dark"), threshold: float = 0.5,
                  name: str = "machine region", region_channels: int = 1) -> Path:
    """An arcd bundle with the machine-region head: ``dark_spot_bundle``'s graph plus a third
    output ``region`` (N x 1 x t x t) = Sigmoid(40 * (x - 0.5)), x = pixel/255: a steep step at
    mid-grey, so bright pixels are region (p > 0.99 from grey 158 up, < 0.01 up to grey 97).

    ``region_channels`` > 1 repeats that map over more channels (a malformed graph for tests of
    the adapter's refusal)."""
    import onnx
    from onnx import TensorProto, helper

    from inspector.bundle import RegionSpec, load_bundle, write_bundle

    dark_spot_bundle(root, tile=tile, classes=classes)
    model = onnx.load(str(root / "model.onnx"))
    g = model.graph
    g.initializer.extend([helper.make_tensor("region_gain", TensorProto.FLOAT, [], [40.0]),
                          helper.make_tensor("region_mid", TensorProto.FLOAT, [], [0.5])])
    region_out = "region" if region_channels == 1 else "region_one"
    g.node.extend([
        helper.make_node("Sub", ["image", "region_mid"], ["region_centred"]),
        helper.make_node("Mul", ["region_centred", "region_gain"], ["region_logit"]),
        helper.make_node("Sigmoid", ["region_logit"], [region_out]),
    ])
    if region_channels != 1:
        g.node.append(helper.make_node("Concat", [region_out] * region_channels, ["region"], axis=1))
    g.output.append(helper.make_tensor_value_info("region", TensorProto.FLOAT,
                                                  ["N", region_channels, tile, tile]))
    onnx.checker.check_model(model)
    onnx.save(model, str(root / "model.onnx"))
    spec = load_bundle(root, verify=False).spec
    spec = spec.model_copy(update={"outputs": {**spec.outputs, "region": "region"},
                                   "region": RegionSpec(name=name, threshold=threshold)})
    write_bundle(root, spec)
    return root


def square_pad_bundle(root: Path, tile: int = 64, align: str = "top", region: bool = False,
                      classes=("background", "dark")) -> Path:
    """``dark_spot_bundle`` (``region_bundle`` with ``region``) whose ``input`` says
    ``fit: square_pad`` with ``pad_align: align``: frames are zero-padded to a square and resized
    to the tile instead of tiled (the ARCD thesis's squaring, spec §2.2)."""
    from inspector.bundle import load_bundle, write_bundle

    if region:
        region_bundle(root, tile=tile, classes=classes)
    else:
        dark_spot_bundle(root, tile=tile, classes=classes)
    spec = load_bundle(root, verify=False).spec
    inp = spec.input.model_copy(update={"fit": "square_pad", "pad_align": align})
    write_bundle(root, spec.model_copy(update={"input": inp}))
    return root
