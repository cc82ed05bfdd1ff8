"""Deterministic image transforms for derived source datasets (domain shifts of a base dataset).

Every transform is a pure numpy function ``fn(images, rng, **params) -> images`` on uint8
``(N, H, W, C)`` arrays. Randomness comes only from the ``rng`` it is given, which the suite seeds
from the suite seed, the dataset name and the split (never from Python's salted ``hash``), so the
same spec and seed give the same bytes in any process. Shapes are kept; ``colorize`` and
``random_colorize`` turn grey images into RGB.

Each transform declares its parameters with ranges in :data:`TRANSFORMS`; :func:`validate_params`
checks a recipe's parameters against them before anything runs, and :func:`transform_tag` gives the
short piece of a dataset name that a transform contributes (``rot30``, ``blur1.5``).

Changing what a transform computes changes the bytes of every dataset derived with it: bump
:data:`TRANSFORMS_VERSION`, which is part of each derived dataset's fingerprint, so that a re-ingest
rebuilds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

#: 2: warps and blur by scipy.ndimage (a grey level apart from v1's hand-written ones in a few pixels)
TRANSFORMS_VERSION = 2

Images = np.ndarray
TransformFn = Callable[..., Images]


class TransformParamError(ValueError):
    """A transform parameter is unknown, of the wrong type or out of range (``field`` names it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Param:
    """One parameter of a transform.

    Attributes:
        name: the key in the recipe.
        kind: ``"float"``, ``"int"``, ``"color"`` (``[r, g, b]`` in 0..255) or ``"choice"``.
        default: value when the recipe leaves it out.
        lo, hi: inclusive range for numbers.
        choices: accepted values for ``"choice"``.
        short: prefix of the value in the dataset name (``""``: the value alone).
    """

    name: str
    kind: str
    default: Any
    lo: float = 0.0
    hi: float = 0.0
    choices: tuple[str, ...] = ()
    short: str = ""

    def expected(self) -> str:
        if self.kind == "color":
            return "a colour [r, g, b] of three integers in 0..255"
        if self.kind == "choice":
            return f"one of {', '.join(self.choices)}"
        what = "an integer" if self.kind == "int" else "a number"
        return f"{what} in [{self.lo:g}, {self.hi:g}]"

    def check(self, value: Any, field: str) -> Any:
        """The value, normalised (floats as float, colours as a tuple); TransformParamError otherwise."""
        bad = TransformParamError(field, f"{value!r} is not valid: expected {self.expected()}")
        if self.kind == "color":
            if (not isinstance(value, (list, tuple)) or len(value) != 3
                    or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255 for v in value)):
                raise bad
            return tuple(int(v) for v in value)
        if self.kind == "choice":
            if value not in self.choices:
                raise bad
            return str(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind == "int" and not isinstance(value, int)):
            raise bad
        if not (self.lo <= value <= self.hi) or math.isnan(value):
            raise TransformParamError(field, f"{value!r} is out of range: expected {self.expected()}")
        return int(value) if self.kind == "int" else float(value)

    def format(self, value: Any) -> str:
        if self.kind == "color":
            return "".join(f"{v:02x}" for v in value)
        if self.kind == "choice":
            return str(value)
        return f"{value:g}"


@dataclass(frozen=True)
class Transform:
    """A registered transform: its function, parameters and the short name used in dataset names."""

    name: str
    fn: TransformFn
    params: tuple[Param, ...]
    short: str
    doc: str


# ------------------------------------------------------------------------------------ helpers


def _to_uint8(img: np.ndarray) -> Images:
    return np.rint(np.clip(img, 0.0, 255.0)).astype(np.uint8)


