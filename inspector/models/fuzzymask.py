"""Model kind ``fuzzymask``: the fuzzy-mask inpainter with multi-branch dynamic inference.

Spec: ``../shared/seeds/001_spec.md`` §4 (the reference resolution of Algorithm 1, §4.4, with the
variant flags of §4.5 and §4.7). The graph is one network ``Model`` (tiles in [0, 1] in, the
reconstruction ``reconstruction`` in [0, 1] out, dynamic batch axis). Per tile::

    R0 = x;  R[i] = Model(R[i-1]) for i = 1..N, stop when mse(R[i-1], R[i]) <= m  (converged, n = i)
    Mask0 = D(R1, x);  I_m = 0 on every k x k cell holding a pixel of Mask0 > tau (else 1)
    Y = Model(I_m * x);  S_rep = D(x, Y)
    converged:  score = S_rep - D(R1, x) - D(R[n-1], R[n])
    otherwise:  score = S_rep

with ``D`` the per-pixel dissimilarity of §4.1 (:func:`dissimilarity_map`). The engine is driven
in batched rounds rather than one call per model application: round 1 runs ``Model(x)`` for every
tile of the frame; round 2 runs, in one batch, the next iteration ``Model(R1)`` of the tiles that
have not converged *and* the precise repair ``Model(I_m * x)`` of the tiles with suspicious cells
(``I_m`` is known as soon as ``R1`` is, so the repair need not wait for the loop); later rounds
iterate only the tiles still unconverged. A frame therefore costs at most ``max(N, 2)`` engine
rounds (the spec's "10 iterations plus 1 inpainting" per tile, batched) and usually far fewer;
with ``apply_line18`` (every tile scores ``S_rep``) the iterations decide nothing and are skipped,
so a frame costs round 1 plus at most one repair round.

Two exact shortcuts keep clean frames cheap: a tile with no suspicious cell has ``I_m = 1``, so
``Y = Model(x) = R1`` and ``S_rep = D(x, R1) = D(R1, x)`` (D is symmetric) without an engine pass;
a tile converged at i = 1 with ``iter_target: last_iterate`` needs no repair at all.

The score tiles are stitched into frame coordinates like every other kind (each pixel from the
tile that keeps it, :class:`~inspector.models.tiling.TileGrid`); ``smooth_sigma`` and
``clamp_negative`` then apply to the frame map. Frames smaller than a tile are reflect-padded
(:meth:`ModelAdapter.fill_batch`) and cropped back.

Per-frame figures (engine rounds, engine runs, converged tiles, masked cells) go to
:attr:`ModelOutput.stats`; they are not published in the ZeroMQ header, but the pipeline hands
them to local report consumers (the benchmark) and the evaluation aggregates them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from inspector.bundle import BUNDLE_FILE, Bundle
from inspector.engines.base import Engine
from inspector.errors import BundleError
from inspector.models.base import BufferPool, ModelAdapter, ModelOutput, ShapeCache
from inspector.models.tiling import TileGrid

log = logging.getLogger(__name__)

__all__ = ["FuzzymaskParams", "FuzzymaskAdapter", "Dissimilarity", "dissimilarity_map",
           "SSIM_TYPE_WEIGHTS"]

#: the paper's Table 1: (alpha, beta, gamma) per class type (spec §3.2)
SSIM_TYPE_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "I": (0.2, 0.5, 2.3), "II": (0.1, 0.8, 2.1), "III": (0.3, 0.6, 2.1)}

#: lower clamps of the spec (§3.2): I, C, S at 1e-4, their product at 1e-8, so fractional powers
#: of near-zero or negative terms never give NaN
_TERM_FLOOR = np.float32(1e-4)
_PRODUCT_FLOOR = np.float32(1e-8)

#: the ``blurred_self`` interference of the training mask (export/fuzzymask/masking.py
#: ``gaussian_blur``): a separable 7-tap Gaussian, sigma 3, normalised in float64, reflected borders
_SELF_BLUR_KSIZE, _SELF_BLUR_SIGMA = 7, 3.0


def _self_blur_kernel() -> np.ndarray:
    r = np.arange(_SELF_BLUR_KSIZE, dtype=np.float64) - (_SELF_BLUR_KSIZE - 1) / 2.0
    g = np.exp(-r ** 2 / (2 * _SELF_BLUR_SIGMA ** 2))
    return (g / g.sum()).astype(np.float32)


class FuzzymaskParams(BaseModel):
    """``kind_params`` of a fuzzymask bundle (spec defaults; the contract's keys, nothing else)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cell: int = Field(16, ge=2, description="k: side of the suspicious-cell grid (and training mask cell)")
    # weighted SSIM of the dissimilarity D (spec §3.2; default type I, textured surfaces)
    ssim_alpha: float = Field(0.2, ge=0)
    ssim_beta: float = Field(0.5, ge=0)
    ssim_gamma: float = Field(2.3, gt=0)
    ssim_window: int = Field(11, ge=3, description="side of the Gaussian SSIM window (odd)")
    ssim_sigma: float = Field(1.5, gt=0)
    ssim_structure: Literal["standard", "literal"] = "standard"
    c1: float = Field(1e-4, gt=0)
    c2: float = Field(9e-4, gt=0)
    c3: float = Field(2.25e-4, gt=0)
    # dynamic inference (spec §4.1, §4.4, §4.7)
    max_iterations: int = Field(10, ge=1, description="N: most iterations of the model on its own output")
    m: float = Field(1e-4, ge=0, description="convergence: scalar MSE of consecutive reconstructions")
    conv_metric: Literal["mse", "D_mean"] = "mse"
    first_check_from: int = Field(1, ge=1, description="first iteration whose output is tested")
    tau_mode: Literal["fixed", "per_image_sigma"] = "fixed"
    tau: float | None = Field(None, ge=0, validate_default=True,
                              description="suspicious-pixel threshold on D(R1, x) (tau_mode fixed)")
    max_mask_frac: float = Field(0.5, gt=0, le=1, description="most cells masked per tile (1.0 = no cap)")
    inference_fill: Literal["zero", "fuzzy"] = "zero"
    w_max: float = Field(0.5, ge=0, le=1, description="fuzzy fill: retention at the cell centre")
    sigma_w: float | None = Field(None, gt=0, description="fuzzy fill: Gaussian width, px (None = cell/4)")
    fill: Literal["gauss0", "uniform01", "blurred_self"] = Field(
        "gauss0", description="fuzzy fill: the interference z of the training mask (mask.fill): gauss0 "
                              "N(0, sigma_z^2), uniform01 U(0, 1) (both drawn once, seed 0), "
                              "blurred_self the tile blurred by a 7x7, sigma 3 Gaussian")
    sigma_z: float = Field(0.1, ge=0, description="fuzzy fill gauss0: std of the interference noise")
    iter_target: Literal["inpaint", "last_iterate"] = "inpaint"
    apply_line18: bool = False
    smooth_sigma: float = Field(0.0, ge=0, description="Gaussian smoothing of the frame score map (0 = off)")
    clamp_negative: bool = False

    @field_validator("ssim_window")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd")
        return v

    @field_validator("first_check_from")
    @classmethod
    def _within_n(cls, v: int, info: ValidationInfo) -> int:
        n = info.data.get("max_iterations")
        if n is not None and v > n:
            raise ValueError(f"must be <= max_iterations ({n}): no iteration would be tested")
        return v

    @field_validator("tau")
    @classmethod
    def _tau_needed(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is None and info.data.get("tau_mode", "fixed") == "fixed":
            raise ValueError("required with tau_mode fixed (the export sets it from the training "
                             "images' D(R1, x) envelope)")
        return v

    @property
    def fuzzy_sigma(self) -> float:
        return self.sigma_w if self.sigma_w is not None else self.cell / 4.0


def params_error(meta, e: ValidationError) -> BundleError:
    """The first validation error as ``<bundle.yaml>: kind_params.<key>: <message>``."""
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    tail = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return BundleError(f"{meta}: kind_params.{key}: {msg}{tail}")


# -- the dissimilarity map D (spec §4.1) --------------------------------------------------------
class Dissimilarity:
    """``D(x, y) = mean_c (x - y)^2 + mean_c (1 - (I^a * C * S^b)^(1/g))`` per pixel.

    I, C, S are the SSIM luminance, contrast and structure terms over a Gaussian window
    (``ssim_window`` x ``ssim_window``, ``ssim_sigma``), borders reflected without repeating the
    edge pixel (OpenCV ``BORDER_REFLECT_101`` = torch ``reflect``)::

        mu = G*x, var_x = max(G*(x^2) - mu_x^2, 0), cov = G*(xy) - mu_x mu_y
        sx_sy = sqrt(var_x var_y)
        I = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)
        C = (2 sx_sy + c2) / (var_x + var_y + c2)
        S = (cov + c3) / (sx_sy + c3)                      standard
        S = (2 cov + c3) / (sqrt(var_x) + sqrt(var_y) + c3) literal (the paper's print, a flag)
        I, C, S clamped to [1e-4, 1]; the product to >= 1e-8

    ``sx_sy`` is ``sqrt(var_x * var_y)`` (not ``sqrt(var_x) * sqrt(var_y)``): for ``x == y``
    every term is then exactly 1 in floating point, so ``D(x, x) == 0`` exactly, and every
    expression is symmetric, so ``D(x, y) == D(y, x)`` exactly. The torch side adds 1e-8 under
    its square roots for finite gradients; that moves D by < 2e-5 (flat windows), well inside
    the 1e-4 parity the contract asks for.

    Works on stacks: ``x``, ``y`` N x C x H x W float32 (or C x H x W) -> N x H x W (or H x W).
    The work buffers are kept between calls and grow to the largest stack seen, so the hot path
    does not allocate once warm. Not thread-safe: one instance per adapter.
    """

    def __init__(self, params: FuzzymaskParams):
        self.p = params
        self.ksize = (params.ssim_window, params.ssim_window)
        self._buf: dict[str, np.ndarray] = {}
        self._cap: tuple[int, ...] = ()

    def _work(self, shape: tuple[int, ...], name: str) -> np.ndarray:
        b = self._buf.get(name)
        if b is None or b.shape[1:] != shape[1:] or b.shape[0] < shape[0]:
            b = np.empty(shape, np.float32)
            self._buf[name] = b
        return b[:shape[0]]

    def _blur(self, src: np.ndarray, dst: np.ndarray) -> None:
        n, c = src.shape[:2]
        for i in range(n):
            for j in range(c):
                cv2.GaussianBlur(src[i, j], self.ksize, self.p.ssim_sigma, dst=dst[i, j],
                                 borderType=cv2.BORDER_REFLECT_101)

    def __call__(self, x: np.ndarray, y: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        single = x.ndim == 3
        if single:
            x, y = x[None], y[None]
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"D needs two C x H x W (or N x C x H x W) arrays of one shape, got "
                             f"{x.shape} and {y.shape}")
        x = np.ascontiguousarray(x, np.float32)
        y = np.ascontiguousarray(y, np.float32)
        n, c, h, w = x.shape
        if out is None:
            out = np.empty((n, h, w), np.float32)
        elif single and out.ndim == 2:
            out = out[None]
        p = self.p
        mx, my = self._work(x.shape, "mx"), self._work(x.shape, "my")
        vx, vy = self._work(x.shape, "vx"), self._work(x.shape, "vy")
        cov, t1 = self._work(x.shape, "cov"), self._work(x.shape, "t1")
        t2 = self._work(x.shape, "t2")
        xc, yc = self._work(x.shape, "xc"), self._work(x.shape, "yc")
        # Second moments about a per-plane level c (the mean of both planes): E[x^2] - mu^2 in
        # float32 cancels catastrophically on mid-grey data (a variance of 0 comes out as ~1e-8,
        # which moves S by ~4e-5 over c3); about c it is the same quantity with ~100x less error.
        # c is symmetric in x and y, so D stays exactly symmetric and D(x, x) exactly 0.
        level = x.mean(axis=(2, 3), keepdims=True, dtype=np.float64)
        level += y.mean(axis=(2, 3), keepdims=True, dtype=np.float64)
        level = (level * 0.5).astype(np.float32)
        np.subtract(x, level, out=xc)
        np.subtract(y, level, out=yc)
        self._blur(xc, mx)                          # mu_x - c
        self._blur(yc, my)                          # mu_y - c
        np.multiply(xc, xc, out=t1)
        self._blur(t1, vx)
        np.multiply(yc, yc, out=t1)
        self._blur(t1, vy)
        np.multiply(xc, yc, out=t1)
        self._blur(t1, cov)
        # variances and covariance: E[.] - products of the (centred) means
        np.multiply(mx, my, out=t1)
        cov -= t1
        np.multiply(mx, mx, out=t1)
        vx -= t1
        np.maximum(vx, 0.0, out=vx)
        np.multiply(my, my, out=t1)
        vy -= t1
        np.maximum(vy, 0.0, out=vy)
        mx += level                                 # mu_x
        my += level                                 # mu_y
        # luminance I into t1: (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)
        np.multiply(mx, mx, out=t2)
        np.multiply(my, my, out=t1)
        t2 += t1
        t2 += np.float32(p.c1)
        np.multiply(mx, my, out=t1)
        t1 *= np.float32(2.0)
        t1 += np.float32(p.c1)
        t1 /= t2
        np.clip(t1, _TERM_FLOOR, 1.0, out=t1)
        if p.ssim_alpha != 1.0:
            np.power(t1, np.float32(p.ssim_alpha), out=t1)
        # sx_sy into my (mu_y no longer needed)
        np.multiply(vx, vy, out=my)
        np.sqrt(my, out=my)
        # |cov| <= sx_sy (Cauchy-Schwarz) can fail by rounding where var was clamped at 0; the
        # clamp makes S exactly 1 for x == y there too
        np.minimum(cov, my, out=cov)
        np.negative(my, out=t2)
        np.maximum(cov, t2, out=cov)
        # contrast C into mx: (2 sx_sy + c2) / (var_x + var_y + c2)
        np.add(vx, vy, out=t2)
        t2 += np.float32(p.c2)
        np.multiply(my, np.float32(2.0), out=mx)
        mx += np.float32(p.c2)
        mx /= t2
        np.clip(mx, _TERM_FLOOR, 1.0, out=mx)
        t1 *= mx                                    # I^a * C
        # structure S into cov
        if p.ssim_structure == "standard":
            cov += np.float32(p.c3)
            my += np.float32(p.c3)
            cov /= my
        else:
            cov *= np.float32(2.0)
            cov += np.float32(p.c3)
            np.sqrt(vx, out=vx)
            np.sqrt(vy, out=vy)
            vx += vy
            vx += np.float32(p.c3)
            cov /= vx
        np.clip(cov, _TERM_FLOOR, 1.0, out=cov)
        if p.ssim_beta != 1.0:
            np.power(cov, np.float32(p.ssim_beta), out=cov)
        t1 *= cov
        np.maximum(t1, _PRODUCT_FLOOR, out=t1)
        np.power(t1, np.float32(1.0 / p.ssim_gamma), out=t1)
        # per-pixel: mean over channels of (1 - sim) + mean over channels of (x - y)^2
        np.subtract(x, y, out=t2)
        np.multiply(t2, t2, out=t2)
        t2 -= t1
        np.sum(t2, axis=1, out=out)
        if c > 1:
            out /= np.float32(c)
        out += np.float32(1.0)
        # 1 - sim >= 0 up to rounding; keep D(x, x) exactly 0 rather than -1e-8
        np.maximum(out, 0.0, out=out)
        return out[0] if single else out


def dissimilarity_map(x: np.ndarray, y: np.ndarray, params: FuzzymaskParams | None = None) -> np.ndarray:
    """The spec's per-pixel dissimilarity ``D(x, y)`` (H x W float32) of two C x H x W float32
    images in [0, 1] (see :class:`Dissimilarity` for the formula and clamps).

    >>> x = np.random.default_rng(0).random((1, 16, 16), dtype=np.float32)
    >>> p = FuzzymaskParams(tau=0.1)
    >>> float(dissimilarity_map(x, x, p).max())
    0.0
    >>> d = dissimilarity_map(x, 1 - x, p)
    >>> bool(np.array_equal(d, dissimilarity_map(1 - x, x, p)) and d.min() > 0)
    True
    """
    return Dissimilarity(params or FuzzymaskParams(tau=0.0))(x, y)


# -- the adapter --------------------------------------------------------------------------------
class _FrameWork:
    """Buffers of one frame shape, reused frame after frame (one infer at a time per adapter)."""

    def __init__(self, n: int, c: int, th: int, tw: int, inbuf_rows: int, needs_x: bool):
        shp = (n, c, th, tw)
        self.x = np.empty(shp, np.float32) if needs_x else None  # tiles in [0, 1] (non-identity input)
        self.r1 = np.empty(shp, np.float32)
        self.ping = np.empty(shp, np.float32)
        self.pong = np.empty(shp, np.float32)
        self.y = np.empty(shp, np.float32)            # repairs, compact (row j = j-th repaired tile)
        self.gx = np.empty(shp, np.float32)           # gathered rows for D on a subset
        self.gy = np.empty(shp, np.float32)
        self.inbuf = np.zeros((inbuf_rows, c, th, tw), np.float32)   # engine input of a round
        self.outbuf = np.empty((inbuf_rows, c, th, tw), np.float32)
        self.d_r1x = np.empty((n, th, tw), np.float32)  # D(R1, x) = Mask0
        self.back2 = np.empty((n, th, tw), np.float32)  # D(R[n-1], R[n]) of converged tiles
        self.last = np.empty((n, th, tw), np.float32)   # D(x, R[n]) (iter_target last_iterate)
        self.srep = np.empty((n, th, tw), np.float32)   # S_rep
        self.dtmp = np.empty((n, th, tw), np.float32)
        self.score = np.empty((n, th, tw), np.float32)
        self.tmp = np.empty((c, th, tw), np.float32)


class FuzzymaskAdapter(ModelAdapter):
    """Dynamic inference of the fuzzy-mask inpainter through the engine interface (module doc)."""

    kind = "fuzzymask"
    outputs = frozenset({"residual"})

    def __init__(self, bundle: Bundle, engine: Engine, max_batch: int = 0):
        super().__init__(bundle, engine, max_batch)
        meta = bundle.path / BUNDLE_FILE
        self.rec_name = self.output_name("reconstruction", "the graph output holding the reconstructed tiles")
        pp_type = bundle.spec.postprocess.type
        if pp_type not in ("score_threshold", "dual_threshold"):
            raise BundleError(f"{meta}: postprocess.type: kind fuzzymask outputs an anomaly score map; "
                              f"expected score_threshold (or dual_threshold), got {pp_type}")
        try:
            self.params = FuzzymaskParams.model_validate(bundle.spec.kind_params)
        except ValidationError as e:
            raise params_error(meta, e) from None
        p = self.params
        if p.cell > min(self.tile_h, self.tile_w):
            raise BundleError(f"{meta}: kind_params.cell: {p.cell} is larger than the tile "
                              f"{list(bundle.spec.input.tile)}")
        self.dissim = Dissimilarity(p)
        # graph input = (x01 - mean) / std; with mean 0, std 1 (the contract) tiles go in as they are
        mean = np.broadcast_to(np.asarray(bundle.spec.input.mean, np.float32), (self.channels,))
        std = np.broadcast_to(np.asarray(bundle.spec.input.std, np.float32), (self.channels,))
        self._identity = bool(np.all(mean == 0.0) and np.all(std == 1.0))
        self._mean = mean.reshape(1, -1, 1, 1).copy()
        self._std = std.reshape(1, -1, 1, 1).copy()
        # the k x k grid of a tile, anchored at (0, 0); a last partial cell counts as a cell
        self._cy = np.arange(0, self.tile_h, p.cell)
        self._cx = np.arange(0, self.tile_w, p.cell)
        self._fill = self._fuzzy_fill() if p.inference_fill == "fuzzy" else None
        if self._fill is not None and p.fill == "blurred_self":
            # the per-tile interference (1 - r) * blur(x), computed into these (one infer at a time)
            self._blur_kernel = _self_blur_kernel()
            self._blur_buf = np.empty((self.channels, self.tile_h, self.tile_w), np.float32)
        self._work: ShapeCache = ShapeCache()
        #: per-tile record of the last frame (converged, iterations, masked cells), for tests and logs
        self.last_frame: dict[str, np.ndarray] = {}
        self._pools: ShapeCache = ShapeCache()

    # -- helpers ----------------------------------------------------------------------------------
    def _fuzzy_fill(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Retention r (th x tw) and the interference term (1 - r) z (C x th x tw) of spec §2.3,
        for a tile whose every cell is masked; a masked cell takes its part of both. z is the
        training mask's ``fill``: ``gauss0`` N(0, sigma_z^2), ``uniform01`` U(0, 1), drawn once
        here; ``blurred_self`` (None here) depends on the tile and is made per tile
        (:meth:`_self_fill`).

        The noise z is drawn once (numpy ``default_rng(0)``): the runtime must give the same score
        for the same frame, and drawing per frame would cost time for nothing. ``uniform01`` is
        drawn as the training mask draws it from a numpy generator (float32 ``random``), so with a
        generator of seed 0 both overlays are the same.
        """
        p = self.params
        k, s = p.cell, p.fuzzy_sigma
        yy = np.arange(self.tile_h, dtype=np.float32)
        xx = np.arange(self.tile_w, dtype=np.float32)
        dy = yy - ((yy // k) * k + (k - 1) / 2.0)
        dx = xx - ((xx // k) * k + (k - 1) / 2.0)
        r = (p.w_max * np.exp(-(dy[:, None] ** 2 + dx[None, :] ** 2) / (2.0 * s * s))).astype(np.float32)
        shape = (self.channels, self.tile_h, self.tile_w)
        if p.fill == "blurred_self":
            return r, None
        if p.fill == "uniform01":
            z = np.random.default_rng(0).random(shape, dtype=np.float32)
            return r, (np.float32(1.0) - r)[None] * z
        z = np.random.default_rng(0).normal(0.0, p.sigma_z, shape)
        return r, ((1.0 - r)[None] * z).astype(np.float32)

    def _self_fill(self, x: np.ndarray, r: np.ndarray) -> np.ndarray:
        """``blurred_self``: (1 - r) * blur(x) of one tile (C x th x tw in [0, 1]), blur as the
        training mask's (7x7 separable Gaussian, sigma 3, BORDER_REFLECT_101 = torch reflect)."""
        out = self._blur_buf
        g = self._blur_kernel
        for c in range(x.shape[0]):
            cv2.sepFilter2D(x[c], cv2.CV_32F, g, g, dst=out[c], borderType=cv2.BORDER_REFLECT_101)
        out *= (np.float32(1.0) - r)[None]
        return out

    def _frame_work(self, h: int, w: int, n_pad: int, n: int) -> _FrameWork:
        wk = self._work.get((h, w))
        if wk is None:
            rows = 2 * n
            if self.batch > 0 and self.fixed_batch:
                rows = -(-rows // self.batch) * self.batch
            wk = _FrameWork(n, self.channels, self.tile_h, self.tile_w, max(rows, n_pad),
                            needs_x=not self._identity)
            self._work[(h, w)] = wk
        return wk

    def _to_input(self, src: np.ndarray, dst: np.ndarray) -> None:
        """One tile in [0, 1] (C x th x tw) -> its graph input row."""
        if self._identity:
            np.copyto(dst, src)
        else:
            np.subtract(src, self._mean[0], out=dst)
            dst /= self._std[0]

    def _run_rows(self, inp: np.ndarray, k: int, out: np.ndarray, st: dict) -> None:
        """Run the first ``k`` rows of ``inp`` (graph input) in chunks of the engine's batch and
        write the reconstructions to ``out[:k]``. A fixed-batch engine gets whole chunks (rows
        past ``k`` in ``inp`` are padding; their outputs are dropped)."""
        step = self.batch if self.batch > 0 else k
        t0 = time.perf_counter()
        for s in range(0, k, step):
            e = min(s + step, k)
            feed = inp[s:s + step] if self.fixed_batch else inp[s:e]
            res = self.engine.run({self.input_name: feed})[self.rec_name]
            if res.shape[1] != self.channels:
                raise BundleError(f"{self.bundle.path / BUNDLE_FILE}: input.channels: {self.channels} "
                                  f"but the graph reconstructs {res.shape[1]} channel(s)")
            out[s:e] = res[:e - s]
            st["engine_runs"] += 1
        st["engine_ms"] += (time.perf_counter() - t0) * 1e3
        st["engine_calls"] += 1
        st["tile_passes"] += k

    def _cells(self, mask0: np.ndarray) -> np.ndarray:
        """Suspicious cells per tile (N x Gy x Gx bool) from Mask0 = D(R1, x) (spec §4.4, §4.5)."""
        p = self.params
        cmax = np.maximum.reduceat(np.maximum.reduceat(mask0, self._cy, axis=1), self._cx, axis=2)
        if p.tau_mode == "fixed":
            flags = cmax > np.float32(p.tau)
        else:  # per tile: mean + 3 std of its own Mask0
            flat = mask0.reshape(len(mask0), -1)
            tau = flat.mean(axis=1) + 3.0 * flat.std(axis=1)
            flags = cmax > tau[:, None, None].astype(np.float32)
        cap = int(math.floor(p.max_mask_frac * cmax[0].size + 1e-9))
        for t in np.flatnonzero(flags.reshape(len(flags), -1).sum(axis=1) > cap):
            # keep the cap's worth of cells with the highest patch max of Mask0
            order = np.argsort(-cmax[t].ravel(), kind="stable")[:cap]
            keep = np.zeros(cmax[t].size, bool)
            keep[order] = True
            flags[t] = keep.reshape(cmax[t].shape) & flags[t]
        return flags

    def _masked_input(self, x: np.ndarray, cells: np.ndarray, dst: np.ndarray) -> None:
        """``I_m * x`` of one tile (zero fill) or the fuzzy overlay of spec §2.3 on its cells,
        written to ``dst`` (C x th x tw, tiles in [0, 1])."""
        k = self.params.cell
        pix = np.repeat(np.repeat(cells, k, axis=0), k, axis=1)[:self.tile_h, :self.tile_w]
        np.copyto(dst, x)
        if self._fill is None:
            dst[:, pix] = 0.0
        else:
            r, fill = self._fill
            if fill is None:  # blurred_self: the interference is the tile's own blur
                fill = self._self_fill(x, r)
            dst[:, pix] = np.clip(x[:, pix] * r[pix] + fill[:, pix], 0.0, 1.0)

    def _dissim_rows(self, a: np.ndarray, b: np.ndarray, rows: np.ndarray, wk: _FrameWork,
                     out: np.ndarray, b_compact: bool = False) -> None:
        """``out[rows] = D(a[rows], b[rows])`` (``b[:len(rows)]`` when ``b_compact``)."""
        k = len(rows)
        if k == 0:
            return
        np.take(a, rows, axis=0, out=wk.gx[:k])
        if b_compact:
            bb = b[:k]
        else:
            np.take(b, rows, axis=0, out=wk.gy[:k])
            bb = wk.gy[:k]
        self.dissim(wk.gx[:k], bb, out=wk.dtmp[:k])
        out[rows] = wk.dtmp[:k]

    # -- the call ---------------------------------------------------------------------------------
    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, TileGrid, np.ndarray, _FrameWork]:
        """The frame as dynamic inference sees it: flat-field corrected (when the adapter has one),
        tiled into the graph-input batch, and the tiles ``x`` in [0, 1]. Returns
        ``(image, batch, grid, x, work buffers)``."""
        if self.flat_field is not None:
            image = self.flat_field.apply(image)
        batch, g = self.fill_batch(image)
        n = g.count
        h, w = image.shape[:2]
        wk = self._frame_work(h, w, len(batch), n)
        if self._identity:
            x = batch[:n]
        else:
            np.multiply(batch[:n], self._std, out=wk.x)
            wk.x += self._mean
            x = wk.x
        return image, batch, g, x, wk

    def infer(self, image: np.ndarray) -> ModelOutput:
        t0 = time.perf_counter()
        image, batch, g, x, wk = self._prepare(image)
        n = g.count
        h, w = image.shape[:2]
        t1 = time.perf_counter()
        st = {"engine_ms": 0.0, "engine_calls": 0, "engine_runs": 0, "tile_passes": 0}
        score_tiles, info = self._dynamic(batch, x, n, wk, st)
        # stitch the kept part of each tile's score into the frame, then crop padding away
        pool = self._pools.get((h, w))
        if pool is None:
            pool = BufferPool(((1, g.height, g.width), (h, w)))
            self._pools[(h, w)] = pool
        bufs = pool.acquire()
        full, score = bufs
        self.stitch([score_tiles[:, None]], g, full)
        np.copyto(score, full[0, :h, :w])
        p = self.params
        if p.smooth_sigma > 0:
            cv2.GaussianBlur(score, (0, 0), p.smooth_sigma, dst=score, borderType=cv2.BORDER_REFLECT_101)
        if p.clamp_negative:
            np.maximum(score, 0.0, out=score)
        t2 = time.perf_counter()
        engine_ms = st["engine_ms"]
        stats = {"engine_calls": st["engine_calls"], "engine_runs": st["engine_runs"],
                 "tile_passes": st["tile_passes"], "tiles": n, **info}
        log.debug("fuzzymask frame %dx%d: %s", h, w, stats)
        return ModelOutput(score_map=score, residual=score,
                           timings_ms={"preprocess": (t1 - t0) * 1e3, "engine": engine_ms,
                                       "decode": (t2 - t1) * 1e3 - engine_ms},
                           stats=stats, release=lambda: pool.give_back(bufs))

    def _dynamic(self, batch: np.ndarray, x: np.ndarray, n: int, wk: _FrameWork,
                 st: dict) -> tuple[np.ndarray, dict]:
        """Spec §4.4 per tile, in batched engine rounds. Returns (score tiles N x th x tw, info)."""
        p = self.params
        N = p.max_iterations
        # round 1: R1 = Model(x) of every tile (the batch is already the graph input)
        self._run_rows(batch, n, wk.r1, st)
        self.dissim(wk.r1, x, out=wk.d_r1x)                 # Mask0 = D(R1, x)
        iters = np.ones(n, np.int32)                       # index of the last computed R per tile
        converged = np.zeros(n, bool)
        if p.first_check_from <= 1:
            for t in range(n):
                if self._converged(x[t], wk.r1[t], wk.d_r1x[t], wk):
                    converged[t] = True
            # R[n-1], R[n] = x, R1: back2 is D(x, R1) = D(R1, x)
            wk.back2[converged] = wk.d_r1x[converged]
            if p.iter_target == "last_iterate":
                wk.last[converged] = wk.d_r1x[converged]
        cells = self._cells(wk.d_r1x)
        flagged = cells.reshape(n, -1).any(axis=1)
        need_y = flagged.copy()
        if p.iter_target == "last_iterate" and not p.apply_line18:
            need_y &= ~converged  # a converged tile then scores with its last iterate, not Y
        ridx = np.flatnonzero(need_y)
        # with the literal line 18 every tile scores S_rep = D(x, Y): the iterations decide
        # nothing, so they are not run (a frame costs the first pass plus at most the repairs)
        iterate = self._iterates()
        active = np.flatnonzero(~converged) if iterate else np.zeros(0, np.intp)
        prev, cur = wk.r1, wk.ping
        i = 1
        repairs_pending = len(ridx) > 0
        while len(active) or repairs_pending:
            i += 1
            ka, kr = len(active), len(ridx) if repairs_pending else 0
            # this round's input: the next iteration of the active tiles, then (round 2) repairs
            for j, t in enumerate(active):
                self._to_input(prev[t], wk.inbuf[j])
            for j in range(kr):
                t = ridx[j]
                self._masked_input(x[t], cells[t], wk.tmp)
                self._to_input(wk.tmp, wk.inbuf[ka + j])
            self._run_rows(wk.inbuf, ka + kr, wk.outbuf, st)
            if kr:
                wk.y[:kr] = wk.outbuf[ka:ka + kr]
                repairs_pending = False
            if ka:
                cur[active] = wk.outbuf[:ka]
                iters[active] = i
                newly = []
                if i >= p.first_check_from:
                    for t in active:
                        if self._converged(prev[t], cur[t], None, wk):
                            newly.append(t)
                if newly:
                    rows = np.asarray(newly, np.intp)
                    converged[rows] = True
                    self._dissim_rows(prev, cur, rows, wk, wk.back2)   # D(R[n-1], R[n])
                    if p.iter_target == "last_iterate":
                        self._dissim_rows(x, cur, rows, wk, wk.last)   # D(x, R[n])
                active = active[~converged[active]] if i < N else np.zeros(0, np.intp)
                # R[i] becomes R[i-1] of the next round; r1 stays intact for the record
                prev, cur = cur, (wk.pong if cur is wk.ping else wk.ping)
        # S_rep = D(x, Y); with no suspicious cell Y = R1 and S_rep = D(R1, x) exactly
        np.copyto(wk.srep, wk.d_r1x)
        if len(ridx):
            self._dissim_rows(x, wk.y, ridx, wk, wk.srep, b_compact=True)
        score = wk.score
        np.copyto(score, wk.srep)
        if not p.apply_line18 and converged.any():
            ct = np.flatnonzero(converged)
            if p.iter_target == "last_iterate":
                score[ct] = wk.last[ct]
            score[ct] -= wk.d_r1x[ct]
            score[ct] -= wk.back2[ct]
        info = {"converged_tiles": int(converged.sum()), "repaired_tiles": int(len(ridx)),
                "masked_cells": int(cells.sum()), "max_iterations_used": int(iters.max()) if n else 0}
        self.last_frame = {"converged": converged, "iterations": iters, "cells": cells}
        return score, info

    def _converged(self, a: np.ndarray, b: np.ndarray, d: np.ndarray | None, wk: _FrameWork) -> bool:
        """The convergence test between consecutive reconstructions of one tile (spec §4.1)."""
        return self.conv_value(a, b, d, wk.tmp) <= self.params.m

    def conv_value(self, a: np.ndarray, b: np.ndarray, d: np.ndarray | None = None,
                   tmp: np.ndarray | None = None) -> float:
        """The value the convergence test compares with ``m`` for two consecutive reconstructions
        ``a``, ``b`` of one tile (C x th x tw, in [0, 1]): their MSE, or with ``conv_metric:
        D_mean`` the mean of ``D(a, b)`` (``d`` when already computed). ``tmp``: a C x th x tw
        float32 scratch buffer (the MSE allocates one without it)."""
        if self.params.conv_metric == "mse":
            if tmp is None:
                tmp = np.empty(a.shape, np.float32)
            np.subtract(a, b, out=tmp)
            return float(np.vdot(tmp, tmp)) / tmp.size
        if d is None:
            d = self.dissim(a, b)
        return float(d.mean())

    def _iterates(self) -> bool:
        """Whether dynamic inference iterates past R1: not with ``max_iterations`` 1, nor with
        ``apply_line18`` (every tile then scores ``S_rep``, so the iterations decide nothing)."""
        return self.params.max_iterations >= 2 and not self.params.apply_line18

    def checked_iterations(self) -> range:
        """The iterations ``i`` at which infer() tests ``R[i-1]`` against ``R[i]``: from
        ``first_check_from`` to ``max_iterations``, or only ``i = 1`` (``x`` against ``R1``)
        when it does not iterate (``apply_line18``); empty when nothing is ever tested."""
        last = self.params.max_iterations if self._iterates() else 1
        return range(self.params.first_check_from, last + 1)

    # -- for inspector calibrate convergence ------------------------------------------------------
    def convergence_values(self, image: np.ndarray, passes: int) -> tuple[np.ndarray, TileGrid]:
        """Iterate every tile of ``image`` ``passes`` times, without stopping at ``m``, and return
        ``(v, grid)``: ``v[t, i - 1]`` is the value the convergence test of infer() compares with
        ``m`` at iteration ``i`` of tile ``t`` (:meth:`conv_value` of ``R[i-1]`` and ``R[i]``,
        ``R0`` the tile). The frame takes infer()'s path (flat field, tiling, graph input, engine
        chunks, metric); which iterations infer() actually tests is :meth:`checked_iterations`.
        """
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        _, batch, g, x, wk = self._prepare(image)
        n = g.count
        st = {"engine_ms": 0.0, "engine_calls": 0, "engine_runs": 0, "tile_passes": 0}
        v = np.empty((n, passes), np.float64)
        # iteration 1: R1 = Model(x) from the batch itself, D(R1, x) computed as infer() does
        self._run_rows(batch, n, wk.r1, st)
        d1 = self.dissim(wk.r1, x, out=wk.d_r1x) if self.params.conv_metric == "D_mean" else None
        for t in range(n):
            v[t, 0] = self.conv_value(x[t], wk.r1[t], None if d1 is None else d1[t], wk.tmp)
        prev, cur = x, wk.r1
        for i in range(2, passes + 1):
            for t in range(n):
                self._to_input(cur[t], wk.inbuf[t])
            nxt = wk.pong if cur is wk.ping else wk.ping
            self._run_rows(wk.inbuf, n, nxt, st)
            prev, cur = cur, nxt
            for t in range(n):
                v[t, i - 1] = self.conv_value(prev[t], cur[t], None, wk.tmp)
        return v, g

    # -- for the benchmark ------------------------------------------------------------------------
    def plain_engine_ms(self, image: np.ndarray) -> float:
        """Engine milliseconds of one plain reconstruction pass ``Model(x)`` over the frame's
        tiles, run the same way as the dynamic rounds (same chunking): the unit the benchmark
        divides the dynamic inference cost by."""
        batch, g = self.fill_batch(image)
        h, w = image.shape[:2]
        wk = self._frame_work(h, w, len(batch), g.count)
        st = {"engine_ms": 0.0, "engine_calls": 0, "engine_runs": 0, "tile_passes": 0}
        self._run_rows(batch, g.count, wk.r1, st)
        return st["engine_ms"]

    def decode(self, raw: dict[str, list[np.ndarray]], g: TileGrid, image: np.ndarray) -> ModelOutput:
        # infer() drives the engine itself (several rounds per frame); nothing calls decode()
        raise TypeError("fuzzymask runs several engine rounds per frame: use infer()")
