"""Writing the catalog safely while others write it too: one object per dataset, an index rewritten
from what exists (layout in :mod:`pipeline.data.catalog`).

* :func:`put_entry` writes one dataset's entry object. Nobody else writes that object unless they
  ingest the same dataset, so concurrent ingests of different datasets cannot lose each other's
  entries, and no conditional write (If-Match on an ETag) is needed from the object store.
* :func:`delete_entry` removes one entry object (and, for an entry that only an older
  ``catalog.json`` holds, rewrites the index without it).
* :func:`compact` rewrites the index ``catalog.json`` from the entry objects, so readers need two
  requests (GET index, LIST entries) however many datasets there are. A compaction racing another
  write may store a stale index; readers correct it from the listing, so it costs requests, not
  entries.
* :func:`load_entry` reads one dataset's entry without loading the whole catalog.
"""

from __future__ import annotations

import json

from pipeline.data import s3
from pipeline.data.catalog import Catalog, CatalogEntry, entry_url, validate_name


def put_entry(catalog_url: str, entry: CatalogEntry, *, endpoint_url: str | None = None) -> None:
    """Write (or replace) the entry object of ``entry.name``: one atomic PUT (temp + rename locally)."""
    s3.put_bytes(entry_url(catalog_url, entry.name), entry.to_json().encode("utf-8"),
                 content_type="application/json", endpoint_url=endpoint_url)


def load_entry(catalog_url: str, name: str, *, endpoint_url: str | None = None) -> CatalogEntry | None:
    """The entry of dataset ``name``, or None when the catalog does not hold it.

    One GET of its entry object; only when that is absent is the index read, for an entry that older
    code wrote there alone (one with a recorded version had its object deleted: it is gone). Only
    that entry is validated and nothing is listed, so ingesting many new datasets stays linear.
    """
    url = entry_url(catalog_url, name)
    try:
        raw = s3.get_bytes(url, endpoint_url=endpoint_url).decode("utf-8")
    except s3.ObjectNotFoundError:
        try:
            index = _json(s3.get_bytes(catalog_url, endpoint_url=endpoint_url).decode("utf-8"), f"catalog {catalog_url}")
        except s3.ObjectNotFoundError:
            return None
        legacy = index.get("datasets", {}).get(name) if isinstance(index.get("datasets"), dict) else None
        if legacy is None or name in (index.get("entry_versions") or {}):
            return None
        entry = CatalogEntry.from_dict(legacy, where=f"catalog {catalog_url}: datasets.{name}")
        if not s3.is_s3_url(catalog_url):  # the same pinning Catalog.load applies to older local catalogs
            pinned = Catalog(datasets={name: entry})
            pinned._pin_local_shards(s3.local_path(catalog_url).expanduser().resolve().parent)
            entry = pinned.datasets[name]
        return entry
    return CatalogEntry.from_dict(_json(raw, f"catalog entry {url}"), where=f"catalog entry {url}")


def _json(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def delete_entry(catalog_url: str, name: str, *, endpoint_url: str | None = None) -> CatalogEntry | None:
    """Remove dataset ``name`` from the catalog; returns its entry, or None when it was not there."""
    validate_name(name)
    catalog = Catalog.load(catalog_url, endpoint_url=endpoint_url)
    entry = catalog.datasets.get(name)
    s3.delete(entry_url(catalog_url, name), endpoint_url=endpoint_url)
    if entry is not None and name not in catalog.entry_versions:
        compact(catalog_url, drop=(name,), endpoint_url=endpoint_url)  # it lived in the index only
    return entry


def compact(catalog_url: str, *, drop: tuple[str, ...] = (), endpoint_url: str | None = None) -> Catalog:
    """Rewrite the index from the entry objects and return the catalog it now describes.

    Entries that only an older ``catalog.json`` holds are first written as entry objects (so a later
    index rewrite cannot lose them), except those named in ``drop``, which leave the catalog.
    """
    catalog = Catalog.load(catalog_url, endpoint_url=endpoint_url)
    legacy = [n for n in catalog.names() if n not in catalog.entry_versions and n not in drop]
    for name in legacy:
        put_entry(catalog_url, catalog.datasets[name], endpoint_url=endpoint_url)
    for name in drop:
        catalog.datasets.pop(name, None)
    if legacy:  # pick up the versions of the objects just written
        catalog = Catalog.load(catalog_url, endpoint_url=endpoint_url)
        for name in drop:
            catalog.datasets.pop(name, None)
    catalog.save(catalog_url, endpoint_url=endpoint_url)
    return catalog
