"""Tests for pipeline.data.catalog: name validation, schema round trips, persistence and lineage hashing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.data import (
    Catalog,
    CatalogEntry,
    SCHEMA_VERSION,
    ShardInfo,
    SplitInfo,
    catalog_url_for,
    s3,
    validate_name,
)


def _entry(
    name: str = "mnist", root: str = "s3://b/data", sha_char: str = "a", created: str = "2024-01-01T00:00:00+00:00"
) -> CatalogEntry:
    shards = tuple(
        ShardInfo(url=f"{root}/{name}/train-{i:06d}.tar", sha256=sha_char * 63 + str(i), samples=10) for i in range(2)
    )
    test = (ShardInfo(url=f"{root}/{name}/test-000000.tar", sha256="f" * 64, samples=5),)
    return CatalogEntry(
        name=name,
        num_classes=3,
        class_names=("a", "b", "c"),
        image_shape=(28, 28, 1),
        splits={"train": SplitInfo(shards, 20), "test": SplitInfo(test, 5)},
        created_at=created,
        source="npz:/x/mnist.npz",
    )


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar-10", "v1.2", "A", "9lives", "x" * 128])
def test_valid_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "dataset name is empty"),
        ("../etc", "contains a slash"),
        ("a/b", "contains a slash"),
        ("a\\b", "contains a slash"),
        ("a..b", "contains '..'"),
        (".hidden", "must match"),
        ("-dash", "must match"),
        ("has space", "must match"),
        ("ümlaut", "must match"),
        ("x" * 129, "longer than 128"),
    ],
)
def test_bad_names_are_rejected(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_name(name)


def test_bad_names_rejected_in_entries_and_split_names() -> None:
    with pytest.raises(ValueError, match=r"dataset name '\.\./x' contains a slash"):
        replace(_entry(), name="../x")
    entry = _entry()
    with pytest.raises(ValueError, match=r"split name 'tr ain' is invalid"):
        replace(entry, splits={"tr ain": entry.splits["train"]})


def test_entry_validation_messages() -> None:
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        replace(_entry(), class_names=("a", "b"))
    with pytest.raises(ValueError, match=r"image_shape \(28, 28, 2\) must be \(H, W, C\)"):
        replace(_entry(), image_shape=(28, 28, 2))


def test_json_round_trip_is_exact() -> None:
    catalog = Catalog()
    catalog.add(_entry("mnist"))
    catalog.add(_entry("digits"))
    text = catalog.to_json()
    again = Catalog.from_json(text)
    assert again == catalog
    assert again.to_json() == text
    data = json.loads(text)
    assert data["schema_version"] == SCHEMA_VERSION
    assert list(data["datasets"]) == ["digits", "mnist"]
    assert data["datasets"]["mnist"]["splits"]["train"] == {
        "samples": 20,
        "shards": [
            {"url": "s3://b/data/mnist/train-000000.tar", "sha256": "a" * 63 + "0", "samples": 10},
            {"url": "s3://b/data/mnist/train-000001.tar", "sha256": "a" * 63 + "1", "samples": 10},
        ],
    }


def test_invalid_documents_name_the_problem() -> None:
    good = json.loads(Catalog(datasets={"mnist": _entry()}).to_json())
    future = dict(good, schema_version=99)
    with pytest.raises(ValueError, match="schema_version 99 is not supported"):
        Catalog.from_dict(future)
    broken = json.loads(json.dumps(good))
    broken["datasets"]["mnist"]["splits"]["train"]["samples"] = 21
    with pytest.raises(ValueError, match=r"datasets\.mnist\.splits\.train: samples=21 but its shards hold 20"):
        Catalog.from_dict(broken)
    no_sha = json.loads(json.dumps(good))
    del no_sha["datasets"]["mnist"]["splits"]["test"]["shards"][0]["sha256"]
    with pytest.raises(ValueError, match=r"splits\.test\.shards\[0\]: missing key\(s\) sha256"):
        Catalog.from_dict(no_sha)
    with pytest.raises(ValueError, match="catalog is not valid JSON"):
        Catalog.from_json("{nope")


def test_add_remove_get() -> None:
    catalog = Catalog()
    catalog.add(_entry("mnist"))
    with pytest.raises(ValueError, match="already in the catalog"):
        catalog.add(_entry("mnist"), replace=False)
    catalog.add(_entry("digits"))
    assert catalog.names() == ["digits", "mnist"]
    assert "mnist" in catalog
    removed = catalog.remove("mnist")
    assert removed.name == "mnist"
    with pytest.raises(KeyError, match=r"dataset 'mnist' is not in the catalog \(known: digits\)"):
        catalog.get("mnist")
    with pytest.raises(KeyError, match="not in the catalog"):
        catalog.remove("mnist")
    with pytest.raises(KeyError, match=r"has no split 'val'; it has \['test', 'train'\]"):
        catalog.get("digits").split("val")


def test_content_hash_ignores_time_location_and_order() -> None:
    a = Catalog()
    a.add(_entry("mnist"))
    a.add(_entry("digits"))
    b = Catalog()
    b.add(_entry("digits", root="/local/dir", created="2030-05-05T00:00:00+00:00"))
    b.add(_entry("mnist", root="s3://other/prefix"))
    assert a.content_hash() == b.content_hash()
    assert len(a.content_hash()) == 64
    c = Catalog()
    c.add(_entry("mnist", sha_char="b"))
    c.add(_entry("digits"))
    assert c.content_hash() != a.content_hash()
    d = Catalog()
    d.add(_entry("mnist"))
    assert d.content_hash() != a.content_hash()


def test_same_content_ignores_only_created_at() -> None:
    assert _entry().same_content(_entry(created="2031-01-01T00:00:00+00:00"))
    assert not _entry().same_content(_entry(root="s3://elsewhere"))


def test_local_save_load(tmp_path: Path) -> None:
    url = catalog_url_for(str(tmp_path / "data"))
    assert url == str(tmp_path / "data" / "catalog.json")
    assert Catalog.load(url) == Catalog()
    with pytest.raises(s3.ObjectNotFoundError):
        Catalog.load(url, missing_ok=False)
    catalog = Catalog(datasets={"mnist": _entry()})
    catalog.save(url)
    assert Catalog.load(url) == catalog
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["catalog.json"]
    (tmp_path / "data" / "catalog.json").write_text('{"schema_version": 1}')
    with pytest.raises(ValueError, match=rf"catalog {url}: missing key\(s\) datasets"):
        Catalog.load(url)


@pytest.mark.integration
def test_s3_save_load(seaweedfs: object, s3_bucket: str) -> None:
    url = catalog_url_for(f"s3://{s3_bucket}/data")
    assert url == f"s3://{s3_bucket}/data/catalog.json"
    assert Catalog.load(url) == Catalog()
    catalog = Catalog(datasets={"mnist": _entry(root=f"s3://{s3_bucket}/data")})
    catalog.save(url)
    loaded = Catalog.load(url)
    assert loaded == catalog
    assert loaded.content_hash() == catalog.content_hash()


def test_ingest_pins_local_destinations_and_load_pins_old_relative_shard_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data import build_procedural, ingest_dataset

    monkeypatch.chdir(tmp_path)
    entry = ingest_dataset(build_procedural("blobs", n_per_class=3, seed=0, n_test_per_class=1), "data", progress=False)
    assert all(Path(u).is_absolute() and Path(u).is_file() for u in entry.shard_urls)
    assert all(u.startswith(str(tmp_path / "data" / "blobs")) for u in entry.shard_urls)
    # A catalog written before ingest pinned its destination: URLs relative to where ingest ran.
    raw = json.loads(Path("data/catalog.json").read_text())
    for split in raw["datasets"]["blobs"]["splits"].values():
        for shard in split["shards"]:
            shard["url"] = str(Path(shard["url"]).relative_to(tmp_path))
    Path("data/catalog.json").write_text(json.dumps(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a Ray worker's working directory is not the caller's
    loaded = Catalog.load(str(tmp_path / "data" / "catalog.json"))
    assert sorted(loaded.get("blobs").shard_urls) == sorted(entry.shard_urls)
    assert loaded.content_hash() == Catalog.load(str(tmp_path / "data" / "catalog.json")).content_hash()
