"""Settings resolution (env > running stack's stack.json > defaults) and credential loading."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from pipeline.settings import CredentialsError, get_settings, load_stack_credentials
from pipeline.stack import procs

# Once any test of the session has imported ray, filling the Ray variables rightly warns;
# only the test about that warning wants to see it.
pytestmark = pytest.mark.filterwarnings("ignore:load_stack_credentials set:RuntimeWarning")

_ENV = (
    "STAMP_HOME",
    "STAMP_S3_ENDPOINT",
    "AWS_ENDPOINT_URL_S3",
    "STAMP_BUCKET",
    "STAMP_PREFIX",
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN_PATH",
)


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No STAMP/AWS/MLflow/Ray variables; cwd is an empty tmp dir. Restored afterwards."""
    for name in _ENV:
        # setenv first so monkeypatch remembers the original (possibly absent) value and
        # restores it even if the code under test writes os.environ directly.
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_stack(state_dir: Path, *, s3: bool = True, mlflow: bool = True, ray: bool = True) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    stack = {
        "version": 1,
        "bucket": "stackbucket",
        "services": {
            "s3": {"running": s3, "endpoint": "http://127.0.0.1:18333"},
            "mlflow": {"running": mlflow, "endpoint": "http://127.0.0.1:15055"},
            "ray": {
                "running": ray,
                "address": "127.0.0.1:16380",
                "dashboard_url": "http://127.0.0.1:18266",
                "client_env": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state_dir / "tok")},
            },
        },
    }
    (state_dir / "stack.json").write_text(json.dumps(stack))


def _write_credentials(state_dir: Path, mode: int = 0o600) -> tuple[str, str]:
    key, secret = "STAMPKEY123", "s3cr3t-" + os.urandom(8).hex()
    procs.write_private(
        state_dir / "credentials",
        json.dumps({"aws_access_key_id": key, "aws_secret_access_key": secret}),
    )
    os.chmod(state_dir / "credentials", mode)
    return key, secret


def test_defaults_without_env_or_stack(clean_env: Path) -> None:
    s = get_settings()
    assert s.state_dir == (clean_env / ".stamp").resolve()
    assert s.s3_endpoint is None
    assert (s.bucket, s.prefix) == ("stamp", "datasets")
    assert s.catalog_url == "s3://stamp/datasets/catalog.json"
    assert s.ray_address is None and s.ray_dashboard_url is None
    # Absolute sqlite URI: MLflow resolves relative ones against whatever the cwd is later.
    assert s.mlflow_uri == f"sqlite:///{clean_env.resolve() / '.stamp' / 'mlflow-local.db'}"


def test_running_stack_supplies_endpoints(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = clean_env / "home"
    _write_stack(home)
    monkeypatch.setenv("STAMP_HOME", str(home))
    s = get_settings()
    assert s.state_dir == home.resolve()
    assert s.s3_endpoint == "http://127.0.0.1:18333"
    assert s.mlflow_uri == "http://127.0.0.1:15055"
    assert s.ray_address == "127.0.0.1:16380"
    assert s.ray_dashboard_url == "http://127.0.0.1:18266"
    assert s.bucket == "stackbucket"
    assert s.catalog_url == "s3://stackbucket/datasets/catalog.json"


def test_stopped_services_in_stack_json_are_ignored(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = clean_env / "home"
    _write_stack(home, s3=False, ray=False)
    monkeypatch.setenv("STAMP_HOME", str(home))
    s = get_settings()
    assert s.s3_endpoint is None
    assert s.bucket == "stamp"
    assert s.ray_address is None
    assert s.mlflow_uri == "http://127.0.0.1:15055"


def test_env_beats_stack_json(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = clean_env / "home"
    _write_stack(home)
    monkeypatch.setenv("STAMP_HOME", str(home))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://aws-standard:1")
    assert get_settings().s3_endpoint == "http://aws-standard:1"
    monkeypatch.setenv("STAMP_S3_ENDPOINT", "http://stamp-specific:2")
    monkeypatch.setenv("STAMP_BUCKET", "envbucket")
    monkeypatch.setenv("STAMP_PREFIX", "/shards/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    s = get_settings()
    assert s.s3_endpoint == "http://stamp-specific:2"
    assert s.catalog_url == "s3://envbucket/shards/catalog.json"
    assert s.mlflow_uri == "http://mlflow.example:5000"
    assert s.ray_address == "10.0.0.1:6379"


def test_settings_are_not_cached(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = clean_env / "home"
    monkeypatch.setenv("STAMP_HOME", str(home))
    assert get_settings().s3_endpoint is None
    _write_stack(home)
    assert get_settings().s3_endpoint == "http://127.0.0.1:18333"


def test_load_stack_credentials_fills_unset_env(clean_env: Path) -> None:
    home = clean_env / "home"
    _write_stack(home)
    key, secret = _write_credentials(home)
    load_stack_credentials(home)
    assert os.environ["AWS_ACCESS_KEY_ID"] == key
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret
    assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:18333"
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:18333"
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(home / "tok")
    assert secret not in repr(get_settings())


def test_load_stack_credentials_never_overrides(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = clean_env / "home"
    _write_stack(home)
    _write_credentials(home)
    # Only one of the pair set: still the user's, we must not mix in our secret.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "users-own-key")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://users-own:9000")
    load_stack_credentials(home)
    assert os.environ["AWS_ACCESS_KEY_ID"] == "users-own-key"
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ
    assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://users-own:9000"


def test_load_stack_credentials_refuses_readable_file(clean_env: Path) -> None:
    home = clean_env / "home"
    _write_stack(home)
    _, secret = _write_credentials(home, mode=0o644)
    with pytest.raises(CredentialsError) as excinfo:
        load_stack_credentials(home)
    message = str(excinfo.value)
    assert "chmod 600" in message and str(home / "credentials") in message
    assert secret not in message
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ


def test_load_stack_credentials_malformed_file_does_not_echo_content(clean_env: Path) -> None:
    home = clean_env / "home"
    procs.write_private(home / "credentials", "not json but a secret-looking-value")
    with pytest.raises(CredentialsError) as excinfo:
        load_stack_credentials(home)
    assert "secret-looking-value" not in str(excinfo.value)


def test_load_stack_credentials_without_stack_is_a_no_op(clean_env: Path) -> None:
    load_stack_credentials(clean_env / "nothing-here")
    assert "AWS_ACCESS_KEY_ID" not in os.environ
    assert "AWS_ENDPOINT_URL_S3" not in os.environ


def test_load_stack_credentials_warns_when_ray_is_already_imported(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = clean_env / "home"
    _write_stack(home)
    # Whatever the session imported so far, make `ray` count as imported for this call.
    monkeypatch.setitem(sys.modules, "ray", sys.modules.get("ray") or types.ModuleType("ray"))
    with pytest.warns(RuntimeWarning, match="before importing ray"):
        load_stack_credentials(home)
    assert os.environ["RAY_AUTH_MODE"] == "token"
