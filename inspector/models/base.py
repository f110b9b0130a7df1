"""Model adapters: what a model kind does around the engine call.

An adapter turns a frame into the engine's input (channel conversion, normalisation, tiling into
a preallocated batch — or, for an arcd bundle with ``input.fit: square_pad``, zero-padding the
whole frame to a square resized to the model input, one batch item), runs the engine, and returns
maps in frame coordinates:

* ``probs`` (KxHxW softmax probabilities, class 0 = background) for classifier-style kinds;
* ``residual`` (HxW or HxWxC) for reconstruction kinds;
* ``score_map`` (HxW float32), the per-pixel defect score published and used for defect scores.
"""

from __future__ import annotations

import abc
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from inspector.bundle import BUNDLE_FILE, Bundle
from inspector.engines.base import Engine
from inspector.errors import BundleError
from inspector.flatfield import FlatField
from inspector.models.tiling import FrameFit, SquareFit, TileGrid


@dataclass
class ModelOutput:
    score_map: np.ndarray
    probs: np.ndarray | None = None
    residual: np.ndarray | None = None
    #: HxW float32 probability of the bundle's second sub-task region (ARCD's machine-region
    #: head, ``outputs.region``); None for bundles without one
    region: np.ndarray | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: per-frame figures of the model kind that are not milliseconds (fuzzymask: engine rounds,
    #: converged tiles); not published, but passed to local report consumers and the evaluation
    stats: dict[str, float] = field(default_factory=dict)
    #: hands the output buffers back to the adapter's pool once the frame is published
    release: Callable[[], None] | None = None


class ShapeCache(OrderedDict):
    """Buffers per frame shape, keeping the ``limit`` most recently used shapes.

    A camera delivers one shape, so on the line nothing is ever evicted; offline evaluation and
    calibration over data sets whose images all differ in size (magnetic tile: 845 sizes in 898
    images) would otherwise keep every shape's buffers, megabytes each, until the run ends.
    """

    def __init__(self, limit: int = 4):
        super().__init__()
        self.limit = limit

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class BufferPool:
    """Reusable output buffers of one set of shapes.

    The pipeline holds a few frames in flight; each takes a buffer set here and gives it back
    after publishing, so steady state allocates nothing. Thread-safe through deque's atomic ops.
    """

    def __init__(self, shapes: tuple[tuple[int, ...], ...], dtype=np.float32):
        self.shapes = shapes
        self.dtype = dtype
        self._free: deque[tuple[np.ndarray, ...]] = deque()
        self.allocated = 0

    def acquire(self) -> tuple[np.ndarray, ...]:
        try:
            return self._free.pop()
        except IndexError:
            self.allocated += 1
            return tuple(np.empty(s, self.dtype) for s in self.shapes)

    def give_back(self, bufs: tuple[np.ndarray, ...]) -> None:
        self._free.append(bufs)



def model_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HxW or HxWxC uint8 -> HxWxC' with C' = ``channels`` (RGB order); a grey frame on an RGB
    model stays one channel (broadcast when normalised), extra channels are dropped. The
    trainer's square-pad validation calls it too, so both see the same pixels."""
    if image.ndim == 2:
        return image[:, :, None]
    if image.shape[2] == channels:
        return image
    if channels == 1:
        # ITU-R BT.601 luma, the weights the rest of the product uses, rounded: truncating
        # the float sum turned a grey level x of a grey-content RGB frame (NEU's JPEGs) into
        # x - 1 for 65 of the 256 levels, which training (float luma) never saw
        grey = cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_RGB2GRAY)
        return grey[:, :, None]
    return image[:, :, :3]


