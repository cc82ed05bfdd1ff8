"""The dataset catalog: every source dataset, as one object per dataset plus an index (``catalog.json``).

For each dataset it records the class count and names, the image shape ``(H, W, C)``, and per split
the shard URLs with their sha256 and sample counts, plus when and from what it was ingested (and,
for datasets derived by a suite, their base, recipe and fingerprint: lineage).
Readers (episode streaming, pretraining) only ever look at shards the catalog lists, and ingest
writes the catalog last, so an entry always points at complete shards.

Layout, for a catalog at ``<root>/catalog.json``: each dataset's entry is its own object,
``<root>/_catalog.d/<name>.json``, written only by whoever ingests that dataset, so two concurrent
ingests never overwrite each other's entries (no read-modify-write of a shared document, and no
need for conditional writes). ``catalog.json`` is an index: a snapshot of all entries with the
version (ETag) of the entry object each was read from. :meth:`Catalog.load` reads the index and lists
the entry objects (one LIST per 1,000 datasets), and fetches only the entries whose version differs
or which the index lacks; entries whose object is gone are dropped. The listing is the truth, so a
stale or racing index write can delay nothing and lose nothing. A ``catalog.json`` from before this
layout (entries without versions) still loads: its entries are kept until an index rewrite
(:func:`pipeline.data.catalog_store.compact`) moves them into entry objects.

The catalog lives at any URL :mod:`pipeline.data.s3` accepts (``s3://bucket/prefix/catalog.json`` or a
local path). :meth:`Catalog.content_hash` is a stable fingerprint of the data (not of timestamps or
locations) for lineage tags.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.data import s3
from pipeline.data.catalog_checks import (  # noqa: F401 - validate_* are part of this module's API
    NAME_RE,
    as_count,
    require_keys,
    require_type,
    validate_name,
    validate_shard_url,
)

SCHEMA_VERSION = 1
CATALOG_FILENAME = "catalog.json"
def utc_now() -> str:
    """An ISO-8601 UTC timestamp with second precision."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: where it is, its sha256 and how many samples it holds."""

    url: str
    sha256: str
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "sha256": self.sha256, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ShardInfo:
        require_keys(data, ("url", "sha256", "samples"), where)
        require_type(data["url"], str, f"{where}.url", "a string")
        sha = require_type(data["sha256"], str, f"{where}.sha256", "a string")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"{where}: sha256 {sha!r} is not 64 lowercase hex digits")
        samples = as_count(data["samples"], f"{where}.samples")
        return cls(url=data["url"], sha256=sha, samples=samples)


@dataclass(frozen=True)
class SplitInfo:
    """A split (``train``, ``test``): its shards and total sample count."""

    shards: tuple[ShardInfo, ...]
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> SplitInfo:
        require_keys(data, ("shards", "samples"), where)
        require_type(data["shards"], list, f"{where}.shards", "a list of shards")
        shards = tuple(ShardInfo.from_dict(s, f"{where}.shards[{i}]") for i, s in enumerate(data["shards"]))
        samples = as_count(data["samples"], f"{where}.samples")
        if samples != sum(s.samples for s in shards):
            raise ValueError(f"{where}: samples={samples} but its shards hold {sum(s.samples for s in shards)}")
        return cls(shards=shards, samples=samples)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]


