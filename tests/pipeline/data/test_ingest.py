"""Tests for pipeline.data.ingest: exact round trips, idempotence, interruption safety, stale-shard cleanup."""

from __future__ import annotations

import hashlib
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import (
    ArrayDataset,
    Catalog,
    SHARD_NAME_RE,
    ShardHook,
    ShardInfo,
    build_procedural,
    ingest_dataset,
    ingest_source,
    load_source,
    load_split_arrays,
    remove_dataset,
    s3,
    write_shard,
)


class Interrupted(RuntimeError):
    """Raised from the shard hook to simulate a crash in the middle of an ingest."""


def _assert_round_trip(ds: ArrayDataset, catalog_url: str) -> None:
    for split, (x, y) in ds.splits.items():
        got_x, got_y = load_split_arrays(catalog_url, ds.name, split)
        assert got_x.dtype == np.uint8 and got_y.dtype == np.int64
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)


def _torchvision_error() -> str | None:
    from pipeline.data import import_torchvision_datasets

    try:
        import_torchvision_datasets()
    except ImportError as exc:
        return f"torchvision cannot be imported here: {exc}"
    return None


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _make_source(kind: str, tmp_path: Path) -> str:
    """A spec for each input kind, backed by small files written here."""
    rng = np.random.default_rng(7)
    if kind == "npz":
        np.savez_compressed(
            tmp_path / "toy.npz",
            x_train=rng.integers(0, 256, (37, 12, 12, 3), dtype=np.uint8),
            y_train=rng.integers(0, 4, 37),
            x_test=rng.integers(0, 256, (9, 12, 12, 3), dtype=np.uint8),
            y_test=rng.integers(0, 4, 9),
            class_names=np.array(["a", "b", "c", "d"]),
        )
        return f"npz:{tmp_path / 'toy.npz'}"
    if kind == "digits":
        return "digits"
    if kind == "procedural":
        return "procedural:shapes?n=12&seed=5&test=4"
    if kind == "folder":
        for cls in ("x", "y", "z"):
            (tmp_path / "imgs" / cls).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(
                    tmp_path / "imgs" / cls / f"{i}.png"
                )
        return f"folder:{tmp_path / 'imgs'}"
    if kind == "torchvision":
        reason = _torchvision_error()
        if reason:
            pytest.skip(reason)
        raw = tmp_path / "tv" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        _write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
        _write_idx(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
        _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8))
        _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(10) % 10)
        return f"torchvision:MNIST:{tmp_path / 'tv'}"
    raise AssertionError(kind)


# ------------------------------------------------------------------------------ round trips


def test_local_round_trip_and_layout(tmp_path: Path) -> None:
    ds = build_procedural("stripes", n_per_class=15, seed=1)  # 120 train, 24 test
    dest = tmp_path / "data"
    entry = ingest_dataset(ds, str(dest), shard_size=50, progress=False)
    assert sorted(p.name for p in (dest / "stripes").iterdir()) == [
        "test-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert [s.samples for s in entry.splits["train"].shards] == [50, 50, 20]
    assert entry.splits["test"].samples == 24
    assert (entry.num_classes, entry.image_shape, entry.source) == (8, (28, 28, 1), ds.source)
    for shard in entry.splits["train"].shards:
        assert hashlib.sha256(Path(shard.url).read_bytes()).hexdigest() == shard.sha256
    with tarfile.open(entry.splits["train"].shards[1].url) as tar:
        names = tar.getnames()
        assert names[:4] == ["000000050.png", "000000050.cls", "000000051.png", "000000051.cls"]
        assert tar.extractfile("000000050.cls").read() == str(int(ds.y_train[50])).encode()  # type: ignore[union-attr]
        assert {m.mtime for m in tar.getmembers()} == {0}
    assert Catalog.load(str(dest / "catalog.json")).get("stripes") == entry
    _assert_round_trip(ds, str(dest / "catalog.json"))


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["npz", "digits", "procedural", "folder", "torchvision"])
def test_s3_round_trip_every_input_kind(kind: str, tmp_path: Path, seaweedfs: object, s3_bucket: str) -> None:
    spec = _make_source(kind, tmp_path)
    ds = load_source(spec)
    dest = f"s3://{s3_bucket}/stamp"
    entry = ingest_source(spec, dest, shard_size=128, progress=False)
    assert entry.name == ds.name and entry.source == ds.source
    assert entry.splits["train"].samples == len(ds.y_train)
    _assert_round_trip(ds, f"{dest}/catalog.json")
    objects = s3.list_urls(f"{dest}/{ds.name}")
    assert objects == sorted(entry.shard_urls)
    for shard in entry.shard_urls:
        info = s3.head(shard)
        assert info is not None and info.metadata["sha256"] in {
            s.sha256 for sp in entry.splits.values() for s in sp.shards
        }


