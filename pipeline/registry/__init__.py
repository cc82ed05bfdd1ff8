"""MLflow model registry for STAMP pruners: log, register, alias, promote, load.

A pruner is logged as a models-from-code pyfunc (:mod:`pipeline.registry.pyfunc_model`) whose
artifacts are the pruner directory written by :meth:`stamp_core.StampPruner.save` (``pruner.json``
+ ``pruner_state_dict.pt``) and whose code path is a copy of ``stamp_core``. Nothing is pickled:

* ``mlflow.pyfunc.load_model("models:/stamp-pruner@champion")`` executes the logged model file
  and rebuilds the pruner from JSON + a ``weights_only=True`` state_dict;
* :func:`load_pruner` skips pyfunc altogether: it downloads the artifacts and calls
  ``StampPruner.load``.

Registry state is expressed with aliases (``champion``) and version tags (lineage, metrics);
MLflow's stages are deprecated. Every failure a user can cause (unreachable server, unknown
model, alias or version) raises :class:`RegistryError` naming what exists instead.

A network pruned by `stamp prune` is registered the same way as its own model
(:func:`log_pruned_model`, pyfunc file ``pruned_pyfunc_model``: uint8 NHWC images in, class scores
out; state_dict + PruneSpec JSON, the ONNX export as an artifact). Both models serve with
``mlflow models serve -m models:/NAME@ALIAS --env-manager local``.

Modules: ``connection`` (tracking URI, reachability probe, redaction, RegistryError), ``lineage``
(version tags), ``versions`` (lookups, aliases, promotion), ``register`` (log and register,
register from a training checkpoint), ``loading`` (load without pyfunc), ``pyfunc_model`` (the
logged model file).
"""

from pipeline.registry.connection import RegistryError, check_tracking_uri, redact, resolve_tracking_uri, use_tracking_uri
from pipeline.registry.lineage import (
    LINEAGE_TAG_PREFIX,
    METRIC_TAG_PREFIX,
    code_version,
    config_hash,
    lineage_tags,
    package_version,
    version_tags,
)
from pipeline.registry.loading import load_pruner, pin_model_uri
from pipeline.registry.pyfunc_model import (
    DEFAULT_MACS_RATIO,
    DEFAULT_ROUND_TO,
    PRUNER_ARTIFACT,
    StampPrunerModel,
    generate_spec,
    propose_specs,
    read_params,
    split_model_input,
)
from pipeline.registry.pruned import PRUNED_MODEL_ARTIFACT_NAME, log_pruned_model, pruned_signature
from pipeline.registry.register import (
    DEFAULT_MODEL_NAME,
    MODEL_ARTIFACT_NAME,
    PYFUNC_MODEL_FILE,
    RegisteredModel,
    RegisteredPruner,
    ensure_experiment,
    log_pruner,
    open_run,
    pruner_signature,
    register_from_checkpoint,
)
from pipeline.registry.versions import (
    CHAMPION,
    get_version,
    get_version_by_alias,
    list_versions,
    promote_if_better,
    set_alias,
    version_metric,
)

__all__ = [
    "RegistryError", "check_tracking_uri", "redact", "resolve_tracking_uri", "use_tracking_uri",
    "LINEAGE_TAG_PREFIX", "METRIC_TAG_PREFIX", "code_version", "config_hash", "lineage_tags", "package_version",
    "version_tags",
    "load_pruner", "pin_model_uri",
    "DEFAULT_MACS_RATIO", "DEFAULT_ROUND_TO", "PRUNER_ARTIFACT", "StampPrunerModel", "generate_spec", "propose_specs", "read_params",
    "split_model_input",
    "PRUNED_MODEL_ARTIFACT_NAME", "log_pruned_model", "pruned_signature",
    "DEFAULT_MODEL_NAME", "MODEL_ARTIFACT_NAME", "PYFUNC_MODEL_FILE", "RegisteredModel", "RegisteredPruner",
    "ensure_experiment", "log_pruner", "open_run", "pruner_signature", "register_from_checkpoint",
    "CHAMPION", "get_version", "get_version_by_alias", "list_versions", "promote_if_better", "set_alias",
    "version_metric",
]