class ModelAdapter(abc.ABC):
    """Base of every model kind. Subclasses implement :meth:`decode`.

    ``max_batch`` caps how many tiles go to the engine in one call (0 = all tiles of a frame).
    """

    kind: str = ""
    #: the maps besides the score map that :meth:`infer` fills ("probs", "residual"): which
    #: post-processing recipes can run on this kind
    outputs: frozenset[str] = frozenset()
    #: whether the kind's decode maps a ``fit: square_pad`` output back (it must stitch only
    #: through :meth:`stitch`); the others cut tiles of their own (fuzzymask's cells) and are
    #: trained on native-resolution tiles
    square_pad_ok: bool = False

    def __init__(self, bundle: Bundle, engine: Engine, max_batch: int = 0):
        self.bundle = bundle
        self.engine = engine
        spec = bundle.spec
        self.input_name = spec.input.name
        self.tile_h, self.tile_w = spec.input.tile
        self.channels = spec.input.channels
        self.overlap = spec.tiling.overlap
        self.fit = spec.input.fit
        self.pad_align = spec.input.pad_align
        self._check_fit()
        fixed = spec.input.batch
        self.batch = fixed if fixed > 0 else max_batch
        self.fixed_batch = fixed > 0
        # pixel/255 then (x - mean)/std folded into one multiply-add per pixel
        mean = np.asarray(spec.input.mean, np.float32)
        std = np.asarray(spec.input.std, np.float32)
        mean = np.broadcast_to(mean, (self.channels,)).copy()
        std = np.broadcast_to(std, (self.channels,)).copy()
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._offset = (-mean / std).astype(np.float32)
        names = [t.name for t in engine.inputs]
        if self.input_name not in names:
            raise BundleError(f"{bundle.path / BUNDLE_FILE}: input.name: the graph has no input "
                              f"'{self.input_name}' (it has {names})")
        self._check_input_shape(next(t for t in engine.inputs if t.name == self.input_name))
        self._grids: ShapeCache = ShapeCache()          # (h, w) -> TileGrid | SquareFit
        self._batches: ShapeCache = ShapeCache()        # (h, w) -> input batch
        #: fit square_pad: (h, w, c) -> (zero-padded square canvas, its resized th x tw x c copy)
        self._squares: ShapeCache = ShapeCache()
        #: fit square_pad: side -> side x side float32 scratch an output plane is resized into
        #: before its frame part is copied out (decode is one frame at a time, so one is enough)
        self._unfit: ShapeCache = ShapeCache()
        #: per batch size, the outputs of an overlapped run (engines with ``async_depth`` > 1)
        self._overlap_out: ShapeCache = ShapeCache()
        #: optional flat-field correction (config ``preprocess.flat_field``, set by load_model);
        #: applied to the frame before everything else, so decode() sees the corrected frame too
        self.flat_field: FlatField | None = None

    def _check_fit(self) -> None:
        """The bundle's own validation refuses these too; a spec changed with ``model_copy``
        (which skips validation) must not reach a kind whose decode would tile it."""
        if self.fit != "square_pad":
            return
        meta = self.bundle.path / BUNDLE_FILE
        if not self.square_pad_ok:
            raise BundleError(f"{meta}: input.fit: square_pad is only for kind arcd (this bundle "
                              f"is kind {self.kind}, which tiles frames: fit: tile)")
        if self.tile_h != self.tile_w:
            raise BundleError(f"{meta}: input.fit: square_pad resizes the padded square frame to "
                              f"input.tile, which must be square (got [{self.tile_h}, {self.tile_w}])")

    def _check_input_shape(self, graph_input) -> None:
        """A bundle whose ``input`` section disagrees with the graph's fixed input dimensions
        would fail on the first frame with the engine's own message, naming neither the bundle
        nor the key, and as an engine error (exit 1: systemd restarts it for ever). Fail at load
        with the key instead; dynamic (symbolic) dimensions accept anything."""
        shape = graph_input.shape
        if len(shape) != 4:
            return
        meta = self.bundle.path / BUNDLE_FILE
        graph = self.bundle.path / self.bundle.spec.graphs["model"].file
        n, c, h, w = (d if isinstance(d, int) and d > 0 else None for d in shape)
        if c is not None and c != self.channels:
            raise BundleError(f"{meta}: input.channels: {self.channels}, but {graph.name} takes "
                              f"{c} channel(s)")
        if (h is not None and h != self.tile_h) or (w is not None and w != self.tile_w):
            raise BundleError(f"{meta}: input.tile: [{self.tile_h}, {self.tile_w}], but {graph.name} "
                              f"takes {h or '?'}x{w or '?'} (HxW) tiles")
        if n is not None and n != self.batch:
            raise BundleError(f"{meta}: input.batch: {self.bundle.spec.input.batch}, but {graph.name} "
                              f"takes a fixed batch of {n}; set input.batch: {n}")

    def output_name(self, key: str, what: str) -> str:
        """The graph output the bundle names under ``outputs.<key>``, checked against the graph."""
        meta = self.bundle.path / BUNDLE_FILE
        outs = self.bundle.spec.outputs
        if key not in outs:
            raise BundleError(f"{meta}: outputs.{key}: required for kind {self.kind} ({what})")
        names = [t.name for t in self.engine.outputs]
        if outs[key] not in names:
            raise BundleError(f"{meta}: outputs.{key}: the graph has no output '{outs[key]}' "
                              f"(it has {names})")
        return outs[key]

    # -- input side ---------------------------------------------------------------------------
    def grid(self, h: int, w: int) -> FrameFit:
        """How an HxW frame meets the model input: its tile grid, or (``fit: square_pad``) where
        it lies in the padded square; ``.count`` is the batch items it takes either way."""
        g = self._grids.get((h, w))
        if g is None:
            if self.fit == "square_pad":
                g = SquareFit.build(h, w, self.tile_h, self.tile_w, self.pad_align)
            else:
                g = TileGrid.build(max(h, self.tile_h), max(w, self.tile_w), self.tile_h,
                                   self.tile_w, self.overlap)
            self._grids[(h, w)] = g
        return g

    def to_model_channels(self, image: np.ndarray) -> np.ndarray:
        """HxW or HxWxC uint8 -> HxWxC' with C' the model's channel count (RGB order)."""
        return model_channels(image, self.channels)

    def square_input(self, image: np.ndarray) -> tuple[np.ndarray, SquareFit]:
        """``fit: square_pad``: the frame in the model's channels, zero-padded to a square and
        resized (bilinear) to the tile — th x tw x C uint8 (C = 1 for a grey frame on an RGB
        model; it is broadcast when normalised), in a buffer reused for every frame of the shape."""
        h, w = image.shape[:2]
        g = self.grid(h, w)
        if not isinstance(g, SquareFit):
            raise TypeError(f"square_input is for input.fit: square_pad bundles (this one: {self.fit})")
        img = self.to_model_channels(image)
        key = (h, w, img.shape[2])
        bufs = self._squares.get(key)
        if bufs is None:
            # zeros once: pad_resize writes only the frame's part, so the padding stays zero
            bufs = (np.zeros((g.side, g.side, img.shape[2]), np.uint8),
                    np.empty((self.tile_h, self.tile_w, img.shape[2]), np.uint8))
            self._squares[key] = bufs
        return g.pad_resize(img, *bufs), g

    def fill_batch(self, image: np.ndarray) -> tuple[np.ndarray, FrameFit]:
        """Normalise the frame's tiles (or its padded square) into the (preallocated, per frame
        shape) input batch."""
        if self.fit == "square_pad":
            return self._fill_square(image)
        h, w = image.shape[:2]
        g = self.grid(h, w)
        img = self.to_model_channels(image)
        if h < g.height or w < g.width:
            # frames smaller than one tile are padded by reflection, outputs cropped back
            pad = ((0, g.height - h), (0, g.width - w), (0, 0))
            img = np.pad(img, pad, mode="reflect")
        batch = self._batches.get((h, w))
        n = g.count
        if self.fixed_batch:
            n = -(-n // self.batch) * self.batch
        if batch is None:
            batch = np.zeros((n, self.channels, self.tile_h, self.tile_w), np.float32)
            self._batches[(h, w)] = batch
        for i, y, x, _, _ in g.tiles():
            tile = img[y:y + self.tile_h, x:x + self.tile_w]
            self._normalise(tile, batch[i])
        return batch, g

    def _normalise(self, tile: np.ndarray, dst: np.ndarray) -> None:
        """th x tw x C' uint8 (C' 1 on an RGB model: broadcast) -> C x th x tw float32 ``dst``."""
        if tile.shape[2] == 1 and self.channels == 3:
            tile = np.broadcast_to(tile, tile.shape[:2] + (3,))
        for c in range(self.channels):
            np.multiply(tile[:, :, c], self._scale[c], out=dst[c], casting="unsafe")
            dst[c] += self._offset[c]

    def _fill_square(self, image: np.ndarray) -> tuple[np.ndarray, SquareFit]:
        # Per frame this allocates nothing of frame size: the canvas, the resized square, the
        # batch and (in stitch) the square scratch are per-shape buffers, and cv2.resize writes
        # into a dst of the right shape. The one exception is tile mode's too: an RGB frame on a
        # grey model is converted by cv2.cvtColor into a new H x W array (to_model_channels).
        h, w = image.shape[:2]
        resized, g = self.square_input(image)
        batch = self._batches.get((h, w))
        if batch is None:
            # a fixed-batch graph gets its one frame plus zero items; they are never read back
            n = self.batch if self.fixed_batch else 1
            batch = np.zeros((n, self.channels, self.tile_h, self.tile_w), np.float32)
            self._batches[(h, w)] = batch
        self._normalise(resized, batch[0])
        return batch, g

    def run_engine(self, batch: np.ndarray) -> dict[str, list[np.ndarray]]:
        """Run the batch in chunks of ``self.batch`` tiles (all at once when 0)."""
        step = self.batch if self.batch > 0 else len(batch)
        if getattr(self.engine, "async_depth", 0) > 1 and len(batch) > step:
            return self._run_engine_overlapped(batch, step)
        results: dict[str, list[np.ndarray]] = {}
        for s in range(0, len(batch), step):
            out = self.engine.run({self.input_name: batch[s:s + step]})
            for k, v in out.items():
                results.setdefault(k, []).append(v)
        return results

    def _run_engine_overlapped(self, batch: np.ndarray, step: int) -> dict[str, list[np.ndarray]]:
        """Chunks through ``run_async``/``collect``: chunk n+1 uploads while chunk n runs.

        The engine's outputs are views into its own buffers, reused ``async_depth`` submits later,
        so each chunk is copied into one array per output (allocated once per batch size) as it
        is collected. The result is valid until the next call, i.e. ``decode`` must consume it.
        """
        n = len(batch)
        outs = self._overlap_out.get(n)
        pending: deque[tuple[int, int]] = deque()

        def take(start: int, ticket: int) -> None:
            nonlocal outs
            res = self.engine.collect(ticket)
            if outs is None:
                outs = {k: np.empty((n,) + v.shape[1:], v.dtype) for k, v in res.items()}
                self._overlap_out[n] = outs
            for k, v in res.items():
                outs[k][start:start + len(v)] = v

        for s in range(0, n, step):
            if len(pending) >= self.engine.async_depth:
                take(*pending.popleft())
            pending.append((s, self.engine.run_async({self.input_name: batch[s:s + step]})))
        while pending:
            take(*pending.popleft())
        return {k: [v] for k, v in outs.items()}

    def stitch(self, chunks: list[np.ndarray], g: FrameFit, out: np.ndarray) -> np.ndarray:
        """Write the kept part of each tile's output (N x C x th x tw chunks) into ``out`` (C x H x W).

        For a :class:`SquareFit` (one item) each of the C planes is resized back to the padded
        square and its frame part copied into ``out``; beside ``out`` that uses one pooled
        square scratch, or none for a square frame, whose planes are resized straight into it."""
        if isinstance(g, SquareFit):
            item = chunks[0][0]
            if g.side == g.height == g.width and out.flags.c_contiguous:
                # cv2 writes into a contiguous dst of the right shape; a strided one it would
                # silently replace, so those go through the scratch below
                for c in range(out.shape[0]):
                    cv2.resize(item[c], (g.side, g.side), dst=out[c], interpolation=cv2.INTER_LINEAR)
                return out
            square = self._unfit.get(g.side)
            if square is None:
                square = np.empty((g.side, g.side), np.float32)
                self._unfit[g.side] = square
            for c in range(out.shape[0]):
                g.unfit(item[c], square, out[c])
            return out
        per = chunks[0].shape[0]
        for i, y, x, (ky0, ky1), (kx0, kx1) in g.tiles():
            t = chunks[i // per][i % per]
            out[:, ky0:ky1, kx0:kx1] = t[:, ky0 - y:ky1 - y, kx0 - x:kx1 - x]
        return out

    # -- the call -----------------------------------------------------------------------------
    def infer(self, image: np.ndarray) -> ModelOutput:
        t0 = time.perf_counter()
        if self.flat_field is not None:
            image = self.flat_field.apply(image)
        batch, g = self.fill_batch(image)
        t1 = time.perf_counter()
        raw = self.run_engine(batch)
        t2 = time.perf_counter()
        out = self.decode(raw, g, image)
        t3 = time.perf_counter()
        out.timings_ms.update(preprocess=(t1 - t0) * 1e3, engine=(t2 - t1) * 1e3,
                              decode=(t3 - t2) * 1e3)
        return out

    @abc.abstractmethod
    def decode(self, raw: dict[str, list[np.ndarray]], g: FrameFit, image: np.ndarray) -> ModelOutput:
        """Engine outputs (lists of batch chunks by output name) -> maps in frame coordinates."""

    def warmup(self, shape: tuple[int, ...]) -> float:
        """Run one blank frame of ``shape`` so the first real frame pays no first-run cost."""
        t0 = time.perf_counter()
        self.infer(np.full(shape, 128, np.uint8))
        return (time.perf_counter() - t0) * 1e3
