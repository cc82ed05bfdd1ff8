"""Tests for pipeline.data.sources: the in-memory dataset type and every loader."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.data import (
    ArrayDataset,
    PROCEDURAL_DATASETS,
    build_procedural,
    load_digits_dataset,
    load_image_folder,
    load_npz,
    load_source,
    load_torchvision,
)


def _arrays(n: int = 12, shape: tuple[int, ...] = (8, 8, 1), classes: int = 3, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n, *shape), dtype=np.uint8),
        "y_train": np.arange(n, dtype=np.int64) % classes,
        "x_test": rng.integers(0, 256, (n // 2, *shape), dtype=np.uint8),
        "y_test": np.arange(n // 2, dtype=np.int64) % classes,
    }


def _torchvision_usable() -> str | None:
    from pipeline.data import import_torchvision_datasets

    try:
        import_torchvision_datasets()
    except ImportError as exc:
        return f"torchvision cannot be imported here: {exc}"
    return None


# ------------------------------------------------------------------------------- ArrayDataset


def test_array_dataset_normalises_and_validates() -> None:
    a = _arrays(shape=(8, 8))
    ds = ArrayDataset("toy", a["x_train"], a["y_train"].astype(np.int32), a["x_test"], a["y_test"], ["a", "b", "c"])
    assert ds.x_train.shape == (12, 8, 8, 1)
    assert ds.y_train.dtype == np.int64
    assert ds.image_shape == (8, 8, 1)
    assert ds.num_classes == 3
    assert list(ds.splits) == ["train", "test"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "bad/name"}, "contains a slash"),
        ({"x_train": np.zeros((12, 8, 8, 1), np.float32)}, "x_train has dtype float32: expected uint8"),
        ({"x_train": np.zeros((12, 8, 8, 2), np.uint8)}, r"x_train has shape \(12, 8, 8, 2\)"),
        ({"y_train": np.zeros(11, np.int64)}, r"y_train has shape \(11,\): expected \(12,\)"),
        ({"y_train": np.full(12, 3, np.int64)}, r"y_train spans 3\.\.3 but there are 3 class names"),
        ({"y_train": np.zeros(12, np.float64)}, "y_train has dtype float64: expected integer labels"),
        ({"x_test": np.zeros((6, 9, 9, 1), np.uint8)}, r"x_test images are \(9, 9, 1\)"),
        ({"class_names": []}, "class_names is empty"),
    ],
)
def test_array_dataset_rejects_bad_input(change: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {"name": "toy", **_arrays(), "class_names": ["a", "b", "c"]}
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        ArrayDataset(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- npz


def test_load_npz_round_trip(tmp_path: Path) -> None:
    a = _arrays()
    path = tmp_path / "toy.npz"
    np.savez_compressed(path, **a, class_names=np.array(["zero", "one", "two"]))
    ds = load_npz(path)
    assert ds.name == "toy"
    assert ds.source == f"npz:{path}"
    assert ds.class_names == ["zero", "one", "two"]
    for key, value in a.items():
        np.testing.assert_array_equal(getattr(ds, key), value)


def test_load_npz_without_class_names_numbers_them(tmp_path: Path) -> None:
    path = tmp_path / "nameless.npz"
    np.savez(path, **_arrays())
    assert load_npz(path).class_names == ["0", "1", "2"]


def test_load_npz_errors_name_file_and_key(tmp_path: Path) -> None:
    a = _arrays()
    missing = tmp_path / "missing.npz"
    np.savez(missing, x_train=a["x_train"], y_train=a["y_train"])
    with pytest.raises(ValueError, match=rf"{missing}: missing key\(s\) x_test, y_test"):
        load_npz(missing)
    floats = tmp_path / "floats.npz"
    np.savez(floats, **{**a, "x_test": a["x_test"].astype(np.float32)})
    with pytest.raises(ValueError, match=rf"{floats}: key x_test has dtype float32: expected uint8"):
        load_npz(floats)
    labels = tmp_path / "labels.npz"
    np.savez(labels, **{**a, "y_train": a["y_train"][:5]})
    with pytest.raises(ValueError, match=rf"{labels}: key y_train has shape \(5,\): expected \(12,\)"):
        load_npz(labels)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **a, class_names=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=rf"{pickled}: cannot read as .npz without pickles"):
        load_npz(pickled)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=rf"{garbage}"):
        load_npz(garbage)
    with pytest.raises(FileNotFoundError, match="no such .npz file"):
        load_npz(tmp_path / "absent.npz")


def test_load_shared_mnist(shared_datasets: Path) -> None:
    ds = load_npz(shared_datasets / "mnist.npz")
    assert ds.name == "mnist"
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.num_classes == 10


# ---------------------------------------------------------------------------------- digits


def test_digits_scaled_and_split_deterministically() -> None:
    from sklearn.datasets import load_digits

    ds = load_digits_dataset()
    again = load_digits_dataset()
    assert (len(ds.y_train), len(ds.y_test)) == (1438, 359)
    assert ds.image_shape == (8, 8, 1) and ds.class_names == [str(i) for i in range(10)]
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    bunch = load_digits()
    # Stratified: each class keeps round(20%) for test.
    assert np.bincount(ds.y_test).tolist() == np.round(np.bincount(bunch.target) * 0.2).astype(int).tolist()
    # Same images and labels as scikit-learn's loader, 0..16 scaled exactly to 0..255.
    want = np.rint(bunch.images * 255 / 16).astype(np.uint8)[..., None]
    got_x = np.concatenate([ds.x_train, ds.x_test])
    got_y = np.concatenate([ds.y_train, ds.y_test])
    key = lambda x, y: sorted(zip((img.tobytes() for img in x), y.tolist()))  # noqa: E731
    assert key(got_x, got_y) == key(want, bunch.target.astype(np.int64))
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0


# ------------------------------------------------------------------------------ image folders


def _write_folder(root: Path, classes: dict[str, np.ndarray]) -> None:
    for name, images in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img).save(root / name / f"{i:03d}.png")


def test_load_image_folder_grayscale_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cats = rng.integers(0, 256, (5, 10, 12), dtype=np.uint8)
    dogs = rng.integers(0, 256, (5, 10, 12), dtype=np.uint8)
    _write_folder(tmp_path / "pets", {"cat": cats, "dog": dogs})
    ds = load_image_folder(tmp_path / "pets", test_fraction=0.4)
    assert ds.name == "pets" and ds.class_names == ["cat", "dog"]
    assert ds.image_shape == (10, 12, 1)
    assert np.bincount(ds.y_test).tolist() == [2, 2]
    got = {
        arr.tobytes(): int(y)
        for arr, y in zip(np.concatenate([ds.x_train, ds.x_test]), np.concatenate([ds.y_train, ds.y_test]))
    }
    want = {img[..., None].tobytes(): 0 for img in cats} | {img[..., None].tobytes(): 1 for img in dogs}
    assert got == want


def test_load_image_folder_presplit_rgb_and_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for split, n in (("train", 3), ("test", 2)):
        _write_folder(
            tmp_path / "rgb" / split, {c: rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8) for c in ("a", "b")}
        )
    ds = load_image_folder(tmp_path / "rgb", name="rgbset")
    assert (ds.name, ds.image_shape, len(ds.y_train), len(ds.y_test)) == ("rgbset", (16, 16, 3), 6, 4)
    small = load_image_folder(tmp_path / "rgb", image_size=8)
    assert small.image_shape == (8, 8, 3)


def test_load_image_folder_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    _write_folder(tmp_path / "f", {"a": rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)})
    (tmp_path / "f" / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"{tmp_path / 'f' / 'empty'}: class folder has no images"):
        load_image_folder(tmp_path / "f")
    (tmp_path / "f" / "empty").rmdir()
    bad = tmp_path / "f" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=rf"{bad}: unreadable image"):
        load_image_folder(tmp_path / "f")
    bad.unlink()
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(tmp_path / "f" / "a" / "odd.png")
    with pytest.raises(ValueError, match="images differ in size .* pass image_size= to resize them"):
        load_image_folder(tmp_path / "f")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_image_folder(tmp_path / "absent")


# ------------------------------------------------------------------------------ torchvision


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The MNIST idx format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny on-disk MNIST in torchvision's raw layout (root/MNIST/raw/*-ubyte), no download needed."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    _write_idx(raw / "train-images-idx3-ubyte", arrays["x_train"])
    _write_idx(raw / "train-labels-idx1-ubyte", arrays["y_train"])
    _write_idx(raw / "t10k-images-idx3-ubyte", arrays["x_test"])
    _write_idx(raw / "t10k-labels-idx1-ubyte", arrays["y_test"])
    return arrays


def test_load_torchvision_mnist_from_raw_files(tmp_path: Path) -> None:
    reason = _torchvision_usable()
    if reason:
        pytest.skip(reason)
    arrays = write_fake_mnist(tmp_path)
    ds = load_torchvision("MNIST", tmp_path)
    assert ds.name == "mnist" and ds.num_classes == 10
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"].astype(np.int64))
    np.testing.assert_array_equal(ds.x_test[..., 0], arrays["x_test"])
    with pytest.raises(ValueError, match="not found under"):
        load_torchvision("FashionMNIST", tmp_path)


def test_load_torchvision_unknown_class_or_broken_install(tmp_path: Path) -> None:
    reason = _torchvision_usable()
    if reason:
        with pytest.raises(ImportError, match="torchvision could not be imported"):
            load_torchvision("MNIST", tmp_path)
    else:
        with pytest.raises(ValueError, match="torchvision.datasets has no dataset class 'NoSuchSet'"):
            load_torchvision("NoSuchSet", tmp_path)


# ------------------------------------------------------------------------------- procedural


@pytest.mark.parametrize("name", sorted(PROCEDURAL_DATASETS))
def test_procedural_is_deterministic_balanced_and_fast(name: str) -> None:
    start = time.perf_counter()
    ds = build_procedural(name, n_per_class=200, seed=3)
    assert time.perf_counter() - start < 1.5
    again = build_procedural(name, n_per_class=200, seed=3)
    other = build_procedural(name, n_per_class=200, seed=4)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    assert not np.array_equal(ds.x_train, other.x_train)
    assert 6 <= ds.num_classes <= 10
    assert np.bincount(ds.y_train).tolist() == [200] * ds.num_classes
    assert np.bincount(ds.y_test).tolist() == [50] * ds.num_classes
    h, w, c = ds.image_shape
    assert h == w and h in (28, 32) and c in (1, 3)
    assert ds.source == f"procedural:{name}?n=200&seed=3&test=50"
    # Not trivial: pixels vary within each class (noise, jitter) and the classes differ on average.
    means = np.stack([ds.x_train[ds.y_train == k].astype(np.float32).mean(0) for k in range(ds.num_classes)])
    assert all(ds.x_train[ds.y_train == k].std(0).mean() > 5 for k in range(ds.num_classes))
    assert len({m.round(0).tobytes() for m in means}) == ds.num_classes


def _nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray, train: int) -> float:
    centroids = np.stack([features[:train][labels[:train] == k].mean(0) for k in np.unique(labels)])
    dist = ((features[train:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((dist.argmin(1) == labels[train:]).mean())


def test_stripes_and_shapes_need_different_features() -> None:
    # Orientation/frequency is visible in the amplitude spectrum; shape class is not (random
    # colours and positions), which is what makes the two families useful for adaptivity tests.
    stripes = build_procedural("stripes", n_per_class=60, seed=0)
    shapes = build_procedural("shapes", n_per_class=60, seed=0)

    def spectrum(x: np.ndarray) -> np.ndarray:
        gray = x.astype(np.float32).mean(-1)
        return np.abs(np.fft.fft2(gray - gray.mean((1, 2), keepdims=True))).reshape(len(x), -1)

    n = len(stripes.y_train)
    acc_stripes = _nearest_centroid_accuracy(spectrum(stripes.x_train), stripes.y_train, n // 2)
    n = len(shapes.y_train)
    acc_shapes = _nearest_centroid_accuracy(shapes.x_train.reshape(n, -1).astype(np.float32), shapes.y_train, n // 2)
    assert acc_stripes > 0.9
    assert acc_shapes < 0.5


def test_build_procedural_unknown_name() -> None:
    with pytest.raises(
        ValueError, match="unknown procedural dataset 'nope'; known: blobs, glyphs, shapes, stripes, textures"
    ):
        build_procedural("nope")


# -------------------------------------------------------------------------------- dispatch


def test_load_source_dispatches_every_kind(tmp_path: Path) -> None:
    proc = load_source("procedural:blobs?n=10&seed=2&test=3")
    assert (proc.name, len(proc.y_train), len(proc.y_test)) == ("blobs", 80, 24)
    np.testing.assert_array_equal(proc.x_train, build_procedural("blobs", 10, 2, 3).x_train)
    assert load_source("digits").name == "digits"
    np.savez(tmp_path / "toy.npz", **_arrays())
    assert load_source(f"npz:{tmp_path / 'toy.npz'}", name="renamed").name == "renamed"
    _write_folder(tmp_path / "folder", {"a": np.zeros((2, 4, 4), np.uint8), "b": np.ones((2, 4, 4), np.uint8)})
    assert load_source(f"folder:{tmp_path / 'folder'}").class_names == ["a", "b"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nonsense", "cannot parse dataset spec 'nonsense'"),
        ("npz:", "cannot parse dataset spec 'npz:'"),
        ("torchvision:MNIST", "cannot parse dataset spec"),
        ("procedural:stripes?bogus=1", r"unknown option\(s\) \['bogus'\]"),
        ("procedural:stripes?n=abc", "invalid literal"),
        ("procedural:nope", "unknown procedural dataset 'nope'"),
    ],
)
def test_load_source_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_source(spec)


def test_load_source_rejects_bad_name_override() -> None:
    with pytest.raises(ValueError, match=r"dataset name '\.\./evil' contains a slash"):
        load_source("procedural:stripes?n=2", name="../evil")
