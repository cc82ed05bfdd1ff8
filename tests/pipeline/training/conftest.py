"""Fixtures of the training tests: the tiny sources in a local directory and in SeaweedFS."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from tests.pipeline.training._jobs import ingest_sources


@pytest.fixture(scope="module")
def local_catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ingest_sources(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def s3_data(seaweedfs: Any) -> tuple[str, str]:
    """(bucket, catalog URL) of the procedural sources ingested into SeaweedFS."""
    bucket = f"train-{secrets.token_hex(4)}"
    seaweedfs.client().create_bucket(Bucket=bucket)
    return bucket, ingest_sources(f"s3://{bucket}/datasets")
