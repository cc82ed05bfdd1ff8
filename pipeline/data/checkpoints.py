"""Training run checkpoints on local or S3 storage: their files, the latest one of a run, local copies.

Training (:mod:`pipeline.training`) writes these checkpoints; the registry reads them back
(``stamp register --from-checkpoint``), and so do the benchmark and ``pretrained:`` sources. One
module holds the layout so that writers and readers cannot drift apart. A Ray run directory::

    <storage_path>/<run_name>/checkpoint_00000040/    CHECKPOINT_PREFIX + step (or epoch), sorts by step
        state.json                                 step, epoch, data seed, config hash, MLflow run id
        optimizer.pt                               the optimizer's state_dict (loaded weights_only=True)
        pruner.json + pruner_state_dict.pt         meta-training: a loadable pruner directory
        backbone.json + backbone_state_dict.pt     pretraining: the backbone and its label space

``storage_path`` is a local directory or ``s3://bucket/prefix`` (through ``pyarrow.fs.S3FileSystem``
with the endpoint from :mod:`pipeline.settings`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch

from stamp_core import Backbone, StampPruner, build_backbone_from_config
from stamp_core.pruner import load_weights

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow.fs

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
BACKBONE_CONFIG_FILE = "backbone.json"
BACKBONE_WEIGHTS_FILE = "backbone_state_dict.pt"
PRUNER_CONFIG_FILE = "pruner.json"
#: checkpoint directory names sort by step: checkpoint_00000040
CHECKPOINT_PREFIX = "checkpoint_"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


# --------------------------------------------------------------------------- storage (Ray runs)


def storage_filesystem(storage_path: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray ``(storage_path, storage_filesystem)`` for a local directory or ``s3://bucket/prefix``.

    S3 goes through ``pyarrow.fs.S3FileSystem`` with the endpoint from settings; credentials come
    from the standard AWS chain on each process (never passed here, so never pickled to workers).
    """
    if not storage_path.startswith("s3://"):
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        return storage_path, None
    import pyarrow.fs

    from pipeline.settings import get_settings

    kwargs: dict[str, Any] = {}
    endpoint = get_settings().s3_endpoint
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return storage_path[len("s3://"):], pyarrow.fs.S3FileSystem(region=region, **kwargs)


def read_checkpoint_state(checkpoint: Any) -> dict[str, Any] | None:
    """state.json of a Ray checkpoint, read alone (no download of the weights)."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as fh:
            return json.loads(fh.read().decode())
    except (OSError, ValueError):
        return None


def latest_run_checkpoint(storage_path: str, name: str) -> tuple[Any, dict[str, Any]] | None:
    """(Ray checkpoint, its state.json) of the latest checkpoint of run ``name``, if there is one."""
    from ray.train import Result

    path, fs = storage_filesystem(storage_path)
    try:
        result = Result.from_path(f"{path.rstrip('/')}/{name}", storage_filesystem=fs)
    except (RuntimeError, OSError, ValueError):
        return None
    if result.checkpoint is None:
        return None
    state = read_checkpoint_state(result.checkpoint)
    return (result.checkpoint, state) if state is not None else None


def checkpoint_to_local(checkpoint: Any, dest_root: Path) -> Path:
    """A local directory with the checkpoint's files (the checkpoint itself when storage is local)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    dest = dest_root / Path(checkpoint.path).name
    if not (dest / STATE_FILE).exists():
        tmp = dest.with_name(f".{dest.name}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        checkpoint.to_directory(str(tmp))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.replace(dest)
    return dest


def download_prefix(url: str, dest: Path) -> Path:
    """Copy every object under an ``s3://`` directory URL into ``dest`` (for pretrained weights)."""
    from pipeline.data import s3

    prefix = url.rstrip("/") + "/"
    urls = s3.list_urls(prefix)
    if not urls:
        raise FileNotFoundError(f"pretrained: nothing under {prefix}")
    for u in urls:
        rel = u[len(prefix):]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.get_bytes(u))
    return dest


# =============================================================================== checkpoint files


def save_backbone(directory: Path, backbone: Backbone, meta: dict[str, Any]) -> None:
    """``backbone.json`` (architecture + label space) and ``backbone_state_dict.pt``."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / BACKBONE_CONFIG_FILE, {"backbone": dict(backbone.config), **meta})
    tmp = directory / f".{BACKBONE_WEIGHTS_FILE}.tmp"
    torch.save(backbone.state_dict(), tmp)
    tmp.replace(directory / BACKBONE_WEIGHTS_FILE)


def load_backbone_dir(directory: Path) -> Backbone:
    """Rebuild a backbone saved by :func:`save_backbone` (weights with ``weights_only=True``)."""
    meta = json.loads((directory / BACKBONE_CONFIG_FILE).read_text())
    model = build_backbone_from_config(meta["backbone"])
    model.load_state_dict(load_weights(directory / BACKBONE_WEIGHTS_FILE, "cpu"))
    return model


def load_pretrained_backbone(source: str) -> Backbone:
    """A backbone from a pretrain checkpoint, a pruner directory or a Ray run directory (local or s3://).

    A run directory resolves to its latest ``checkpoint_*``.
    """
    with tempfile.TemporaryDirectory(prefix="stamp-pretrained-") as tmp:
        d = download_prefix(source, Path(tmp)) if source.startswith("s3://") else Path(source)
        if not d.is_dir():
            raise FileNotFoundError(f"pretrained: {source} is not a directory")
        candidates = sorted(p for p in d.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        if not (d / BACKBONE_CONFIG_FILE).exists() and not (d / PRUNER_CONFIG_FILE).exists() and candidates:
            d = candidates[-1]
        if (d / BACKBONE_CONFIG_FILE).exists():
            return load_backbone_dir(d)
        if (d / PRUNER_CONFIG_FILE).exists():
            return StampPruner.load(d).backbone
        raise FileNotFoundError(
            f"pretrained: {source} holds neither {BACKBONE_CONFIG_FILE} (a pretrain checkpoint) nor "
            f"{PRUNER_CONFIG_FILE} (a pruner) nor {CHECKPOINT_PREFIX}* directories (a Ray run)"
        )


def write_meta_checkpoint(dest: Path, pruner: StampPruner, optimizer: torch.optim.Optimizer,
                          state: dict[str, Any]) -> Path:
    """A resumable checkpoint that is also a loadable pruner directory."""
    pruner.config.metadata = {**pruner.config.metadata, "step": state["step"], "run_name": state.get("run_name")}
    pruner.save(dest)
    tmp = dest / f".{OPTIMIZER_FILE}.tmp"
    torch.save(optimizer.state_dict(), tmp)
    tmp.replace(dest / OPTIMIZER_FILE)
    write_json_atomic(dest / STATE_FILE, state)
    return dest