@dataclass(frozen=True)
class CatalogEntry:
    """Everything a reader needs to know about one dataset."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    splits: dict[str, SplitInfo]
    created_at: str
    source: str
    #: Lineage of a derived dataset (empty for plain ingests): the base it came from, the canonical
    #: recipe (class subset, transforms, sizes, seed) and a fingerprint of recipe + base + code version.
    base: str = ""
    recipe: str = ""
    fingerprint: str = ""

    def __post_init__(self) -> None:
        validate_name(self.name)
        for split, info in self.splits.items():
            validate_name(split, "split name")
            for shard in info.shards:
                validate_shard_url(shard.url, self.name, split)
        if self.num_classes < 1:
            raise ValueError(f"dataset {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"dataset {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes"
            )
        if len(self.image_shape) != 3 or self.image_shape[2] not in (1, 3) or min(self.image_shape) < 1:
            raise ValueError(
                f"dataset {self.name!r}: image_shape {self.image_shape} must be (H, W, C) with C in {{1, 3}}"
            )

    def split(self, name: str) -> SplitInfo:
        """The named split; KeyError listing the available ones when absent."""
        try:
            return self.splits[name]
        except KeyError:
            raise KeyError(f"dataset {self.name!r} has no split {name!r}; it has {sorted(self.splits)}") from None

    @property
    def shard_urls(self) -> list[str]:
        """Every shard URL of every split."""
        return [s.url for split in self.splits.values() for s in split.shards]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
            "splits": {k: v.to_dict() for k, v in sorted(self.splits.items())},
            "created_at": self.created_at,
            "source": self.source,
        }
        # Lineage keys only when set: plain entries keep the exact format (and hashes) of older catalogs.
        out.update({k: v for k, v in self.lineage().items() if v})
        return out

    def lineage(self) -> dict[str, str]:
        return {"base": self.base, "recipe": self.recipe, "fingerprint": self.fingerprint}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "entry") -> CatalogEntry:
        require_keys(
            data,
            ("name", "num_classes", "class_names", "image_shape", "splits", "created_at", "source"),
            where,
        )
        # Strict types: a coerced value (the string "281" read as the shape (2, 8, 1)) would be
        # silently wrong.
        raw_shape = require_type(data["image_shape"], list, f"{where}.image_shape", "a list [H, W, C]")
        if len(raw_shape) != 3:
            raise ValueError(f"{where}.image_shape must have 3 entries (H, W, C), got {raw_shape!r}")
        shape = tuple(as_count(v, f"{where}.image_shape[{i}]") for i, v in enumerate(raw_shape))
        names = require_type(data["class_names"], list, f"{where}.class_names", "a list of strings")
        for i, c in enumerate(names):
            require_type(c, str, f"{where}.class_names[{i}]", "a string")
        splits = require_type(data["splits"], dict, f"{where}.splits", "an object of splits")
        try:
            return cls(
            name=require_type(data["name"], str, f"{where}.name", "a string"),
            num_classes=as_count(data["num_classes"], f"{where}.num_classes"),
            class_names=tuple(names),
            image_shape=(shape[0], shape[1], shape[2]),
            splits={k: SplitInfo.from_dict(v, f"{where}.splits.{k}") for k, v in splits.items()},
            created_at=require_type(data["created_at"], str, f"{where}.created_at", "an ISO-8601 string"),
            source=require_type(data["source"], str, f"{where}.source", "a string"),
            **{k: require_type(data[k], str, f"{where}.{k}", "a string") for k in ("base", "recipe", "fingerprint") if k in data},
            )
        except ValueError as exc:
            if str(exc).startswith(where):
                raise
            raise ValueError(f"{where}: {exc}") from None  # name the document and the entry

    def content_dict(self) -> dict[str, Any]:
        """The part of the entry that describes the data itself (no time, no locations)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
            "splits": {k: [[s.sha256, s.samples] for s in v.shards] for k, v in sorted(self.splits.items())},
            **({"recipe": self.recipe} if self.recipe else {}),
        }

    def same_content(self, other: CatalogEntry) -> bool:
        """True when both entries describe the same bytes at the same URLs (timestamps aside)."""
        mine, theirs = self.to_dict(), other.to_dict()
        mine.pop("created_at")
        theirs.pop("created_at")
        return mine == theirs


