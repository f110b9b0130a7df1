"""Anomaly simulation for stage 1 of ARCD (seed spec ``004_spec.md`` §2.2).

R learns to turn an anomalous image back into a normal one, but the normal training images carry
no defects. So defects are simulated: a thresholded, rotated 2-D Perlin noise image gives the
defect's position and shape (mask P), a randomly augmented texture A fills it, and the texture is
blended into the image::

    I_A = I * (1 - P) + beta * I * P + (1 - beta) * A * P,     beta ~ U(0, 0.8)

with P restricted to the valid region V of the (square-padded) image so padding never holds an
anomaly. Every default below is a ``[DEFAULT]`` of the spec and is configurable.

The texture library is procedural (the spec's fallback when DTD cannot be downloaded): fractal
noise, stripes, Gabor-filtered noise and smooth random colour/grey fields, optionally plus crops
of other normal images. All randomness comes from the ``numpy.random.Generator`` passed in, so a
seeded call is reproducible.

Example::

    >>> import numpy as np
    >>> sim = AnomalySimulator(SimulationConfig(clean_prob=0.0))
    >>> img = np.full((64, 64), 0.5, np.float32)
    >>> out = sim(img, np.random.default_rng(0))
    >>> out.image.shape, out.mask.shape, bool(out.mask.any())
    ((64, 64), (64, 64), True)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)

#: the seven augmentations the thesis names (§2.2 step 2)
AUGMENTATIONS: tuple[str, ...] = (
    "rotation", "affine", "brightness", "sharpness", "equalize", "contrast", "saturation")
#: procedural texture kinds; ``normal_crop`` needs a texture source of other normal images
TEXTURE_KINDS: tuple[str, ...] = ("fractal", "stripes", "gabor", "field", "normal_crop")

TextureSource = Callable[[np.random.Generator], np.ndarray]

__all__ = [
    "AUGMENTATIONS",
    "TEXTURE_KINDS",
    "SimulationConfig",
    "SimulatedSample",
    "AnomalySimulator",
    "perlin_noise",
    "perlin_mask",
    "make_texture",
    "augment_texture",
    "blend",
    "square_pad_resize",
]


class SimulationConfig(BaseModel):
    """Parameters of the anomaly simulator (spec §2.2 / §8 defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    perlin_scale_exponents: tuple[int, int] = Field(
        (0, 5), description="per-axis Perlin scale 2**s, s drawn independently from this range")
    noise_rotation_deg: float = Field(90.0, ge=0, le=180, description="noise rotated by U(-a, a)")
    threshold_range: tuple[float, float] = Field(
        (0.4, 0.6), description="binarisation threshold t ~ U(lo, hi) (DRAEM uses a fixed 0.5)")
    beta_range: tuple[float, float] = Field((0.0, 0.8), description="blend weight of the image")
    augmentations: list[str] = Field(default_factory=lambda: list(AUGMENTATIONS))
    num_augmentations: int = Field(3, ge=0, description="ops applied to a texture, no repeats")
    texture_weights: dict[str, float] = Field(
        default_factory=lambda: {"fractal": 1.0, "stripes": 1.0, "gabor": 1.0, "field": 1.0,
                                 "normal_crop": 0.5},
        description="relative draw weights of the texture kinds (normal_crop only when a source "
                    "of other normal images is given)")
    clean_prob: float = Field(0.5, ge=0, le=1, description="probability of an unmodified sample")
    max_tries: int = Field(32, ge=1, description="resamples of the noise when the mask is empty")

    @field_validator("augmentations")
    @classmethod
    def _known_augmentations(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in AUGMENTATIONS]
        if bad:
            raise ValueError(f"unknown augmentation(s) {bad}; known: {list(AUGMENTATIONS)}")
        return v

    @field_validator("texture_weights")
    @classmethod
    def _known_textures(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k in v if k not in TEXTURE_KINDS]
        if bad:
            raise ValueError(f"unknown texture kind(s) {bad}; known: {list(TEXTURE_KINDS)}")
        if any(w < 0 for w in v.values()) or not any(w > 0 for k, w in v.items() if k != "normal_crop"):
            raise ValueError("texture weights must be >= 0 with at least one procedural kind > 0")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> "SimulationConfig":
        lo, hi = self.perlin_scale_exponents
        if not 0 <= lo <= hi <= 10:
            raise ValueError("perlin_scale_exponents must satisfy 0 <= lo <= hi <= 10")
        for key in ("threshold_range", "beta_range"):
            a, b = getattr(self, key)
            if not a <= b:
                raise ValueError(f"{key}: lower bound {a} above upper bound {b}")
        if not (0.0 <= self.beta_range[0] and self.beta_range[1] <= 1.0):
            raise ValueError("beta_range must lie in [0, 1]")
        if self.num_augmentations > len(self.augmentations):
            raise ValueError(f"num_augmentations {self.num_augmentations} > the "
                             f"{len(self.augmentations)} augmentations listed")
        return self


@dataclass
class SimulatedSample:
    """One simulator output.

    ``image`` has the input's layout (HxW or HxWxC, float32 [0, 1]); ``mask`` is the float32 HxW
    0/1 anomaly mask P_A (all zero for a clean sample); ``beta`` is None for a clean sample.
    """

    image: np.ndarray
    mask: np.ndarray
    anomalous: bool
    beta: float | None = None
    texture: str | None = None
    ops: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Perlin noise
# ---------------------------------------------------------------------------------------------

def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``res`` lattice periods per axis.

    Values lie roughly in [-1, 1] (the classic output scaled by sqrt(2), as DRAEM does, so that
    the spec's thresholds around 0.5 carve out blobs rather than almost nothing).
    """
    h, w = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0.0, 2.0 * math.pi, (ry + 1, rx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    # pixel centres in lattice units
    y = (np.arange(h, dtype=np.float64) + 0.5) * ry / h
    x = (np.arange(w, dtype=np.float64) + 0.5) * rx / w
    yi = np.minimum(np.floor(y).astype(np.int64), ry - 1)
    xi = np.minimum(np.floor(x).astype(np.int64), rx - 1)
    yf = (y - yi)[:, None]
    xf = (x - xi)[None, :]
    Y0, X0 = yi[:, None], xi[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        return gy[Y0 + dy, X0 + dx] * (yf - dy) + gx[Y0 + dy, X0 + dx] * (xf - dx)

    u, v = _fade(xf), _fade(yf)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return (math.sqrt(2.0) * (top * (1 - v) + bottom * v)).astype(np.float32)


def _rotate(img: np.ndarray, angle_deg: float, scale: float = 1.0, shear_deg: float = 0.0,
            shift: tuple[float, float] = (0.0, 0.0), interp: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Rotate/scale/shear about the image centre with mirrored borders (no empty corners)."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle_deg, scale)
    if shear_deg:
        sh = math.tan(math.radians(shear_deg))
        shear = np.array([[1.0, sh, -sh * h / 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        m = (np.vstack([m, [0.0, 0.0, 1.0]]) @ shear)[:2]
    m[0, 2] += shift[0]
    m[1, 2] += shift[1]
    out = cv2.warpAffine(img, m, (w, h), flags=interp, borderMode=cv2.BORDER_REFLECT_101)
    return out.reshape(img.shape)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, cfg: SimulationConfig,
                valid: np.ndarray | None = None) -> np.ndarray:
    """A binary anomaly mask P_A (float32 0/1): thresholded rotated Perlin noise inside ``valid``.

    The noise is resampled while the mask would be empty; after ``cfg.max_tries`` failures the
    top 2 % of the last noise inside ``valid`` is taken, so a caller always gets a non-empty mask
    unless ``valid`` itself is empty (then the mask is all zero).
    """
    lo, hi = cfg.perlin_scale_exponents
    noise = np.zeros(shape, np.float32)
    vmask = None if valid is None else valid.astype(bool)
    if vmask is not None and not vmask.any():
        return np.zeros(shape, np.float32)
    for _ in range(cfg.max_tries):
        sy = 2 ** int(rng.integers(lo, hi + 1))
        sx = 2 ** int(rng.integers(lo, hi + 1))
        noise = perlin_noise(shape, (sy, sx), rng)
        if cfg.noise_rotation_deg > 0:
            angle = float(rng.uniform(-cfg.noise_rotation_deg, cfg.noise_rotation_deg))
            noise = _rotate(noise, angle)
        t = float(rng.uniform(*cfg.threshold_range))
        mask = noise > t
        if vmask is not None:
            mask &= vmask
        if mask.any():
            return mask.astype(np.float32)
    log.debug("perlin_mask: %d empty draws; using the top 2%% of the noise", cfg.max_tries)
    vals = noise[vmask] if vmask is not None else noise.ravel()
    mask = noise >= np.quantile(vals, 0.98)
    if vmask is not None:
        mask &= vmask
    return mask.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Texture library
# ---------------------------------------------------------------------------------------------

def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 1e-8:
        return np.full_like(a, 0.5, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _colour_ramp(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map a [0, 1] HxW pattern to RGB between two random colours (HxWx3)."""
    c0, c1 = rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 1.0, 3)
    return (c0[None, None, :] + (c1 - c0)[None, None, :] * t[:, :, None]).astype(np.float32)


def _fractal(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    octaves = int(rng.integers(3, 7))
    base = 2 ** int(rng.integers(0, 3))
    persistence = float(rng.uniform(0.4, 0.7))
    total = np.zeros(shape, np.float32)
    amp = 1.0
    for o in range(octaves):
        res = min(base * 2 ** o, max(1, min(shape) // 2))
        total += amp * perlin_noise(shape, (res, res), rng)
        amp *= persistence
    return _normalise(total)


def _stripes(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = float(rng.uniform(0, math.pi))
    cycles = float(rng.uniform(2.0, 32.0))
    phase = float(rng.uniform(0, 2 * math.pi))
    coord = (xx * math.cos(theta) + yy * math.sin(theta)) / max(h, w)
    wave = np.sin(2 * math.pi * cycles * coord + phase)
    profile = int(rng.integers(3))
    if profile == 1:  # square wave with a random duty cycle
        wave = (wave > rng.uniform(-0.5, 0.5)).astype(np.float32)
    elif profile == 2:  # sawtooth
        wave = np.mod(cycles * coord + phase / (2 * math.pi), 1.0)
    pattern = _normalise(wave.astype(np.float32))
    jitter = float(rng.uniform(0.0, 0.3))
    if jitter > 0:
        pattern = np.clip(pattern + jitter * perlin_noise(shape, (8, 8), rng), 0.0, 1.0)
    return pattern.astype(np.float32)


def _gabor(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    total = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        lambd = float(rng.uniform(4.0, 24.0))
        sigma = lambd * float(rng.uniform(0.3, 0.8))
        ksize = int(2 * math.ceil(3 * sigma) + 1)
        kern = cv2.getGaborKernel((ksize, ksize), sigma, float(rng.uniform(0, math.pi)), lambd,
                                  float(rng.uniform(0.3, 1.0)), float(rng.uniform(0, math.pi)),
                                  ktype=cv2.CV_32F)
        white = rng.standard_normal(shape).astype(np.float32)
        total += cv2.filter2D(white, cv2.CV_32F, kern, borderType=cv2.BORDER_REFLECT_101)
    return _normalise(total)


def _field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth random colour field: a coarse random grid upsampled (RGB, HxWx3)."""
    h, w = shape
    gh, gw = int(rng.integers(1, 17)), int(rng.integers(1, 17))
    coarse = rng.uniform(0.0, 1.0, (gh, gw, 3)).astype(np.float32)
    interp = cv2.INTER_CUBIC if rng.random() < 0.5 else cv2.INTER_NEAREST
    out = cv2.resize(coarse, (w, h), interpolation=interp).reshape(h, w, 3)
    grain = float(rng.uniform(0.0, 0.1))
    if grain > 0:
        out = out + grain * rng.standard_normal((h, w, 1)).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    if rgb.ndim == 2:
        rgb = rgb[:, :, None]
    if rgb.shape[2] == channels:
        return rgb.astype(np.float32)
    if channels == 1:
        if rgb.shape[2] == 3:
            grey = rgb[:, :, 0] * 0.299 + rgb[:, :, 1] * 0.587 + rgb[:, :, 2] * 0.114
        else:
            grey = rgb.mean(axis=2)
        return grey[:, :, None].astype(np.float32)
    return np.repeat(rgb[:, :, :1], channels, axis=2).astype(np.float32)


def _fit(img: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random crop (or resize when smaller) of another image to ``shape``."""
    h, w = shape
    a = img if img.ndim == 3 else img[:, :, None]
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    if a.shape[0] < h or a.shape[1] < w:
        a = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
        return a.astype(np.float32)
    y = int(rng.integers(0, a.shape[0] - h + 1))
    x = int(rng.integers(0, a.shape[1] - w + 1))
    return a[y:y + h, x:x + w].astype(np.float32)


def make_texture(kind: str, shape: tuple[int, int], channels: int, rng: np.random.Generator,
                 texture_source: TextureSource | None = None) -> np.ndarray:
    """One texture A of ``kind`` as HxWxC float32 in [0, 1]."""
    if kind == "fractal":
        rgb = _colour_ramp(_fractal(shape, rng), rng)
    elif kind == "stripes":
        rgb = _colour_ramp(_stripes(shape, rng), rng)
    elif kind == "gabor":
        rgb = _colour_ramp(_gabor(shape, rng), rng)
    elif kind == "field":
        rgb = _field(shape, rng)
    elif kind == "normal_crop":
        if texture_source is None:
            raise ValueError("texture kind 'normal_crop' needs a texture_source")
        rgb = _fit(texture_source(rng), shape, rng)
    else:
        raise ValueError(f"unknown texture kind {kind!r}; known: {list(TEXTURE_KINDS)}")
    return _to_channels(rgb, channels)


# ---------------------------------------------------------------------------------------------
# Augmentations (on HxWxC float32 [0, 1])
# ---------------------------------------------------------------------------------------------

_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0  # PIL's SMOOTH filter


def _aug_rotation(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _rotate(a, float(rng.uniform(-45.0, 45.0)))


def _aug_affine(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = a.shape[:2]
    return _rotate(a, 0.0, scale=float(rng.uniform(0.8, 1.2)), shear_deg=float(rng.uniform(-16, 16)),
                   shift=(float(rng.uniform(-0.1, 0.1) * w), float(rng.uniform(-0.1, 0.1) * h)))


def _aug_brightness(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(a * rng.uniform(0.8, 1.2) + rng.uniform(-30.0, 30.0) / 255.0, 0.0, 1.0)


def _aug_sharpness(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # PIL ImageEnhance.Sharpness: interpolate between the smoothed and the original image.
    f = float(rng.uniform(0.0, 2.0))
    smooth = cv2.filter2D(a, -1, _SMOOTH, borderType=cv2.BORDER_REFLECT_101).reshape(a.shape)
    return np.clip(smooth + f * (a - smooth), 0.0, 1.0)


def _aug_equalize(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    q = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = np.stack([cv2.equalizeHist(np.ascontiguousarray(q[:, :, c])) for c in range(a.shape[2])],
                   axis=2)
    return out.astype(np.float32) / 255.0


def _aug_contrast(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.power(np.clip(a, 0.0, 1.0), float(rng.uniform(0.5, 2.0)))


def _aug_saturation(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add to the HSV saturation (±50/255). A grey texture has no saturation: returned as is."""
    if a.shape[2] != 3:
        return a
    hsv = cv2.cvtColor(np.ascontiguousarray(a, dtype=np.float32), cv2.COLOR_RGB2HSV)
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] + rng.uniform(-50.0, 50.0) / 255.0, 0.0, 1.0)
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0.0, 1.0)


_AUG_FUNCS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "rotation": _aug_rotation,
    "affine": _aug_affine,
    "brightness": _aug_brightness,
    "sharpness": _aug_sharpness,
    "equalize": _aug_equalize,
    "contrast": _aug_contrast,
    "saturation": _aug_saturation,
}


def augment_texture(texture: np.ndarray, rng: np.random.Generator, names: list[str],
                    count: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Apply ``count`` of ``names`` chosen without replacement (RandAugment-style, DRAEM's 3).

    A grey texture (one channel) has no saturation: ``saturation`` is left out of its draw, so
    it still gets ``count`` operations that change it (at most as many as remain)."""
    if texture.ndim == 3 and texture.shape[2] != 3:
        names = [n for n in names if n != "saturation"]
        count = min(count, len(names))
    chosen = tuple(str(n) for n in rng.choice(names, size=count, replace=False)) if count else ()
    a = texture
    for name in chosen:
        a = _AUG_FUNCS[name](a, rng).astype(np.float32).reshape(texture.shape)
    return a, chosen


def blend(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """Equation (3-1): ``I (1 - P) + beta I P + (1 - beta) A P`` with P binary.

    Written as a select so pixels outside the mask are bit-identical to the input.
    """
    m = mask[:, :, None] > 0.5 if image.ndim == 3 else mask > 0.5
    mixed = beta * image + (1.0 - beta) * texture
    return np.where(m, mixed, image).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Pre-processing: square pad then resize (spec §2.2 step 3)
# ---------------------------------------------------------------------------------------------

def square_pad_resize(image: np.ndarray, size: int,
                      align: Literal["top", "center"] = "top") -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad ``image`` to a square (aspect kept), resize to ``size``x``size``.

    Returns ``(resized image, valid mask)``; the bool mask marks the pixels that came from the
    image rather than the padding, i.e. the spec's valid region V (144x256 of 256x256 for a
    1440x2560 frame). Small defects survive this better than squashing the frame to a square.
    """
    h, w = image.shape[:2]
    side = max(h, w)
    top = 0 if align == "top" else (side - h) // 2
    left = 0 if align == "top" else (side - w) // 2
    canvas = np.zeros((side, side) + image.shape[2:], image.dtype)
    canvas[top:top + h, left:left + w] = image
    valid = np.zeros((side, side), np.uint8)
    valid[top:top + h, left:left + w] = 1
    out = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_LINEAR)
    if image.ndim == 3 and out.ndim == 2:
        out = out[:, :, None]
    vmask = cv2.resize(valid, (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    return out, vmask


# ---------------------------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------------------------

class AnomalySimulator:
    """Turns a normal image into (simulated anomalous image, anomaly mask).

    Call with an HxW or HxWxC float32 image in [0, 1] and a ``numpy.random.Generator``; optional
    ``valid`` (HxW bool) confines the anomaly, optional ``texture_source(rng)`` returns another
    normal image to crop textures from.
    """

    def __init__(self, cfg: SimulationConfig | None = None):
        self.cfg = cfg or SimulationConfig()

    def _texture_kind(self, rng: np.random.Generator, has_source: bool) -> str:
        items = [(k, w) for k, w in self.cfg.texture_weights.items()
                 if w > 0 and (k != "normal_crop" or has_source)]
        kinds = [k for k, _ in items]
        p = np.array([w for _, w in items], np.float64)
        return str(kinds[int(rng.choice(len(kinds), p=p / p.sum()))])

    def __call__(self, image: np.ndarray, rng: np.random.Generator, valid: np.ndarray | None = None,
                 texture_source: TextureSource | None = None) -> SimulatedSample:
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
            raise ValueError(f"image must be HxW or HxWxC with C in (1, 3), got {image.shape}")
        img = np.asarray(image, np.float32)
        shape = img.shape[:2]
        if valid is not None and valid.shape != shape:
            raise ValueError(f"valid mask shape {valid.shape} does not match image {shape}")
        cfg = self.cfg
        if rng.random() < cfg.clean_prob:
            return SimulatedSample(image=img.copy(), mask=np.zeros(shape, np.float32), anomalous=False)
        mask = perlin_mask(shape, rng, cfg, valid)
        if not mask.any():  # empty valid region: nothing can be simulated
            return SimulatedSample(image=img.copy(), mask=mask, anomalous=False)
        channels = 1 if img.ndim == 2 else img.shape[2]
        kind = self._texture_kind(rng, texture_source is not None)
        texture = make_texture(kind, shape, channels, rng, texture_source)
        texture, ops = augment_texture(texture, rng, cfg.augmentations, cfg.num_augmentations)
        beta = float(rng.uniform(*cfg.beta_range))
        hwc = img if img.ndim == 3 else img[:, :, None]
        out = blend(hwc, texture, mask, beta)
        if img.ndim == 2:
            out = out[:, :, 0]
        return SimulatedSample(image=out, mask=mask, anomalous=True, beta=beta, texture=kind, ops=ops)
