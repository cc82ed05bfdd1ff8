"""Source datasets in memory: one ``ArrayDataset`` type and loaders for every input STAMP ingests.

Loaders: ``.npz`` archives (the layout of ``../shared/datasets``), scikit-learn's bundled digits,
image folders (one subfolder per class), torchvision datasets already on disk, and deterministic
procedural datasets whose families need different features (orientation/frequency for
``stripes``, geometry for ``shapes``, counting/scale for ``blobs``, texture statistics for
``textures``, stroke layout for ``glyphs``), which makes them useful to test task adaptivity.

:func:`load_source` turns a spec string (``procedural:stripes``, ``digits``, ``npz:/path``,
``folder:/path``, ``torchvision:MNIST:/root``) into an ``ArrayDataset``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import dataclasses
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.catalog import validate_name

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass
class ArrayDataset:
    """A labelled image dataset held in memory.

    Attributes:
        name: dataset name, ``[A-Za-z0-9][A-Za-z0-9._-]*``.
        x_train, x_test: uint8 ``(N, H, W, C)`` with C in {1, 3}; test may hold 0 images.
        y_train, y_test: int64 ``(N,)`` labels in ``0..len(class_names)-1``.
        class_names: one name per class.
        source: the spec it was loaded from (recorded in the catalog).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    source: str = field(default="")

    def __post_init__(self) -> None:
        validate_name(self.name)
        self.class_names = [str(c) for c in self.class_names]
        if not self.class_names:
            raise ValueError(f"dataset {self.name!r}: class_names is empty")
        shape: tuple[int, ...] | None = None
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            x, y = _check_split(self.name, split, x, y, len(self.class_names))
            setattr(self, f"x_{split}", x)
            setattr(self, f"y_{split}", y)
            if shape is None:
                shape = x.shape[1:]
            elif len(x) and x.shape[1:] != shape:
                raise ValueError(
                    f"dataset {self.name!r}: x_test images are {x.shape[1:]} but x_train images are {shape}"
                )
        if len(self.x_train) == 0:
            raise ValueError(f"dataset {self.name!r}: x_train holds no images")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.x_train.shape[1:]
        return int(h), int(w), int(c)

    def content_sha256(self) -> str:
        """sha256 of the pixels, labels and class names of every split (not of the name or source).

        The same images and labels give the same hash whatever they were loaded from, so a model
        registered from this data can be traced to it.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self.class_names).encode())
        for split in ("train", "test"):
            for array in (getattr(self, f"x_{split}"), getattr(self, f"y_{split}")):
                digest.update(f"{split}:{array.dtype.str}:{array.shape}".encode())
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    @property
    def splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{"train": (x, y), "test": (x, y)}``; an empty test split is left out."""
        out = {"train": (self.x_train, self.y_train)}
        if len(self.x_test):
            out["test"] = (self.x_test, self.y_test)
        return out


def _check_split(name: str, split: str, x: Any, y: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype != np.uint8:
        raise ValueError(f"dataset {name!r}: x_{split} has dtype {x.dtype}: expected uint8 pixels 0..255")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"dataset {name!r}: x_{split} has shape {x.shape}: expected (N, H, W, C) with C in {{1, 3}}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"dataset {name!r}: y_{split} has shape {y.shape}: expected ({len(x)},) to match x_{split}")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"dataset {name!r}: y_{split} has dtype {y.dtype}: expected integer labels")
    y = y.astype(np.int64, copy=False)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"dataset {name!r}: y_{split} spans {int(y.min())}..{int(y.max())} but there are "
            f"{num_classes} class names (labels must be 0..{num_classes - 1})"
        )
    return np.ascontiguousarray(x), y


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): per class, a seeded shuffle and the first round(n*f) go to test.

    Kept rather than scikit-learn's ``train_test_split(stratify=...)``: that draws a different split for the
    same seed, which would silently change the sklearn-digits target's test set and with it every published
    digits figure (the benchmark tables name the commands that reproduce them). Tested in test_sources.py.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# -------------------------------------------------------------------------------- file loaders


