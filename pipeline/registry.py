"""MLflow model registry for STAMP pruners: log, register, alias, promote, load.

A pruner is logged as a models-from-code pyfunc (``pipeline/pyfunc_model.py``) whose artifacts
are the pruner directory written by :meth:`stamp_core.StampPruner.save` (``pruner.json`` +
``pruner_state_dict.pt``) and whose code path is a copy of ``stamp_core``. Nothing is pickled:

* ``mlflow.pyfunc.load_model("models:/stamp-pruner@champion")`` executes the logged model file
  and rebuilds the pruner from JSON + a ``weights_only=True`` state_dict;
* :func:`load_pruner` skips pyfunc altogether: it downloads the artifacts and calls
  ``StampPruner.load``.

Registry state is expressed with aliases (``champion``) and version tags (lineage, metrics);
MLflow's stages are deprecated. Every failure a user can cause (unreachable server, unknown
model, alias or version) raises :class:`RegistryError` naming what exists instead.

The tracking URI is, in order: the ``tracking_uri`` argument, one set in-process with
``mlflow.set_tracking_uri`` or ``MLFLOW_TRACKING_URI``, then :func:`pipeline.settings.get_settings`
(the running stack's server, else a local sqlite file). Credentials are never parameters: MLflow
and boto3 read them from the environment, and URIs are redacted before they reach a message.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import numpy as np
import yaml
from matplotlib.figure import Figure

import stamp_core
from pipeline.pyfunc_model import DEFAULT_MACS_RATIO, DEFAULT_ROUND_TO, PRUNER_ARTIFACT
from stamp_core import PruneSpec, StampPruner
from stamp_core.pruner import WeightsFileError

_log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "stamp-pruner"
CHAMPION = "champion"
#: Name of the model inside its run (``runs:/<run_id>/pruner``).
MODEL_ARTIFACT_NAME = "pruner"
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
#: Version tags that :func:`promote_if_better` reads metrics from (``metric.<name>``).
METRIC_TAG_PREFIX = "metric."
LINEAGE_TAG_PREFIX = "lineage."
_TAG_LIMIT = 5000  # well under MLflow's limits for run (8000) and version tags
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key|api_key", re.IGNORECASE)
_USERINFO = re.compile(r"(?<=//)[^/@\s]+@")
_REQUIREMENTS = ("mlflow", "torch", "torch-pruning", "numpy", "pandas")


class RegistryError(RuntimeError):
    """A registry operation failed for a reason the user can fix; the message says how."""


@dataclass(frozen=True)
class RegisteredPruner:
    """Where a logged pruner lives."""

    name: str  #: registered model name
    version: str | None  #: registry version; None when logged with ``register=False``
    model_uri: str  #: the logged model's own URI (``models:/m-...``)
    run_id: str

    @property
    def uri(self) -> str:
        """``models:/NAME/VERSION`` when registered, else the logged model URI."""
        return f"models:/{self.name}/{self.version}" if self.version else self.model_uri


# ----------------------------------------------------------------------------- connection


def redact(text: str) -> str:
    """Drop ``user:password@`` from every URL in ``text``."""
    return _USERINFO.sub("***@", text)


def _strip_userinfo(uri: str) -> str:
    p = urlparse(uri)
    if p.username is None and p.password is None:
        return uri
    host = p.hostname or ""
    netloc = host + (f":{p.port}" if p.port else "")
    return urlunparse(p._replace(netloc=netloc))


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The tracking URI to use (argument > mlflow's own setting/env > pipeline settings)."""
    if tracking_uri:
        return tracking_uri
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    import mlflow

    if is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    from pipeline.settings import get_settings

    return get_settings().mlflow_uri


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when the tracking store cannot be used.

    MLflow's own client retries an unreachable server with exponential backoff for minutes; a
    single short probe up front turns that into an immediate, actionable error.
    """
    shown = redact(uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        url = _strip_userinfo(uri).rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - http(s) only
                pass
        except urllib.error.HTTPError:
            return  # something answered (auth, proxy path): the server is reachable
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryError(
                f"cannot reach the MLflow tracking server at {shown} ({redact(str(reason))}). "
                "Start the local stack with `stamp stack up`, or point MLFLOW_TRACKING_URI at a running server."
            ) from None
    elif scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:" and not Path(path).parent.is_dir():
            raise RegistryError(
                f"the MLflow sqlite store {shown} is in a directory that does not exist "
                f"({Path(path).parent}): create it, or use an absolute sqlite:////abs/path/mlflow.db"
            )
    elif scheme in ("", "file"):
        raise RegistryError(
            f"tracking URI {shown} is a plain file store, which MLflow 3 no longer supports for the "
            "registry: use sqlite:////abs/path/mlflow.db or an MLflow server (http://host:port)"
        )


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (runs, log_model, pyfunc.load_model) at ``uri`` for a block.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` and, when restored to
    "unset", deletes it; this restores the previous global *and* the environment exactly, so
    a caller's (or a test fixture's) configuration survives.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    if mlflow.get_tracking_uri() == uri:
        yield
        return
    old_global = tracking_utils._tracking_uri
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = old_global
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
        reset = getattr(tracking_utils, "reset", None)
        if callable(reset):
            reset()  # the tracer provider caches the URI it exports to


def _client(tracking_uri: str | None) -> tuple[Any, str]:
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


@contextmanager
def _wrapped(action: str) -> Iterator[None]:
    """Turn MLflow's exceptions into RegistryError, redacted, keeping our own untouched."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except RegistryError:
        raise
    except MlflowException as exc:
        raise RegistryError(f"{action} failed: {redact(exc.message)}") from None


