"""Where the MLflow tracking store is and whether it answers; MLflow's errors as :class:`RegistryError`.

The tracking URI is, in order: the ``tracking_uri`` argument, one set in-process with
``mlflow.set_tracking_uri`` or ``MLFLOW_TRACKING_URI``, then :func:`pipeline.settings.get_settings`
(the running stack's server, else a local sqlite file). Credentials are never parameters: MLflow
and boto3 read them from the environment, and URIs are redacted before they reach a message.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

_USERINFO = re.compile(r"(?<=//)[^/@\s]+@")


class RegistryError(RuntimeError):
    """A registry operation failed for a reason the user can fix; the message says how."""



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
