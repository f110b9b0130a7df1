"""Model kind ``arcd``: reconstruction + discrimination in one graph, class probabilities out.

The graph takes normalised tiles and returns ``probs`` (N x K x th x tw, softmax over the
bundle's classes, class 0 background) and ``reconstruction``. The adapter stitches the tiles'
probabilities back into frame coordinates; the defect score of a pixel is 1 - p(background).
"""

from __future__ import annotations

import numpy as np

from inspector.bundle import BUNDLE_FILE, Bundle
from inspector.engines.base import Engine
from inspector.errors import BundleError
from inspector.models.base import BufferPool, ModelAdapter, ModelOutput, ShapeCache
from inspector.models.tiling import TileGrid


class ArcdAdapter(ModelAdapter):
    kind = "arcd"
    outputs = frozenset({"probs"})

    def __init__(self, bundle: Bundle, engine: Engine, max_batch: int = 0):
        super().__init__(bundle, engine, max_batch)
        self.probs_name = self.output_name("probabilities", "the graph output holding class probabilities")
        self.num_classes = len(bundle.spec.classes)
        self._pools: ShapeCache = ShapeCache()

    def decode(self, raw: dict[str, list[np.ndarray]], g: TileGrid, image: np.ndarray) -> ModelOutput:
        chunks = raw[self.probs_name]
        k = chunks[0].shape[1]
        if k != self.num_classes:
            raise BundleError(f"{self.bundle.path / BUNDLE_FILE}: classes: {self.num_classes} "
                              f"named but the graph outputs {k} probability channels")
        h, w = image.shape[:2]
        pool = self._pools.get((h, w))
        if pool is None:
            pool = BufferPool(((k, g.height, g.width), (g.height, g.width)))
            self._pools[(h, w)] = pool
        bufs = pool.acquire()
        probs, score = bufs
        self.stitch(chunks, g, probs)
        np.subtract(1.0, probs[0], out=score)
        if (g.height, g.width) != (h, w):
            probs, score = probs[:, :h, :w], score[:h, :w]
        return ModelOutput(score_map=score, probs=probs, release=lambda: pool.give_back(bufs))
