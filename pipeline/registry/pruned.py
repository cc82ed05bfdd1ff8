"""Logging a network pruned by `stamp prune` as its own MLflow model, registering it, serving it.

The model is a models-from-code pyfunc (:mod:`pipeline.registry.pruned_pyfunc_model`) whose
artifacts are ``pruned/`` (``spec.json`` + ``pruned_state_dict.pt``: rebuilt from the backbone
definition, weights read with ``weights_only=True``) and ``onnx/model.onnx`` (the verified ONNX
export, for runtimes without Python); its code path is a copy of ``stamp_core``. Nothing is
pickled. Its signature says uint8 ``(N, H, W, C)`` images in, float32 ``(N, classes)`` scores
out, so ``mlflow models serve -m models:/NAME@ALIAS`` answers POST /invocations with scores.

Version tags carry the lineage (``lineage.*``: pruner URI and version, dataset and its content
hash, budget) and the figures (``metric.*``); the version's description is the prune report.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.registry.connection import RegistryError, _client, _wrapped, use_tracking_uri
from pipeline.registry.lineage import _param_value, version_tags
from pipeline.registry.pruned_pyfunc_model import PRUNED_ARTIFACT, SPEC_FILE, WEIGHTS_FILE
from pipeline.registry.register import RegisteredModel, _finite_metrics, _requirements, _stage_code, ensure_experiment, open_run
from pipeline.registry.versions import set_alias
from stamp_core import PruneSpec, load_pruned_model

#: Name of the model inside its run (``runs:/<run_id>/pruned-network``).
PRUNED_MODEL_ARTIFACT_NAME = "pruned-network"
PRUNED_PYFUNC_MODEL_FILE = Path(__file__).with_name("pruned_pyfunc_model.py")
ONNX_ARTIFACT = "onnx"
ONNX_FILE = "model.onnx"
#: MLflow's SQL stores keep at most 5000 characters of a version description.
DESCRIPTION_LIMIT = 5000


def pruned_signature(image_shape: tuple[int, int, int] | None, num_classes: int) -> Any:
    """uint8 ``(N, H, W, C)`` images (any size when ``image_shape`` is None) -> float32 ``(N, num_classes)``."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    h, w, c = image_shape if image_shape is not None else (-1, -1, -1)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, c))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )


def _description(text: str | None) -> str | None:
    if text is None or len(text) <= DESCRIPTION_LIMIT:
        return text
    note = "\n\n(truncated: the whole report is the run artifact report/report.md)"
    return text[: DESCRIPTION_LIMIT - len(note)] + note


def log_pruned_model(
    model_dir: str | Path,
    *,
    name: str,
    alias: str | None = None,
    lineage: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    description: str | None = None,
    report_files: Sequence[str | Path] = (),
    experiment: str | None = "stamp-prune",
    tracking_uri: str | None = None,
) -> RegisteredModel:
    """Log the pruned network in ``model_dir`` (written by `stamp prune`) as a pyfunc model and register it.

    Args:
        model_dir: holds ``spec.json`` and ``pruned_state_dict.pt``, optionally ``model.onnx``.
        name: registered model name (a new version is created).
        alias: point this alias at the new version.
        lineage: ``lineage.<key>`` version and run tags (pruner URI/version, dataset, hash, budget).
        metrics: logged to the run and as ``metric.<key>`` version tags (accuracy, MACs ratio).
        description: the version's description (the prune report); cut to MLflow's 5000 characters.
        report_files: run artifacts logged under ``report/`` (report.md, report.json, the kept-channels PNG).
        experiment: experiment of the new run (created if missing); ignored inside an active run.
        tracking_uri: default: settings / ``MLFLOW_TRACKING_URI``.

    Raises:
        RegistryError: ``model_dir`` is not a pruned model, the store is unreachable or refused.
    """
    src = Path(model_dir)
    spec = _checked_spec(src)
    num_classes = int(spec.metadata.get("num_classes") or spec.backbone.get("num_classes"))
    raw_shape = spec.metadata.get("image_shape")
    image_shape = tuple(int(v) for v in raw_shape) if raw_shape else None
    metrics = _finite_metrics(metrics)
    tags = {**version_tags(lineage, metrics), "stamp.kind": "pruned-network", "stamp.backbone": str(spec.backbone.get("name"))}

    client, uri = _client(tracking_uri)
    experiment_id = None if experiment is None else ensure_experiment(experiment, tracking_uri=uri)
    with (
        use_tracking_uri(uri),
        tempfile.TemporaryDirectory(prefix="stamp-log-pruned-") as tmp,
        _wrapped(f"logging pruned network {name!r}"),
    ):
        artifacts = _stage_artifacts(src, Path(tmp))
        code_dir = _stage_code(Path(tmp) / "code")
        example_shape = image_shape or (int(spec.input_shape[1]), int(spec.input_shape[2]), int(spec.input_shape[0]))
        example = np.random.default_rng(0).integers(0, 256, (2, *example_shape), dtype=np.uint8)
        with open_run(None, experiment_id, f"{name}-register") as run:
            _log_run_records(lineage, metrics, tags, report_files)
            info = _log_pyfunc(name, spec, artifacts, code_dir, pruned_signature(image_shape, num_classes), example)
            version = str(info.registered_model_version)
            _annotate_version(client, name, version, tags, description)
            run_id = run.info.run_id
    if alias:
        set_alias(name, alias, version, tracking_uri=uri)
    return RegisteredModel(name=name, version=version, model_uri=info.model_uri, run_id=run_id)


