"""Model kind ``arcd``: reconstruction + discrimination in one graph, class probabilities out.

The graph takes normalised tiles and returns ``probs`` (N x K x th x tw, softmax over the
bundle's classes, class 0 background) and ``reconstruction``. The adapter stitches the tiles'
probabilities back into frame coordinates; the defect score of a pixel is 1 - p(background).

A bundle with the optional machine-region head (``outputs.region`` and the ``region`` key) has a
third output, N x 1 x th x tw p(region); it is stitched the same way into ``ModelOutput.region``.

With ``input.fit: square_pad`` (the thesis's squaring, spec §2.2) the whole frame is one batch
item, zero-padded to a square and resized to the tile; "stitching" is then resizing each output
plane back to the square and cropping the frame out of it (``ModelAdapter.stitch``), so the maps
here are in frame coordinates either way and the pooled buffers have the frame's shape.
"""

from __future__ import annotations

import numpy as np

from inspector.bundle import BUNDLE_FILE, Bundle
from inspector.engines.base import Engine
from inspector.errors import BundleError
from inspector.models.base import BufferPool, ModelAdapter, ModelOutput, ShapeCache
from inspector.models.tiling import FrameFit


class ArcdAdapter(ModelAdapter):
    kind = "arcd"
    outputs = frozenset({"probs"})
    # decode maps outputs back only through ModelAdapter.stitch, which handles the padded square
    square_pad_ok = True

    def __init__(self, bundle: Bundle, engine: Engine, max_batch: int = 0):
        super().__init__(bundle, engine, max_batch)
        self.probs_name = self.output_name("probabilities", "the graph output holding class probabilities")
        self.num_classes = len(bundle.spec.classes)
        #: the graph output holding p(region), None for bundles without a region head
        self.region_name: str | None = None
        if bundle.spec.region is not None:
            self.region_name = self.output_name("region", "the graph output holding the region probability")
            spec = next(t for t in engine.outputs if t.name == self.region_name)
            # a static channel dimension other than 1 is refused at load, not on the first frame
            if len(spec.shape) == 4 and isinstance(spec.shape[1], int) and spec.shape[1] > 1:
                raise self._region_shape_error(f"has {spec.shape[1]} channels")
        self._pools: ShapeCache = ShapeCache()

    def _region_shape_error(self, what: str) -> BundleError:
        graph = self.bundle.graph_path()
        return BundleError(f"{graph}: output '{self.region_name}' (outputs.region in "
                           f"{self.bundle.path / BUNDLE_FILE}) {what}; the region probability is "
                           f"N x 1 x H x W")

    def decode(self, raw: dict[str, list[np.ndarray]], g: FrameFit, image: np.ndarray) -> ModelOutput:
        chunks = raw[self.probs_name]
        k = chunks[0].shape[1]
        if k != self.num_classes:
            raise BundleError(f"{self.bundle.path / BUNDLE_FILE}: classes: {self.num_classes} "
                              f"named but the graph outputs {k} probability channels")
        region_chunks = None
        if self.region_name is not None:
            region_chunks = raw[self.region_name]
            r0 = region_chunks[0]
            if r0.ndim != 4:
                raise self._region_shape_error(f"has shape {list(r0.shape)}")
            if r0.shape[1] != 1:
                raise self._region_shape_error(f"has {r0.shape[1]} channels")
        h, w = image.shape[:2]
        pool = self._pools.get((h, w))
        if pool is None:
            shapes: tuple[tuple[int, ...], ...] = ((k, g.height, g.width), (g.height, g.width))
            if region_chunks is not None:
                shapes += ((g.height, g.width),)
            pool = BufferPool(shapes)
            self._pools[(h, w)] = pool
        bufs = pool.acquire()
        probs, score = bufs[0], bufs[1]
        self.stitch(chunks, g, probs)
        np.subtract(1.0, probs[0], out=score)
        region = None
        if region_chunks is not None:
            # stitched through a 1 x H x W view, so the map handed out is the pooled buffer itself
            self.stitch(region_chunks, g, bufs[2][None])
            region = bufs[2]
        # a tile grid grows to one tile for smaller frames; a SquareFit is the frame's own shape
        if (g.height, g.width) != (h, w):
            probs, score = probs[:, :h, :w], score[:h, :w]
            if region is not None:
                region = region[:h, :w]
        return ModelOutput(score_map=score, probs=probs, region=region,
                           release=lambda: pool.give_back(bufs))