#: Without class_names, names are derived as "0".."K-1" from the largest label; beyond this K the
#: labels are surely not class ids.
_MAX_DERIVED_CLASSES = 100_000


def load_npz(path: str | os.PathLike[str], name: str | None = None) -> ArrayDataset:
    """Load an archive with ``x_train, y_train, x_test, y_test`` (uint8 NHWC / int) and optional ``class_names``.

    Args:
        path: the ``.npz`` file (loaded with ``allow_pickle=False``).
        name: dataset name; defaults to the file stem.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing key, wrong shape or dtype; the message names the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file")
    ds_name = name or path.stem
    required = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in required if k not in archive.files]
            if missing:
                raise ValueError(
                    f"{path}: missing key(s) {', '.join(missing)}; expected {', '.join(required)} "
                    f"(+ optional class_names), found {', '.join(archive.files) or 'nothing'}"
                )
            arrays = {k: archive[k] for k in required}
            class_names_arr = archive["class_names"] if "class_names" in archive.files else None
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read as .npz without pickles: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable .npz archive: {exc}") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8:
            raise ValueError(f"{path}: key x_{split} has dtype {x.dtype}: expected uint8 pixels 0..255")
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
            raise ValueError(
                f"{path}: key x_{split} has shape {x.shape}: expected (N, H, W) or (N, H, W, C), C in {{1, 3}}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{path}: key y_{split} has shape {y.shape}: expected ({len(x)},)")
        if len(y) and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: key y_{split} has dtype {y.dtype}: expected integer labels")
    if class_names_arr is not None:
        if class_names_arr.ndim != 1:
            raise ValueError(f"{path}: key class_names has shape {class_names_arr.shape}: expected (K,)")
        class_names = [str(c) for c in class_names_arr.tolist()]
    else:
        top = max(int(arrays["y_train"].max(initial=0)), int(arrays["y_test"].max(initial=0)))
        if top >= _MAX_DERIVED_CLASSES:  # one name per id up to the largest label: refuse a giant list
            raise ValueError(
                f"{path}: labels go up to {top} and there is no class_names key; expected labels "
                f"0..K-1 with K <= {_MAX_DERIVED_CLASSES}, or add a class_names key"
            )
        class_names = [str(i) for i in range(top + 1)]
    try:
        return ArrayDataset(
            name=ds_name,
            x_train=arrays["x_train"],
            y_train=arrays["y_train"],
            x_test=arrays["x_test"],
            y_test=arrays["y_test"],
            class_names=class_names,
            source=f"npz:{path}",
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits images (N, 8, 8) in 0..16 and targets, from scikit-learn's bundled CSV.

    Reading the file directly skips importing scikit-learn (~3 s here); the documented
    ``load_digits`` is the fallback should the file ever move.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        csv = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            data = np.loadtxt(csv, delimiter=",", dtype=np.float64)
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_digits_dataset(test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (1797 images), 0..16 scaled to uint8 0..255, stratified split."""
    images, y = _digits_arrays()
    x = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
    return ArrayDataset(
        name="digits",
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
        class_names=[str(c) for c in range(10)],
        source="digits",
    )


