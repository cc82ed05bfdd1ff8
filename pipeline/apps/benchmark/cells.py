"""The benchmark grid: cells, content fingerprints and the append-only ``results.csv``.

A cell is one (target, backbone, weights, method, budget, seed). Each finished cell is appended to
``results.csv`` at once (fsync'd), so an interrupted run resumes where it stopped: a cell already
recorded with the same fingerprint is skipped. The fingerprint hashes the settings a cell's numbers
depend on *and the contents* of the weights, the pruner and the target data, so re-training a model
into the same path never leaves stale numbers behind.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import BenchmarkConfig
from stamp_core import jaccard_distance

RESULTS_CSV = "results.csv"
MASKS_JSONL = "masks.jsonl"

#: Weight sets every mask is applied to: the plain pretrained backbone and the pruner's meta-trained one.
WEIGHT_SETS = ("pretrained", "meta")
#: Prefix of the adaptivity cells: ``stamp@U`` is STAMP's mask generated for target U, applied to another target.
CROSS_PREFIX = "stamp@"

COLUMNS = [
    "target", "backbone", "weights", "method", "macs_ratio_target", "seed", "status", "error",
    "accuracy", "accuracy_before_finetune", "finetune_epochs", "curve",
    "macs", "params", "macs_full", "params_full", "macs_ratio",
    "latency_b1_ms", "latency_b64_ms", "latency_threads", "mask_seconds", "method_train_seconds",
    "build_seconds", "finetune_seconds", "total_seconds", "n_train", "n_test", "num_classes",
    "fingerprint", "finished_at",
]
_FLOATS = {"accuracy", "accuracy_before_finetune", "macs_ratio", "latency_b1_ms", "latency_b64_ms", "mask_seconds",
           "method_train_seconds", "build_seconds", "finetune_seconds", "total_seconds", "macs_ratio_target"}
_INTS = {"macs", "params", "macs_full", "params_full", "latency_threads", "n_train", "n_test", "num_classes", "seed",
         "finetune_epochs"}
_KEY_COLUMNS = ("target", "backbone", "weights", "method", "macs_ratio_target", "seed", "status")


class BenchmarkError(RuntimeError):
    """The benchmark cannot run (bad inputs named in the message); single cells never raise it."""


@dataclass(frozen=True)
class CellKey:
    """One cell of the grid; ``budget`` is 1.0 for the full network."""

    target: str
    backbone: str
    weights: str
    method: str
    budget: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.target}|{self.backbone}|{self.weights}|{self.method}|{self.budget:g}|{self.seed}"

    @property
    def mask_source(self) -> str:
        """The target whose sample STAMP's mask was generated from (``stamp@U`` -> U, else this target)."""
        return self.method[len(CROSS_PREFIX):] if self.method.startswith(CROSS_PREFIX) else self.target


def cell_methods(cfg: BenchmarkConfig, target: str) -> list[str]:
    """The methods run on ``target``: the configured ones plus, with ``adaptivity``, ``stamp@U`` per other target U."""
    methods = list(cfg.methods)
    if cfg.adaptivity and "stamp" in cfg.methods:
        methods += [f"{CROSS_PREFIX}{t.name}" for t in cfg.targets if t.name != target]
    return methods


def plan_cells(cfg: BenchmarkConfig) -> list[CellKey]:
    """Every cell of the grid, in run order (seed, target, backbone, weights, method, budget): a run cut
    short leaves whole seeds done."""
    cells = []
    for seed in cfg.seeds:
        for target in cfg.targets:
            for model in cfg.models:
                for weights in cfg.weights:
                    for method in cell_methods(cfg, target.name):
                        budgets = [1.0] if method == "full" else cfg.budgets
                        cells.extend(CellKey(target.name, model.backbone, weights, method, float(r), seed) for r in budgets)
    return cells


# ----------------------------------------------------------------------------- content hashes


