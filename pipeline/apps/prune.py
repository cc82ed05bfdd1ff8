"""Downstream pruning: a registered pruner + a target dataset -> a small, fine-tuned, exported net.

``prune_dataset`` is what ``stamp prune`` runs. It loads the pruner (registry URI or directory),
loads and prepares the target data, shows the encoder a seeded class-balanced sample, prunes and
fine-tunes with :func:`stamp_core.prune_for_task`, measures the result and writes::

    OUT/spec.json              PruneSpec (+ class names, num_classes, sha256 of the weights)
    OUT/pruned_state_dict.pt   weights of the pruned net (load with weights_only=True)
    OUT/model.onnx             ONNX export, checked against PyTorch with onnxruntime
    OUT/model.torchscript.pt   TorchScript trace, checked against PyTorch
    OUT/report.json, report.md accuracy, MACs, params, CPU latency (and its thread count), timings;
                               with ``compare_full`` also the full network fine-tuned the same way
    OUT/kept_channels.png      channels kept per layer (the picture report.md shows)

:func:`register_pruned` then logs that directory as its own MLflow model (``stamp prune
--register NAME``): servable with ``mlflow models serve``, lineage in its version tags, the report
as its description.

Outputs are built in memory, written into a private staging directory inside OUT and renamed
into place with ``spec.json`` last; an existing ``spec.json`` is removed before the renames. So a
``spec.json`` in OUT always sits next to the weights it describes: a crash, a full disk or a
read-only directory never leaves a spec that looks valid over missing or foreign weights.

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): the default dynamo exporter of
torch 2.13 needs ``onnxscript``, which this project does not install. The legacy exporter is
deprecated upstream; when it goes, switch to ``dynamo=True`` and add ``onnxscript``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from stamp_core import (
    PruneSpec,
    StampPruner,
    TaskSummary,
    TrainConfig,
    default_finetune,
    build_backbone_from_config,
    prune_and_finetune,
    load_pruned_model,
    count_macs_params,
    measure_latency,
    prepare_images,
    prune_for_task,
    task_classes,
    torch_threads,
)
from stamp_core.selection import select_mask
from pipeline.data import ArrayDataset

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "pruned_state_dict.pt"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
KEPT_PLOT = "kept_channels.png"
#: Renamed into place in this order; spec.json last so its presence means the rest is there.
_COMMIT_ORDER = (WEIGHTS_FILE, ONNX_FILE, TORCHSCRIPT_FILE, KEPT_PLOT, REPORT_JSON, REPORT_MD, SPEC_FILE)
ONNX_OPSET = 17


class PruneError(RuntimeError):
    """Pruning a dataset failed for a reason the message explains."""


class OutputDirError(PruneError):
    """The output directory cannot be created or written."""


class ExportError(PruneError):
    """An exported model does not reproduce the PyTorch model's outputs."""