def _read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(
    path: str | os.PathLike[str],
    name: str | None = None,
    image_size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ArrayDataset:
    """Load ``root/<class>/*.png|jpg`` (or ``root/train/<class>/...`` and ``root/test/<class>/...``).

    Classes are the sorted subfolder names. Images that are all grayscale load as 1 channel,
    anything else as RGB. Without train/test subfolders a seeded stratified split makes the test set.

    Args:
        path: the root folder.
        name: dataset name; defaults to the folder name.
        image_size: resize every image to this square side (bilinear); required when sizes differ.
        test_fraction: share of each class held out when the folder has no train/test split.
        seed: seed of that split.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: no class folders, an empty class folder, an unreadable image, mixed sizes.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    pre_split = (root / "train").is_dir() and (root / "test").is_dir()
    split_roots = {"train": root / "train", "test": root / "test"} if pre_split else {"all": root}
    class_names = [p.name for p in _class_dirs(split_roots["train" if pre_split else "all"])]
    if not class_names:
        raise ValueError(f"{root}: no class subfolders (expected {root}/<class>/<image>.png)")
    # A pre-split folder may lack a test folder for a class; a class folder without images is an error.
    files = {split: _labelled_files(split_root, class_names, missing_ok=pre_split and split == "test")
             for split, split_root in split_roots.items()}
    loaded = {split: [_read_image(p) for p, _ in entries] for split, entries in files.items()}
    grayscale = all(img.mode in ("L", "1", "I;16", "I") for imgs in loaded.values() for img in imgs)
    pixels = _pixels(root, files, loaded, "L" if grayscale else "RGB", image_size)
    arrays = {split: _stacked(pixels[split], files[split], grayscale) for split in files}
    if pre_split:
        (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    else:
        x, y = arrays["all"]
        train_idx, test_idx = _stratified_split(y, test_fraction, seed)
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    if len(x_test) == 0:
        x_test = np.zeros((0, *x_train.shape[1:]), np.uint8)
    return ArrayDataset(
        name=name or root.name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=class_names,
        source=f"folder:{root}",
    )


def _labelled_files(split_root: Path, class_names: list[str], missing_ok: bool) -> list[tuple[Path, int]]:
    """(image file, label) of every class folder under ``split_root``; ``missing_ok``: a class folder may be absent."""
    entries: list[tuple[Path, int]] = []
    for label, cls in enumerate(class_names):
        folder = split_root / cls
        images = _image_files(folder) if folder.is_dir() else []
        if not images and not (missing_ok and not folder.exists()):
            raise ValueError(f"{folder}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        entries.extend((img, label) for img in images)
    return entries


def _pixels(root: Path, files: dict[str, list[tuple[Path, int]]], loaded: dict[str, list[Image.Image]], mode: str,
            image_size: int | None) -> dict[str, list[np.ndarray]]:
    """Each split's images as uint8 ``(H, W, C)`` arrays in ``mode``, resized to ``image_size`` if given.

    Without ``image_size`` every image (all splits) must have the first one's size.
    """
    pixels: dict[str, list[np.ndarray]] = {}
    first_size: tuple[tuple[int, int], Path] | None = None
    for split, imgs in loaded.items():
        pixels[split] = []
        for (file_path, _), img in zip(files[split], imgs):
            img = img.convert(mode)
            if image_size is not None:
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            elif first_size is None:
                first_size = (img.size, file_path)
            elif img.size != first_size[0]:
                raise ValueError(
                    f"{root}: images differ in size ({first_size[1]} is {first_size[0][0]}x"
                    f"{first_size[0][1]}, {file_path} is {img.size[0]}x{img.size[1]}); "
                    "pass image_size= to resize them"
                )
            arr = np.asarray(img, dtype=np.uint8)
            pixels[split].append(arr[..., None] if arr.ndim == 2 else arr)
    return pixels


def _stacked(pixels: list[np.ndarray], files: list[tuple[Path, int]], grayscale: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one split; an empty split keeps a placeholder image shape."""
    labels = np.array([label for _, label in files], dtype=np.int64)
    shape = pixels[0].shape if pixels else (1, 1, 1 if grayscale else 3)
    stacked = np.stack(pixels) if pixels else np.zeros((0, *shape), np.uint8)
    return stacked, labels


def import_torchvision_datasets() -> Any:
    """Import ``torchvision.datasets``, also when torchvision's compiled ops cannot load.

    PyPI only ships CUDA builds of torchvision 0.28; next to the CPU build of torch its ``_C``
    extension fails to load and ``import torchvision`` then dies registering fake kernels for
    ``torchvision::nms``/``qnms``, ops that were never defined. Declaring those two schemas lets
    the pure-Python dataset classes import; the detection ops stay unusable (we use none).

    Raises:
        ImportError: torchvision is missing or still fails to import.
    """
    try:
        import torchvision.datasets as tvd

        return tvd
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise ImportError(f"torchvision could not be imported: {exc}") from None
    except ImportError as exc:
        raise ImportError(f"torchvision could not be imported: {exc}") from None
    import sys

    import torch

    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]  # drop the half-initialised package from the failed import
    try:
        import torchvision.datasets as tvd
    except Exception as exc:  # noqa: BLE001 - report any remaining import failure as ImportError
        raise ImportError(f"torchvision could not be imported ({type(exc).__name__}: {exc})") from None
    return tvd


