"""Fuzzed bad input (hypothesis): the pruner API, the ingestion readers, shard streaming, catalogs.

Every case must end in one of three ways: a correct result (checked against an oracle, never
trusted blindly), a typed error raised *by our code* with a message that says what was expected,
or a skip that is counted. A raw exception from inside torch, numpy, PIL or tarfile is a failure,
and so is a result that differs from the input.

Runs are derandomized (the same examples every time, so CI cannot flake) and bounded with
``max_examples``; the counts are in each test's ``settings``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _reliability_helpers import raised_by_our_code, raised_from
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data import (
    ArrayDataset,
    Catalog,
    DataQualityError,
    encode_png,
    ingest_dataset,
    iter_samples,
    load_image_folder,
    load_npz,
    load_source,
)
from stamp_core import PruneSpec, StampPruner, prepare_images
from stamp_core.backbones import MIN_IMAGE_SIZE

pytestmark = pytest.mark.reliability

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,  # 2 shared cores: wall time per example is noise; max_examples bounds the run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
#: Tallies per test, printed at the end of the module (the report's table comes from them).
TALLY: dict[str, dict[str, int]] = {}


def _count(test: str, outcome: str) -> None:
    TALLY.setdefault(test, {}).setdefault(outcome, 0)
    TALLY[test][outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def _print_tally() -> Any:
    yield
    for test, outcomes in sorted(TALLY.items()):
        print(f"\n[fuzz] {test}: {sum(outcomes.values())} cases: " + ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())))


def _assert_ours(exc: BaseException, types: tuple[type[BaseException], ...] = (ValueError,)) -> None:
    """The error is of an expected type, raised by stamp_core/pipeline, with a readable message."""
    assert isinstance(exc, types), f"{type(exc).__name__} from {raised_from(exc)}: {exc}"
    assert raised_by_our_code(exc), f"{type(exc).__name__} raised inside a library ({raised_from(exc)}): {exc}"
    message = str(exc)
    assert 10 < len(message) < 2000 and "Traceback" not in message, message


# ============================================================================ StampPruner.generate

_DTYPES = [np.float32, np.float64, np.float16, np.uint8, np.int64, np.bool_, np.complex64]


@pytest.fixture(scope="module")
def pruner() -> StampPruner:
    torch.manual_seed(0)
    return StampPruner.create("small_cnn", num_classes=4, image_size=32, backbone_kwargs={"width": 8},
                              embed_dim=16, hidden_dim=16, num_inducing=4, max_support=64).eval()


@st.composite
def _pruner_inputs(draw: st.DrawFn) -> tuple[Any, Any, Any]:
    shape_kind = draw(st.sampled_from(["ok"] * 8 + ["ndim", "channels", "small", "empty", "huge", "not_array"]))
    n = draw(st.integers(1, 12))
    h = w = draw(st.sampled_from([28, 32, 33]))
    shape: tuple[int, ...] = (n, 3, h, w)
    if shape_kind == "ndim":
        shape = draw(st.sampled_from([(), (n,), (n, h, w), (n, 3, h, w, 1), (3, h, w)]))
    elif shape_kind == "channels":
        shape = (n, draw(st.sampled_from([0, 1, 2, 4])), h, w)
    elif shape_kind == "small":
        shape = (n, 3, draw(st.sampled_from([0, 1, 7, 27])), w)
    elif shape_kind == "empty":
        shape = (0, 3, h, w)
    elif shape_kind == "huge":
        shape = (draw(st.integers(65, 300)), 3, 28, 28)  # more than max_support: a subset is read
    dtype = draw(st.sampled_from(_DTYPES)) if draw(st.integers(0, 3)) == 0 else np.float32
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    images: Any = (rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e4]))).astype(dtype)
    poison = draw(st.sampled_from(["none", "none", "none", "none", "nan", "inf", "-inf"]))
    if poison != "none" and images.size and np.issubdtype(images.dtype, np.floating):
        images.flat[int(rng.integers(images.size))] = float(poison)
    if shape_kind == "not_array":
        images = draw(st.sampled_from([None, "images", [[1.0, 2.0]], 3.5, {"x": 1}]))
    count = shape[0] if shape else 0
    label_kind = draw(st.sampled_from(["none", "none", "ok", "ok", "ok", "ok", "huge_ids", "negative", "length", "float",
                                       "bool", "2d", "uint", "list"]))
    labels: Any = None
    if label_kind == "ok":
        labels = rng.integers(0, 4, count)
    elif label_kind == "huge_ids":
        labels = rng.integers(0, 2**40, count)
    elif label_kind == "negative":
        labels = -rng.integers(1, 5, count)
    elif label_kind == "length":
        labels = rng.integers(0, 4, count + draw(st.sampled_from([-1, 1, 5])))
    elif label_kind == "float":
        labels = rng.random(count)
    elif label_kind == "bool":
        labels = rng.random(count) > 0.5
    elif label_kind == "2d":
        labels = rng.integers(0, 4, (count, 2))
    elif label_kind == "uint":
        labels = rng.integers(0, 4, count).astype(draw(st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64])))
    elif label_kind == "list":
        labels = [int(v) for v in rng.integers(0, 4, count)]
    ratio = draw(st.one_of(
        st.floats(0.05, 1.0),
        st.floats(0.05, 1.0),
        st.sampled_from([0.0, -0.3, 1.0000001, 2.0, math.nan, math.inf, -math.inf, 1e-9, "0.4", "abc", None, [0.3]]),
    ))
    return images, labels, ratio


def _expected_valid(images: Any, labels: Any, ratio: Any) -> bool:
    """An independent statement of the generate contract (not a copy of its code)."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[0] == 0:
        return False
    if images.dtype.kind != "f" or images.shape[1] != 3 or min(images.shape[2:]) < MIN_IMAGE_SIZE:
        return False
    if not np.isfinite(images).all():
        return False
    if labels is not None:
        y = np.asarray(labels)
        if y.ndim != 1 or len(y) != len(images) or y.dtype.kind not in "iu" or (y < 0).any():
            return False
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        return False
    return math.isfinite(r) and 0.0 < r <= 1.0


