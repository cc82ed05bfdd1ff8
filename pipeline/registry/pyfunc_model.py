"""The registered STAMP pruner as an MLflow pyfunc model (models-from-code).

MLflow logs *this file*, not a pickled object: on load it executes the file, which ends with
``mlflow.models.set_model(StampPrunerModel())``, and ``load_context`` rebuilds the pruner from the
model's artifacts (``pruner.json`` + ``pruner_state_dict.pt``, weights read with
``weights_only=True``). Nothing here is cloudpickled, so loading a model never runs bytes that
came from the artifact store.

Keep the imports to ``stamp_core`` + numpy/pandas/torch/mlflow: the model ships ``stamp_core`` as
its code path, and a serving environment has nothing else of this repository.

Each logged model keeps its own copy of this file as ``pyfunc_model.py`` (MLflow finds it by base
name, whatever directory its MLmodel's ``model_code_path`` names): pruners logged when this file
was ``pipeline/pyfunc_model.py`` load unchanged. Keep the file name.

Inference contract (through ``mlflow.pyfunc.load_model(uri).predict``):

* input: images ``(N, H, W, C)`` (C in {1, 3}): uint8 pixels (or any integers in 0..255), or
  floats in [0, 1]. The registered signature declares *no* input schema on purpose, only the
  params: with a tensor input schema MLflow's scoring server casts the JSON numbers to the
  schema's dtype before the model sees them (``np.array(data, dtype=uint8)``: 127.6 silently
  becomes 127) and refuses an empty ``"inputs": []`` for its shape with its own message. Without
  one, the numbers reach :func:`split_model_input` as they were sent and every refusal (empty set,
  pixels outside 0..255, float pixels outside [0, 1], wrong shape) is ours, the same in Python
  and over HTTP (``mlflow models serve``, ``{"inputs": [...], "params": {...}}``, HTTP 400);
* params: ``macs_ratio`` (float in (0, 1], default 0.5), ``round_to`` (int >= 1, default 1),
  ``labels`` (one class id per image, default ``[]`` = label-free pooling) and ``proposals`` (int >= 1,
  default 1: more asks an outcome pruner for its best-ranked masks, for the caller's own test-time
  selection, as ``stamp prune --select`` does by a short fine-tune; a request cannot fine-tune). Labels
  travel as a param because an MLflow tensor signature cannot have an optional second input;
* output: a list holding the :class:`~stamp_core.PruneSpec` as JSON, one element (``proposals`` > 1: that
  many, best-ranked first; the first is the one-pass mask).

Called directly (``model.unwrap_python_model().predict(None, x)``) ``predict`` also accepts float
``(N, C, H, W)`` images in [0, 1], a dict ``{"images": ..., "labels": ...}`` and a pandas
DataFrame with an ``images`` column (one array per row) and an optional ``labels`` column.
Pruners registered before this contract keep their own copy of this file and their uint8 input
schema (MLflow casts and refuses for them as described above).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException

from stamp_core import PruneSpec, StampPruner, prepare_images

#: Key of the pruner directory in the model's ``artifacts``.
PRUNER_ARTIFACT = "pruner"
DEFAULT_MACS_RATIO = 0.5
DEFAULT_ROUND_TO = 1
_INPUT_KEYS = ("images", "labels")


def split_model_input(model_input: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images, labels or None)`` from any accepted input form; ``ValueError`` names the problem."""
    labels: Any = None
    if isinstance(model_input, dict):
        unknown = sorted(set(model_input) - set(_INPUT_KEYS))
        if unknown or "images" not in model_input:
            raise ValueError(
                f"input dict has keys {sorted(model_input)}: expected 'images' and optionally 'labels'"
            )
        images, labels = model_input["images"], model_input.get("labels")
    elif isinstance(model_input, pd.DataFrame):
        if "images" not in model_input.columns:
            raise ValueError(
                f"input DataFrame has columns {list(model_input.columns)}: expected an 'images' column "
                "holding one (H, W[, C]) array per row, and optionally 'labels'"
            )
        cells = list(model_input["images"])
        if not cells:
            raise ValueError("the image set is empty: expected at least one image (20 per class is typical)")
        try:
            images = np.stack([np.asarray(c) for c in cells])
        except ValueError:
            raise ValueError("the 'images' column holds arrays of different shapes: expected one shape") from None
        if "labels" in model_input.columns:
            labels = model_input["labels"].to_numpy()
    else:
        images = model_input
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        try:
            images = np.asarray(images)
        except (TypeError, ValueError):
            raise ValueError(f"images is a {type(images).__name__}: expected a numpy array") from None
    if images.dtype == object:
        raise ValueError("images is a ragged or object array: expected one numeric (N, H, W, C) array")
    if images.size == 0:
        # Before the shape check: `"inputs": []` over HTTP arrives as shape (0,).
        raise ValueError("the image set is empty: expected at least one image (20 per class is typical)")
    if images.ndim not in (3, 4):
        raise ValueError(
            f"images have shape {images.shape}: expected (N, H, W, C) uint8 pixels "
            "(or (N, C, H, W) floats in [0, 1])"
        )
    if images.ndim == 4 and images.shape[-1] not in (1, 3) and images.shape[1] not in (1, 3):
        raise ValueError(
            f"images have shape {images.shape}: expected (N, H, W, C) with C = 1 (grayscale) or 3 (RGB)"
        )
    return _check_pixels(images), _check_labels(labels, images.shape[0])