@dataclass
class Catalog:
    """All datasets known to the platform, keyed by name."""

    datasets: dict[str, CatalogEntry] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    #: name -> version (ETag) of the entry object the entry was read from; names without one come
    #: from a catalog.json written before entry objects existed. Not part of equality.
    entry_versions: dict[str, str] = field(default_factory=dict, compare=False)

    # -------------------------------------------------------------------------- editing

    def add(self, entry: CatalogEntry, *, replace: bool = True) -> None:
        """Add or replace a dataset entry.

        Raises:
            ValueError: the name exists and ``replace`` is False.
        """
        if not replace and entry.name in self.datasets:
            raise ValueError(f"dataset {entry.name!r} is already in the catalog (pass replace=True)")
        self.datasets[entry.name] = entry

    def remove(self, name: str) -> CatalogEntry:
        """Remove and return a dataset entry; KeyError naming the known datasets when absent."""
        validate_name(name)
        try:
            return self.datasets.pop(name)
        except KeyError:
            raise KeyError(self._unknown(name)) from None

    def get(self, name: str) -> CatalogEntry:
        """The entry for name; KeyError naming the known datasets when absent."""
        try:
            return self.datasets[name]
        except KeyError:
            raise KeyError(self._unknown(name)) from None

    def _unknown(self, name: str) -> str:
        known = ", ".join(sorted(self.datasets)) or "none"
        return f"dataset {name!r} is not in the catalog (known: {known}); ingest it with `stamp ingest`"

    def __contains__(self, name: object) -> bool:
        return name in self.datasets

    def names(self) -> list[str]:
        return sorted(self.datasets)

    def find(self, *, base: str | None = None, recipe: str | None = None) -> list[CatalogEntry]:
        """Entries sorted by name, those of ``base`` only (exact) and whose recipe contains ``recipe``."""
        return [
            e for _, e in sorted(self.datasets.items())
            if (base is None or e.base == base) and (recipe is None or recipe in e.recipe)
        ]

    # ---------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "datasets": {k: v.to_dict() for k, v in sorted(self.datasets.items())},
        }
        versions = {k: v for k, v in sorted(self.entry_versions.items()) if k in self.datasets}
        if versions:  # older readers ignore the extra key and read the snapshot as a plain catalog
            out["entry_versions"] = versions
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "catalog") -> Catalog:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{where}: schema_version {version!r} is not supported (this code reads version "
                f"{SCHEMA_VERSION}); upgrade STAMP or re-ingest the datasets"
            )
        require_keys(data, ("datasets",), where)
        datasets: dict[str, CatalogEntry] = {}
        for key, raw in require_type(data["datasets"], dict, f"{where}: datasets", "an object").items():
            entry = CatalogEntry.from_dict(raw, f"{where}: datasets.{key}")
            if entry.name != key:
                raise ValueError(f"{where}: datasets.{key} has name {entry.name!r}")
            datasets[key] = entry
        versions = require_type(data.get("entry_versions", {}), dict, f"{where}: entry_versions", "an object")
        for key, value in versions.items():
            require_type(value, str, f"{where}: entry_versions.{key}", "a string")
        return cls(datasets=datasets, schema_version=version, entry_versions=dict(versions))

    @classmethod
    def from_json(cls, text: str, where: str = "catalog") -> Catalog:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, url: str, *, missing_ok: bool = True, endpoint_url: str | None = None) -> Catalog:
        """Read the catalog at url: its index merged with the entry objects beside it (module docstring).

        An absent catalog (no index, no entries) is empty when ``missing_ok``.

        Raises:
            pipeline.data.s3.ObjectNotFoundError: absent and not ``missing_ok``.
            pipeline.data.s3.StorageError: storage unreachable / bucket missing / credentials rejected.
            ValueError: the index or an entry is not valid (the message names the URL and field).
        """
        try:
            text: str | None = s3.get_bytes(url, endpoint_url=endpoint_url).decode("utf-8")
        except s3.ObjectNotFoundError:
            if not missing_ok and not s3.list_objects(entries_prefix(url), endpoint_url=endpoint_url):
                raise
            text = None
        catalog = cls.from_json(text, where=f"catalog {url}") if text is not None else cls()
        catalog._merge_entry_objects(url, endpoint_url)
        if not s3.is_s3_url(url):
            catalog._pin_local_shards(s3.local_path(url).expanduser().resolve().parent)
        return catalog

    def _merge_entry_objects(self, url: str, endpoint_url: str | None) -> None:
        """Bring the index up to date with the entry objects: the listing decides what exists."""
        listed: dict[str, s3.ObjectInfo] = {}
        for info in s3.list_objects(entries_prefix(url), endpoint_url=endpoint_url):
            base = info.url.rsplit("/", 1)[-1]
            if base.endswith(ENTRY_SUFFIX) and NAME_RE.fullmatch(base[: -len(ENTRY_SUFFIX)]):
                listed[base[: -len(ENTRY_SUFFIX)]] = info
        stale = [(n, i) for n, i in sorted(listed.items()) if n not in self.datasets or self.entry_versions.get(n) != i.etag]

        def fetch(item: tuple[str, s3.ObjectInfo]) -> CatalogEntry | None:
            name, info = item
            try:
                raw = s3.get_bytes(info.url, endpoint_url=endpoint_url).decode("utf-8")
            except s3.ObjectNotFoundError:  # removed since the listing
                return None
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"catalog entry {info.url} is not valid JSON: {exc}") from None
            entry = CatalogEntry.from_dict(data, where=f"catalog entry {info.url}")
            if entry.name != name:
                raise ValueError(f"catalog entry {info.url} holds dataset {entry.name!r}, expected {name!r}")
            return entry

        # Entries the index lacks are small GETs: overlap them (a fresh 1,000-dataset catalog in ~1 s, not ~4 s).
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(stale)))) as pool:
            for (name, info), entry in zip(stale, pool.map(fetch, stale)):
                if entry is None:
                    listed.pop(name)
                    continue
                self.datasets[name] = entry
                self.entry_versions[name] = info.etag
        for name in [n for n in self.datasets if n in self.entry_versions and n not in listed]:
            del self.datasets[name]  # its entry object was removed: the index is stale
        self.entry_versions = {n: v for n, v in self.entry_versions.items() if n in listed}

    def _pin_local_shards(self, root: Path) -> None:
        """Make relative local shard URLs absolute, so no reader depends on its working directory.

        Catalogs written before ingest pinned its destination hold URLs relative to the directory
        ingest ran in (``.stamp/data/<dataset>/train-000000.tar``). A relative URL resolves to the
        ingest layout beside the catalog (``<catalog dir>/<dataset>/<file>``) and, for a catalog
        moved away from its shards, to the working directory if only that exists.
        """
        def pin(url: str) -> str:
            if s3.is_s3_url(url) or s3.local_path(url).is_absolute():
                return url
            rel = s3.local_path(url)
            beside = root / rel.parent.name / rel.name
            here = rel.expanduser().resolve()
            return str(here if here.is_file() and not beside.is_file() else beside)

        for name, entry in self.datasets.items():
            splits = {
                split_name: dataclasses.replace(split, shards=tuple(dataclasses.replace(sh, url=pin(sh.url)) for sh in split.shards))
                for split_name, split in entry.splits.items()
            }
            self.datasets[name] = dataclasses.replace(entry, splits=splits)

    def save(self, url: str, *, endpoint_url: str | None = None) -> None:
        """Write the whole document to url atomically (temp file + rename locally, one PUT on S3).

        This writes the index only; to add or remove a dataset safely while others may ingest, use
        :mod:`pipeline.data.catalog_store` (``put_entry``, ``delete_entry``, ``compact``).
        """
        s3.put_bytes(url, self.to_json().encode("utf-8"), content_type="application/json", endpoint_url=endpoint_url)

    # ---------------------------------------------------------------------------- lineage

    def content_hash(self) -> str:
        """sha256 over the data the catalog describes: names, classes, shapes, shard hashes and counts.

        Independent of timestamps, shard locations and dict order, so the same data ingested again
        (or into another bucket) hashes the same.
        """
        payload = {
            "schema_version": self.schema_version,
            "datasets": [self.datasets[k].content_dict() for k in sorted(self.datasets)],
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()


def catalog_url_for(dest: str) -> str:
    """The default catalog location for a data root: ``<dest>/catalog.json``."""
    return s3.join_url(dest, CATALOG_FILENAME)


ENTRY_SUFFIX = ".json"


def entries_prefix(catalog_url: str) -> str:
    """Where the entry objects of the catalog at ``<root>/<stem>.json`` live: ``<root>/_<stem>.d``.

    The leading ``_`` keeps it apart from dataset directories (names start with a letter or digit).
    """
    root, _, file = str(catalog_url).rpartition("/")
    stem = file[: -len(".json")] if file.endswith(".json") else file
    return s3.join_url(root or ".", f"_{stem}.d")


def entry_url(catalog_url: str, name: str) -> str:
    """The entry object of dataset ``name`` in the catalog at catalog_url."""
    return s3.join_url(entries_prefix(catalog_url), validate_name(name) + ENTRY_SUFFIX)
