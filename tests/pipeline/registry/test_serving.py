"""The registered pruner served by `mlflow models serve` (local env manager) and queried over HTTP.

One real scoring server for the module, fetching ``models:/NAME@champion`` from the session's
MLflow server (artifacts on SeaweedFS, proxied: the scoring server holds no S3 keys). Requests
are plain JSON over HTTP; answers are compared with the Python API on the same images.

The pruner's signature has no input schema (params only): with one, MLflow's scoring server
casts the JSON numbers to its dtype while parsing the request (``np.array(inputs, dtype=uint8)``
in ``mlflow.utils.proto_json_utils.convert_data_type``), before the model runs, so float pixels
such as 127.6 were silently truncated to 127 and ``"inputs": []`` was refused by MLflow's shape
check with MLflow's message. Now the numbers reach the model as sent and it answers every bad
input itself, with the message the Python API gives.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from pipeline.registry import generate_spec, log_pruner, set_alias, use_tracking_uri
from stamp_core import PruneSpec, StampPruner, build_backbone_from_config, count_macs_params
from tests._serving import invoke, served

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import mlflow

    torch.manual_seed(0)
    pruner = StampPruner.create(
        "small_cnn", num_classes=4, image_size=32, backbone_kwargs={"width": 8},
        embed_dim=32, hidden_dim=32, num_inducing=8,
    ).eval()
    name = f"stamp-pruner-serve-{secrets.token_hex(4)}"
    reg = log_pruner(pruner, name=name)
    set_alias(name, "champion", reg.version)
    uri = f"models:/{name}@champion"
    with use_tracking_uri(mlflow_server):
        local = mlflow.pyfunc.load_model(uri)  # the Python API the HTTP answers must agree with
    with served(uri, mlflow_server, tmp_path_factory.mktemp("serve-pruner")) as server:
        yield {"pruner": pruner, "url": server.invocations_url, "local": local, "log": server.log_path}


def images(n: int = 16, size: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_post_images_and_budget_returns_the_prune_spec(service: dict[str, Any]) -> None:
    x = images()
    status, body = invoke(service["url"], x, {"macs_ratio": 0.3})
    assert status == 200, body
    assert list(body) == ["predictions"] and len(body["predictions"]) == 1
    spec = PruneSpec.from_json(body["predictions"][0])
    # Exactly what the Python API gives for the same images and budget.
    assert json.loads(body["predictions"][0]) == json.loads(generate_spec(service["pruner"], x, None, 0.3).to_json())
    assert spec.macs_ratio_target == 0.3
    full = build_backbone_from_config(spec.backbone)
    pruned = spec.apply(build_backbone_from_config(spec.backbone))
    assert count_macs_params(pruned, spec.input_shape)[0] / count_macs_params(full, spec.input_shape)[0] <= 0.3


def test_labels_and_round_to_travel_as_params(service: dict[str, Any]) -> None:
    x = images(24, size=32, channels=3, seed=1)
    labels = [i % 4 for i in range(24)]
    params = {"macs_ratio": 0.5, "labels": labels, "round_to": 4}
    status, body = invoke(service["url"], x, params)
    assert status == 200, body
    assert body["predictions"] == service["local"].predict(x, params=params)
    spec = PruneSpec.from_json(body["predictions"][0])
    assert spec.kept == generate_spec(service["pruner"], x, np.array(labels), 0.5, 4).kept
    assert all(len(k) % 4 == 0 or len(k) == spec.group_sizes[g] for g, k in spec.kept.items())


def _tail(message: str) -> str:
    """The reason, without the repr of the data MLflow prefixes to it."""
    return message.rsplit("Error: ", 1)[-1].strip()


@pytest.mark.parametrize(
    "case, sent, python_input, params, expected",
    [
        ("ratio above 1", images(), images(), {"macs_ratio": 1.5}, "macs_ratio=1.5: expected a number in (0, 1]"),
        ("ratio 0", images(), images(), {"macs_ratio": 0.0}, "macs_ratio=0.0: expected a number in (0, 1]"),
        ("5 channels", images(4, 32, 5), images(4, 32, 5), {}, "expected (N, H, W, C) with C = 1 (grayscale) or 3"),
        ("2-d batch", images()[:, 0, :, 0], images()[:, 0, :, 0], {}, "images have shape (16, 28): expected (N, H, W, C)"),
        ("labels length", images(8), images(8), {"labels": [0, 1, 2]}, "labels have shape (3,) but there are 8 images"),
        # JSON cannot carry an empty 4-d array: `"inputs": []` is what a client sends.
        ("no images", [], np.zeros((0, 28, 28, 1), np.uint8), {}, "the image set is empty: expected at least one image"),
        # Never truncated or clipped on the way (MLflow's uint8 cast used to turn 127.6 into 127).
        ("float pixels 0..255", images() + 0.6, images() + 0.6, {}, "float pixels span [0.6, 255.6]: expected floats in [0, 1]"),
        ("pixel 300", images().astype(np.int64) + 200, images().astype(np.int64) + 200, {},
         "integer pixels span [200, 455]: expected uint8 values in 0..255"),
    ],
)
def test_bad_input_is_http_400_with_the_python_api_message(
    service: dict[str, Any], case: str, sent: Any, python_input: np.ndarray, params: dict[str, Any], expected: str,
) -> None:
    with pytest.raises(MlflowException) as exc:
        service["local"].predict(python_input, params=params)
    assert expected in exc.value.message, case
    status, body = invoke(service["url"], sent, params)
    assert status == 400, (case, body)
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert _tail(body["message"]) == _tail(exc.value.message), case


def test_float_pixels_in_0_1_arrive_unchanged(service: dict[str, Any]) -> None:
    """Floats in [0, 1] are pixels too: over HTTP the answer is the Python API's for the same floats."""
    x = images(16, size=32, channels=3, seed=2) / 255.0
    status, body = invoke(service["url"], x, {"macs_ratio": 0.4})
    assert status == 200, body
    assert body["predictions"] == service["local"].predict(x, params={"macs_ratio": 0.4})


def test_server_log_shows_the_requests(service: dict[str, Any]) -> None:
    """The scoring server answered the request itself (its access log), bound to loopback."""
    assert invoke(service["url"], images(4), {"macs_ratio": 0.5})[0] == 200
    text = Path(service["log"]).read_text()
    assert "Uvicorn running on http://127.0.0.1:" in text
    assert '"POST /invocations HTTP/1.1" 200' in text