# ----------------------------------------------------------------------------- lookups


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


# ----------------------------------------------------------------------------- lineage


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
    repo = Path(__file__).resolve().parent.parent
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
    tags = {
        "stamp.code_version": code_version(),
        "stamp.package_version": package_version(),
        "stamp.pruner_version": pruner.config.version,
        "stamp.backbone": str(pruner.backbone.config.get("name")),
        "stamp.image_size": str(pruner.config.image_size),
    }
    for key, value in (lineage or {}).items():
        if isinstance(value, Mapping):
            tags[f"{LINEAGE_TAG_PREFIX}{key}_hash"] = config_hash(value)
        elif value is not None:
            tags[LINEAGE_TAG_PREFIX + key] = _tag_value(value)
    for key, value in (metrics or {}).items():
        tags[METRIC_TAG_PREFIX + key] = repr(float(value))
    return tags


# ----------------------------------------------------------------------------- logging


def pruner_signature() -> Any:
    """Input: uint8 ``(N, H, W, C)`` images; params: macs_ratio, round_to, labels; output: spec JSON."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([
            ParamSpec("macs_ratio", DataType.double, DEFAULT_MACS_RATIO),
            ParamSpec("round_to", DataType.long, DEFAULT_ROUND_TO),
            ParamSpec("labels", DataType.long, [], (-1,)),
        ]),
    )


def _input_example(pruner: StampPruner) -> tuple[np.ndarray, dict[str, Any]]:
    size = pruner.config.image_size
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, pruner.backbone.in_channels), dtype=np.uint8)
    return images, {"macs_ratio": DEFAULT_MACS_RATIO}


def _requirements() -> list[str]:
    """Pinned from this environment: inferring them makes MLflow load the model in a subprocess."""
    pins = []
    for dist in _REQUIREMENTS:
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def _stage_code(dest: Path) -> Path:
    """A clean copy of stamp_core (sources only) for the model's code path."""
    src = Path(stamp_core.__file__).resolve().parent
    target = dest / "stamp_core"
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return target


def _finite_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise RegistryError(f"metric {key!r}={value!r} is not a number") from None
    return out