@dataclass
class PruneReport:
    """What ``prune_dataset`` produced and measured (``report.json`` holds the same)."""

    out_dir: str
    dataset: str
    pruner: str  #: where the pruner came from (URI, directory or "in-memory")
    class_names: list[str]
    n_train: int
    n_test: int
    macs_ratio_target: float
    round_to: int
    seed: int
    finetune_epochs: int
    sample_size: int  #: images the set encoder read
    accuracy_before_finetune: float | None  #: pruned net + prototype head, test split
    accuracy: float | None  #: pruned net after fine-tuning, test split
    macs_full: int  #: full backbone with this task's classifier, one image
    macs_pruned: int
    params_full: int
    params_pruned: int
    latency_threads: int
    latency_ms: dict[str, float]  #: ``{full,pruned}_b{1,64}``: median ms per forward pass
    prune_seconds: float  #: set embedding + mask + physical pruning + prototype head
    finetune_seconds: float
    export_seconds: float
    total_seconds: float  #: data in hand -> deployable model (prune + fine-tune + export)
    onnx_max_abs_diff: float | None
    torchscript_max_abs_diff: float | None
    files: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    full_history: list[dict[str, float]] = field(default_factory=list)  #: the full network's fine-tune (``compare_full``)
    pruner_version: str | None = None  #: registry version of the pruner (None: not from the registry)
    dataset_sha256: str = ""  #: content hash of the data (pixels, labels, class names)
    cpu_count: int | None = None  #: logical CPUs of the machine the latencies were measured on
    #: The full network fine-tuned with the same settings (``compare_full``); None when not run.
    full_accuracy_before_finetune: float | None = None
    full_accuracy: float | None = None
    full_finetune_seconds: float | None = None
    #: ``select`` > 1: each proposed candidate's accuracy on the selection split (held out of the training
    #: images) after a short fine-tune, the one-pass choice, and the seconds selection took (in prune_seconds).
    selection: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def macs_ratio(self) -> float:
        return self.macs_pruned / self.macs_full

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["num_classes"] = self.num_classes
        d["macs_ratio"] = self.macs_ratio
        return d

    def to_markdown(self) -> str:
        def acc(v: float | None) -> str:
            return "n/a (no test split)" if v is None else f"{100 * v:.2f}%"

        def ms(key: str) -> str:
            return f"{self.latency_ms[key]:.2f}" if key in self.latency_ms else "n/a"

        def speedup(b: int) -> str:
            full, pruned = self.latency_ms.get(f"full_b{b}"), self.latency_ms.get(f"pruned_b{b}")
            return f"{full / pruned:.2f}x" if full and pruned else "n/a"

        compared = self.full_finetune_seconds is not None
        version = f" (version {self.pruner_version})" if self.pruner_version else ""
        lines = [
            f"# STAMP pruning report: {self.dataset}",
            "",
            f"Pruner: `{self.pruner}`{version}  ",
            f"Budget: {self.macs_ratio_target:g} of the full net's MACs (round_to={self.round_to}), "
            f"seed {self.seed}, {self.finetune_epochs} fine-tune epoch(s)  ",
            f"Data: {self.num_classes} classes, {self.n_train} train / {self.n_test} test images; "
            f"the set encoder read {self.sample_size}" + (f"; content sha256 `{self.dataset_sha256[:16]}`" if self.dataset_sha256 else ""),
            "",
            "| | full | pruned | ratio |",
            "|---|---:|---:|---:|",
            f"| MACs (one image) | {self.macs_full:,} | {self.macs_pruned:,} | {self.macs_ratio:.3f} |",
            f"| parameters | {self.params_full:,} | {self.params_pruned:,} | {self.params_pruned / self.params_full:.3f} |",
            f"| CPU latency batch 1 (ms, {self.latency_threads} thread(s)) | {ms('full_b1')} | {ms('pruned_b1')} | {speedup(1)} |",
            f"| CPU latency batch 64 (ms, {self.latency_threads} thread(s)) | {ms('full_b64')} | {ms('pruned_b64')} | {speedup(64)} |",
            "",
            f"Latencies: median wall time of one forward pass with torch limited to {self.latency_threads} "
            f"thread(s)" + (f" on a machine with {self.cpu_count} logical CPUs" if self.cpu_count else "") + ".",
            "",
        ]
        if compared:
            lines += [
                f"| accuracy (test), {self.finetune_epochs} fine-tune epoch(s) each | pruned | full |",
                "|---|---:|---:|",
                f"| before fine-tune (prototype head) | {acc(self.accuracy_before_finetune)} | {acc(self.full_accuracy_before_finetune)} |",
                f"| after fine-tune | {acc(self.accuracy)} | {acc(self.full_accuracy)} |",
                f"| fine-tune time (s) | {self.finetune_seconds:.2f} | {self.full_finetune_seconds:.2f} |",
            ]
        else:
            lines += [
                "| accuracy (test) | |",
                "|---|---:|",
                f"| pruned, before fine-tune (prototype head) | {acc(self.accuracy_before_finetune)} |",
                f"| pruned, after fine-tune | {acc(self.accuracy)} |",
            ]
        lines += [
            "",
            "| time | seconds |",
            "|---|---:|",
            f"| prune (sample -> pruned net) | {self.prune_seconds:.2f} |",
            f"| fine-tune | {self.finetune_seconds:.2f} |",
            f"| export + checks | {self.export_seconds:.2f} |",
            f"| data in hand -> deployable model | {self.total_seconds:.2f} |",
            "",
            *self._selection_lines(),
            "Exports (max abs difference of logits vs PyTorch): "
            f"ONNX {_fmt_diff(self.onnx_max_abs_diff)}, TorchScript {_fmt_diff(self.torchscript_max_abs_diff)}.",
            "",
        ]
        if KEPT_PLOT in self.files:
            lines += [f"![channels kept per layer]({KEPT_PLOT})", ""]
        return "\n".join(lines)


    def _selection_lines(self) -> list[str]:
        if not self.selection:
            return []
        sel = self.selection
        rows = [f"| `{name}`{' (one-pass)' if name == sel['one_pass'] else ''}{' **chosen**' if name == sel['chosen'] else ''} "
                f"| {100 * acc:.2f}% |" for name, acc in sel["scores"].items()]
        return [f"Test-time selection: {len(sel['scores'])} candidate masks, each fine-tuned for {sel['epochs']} epoch(s) "
                f"on the training images less {sel['split_images']} held out to score them ({sel['seconds']:.1f} s):", "",
                "| candidate | selection-split accuracy |", "|---|---:|", *rows, ""]


def _fmt_diff(v: float | None) -> str:
    return "not exported" if v is None else f"{v:.2e}"


# ----------------------------------------------------------------------------- inputs


def resolve_pruner(source: StampPruner | str | os.PathLike[str]) -> tuple[StampPruner, str]:
    """A pruner and a printable description of where it came from."""
    pruner, where, _ = locate_pruner(source)
    return pruner, where