def _luminance(x: Images) -> np.ndarray:
    """Grey level in 0..1, (N, H, W, 1) float32; RGB uses the ITU-R 601 weights."""
    xf = x.astype(np.float32) / 255.0
    if x.shape[-1] == 1:
        return xf
    return (xf @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _warp(x: Images, matrices: np.ndarray) -> Images:
    """Bilinear inverse warp about the image centre (scipy.ndimage); pixels mapped from outside become 0.

    ``matrices`` (N, 2, 3) map output pixel coordinates (y, x, 1), centred, to input coordinates.
    """
    n, h, w, c = x.shape
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    out = np.empty(x.shape, np.float32)
    for i, m in enumerate(matrices.astype(np.float64)):
        offset = centre + m[:, 2] - m[:, :2] @ centre  # centred coordinates -> array indices
        for ch in range(c):
            out[i, :, :, ch] = ndimage.affine_transform(x[i, :, :, ch].astype(np.float32), m[:, :2], offset=offset,
                                                        order=1, mode="grid-constant", cval=0.0)
    return _to_uint8(out)


def _separable_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float (N, H, W, C) array along H and W (scipy.ndimage), edges replicated."""
    return ndimage.gaussian_filter(img, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=3.0)


# --------------------------------------------------------------------------------- transforms


def invert(x: Images, rng: np.random.Generator) -> Images:
    """255 - x: dark strokes on a light background."""
    return (255 - x).astype(np.uint8)


def flip(x: Images, rng: np.random.Generator, axis: str = "horizontal") -> Images:
    """Mirror every image left-right (``horizontal``) or top-bottom (``vertical``)."""
    return np.ascontiguousarray(x[:, :, ::-1] if axis == "horizontal" else x[:, ::-1])


def colorize(x: Images, rng: np.random.Generator, fg: tuple[int, int, int] = (255, 255, 255),
             bg: tuple[int, int, int] = (0, 0, 0)) -> Images:
    """RGB output: each pixel mixes ``bg`` and ``fg`` by its grey level (0 -> bg, 255 -> fg)."""
    a = _luminance(x)
    fgv, bgv = np.array(fg, np.float32), np.array(bg, np.float32)
    return _to_uint8(bgv + a * (fgv - bgv))


def random_colorize(x: Images, rng: np.random.Generator, min_contrast: float = 0.4) -> Images:
    """RGB output with a random foreground and background colour per image.

    The two colours differ by at least ``min_contrast`` (0..1) in mean channel value, so strokes stay
    visible.
    """
    n = len(x)
    bg = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    direction = np.where(bg.mean(1, keepdims=True) > 0.5, -1.0, 1.0).astype(np.float32)
    step = rng.uniform(min_contrast, 1.0, (n, 1)).astype(np.float32)
    fg = np.clip(bg + direction * step + rng.uniform(-0.15, 0.15, (n, 3)).astype(np.float32), 0, 1)
    a = _luminance(x)
    return _to_uint8(255.0 * (bg[:, None, None] + a * (fg - bg)[:, None, None]))


def rotate(x: Images, rng: np.random.Generator, degrees: float = 0.0, jitter: float = 0.0) -> Images:
    """Rotate by ``degrees`` (counter-clockwise) plus a uniform per-image jitter in [-jitter, jitter]."""
    n = len(x)
    angle = np.deg2rad(degrees + (rng.uniform(-jitter, jitter, n) if jitter else np.zeros(n)))
    c, s = np.cos(angle), np.sin(angle)
    # Inverse map: output (y, x) -> input rotated the other way.
    m = np.zeros((n, 2, 3), np.float64)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, s, -s, c
    return _warp(x, m)


def affine(x: Images, rng: np.random.Generator, scale: float = 1.0, scale_jitter: float = 0.0, shift: float = 0.0) -> Images:
    """Scale by ``scale`` (x uniform factor in [1 - scale_jitter, 1 + scale_jitter]) and shift by up to
    ``shift`` of the image size in each direction (uniform per image)."""
    n, h, w, _ = x.shape
    factor = scale * (rng.uniform(1 - scale_jitter, 1 + scale_jitter, n) if scale_jitter else np.ones(n))
    offset = rng.uniform(-shift, shift, (n, 2)) * np.array([h, w]) if shift else np.zeros((n, 2))
    m = np.zeros((n, 2, 3), np.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1.0 / factor
    m[:, :, 2] = -offset / factor[:, None]
    return _warp(x, m)


def blur(x: Images, rng: np.random.Generator, sigma: float = 1.0) -> Images:
    """Gaussian blur with standard deviation ``sigma`` pixels."""
    return _to_uint8(_separable_blur(x.astype(np.float32), sigma))


def noise(x: Images, rng: np.random.Generator, sigma: float = 20.0) -> Images:
    """Additive Gaussian pixel noise with standard deviation ``sigma`` (grey levels), clipped."""
    return _to_uint8(x.astype(np.float32) + rng.normal(0.0, sigma, x.shape).astype(np.float32))


def grayscale(x: Images, rng: np.random.Generator) -> Images:
    """Luminance repeated to 3 channels (ITU-R 601): colour photos as a grey camera sees them."""
    return _to_uint8(np.repeat(255.0 * _luminance(x), 3, axis=-1))


def color_shift(x: Images, rng: np.random.Generator, strength: float = 0.3) -> Images:
    """A random gain per channel and image in [1 - strength, 1 + strength] (a white-balance / sensor cast).

    Grey input is repeated to 3 channels first, so the output is always RGB.
    """
    xf = x.astype(np.float32)
    if xf.shape[-1] == 1:
        xf = np.repeat(xf, 3, axis=-1)
    gains = rng.uniform(1.0 - strength, 1.0 + strength, (len(x), 1, 1, 3)).astype(np.float32)
    return _to_uint8(xf * gains)


def low_contrast(x: Images, rng: np.random.Generator, factor: float = 0.4) -> Images:
    """Pull every pixel towards its image's mean grey by ``1 - factor`` (haze, a washed-out scan)."""
    xf = x.astype(np.float32)
    mean = xf.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8(mean + factor * (xf - mean))


TEXTURE_KINDS = ("stripes", "checker", "smooth")


def _texture(kind: str, n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W, 1) float textures in 0..1 with random period, phase and orientation per image."""
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    period = rng.uniform(3.0, 8.0, (n, 1, 1)).astype(np.float32)
    phase = rng.uniform(0.0, 2 * math.pi, (n, 1, 1)).astype(np.float32)
    if kind == "stripes":
        theta = rng.uniform(0.0, math.pi, (n, 1, 1)).astype(np.float32)
        tex = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
    elif kind == "checker":
        tex = ((np.floor((yy + phase) / period) + np.floor((xx + phase) / period)) % 2).astype(np.float32)
    else:  # smooth noise: white noise blurred, rescaled to 0..1 per image
        raw = _separable_blur(rng.uniform(0, 1, (n, h, w, 1)).astype(np.float32), 2.0)[..., 0]
        lo, hi = raw.min((1, 2), keepdims=True), raw.max((1, 2), keepdims=True)
        tex = (raw - lo) / np.maximum(hi - lo, 1e-6)
    return tex[..., None].astype(np.float32)


def texture_background(x: Images, rng: np.random.Generator, kind: str = "stripes", contrast: float = 0.5) -> Images:
    """Blend a random texture into the background: dark pixels take up to ``contrast`` of it, bright
    strokes stay as they are (so apply it before ``invert``/``colorize`` to texture the background)."""
    n, h, w, _ = x.shape
    xf = x.astype(np.float32)
    tex = 255.0 * contrast * _texture(kind, n, h, w, rng)
    return _to_uint8(xf + (1.0 - _luminance(x)) * tex)


def _p(name: str, kind: str, default: Any, lo: float = 0.0, hi: float = 0.0, short: str = "",
       choices: tuple[str, ...] = ()) -> Param:
    return Param(name=name, kind=kind, default=default, lo=lo, hi=hi, short=short, choices=choices)


#: Transforms by name. The order of ``params`` is the order of values in the dataset name.
TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("invert", invert, (), "inv", invert.__doc__ or ""),
        Transform("flip", flip, (_p("axis", "choice", "horizontal", choices=("horizontal", "vertical")),), "flip", flip.__doc__ or ""),
        Transform("colorize", colorize, (_p("fg", "color", (255, 255, 255), short="f"), _p("bg", "color", (0, 0, 0), short="b")),
                  "col", colorize.__doc__ or ""),
        Transform("random_colorize", random_colorize, (_p("min_contrast", "float", 0.4, 0.1, 1.0),), "rcol",
                  random_colorize.__doc__ or ""),
        Transform("rotate", rotate, (_p("degrees", "float", 0.0, -180.0, 180.0), _p("jitter", "float", 0.0, 0.0, 180.0, short="j")),
                  "rot", rotate.__doc__ or ""),
        Transform("affine", affine, (_p("scale", "float", 1.0, 0.5, 2.0, short="s"), _p("scale_jitter", "float", 0.0, 0.0, 0.5, short="sj"),
                                     _p("shift", "float", 0.0, 0.0, 0.4, short="t")), "aff", affine.__doc__ or ""),
        Transform("blur", blur, (_p("sigma", "float", 1.0, 0.3, 4.0),), "blur", blur.__doc__ or ""),
        Transform("noise", noise, (_p("sigma", "float", 20.0, 1.0, 128.0),), "noise", noise.__doc__ or ""),
        Transform("grayscale", grayscale, (), "gray", grayscale.__doc__ or ""),
        Transform("color_shift", color_shift, (_p("strength", "float", 0.3, 0.05, 0.9),), "cshift", color_shift.__doc__ or ""),
        Transform("low_contrast", low_contrast, (_p("factor", "float", 0.4, 0.05, 0.95),), "lowc", low_contrast.__doc__ or ""),
        Transform("texture_background", texture_background,
                  (_p("kind", "choice", "stripes", choices=TEXTURE_KINDS), _p("contrast", "float", 0.5, 0.05, 1.0, short="c")),
                  "tex", texture_background.__doc__ or ""),
    )
}


def get_transform(name: str) -> Transform:
    """The registered transform; KeyError listing the known ones on a miss."""
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise KeyError(f"unknown transform {name!r}; known: {', '.join(sorted(TRANSFORMS))}") from None


def validate_params(name: str, params: dict[str, Any], field: str) -> dict[str, Any]:
    """All parameters of transform ``name`` (defaults filled in), checked; TransformParamError naming
    ``field.<param>`` otherwise. ``name`` must be registered."""
    t = TRANSFORMS[name]
    known = {p.name: p for p in t.params}
    for key in params:
        if key not in known:
            accepted = ", ".join(known) or "none"
            raise TransformParamError(f"{field}.{key}", f"unknown parameter {key!r} of {name}; accepted: {accepted}")
    return {p.name: p.check(params[p.name], f"{field}.{p.name}") if p.name in params else p.default for p in t.params}


def transform_tag(name: str, params: dict[str, Any]) -> str:
    """The transform's piece of a dataset name: its short name, then every non-default value, joined
    by ``_`` (``inv``, ``rot_30``, ``rot_30_j10``, ``tex_checker_c0.8``): readable, and two recipes
    that differ in a parameter differ in their names."""
    t = TRANSFORMS[name]
    return "_".join([t.short, *(p.short + p.format(params[p.name]) for p in t.params if params[p.name] != p.default)])


def apply_transform(name: str, images: Images, rng: np.random.Generator, params: dict[str, Any]) -> Images:
    """Run one transform on uint8 NHWC images (params already validated)."""
    out = TRANSFORMS[name].fn(images, rng, **params)
    assert out.dtype == np.uint8 and out.ndim == 4, f"transform {name} returned {out.dtype} {out.shape}"
    return out