def log_pruner(
    pruner: StampPruner,
    *,
    name: str = DEFAULT_MODEL_NAME,
    register: bool = True,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
    plots: Mapping[str, Figure] | None = None,
    run_id: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
) -> RegisteredPruner:
    """Log ``pruner`` as a pyfunc model to an MLflow run and (by default) register it.

    Args:
        pruner: the pruner to log (saved as JSON config + state_dict).
        name: registered model name.
        register: create a new version of ``name``; otherwise only log the model.
        metrics: meta-validation metrics; logged to the run and as ``metric.<k>`` version tags
            (what :func:`promote_if_better` compares).
        params: run parameters (values stringified by MLflow).
        tags: extra run and version tags.
        lineage: e.g. ``catalog_hash``, ``source_datasets`` (list), ``config`` (dict -> hashed tag
            + scrubbed ``lineage/config.json`` artifact), ``config_hash``.
        plots: figures logged as ``plots/<key>.png``.
        run_id: log into this existing run; default: the active run, else a new run.
        experiment: experiment name to log a new run under (created if missing).
        tracking_uri: see the module docstring.

    Raises:
        RegistryError: tracking store unreachable or MLflow refused the operation.
    """
    metrics = _finite_metrics(metrics)
    client, uri = _client(tracking_uri)
    experiment_id = None if experiment is None else ensure_experiment(experiment, tracking_uri=uri)
    with use_tracking_uri(uri):
        return _log_pruner(
            client, pruner, name=name, register=register, metrics=metrics, params=params, tags=tags,
            lineage=lineage, plots=plots, run_id=run_id, experiment_id=experiment_id,
        )


def ensure_experiment(name: str, tracking_uri: str | None = None) -> str:
    """Id of experiment ``name``, created if missing.

    On a sqlite store a new experiment keeps its artifacts next to the database
    (``<db dir>/mlflow-artifacts/<name>``) instead of MLflow's default ``./mlruns`` under
    whatever directory the process happens to run in.
    """
    client, uri = _client(tracking_uri)
    with _wrapped(f"looking up experiment {name!r}"):
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if uri.startswith("sqlite:///") and uri[len("sqlite:///"):] not in ("", ":memory:"):
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
            location = (Path(uri[len("sqlite:///"):]).parent / "mlflow-artifacts" / safe).resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)


def _log_pruner(
    client: Any,
    pruner: StampPruner,
    *,
    name: str,
    register: bool,
    metrics: dict[str, float],
    params: Mapping[str, Any] | None,
    tags: Mapping[str, Any] | None,
    lineage: Mapping[str, Any] | None,
    plots: Mapping[str, Figure] | None,
    run_id: str | None,
    experiment_id: str | None,
) -> RegisteredPruner:
    import mlflow

    version_tags = lineage_tags(pruner, lineage, metrics)
    version_tags.update({str(k): _param_value(k, v) for k, v in (tags or {}).items()})

    with tempfile.TemporaryDirectory(prefix="stamp-log-") as tmp, _wrapped(f"logging pruner {name!r}"):
        tmp_path = Path(tmp)
        pruner_dir = pruner.save(tmp_path / PRUNER_ARTIFACT)
        code_dir = _stage_code(tmp_path / "code")
        # start_run begins the run when called, not when entered: only now that nothing local
        # can fail any more, so a failure never leaves a dangling active run behind.
        active = mlflow.active_run()
        if run_id is not None and (active is None or active.info.run_id != run_id):
            run_ctx: Any = mlflow.start_run(run_id=run_id, nested=active is not None)
        elif active is not None:
            run_ctx = nullcontext(active)  # the caller's run: theirs to end
        else:
            run_ctx = mlflow.start_run(experiment_id=experiment_id, run_name=f"{name}-log")
        with run_ctx as run:
            if params:
                mlflow.log_params({str(k): _param_value(k, v) for k, v in params.items()})
            if metrics:
                mlflow.log_metrics(metrics)
            mlflow.set_tags(version_tags)
            for key, value in (lineage or {}).items():
                if isinstance(value, Mapping):
                    mlflow.log_dict(_scrub(value), f"lineage/{key}.json")
            for key, fig in (plots or {}).items():
                mlflow.log_figure(fig, f"plots/{key}.png")
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={PRUNER_ARTIFACT: str(pruner_dir)},
                code_paths=[str(code_dir)],
                signature=pruner_signature(),
                input_example=_input_example(pruner),
                pip_requirements=_requirements(),
                registered_model_name=name if register else None,
                metadata={"stamp": {
                    "backbone": pruner.backbone.config,
                    "image_size": pruner.config.image_size,
                    "pruner_version": pruner.config.version,
                }},
            )
            version = None
            if register:
                version = str(info.registered_model_version)
                for key, value in version_tags.items():
                    client.set_model_version_tag(name, version, key, value)
            run_id_out = run.info.run_id
    return RegisteredPruner(name=name, version=version, model_uri=info.model_uri, run_id=run_id_out)


