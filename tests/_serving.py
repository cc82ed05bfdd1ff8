"""Shared by the serving tests: a real `mlflow models serve` process and plain HTTP requests to it.

The server is :class:`pipeline.stack.ModelServer` (MLflow's own command, local env manager,
bound to 127.0.0.1 on a free port) and is stopped by its ownership record (pid, group, marker).
Requests use urllib, as any HTTP client would: nothing of MLflow's client code is involved.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stack import ModelServer, procs


@contextmanager
def served(model_uri: str, tracking_uri: str, log_dir: Path, timeout: float = 180.0) -> Iterator[ModelServer]:
    """`mlflow models serve -m model_uri` until the block ends; the client's S3 keys are withheld.

    The MLflow server proxies artifacts, so the model server must fetch the model without any
    S3 credentials of its own, like a downstream team's machine.
    """
    (port,) = procs.free_ports(1)
    server = ModelServer(model_uri, port, log_dir / "model-server.log", tracking_uri=tracking_uri)
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_") or k == "MLFLOW_S3_ENDPOINT_URL"}
    try:
        server.start(timeout=timeout)
    finally:
        os.environ.update(hidden)
    try:
        yield server
    finally:
        server.stop()


def invoke(url: str, images: Any, params: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """POST ``{"inputs": images, "params": params}``; (HTTP status, decoded JSON body)."""
    body: dict[str, Any] = {"inputs": images.tolist() if isinstance(images, np.ndarray) else images}
    if params is not None:
        body["params"] = params
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
