"""Model kind ``clgan``: reconstruction by the CLGAN generator, residual out.

The graph takes normalised tiles and returns ``reconstruction`` (N x C x th x tw in the bundle's
``kind_params.output_range``, [-1, 1] for the Tanh generator). The adapter stitches the tiles
back into frame coordinates, maps the reconstruction to grey levels and computes the spec's
residual on the whole frame (``../shared/seeds/002_spec.md`` §2.2, Eq. 7)::

    ID1 = Gauss( |Gauss(I) - Gauss(I_r)| )        per channel, float32, grey levels

(``residual_mode`` ``signed`` keeps the sign, ``clip`` keeps the positive part). The residual goes
to the post-processing (``dual_threshold`` with the bundle's k1, k2, kernel_size) and, merged
over channels with grey weights 0.299/0.587/0.114, is the published per-pixel score. The
residual is computed after stitching, so the blurs see no tile borders.

``local_mean_window`` (0 = off, the spec) first gives the reconstruction the input's local mean
grey level, ``I_r <- I_r - Gauss_w(I_r) + Gauss_w(I)``, so the residual compares structure only.
Why: the spec's generator normalises every feature map per image (instance norm right after a
linear conv), so its output cannot follow a tile's brightness; on a surface with uneven
illumination the plain residual then maps the illumination, not the defects (README, CLGAN).

Steady state allocates nothing per frame beyond OpenCV's internals: every map lives in a
:class:`BufferPool` keyed by frame shape and goes back to it once the frame is published.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inspector.bundle import BUNDLE_FILE, Bundle
from inspector.engines.base import Engine
from inspector.errors import BundleError
from inspector.models.base import BufferPool, ModelAdapter, ModelOutput, ShapeCache
from inspector.models.tiling import TileGrid
from inspector.postprocess import GREY_WEIGHTS_RGB

__all__ = ["ClganParams", "ClganAdapter", "clgan_residual", "residual_score",
           "reconstruction_to_grey_levels", "check_local_mean_window"]


class ClganParams(BaseModel):
    """``kind_params`` of a clgan bundle (spec §2.3 defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    gauss_ksize: int = Field(3, ge=1, description="side of the Gaussian kernel of all three blurs")
    gauss_sigma: float = Field(0.0, ge=0, description="0 = OpenCV's choice from the size (0.8 for 3)")
    residual_mode: Literal["abs", "signed", "clip"] = "abs"
    local_mean_window: int = Field(0, ge=0, description="odd side of the Gaussian window whose "
                                   "mean grey level the reconstruction takes from the input; 0 = off")
    output_range: tuple[float, float] = Field((-1.0, 1.0), description="graph output for grey 0 and 255")

    @field_validator("gauss_ksize")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"must be odd, got {v}")
        return v

    @field_validator("local_mean_window")
    @classmethod
    def _odd_or_off(cls, v: int) -> int:
        return check_local_mean_window(v)

    @field_validator("output_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] <= v[0]:
            raise ValueError(f"needs low < high, got {list(v)}")
        return v


def check_local_mean_window(v: int) -> int:
    """``local_mean_window`` is 0 (off) or an odd Gaussian side of at least 3."""
    if v and (v % 2 == 0 or v < 3):
        raise ValueError(f"must be 0 (off) or an odd side >= 3, got {v}")
    return v


def reconstruction_to_grey_levels(rec: np.ndarray, output_range: tuple[float, float] = (-1.0, 1.0),
                                  out: np.ndarray | None = None) -> np.ndarray:
    """Graph output -> grey levels [0, 255] (float32), clipped as the spec's reference does."""
    lo, hi = output_range
    scale = np.float32(255.0 / (hi - lo))
    out = np.multiply(rec, scale, out=out, dtype=np.float32, casting="unsafe")
    out -= np.float32(lo) * scale
    np.clip(out, 0.0, 255.0, out=out)
    return out


def clgan_residual(image: np.ndarray, recon: np.ndarray, ksize: int = 3, sigma: float = 0.0,
                   mode: str = "abs", out: np.ndarray | None = None,
                   tmp: np.ndarray | None = None, local_mean_window: int = 0) -> np.ndarray:
    """The spec's ID1 = G(G(I) - G(Ir)) with the residual sign rule ``mode``.

    ``image`` (uint8 or float, grey levels) and ``recon`` (float32 grey levels, already clipped
    to [0, 255]) are HxW or HxWx3 of one shape. ``recon`` is overwritten; ``out`` and ``tmp``
    (float32, that shape) are optional preallocated buffers. With ``local_mean_window`` w > 0 the
    reconstruction first takes the input's local mean: Ir - Gauss_w(Ir) + Gauss_w(I) (OpenCV's
    sigma for a w-side kernel). Returns ``out``.

    Every blur is linear with the same border rule, so G(I) - G(Ir) is computed as G(I - Ir) and
    the local-mean step as d - Gauss_w(d) on d = I - Ir: one wide blur instead of two (a 63-px
    window costs about 4 ms on a 256x1600 frame on one core).

    >>> img = np.zeros((9, 9), np.uint8); img[4, 4] = 200
    >>> r = clgan_residual(img, np.zeros((9, 9), np.float32))
    >>> bool(r[4, 4] == r.max() and r[0, 0] == 0)
    True
    """
    if image.shape != recon.shape:
        raise ValueError(f"image {image.shape} and reconstruction {recon.shape} differ in shape")
    k = (ksize, ksize)
    if tmp is None:
        tmp = np.empty(recon.shape, np.float32)
    if out is None:
        out = np.empty(recon.shape, np.float32)
    if mode not in ("abs", "signed", "clip"):
        raise ValueError(f"residual_mode must be abs|signed|clip, got {mode!r}")
    if image.dtype == np.float32:
        np.copyto(tmp, image)
    else:
        np.copyto(tmp, image, casting="unsafe")
    tmp -= recon                                    # d = I - Ir
    if local_mean_window:
        w = (local_mean_window, local_mean_window)
        cv2.GaussianBlur(tmp, w, 0, dst=recon)
        tmp -= recon                                # d - Gw(d): Ir took I's local mean
    cv2.GaussianBlur(tmp, k, sigma, dst=recon)      # G(I) - G(Ir)
    if mode == "abs":
        np.abs(recon, out=recon)
    elif mode == "clip":  # what cv2.subtract on uint8 images would give
        np.maximum(recon, 0.0, out=recon)
    cv2.GaussianBlur(recon, k, sigma, dst=out)      # G(residual)
    return out


def residual_score(residual: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The published per-pixel score: the residual itself (grey) or its grey-weighted channel sum."""
    if out is None:
        out = np.empty(residual.shape[:2], np.float32)
    if residual.ndim == 2:
        np.copyto(out, residual)
    else:
        np.multiply(residual[:, :, 0], np.float32(GREY_WEIGHTS_RGB[0]), out=out)
        out += residual[:, :, 1] * np.float32(GREY_WEIGHTS_RGB[1])
        out += residual[:, :, 2] * np.float32(GREY_WEIGHTS_RGB[2])
    return out


class ClganAdapter(ModelAdapter):
    kind = "clgan"
    outputs = frozenset({"residual"})

    def __init__(self, bundle: Bundle, engine: Engine, max_batch: int = 0):
        super().__init__(bundle, engine, max_batch)
        meta = bundle.path / BUNDLE_FILE
        self.rec_name = self.output_name("reconstruction", "the graph output holding the reconstructed tiles")
        if bundle.spec.postprocess.type != "dual_threshold":
            raise BundleError(f"{meta}: postprocess.type: kind clgan outputs a residual; expected "
                              f"dual_threshold, got {bundle.spec.postprocess.type}")
        try:
            self.params = ClganParams.model_validate(bundle.spec.kind_params)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise BundleError(f"{meta}: kind_params.{key}: {err['msg']}") from None
        self._pools: ShapeCache = ShapeCache()

    def _shape(self, h: int, w: int) -> tuple[int, ...]:
        return (h, w) if self.channels == 1 else (h, w, self.channels)

    def decode(self, raw: dict[str, list[np.ndarray]], g: TileGrid, image: np.ndarray) -> ModelOutput:
        chunks = raw[self.rec_name]
        c = chunks[0].shape[1]
        if c != self.channels:
            raise BundleError(f"{self.bundle.path / BUNDLE_FILE}: input.channels: {self.channels} but "
                              f"the graph reconstructs {c} channel(s)")
        h, w = image.shape[:2]
        pool = self._pools.get((h, w))
        if pool is None:
            hw = self._shape(h, w)
            pool = BufferPool(((c, g.height, g.width), hw, hw, hw, (h, w)))
            self._pools[(h, w)] = pool
        bufs = pool.acquire()
        rec_chw, rec, tmp, residual, score = bufs
        self.stitch(chunks, g, rec_chw)
        src = rec_chw[0, :h, :w] if c == 1 else rec_chw[:, :h, :w].transpose(1, 2, 0)
        reconstruction_to_grey_levels(src, self.params.output_range, out=rec)
        img = self.model_image(image, rec.shape)
        p = self.params
        clgan_residual(img, rec, p.gauss_ksize, p.gauss_sigma, p.residual_mode, out=residual, tmp=tmp,
                       local_mean_window=p.local_mean_window)
        residual_score(residual, out=score)
        return ModelOutput(score_map=score, residual=residual, release=lambda: pool.give_back(bufs))

    def model_image(self, image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The frame in the reconstruction's channel layout ``shape`` (HxW or HxWxC)."""
        img = self.to_model_channels(image)
        img = img[:, :, 0] if len(shape) == 2 and img.ndim == 3 else img
        if img.shape != shape:  # a grey frame on an RGB model: the channels are equal
            img = np.broadcast_to(img[:, :, :1] if img.ndim == 3 else img[:, :, None], shape)
        return img

    def reconstruct(self, image: np.ndarray) -> np.ndarray:
        """The reconstruction of a frame in grey levels (HxW or HxWxC float32), for overlays and
        tests; runs the engine once (not on the hot path)."""
        if getattr(self, "flat_field", None) is not None:  # as infer() does
            image = self.flat_field.apply(image)
        batch, g = self.fill_batch(image)
        raw = self.run_engine(batch)
        chunks = raw[self.rec_name]
        out = np.empty((chunks[0].shape[1], g.height, g.width), np.float32)
        self.stitch(chunks, g, out)
        h, w = image.shape[:2]
        src = out[0, :h, :w] if self.channels == 1 else out[:, :h, :w].transpose(1, 2, 0)
        return reconstruction_to_grey_levels(src, self.params.output_range)