# ----------------------------------------------------------------------------- loading


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (name, alias, None); ``models:/NAME/V`` -> (name, None, V)."""
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, _, version = rest.rpartition("/")
        if name and version:
            return name, None, version
    elif rest.startswith("m-"):
        return rest, None, None  # a logged model id: nothing to check in the registry
    raise RegistryError(f"cannot parse model URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def _pruner_dir_of_model(model_dir: Path) -> Path:
    """The pruner artifact directory inside a downloaded MLflow model."""
    mlmodel = model_dir / "MLmodel"
    try:
        meta = yaml.safe_load(mlmodel.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"{mlmodel} is not a readable MLmodel file: {exc}") from None
    try:
        rel = meta["flavors"]["python_function"]["artifacts"][PRUNER_ARTIFACT]["path"]
    except (KeyError, TypeError):
        raise RegistryError(
            f"the model at {model_dir} is not a STAMP pruner: its MLmodel has no "
            f"python_function artifact {PRUNER_ARTIFACT!r}"
        ) from None
    path = (model_dir / rel).resolve()
    if model_dir.resolve() not in path.parents:
        raise RegistryError(f"the model's {PRUNER_ARTIFACT!r} artifact path {rel!r} leaves the model directory")
    return path


def _load_local(path: Path) -> StampPruner:
    if (path / "MLmodel").is_file():
        path = _pruner_dir_of_model(path)
    if (path / "pruner.json").is_file():
        try:
            return StampPruner.load(path)
        except WeightsFileError as exc:
            # Unsafe or corrupt weights: not a version mismatch, say exactly that.
            raise RegistryError(f"cannot load the pruner in {path}: {exc}") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            # A pruner saved by another stamp_core whose modules changed: say so, not just
            # which state_dict keys differ.
            try:
                saved = json.loads((path / "pruner.json").read_text()).get("version", "?")
            except (OSError, ValueError):
                saved = "?"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RegistryError(
                f"the pruner in {path} (saved by stamp_core {saved}) does not load into the installed "
                f"stamp_core {stamp_core.__version__}: {first}. Load it through "
                "mlflow.pyfunc.load_model (which runs the code it was logged with) or re-train it."
            ) from exc
    raise RegistryError(
        f"{path} is neither a saved pruner (pruner.json + pruner_state_dict.pt) nor an MLflow model directory"
    )


def load_pruner(uri: str | Path, tracking_uri: str | None = None) -> StampPruner:
    """Load a pruner without pyfunc (no code from the artifact store runs; weights_only=True).

    Accepts ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` (or ``latest``), ``models:/m-<id>``,
    ``runs:/RUN_ID/pruner``, an artifact URI MLflow can download, or a local directory (a saved
    pruner or a downloaded model).
    """
    import mlflow

    text = str(uri)
    if text.startswith("file://"):
        text = urlparse(text).path
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", text):  # no scheme: a local path
        local = Path(text).expanduser()
        if not local.is_dir():
            raise RegistryError(
                f"{local} is not a directory: expected a saved pruner directory, a downloaded model, "
                "or a URI such as models:/stamp-pruner@champion"
            )
        return _load_local(local)
    if not text.startswith(("models:/", "runs:/", "s3://", "mlflow-artifacts:/", "http://", "https://")):
        raise RegistryError(
            f"cannot load a pruner from {redact(text)!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION, "
            "runs:/RUN_ID/pruner or an existing local directory"
        )
    client, turi = _client(tracking_uri)
    if text.startswith("models:/"):
        name, alias, version = _parse_models_uri(text)
        if alias is not None:
            _require_alias(client, name, alias, turi)
        elif version is not None:
            _require_version(client, name, version, turi)
    # use_tracking_uri as well as the arguments: parts of MLflow's models:/ resolution read the
    # global URIs and would otherwise look in (and create) ./mlflow.db.
    with (
        tempfile.TemporaryDirectory(prefix="stamp-pruner-") as tmp,
        _wrapped(f"downloading {redact(text)}"),
        use_tracking_uri(turi),
    ):
        local_path = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=tmp, tracking_uri=turi, registry_uri=turi))
        if local_path.is_file():
            raise RegistryError(f"{redact(text)} is a single file: expected a model or pruner directory")
        return _load_local(local_path)


# ----------------------------------------------------------------------------- from a checkpoint


def register_from_checkpoint(
    source: str | Path,
    *,
    name: str = DEFAULT_MODEL_NAME,
    alias: str | None = None,
    experiment: str = "stamp-meta-train",
    storage_path: str | None = None,
    tracking_uri: str | None = None,
) -> RegisteredPruner:
    """Register the pruner a training run left in its checkpoint storage.

    This is the way back when MLflow was unreachable as a job ended: the pruner is safe in the
    run's checkpoints and is registered later, once the server is back.

    Args:
        source: a checkpoint directory (``pruner.json`` + ``pruner_state_dict.pt``), a Ray run
            directory (local or ``s3://``; its latest checkpoint), or a run name under
            ``storage_path``.
        name: registered model name.
        alias: point this alias at the new version (unconditionally).
        experiment: experiment of the new MLflow run, when the checkpoint's own run is not on
            this server.
        storage_path: where run names are looked up (default: the settings' ``ray_results``).
        tracking_uri: see the module docstring.

    Raises:
        RegistryError: tracking store unreachable (checked first), no checkpoint at ``source``,
            or the checkpoint does not hold a loadable pruner.
    """
    from mlflow.exceptions import MlflowException

    client, uri = _client(tracking_uri)  # fail before downloading anything
    with tempfile.TemporaryDirectory(prefix="stamp-register-") as tmp:
        ckpt_dir, where = _checkpoint_dir(str(source), Path(tmp), storage_path)
        pruner = _load_local(ckpt_dir)
        try:
            state = json.loads((ckpt_dir / "state.json").read_text())
        except (OSError, ValueError):
            state = {}
        state = state if isinstance(state, dict) else {}
        run_id = state.get("mlflow_run_id")
        if run_id:
            try:
                client.get_run(str(run_id))
            except MlflowException:
                run_id = None  # that run lives on another (or a reset) server: start a new one
        lineage = {
            "checkpoint": where,
            "run_name": state.get("run_name"),
            "checkpoint_step": state.get("step"),
            "config_hash": state.get("config_hash"),
            "source_mlflow_run_id": state.get("mlflow_run_id"),
        }
        registered = log_pruner(
            pruner,
            name=name,
            lineage={k: v for k, v in lineage.items() if v is not None},
            tags={"stamp.registered_from": "checkpoint"},
            run_id=str(run_id) if run_id else None,
            experiment=None if run_id else experiment,
            tracking_uri=uri,
        )
    if alias:
        set_alias(name, alias, registered.version or "latest", tracking_uri=uri)
    return registered


def _checkpoint_dir(source: str, tmp: Path, storage_path: str | None) -> tuple[Path, str]:
    """(local directory holding the pruner, printable location) for register_from_checkpoint."""
    from pipeline import s3
    from pipeline.config import resolved_storage_path
    from pipeline.train import CHECKPOINT_PREFIX, _download_prefix, checkpoint_to_local, latest_run_checkpoint

    expected = (
        "expected a checkpoint directory (pruner.json + pruner_state_dict.pt), a Ray run directory "
        "(local or s3://bucket/prefix/RUN) or the run name of a training job"
    )
    shown = redact(source)
    if source.startswith("s3://"):
        if s3.exists(s3.join_url(source, "pruner.json")):
            return _download_prefix(source, tmp / "checkpoint"), source
        storage, _, run = source.rstrip("/").rpartition("/")
        if storage in ("s3:", "s3:/") or not run:
            raise RegistryError(f"{shown}: {expected}")
    elif "://" in source:
        raise RegistryError(f"{shown}: unsupported location; {expected}")
    else:
        local = Path(source).expanduser()
        if (local / "pruner.json").is_file():
            return local, str(local.resolve())
        if local.is_dir():
            storage, run = str(local.resolve().parent), local.resolve().name
        elif "/" in source or "\\" in source or source.startswith("."):
            raise RegistryError(f"{shown} does not exist: {expected}")
        else:
            storage, run = resolved_storage_path(storage_path), source
    found = latest_run_checkpoint(storage, run)
    if found is None:
        if not storage.startswith("s3://"):
            # A run directory Ray never finished describing (driver killed): its checkpoints are still whole.
            done = sorted(p for p in (Path(storage) / run).glob(f"{CHECKPOINT_PREFIX}*") if (p / "pruner.json").is_file())
            if done:
                return done[-1], str(done[-1])
        raise RegistryError(f"no checkpoint of run {run!r} under {redact(storage)}: {expected}")
    checkpoint, _ = found
    local_dir = checkpoint_to_local(checkpoint, tmp)
    if not (local_dir / "pruner.json").is_file():
        raise RegistryError(f"the latest checkpoint of run {run!r} under {redact(storage)} holds no pruner (a pretraining run?)")
    return local_dir, f"{storage.rstrip('/')}/{run}/{Path(checkpoint.path).name}"


# ----------------------------------------------------------------------------- plots


def plot_kept_fractions(specs: Mapping[str, PruneSpec], max_tasks: int = 6) -> Figure:
    """Per-layer fraction of channels kept, one bar series per task (at most ``max_tasks``)."""
    if not specs:
        raise ValueError("plot_kept_fractions needs at least one spec")
    items = list(specs.items())[:max_tasks]
    groups = list(items[0][1].group_sizes)
    fig = Figure(figsize=(max(6.0, 0.45 * len(groups) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(items)
    xs = np.arange(len(groups))
    for i, (task, spec) in enumerate(items):
        fractions = [len(spec.kept.get(g, [])) / spec.group_sizes.get(g, 1) for g in groups]
        ax.bar(xs + (i - (len(items) - 1) / 2) * width, fractions, width, label=f"{task} ({spec.macs_ratio:.2f} MACs)")
    ax.set_xticks(xs, [g.replace(".", "\n", 1) if len(g) > 12 else g for g in groups], fontsize=7, rotation=60)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept channel fraction")
    ax.set_title("Channels kept per layer")
    ax.legend(fontsize=7)
    return fig


def plot_accuracy_vs_macs(curves: Mapping[str, Sequence[tuple[float, float]]], title: str = "Accuracy vs MACs") -> Figure:
    """One line per method/task through ``(macs_ratio, accuracy)`` points."""
    if not curves:
        raise ValueError("plot_accuracy_vs_macs needs at least one curve")
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for label, points in curves.items():
        pts = sorted((float(r), float(a)) for r, a in points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("MACs ratio (pruned / full)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_training_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str] | None = None, title: str = "Training") -> Figure:
    """One panel per metric over ``epoch`` (or ``step``, else record index)."""
    if not history:
        raise ValueError("plot_training_curves needs at least one record")
    x_key = next((k for k in ("step", "epoch") if k in history[0]), None)
    if keys is None:
        keys = [k for k, v in history[0].items() if k not in {x_key, "seconds", "epoch", "step"} and isinstance(v, (int, float))]
    if not keys:
        raise ValueError(f"no numeric metric to plot in records with keys {sorted(history[0])}")
    fig = Figure(figsize=(4.0 * len(keys), 3.2), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    xs = [r.get(x_key, i) if x_key else i for i, r in enumerate(history)]
    for ax, key in zip(axes, keys):
        ax.plot(xs, [r.get(key, float("nan")) for r in history])
        ax.set_xlabel(x_key or "record")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig
