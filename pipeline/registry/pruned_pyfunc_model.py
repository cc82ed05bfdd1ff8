"""A network pruned by `stamp prune`, as an MLflow pyfunc model (models-from-code): images in, class scores out.

MLflow logs *this file*; on load it executes it (it ends with ``mlflow.models.set_model``) and
``load_context`` rebuilds the network from the model's ``pruned`` artifact directory:
``spec.json`` (the PruneSpec: backbone config + kept channels) and ``pruned_state_dict.pt`` (read
with ``weights_only=True`` and checked against the sha256 the spec records). No module is
pickled. Like :mod:`pipeline.registry.pyfunc_model`, it imports only ``stamp_core`` (shipped as
the model's code path) and numpy/torch/mlflow: a serving environment has nothing else of this
repository. Keep the file name: each logged model keeps a copy under it.

Inference contract:

* input: uint8 images ``(N, H, W, C)``, as the registered signature says (the dataset's image
  shape); other sizes are resized and grayscale is repeated to RGB, exactly as `stamp prune`
  prepared the training data;
* output: float32 class scores (logits) ``(N, num_classes)``; the class names are in the spec's
  metadata (and the model's MLflow metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from stamp_core import PruneSpec, load_pruned_model, prepare_images

#: Key of the directory holding spec.json + pruned_state_dict.pt in the model's ``artifacts``.
PRUNED_ARTIFACT = "pruned"
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "pruned_state_dict.pt"
_BATCH = 256  # images per forward pass: bounds the float memory of a large request


def check_images(images: Any) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` images with C in {1, 3}, else ``ValueError`` naming the problem."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images is a {type(images).__name__}: expected a uint8 (N, H, W, C) array")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images have shape {images.shape}: expected (N, H, W, C) uint8 pixels with C = 1 or 3")
    if images.shape[0] == 0:
        raise ValueError("the image batch is empty: expected at least one image")
    if images.dtype != np.uint8:
        raise ValueError(f"images have dtype {images.dtype}: expected uint8 pixels 0..255")
    return images


class StampPrunedModel(mlflow.pyfunc.PythonModel):
    """uint8 NHWC images in, class scores of the pruned network out."""

    model: torch.nn.Module | None = None
    spec: PruneSpec | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        path = (context.artifacts or {}).get(PRUNED_ARTIFACT)
        if path is None:
            raise MlflowException(
                f"this model has no {PRUNED_ARTIFACT!r} artifact (it has {sorted(context.artifacts or {})}): "
                "log it with pipeline.registry.log_pruned_model"
            )
        self.spec = PruneSpec.load(Path(path) / SPEC_FILE)
        self.model = load_pruned_model(Path(path) / SPEC_FILE, Path(path) / WEIGHTS_FILE)

    @torch.no_grad()
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        if self.model is None or self.spec is None:
            raise MlflowException("the network is not loaded: load the model with mlflow.pyfunc.load_model")
        try:
            images = check_images(model_input)
        except ValueError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from exc
        channels, size = int(self.spec.input_shape[0]), int(self.spec.input_shape[1])
        scores = [
            self.model(prepare_images(images[i:i + _BATCH], size, channels)).numpy()
            for i in range(0, len(images), _BATCH)
        ]
        return np.concatenate(scores).astype(np.float32)


mlflow.models.set_model(StampPrunedModel())
