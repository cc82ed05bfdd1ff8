"""Where STAMP finds S3, MLflow and Ray: the one place endpoints and credentials are resolved.

Order for every value: explicit environment variable > the running embedded stack's
``STATE_DIR/stack.json`` (written by ``stamp stack up``) > built-in default.
Credentials are never Settings fields: they stay in the standard AWS variables that boto3,
MLflow and pyarrow read, and ``load_stack_credentials`` fills those from the stack's 0600 file.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STACK_FILE = "stack.json"
CREDENTIALS_FILE = "credentials"
DEFAULT_BUCKET = "stamp"
DEFAULT_PREFIX = "datasets"
DEFAULT_REGION = "us-east-1"


class CredentialsError(RuntimeError):
    """The stack's credentials file is unusable (unsafe permissions, malformed)."""


@dataclass(frozen=True)
class Settings:
    s3_endpoint: str | None  # None = AWS default endpoint
    bucket: str
    prefix: str  # dataset shards live under s3://bucket/prefix/
    mlflow_uri: str
    ray_address: str | None  # None = start/attach local
    state_dir: Path
    ray_dashboard_url: str | None = None  # for `ray job submit`; None when no head is known

    @property
    def catalog_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/catalog.json"

    @property
    def datasets_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def state_dir_from_env() -> Path:
    """STAMP_HOME, else ./.stamp; always absolute so later chdirs do not move it."""
    raw = os.environ.get("STAMP_HOME")
    return (Path(raw).expanduser() if raw else Path.cwd() / ".stamp").resolve()


def read_stack_file(state_dir: Path) -> dict[str, Any]:
    """The stack description, or {} when there is none or it cannot be parsed."""
    try:
        data = json.loads((state_dir / STACK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def running_services(stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that stack.json marks as running (``stack down`` clears the flag)."""
    services = stack.get("services", {})
    if not isinstance(services, dict):
        return {}
    return {
        name: svc
        for name, svc in services.items()
        if isinstance(svc, dict) and svc.get("running") is True
    }


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def get_settings() -> Settings:
    """Resolve settings now (not cached: the stack may come up or down between calls)."""
    state_dir = state_dir_from_env()
    stack = read_stack_file(state_dir)
    services = running_services(stack)
    s3 = services.get("s3", {})
    mlflow = services.get("mlflow", {})
    ray = services.get("ray", {})
    # Without a server, a sqlite file of its own (not the server's db: experiments created by
    # the server point at proxied artifacts that need the server).
    local_mlflow = f"sqlite:///{state_dir / 'mlflow-local.db'}"
    stack_bucket = stack.get("bucket") if s3 else None
    return Settings(
        s3_endpoint=_env("STAMP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3") or s3.get("endpoint"),
        bucket=_env("STAMP_BUCKET") or (str(stack_bucket) if stack_bucket else DEFAULT_BUCKET),
        prefix=(_env("STAMP_PREFIX") or DEFAULT_PREFIX).strip("/"),
        mlflow_uri=_env("MLFLOW_TRACKING_URI") or mlflow.get("endpoint") or local_mlflow,
        ray_address=_env("RAY_ADDRESS") or ray.get("address"),
        state_dir=state_dir,
        ray_dashboard_url=_env("RAY_API_SERVER_ADDRESS") or ray.get("dashboard_url"),
    )


def read_credentials(state_dir: Path) -> tuple[str, str] | None:
    """(access key, secret) from STATE_DIR/credentials; refuses a group/other readable file."""
    path = state_dir / CREDENTIALS_FILE
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(
            f"{path} is accessible by group/other (mode {stat.S_IMODE(mode):o}); "
            f"it holds S3 secrets. Fix with: chmod 600 {path}"
        )
    try:
        data = json.loads(path.read_text())
        return str(data["aws_access_key_id"]), str(data["aws_secret_access_key"])
    except (ValueError, KeyError, TypeError):
        # The message names the file only: its content is secret.
        raise CredentialsError(
            f"{path} is not a JSON object with aws_access_key_id and aws_secret_access_key; "
            "remove it and run `stamp stack up` again to generate fresh credentials"
        ) from None


def load_stack_credentials(state_dir: Path) -> None:
    """Point the standard env vars at the embedded stack, never overriding what is set.

    Keys are copied only when neither AWS key variable is set, so a user's own pair is never
    mixed with ours. Endpoint and Ray client variables are filled from stack.json when unset.
    Call it before `import ray`: Ray reads its auth and node-IP variables at import time.
    """
    creds = read_credentials(state_dir)
    if creds and not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_SECRET_ACCESS_KEY")):
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = creds
    services = running_services(read_stack_file(state_dir))
    endpoint = services.get("s3", {}).get("endpoint")
    if endpoint:
        os.environ.setdefault("AWS_ENDPOINT_URL_S3", endpoint)
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
        # boto3 refuses to sign without a region; SeaweedFS accepts any.
        os.environ.setdefault("AWS_DEFAULT_REGION", DEFAULT_REGION)
    client_env = services.get("ray", {}).get("client_env", {})
    if not isinstance(client_env, dict):
        return
    added = [name for name in map(str, client_env) if name not in os.environ]
    for name in added:
        os.environ[name] = str(client_env[name])
    if added and "ray" in sys.modules:
        warnings.warn(
            f"load_stack_credentials set {', '.join(added)} after `import ray`; Ray read its "
            "settings at import and will not authenticate to the stack's Ray head. "
            "Call load_stack_credentials before importing ray.",
            RuntimeWarning,
            stacklevel=2,
        )
