"""Tests for pipeline.episodes: shard assignment, bad-data accounting, and the episode sampler."""

from __future__ import annotations

import dataclasses
import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.data import (
    ArrayDataset,
    Catalog,
    DataQualityError,
    EpisodeSampler,
    STAT_KEYS,
    SampleStream,
    assign_shards,
    build_procedural,
    dataset_weights,
    encode_png,
    ingest_dataset,
    iter_samples,
    load_split_arrays,
    s3,
)
from stamp_core.preprocess import prepare_images

# ------------------------------------------------------------------------------- helpers


def _ingest(
    tmp_path: Path, name: str = "blobs", n: int = 8, shard_size: int = 16, seed: int = 0
) -> tuple[ArrayDataset, str]:
    ds = build_procedural(name, n_per_class=n, seed=seed)
    ingest_dataset(ds, str(tmp_path / "data"), shard_size=shard_size, progress=False)
    return ds, str(tmp_path / "data" / "catalog.json")


def _rewrite_members(path: Path, edit: dict[str, bytes | None]) -> None:
    """Rewrite a tar shard, replacing (bytes) or dropping (None) the named members."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name in edit:
                replacement = edit[member.name]
                if replacement is None:
                    continue
                data = replacement
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def _sabotage(catalog_url: str) -> tuple[str, str]:
    """Garbage in train shard 1; five bad samples in train shard 2. Returns both shard paths."""
    entry = Catalog.load(catalog_url).get("blobs")
    garbage = Path(entry.splits["train"].shards[1].url)
    garbage.write_bytes(b"this is not a tar file" * 100)
    bad = Path(entry.splits["train"].shards[2].url)
    wrong_shape = encode_png(np.zeros((5, 5, 1), np.uint8))
    _rewrite_members(
        bad,
        {
            "000000032.cls": None,  # missing cls
            "000000033.cls": b"99",  # label out of range
            "000000034.cls": b"x",  # label not an integer
            "000000035.png": b"\x89PNG\r\n\x1a\n broken",  # undecodable image
            "000000036.png": wrong_shape,  # wrong shape
        },
    )
    return str(garbage), str(bad)


# ---------------------------------------------------------------------------- assignment


@pytest.mark.parametrize("num_shards", [1, 3, 4, 7, 16])
@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_assignment_is_disjoint_and_complete(num_shards: int, world_size: int, num_workers: int) -> None:
    samples_per_shard = 10
    owners: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for rank, worker in itertools.product(range(world_size), range(num_workers)):
        a = assign_shards(num_shards, rank, world_size, worker, num_workers)
        for shard in a.shards:
            for pos in range(samples_per_shard):
                if a.keeps(pos):
                    owners.setdefault((shard, pos), []).append((rank, worker))
    assert len(owners) == num_shards * samples_per_shard
    assert all(len(v) == 1 for v in owners.values())


def test_assignment_rules() -> None:
    assert assign_shards(5, rank=1, world_size=2).shards == (1, 3)
    a = assign_shards(10, rank=1, world_size=2, worker_id=1, num_workers=2)  # global worker 3 of 4
    assert (a.shards, a.stride, a.offset) == ((3, 7), 1, 0)
    b = assign_shards(2, rank=1, world_size=2, worker_id=0, num_workers=2)  # too few shards: stride
    assert (b.shards, b.stride, b.offset) == ((0, 1), 4, 2)
    assert b.expected(10) == 2  # positions 2 and 6
    with pytest.raises(ValueError, match="rank 2 / worker 0 out of range for world_size 2"):
        assign_shards(4, rank=2, world_size=2)


def test_two_ranks_read_disjoint_halves(tmp_path: Path) -> None:
    ds, catalog_url = _ingest(tmp_path, n=10, shard_size=16)  # 80 train -> 5 shards
    keys = [[s.key for s in iter_samples(catalog_url, "blobs", rank=r, world_size=2)] for r in range(2)]
    assert set(keys[0]).isdisjoint(keys[1])
    assert sorted(k.split("/")[1] for k in keys[0] + keys[1]) == [f"{i:09d}" for i in range(80)]
    assert {k.split("/")[0] for k in keys[0]} == {"0", "2", "4"}


def test_sample_striding_when_fewer_shards_than_workers(tmp_path: Path) -> None:
    ds, catalog_url = _ingest(tmp_path, n=5, shard_size=100)  # one train shard of 40
    per_rank = [
        [int(s.key.split("/")[1]) for s in iter_samples(catalog_url, "blobs", rank=r, world_size=3)] for r in range(3)
    ]
    assert per_rank == [list(range(r, 40, 3)) for r in range(3)]


def test_dataloader_workers_split_without_overlap(tmp_path: Path) -> None:
    ds, catalog_url = _ingest(tmp_path, n=10, shard_size=16)
    entry = Catalog.load(catalog_url).get("blobs")
    keys: list[str] = []
    for rank in range(2):
        stream = SampleStream(entry, "train", rank=rank, world_size=2)
        loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda s: s)
        keys.extend(sample.key for sample in loader)
    assert len(keys) == 80 and len(set(keys)) == 80


# ---------------------------------------------------------------------------- bad data


def test_corrupt_shard_and_bad_samples_are_counted_exactly(tmp_path: Path) -> None:
    ds, catalog_url = _ingest(tmp_path, n=8, shard_size=16)  # 64 train -> 4 shards
    garbage, bad = _sabotage(catalog_url)
    stream = iter_samples(catalog_url, "blobs", max_bad_fraction=0.5)
    samples = list(stream)
    assert {k: stream.stats[k] for k in STAT_KEYS} == {
        "samples_ok": 43,
        "skipped_corrupt_shard": 1,
        "skipped_bad_image": 2,
        "skipped_missing_cls": 1,
        "skipped_bad_label": 2,
    }
    assert len(samples) == 43
    # The good samples are exactly the untouched ones, pixels and labels included.
    kept = [int(s.key.split("/")[1]) for s in samples]
    assert kept == list(range(0, 16)) + list(range(37, 64))
    for s in samples:
        index = int(s.key.split("/")[1])
        np.testing.assert_array_equal(s.image, ds.x_train[index])
        assert s.label == ds.y_train[index]
    assert sorted(stream.bad_shards) == sorted([garbage, bad])


def test_too_much_bad_data_raises_naming_the_shards(tmp_path: Path) -> None:
    _, catalog_url = _ingest(tmp_path, n=8, shard_size=16)
    garbage, bad = _sabotage(catalog_url)
    with pytest.raises(DataQualityError) as info:
        list(iter_samples(catalog_url, "blobs"))  # default max_bad_fraction 0.1; 21 of 64 are bad
    message = str(info.value)
    assert "dataset 'blobs' split 'train': 21 of 64 samples unusable" in message
    assert "max_bad_fraction=0.1" in message
    assert f"{garbage} (unreadable: " in message
    assert f"{bad} (sample 000000032: no .cls member and 4 more)" in message
    assert "stamp ingest" in message


def test_sampler_raises_when_every_shard_is_corrupt(tmp_path: Path) -> None:
    _, catalog_url = _ingest(tmp_path, n=8, shard_size=32)
    entry = Catalog.load(catalog_url).get("blobs")
    for shard in entry.splits["train"].shards:
        Path(shard.url).write_bytes(b"garbage")
    sampler = EpisodeSampler(catalog_url, ways=(2, 3), support_per_class=2, query_size=4, steps_per_epoch=2)
    with pytest.raises(DataQualityError, match=r"train-000000\.tar \(unreadable: "):
        next(iter(sampler))


def test_sha256_verification_catches_modified_shard(tmp_path: Path) -> None:
    _, catalog_url = _ingest(tmp_path, n=8, shard_size=32)  # 2 train shards
    entry = Catalog.load(catalog_url).get("blobs")
    first = Path(entry.splits["train"].shards[0].url)
    first.write_bytes(first.read_bytes() + b"\0" * 1024)  # still a valid tar with the same samples
    plain = iter_samples(catalog_url, "blobs")
    assert len(list(plain)) == 64 and plain.stats["skipped_corrupt_shard"] == 0
    checked = iter_samples(catalog_url, "blobs", verify_sha256=True, max_bad_fraction=0.6)
    assert len(list(checked)) == 32
    assert checked.stats["skipped_corrupt_shard"] == 1
    assert "sha256" in checked.bad_shards[str(first)][0]


def test_truncated_shard_is_detected_by_sample_count(tmp_path: Path) -> None:
    _, catalog_url = _ingest(tmp_path, n=8, shard_size=32)
    entry = Catalog.load(catalog_url).get("blobs")
    first = Path(entry.splits["train"].shards[0].url)
    _rewrite_members(first, {f"{i:09d}.{ext}": None for i in range(20, 32) for ext in ("png", "cls")})
    stream = iter_samples(catalog_url, "blobs", max_bad_fraction=0.5)
    assert len(list(stream)) == 20 + 32
    assert stream.stats["skipped_corrupt_shard"] == 1
    assert "holds 20 samples for this reader, catalog implies 32" in stream.bad_shards[str(first)][0]


def test_missing_shard_counts_as_corrupt(tmp_path: Path) -> None:
    _, catalog_url = _ingest(tmp_path, n=8, shard_size=32)
    entry = Catalog.load(catalog_url).get("blobs")
    Path(entry.splits["train"].shards[1].url).unlink()
    stream = iter_samples(catalog_url, "blobs", max_bad_fraction=0.6)
    assert len(list(stream)) == 32
    assert stream.stats["skipped_corrupt_shard"] == 1


# ------------------------------------------------------------------------------ episodes


def _pixel_index(ds: ArrayDataset, size: int) -> dict[bytes, int]:
    prepared = prepare_images(ds.x_train, size)
    return {row.numpy().tobytes(): int(y) for row, y in zip(prepared, ds.y_train)}


def test_episodes_are_balanced_relabelled_and_disjoint(tmp_path: Path) -> None:
    ds, catalog_url = _ingest(tmp_path, name="stripes", n=40, shard_size=64)
    index = _pixel_index(ds, 28)
    sampler = EpisodeSampler(
        catalog_url,
        image_size=28,
        ways=(2, 5),
        support_per_class=5,
        query_size=20,
        macs_ratio_range=(0.2, 0.6),
        steps_per_epoch=12,
        seed=3,
    )
    episodes = list(sampler)
    assert len(episodes) == 12 == len(sampler)
    assert {e.num_classes for e in episodes} <= {2, 3, 4, 5} and len({e.num_classes for e in episodes}) > 1
    for e in episodes:
        k = e.num_classes
        assert e.dataset == "stripes"
        assert e.support_x.shape == (5 * k, 3, 28, 28) and e.support_x.dtype == torch.float32
        assert e.query_x.shape == (20, 3, 28, 28)
        assert e.support_y.dtype == torch.int64 and e.query_y.dtype == torch.int64
        assert torch.bincount(e.support_y, minlength=k).tolist() == [5] * k
        counts = torch.bincount(e.query_y, minlength=k)
        assert counts.sum() == 20 and counts.max() - counts.min() <= 1 and len(counts) == k
        assert len(set(e.classes)) == k and all(0 <= c < 8 for c in e.classes)
        assert 0.2 <= e.macs_ratio <= 0.6
        support = [row.numpy().tobytes() for row in e.support_x]
        query = [row.numpy().tobytes() for row in e.query_x]
        assert set(support).isdisjoint(query) and len(set(support)) == len(support)
        # Relabelling: new label j is original class classes[j], for support and query alike.
        assert [index[b] for b in support] == [e.classes[j] for j in e.support_y.tolist()]
        assert [index[b] for b in query] == [e.classes[j] for j in e.query_y.tolist()]
    assert sampler.stats["episodes"] == 12 and sampler.stats["data_wait_s"] > 0
    assert sampler.stats["samples_ok"] > 0 and sampler.stats["skipped_corrupt_shard"] == 0


def test_support_is_capped_by_max_support(tmp_path: Path) -> None:
    _, catalog_url = _ingest(tmp_path, name="glyphs", n=30, shard_size=100)
    sampler = EpisodeSampler(
        catalog_url, ways=(10, 10), support_per_class=20, max_support=50, query_size=10, steps_per_epoch=2
    )
    for e in sampler:
        assert e.support_x.shape[0] == 50 and torch.bincount(e.support_y).tolist() == [5] * 10


def test_episodes_are_deterministic_per_seed_and_rank(tmp_path: Path) -> None:
    _, catalog_url = _ingest(tmp_path, name="stripes", n=30, shard_size=40)

    def run(seed: int, rank: int) -> list[torch.Tensor]:
        sampler = EpisodeSampler(
            catalog_url,
            ways=(2, 4),
            support_per_class=4,
            query_size=8,
            steps_per_epoch=4,
            seed=seed,
            rank=rank,
            world_size=2,
        )
        return [torch.cat([e.support_x.flatten(), e.query_x.flatten()]) for _ in range(2) for e in sampler]

    a, b = run(0, 0), run(0, 0)
    assert len(a) == 8 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, run(1, 0)))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, run(0, 1)))


def test_two_ranks_equal_steps_and_disjoint_data(tmp_path: Path) -> None:
    """Three datasets, uniform, on two ranks: blobs goes to rank 0, stripes to rank 1, and shapes
    (cut by the middle of the probability line) to both, which split its single shard by striding."""
    dest = str(tmp_path / "data")
    ingest_dataset(build_procedural("blobs", n_per_class=30, seed=0), dest, shard_size=60, progress=False)
    ingest_dataset(build_procedural("stripes", n_per_class=30, seed=0), dest, shard_size=60, progress=False)
    ingest_dataset(build_procedural("shapes", n_per_class=30, seed=0), dest, shard_size=500, progress=False)
    catalog_url = f"{dest}/catalog.json"
    seen: list[set[bytes]] = []
    expected = [{"blobs", "shapes"}, {"shapes", "stripes"}]
    for rank in range(2):
        sampler = EpisodeSampler(
            catalog_url,
            image_size=32,
            ways=(2, 3),
            support_per_class=3,
            query_size=6,
            rank=rank,
            world_size=2,
            steps_per_epoch=7,
            seed=0,
        )
        episodes = [e for _ in range(2) for e in sampler]
        assert len(episodes) == 14
        assert {e.dataset for e in episodes} == expected[rank]
        assert sampler.stats["datasets_opened"] == 2
        seen.append({row.numpy().tobytes() for e in episodes for row in torch.cat([e.support_x, e.query_x])})
    assert seen[0].isdisjoint(seen[1])


def test_dataset_weights(tmp_path: Path) -> None:
    dest = str(tmp_path / "data")
    ingest_dataset(build_procedural("stripes", n_per_class=20, seed=0), dest, shard_size=80, progress=False)
    ingest_dataset(build_procedural("blobs", n_per_class=20, seed=0), dest, shard_size=80, progress=False)
    catalog_url = f"{dest}/catalog.json"
    sampler = EpisodeSampler(
        catalog_url, weights={"stripes": 0.0}, ways=(2, 2), support_per_class=2, query_size=4, steps_per_epoch=6
    )
    assert {e.dataset for e in sampler} == {"blobs"}
    with pytest.raises(ValueError, match=r"weights name datasets not being sampled: \['mnist'\]"):
        EpisodeSampler(catalog_url, weights={"mnist": 1.0})
    with pytest.raises(ValueError, match="weights must be finite, >= 0 and not all 0"):
        EpisodeSampler(catalog_url, weights={"stripes": 0.0, "blobs": 0.0})
    with pytest.raises(KeyError, match=r"dataset 'nope' is not in the catalog \(known: blobs, stripes\)"):
        EpisodeSampler(catalog_url, datasets=["nope"])


def test_weighting_uniform_by_size_or_by_base(tmp_path: Path) -> None:
    """Two variants of base "a" (sizes 80 and 160 train images) and one dataset of base "b" (80)."""
    dest = str(tmp_path / "data")
    for name, gen, n, base in (("a1", "stripes", 10, "a"), ("a2", "blobs", 20, "a"), ("b1", "shapes", 10, "b")):
        ds = dataclasses.replace(build_procedural(gen, n_per_class=n, seed=0, n_test_per_class=0), name=name)
        ingest_dataset(ds, dest, shard_size=200, progress=False, lineage={"base": base, "recipe": f"{base} | x", "fingerprint": ""})
    catalog_url = f"{dest}/catalog.json"
    entries = Catalog.load(catalog_url).datasets
    assert dataset_weights(entries, "uniform") == pytest.approx({"a1": 1 / 3, "a2": 1 / 3, "b1": 1 / 3})
    assert dataset_weights(entries, "size") == pytest.approx({"a1": 0.25, "a2": 0.5, "b1": 0.25})
    assert dataset_weights(entries, "base") == pytest.approx({"a1": 0.25, "a2": 0.25, "b1": 0.5})
    # Explicit weights multiply the scheme; a dataset without a recorded base is its own base.
    assert dataset_weights(entries, "base", weights={"a2": 0.0}) == pytest.approx({"a1": 1 / 3, "a2": 0.0, "b1": 2 / 3})
    plain = {**entries, "c": dataclasses.replace(entries["b1"], name="c", splits={}, base="")}
    assert dataset_weights(plain, "base")["c"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="unknown weighting 'popular'; expected one of: uniform, size, base"):
        dataset_weights(entries, "popular")
    sampler = EpisodeSampler(catalog_url, weighting="base", ways=(2, 2), support_per_class=2, query_size=4, steps_per_epoch=120)
    drawn = [e.dataset for e in sampler]
    assert 0.35 < drawn.count("b1") / len(drawn) < 0.65  # ~0.5; uniform would give ~0.33
    assert sampler.probs.tolist() == pytest.approx([0.25, 0.25, 0.5])


def test_dataloader_workers_keep_exact_step_count(tmp_path: Path) -> None:
    _, catalog_url = _ingest(tmp_path, name="stripes", n=30, shard_size=40)
    sampler = EpisodeSampler(catalog_url, ways=(2, 3), support_per_class=3, query_size=6, steps_per_epoch=5)
    loader = DataLoader(sampler, batch_size=None, num_workers=2, collate_fn=lambda e: e)
    episodes = list(loader)
    assert len(episodes) == 5
    assert all(torch.bincount(e.support_y).tolist() == [3] * e.num_classes for e in episodes)


def test_too_few_images_per_class_is_a_clear_error(tmp_path: Path) -> None:
    _, catalog_url = _ingest(tmp_path, n=3, shard_size=100)
    sampler = EpisodeSampler(catalog_url, ways=(2, 2), support_per_class=5, query_size=4, steps_per_epoch=1)
    with pytest.raises(
        RuntimeError, match=r"dataset 'blobs' \(rank 0, worker 0\): only 0 classes have the 7 distinct images"
    ):
        next(iter(sampler))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ways": (0, 3)}, "ways must be"),
        ({"ways": (4, 2)}, "ways must be"),
        ({"macs_ratio_range": (0.0, 1.0)}, "macs_ratio_range must satisfy"),
        ({"rank": 2, "world_size": 2}, "rank 2 out of range"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be >= 1"),
        ({"ways": (9, 10)}, "has 8 classes, fewer than ways min 9"),
    ],
)
def test_sampler_argument_errors(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    _, catalog_url = _ingest(tmp_path, n=2, shard_size=100)
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(catalog_url, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- S3


@pytest.mark.integration
def test_s3_streaming_counts_corrupt_shard_and_builds_episodes(seaweedfs: object, s3_bucket: str) -> None:
    ds = build_procedural("stripes", n_per_class=20, seed=0)
    dest = f"s3://{s3_bucket}/data"
    entry = ingest_dataset(ds, dest, shard_size=40, progress=False)
    catalog_url = f"{dest}/catalog.json"
    x, y = load_split_arrays(catalog_url, "stripes", "train", verify_sha256=True)
    np.testing.assert_array_equal(x, ds.x_train)
    np.testing.assert_array_equal(y, ds.y_train)
    s3.put_bytes(entry.splits["train"].shards[3].url, b"not a tar")
    stream = iter_samples(catalog_url, "stripes", max_bad_fraction=0.3)
    assert len(list(stream)) == 120
    assert stream.stats["skipped_corrupt_shard"] == 1
    sampler = EpisodeSampler(
        catalog_url, ways=(2, 4), support_per_class=3, query_size=8, steps_per_epoch=3, max_bad_fraction=0.5
    )
    episodes = list(sampler)
    assert len(episodes) == 3 and all(e.query_x.shape == (8, 3, 32, 32) for e in episodes)


@pytest.mark.integration
def test_s3_missing_catalog_is_a_clear_error(seaweedfs: object, s3_bucket: str) -> None:
    with pytest.raises(s3.ObjectNotFoundError, match=rf"s3://{s3_bucket}/nothing/catalog.json"):
        EpisodeSampler(f"s3://{s3_bucket}/nothing/catalog.json")


def test_prefetcher_keeps_order_raises_source_errors_and_stops() -> None:
    import threading

    from pipeline.data import Prefetcher

    with Prefetcher(iter(range(50)), depth=3) as items:
        assert list(items) == list(range(50))
        with pytest.raises(StopIteration):
            next(items)  # stays exhausted

    def failing():
        yield 1
        raise DataQualityError("shard s3://b/x-000001.tar is corrupt")

    items = Prefetcher(failing(), depth=2)
    assert next(items) == 1
    with pytest.raises(DataQualityError, match="x-000001.tar is corrupt"):
        next(items)
    items.close()

    # An endless source: close() ends the thread although the consumer stopped early.
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    items = Prefetcher(endless(), depth=2)
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.close()
    assert not any(t.name == "stamp-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ValueError, match="depth=0: expected >= 1"):
        Prefetcher(iter([]), depth=0)
