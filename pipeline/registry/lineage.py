"""Lineage of a registered pruner: code and package versions, config hashes, scrubbed tags and params.

Version tags are for searching (``lineage.<key>``, ``metric.<name>``, ``stamp.*``); a mapping-valued
lineage item (a training config) becomes a ``lineage.<key>_hash`` tag and a scrubbed JSON artifact.
Nothing that looks like a secret (by key, or as URL credentials) reaches a tag or a param.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import stamp_core
from pipeline.registry.connection import redact
from stamp_core import StampPruner

#: Version tags that :func:`pipeline.registry.promote_if_better` reads metrics from (``metric.<name>``).
METRIC_TAG_PREFIX = "metric."
LINEAGE_TAG_PREFIX = "lineage."
_TAG_LIMIT = 5000  # well under MLflow's limits for run (8000) and version tags
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key|api_key", re.IGNORECASE)


def config_hash(config: Any) -> str:
    """sha256 of a config's canonical JSON (sorted keys), the same across processes and machines."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def package_version() -> str:
    try:
        return importlib.metadata.version("stamp-pruning")
    except importlib.metadata.PackageNotFoundError:
        return stamp_core.__version__


def code_version() -> str:
    """The git commit of this checkout (``-dirty`` when tracked files changed), else the package version."""
    repo = Path(__file__).resolve().parents[2]  # pipeline/registry/lineage.py -> the checkout
    if not (repo / ".git").exists():
        return package_version()
    try:
        # --no-optional-locks: a read-only query must not rewrite the index of a checkout
        # someone else may be committing in.
        sha = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return package_version()
    return f"{sha}-dirty" if status else sha


def _scrub(value: Any) -> Any:
    """Copy of a config with secret-looking keys masked and URL credentials removed."""
    if isinstance(value, Mapping):
        return {str(k): ("***" if _SECRET_KEY.search(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def _tag_value(value: Any) -> str:
    if isinstance(value, (list, tuple, set)):
        text = ",".join(str(v) for v in (sorted(value) if isinstance(value, set) else value))
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    text = redact(text)
    return text if len(text) <= _TAG_LIMIT else text[: _TAG_LIMIT - 20] + "...(truncated)"


def _param_value(key: Any, value: Any) -> str:
    """A param/tag value safe to log: masked under a secret-looking key, URL credentials removed."""
    return "***" if _SECRET_KEY.search(str(key)) else _tag_value(value)


def lineage_tags(pruner: StampPruner, lineage: Mapping[str, Any] | None, metrics: Mapping[str, float] | None) -> dict[str, str]:
    """Version tags: code/package version, backbone, lineage items and metrics.

    Mapping-valued lineage items (a training config) become ``lineage.<key>_hash``; their
    scrubbed JSON is logged as a run artifact instead, since tags are for searching.
    """
    return {
        "stamp.pruner_version": pruner.config.version,
        "stamp.backbone": str(pruner.backbone.config.get("name")),
        "stamp.image_size": str(pruner.config.image_size),
        **version_tags(lineage, metrics),
    }


def version_tags(lineage: Mapping[str, Any] | None, metrics: Mapping[str, float] | None) -> dict[str, str]:
    """Code and package version, ``lineage.<key>`` for each lineage item, ``metric.<name>`` for each metric."""
    tags = {"stamp.code_version": code_version(), "stamp.package_version": package_version()}
    for key, value in (lineage or {}).items():
        if isinstance(value, Mapping):
            tags[f"{LINEAGE_TAG_PREFIX}{key}_hash"] = config_hash(value)
        elif value is not None:
            tags[LINEAGE_TAG_PREFIX + key] = _tag_value(value)
    for key, value in (metrics or {}).items():
        tags[METRIC_TAG_PREFIX + key] = repr(float(value))
    return tags