@settings(FUZZ, max_examples=120)
@given(case=_pruner_inputs())
def test_generate_returns_a_spec_within_budget_or_a_clear_error(pruner: StampPruner, case: tuple[Any, Any, Any]) -> None:
    images, labels, ratio = case
    valid = _expected_valid(images, labels, ratio)
    try:
        spec = pruner.generate(images, labels, macs_ratio=ratio)
    except ValueError as exc:
        _assert_ours(exc)
        if valid:
            # The one refusal a valid input may get: a budget below one channel per layer.
            assert "below the smallest reachable ratio" in str(exc), str(exc)
            _count("generate", "refused: budget below floor")
        else:
            _count("generate", "typed error")
        return
    except Exception as exc:  # noqa: BLE001 - anything else is the defect this test hunts
        pytest.fail(f"{type(exc).__name__} from {raised_from(exc)} for {type(images).__name__} "
                    f"{getattr(images, 'shape', '')} {getattr(images, 'dtype', '')}: {exc}")
    assert valid, f"accepted an input outside the contract: {getattr(images, 'shape', images)}, labels {labels!r:.80}, ratio {ratio!r}"
    assert isinstance(spec, PruneSpec)
    assert spec.macs_pruned <= float(ratio) * spec.macs_full + 1e-9
    assert set(spec.kept) == set(pruner.group_names)
    assert all(1 <= len(k) <= spec.group_sizes[g] for g, k in spec.kept.items())
    _count("generate", "spec within budget")


@settings(FUZZ, max_examples=60)
@given(
    shape=st.sampled_from([(), (0,), (5,), (2, 8, 8), (2, 8, 8, 1), (2, 8, 8, 3), (2, 3, 8, 8), (2, 8, 8, 2), (2, 5, 8, 8), (0, 8, 8, 3), (1, 2, 3, 4, 5)]),
    dtype=st.sampled_from([np.uint8, np.float32, np.float64, np.int32, np.bool_, np.complex64]),
    scale=st.sampled_from([1.0, 255.0, -1.0]),
    poison=st.sampled_from([None, math.nan, math.inf]),
    size=st.sampled_from([8, 28, 32]),
)
def test_prepare_images_returns_scaled_tensors_or_a_clear_error(
    shape: tuple[int, ...], dtype: Any, scale: float, poison: float | None, size: int
) -> None:
    rng = np.random.default_rng(0)
    x = (rng.random(shape) * scale).astype(dtype) if dtype != np.uint8 else rng.integers(0, 256, shape, dtype=np.uint8)
    if poison is not None and x.size and x.dtype.kind == "f":
        x.flat[0] = poison
    try:
        out = prepare_images(x, size)
    except ValueError as exc:
        _assert_ours(exc)
        _count("prepare_images", "typed error")
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{type(exc).__name__} from {raised_from(exc)} for {shape} {np.dtype(dtype)}: {exc}")
    assert out.dtype == torch.float32 and out.shape == (shape[0], 3, size, size)
    assert torch.isfinite(out).all() and -1.0 - 1e-5 <= float(out.min()) and float(out.max()) <= 1.0 + 1e-5
    assert x.dtype.kind in "uf"  # bool, int and complex pixels must be refused
    _count("prepare_images", "prepared")


