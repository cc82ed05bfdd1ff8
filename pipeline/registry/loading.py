"""Loading a registered pruner without pyfunc: download the model's artifacts, rebuild from JSON + state_dict.

No code from the artifact store runs and weights are read with ``weights_only=True``. Accepts
``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` (or ``latest``), ``models:/m-<id>``,
``runs:/RUN_ID/pruner``, an artifact URI MLflow can download, or a local directory (a saved
pruner or a downloaded model, whatever path its MLmodel names for its code).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import yaml

import stamp_core
from pipeline.registry.connection import RegistryError, _client, _wrapped, redact, use_tracking_uri
from pipeline.registry.versions import _require_alias, _require_version
from pipeline.registry.pyfunc_model import PRUNER_ARTIFACT
from stamp_core import StampPruner
from stamp_core.pruner import WeightsFileError


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


def pin_model_uri(uri: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """``(models:/NAME/N, N)`` for ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION|latest``; else ``(uri, None)``.

    Loading the pinned URI afterwards reads exactly the version that is recorded, even if the
    alias moves in between.
    """
    if not uri.startswith("models:/"):
        return uri, None
    name, alias, version = _parse_models_uri(uri)
    if alias is None and version is None:
        return uri, None  # a logged model id: not a registry version
    client, turi = _client(tracking_uri)
    mv = _require_alias(client, name, alias, turi) if alias is not None else _require_version(client, name, str(version), turi)
    return f"models:/{name}/{mv.version}", str(mv.version)


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
