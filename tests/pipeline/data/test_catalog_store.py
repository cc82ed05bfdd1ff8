"""The catalog as entry objects + an index: nothing lost to a stale or racing index, older catalogs
still load and migrate, 1,000 datasets load fast and list paged and filtered (real SeaweedFS)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.apps.cli import app
from pipeline.data import (
    Catalog,
    CatalogEntry,
    ShardInfo,
    SplitInfo,
    build_procedural,
    compact,
    delete_entry,
    entries_prefix,
    ingest_dataset,
    load_entry,
    put_entry,
    remove_dataset,
    s3,
)

runner = CliRunner()


def _entry(root: str, name: str, base: str = "", recipe: str = "") -> CatalogEntry:
    shard = ShardInfo(url=f"{root}/{name}/train-000000.tar", sha256="ab" * 32, samples=10)
    return CatalogEntry(
        name=name, num_classes=2, class_names=("a", "b"), image_shape=(28, 28, 1),
        splits={"train": SplitInfo(shards=(shard,), samples=10)}, created_at="2026-01-01T00:00:00+00:00",
        source="test", base=base, recipe=recipe, fingerprint="f" * 8 if recipe else "",
    )


@pytest.mark.integration
def test_a_stale_index_loses_no_entry(seaweedfs: object, s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/d"
    url = f"{root}/catalog.json"
    put_entry(url, _entry(root, "a"))
    stale = compact(url)  # the index as writer 1 saw it: only "a"
    put_entry(url, _entry(root, "b"))  # writer 2 adds "b" ...
    stale.save(url)  # ... and writer 1's late index write does not know it
    assert json.loads(s3.get_bytes(url))["datasets"].keys() == {"a"}
    assert Catalog.load(url).names() == ["a", "b"]
    # A changed entry object wins over the copy in the index; a deleted one is gone.
    put_entry(url, _entry(root, "a", recipe="changed"))
    assert Catalog.load(url).get("a").recipe == "changed"
    assert delete_entry(url, "a") is not None
    stale.save(url)
    assert Catalog.load(url).names() == ["b"]
    assert compact(url).names() == ["b"] and json.loads(s3.get_bytes(url))["datasets"].keys() == {"b"}
    assert load_entry(url, "b") == _entry(root, "b") and load_entry(url, "a") is None


def test_an_older_catalog_json_loads_and_migrates(tmp_path: Path) -> None:
    root = str(tmp_path / "d")
    url = f"{root}/catalog.json"
    # A catalog written by the code before entry objects: one document, no versions.
    Catalog(datasets={"old1": _entry(root, "old1"), "old2": _entry(root, "old2")}).save(url)
    legacy_text = Path(url).read_text()
    assert "entry_versions" not in legacy_text
    assert Catalog.load(url).names() == ["old1", "old2"]
    assert load_entry(url, "old2") == _entry(root, "old2")
    entry = ingest_dataset(build_procedural("blobs", n_per_class=2, seed=0, n_test_per_class=0), root, progress=False)
    catalog = Catalog.load(url)
    assert catalog.names() == ["blobs", "old1", "old2"] and catalog.get("blobs") == entry
    # The index rewrite moved the old entries into entry objects, so no later rewrite can drop them.
    assert sorted(p.name for p in Path(entries_prefix(url)).iterdir()) == ["blobs.json", "old1.json", "old2.json"]
    assert sorted(json.loads(Path(url).read_text())["entry_versions"]) == ["blobs", "old1", "old2"]
    # The new index is still a plain catalog to a reader that knows nothing of entry objects.
    assert Catalog.from_json(Path(url).read_text()).names() == ["blobs", "old1", "old2"]
    remove_dataset("old1", url, delete_shards=False)
    assert Catalog.load(url).names() == ["blobs", "old2"]
    # Removing an entry that only an old index holds takes it out of the index too.
    Path(url).write_text(legacy_text)
    for p in Path(entries_prefix(url)).iterdir():
        p.unlink()
    assert delete_entry(url, "old2") == _entry(root, "old2")
    assert Catalog.load(url).names() == ["old1"]


@pytest.mark.integration
def test_a_thousand_datasets_load_fast_and_list_paged(seaweedfs: object, s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/d"
    url = f"{root}/catalog.json"
    entries = [_entry(root, f"ds{i:04d}", base=f"b{i % 4}", recipe=f"b{i % 4} | {'rotate' if i % 10 == 0 else 'invert'}()")
               for i in range(1000)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda e: put_entry(url, e), entries))
    t0 = time.perf_counter()
    cold = Catalog.load(url)  # no index yet: every entry object is read
    cold_s = time.perf_counter() - t0
    assert len(cold.datasets) == 1000
    compact(url)
    t0 = time.perf_counter()
    warm = Catalog.load(url)  # index + one listing
    warm_s = time.perf_counter() - t0
    assert warm == cold and len(s3.get_bytes(url)) < 1_000_000
    assert warm_s < 2.0, f"loading 1,000 datasets took {warm_s:.2f} s (cold {cold_s:.2f} s)"
    t0 = time.perf_counter()
    result = runner.invoke(app, ["datasets", "list", "--catalog", url, "--base", "b2", "--recipe", "rotate", "--limit", "10", "--page", "2"])
    list_s = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    # base b2 and "rotate": i % 4 == 2 and i % 10 == 0 -> i = 10, 30, 50, ...: 50 datasets, page 2 = ds0210 .. ds0390.
    assert "datasets 11-20 of 50 (page 2 of 5; 1000 in the catalog)" in result.output
    assert "ds0210" in result.output and "ds0390" in result.output and "ds0190" not in result.output and "ds0410" not in result.output
    assert list_s < 5.0
    print(f"1,000 datasets: cold load {cold_s:.2f} s, indexed load {warm_s:.2f} s, list {list_s:.2f} s, index {len(s3.get_bytes(url)):,} bytes")