def locate_pruner(source: StampPruner | str | os.PathLike[str]) -> tuple[StampPruner, str, str | None]:
    """A pruner, where it came from, and its registry version (None when not from the registry).

    A ``models:/NAME@ALIAS`` URI is pinned to its version first, so the version recorded is the
    one loaded even if the alias moves meanwhile.
    """
    if isinstance(source, StampPruner):
        return source, "in-memory", None
    from pipeline.registry import load_pruner, pin_model_uri, redact

    pinned, version = pin_model_uri(str(source))
    return load_pruner(pinned), redact(str(source)), version


def resolve_data(data: ArrayDataset | str) -> ArrayDataset:
    """An ArrayDataset from a dataset, a ``load_source`` spec, ``catalog:NAME`` or ``s3://.../NAME``.

    ``s3://BUCKET/PREFIX/NAME`` names dataset NAME of the catalog at
    ``s3://BUCKET/PREFIX/catalog.json``; ``catalog:NAME`` uses the configured catalog.
    """
    if isinstance(data, ArrayDataset):
        return data
    if not isinstance(data, str) or not data:
        raise ValueError(f"data={data!r}: expected an ArrayDataset or a dataset spec string")
    if data.startswith("catalog:"):
        from pipeline.settings import get_settings

        return load_catalog_dataset(get_settings().catalog_url, data[len("catalog:"):])
    if data.startswith("s3://"):
        base, _, name = data.rstrip("/").rpartition("/")
        if not name or base == "s3:/":
            raise ValueError(f"{data!r}: expected s3://BUCKET/PREFIX/DATASET (the catalog is PREFIX/catalog.json)")
        from pipeline.data import catalog_url_for

        return load_catalog_dataset(catalog_url_for(base), name)
    from pipeline.data import load_source

    return load_source(data)


def load_catalog_dataset(catalog_url: str, name: str) -> ArrayDataset:
    """Every split of a catalogued dataset, read from its shards."""
    from pipeline.data import Catalog, load_split_arrays

    entry = Catalog.load(catalog_url, missing_ok=False).get(name)
    if "train" not in entry.splits:
        raise ValueError(f"dataset {name!r} in {catalog_url} has no 'train' split (it has {sorted(entry.splits)})")
    x_train, y_train = load_split_arrays(catalog_url, name, "train")
    h, w, c = entry.image_shape
    if "test" in entry.splits:
        x_test, y_test = load_split_arrays(catalog_url, name, "test")
    else:
        x_test, y_test = np.zeros((0, h, w, c), np.uint8), np.zeros(0, np.int64)
    return ArrayDataset(name, x_train, y_train, x_test, y_test, list(entry.class_names), source=f"{catalog_url}#{name}")


def summarize_sample(pruner: StampPruner, x: torch.Tensor, y: torch.Tensor, per_class: int,
                     seed: int) -> tuple[TaskSummary, int]:
    """The pruner's summary of a seeded class-balanced sample of a task's prepared images ``x`` and labels ``y``
    (what ``stamp prune`` reads of a user's data; the benchmark's STAMP cells read the same), and the sample's size."""
    idx = torch.from_numpy(class_balanced_sample(y.numpy(), per_class, seed, pruner.config.max_support,
                                                 pruner.min_support_per_class))
    with torch.no_grad():
        return pruner.summarize(x[idx], y[idx], num_classes=int(torch.unique(y).numel())), len(idx)