# ============================================================================ npz reader


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "class_names")


@st.composite
def _npz_contents(draw: st.DrawFn) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n_train, n_test = draw(st.integers(0, 6)), draw(st.integers(0, 4))
    k = draw(st.integers(1, 4))
    good = {
        "x_train": rng.integers(0, 256, (n_train, 6, 6, 1), dtype=np.uint8),
        "y_train": rng.integers(0, k, n_train),
        "x_test": rng.integers(0, 256, (n_test, 6, 6, 1), dtype=np.uint8),
        "y_test": rng.integers(0, k, n_test),
        "class_names": np.array([f"c{i}" for i in range(k)]),
    }
    for key in draw(st.lists(st.sampled_from(_NPZ_KEYS), max_size=3, unique=True)):
        change = draw(st.sampled_from(["drop", "dtype", "shape", "labels", "strings"]))
        if change == "drop":
            good.pop(key)
        elif change == "dtype" and key != "class_names":
            good[key] = good[key].astype(draw(st.sampled_from([np.float32, np.int16, np.bool_, np.complex64])))
        elif change == "dtype":
            good[key] = np.arange(len(good[key]), dtype=np.float32)
        elif change == "shape":
            good[key] = rng.integers(0, 4, draw(st.sampled_from([(), (3,), (2, 2), (n_train, 6, 6, 2), (n_train + 1,), (2, 3, 4, 5, 6)]))).astype(np.uint8)
        elif change == "labels":
            good[key] = np.array(draw(st.sampled_from([[-1], [10**12], [2**63 - 1], [7, -7]])) * max(1, len(good[key])))[: len(good[key])]
        else:
            good[key] = np.array(["x"] * max(1, len(good[key]) if good[key].ndim else 1))
    if draw(st.booleans()):
        good["extra"] = rng.random(3)
    return good