@pytest.mark.integration
def test_s3_round_trip_shared_mnist_subset(shared_datasets: Path, seaweedfs: object, s3_bucket: str) -> None:
    full = load_source(f"npz:{shared_datasets / 'mnist.npz'}")
    ds = ArrayDataset(
        "mnist", full.x_train[:1500], full.y_train[:1500], full.x_test[:300], full.y_test[:300], full.class_names
    )
    entry = ingest_dataset(ds, f"s3://{s3_bucket}", shard_size=500, progress=False)
    assert [s.samples for s in entry.splits["train"].shards] == [500, 500, 500]
    _assert_round_trip(ds, f"s3://{s3_bucket}/catalog.json")


# ------------------------------------------------------------------------------- idempotence


@pytest.mark.integration
def test_reingest_identical_data_is_a_no_op(seaweedfs: object, s3_bucket: str) -> None:
    ds = build_procedural("glyphs", n_per_class=10, seed=0)
    dest = f"s3://{s3_bucket}/d"
    first = ingest_dataset(ds, dest, shard_size=40, progress=False)
    objects = s3.list_urls(dest)
    events: list[tuple[str, bool]] = []
    second = ingest_dataset(
        build_procedural("glyphs", n_per_class=10, seed=0),
        dest,
        shard_size=40,
        progress=False,
        on_shard=lambda shard, uploaded: events.append((shard.url, uploaded)),
    )
    assert second == first  # created_at included
    assert s3.list_urls(dest) == objects
    assert events == [(url, False) for url in first.shard_urls]
    catalog = Catalog.load(f"{dest}/catalog.json")
    assert catalog.names() == ["glyphs"]


def test_same_data_gives_same_shard_hashes_anywhere(tmp_path: Path) -> None:
    ds = build_procedural("blobs", n_per_class=10, seed=0)
    a = ingest_dataset(ds, str(tmp_path / "a"), shard_size=30, progress=False)
    b = ingest_dataset(ds, str(tmp_path / "b"), shard_size=30, progress=False)
    assert [s.sha256 for s in a.splits["train"].shards] == [s.sha256 for s in b.splits["train"].shards]
    ca = Catalog(datasets={"blobs": a})
    cb = Catalog(datasets={"blobs": b})
    assert ca.content_hash() == cb.content_hash()


@pytest.mark.integration
def test_smaller_reingest_deletes_stale_shards(seaweedfs: object, s3_bucket: str) -> None:
    dest = f"s3://{s3_bucket}/d"
    ingest_dataset(build_procedural("stripes", n_per_class=20, seed=0), dest, shard_size=40, progress=False)
    assert len(s3.list_urls(f"{dest}/stripes")) == 4 + 1  # 160 train, 40 test
    small = build_procedural("stripes", n_per_class=5, seed=1)
    entry = ingest_dataset(small, dest, shard_size=40, progress=False)
    assert s3.list_urls(f"{dest}/stripes") == sorted(entry.shard_urls)
    assert [s.url.rsplit("/", 1)[-1] for s in entry.splits["train"].shards] == ["train-000000.tar"]
    _assert_round_trip(small, f"{dest}/catalog.json")


# ------------------------------------------------------------------------------ interruption


def _interrupt_after(n: int, catalog_url: str, name: str, seen: list[bool]) -> ShardHook:
    calls = {"n": 0}

    def hook(shard: ShardInfo, uploaded: bool) -> None:
        # While shards are being written the catalog must not list the dataset.
        seen.append(name in Catalog.load(catalog_url))
        calls["n"] += 1
        if calls["n"] >= n:
            raise Interrupted(f"simulated crash after {shard.url}")

    return hook


@pytest.mark.integration
def test_interrupted_ingest_leaves_no_entry_and_rerun_completes(seaweedfs: object, s3_bucket: str) -> None:
    dest = f"s3://{s3_bucket}/d"
    catalog_url = f"{dest}/catalog.json"
    ingest_dataset(build_procedural("blobs", n_per_class=5, seed=0), dest, shard_size=50, progress=False)
    ds = build_procedural("textures", n_per_class=10, seed=0)  # 80 train -> 4 shards of 20
    seen: list[bool] = []
    with pytest.raises(Interrupted, match="simulated crash after"):
        ingest_dataset(
            ds, dest, shard_size=20, progress=False, on_shard=_interrupt_after(2, catalog_url, "textures", seen)
        )
    assert seen == [False, False]
    catalog = Catalog.load(catalog_url)
    assert catalog.names() == ["blobs"]
    assert len(s3.list_urls(f"{dest}/textures")) == 2  # partial shards exist but nothing points at them
    uploads: list[bool] = []
    entry = ingest_dataset(ds, dest, shard_size=20, progress=False, on_shard=lambda s, up: uploads.append(up))
    assert uploads == [False, False, True, True, True]  # the two finished shards are reused
    assert Catalog.load(catalog_url).names() == ["blobs", "textures"]
    assert s3.list_urls(f"{dest}/textures") == sorted(entry.shard_urls)
    _assert_round_trip(ds, catalog_url)