def _check_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 for integer pixels in 0..255 (JSON integers arrive as int64); floats must lie in [0, 1].

    Nothing is rounded or clipped: a value that does not fit is refused with the range found.
    """
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.bool_):
        raise ValueError("images are booleans: expected uint8 pixels in 0..255 or floats in [0, 1]")
    if np.issubdtype(images.dtype, np.integer):
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"integer pixels span [{lo}, {hi}]: expected uint8 values in 0..255")
        return images.astype(np.uint8)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images have dtype {images.dtype}: expected uint8 pixels in 0..255 or floats in [0, 1]")
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf pixels: expected uint8 pixels in 0..255 or floats in [0, 1]")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"float pixels span [{lo:.4g}, {hi:.4g}]: expected floats in [0, 1], or uint8 values 0..255 sent as "
            "integers (floats are neither rounded nor rescaled)"
        )
    return images


def _check_labels(labels: Any, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.size == 0:  # the params default: no labels, label-free pooling
        return None
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels have shape {y.shape} but there are {n} images: expected one class id per image")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)  # JSON round trips turn ids into floats
        else:
            raise ValueError(f"labels have dtype {y.dtype}: expected integer class ids")
    if (y < 0).any():
        raise ValueError("labels contain negative values: expected class ids >= 0")
    return y.astype(np.int64)


def read_params(params: dict[str, Any] | None) -> tuple[float, int, np.ndarray | None, int]:
    """``(macs_ratio, round_to, labels, proposals)`` from pyfunc params, validated."""
    params = dict(params or {})
    raw_ratio = params.get("macs_ratio", DEFAULT_MACS_RATIO)
    try:
        ratio = float(raw_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"macs_ratio={raw_ratio!r}: expected a number in (0, 1]") from None
    if not np.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"macs_ratio={raw_ratio!r}: expected a number in (0, 1] (0.3 keeps 30% of the MACs)")
    raw_round = _positive_int(params, "round_to", DEFAULT_ROUND_TO)
    labels = params.get("labels")
    return ratio, raw_round, (None if labels is None else np.asarray(labels)), _positive_int(params, "proposals")


def _positive_int(params: dict[str, Any], name: str, default: int = 1) -> int:
    raw = params.get(name, default)
    number = isinstance(raw, (int, np.integer, float, np.floating)) and not isinstance(raw, (bool, np.bool_))
    if not number or not np.isfinite(raw) or float(raw) != int(raw) or int(raw) < 1:
        raise ValueError(f"{name}={raw!r}: expected a positive integer")
    return int(raw)


def generate_spec(
    pruner: StampPruner,
    images: np.ndarray,
    labels: np.ndarray | None,
    macs_ratio: float,
    round_to: int = 1,
) -> PruneSpec:
    """Raw images (+ labels) -> PruneSpec, reading at most the pruner's support set.

    The class-balanced subset is picked *before* ``prepare_images`` so a large upload costs the
    size of the support set (<= ``max_support`` images) in float memory, not the whole batch.
    """
    return propose_specs(pruner, images, labels, macs_ratio, 1, round_to)[0]


def propose_specs(
    pruner: StampPruner,
    images: np.ndarray,
    labels: np.ndarray | None,
    macs_ratio: float,
    k: int,
    round_to: int = 1,
) -> list[PruneSpec]:
    """Raw images (+ labels) -> the ``k`` best-ranked PruneSpecs, best first (``k`` > 1 needs an outcome pruner).

    A many-class upload keeps ``pruner.min_support_per_class`` images of a subset of its classes (the outcome
    pruner's class separability needs several images of a class, not one of each) and its class count.
    """
    labels = _check_labels(labels, len(images))
    y_all = None if labels is None else torch.from_numpy(labels)
    idx = pruner.select_support(y_all, len(images), min_per_class=pruner.min_support_per_class).numpy()
    x = prepare_images(images[idx], pruner.config.image_size, channels=pruner.backbone.in_channels)
    y = None if labels is None else labels[idx]
    summary = None
    if y is not None and pruner.min_support_per_class > 1:
        with torch.no_grad():
            summary = pruner.summarize(*pruner.check_images(x, y), num_classes=int(np.unique(labels).size))
    if k == 1:
        return [pruner.generate(x, y, macs_ratio=macs_ratio, round_to=round_to, embedding=summary)]
    return pruner.propose(x, y, macs_ratio, k, round_to, embedding=summary)


class StampPrunerModel(mlflow.pyfunc.PythonModel):
    """Images of a task + a MACs budget in, the task's PruneSpec JSON out."""

    pruner: StampPruner | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        path = (context.artifacts or {}).get(PRUNER_ARTIFACT)
        if path is None:
            raise MlflowException(
                f"this model has no {PRUNER_ARTIFACT!r} artifact (it has {sorted(context.artifacts or {})}): "
                "log it with pipeline.registry.log_pruner"
            )
        self.pruner = StampPruner.load(path).eval()

    # The np.ndarray hint is one MLflow treats as "infer no schema from this": the explicit
    # signature logged by pipeline.registry stays in charge of validating inputs.
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> list[str]:
        if self.pruner is None:
            raise MlflowException("the pruner is not loaded: load the model with mlflow.pyfunc.load_model")
        try:
            ratio, round_to, param_labels, proposals = read_params(params)
            images, labels = split_model_input(model_input)
            param_labels = _check_labels(param_labels, len(images))
            if labels is not None and param_labels is not None:
                raise ValueError("labels given both in the input and in params: pass them once")
            specs = propose_specs(self.pruner, images, labels if labels is not None else param_labels, ratio, proposals,
                                  round_to)
        except ValueError as exc:
            # MlflowException is what pyfunc callers and `mlflow models serve` (HTTP 400) expect;
            # the message is ours, unchanged.
            raise MlflowException.invalid_parameter_value(str(exc)) from exc
        return [spec.to_json() for spec in specs]


mlflow.models.set_model(StampPrunerModel())