@settings(FUZZ, max_examples=60)
@given(contents=_npz_contents(), corrupt=st.sampled_from([None, None, None, "truncate", "random", "empty", "pickle"]))
def test_npz_reader_is_exact_or_a_clear_error(contents: dict[str, np.ndarray], corrupt: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        np.savez(path, **contents)
        if corrupt == "truncate":
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        elif corrupt == "random":
            path.write_bytes(np.random.default_rng(len(contents)).bytes(2000))
        elif corrupt == "empty":
            path.write_bytes(b"")
        elif corrupt == "pickle":
            np.savez(path, **{**contents, "x_train": np.array([{"a": 1}, None], dtype=object)})
        try:
            ds = load_npz(path)
        except ValueError as exc:
            _assert_ours(exc)
            assert str(path) in str(exc), str(exc)
            _count("npz", "typed error")
            return
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{type(exc).__name__} from {raised_from(exc)}: {exc}")
    assert corrupt is None
    # Accepted: what came out is exactly what went in.
    for split in ("train", "test"):
        x, y = contents[f"x_{split}"], contents[f"y_{split}"]
        got_x, got_y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        np.testing.assert_array_equal(got_x.reshape(x.shape), x)
        np.testing.assert_array_equal(got_y, y)
        assert got_x.dtype == np.uint8
        assert ((got_y >= 0) & (got_y < ds.num_classes)).all()
    _count("npz", "exact round trip")


def test_npz_without_class_names_and_huge_labels_is_refused_not_a_memory_blowup(tmp_path: Path) -> None:
    """Class names are derived from the largest label: 10**12 must not build 10**12 names."""
    path = tmp_path / "huge.npz"
    x = np.zeros((2, 6, 6, 1), np.uint8)
    np.savez(path, x_train=x, y_train=np.array([0, 10**12]), x_test=x[:0], y_test=np.array([], np.int64))
    with pytest.raises(ValueError) as info:
        load_npz(path)
    _assert_ours(info.value)
    assert f"{path}: labels go up to 1000000000000" in str(info.value)
    assert "add a class_names key" in str(info.value)


# ============================================================================ image folders


def _png_bytes(size: int, mode: str, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side: int = 100_000) -> bytes:
    """A PNG header claiming a huge image (a decompression bomb) followed by almost no data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


_FILE_KINDS = ["png", "png", "png", "truncated_png", "text_as_png", "random_as_jpg", "empty_png", "notes_txt", "bomb_png", "other_size"]


@settings(FUZZ, max_examples=40)
@given(
    classes=st.lists(st.lists(st.sampled_from(_FILE_KINDS), max_size=4), max_size=3),
    stray_file=st.booleans(),
)
def test_image_folder_reader_is_exact_or_a_clear_error(classes: list[list[str]], stray_file: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imgs"
        root.mkdir()
        if stray_file:
            (root / "README.txt").write_text("not a class")
        expected: dict[str, list[bytes]] = {}
        sizes: set[int] = set()
        broken = False
        for c, kinds in enumerate(classes):
            folder = root / f"class{c}"
            folder.mkdir()
            expected[folder.name] = []
            for i, kind in enumerate(kinds):
                good = _png_bytes(8, "L", seed=c * 10 + i)
                name, data = f"{i}.png", good
                if kind == "truncated_png":
                    data, broken = good[: len(good) // 2], True
                elif kind == "text_as_png":
                    data, broken = b"definitely not an image\n", True
                elif kind == "random_as_jpg":
                    name, data, broken = f"{i}.jpg", np.random.default_rng(i).bytes(300), True
                elif kind == "empty_png":
                    data, broken = b"", True
                elif kind == "notes_txt":
                    name, data = f"{i}.txt", b"ignored: not an image extension"
                elif kind == "bomb_png":
                    data, broken = _bomb_png(), True
                elif kind == "other_size":
                    data = _png_bytes(9, "L", seed=i)  # fine alone; mixed with 8x8 needs image_size=
                (folder / name).write_bytes(data)
                if kind in ("png", "other_size"):
                    expected[folder.name].append(data)
                    sizes.add(9 if kind == "other_size" else 8)
        try:
            ds = load_image_folder(root)
        except (ValueError, FileNotFoundError) as exc:
            _assert_ours(exc, (ValueError, FileNotFoundError))
            assert str(root) in str(exc), str(exc)
            _count("image folder", "typed error")
            return
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{type(exc).__name__} from {raised_from(exc)}: {exc}")
        assert not broken, "a broken image was accepted"
        assert len(sizes) == 1, "images of different sizes were accepted without image_size="
        assert all(expected.values()) and expected, "an empty class folder was accepted"
        # Every image arrived exactly once with its folder's label.
        total = sum(len(v) for v in expected.values())
        assert len(ds.x_train) + len(ds.x_test) == total
        want = sorted((np.asarray(Image.open(io.BytesIO(b))).tobytes(), label)
                      for label, name in enumerate(sorted(expected)) for b in expected[name])
        got = sorted((x[..., 0].tobytes(), int(y)) for xs, ys in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test))
                     for x, y in zip(xs, ys))
        assert got == want
    _count("image folder", "exact")


@settings(FUZZ, max_examples=40)
@given(spec=st.one_of(
    st.text(max_size=40),
    st.sampled_from(["npz:", "npz:/nonexistent.npz", "folder:", "folder:/nonexistent", "procedural:", "procedural:nope",
                     "procedural:blobs?n=-1", "procedural:blobs?n=abc", "procedural:blobs?evil=1", "torchvision:",
                     "torchvision:NoSuch:/tmp", "digits?n=3", "s3://bucket/x", "../../etc/passwd", "\x00"]),
))
def test_source_specs_parse_or_fail_clearly(spec: str) -> None:
    try:
        ds = load_source(spec)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        _assert_ours(exc, (ValueError, FileNotFoundError, ImportError))
        _count("source spec", "typed error")
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{spec!r}: {type(exc).__name__} from {raised_from(exc)}: {exc}")
    assert isinstance(ds, ArrayDataset) and len(ds.x_train) > 0
    _count("source spec", "loaded")


# ============================================================================ shard streaming


@pytest.fixture(scope="module")
def shard_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ArrayDataset]:
    """A local data root with one dataset of 3 train shards (12 samples each) and its source arrays."""
    root = tmp_path_factory.mktemp("fuzz-shards")
    ds = ArrayDataset("fz", *_arrays(36, 6), class_names=["a", "b", "c"])
    ingest_dataset(ds, str(root / "data"), shard_size=12, progress=False)
    return root / "data", ds


def _arrays(n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.integers(0, 256, (n_train, 8, 8, 1), dtype=np.uint8), np.arange(n_train) % 3,
            rng.integers(0, 256, (n_test, 8, 8, 1), dtype=np.uint8), np.arange(n_test) % 3)


def _rewrite(path: Path, edit: dict[str, bytes | None]) -> bool:
    """Replace (bytes) or drop (None) members; False when an earlier damage left no tar to edit."""
    try:
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError, OSError):
        return False
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name in edit:
                if edit[member.name] is None:
                    continue
                data = edit[member.name]  # type: ignore[assignment]
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return True


_BAD_CLS = [b"", b"x", b"-1", b"3", b"99999999999999999999", b"1.5", b" 2 ", b"\xff\xfe", b"0x1", "\u0661".encode()]


@st.composite
def _shard_damage(draw: st.DrawFn) -> tuple[str, int, Any]:
    kind = draw(st.sampled_from(["truncate", "random", "flip", "bad_png", "bad_cls", "drop_member", "wrong_hash", "none"]))
    shard = draw(st.integers(0, 2))
    if kind == "truncate":
        return kind, shard, draw(st.floats(0.0, 0.999))
    if kind == "flip":
        return kind, shard, draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=4))
    if kind == "bad_png":
        return kind, shard, (draw(st.integers(0, 11)), draw(st.sampled_from(["random", "truncated", "empty", "wrong_size", "rgb"])))
    if kind == "bad_cls":
        return kind, shard, (draw(st.integers(0, 11)), draw(st.sampled_from(_BAD_CLS)))
    if kind == "drop_member":
        return kind, shard, (draw(st.integers(0, 11)), draw(st.sampled_from(["png", "cls"])))
    return kind, shard, draw(st.integers(0, 2**16))


@settings(FUZZ, max_examples=80)
@given(damage=st.lists(_shard_damage(), min_size=1, max_size=3), verify=st.booleans())
def test_streaming_damaged_shards_is_exact_or_counted(shard_store: tuple[Path, ArrayDataset], damage: list[tuple[str, int, Any]], verify: bool) -> None:
    src, ds = shard_store
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(src, root)
        catalog_url = str(root / "catalog.json")
        # The copy's catalog points at the copy (shard URLs are absolute paths).
        text = (src / "catalog.json").read_text().replace(str(src), str(root))
        catalog = json.loads(text)
        shards = catalog["datasets"]["fz"]["splits"]["train"]["shards"]
        changes_content = False
        for kind, index, arg in damage:
            path = Path(shards[index]["url"])
            first = index * 12
            if kind == "truncate":
                data = path.read_bytes()
                path.write_bytes(data[: int(len(data) * arg)])
            elif kind == "random":
                path.write_bytes(np.random.default_rng(arg).bytes(int(np.random.default_rng(arg).integers(0, 20000))))
            elif kind == "flip":
                data = bytearray(path.read_bytes())
                for pos in arg if data else ():
                    data[pos % len(data)] ^= 0xFF
                path.write_bytes(bytes(data))
                changes_content = True
            elif kind == "bad_png":
                i, how = arg
                good = encode_png(ds.x_train[first + i])
                bad = {"random": np.random.default_rng(i).bytes(200), "truncated": good[:20], "empty": b"",
                       "wrong_size": _png_bytes(9, "L", i), "rgb": _png_bytes(8, "RGB", i)}[how]
                # An RGB image of the right size is a valid image: it is converted, not skipped.
                changes_content = (_rewrite(path, {f"{first + i:09d}.png": bad}) and how == "rgb") or changes_content
            elif kind == "bad_cls":
                i, value = arg
                changed = _rewrite(path, {f"{first + i:09d}.cls": value})
                changes_content = (changed and value.strip() in (b"0", b"1", b"2")) or changes_content
            elif kind == "drop_member":
                i, ext = arg
                _rewrite(path, {f"{first + i:09d}.{ext}": None})
            elif kind == "wrong_hash":
                shards[index]["sha256"] = f"{arg:064x}"
        (root / "catalog.json").write_text(json.dumps(catalog))
        stream = iter_samples(catalog_url, "fz", "train", verify_sha256=verify, max_bad_fraction=1.0)
        samples = []
        try:
            for sample in stream:
                samples.append(sample)
        except DataQualityError as exc:
            _assert_ours(exc, (DataQualityError,))
            assert "every sample unusable" in str(exc) and stream.stats["samples_ok"] == 0
            _count("shard stream", "DataQualityError (nothing usable)")
            return
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{damage}: {type(exc).__name__} from {raised_from(exc)}: {exc}")
    # Nothing is silently wrong: every delivered sample is an original one...
    if verify or not changes_content:
        for s in samples:
            i = int(s.key.split("/")[1])
            np.testing.assert_array_equal(s.image, ds.x_train[i])
            assert s.label == ds.y_train[i]
    # ... and nothing is silently lost: every promised sample was delivered or counted as unusable.
    assert stream.stats["samples_ok"] == len(samples)
    assert 36 <= len(samples) + stream.bad_count <= 36 + 3 * len(damage), (stream.stats, stream.bad_count)
    _count("shard stream", "exact + counted skips" if stream.bad_count else "exact")


# ============================================================================ catalog documents


def _valid_catalog_dict(root: str = "s3://bucket/datasets") -> dict[str, Any]:
    return {
        "schema_version": 1,
        "datasets": {
            "mnist": {
                "name": "mnist", "num_classes": 2, "class_names": ["a", "b"], "image_shape": [28, 28, 1],
                "created_at": "2024-01-01T00:00:00+00:00", "source": "npz:/x.npz",
                "splits": {"train": {"samples": 20, "shards": [
                    {"url": f"{root}/mnist/train-000000.tar", "sha256": "a" * 64, "samples": 10},
                    {"url": f"{root}/mnist/train-000001.tar", "sha256": "b" * 64, "samples": 10},
                ]}},
            },
        },
    }


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
_HOSTILE = st.sampled_from([
    "../../etc/passwd", "/etc/passwd", "s3://other-bucket/secret.tar", "s3://bucket/datasets/../x/train-000000.tar",
    "mnist/../../x", "a b", "", ".hidden", "x" * 200, "s3://bucket/datasets/other/train-000000.tar", "file:///etc/shadow",
    "28", "281", "ab", -1, 0, 1.5, True, [28, 28], ["a"], {"k": "v"},
])


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_catalog_documents_load_exactly_or_fail_clearly(data: st.DataObject) -> None:
    doc = _valid_catalog_dict()
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        action = data.draw(st.sampled_from(["replace", "replace", "hostile", "delete", "rename_key"]))
        if action == "delete":
            del parent[last]
        elif action == "rename_key" and isinstance(parent, dict):
            parent[data.draw(_HOSTILE.filter(lambda v: isinstance(v, str)))] = parent.pop(last)
        else:
            parent[last] = data.draw(_HOSTILE if action == "hostile" else _JSON)
    text = json.dumps(doc)
    try:
        catalog = Catalog.from_json(text, where="fuzzed catalog")
    except ValueError as exc:
        _assert_ours(exc)
        assert "fuzzed catalog" in str(exc), str(exc)
        _count("catalog document", "typed error")
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{type(exc).__name__} from {raised_from(exc)} for {text[:300]}: {exc}")
    # Accepted: the document is reproduced exactly (nothing coerced, dropped or invented) ...
    assert json.loads(catalog.to_json()) == json.loads(text)
    # ... and it describes only well-formed data.
    for name in catalog.names():
        entry = catalog.get(name)
        assert all(isinstance(c, str) for c in entry.class_names) and len(entry.class_names) == entry.num_classes
        for split, info in entry.splits.items():
            for shard in info.shards:
                assert ".." not in shard.url.split("/") and shard.url.endswith(".tar")
                assert f"/{name}/{split}-" in shard.url
    _count("catalog document", "accepted, round trip exact")


def test_catalog_with_wrong_hashes_refuses_every_tampered_shard(shard_store: tuple[Path, ArrayDataset], tmp_path: Path) -> None:
    src, ds = shard_store
    root = tmp_path / "data"
    shutil.copytree(src, root)
    doc = json.loads((src / "catalog.json").read_text().replace(str(src), str(root)))
    for shard in doc["datasets"]["fz"]["splits"]["train"]["shards"]:
        shard["sha256"] = "0" * 64
    (root / "catalog.json").write_text(json.dumps(doc))
    with pytest.raises(DataQualityError) as info:
        list(iter_samples(str(root / "catalog.json"), "fz", "train", verify_sha256=True))
    message = str(info.value)
    assert "'fz' split 'train': 36 of 36 samples unusable" in message
    for i in range(3):
        assert f"train-{i:06d}.tar (unreadable: sha256 " in message
    _assert_ours(info.value, (DataQualityError,))
