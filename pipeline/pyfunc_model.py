"""Moved to :mod:`pipeline.registry.pyfunc_model`; this shim goes in the next release.

Pruners registered before the move name this path as their MLflow ``model_code_path``. MLflow
loads such a model from the copy of the file inside the model directory (by its base name,
``pyfunc_model.py``), next to the model's own copy of ``stamp_core``, so those models load
without this module. The shim keeps two other things working for one release:

* ``from pipeline.pyfunc_model import StampPrunerModel, generate_spec, ...``;
* a model logged by a script written for the old layout with
  ``python_model="pipeline/pyfunc_model.py"``: executed as a models-from-code file, the shim sets
  the model exactly as the moved module does (such a model needs ``pipeline`` installed where it
  is loaded).
"""

import warnings

import mlflow

from pipeline.registry.pyfunc_model import (
    DEFAULT_MACS_RATIO,
    DEFAULT_ROUND_TO,
    PRUNER_ARTIFACT,
    StampPrunerModel,
    generate_spec,
    read_params,
    split_model_input,
)

warnings.warn(
    "pipeline.pyfunc_model moved to pipeline.registry.pyfunc_model; the old path goes in the next release",
    FutureWarning,
    stacklevel=2,
)

__all__ = [
    "DEFAULT_MACS_RATIO", "DEFAULT_ROUND_TO", "PRUNER_ARTIFACT", "StampPrunerModel", "generate_spec", "read_params",
    "split_model_input",
]

# A models-from-code file must set its model when it is executed; this one is executed under a
# fresh module name, after the real module may already be imported (and have set an older one).
mlflow.models.set_model(StampPrunerModel())