def hash_state_dict(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def hash_arrays(*arrays: np.ndarray) -> str:
    """sha256 of arrays (shapes, dtypes and bytes), e.g. a target's splits."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}|{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fingerprint(cfg: BenchmarkConfig, cell: CellKey, contents: dict[str, str]) -> str:
    """Hash of what a cell's numbers depend on: settings and the contents of its weights, pruner and data.

    Args:
        cfg: the benchmark settings.
        cell: the cell.
        contents: content hashes by role: ``pruner``, ``pretrained`` (when used), ``target`` and, for
            ``stamp@U`` cells, ``source`` (U's data).
    """
    parts: dict[str, Any] = {
        "contents": contents, "weights": cell.weights,
        "max_train_per_class": cfg.max_train_per_class, "max_test_per_class": cfg.max_test_per_class,
        "round_to": cfg.round_to, "finetune": cfg.finetune.model_dump(mode="json"), "recalibrate_bn": cfg.recalibrate_bn,
        "latency": cfg.latency.model_dump(mode="json"), "threads": cfg.threads, "device": cfg.device,
    }
    if cell.method in ("snip", "grasp"):
        parts["score_batch"] = cfg.score_batch
    if cell.method.startswith("stamp"):
        parts["sample_per_class"] = cfg.sample_per_class
    if cell.method == "stamp_mean":
        parts["ablation"] = cfg.ablation.model_dump(mode="json")
    if cell.method == "bbd":
        parts["bbd"] = cfg.bbd.model_dump(mode="json")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- results.csv


def parse_row(raw: dict[str, str]) -> dict[str, Any]:
    """A results.csv row typed (the inverse of :func:`csv_value`)."""
    row: dict[str, Any] = {}
    for k in COLUMNS:
        v = raw.get(k, "")
        if v == "" or v is None:
            row[k] = None
        elif k in _FLOATS:
            row[k] = float(v)
        elif k in _INTS:
            row[k] = int(float(v))
        elif k == "curve":
            row[k] = {int(e): tuple(p) for e, p in json.loads(v).items()}
        else:
            row[k] = v
    return row


def row_id(row: dict[str, Any]) -> str:
    return CellKey(row["target"], row["backbone"], row["weights"], row["method"], float(row["macs_ratio_target"]),
                   int(row["seed"])).id


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a results.csv (typed; empty cells are None; ``curve`` as {epochs: (accuracy, seconds)}), in file order."""
    p = Path(path)
    if not p.is_file():
        return []
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _KEY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(
                f"{p} is not a results file of this benchmark version (no column(s) {', '.join(missing)}): "
                "move it away or choose another out_dir"
            )
        rows = []
        for raw in reader:
            try:
                row = parse_row(raw)
                row_id(row)
            except (TypeError, ValueError, json.JSONDecodeError):
                continue  # a line cut short by a crash mid-write: that cell simply runs again
            if row["status"] in ("ok", "failed"):
                rows.append(row)
        return rows


def csv_value(key: str, value: Any) -> Any:
    """How a row's value is written to results.csv (None as empty, the curve as JSON)."""
    if value is None:
        return ""
    if key == "curve":
        return json.dumps({str(e): [float(a), float(s)] for e, (a, s) in sorted(value.items())})
    return value


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row and fsync; a line torn by an earlier crash is closed first."""
    new = not path.exists() or path.stat().st_size == 0
    torn = False
    if not new:
        with path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
    with path.open("a", newline="") as fh:
        if torn:
            fh.write("\n")
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: csv_value(k, row.get(k)) for k in COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())


def append_mask(path: Path, cell: CellKey, fingerprint_: str, kept: dict[str, list[int]]) -> None:
    """Record a cell's kept channels (one JSON line) for the mask-overlap (Jaccard) tables."""
    line = json.dumps({"id": cell.id, "fingerprint": fingerprint_, "kept": kept}, separators=(",", ":"))
    with path.open("a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_masks(path: Path) -> dict[str, tuple[str, dict[str, list[int]]]]:
    """Latest recorded mask per cell id: ``{id: (fingerprint, kept)}``; torn lines are skipped."""
    masks: dict[str, tuple[str, dict[str, list[int]]]] = {}
    if not path.is_file():
        return masks
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
            masks[d["id"]] = (d["fingerprint"], d["kept"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return masks