def class_balanced_sample(labels: np.ndarray, per_class: int, seed: int, cap: int, min_per_class: int = 1) -> np.ndarray:
    """Sorted indices of at most ``per_class`` seeded random images per class, ``cap`` in all.

    When ``cap`` allows fewer than ``min_per_class`` images of every class (a many-class task), a seeded random
    subset of the classes keeps ``min_per_class`` images each (or as many as a typical class holds, if fewer)
    instead of one or two images of every class: the outcome pruner's class separability needs several images
    of a class (``StampPruner.min_support_per_class``).
    """
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    per = max(1, min(per_class, cap // max(1, len(classes))))
    if per < min_per_class:
        per = max(1, min(min_per_class, max(2, int(np.median(counts)))))
        keep = max(1, cap // per)
        if keep < len(classes):
            classes = np.sort(rng.choice(classes, keep, replace=False))
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes]
    return np.sort(np.concatenate(picked))[:cap]


def _check_args(macs_ratio: float, finetune_epochs: int, round_to: int, sample_per_class: int) -> float:
    try:
        r = float(macs_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"macs_ratio={macs_ratio!r}: expected a number in (0, 1]") from None
    if not np.isfinite(r) or not 0.0 < r <= 1.0:
        raise ValueError(f"macs_ratio={macs_ratio!r}: expected a number in (0, 1] (0.3 keeps 30% of the MACs)")
    for label, value, low in (("finetune_epochs", finetune_epochs, 0), ("round_to", round_to, 1), ("sample_per_class", sample_per_class, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label}={value!r}: expected an integer >= {low}")
    return r


# ----------------------------------------------------------------------------- outputs


def _open_output(out: Path) -> Path:
    """Create ``out`` if needed and a private staging directory in it; fail before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create output directory {out}: {exc.strerror or exc}; choose another output directory") from None
    if not out.is_dir():
        raise OutputDirError(f"output path {out} exists and is not a directory")
    try:
        return Path(tempfile.mkdtemp(prefix=".stamp-prune-", dir=out))
    except OSError as exc:
        raise OutputDirError(
            f"output directory {out} is not writable ({exc.strerror or exc}): fix its permissions or choose another one"
        ) from None


def _write_error(out: Path, name: str, exc: OSError) -> OutputDirError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "the disk (or quota) is full"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the directory is not writable"
    else:
        why = exc.strerror or str(exc)
    return OutputDirError(f"writing {name} to {out} failed: {why} ({exc.strerror or exc}); nothing was written")


def _commit(staging: Path, out: Path, blobs: dict[str, bytes]) -> dict[str, str]:
    """Write ``blobs`` into staging, then rename them into ``out`` with the spec last."""
    for name, data in blobs.items():
        try:
            with open(staging / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise _write_error(out, name, exc) from None
    try:
        (out / SPEC_FILE).unlink(missing_ok=True)  # no old spec may describe the new weights
        for name in _COMMIT_ORDER:
            if name in blobs:
                os.replace(staging / name, out / name)
    except OSError as exc:
        raise _write_error(out, SPEC_FILE, exc) from None
    return {name: str(out / name) for name in _COMMIT_ORDER if name in blobs}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state_dict_bytes(model: nn.Module) -> bytes:
    # Serialise in memory: torch.save reports a full disk as a generic RuntimeError, plain file
    # writes report OSError with errno, which _write_error can explain.
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------- exports


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _check_parity(kind: str, diff: float, ref_scale: float, atol: float) -> None:
    """``diff`` must be below ``atol``, scaled up for logits larger than 1.

    float32 carries ~7 significant digits, so two correct runtimes disagree by ~1e-7 of the
    logits' magnitude; scaling keeps a (badly trained) net with huge logits from failing a
    faithful export, and is exactly ``atol`` for ordinary logits.
    """
    tol = atol * max(1.0, ref_scale)
    if not diff < tol:
        raise ExportError(
            f"the {kind} export differs from the PyTorch model by {diff:.3g} "
            f"(tolerance {tol:.3g} for logits up to {ref_scale:.3g})"
        )


@torch.no_grad()
def export_onnx(model: nn.Module, check_inputs: torch.Tensor, atol: float = 1e-4) -> tuple[bytes, float]:
    """ONNX bytes (dynamic batch) and the max abs logit difference vs PyTorch under onnxruntime."""
    # torch's TorchScript-based exporter needs onnx to write the model; onnxruntime checks it.
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"the ONNX export needs {' and '.join(missing)}: pip install onnx onnxruntime, "
            "or turn the ONNX export off (export_onnx_model=False)"
        )
    import onnxruntime as ort
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is chosen on purpose (see the module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (check_inputs[:2],), buf, dynamo=False, opset_version=ONNX_OPSET,
            input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    data = buf.getvalue()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    diff, scale = 0.0, 0.0
    for batch in (check_inputs[:1], check_inputs):  # batch 1 and a larger one: the batch axis is dynamic
        ref = model(batch).numpy()
        got = session.run(["logits"], {"images": batch.numpy()})[0]
        diff, scale = max(diff, _max_abs_diff(ref, got)), max(scale, float(np.abs(ref).max()))
    _check_parity("ONNX", diff, scale, atol)
    return data, diff


@torch.no_grad()
def export_torchscript(model: nn.Module, check_inputs: torch.Tensor, atol: float = 1e-4) -> tuple[bytes, float]:
    """TorchScript (traced) bytes and the max abs logit difference of the reloaded module vs PyTorch."""
    model.eval()
    with warnings.catch_warnings():
        # torch 2.13 marks torch.jit as deprecated; TorchScript is still the format C++ and
        # mobile runtimes load, which is why the file is produced.
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, check_inputs[:2])
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        reloaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    diff, scale = 0.0, 0.0
    for batch in (check_inputs[:1], check_inputs):
        ref = model(batch).numpy()
        diff, scale = max(diff, _max_abs_diff(ref, reloaded(batch).numpy())), max(scale, float(np.abs(ref).max()))
    _check_parity("TorchScript", diff, scale, atol)
    return data, diff


def _latencies(full: nn.Module, pruned: nn.Module, input_shape: tuple[int, int, int], threads: int) -> dict[str, float]:
    """Median ms per forward pass at batch 1 and 64 with a fixed thread count (restored after)."""
    out = {}
    with torch_threads(threads):
        for label, model in (("full", full), ("pruned", pruned)):
            out[f"{label}_b1"] = 1000 * measure_latency(model, input_shape, 1, repeats=20, warmup=3)
            out[f"{label}_b64"] = 1000 * measure_latency(model, input_shape, 64, repeats=5, warmup=2)
    return out


# ----------------------------------------------------------------------------- main


@dataclass
class _Task:
    """The target data as the pruner reads it: tensors at the pruner's input size."""

    ds: ArrayDataset
    input_shape: tuple[int, int, int]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None


@dataclass
class _Pruned:
    """What pruning (and fine-tuning) produced, with the seconds the set embedding took."""

    result: Any  #: stamp_core.PruneResult of the pruned net
    full_result: Any | None  #: the same fine-tune of the unpruned net (compare_full)
    embed_seconds: float
    sample_size: int
    selection: dict[str, Any] | None = None  #: test-time selection (``select`` > 1)


def prune_dataset(
    model_uri_or_pruner: StampPruner | str | os.PathLike[str],
    data: ArrayDataset | str,
    macs_ratio: float,
    finetune_epochs: int,
    out_dir: str | os.PathLike[str],
    round_to: int = 1, seed: int = 0, sample_per_class: int = 20, progress: bool | Any = True,
    *,
    latency_threads: int = 1, export_onnx_model: bool = True, export_torchscript_model: bool = True,
    parity_atol: float = 1e-4, finetune: TrainConfig | None = None, compare_full: bool = False,
    select: int = 1, select_epochs: int = 1,
) -> PruneReport:
    """Prune a registered pruner's backbone for ``data`` and write a deployable model to ``out_dir``.

    Args:
        model_uri_or_pruner: a StampPruner, a registry URI (``models:/stamp-pruner@champion``) or a
            pruner directory.
        data: an ArrayDataset, a ``load_source`` spec (``procedural:NAME``, ``digits``,
            ``npz:PATH``, ``folder:PATH``), ``catalog:NAME`` or ``s3://BUCKET/PREFIX/NAME``.
        macs_ratio: budget in (0, 1]: MACs of the pruned net <= this share of the full net's.
        finetune_epochs: fine-tune epochs of the pruned net (0: prototype head only).
        out_dir: output directory (created; files in it are replaced).
        round_to: keep a multiple of this many channels per layer.
        seed: picks the encoder's sample and seeds fine-tuning.
        sample_per_class: images per class the set encoder reads (capped by the pruner's max_support).
        progress: print one line per step to stderr (True), to this rich Console, or not (False).
        latency_threads: torch threads during the latency measurement.
        export_onnx_model, export_torchscript_model: write and verify those exports.
        parity_atol: largest accepted logit difference of an export vs PyTorch (scaled by the
            largest logit when that exceeds 1).
        finetune: full fine-tune settings (its ``epochs`` and ``seed`` are overridden).
        compare_full: also fine-tune the unpruned network with the same settings (same start:
            BatchNorm recalibration + prototype head, same epochs, seed and data) and report both.
        select: > 1 turns on test-time selection: the pruner's ``select`` best-ranked masks are each fine-tuned
            for ``select_epochs`` on the training images less a held-out fifth per class, and the one that scores
            best there is deployed (needs a ``generator: outcome`` pruner). 1 = the one-pass mask.
        select_epochs: the short fine-tune of each candidate when selecting.

    Raises:
        ValueError: bad arguments or data. OutputDirError: output not writable or disk full.
        ExportError: an export does not reproduce the model. RegistryError: pruner not found.
    """
    ratio = _check_run_args(macs_ratio, finetune_epochs, round_to, sample_per_class, select, select_epochs,
                            latency_threads)
    out = Path(out_dir).expanduser().resolve()
    staging = _open_output(out)  # before any work: a bad output directory fails in milliseconds
    say = _Steps(progress)
    try:
        say("load pruner")
        pruner, pruner_source, pruner_version = _load_pruner(model_uri_or_pruner, select)
        say("load data")
        task = _load_task(pruner, data)
        cfg = dataclasses.replace(finetune or default_finetune(), epochs=finetune_epochs, seed=seed)
        pruned = _prune_for(pruner, task, ratio, cfg, round_to, sample_per_class, compare_full, say,
                            select=select, select_epochs=select_epochs)
        report, blobs = _deployable(pruner, task, pruned, out, say, parity_atol=parity_atol, onnx=export_onnx_model,
                                    torchscript=export_torchscript_model, pruner_source=pruner_source,
                                    pruner_version=pruner_version, ratio=ratio, round_to=round_to, seed=seed,
                                    finetune_epochs=finetune_epochs, latency_threads=latency_threads)
        say(f"write {out}")
        _commit(staging, out, blobs)
        say.finish(_summary(report))
    except BaseException as exc:
        say.fail(exc)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _check_run_args(macs_ratio: float, finetune_epochs: int, round_to: int, sample_per_class: int, select: int,
                    select_epochs: int, latency_threads: int) -> float:
    """Every argument of :func:`prune_dataset` that needs checking, before any work; returns the MACs ratio."""
    ratio = _check_args(macs_ratio, finetune_epochs, round_to, sample_per_class)
    for name, value in (("select", select), ("select_epochs", select_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected an integer >= 1")
    if isinstance(latency_threads, bool) or not isinstance(latency_threads, int) or latency_threads < 1:
        raise ValueError(f"latency_threads={latency_threads!r}: expected an integer >= 1")
    return ratio


def _load_pruner(source: StampPruner | str | os.PathLike[str], select: int) -> tuple[StampPruner, str, str | None]:
    """The pruner in eval mode, where it came from and its registry version; checks it can serve ``select``."""
    pruner, pruner_source, pruner_version = locate_pruner(source)
    pruner.eval()
    if select > 1:  # before loading data: only the outcome generator proposes several masks
        if pruner.config.generator != "outcome":
            raise ValueError(f"select={select} needs a pruner with generator 'outcome' (this one is "
                             f"{pruner.config.generator!r}): only it ranks whole candidate masks")
    return pruner, pruner_source, pruner_version


def _deployable(pruner: StampPruner, task: _Task, pruned: _Pruned, out: Path, say: "_Steps", *, parity_atol: float,
                onnx: bool, torchscript: bool, **run: Any) -> tuple[PruneReport, dict[str, bytes]]:
    """Measure the pruned net, export and check it, and build every output file in memory.

    ``run`` holds what :func:`_report` records of the call (pruner source and version, ratio, seed, ...).
    """
    model = pruned.result.model.eval()
    say("measure MACs, parameters, CPU latency")
    costs = _costs(pruner, model, task, run["latency_threads"])
    say("export ONNX + TorchScript and check them")
    t1 = time.perf_counter()
    blobs, spec, diffs = _exports(model, pruned.result.spec, task, parity_atol, onnx, torchscript)
    export_seconds = time.perf_counter() - t1
    report = _report(out, task, pruned, costs, diffs, export_seconds, **run)
    report.files = {name: str(out / name) for name in _COMMIT_ORDER if name in blobs or name in (SPEC_FILE, REPORT_JSON, REPORT_MD)}
    blobs[REPORT_JSON] = json.dumps(report.to_dict(), indent=2, sort_keys=True).encode()
    blobs[REPORT_MD] = report.to_markdown().encode()
    blobs[SPEC_FILE] = spec.to_json(indent=2).encode()
    return report, blobs


def _summary(report: PruneReport) -> str:
    """The closing progress line: MACs share, accuracy and time from data to deployable model."""
    return (
        f"{report.macs_ratio:.3f} of the MACs, accuracy "
        f"{'n/a' if report.accuracy is None else f'{100 * report.accuracy:.1f}%'}, "
        f"{report.total_seconds:.1f} s data -> deployable"
    )


def _load_task(pruner: StampPruner, data: ArrayDataset | str) -> _Task:
    """The dataset as tensors at the pruner's input size; every class must have training images."""
    ds = resolve_data(data)
    size, channels = pruner.config.image_size, pruner.backbone.in_channels
    has_test = len(ds.x_test) > 0
    if task_classes(torch.from_numpy(ds.y_train)) != ds.num_classes:
        # prune_for_task sizes the head from the train labels; the exported net must still
        # have one output per class name.
        raise PruneError(
            f"dataset {ds.name!r} has {ds.num_classes} classes but its train split has no image of "
            f"class {ds.num_classes - 1} ({ds.class_names[-1]!r}): every class needs training images"
        )
    return _Task(ds=ds, input_shape=(channels, size, size), x_train=prepare_images(ds.x_train, size, channels),
                 y_train=torch.from_numpy(ds.y_train),
                 x_test=prepare_images(ds.x_test, size, channels) if has_test else None,
                 y_test=torch.from_numpy(ds.y_test) if has_test else None)


def _prune_for(pruner: StampPruner, task: _Task, ratio: float, cfg: TrainConfig, round_to: int,
               sample_per_class: int, compare_full: bool, say: "_Steps", select: int = 1, select_epochs: int = 1) -> _Pruned:
    """Embed a class-balanced sample, prune to ``ratio`` (choosing among ``select`` proposals by a short fine-tune
    when ``select`` > 1), fine-tune (and the full net too, with ``compare_full``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        say(f"prune to {ratio:g} of the MACs")
        t0 = time.perf_counter()
        embedding, sample_size = summarize_sample(pruner, task.x_train, task.y_train, sample_per_class, cfg.seed)
        embed_seconds = time.perf_counter() - t0
        selection = None
        if select > 1:
            say(f"select among {select} proposed masks ({select_epochs}-epoch fine-tune each on a held-out split)")
            chosen = select_mask(pruner, task.x_train, task.y_train, ratio, select,
                                 dataclasses.replace(cfg, epochs=select_epochs), round_to=round_to, seed=cfg.seed,
                                 embedding=embedding)
            embed_seconds += chosen.seconds
            selection = {"scores": chosen.scores, "one_pass": chosen.one_pass, "chosen": chosen.spec.metadata.get("candidate"),
                         "epochs": select_epochs, "split_images": chosen.split_images, "seconds": chosen.seconds}
        if cfg.epochs:
            say(f"fine-tune the pruned net on {len(task.x_train)} images", cfg.epochs, "epochs")
        if selection is not None:
            result = prune_and_finetune(pruner.backbone, chosen.spec, task.x_train, task.y_train, task.x_test,
                                        task.y_test, cfg, on_epoch=say.on_epoch)
        else:
            result = prune_for_task(
                pruner, task.x_train, task.y_train, task.x_test, task.y_test, macs_ratio=ratio, finetune=cfg,
                round_to=round_to, embedding=embedding, on_epoch=say.on_epoch,
            )
        full_result = None
        if compare_full:
            say("fine-tune the full net the same way (reference)", cfg.epochs or None, "epochs")
            torch.manual_seed(cfg.seed)
            full_result = prune_and_finetune(pruner.backbone, None, task.x_train, task.y_train, task.x_test,
                                             task.y_test, cfg, on_epoch=say.on_epoch)
    return _Pruned(result=result, full_result=full_result, embed_seconds=embed_seconds, sample_size=sample_size,
                   selection=selection)


def _costs(pruner: StampPruner, model: nn.Module, task: _Task, latency_threads: int) -> dict[str, Any]:
    """MACs and parameters of the full and the pruned net (with this task's classifier), and CPU latencies."""
    full = build_backbone_from_config({**pruner.backbone.config, "num_classes": task.ds.num_classes}).eval()
    macs_full, params_full = count_macs_params(full, task.input_shape)
    macs_pruned, params_pruned = count_macs_params(model, task.input_shape)
    return {"macs_full": macs_full, "params_full": params_full, "macs_pruned": macs_pruned,
            "params_pruned": params_pruned, "latency_ms": _latencies(full, model, task.input_shape, latency_threads)}


def _exports(model: nn.Module, spec: PruneSpec, task: _Task, parity_atol: float, onnx: bool,
             torchscript: bool) -> tuple[dict[str, bytes], PruneSpec, dict[str, float | None]]:
    """The files of the deployable model (weights, checked exports, plot) and its spec with the data's metadata."""
    check = (task.x_test if task.x_test is not None else task.x_train)[:8].contiguous()
    if len(check) < 2:
        check = torch.cat([check, check])
    weights = _state_dict_bytes(model)
    blobs: dict[str, bytes] = {WEIGHTS_FILE: weights}
    diffs: dict[str, float | None] = {"onnx": None, "torchscript": None}
    if onnx:
        blobs[ONNX_FILE], diffs["onnx"] = export_onnx(model, check, parity_atol)
    if torchscript:
        blobs[TORCHSCRIPT_FILE], diffs["torchscript"] = export_torchscript(model, check, parity_atol)
    ds = task.ds
    spec = dataclasses.replace(spec, metadata={
        **spec.metadata,
        "dataset": ds.name,
        "num_classes": ds.num_classes,
        "class_names": list(ds.class_names),
        "weights_sha256": _sha256(weights),
        "image_shape": list(ds.image_shape),
    })
    blobs[KEPT_PLOT] = _kept_plot_png(ds.name, spec)
    return blobs, spec, diffs


def _report(out: Path, task: _Task, pruned: _Pruned, costs: dict[str, Any], diffs: dict[str, float | None],
            export_seconds: float, **run: Any) -> PruneReport:
    """The PruneReport of one run; ``run`` holds the arguments it was called with (ratio, seed, ...)."""
    ds, result, full_result = task.ds, pruned.result, pruned.full_result
    prune_seconds = pruned.embed_seconds + result.prune_seconds
    report = PruneReport(
        out_dir=str(out), dataset=ds.name, pruner=run["pruner_source"], class_names=list(ds.class_names),
        n_train=len(ds.x_train), n_test=len(ds.x_test), macs_ratio_target=run["ratio"], round_to=run["round_to"],
        seed=run["seed"], finetune_epochs=run["finetune_epochs"], sample_size=pruned.sample_size,
        accuracy_before_finetune=result.accuracy_before_finetune, accuracy=result.accuracy,
        latency_threads=run["latency_threads"], **costs,
        prune_seconds=prune_seconds, finetune_seconds=result.finetune_seconds, export_seconds=export_seconds,
        total_seconds=prune_seconds + result.finetune_seconds + export_seconds,
        onnx_max_abs_diff=diffs["onnx"], torchscript_max_abs_diff=diffs["torchscript"], history=result.history,
        pruner_version=run["pruner_version"], dataset_sha256=ds.content_sha256(), cpu_count=os.cpu_count(),
        selection=pruned.selection,
    )
    if full_result is not None:
        report.full_accuracy_before_finetune = full_result.accuracy_before_finetune
        report.full_accuracy = full_result.accuracy
        report.full_finetune_seconds = full_result.finetune_seconds
        report.full_history = full_result.history
    return report


def _kept_plot_png(dataset: str, spec: PruneSpec) -> bytes:
    from pipeline.plots import plot_kept_fractions

    buf = io.BytesIO()
    plot_kept_fractions({dataset: spec}).savefig(buf, format="png", dpi=100)
    return buf.getvalue()


class _Steps:
    """prune_dataset's steps, one :func:`pipeline.apps.terminal.stage_progress` line each.

    ``progress``: True (stderr), a rich Console (the CLI's terminal stream) or False (silent).
    Calling it closes the current step's line and opens the next one.
    """

    def __init__(self, progress: bool | Any) -> None:
        from rich.console import Console

        if isinstance(progress, bool):
            progress = Console(stderr=True, highlight=False, quiet=not progress)
        self.console: Any = progress
        self._stack = contextlib.ExitStack()
        self._line: Any = None

    def __call__(self, title: str, total: float | None = None, unit: str = "") -> None:
        from pipeline.apps.terminal import stage_progress

        self._stack.close()
        self._line = self._stack.enter_context(stage_progress(self.console, title, total, unit))

    def on_epoch(self, record: dict[str, float]) -> None:
        """A fine-tune epoch's record -> the current line (epochs done, loss, train accuracy)."""
        if self._line is not None:
            self._line.update(record["epoch"], f"loss {record['loss']:.3f} · train acc {record['accuracy']:.1%}")

    def finish(self, summary: str) -> None:
        self._stack.close()
        self.console.print(f"[bold]done[/]: {summary}", highlight=False, soft_wrap=True)

    def fail(self, exc: BaseException) -> None:
        """Close the current line as failed (the error itself is the caller's to raise and report)."""
        try:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:  # noqa: BLE001 - the line re-raises ``exc``; the caller raises it
            pass


# ----------------------------------------------------------------------------- registering


def register_pruned(
    report: PruneReport,
    name: str,
    alias: str | None = None,
    *,
    experiment: str | None = "stamp-prune",
    tracking_uri: str | None = None,
) -> Any:
    """Register the pruned network ``report`` describes as its own MLflow model (``stamp prune --register``).

    Lineage tags: pruner URI and version, dataset name and content hash, budget, fine-tune
    settings; metric tags: real MACs ratio, accuracies (also the full network's when compared).
    The version's description is report.md; report.md, report.json and the kept-channels PNG
    are run artifacts under ``report/``. Returns the :class:`pipeline.registry.RegisteredModel`.
    """
    from pipeline.registry import log_pruned_model

    out = Path(report.out_dir)
    lineage = {
        "pruner_uri": report.pruner,
        "pruner_version": report.pruner_version,
        "dataset": report.dataset,
        "dataset_sha256": report.dataset_sha256,
        "macs_ratio_target": report.macs_ratio_target,
        "round_to": report.round_to,
        "finetune_epochs": report.finetune_epochs,
        "seed": report.seed,
    }
    metrics = {
        "macs_ratio": report.macs_ratio,
        "macs_pruned": report.macs_pruned,
        "params_pruned": report.params_pruned,
        "accuracy": report.accuracy,
        "accuracy_before_finetune": report.accuracy_before_finetune,
        "full_accuracy": report.full_accuracy,
        "full_accuracy_before_finetune": report.full_accuracy_before_finetune,
    }
    return log_pruned_model(
        out,
        name=name,
        alias=alias,
        lineage=lineage,
        metrics={k: v for k, v in metrics.items() if v is not None},
        description=(out / REPORT_MD).read_text(),
        report_files=[out / f for f in (REPORT_MD, REPORT_JSON, KEPT_PLOT) if (out / f).is_file()],
        experiment=experiment,
        tracking_uri=tracking_uri,
    )


# ----------------------------------------------------------------------------- reading back


def load_pruned(out_dir: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the pruned network from ``spec.json`` + ``pruned_state_dict.pt`` (eval mode).

    The architecture comes from the backbone definition and the spec; the weights are read with
    ``weights_only=True`` and must match the sha256 recorded in the spec.
    """
    out = Path(out_dir)
    spec_path, weights_path = out / SPEC_FILE, out / WEIGHTS_FILE
    missing = [p.name for p in (spec_path, weights_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{out} is not a pruned model directory: missing {', '.join(missing)} (written by `stamp prune`)")
    return load_pruned_model(spec_path, weights_path)
