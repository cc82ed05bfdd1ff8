"""Tests for the many-datasets data plane: datasets split over workers, a bounded number of open
S3 connections per worker (LRU of readers that resume with a ranged GET), and episode counts."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil
import pytest

from pipeline.data import (
    ArrayDataset,
    Catalog,
    EpisodeCounts,
    EpisodeSampler,
    SampleStream,
    assign_datasets,
    build_procedural,
    ingest_dataset,
)
from stamp_core import Episode

# --------------------------------------------------------------------------- assignment


@pytest.mark.parametrize("workers", [1, 2, 3, 8, 100])
def test_assign_datasets_keeps_the_global_mix_and_covers_every_dataset(workers: int) -> None:
    rng = np.random.default_rng(0)
    names = [f"d{i:02d}" for i in range(64)]
    raw = rng.gamma(0.7, size=64)
    raw[[5, 17]] = 0.0  # weight 0: never drawn, read by nobody
    probs = dict(zip(names, (raw / raw.sum()).tolist()))
    plans = [assign_datasets(probs, w, workers) for w in range(workers)]
    # Every worker yields the same number of episodes, so the job draws d with mean_w weight_w(d).
    drawn = dict.fromkeys(names, 0.0)
    readers: dict[str, list[tuple[int, int]]] = {}
    for plan in plans:
        assert plan and sum(s.weight for s in plan) == pytest.approx(1.0)
        for share in plan:
            drawn[share.name] += share.weight / workers
            readers.setdefault(share.name, []).append((share.part, share.parts))
    assert drawn == pytest.approx(probs, abs=1e-9)
    assert set(readers) == set(names) - {"d05", "d17"}
    for name, parts in readers.items():  # the readers of a dataset split it as part i of n, i = 0..n-1
        assert sorted(parts) == [(i, len(parts)) for i in range(len(parts))], name
    assert assign_datasets(probs, workers - 1, workers) == plans[-1]  # deterministic


def test_assign_datasets_uniform_gives_each_worker_its_share() -> None:
    probs = {f"d{i:02d}": 1 / 72 for i in range(72)}
    for workers in (2, 5, 16):
        plans = [assign_datasets(probs, w, workers) for w in range(workers)]
        assert max(len(p) for p in plans) <= math.ceil(72 / workers) + 1
        assert sum(len(p) for p in plans) <= 72 + workers - 1  # only the datasets cut by a boundary repeat
    two = assign_datasets({"a": 0.5, "b": 0.5}, 1, 2)
    assert [(s.name, s.weight, s.part, s.parts) for s in two] == [("b", 1.0, 0, 1)]
    # Fewer datasets than workers: each dataset is read by several workers, which split its shards.
    many = [assign_datasets({"a": 0.25, "b": 0.75}, w, 8) for w in range(8)]
    assert [[(s.name, s.part, s.parts) for s in p] for p in many] == (
        [[("a", i, 2)] for i in range(2)] + [[("b", i, 6)] for i in range(6)]
    )
    with pytest.raises(ValueError, match="worker 2 out of range for 2 workers"):
        assign_datasets({"a": 1.0}, 2, 2)


# ------------------------------------------------------------------------------ resume


def test_closed_reader_resumes_at_the_next_sample(tmp_path: Path) -> None:
    """Readers closed every 7 samples yield exactly what one long reader yields (no restart at the
    start of a shard, no skipped sample), and each close leaves no body open."""
    dest = str(tmp_path / "data")
    ingest_dataset(build_procedural("blobs", n_per_class=20, seed=0), dest, shard_size=64, progress=False)
    entry = Catalog.load(f"{dest}/catalog.json").get("blobs")  # 160 train images in 3 shards

    def stream() -> SampleStream:
        return SampleStream(entry, "train", resampled=True, seed=4)

    whole = stream()
    reader = whole.open_samples()
    expected = [next(reader) for _ in range(400)]
    reader.close()
    chunked = stream()
    got = []
    while len(got) < 400:
        reader = chunked.open_samples()
        for _ in range(7):
            got.append(next(reader))
        assert chunked.gauge.now == 1
        reader.close()
        assert chunked.gauge.now == 0
    got = got[:400]
    assert [s.key for s in got] == [s.key for s in expected]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(got, expected))
    assert chunked.stats["shards_read"] == whole.stats["shards_read"]
    assert chunked.stats["gets"] > 50 and whole.stats["gets"] == whole.stats["shards_read"]


# ------------------------------------------------------------------------- S3, bounded


def _connections_to(port: int) -> set[tuple[str, int]]:
    """This process's established TCP connections to the S3 port (local addresses), as the kernel sees them."""
    return {
        (c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp4")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def _run(catalog_url: str, rank: int, max_open: int, port: int,
         monkeypatch: pytest.MonkeyPatch) -> tuple[EpisodeSampler, list[Episode], list[int]]:
    # boto3 clients are cached per setting: another retry count gives this run its own client and
    # connection pool, so idle connections of earlier runs (and of the ingest) are neither reused
    # nor counted.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(3 + 2 * rank + (max_open > 3)))
    before = _connections_to(port)
    sampler = EpisodeSampler(
        catalog_url, ways=(2, 3), support_per_class=3, query_size=8, steps_per_epoch=20, seed=1,
        rank=rank, world_size=2, max_open_streams=max_open,
    )
    episodes: list[Episode] = []
    tcp: list[int] = []
    for episode in sampler:  # readers stay open mid-shard between episodes: count them there
        episodes.append(episode)
        tcp.append(len(_connections_to(port) - before))
    return sampler, episodes, tcp


@pytest.mark.integration
def test_worker_opens_only_its_datasets_and_at_most_the_bound(
    seaweedfs: object, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = f"s3://{s3_bucket}/many"
    rng = np.random.default_rng(0)
    names = [f"set{i:02d}" for i in range(8)]
    for name in names:
        # Noise images: a 128-image shard is ~1.5 MiB, more than the reader's 1 MiB read-ahead, so a
        # reader left mid-shard after an episode really holds its HTTP connection.
        x = rng.integers(0, 256, size=(128, 64, 64, 3), dtype=np.uint8)
        ds = ArrayDataset(name, x, np.repeat(np.arange(8), 16), x[:0], np.zeros(0, np.int64), [str(c) for c in range(8)])
        ingest_dataset(ds, dest, shard_size=500, progress=False)
    catalog_url = f"{dest}/catalog.json"
    port = int(urlsplit(seaweedfs.endpoint_url).port)  # type: ignore[attr-defined]
    covered: set[str] = set()
    for rank in range(2):
        sampler, episodes, tcp = _run(catalog_url, rank, 3, port, monkeypatch)
        share = {s.name for s in sampler.datasets_of(rank, 2)}
        drawn = {e.dataset for e in episodes}
        covered |= share
        assert len(share) == 4 and drawn == share
        stats = sampler.stats
        assert stats["datasets_opened"] == len(drawn)  # lazily: only datasets actually drawn
        assert stats["open_streams_peak"] == 3 and stats["open_streams"] <= 3
        assert max(tcp) <= 3, tcp
        # Closed readers came back with ranged GETs instead of re-reading their shard.
        assert stats["gets"] > stats["shards_read"] >= len(drawn)
        # The same episodes, pixel for pixel, as a worker that never closes a reader.
        free, free_episodes, free_tcp = _run(catalog_url, rank, 100, port, monkeypatch)
        assert max(free_tcp) > 3 and free.stats["open_streams_peak"] == len(drawn)
        assert [e.dataset for e in free_episodes] == [e.dataset for e in episodes]
        for a, b in zip(episodes, free_episodes):
            assert a.classes == b.classes and np.array_equal(a.support_x.numpy(), b.support_x.numpy())
            assert np.array_equal(a.query_x.numpy(), b.query_x.numpy())
    assert covered == set(names)


# ------------------------------------------------------------------------------ counts


def test_episode_counts_per_dataset_and_base(tmp_path: Path) -> None:
    dest = str(tmp_path / "data")
    for name, gen, base in (("a1", "stripes", "a"), ("a2", "blobs", "a"), ("b1", "shapes", "b")):
        ds = dataclasses.replace(build_procedural(gen, n_per_class=10, seed=0, n_test_per_class=0), name=name)
        ingest_dataset(ds, dest, shard_size=200, progress=False,
                       lineage={"base": base, "recipe": f"{base} | x", "fingerprint": ""})
    sampler = EpisodeSampler(f"{dest}/catalog.json", ways=(2, 2), support_per_class=2, query_size=4,
                             steps_per_epoch=30)
    counts = EpisodeCounts(sampler.entries)
    episodes = list(sampler)
    counts.add(episodes)
    by_name = {n: sum(e.dataset == n for e in episodes) for n in ("a1", "a2", "b1")}
    assert counts.datasets == by_name and sum(by_name.values()) == 30
    assert counts.bases() == {"a": by_name["a1"] + by_name["a2"], "b": by_name["b1"]}
    metrics = counts.metrics()
    assert metrics["episodes.a2"] == by_name["a2"] and metrics["episodes_base.a"] == by_name["a1"] + by_name["a2"]
    assert EpisodeCounts.from_metrics({**metrics, "loss": 0.5}) == {"datasets": by_name, "bases": counts.bases()}
