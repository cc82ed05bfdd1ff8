"""Shared by the training tests: tiny procedural sources and a meta-train config that runs in seconds."""

from __future__ import annotations

from typing import Any

from pipeline.config import MetaTrainConfig
from pipeline.data import build_procedural, ingest_dataset

SOURCES = ("blobs", "stripes")
LOSS_PARTS = ("loss", "ce", "kl", "macs_penalty", "expected_macs_ratio", "target_macs_ratio")


def ingest_sources(dest: str) -> str:
    """Ingest the SOURCES (procedural, 40 images per class) into ``dest``; returns the catalog URL."""
    for name in SOURCES:
        ingest_dataset(build_procedural(name, n_per_class=40, seed=0, n_test_per_class=12), dest,
                       shard_size=100, progress=False)
    return f"{dest}/catalog.json"


def tiny_meta_config(catalog_url: str, **overrides: Any) -> MetaTrainConfig:
    """A meta-train config small enough for a few steps per second on one core."""
    data: dict[str, Any] = dict(
        backbone="small_cnn",
        backbone_kwargs={"width": 8},
        steps=4,
        report_every=2,
        checkpoint_every=2,
        data={"catalog_url": catalog_url, "sources": "all"},
        episodes={"ways": [2, 4], "support_per_class": 5, "query_size": 16, "steps_per_epoch": 3},
        validation={"every": 2, "tasks": 2, "ways": 3, "shots": 3, "test_per_class": 4, "finetune_epochs": 1},
        pruner={"embed_dim": 32, "hidden_dim": 32, "num_inducing": 8},
        mlflow={"enabled": False},
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return MetaTrainConfig.model_validate(data)