def test_interrupted_reingest_of_changed_data_withdraws_old_entry(tmp_path: Path) -> None:
    dest = str(tmp_path / "d")
    catalog_url = f"{dest}/catalog.json"
    ingest_dataset(build_procedural("glyphs", n_per_class=4, seed=0), dest, shard_size=10, progress=False)
    changed = build_procedural("glyphs", n_per_class=4, seed=99)
    seen: list[bool] = []
    with pytest.raises(Interrupted):
        ingest_dataset(
            changed, dest, shard_size=10, progress=False, on_shard=_interrupt_after(1, catalog_url, "glyphs", seen)
        )
    # The first shard was overwritten with new bytes, so the old entry must be gone, not stale.
    assert seen == [False]
    assert "glyphs" not in Catalog.load(catalog_url)
    entry = ingest_dataset(changed, dest, shard_size=10, progress=False)
    assert Catalog.load(catalog_url).get("glyphs") == entry
    _assert_round_trip(changed, catalog_url)


def test_interrupted_reingest_of_identical_data_keeps_old_entry(tmp_path: Path) -> None:
    dest = str(tmp_path / "d")
    catalog_url = f"{dest}/catalog.json"
    ds = build_procedural("glyphs", n_per_class=4, seed=0)
    old = ingest_dataset(ds, dest, shard_size=10, progress=False)
    with pytest.raises(Interrupted):
        ingest_dataset(ds, dest, shard_size=10, progress=False, on_shard=_interrupt_after(2, catalog_url, "glyphs", []))
    assert Catalog.load(catalog_url).get("glyphs") == old  # nothing it points at was touched
    _assert_round_trip(ds, catalog_url)


# ------------------------------------------------------------------------------------ misc


@pytest.mark.integration
def test_remove_dataset(seaweedfs: object, s3_bucket: str) -> None:
    dest = f"s3://{s3_bucket}/d"
    catalog_url = f"{dest}/catalog.json"
    ingest_dataset(build_procedural("blobs", n_per_class=5, seed=0), dest, shard_size=50, progress=False)
    keep = ingest_dataset(build_procedural("stripes", n_per_class=5, seed=0), dest, shard_size=50, progress=False)
    removed = remove_dataset("blobs", catalog_url)
    assert removed.name == "blobs"
    assert Catalog.load(catalog_url).names() == ["stripes"]
    assert s3.list_urls(f"{dest}/blobs") == []
    assert s3.list_urls(f"{dest}/stripes") == sorted(keep.shard_urls)
    with pytest.raises(KeyError, match=r"dataset 'blobs' is not in the catalog \(known: stripes\)"):
        remove_dataset("blobs", catalog_url)
    with pytest.raises(ValueError, match="contains a slash"):
        remove_dataset("../stripes", catalog_url)


@pytest.mark.integration
def test_ingest_into_missing_bucket_fails_clearly(seaweedfs: object) -> None:
    with pytest.raises(s3.StorageError, match="bucket 'stamp-no-such-bucket' does not exist"):
        ingest_dataset(build_procedural("blobs", n_per_class=2), "s3://stamp-no-such-bucket/x", progress=False)


def test_progress_bar_reports_samples_per_second(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ingest_dataset(build_procedural("blobs", n_per_class=5, seed=0), str(tmp_path), shard_size=16, progress=True)
    out = capsys.readouterr().out
    assert "ingest blobs" in out and "samples/s" in out and "48/48" in out


def test_shard_writer_and_name_pattern(tmp_path: Path) -> None:
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    write_shard(tmp_path / "a.tar", x, np.array([1, 2]), 7)
    write_shard(tmp_path / "b.tar", x, np.array([1, 2]), 7)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert SHARD_NAME_RE.match("train-000001.tar") and not SHARD_NAME_RE.match("train-1.tar")
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        ingest_dataset(build_procedural("blobs", n_per_class=2), str(tmp_path), shard_size=0, progress=False)