def _checked_spec(src: Path) -> PruneSpec:
    """The spec of the pruned model in ``src``, once its weights are known to load into it."""
    missing = [f for f in (SPEC_FILE, WEIGHTS_FILE) if not (src / f).is_file()]
    if missing:
        raise RegistryError(f"{src} is not a pruned model directory: missing {', '.join(missing)} (written by `stamp prune`)")
    # Fail here, before anything is sent, if the weights do not load into the spec's architecture.
    try:
        load_pruned_model(src / SPEC_FILE, src / WEIGHTS_FILE)
    except ValueError as exc:
        raise RegistryError(f"cannot register {src}: {exc}") from None
    return PruneSpec.load(src / SPEC_FILE)


def _stage_artifacts(src: Path, tmp: Path) -> dict[str, str]:
    """The model's artifacts: spec + weights copied under ``tmp``, and the ONNX export when ``src`` has one."""
    staged = tmp / PRUNED_ARTIFACT
    staged.mkdir()
    for f in (SPEC_FILE, WEIGHTS_FILE):
        shutil.copy2(src / f, staged / f)
    artifacts = {PRUNED_ARTIFACT: str(staged)}
    if (src / ONNX_FILE).is_file():
        artifacts[ONNX_ARTIFACT] = str(src / ONNX_FILE)
    return artifacts


def _log_run_records(lineage: Mapping[str, Any] | None, metrics: Mapping[str, float], tags: Mapping[str, str],
                     report_files: Sequence[str | Path]) -> None:
    """Lineage params, metrics, tags and the report files of the active run."""
    import mlflow

    if lineage:
        mlflow.log_params({f"lineage.{k}": _param_value(k, v) for k, v in lineage.items() if v is not None})
    if metrics:
        mlflow.log_metrics(metrics)
    mlflow.set_tags(tags)
    for path in report_files:
        mlflow.log_artifact(str(path), "report")


def _log_pyfunc(name: str, spec: PruneSpec, artifacts: dict[str, str], code_dir: Path, signature: Any,
                example: np.ndarray) -> Any:
    """Log the models-from-code pyfunc in the active run and register it as a new version of ``name``."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name=PRUNED_MODEL_ARTIFACT_NAME,
        python_model=str(PRUNED_PYFUNC_MODEL_FILE),
        artifacts=artifacts,
        code_paths=[str(code_dir)],
        signature=signature,
        input_example=example,
        pip_requirements=_requirements(),
        registered_model_name=name,
        metadata={"stamp": {
            "kind": "pruned-network",
            "class_names": list(spec.metadata.get("class_names") or []),
            "dataset": spec.metadata.get("dataset"),
            "backbone": spec.backbone,
        }},
    )


def _annotate_version(client: Any, name: str, version: str, tags: Mapping[str, str], description: str | None) -> None:
    """The version's tags (lineage and metrics) and its description, cut to what MLflow keeps."""
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if description:
        client.update_model_version(name, version, description=_description(description))
