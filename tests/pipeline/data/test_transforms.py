"""Suite transforms: exact results where the math is known, same seed -> same bytes (also in another
process), parameter checks that name the field."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from pipeline.data import TRANSFORMS, TransformParamError, apply_transform
from pipeline.data.transforms import transform_tag, validate_params

#: Parameters that make every random transform actually draw from its rng.
RANDOM_PARAMS = {
    "rotate": {"degrees": 10.0, "jitter": 20.0},
    "affine": {"scale": 0.8, "scale_jitter": 0.2, "shift": 0.2},
    "noise": {"sigma": 30.0},
    "random_colorize": {},
    "texture_background": {"kind": "smooth", "contrast": 0.7},
}


def _images(channels: int = 1, n: int = 12, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(123)
    x = np.zeros((n, size, size, channels), np.uint8)
    x[:, 4:12, 6:10] = rng.integers(150, 256, (n, 8, 4, channels), dtype=np.uint8)  # a bright "stroke"
    return x


def _run(name: str, x: np.ndarray, seed: int) -> np.ndarray:
    params = validate_params(name, RANDOM_PARAMS.get(name, {}), f"t.{name}")
    return apply_transform(name, x, np.random.default_rng(seed), params)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("channels", [1, 3])
def test_same_seed_gives_the_same_bytes(name: str, channels: int) -> None:
    x = _images(channels)
    a, b = _run(name, x, 7), _run(name, x.copy(), 7)
    assert a.dtype == np.uint8 and a.shape[:3] == x.shape[:3]
    assert a.tobytes() == b.tobytes()
    assert np.array_equal(x, _images(channels))  # the input is never modified in place


@pytest.mark.parametrize("name", sorted(RANDOM_PARAMS))
def test_random_transforms_depend_on_the_seed(name: str) -> None:
    x = _images()
    assert _run(name, x, 1).tobytes() != _run(name, x, 2).tobytes()


def test_same_bytes_in_another_process() -> None:
    """Nothing may depend on per-process state (Python's salted str hash, import order)."""
    code = (
        "import hashlib, numpy as np\n"
        "from tests.pipeline.data.test_transforms import _images, _run, TRANSFORMS\n"
        "print({n: hashlib.sha256(_run(n, _images(), 5).tobytes()).hexdigest() for n in sorted(TRANSFORMS)})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    here = {n: hashlib.sha256(_run(n, _images(), 5).tobytes()).hexdigest() for n in sorted(TRANSFORMS)}
    assert proc.stdout.strip() == str(here)


def test_exact_results() -> None:
    x = _images()
    rng = np.random.default_rng(0)
    assert np.array_equal(apply_transform("invert", x, rng, {}), 255 - x)
    assert np.array_equal(apply_transform("flip", x, rng, {"axis": "horizontal"}), x[:, :, ::-1])
    assert np.array_equal(apply_transform("flip", x, rng, {"axis": "vertical"}), x[:, ::-1])
    rot = validate_params("rotate", {"degrees": 90}, "f")
    assert np.array_equal(apply_transform("rotate", x, rng, rot), np.rot90(x, 1, axes=(1, 2)))
    assert np.array_equal(apply_transform("affine", x, rng, validate_params("affine", {}, "f")), x)
    col = apply_transform("colorize", x, rng, validate_params("colorize", {"fg": [255, 0, 10], "bg": [0, 40, 200]}, "f"))
    assert col.shape == (*x.shape[:3], 3)
    assert (col[x[..., 0] == 0] == [0, 40, 200]).all()
    flat = np.full((2, 9, 9, 1), 77, np.uint8)
    assert np.array_equal(apply_transform("blur", flat, rng, {"sigma": 2.0}), flat)  # blur keeps a constant image
    tex = apply_transform("texture_background", x, rng, {"kind": "checker", "contrast": 1.0})
    assert (tex[x == 255] == 255).all() and tex[x == 0].max() > 200  # strokes stay, background textured


def test_scale_half_shrinks_the_stroke() -> None:
    x = _images()
    half = apply_transform("affine", x, np.random.default_rng(0), validate_params("affine", {"scale": 0.5}, "f"))
    assert 0 < (half > 100).sum() < (x > 100).sum() / 2


@pytest.mark.parametrize(
    ("name", "params", "field", "message"),
    [
        ("rotate", {"degrees": 400}, "s.rotate.degrees", "400 is out of range: expected a number in [-180, 180]"),
        ("blur", {"sigma": 0}, "s.blur.sigma", "0 is out of range: expected a number in [0.3, 4]"),
        ("blur", {"sigma": "big"}, "s.blur.sigma", "'big' is not valid: expected a number in [0.3, 4]"),
        ("colorize", {"fg": [256, 0, 0]}, "s.colorize.fg", "[256, 0, 0] is not valid: expected a colour [r, g, b] of three integers in 0..255"),
        ("texture_background", {"kind": "plaid"}, "s.texture_background.kind", "'plaid' is not valid: expected one of stripes, checker, smooth"),
        ("noise", {"amount": 3}, "s.noise.amount", "unknown parameter 'amount' of noise; accepted: sigma"),
    ],
)
def test_bad_parameters_name_the_field(name: str, params: dict, field: str, message: str) -> None:
    with pytest.raises(TransformParamError) as info:
        validate_params(name, params, f"s.{name}")
    assert (info.value.field, str(info.value)) == (field, message)


def test_tags_show_non_default_values() -> None:
    assert transform_tag("invert", {}) == "inv"
    assert transform_tag("rotate", validate_params("rotate", {"degrees": 30, "jitter": 10}, "f")) == "rot_30_j10"
    assert transform_tag("rotate", validate_params("rotate", {"jitter": 10}, "f")) == "rot_j10"
    assert transform_tag("colorize", validate_params("colorize", {"fg": [255, 64, 0]}, "f")) == "col_fff4000"
    assert transform_tag("texture_background", validate_params("texture_background", {"kind": "checker"}, "f")) == "tex_checker"


def test_grayscale_is_luminance_in_three_equal_channels() -> None:
    x = np.zeros((2, 4, 4, 3), np.uint8)
    x[0, ..., 0] = 255  # pure red
    x[1] = 200
    y = apply_transform("grayscale", x, np.random.default_rng(0), validate_params("grayscale", {}, "t"))
    assert y.shape == (2, 4, 4, 3) and (y[..., 0] == y[..., 1]).all() and (y[..., 1] == y[..., 2]).all()
    assert abs(int(y[0, 0, 0, 0]) - round(0.299 * 255)) <= 1 and y[1, 0, 0, 0] == 200


def test_color_shift_scales_each_channel_of_each_image_within_the_strength() -> None:
    x = np.full((50, 2, 2, 1), 100, np.uint8)  # grey input comes out RGB
    y = apply_transform("color_shift", x, np.random.default_rng(0), validate_params("color_shift", {"strength": 0.3}, "t"))
    gains = y[:, 0, 0, :].astype(float) / 100
    assert y.shape == (50, 2, 2, 3) and gains.min() >= 0.69 and gains.max() <= 1.31
    assert gains.std(axis=1).mean() > 0.05  # channels differ within an image: a cast, not a brightness change


def test_low_contrast_shrinks_deviations_from_the_image_mean_by_the_factor() -> None:
    x = _images(3)
    y = apply_transform("low_contrast", x, np.random.default_rng(0), validate_params("low_contrast", {"factor": 0.25}, "t"))
    dev_x = x.astype(float) - x.mean(axis=(1, 2, 3), keepdims=True)
    dev_y = y.astype(float) - x.mean(axis=(1, 2, 3), keepdims=True)
    assert np.abs(dev_y - 0.25 * dev_x).max() <= 1.0  # rounding to uint8 only
