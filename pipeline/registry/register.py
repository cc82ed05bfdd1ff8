"""Logging a pruner to MLflow as a models-from-code pyfunc and registering it; registering from a checkpoint.

A pruner is logged with ``python_model=pipeline/registry/pyfunc_model.py``; its artifacts are the
pruner directory written by :meth:`stamp_core.StampPruner.save` (``pruner.json`` +
``pruner_state_dict.pt``) and its code path is a copy of ``stamp_core``. Nothing is pickled.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import stamp_core
from pipeline.registry.connection import RegistryError, _client, _wrapped, redact, use_tracking_uri
from pipeline.registry.lineage import _param_value, _scrub, lineage_tags
from pipeline.registry.loading import _load_local
from pipeline.registry.pyfunc_model import DEFAULT_MACS_RATIO, DEFAULT_ROUND_TO, PRUNER_ARTIFACT
from pipeline.registry.versions import set_alias
from stamp_core import StampPruner

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure

DEFAULT_MODEL_NAME = "stamp-pruner"
#: Name of the model inside its run (``runs:/<run_id>/pruner``).
MODEL_ARTIFACT_NAME = "pruner"
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
_REQUIREMENTS = ("mlflow", "torch", "torch-pruning", "numpy", "pandas")


@dataclass(frozen=True)
class RegisteredModel:
    """Where a logged model (a pruner, or a network it pruned) lives."""

    name: str  #: registered model name
    version: str | None  #: registry version; None when logged with ``register=False``
    model_uri: str  #: the logged model's own URI (``models:/m-...``)
    run_id: str

    @property
    def uri(self) -> str:
        """``models:/NAME/VERSION`` when registered, else the logged model URI."""
        return f"models:/{self.name}/{self.version}" if self.version else self.model_uri


#: The name the pruner's callers know; the same record.
RegisteredPruner = RegisteredModel

# ----------------------------------------------------------------------------- logging


def pruner_signature() -> Any:
    """Params: macs_ratio, round_to, labels, proposals; output: spec JSON(s); no input schema (the model checks its input).

    A tensor input schema would make MLflow's scoring server cast the JSON pixels to its dtype
    before the model sees them (floats silently truncated to uint8) and answer an empty image set
    with its own shape error; see the contract in :mod:`pipeline.registry.pyfunc_model`.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([
            ParamSpec("macs_ratio", DataType.double, DEFAULT_MACS_RATIO),
            ParamSpec("round_to", DataType.long, DEFAULT_ROUND_TO),
            ParamSpec("labels", DataType.long, [], (-1,)),
            ParamSpec("proposals", DataType.long, 1),
        ]),
    )


def _input_example(pruner: StampPruner) -> tuple[np.ndarray, dict[str, Any]]:
    size = pruner.config.image_size
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, pruner.backbone.in_channels), dtype=np.uint8)
    if pruner.config.generator == "outcome":  # it reads class labels (separability, class count)
        return images, {"macs_ratio": DEFAULT_MACS_RATIO, "labels": [0, 1]}
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


def open_run(run_id: str | None, experiment_id: str | None, run_name: str) -> Any:
    """The run to log into: ``run_id``, else the caller's active run (left open), else a new run.

    ``mlflow.start_run`` begins the run when called, not when entered: call this only once
    nothing local can fail any more.
    """
    import mlflow

    active = mlflow.active_run()
    if run_id is not None and (active is None or active.info.run_id != run_id):
        return mlflow.start_run(run_id=run_id, nested=active is not None)
    if active is not None:
        return nullcontext(active)  # the caller's run: theirs to end
    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name)


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
        # Only now that nothing local can fail any more: a failure never leaves a dangling run.
        with open_run(run_id, experiment_id, f"{name}-log") as run:
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
    from pipeline.config import resolved_storage_path
    from pipeline.data import CHECKPOINT_PREFIX, checkpoint_to_local, download_prefix, latest_run_checkpoint, s3

    expected = (
        "expected a checkpoint directory (pruner.json + pruner_state_dict.pt), a Ray run directory "
        "(local or s3://bucket/prefix/RUN) or the run name of a training job"
    )
    shown = redact(source)
    if source.startswith("s3://"):
        if s3.exists(s3.join_url(source, "pruner.json")):
            return download_prefix(source, tmp / "checkpoint"), source
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