def load_torchvision(class_name: str, root: str | os.PathLike[str], name: str | None = None) -> ArrayDataset:
    """Load a torchvision dataset whose files are already under root (``download=False``).

    Works with classes taking ``train=`` (MNIST, FashionMNIST, KMNIST, CIFAR10/100, ...) or
    ``split="train"/"test"`` (SVHN, ...). Arrays are taken from ``.data``/``.targets`` when present,
    otherwise by iterating the dataset.

    Raises:
        ImportError: torchvision cannot be imported.
        ValueError: no such dataset class, or its files are not on disk under root.
    """
    tvd = import_torchvision_datasets()
    cls = getattr(tvd, class_name, None)
    if cls is None or not isinstance(cls, type):
        raise ValueError(f"torchvision.datasets has no dataset class {class_name!r}")
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    class_names: list[str] | None = None
    for split in ("train", "test"):
        try:
            try:
                ds = cls(root=str(root), train=(split == "train"), download=False)
            except TypeError:
                ds = cls(root=str(root), split=split, download=False)
        except RuntimeError as exc:
            raise ValueError(
                f"torchvision {class_name} ({split}) not found under {root}: {exc}; download it first "
                "(this loader never downloads)"
            ) from None
        splits[split] = _torchvision_arrays(ds)
        if class_names is None:
            names = getattr(ds, "classes", None)
            if names:
                class_names = [str(c) for c in names]
    top = max(int(y.max(initial=0)) for _, y in splits.values())
    if class_names is None or len(class_names) <= top:
        class_names = [str(i) for i in range(top + 1)]
    return ArrayDataset(
        name=name or class_name.lower(),
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        class_names=class_names,
        source=f"torchvision:{class_name}:{root}",
    )


def _torchvision_arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None)
    if data is not None and targets is not None:
        x = np.asarray(data)
        if x.dtype == np.uint8 and x.ndim in (3, 4):
            if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
                x = x.transpose(0, 2, 3, 1)  # SVHN stores NCHW
            y = np.asarray(targets).astype(np.int64)
            return (x[..., None] if x.ndim == 3 else x), y
    pixels, labels = [], []
    for i in range(len(ds)):
        img, label = ds[i]
        arr = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img, dtype=np.uint8)
        pixels.append(arr[..., None] if arr.ndim == 2 else arr)
        labels.append(int(label))
    return np.stack(pixels), np.asarray(labels, dtype=np.int64)


# ------------------------------------------------------------------------- procedural datasets

ProceduralBuilder = Callable[..., ArrayDataset]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], shape (1, size, size) each (y down, x right)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return yy[None], xx[None]


def _u(rng: np.random.Generator, lo: float, hi: float, n: int, *extra: int) -> np.ndarray:
    return rng.uniform(lo, hi, size=(n, *extra)).astype(np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _stripes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sinusoidal gratings: class = orientation (4) x spatial frequency (2)."""
    n, size = len(labels), 28
    yy, xx = _grid(size)
    theta = np.deg2rad((labels % 4) * 45.0).astype(np.float32) + np.deg2rad(_u(rng, -8, 8, n))
    freq = np.where(labels // 4 == 0, 2.0, 4.5).astype(np.float32) * _u(rng, 0.85, 1.15, n)
    phase = _u(rng, 0, 2 * math.pi, n)
    contrast = _u(rng, 0.45, 1.0, n)
    proj = xx * np.cos(theta)[:, None, None] + yy * np.sin(theta)[:, None, None]
    wave = np.sin(math.pi * freq[:, None, None] * proj + phase[:, None, None])
    img = 0.5 + 0.5 * contrast[:, None, None] * wave + rng.normal(0, 0.12, (n, size, size))
    return img[..., None]


def _blobs(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blobs: class = blob count (1-4) x blob size (small / large)."""
    n, size, max_blobs = len(labels), 28, 4
    yy, xx = _grid(size)
    count = labels % 4 + 1
    sigma = np.where(labels // 4 == 0, 0.09, 0.2).astype(np.float32) * _u(rng, 0.85, 1.15, n)
    centres = _u(rng, -0.65, 0.65, n, max_blobs, 2)
    amp = _u(rng, 0.6, 1.0, n, max_blobs) * (np.arange(max_blobs)[None] < count[:, None])
    img: np.ndarray = np.zeros((n, size, size), np.float32)
    for k in range(max_blobs):
        d2 = (yy - centres[:, k, 0, None, None]) ** 2 + (xx - centres[:, k, 1, None, None]) ** 2
        img += amp[:, k, None, None] * np.exp(-d2 / (2 * sigma[:, None, None] ** 2))
    img = 0.1 + 0.85 * np.minimum(img, 1.0) + rng.normal(0, 0.08, (n, size, size))
    return img[..., None]


SHAPE_NAMES = ["disk", "square", "triangle", "plus", "ring", "diamond", "frame", "x"]


def _shapes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Filled/outlined geometric shapes in random colours on random backgrounds (RGB 32x32)."""
    n, size = len(labels), 32
    yy, xx = _grid(size)
    cy, cx = _u(rng, -0.25, 0.25, n), _u(rng, -0.25, 0.25, n)
    radius = _u(rng, 0.4, 0.65, n)
    v = (yy - cy[:, None, None]) / radius[:, None, None]
    u = (xx - cx[:, None, None]) / radius[:, None, None]
    r = np.sqrt(u * u + v * v)
    cheb = np.maximum(np.abs(u), np.abs(v))
    masks = [
        r <= 1.0,
        cheb <= 0.8,
        (v <= 0.8) & (np.abs(u) <= (v + 0.95) * 0.55),
        ((np.abs(u) <= 0.25) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.25) & (np.abs(u) <= 0.95)),
        (r >= 0.55) & (r <= 0.98),
        np.abs(u) + np.abs(v) <= 1.0,
        (cheb <= 0.85) & (cheb >= 0.55),
        ((np.abs(u - v) <= 0.3) | (np.abs(u + v) <= 0.3)) & (cheb <= 0.85),
    ]
    stacked = np.stack(masks, axis=1)  # (n, classes, H, W)
    mask = stacked[np.arange(n), labels].astype(np.float32)[..., None]
    bg = _u(rng, 0.0, 1.0, n, 3)
    # Foreground differs from the background by >= 0.35 in every channel (mod 1), so shapes stay visible.
    fg = (bg + 0.5 + _u(rng, -0.15, 0.15, n, 3)) % 1.0
    img = bg[:, None, None, :] * (1 - mask) + fg[:, None, None, :] * mask
    return img + rng.normal(0, 0.06, img.shape)


TEXTURE_NAMES = ["checker", "dots", "white_noise", "smooth_noise", "crosshatch", "rings", "bricks", "spokes"]


def _textures(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture types: checkerboard, dot grid, white noise, smooth noise, crosshatch, rings, bricks, spokes."""
    n, size = len(labels), 32
    pix = np.arange(size, dtype=np.float32)
    py, px = np.meshgrid(pix, pix, indexing="ij")
    py, px = py[None], px[None]
    period = _u(rng, 5.0, 9.0, n)[:, None, None]
    oy, ox = _u(rng, 0, 9, n)[:, None, None], _u(rng, 0, 9, n)[:, None, None]
    gy, gx = (py + oy) / period, (px + ox) / period
    out = np.empty((n, size, size), np.float32)
    # Smooth noise: bicubic upsampling of a coarse random grid.
    coarse = rng.uniform(0, 1, (n, 5, 5)).astype(np.float32)
    bicubic = Image.Resampling.BICUBIC
    smooth = np.asarray([np.asarray(Image.fromarray(c).resize((size, size), bicubic)) for c in coarse])
    cyx = _u(rng, -6, 6, n, 2)
    ry, rx = py - size / 2 - cyx[:, 0, None, None], px - size / 2 - cyx[:, 1, None, None]
    dist = np.sqrt(ry**2 + rx**2)
    angle = np.arctan2(ry, rx)
    candidates = [
        ((np.floor(gy) + np.floor(gx)) % 2).astype(np.float32),
        ((((gy % 1) - 0.5) ** 2 + ((gx % 1) - 0.5) ** 2) < 0.07).astype(np.float32),
        rng.uniform(0, 1, (n, size, size)).astype(np.float32),
        smooth,
        (((gy % 1) < 0.25) | ((gx % 1) < 0.25)).astype(np.float32),
        0.5 + 0.5 * np.sin(2 * math.pi * dist / period),
        (((gy % 1) < 0.2) | ((((gx + 0.5 * (np.floor(gy) % 2)) / 2) % 1) < 0.1)).astype(np.float32),
        0.5 + 0.5 * np.sin(np.round(period / 1.5) * angle + oy),
    ]
    for k, cand in enumerate(candidates):
        sel = labels == k
        out[sel] = cand[sel]
    contrast = _u(rng, 0.5, 1.0, n)[:, None, None]
    img = 0.5 + contrast * (out - 0.5) + rng.normal(0, 0.08, out.shape)
    return img[..., None]


def _glyph_templates(num_classes: int) -> list[np.ndarray]:
    """Fixed stroke sets (segments between 3x3 anchor points), the same for every seed."""
    rng = np.random.default_rng(20240607)
    anchors = np.array([(y, x) for y in (-0.6, 0.0, 0.6) for x in (-0.6, 0.0, 0.6)], np.float32)
    templates: list[np.ndarray] = []
    seen: set[frozenset[tuple[int, int]]] = set()
    while len(templates) < num_classes:
        strokes: set[tuple[int, int]] = set()
        while len(strokes) < 3:
            a, b = sorted(rng.choice(9, size=2, replace=False).tolist())
            strokes.add((a, b))
        key = frozenset(strokes)
        if key in seen:
            continue
        seen.add(key)
        templates.append(np.array([[anchors[a], anchors[b]] for a, b in sorted(strokes)], np.float32))
    return templates


GLYPH_CLASSES = 10


def _glyphs(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stroke glyphs: each class is a fixed set of 3 line segments, drawn with jitter and noise."""
    n, size = len(labels), 28
    yy, xx = _grid(size)
    templates = np.stack(_glyph_templates(GLYPH_CLASSES))  # (classes, strokes, 2 ends, 2 coords)
    segs = templates[labels] * _u(rng, 0.85, 1.1, n)[:, None, None, None]
    segs = segs + _u(rng, -0.1, 0.1, n, 1, 1, 2) + _u(rng, -0.06, 0.06, n, segs.shape[1], 2, 2)
    thickness = _u(rng, 0.08, 0.15, n)[:, None, None]
    img: np.ndarray = np.zeros((n, size, size), np.float32)
    for s in range(segs.shape[1]):
        a, b = segs[:, s, 0], segs[:, s, 1]
        ab = b - a
        denom = np.maximum((ab**2).sum(-1), 1e-6)[:, None, None]
        t = (
            (yy - a[:, 0, None, None]) * ab[:, 0, None, None] + (xx - a[:, 1, None, None]) * ab[:, 1, None, None]
        ) / denom
        t = np.clip(t, 0.0, 1.0)
        dy = yy - (a[:, 0, None, None] + t * ab[:, 0, None, None])
        dx = xx - (a[:, 1, None, None] + t * ab[:, 1, None, None])
        img = np.maximum(img, np.clip(1.5 - np.sqrt(dy**2 + dx**2) / thickness, 0, 1))
    img = 0.05 + 0.9 * img + rng.normal(0, 0.1, img.shape)
    return img[..., None]


_GENERATORS: dict[str, tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], list[str]]] = {
    "stripes": (_stripes, [f"{o}deg_{f}" for f in ("low", "high") for o in (0, 45, 90, 135)]),
    "blobs": (_blobs, [f"{c}_{s}" for s in ("small", "large") for c in ("one", "two", "three", "four")]),
    "shapes": (_shapes, SHAPE_NAMES),
    "textures": (_textures, TEXTURE_NAMES),
    "glyphs": (_glyphs, [f"glyph{i}" for i in range(GLYPH_CLASSES)]),
}


def _make_builder(name: str) -> ProceduralBuilder:
    gen, class_names = _GENERATORS[name]

    def build(n_per_class: int = 200, seed: int = 0, n_test_per_class: int | None = None) -> ArrayDataset:
        if n_per_class < 1:
            raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
        n_test = n_per_class // 4 if n_test_per_class is None else n_test_per_class
        if n_test < 0:
            raise ValueError(f"n_test_per_class must be >= 0, got {n_test}")
        k = len(class_names)
        rng = np.random.default_rng([seed, sum(name.encode())])
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split, per_class in (("train", n_per_class), ("test", n_test)):
            labels = np.repeat(np.arange(k, dtype=np.int64), per_class)
            labels = labels[rng.permutation(len(labels))]
            if len(labels):
                pixels = _to_uint8(gen(labels, rng))
            else:
                probe = _to_uint8(gen(np.zeros(1, np.int64), np.random.default_rng(0)))
                pixels = np.zeros((0, *probe.shape[1:]), np.uint8)
            out[split] = (pixels, labels)
        return ArrayDataset(
            name=name,
            x_train=out["train"][0],
            y_train=out["train"][1],
            x_test=out["test"][0],
            y_test=out["test"][1],
            class_names=list(class_names),
            source=f"procedural:{name}?n={n_per_class}&seed={seed}&test={n_test}",
        )

    build.__name__ = f"build_{name}"
    build.__doc__ = f"Procedural dataset {name!r}: {gen.__doc__}"
    return build


#: Procedural dataset builders by name: ``builder(n_per_class=200, seed=0, n_test_per_class=None)``.
PROCEDURAL_DATASETS: dict[str, ProceduralBuilder] = {name: _make_builder(name) for name in _GENERATORS}


def build_procedural(
    name: str, n_per_class: int = 200, seed: int = 0, n_test_per_class: int | None = None
) -> ArrayDataset:
    """Generate a procedural dataset deterministically (same name, sizes and seed -> same pixels).

    Raises:
        ValueError: unknown name (the message lists the known ones) or bad sizes.
    """
    try:
        builder = PROCEDURAL_DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown procedural dataset {name!r}; known: {', '.join(sorted(PROCEDURAL_DATASETS))}"
        ) from None
    return builder(n_per_class=n_per_class, seed=seed, n_test_per_class=n_test_per_class)


# ------------------------------------------------------------------------------------ dispatch


def load_source(spec: str, name: str | None = None) -> ArrayDataset:
    """Load a dataset from a spec string.

    Specs:
        ``procedural:NAME[?n=200&seed=0&test=50]``, ``digits``, ``npz:PATH``, ``folder:PATH``,
        ``torchvision:CLASS:ROOT`` (e.g. ``torchvision:MNIST:/data``). Any spec takes
        ``?classes=6,7,8,9`` (joined to other options with ``&``): keep only those class ids,
        relabelled ``0..K-1`` in the order given, with their class names; the dataset is named
        ``NAME-c6-7-8-9`` so a class subset never shares a catalog name with its complement.

    Args:
        spec: the spec.
        name: override the dataset name (default: procedural name, ``digits``, file/folder stem,
            lower-cased torchvision class, plus the class-subset suffix).

    Raises:
        ValueError: unknown kind or malformed spec (the message shows the accepted forms).
    """
    base, _, query = spec.partition("?")
    try:
        opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))) if query else {}
    except ValueError as exc:  # urllib's message alone ("bad query field") does not name the spec
        raise ValueError(f"{spec!r}: malformed options after '?' ({exc}); expected key=value pairs joined by '&'") from None
    classes = _parse_classes(spec, opts.pop("classes")) if "classes" in opts else None
    kind, _, rest = base.partition(":")
    forms = "procedural:NAME, digits, npz:PATH, folder:PATH, torchvision:CLASS:ROOT (each optionally ?classes=1,2,...)"
    if kind != "procedural" and opts:
        raise ValueError(f"{spec!r}: unknown option(s) {sorted(opts)}; accepted: classes")
    if kind == "procedural":
        unknown = set(opts) - {"n", "seed", "test"}
        if unknown:
            raise ValueError(f"{spec!r}: unknown option(s) {sorted(unknown)}; accepted: n, seed, test, classes")
        try:
            ds = build_procedural(
                rest,
                n_per_class=int(opts.get("n", 200)),
                seed=int(opts.get("seed", 0)),
                n_test_per_class=int(opts["test"]) if "test" in opts else None,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{spec!r}: {exc}") from None
    elif kind == "digits" and not rest:
        ds = load_digits_dataset()
    elif kind == "npz" and rest:
        ds = load_npz(rest)
    elif kind == "folder" and rest:
        ds = load_image_folder(rest)
    elif kind == "torchvision" and ":" in rest:
        cls_name, _, root = rest.partition(":")
        ds = load_torchvision(cls_name, root)
    else:
        raise ValueError(f"cannot parse dataset spec {spec!r}; expected one of: {forms}")
    if classes is not None:
        ds = select_classes(ds, classes, spec)
    if name is not None and name != ds.name:
        ds = dataclasses.replace(ds, name=name)
    return ds


def _parse_classes(spec: str, raw: str) -> list[int]:
    expected = "a comma-separated list of distinct class ids >= 0, e.g. classes=6,7,8,9"
    try:
        ids = [int(t) for t in raw.split(",")]
    except ValueError:
        raise ValueError(f"{spec!r}: classes={raw!r} is not {expected}") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(f"{spec!r}: classes={raw!r} is not {expected}")
    return ids


def select_classes(ds: ArrayDataset, classes: list[int], spec: str = "") -> ArrayDataset:
    """The images of ``classes`` only, relabelled ``0..K-1`` in the given order, names kept.

    Raises:
        ValueError: a class id the dataset does not have (the message gives its range).
    """
    missing = [c for c in classes if c >= ds.num_classes]
    if missing:
        raise ValueError(
            f"{spec or ds.name!r}: classes {missing} do not exist: dataset {ds.name!r} has class ids "
            f"0..{ds.num_classes - 1}"
        )
    lut = np.full(ds.num_classes, -1, np.int64)
    lut[classes] = np.arange(len(classes))
    arrays = {}
    for split in ("train", "test"):
        y = lut[getattr(ds, f"y_{split}")]
        keep = y >= 0
        arrays[f"x_{split}"], arrays[f"y_{split}"] = getattr(ds, f"x_{split}")[keep], y[keep]
    suffix = "-c" + "-".join(str(c) for c in classes)
    return ArrayDataset(
        name=f"{ds.name}{suffix}"[:128], class_names=[ds.class_names[c] for c in classes],
        source=f"{ds.source}?classes={','.join(map(str, classes))}", **arrays,
    )
