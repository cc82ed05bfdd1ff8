"""Registered versions and aliases: look them up, point an alias, promote a version only if it is better.

Registry state is expressed with aliases (``champion``) and version tags (lineage, metrics);
MLflow's stages are deprecated. An unknown model, version or alias raises :class:`RegistryError`
naming what exists instead.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from pipeline.registry.connection import RegistryError, _client, _is_missing, _wrapped, redact
from pipeline.registry.lineage import METRIC_TAG_PREFIX

_log = logging.getLogger(__name__)

CHAMPION = "champion"


def _registered_names(client: Any, limit: int = 50) -> list[str]:
    return sorted(m.name for m in client.search_registered_models(max_results=limit))


def _require_model(client: Any, name: str, uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _is_missing(exc):
            raise RegistryError(f"looking up model {name!r} at {redact(uri)} failed: {redact(exc.message)}") from None
    names = _registered_names(client)
    known = ", ".join(names) if names else "none"
    raise RegistryError(
        f"no registered model {name!r} at {redact(uri)}; registered models: {known}. "
        "Register one with `stamp meta-train` (or pipeline.registry.log_pruner)."
    )


def list_versions(name: str, tracking_uri: str | None = None) -> list[str]:
    """Version numbers of a registered model, ascending."""
    client, uri = _client(tracking_uri)
    _require_model(client, name, uri)
    return _versions(client, name)


def _versions(client: Any, name: str) -> list[str]:
    escaped = name.replace("'", "\\'")
    found = client.search_model_versions(filter_string=f"name = '{escaped}'", max_results=10_000)
    return [str(v) for v in sorted(int(mv.version) for mv in found)]


def _require_version(client: Any, name: str, version: str | int, uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    model = _require_model(client, name, uri)
    version = str(version)
    if version == "latest":
        versions = _versions(client, name)
        if not versions:
            raise RegistryError(f"model {name!r} has no versions yet")
        version = versions[-1]
    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if not _is_missing(exc) and getattr(exc, "error_code", "") != "INVALID_PARAMETER_VALUE":
            raise RegistryError(f"looking up {name!r} version {version} failed: {redact(exc.message)}") from None
    versions = _versions(client, name)
    aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
    raise RegistryError(
        f"model {name!r} has no version {version!r}; versions: {', '.join(versions) or 'none'} "
        f"(aliases: {aliases})"
    )


def _require_alias(client: Any, name: str, alias: str, uri: str) -> Any:
    model = _require_model(client, name, uri)
    if alias not in model.aliases:
        aliases = ", ".join(f"{a} -> version {v}" for a, v in sorted(model.aliases.items())) or "none"
        raise RegistryError(
            f"model {name!r} has no alias {alias!r}; aliases: {aliases}; "
            f"versions: {', '.join(_versions(client, name)) or 'none'}. "
            f"Set it with pipeline.registry.set_alias({name!r}, {alias!r}, VERSION)."
        )
    with _wrapped(f"reading alias {alias!r} of {name!r}"):
        return client.get_model_version_by_alias(name, alias)


def get_version_by_alias(name: str, alias: str, tracking_uri: str | None = None) -> Any:
    """The ``ModelVersion`` an alias points at (``.version``, ``.run_id``, ``.tags``)."""
    client, uri = _client(tracking_uri)
    return _require_alias(client, name, alias, uri)


def get_version(name: str, version: str | int, tracking_uri: str | None = None) -> Any:
    """One ``ModelVersion`` (``"latest"`` allowed)."""
    client, uri = _client(tracking_uri)
    return _require_version(client, name, version, uri)


def set_alias(name: str, alias: str, version: str | int, tracking_uri: str | None = None) -> None:
    """Point ``alias`` at ``version`` (which must exist)."""
    client, uri = _client(tracking_uri)
    mv = _require_version(client, name, version, uri)
    with _wrapped(f"setting alias {alias!r} of {name!r}"):
        client.set_registered_model_alias(name, alias, mv.version)


def version_metric(name: str, version: str | int, metric: str, tracking_uri: str | None = None) -> float:
    """A version's metric: its ``metric.<name>`` tag, else the metric of the run that logged it."""
    client, uri = _client(tracking_uri)
    return _version_metric(client, _require_version(client, name, version, uri), metric)


def _version_metric(client: Any, mv: Any, metric: str) -> float:
    tag = (mv.tags or {}).get(METRIC_TAG_PREFIX + metric)
    if tag is not None:
        try:
            return float(tag)
        except ValueError:
            raise RegistryError(f"version {mv.version} of {mv.name!r} has a non-numeric tag {METRIC_TAG_PREFIX}{metric}={tag!r}") from None
    run_metrics: dict[str, float] = {}
    if mv.run_id:
        with _wrapped(f"reading run {mv.run_id}"):
            run_metrics = client.get_run(mv.run_id).data.metrics
        if metric in run_metrics:
            return float(run_metrics[metric])
    known = sorted({k[len(METRIC_TAG_PREFIX):] for k in (mv.tags or {}) if k.startswith(METRIC_TAG_PREFIX)} | set(run_metrics))
    raise RegistryError(
        f"version {mv.version} of {mv.name!r} has no metric {metric!r}; it has: {', '.join(known) or 'none'}"
    )


def promote_if_better(
    name: str,
    version: str | int,
    metric: str,
    alias: str = CHAMPION,
    higher_is_better: bool = True,
    tracking_uri: str | None = None,
) -> bool:
    """Move ``alias`` to ``version`` only if its ``metric`` strictly beats the current holder's.

    With no current holder the alias is set. A NaN metric never wins; a tie keeps the incumbent.
    Returns whether the alias moved. Raises :class:`RegistryError` when the candidate or the
    incumbent lacks the metric (compare like with like; use :func:`set_alias` to force).

    Two promotions racing each other can both read the same incumbent: the registry has no
    compare-and-set, so run promotions from one driver.
    """
    client, uri = _client(tracking_uri)
    candidate = _require_version(client, name, version, uri)
    score = _version_metric(client, candidate, metric)
    model = _require_model(client, name, uri)
    current = model.aliases.get(alias)
    if current is not None and str(current) == str(candidate.version):
        return False
    if current is not None:
        incumbent = _require_version(client, name, current, uri)
        best = _version_metric(client, incumbent, metric)
        better = score > best if higher_is_better else score < best
        if not better or math.isnan(score):
            _log.info("%s v%s %s=%s does not beat %s v%s (%s); %r stays", name, candidate.version, metric, score, alias, current, best, alias)
            return False
    elif math.isnan(score):
        return False
    with _wrapped(f"moving alias {alias!r} of {name!r}"):
        client.set_registered_model_alias(name, alias, candidate.version)
    return True
