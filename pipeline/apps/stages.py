"""The training jobs as the CLI and the demo run them: one progress line each, with ETA and key figure.

``stamp pretrain``, ``stamp meta-train``, ``stamp tune`` and the matching stages of ``stamp demo``
call these functions; each runs its job from :mod:`pipeline.training` and feeds the job's reports
(Ray Train reports relayed to the driver, Ray Tune results) into one
:func:`pipeline.apps.terminal.stage_progress` line.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from pipeline.apps.terminal import StageProgress, stage_progress


@contextmanager
def ray_started_here() -> Iterator[None]:
    """Shut down, when the block ends, a Ray the block started (explicitly or by a first Ray call).

    Now rather than at interpreter exit: shutting down prints the worker lines Ray still holds
    back for de-duplication, and only inside :func:`pipeline.apps.terminal.route_output` do they
    go to the log file.
    """
    import ray

    before = ray.is_initialized()
    try:
        yield
    finally:
        if not before and ray.is_initialized():
            ray.shutdown()


def _num(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return None
    return float(value)


def pretrain_figure(m: dict[str, Any]) -> str:
    """``loss 0.412 · train acc 87.1% · test acc 85.0% · 1,234 img/s`` from a pretrain report."""
    parts = []
    for key, label, fmt in (("loss", "loss", "{:.3f}"), ("train_accuracy", "train acc", "{:.1%}"),
                            ("test_accuracy", "test acc", "{:.1%}"), ("samples_per_s", "", "{:,.0f} img/s")):
        v = _num(m, key)
        if v is not None:
            parts.append(f"{label} {fmt.format(v)}".strip())
    return " · ".join(parts)


def meta_train_figure(m: dict[str, Any]) -> str:
    """``loss 1.20 · E[MACs] 0.31 (target 0.30) · 2.4 episodes/s · val acc 71.2%`` from meta-train reports."""
    parts = []
    if (v := _num(m, "loss")) is not None:
        parts.append(f"loss {v:.3f}")
    if (v := _num(m, "expected_macs_ratio")) is not None:
        target = _num(m, "target_macs_ratio")
        parts.append(f"E[MACs] {v:.2f}" + (f" (target {target:.2f})" if target is not None else ""))
    if (v := _num(m, "episodes_per_s")) is not None:
        parts.append(f"{v:.2f} episodes/s")
    if (v := _num(m, "val_accuracy")) is not None:
        parts.append(f"val acc {v:.1%}")
    return " · ".join(parts)


def follow_reports(line: StageProgress, position: str, figure: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], None]:
    """A report handler moving ``line`` to the report's ``position`` key; figures keep the last value of
    each metric (validation accuracy is only in some reports)."""
    seen: dict[str, Any] = {}
    lock = threading.Lock()

    def on_report(metrics: dict[str, Any]) -> None:
        with lock:
            seen.update(metrics)
            line.update(_num(metrics, position), figure(seen))

    return on_report


def run_pretrain_stage(cfg: Any, console: Console, title: str | None = None) -> Any:
    """``run_pretrain(cfg)`` with a progress line counting epochs."""
    from pipeline.training import run_pretrain

    with stage_progress(console, title or f"pretrain {cfg.run_name}", cfg.epochs, "epochs") as line:
        return run_pretrain(cfg, on_report=follow_reports(line, "epoch", pretrain_figure))


def run_meta_train_stage(cfg: Any, console: Console, title: str | None = None) -> Any:
    """``run_meta_train(cfg)`` with a progress line counting steps."""
    from pipeline.training import run_meta_train

    with stage_progress(console, title or f"meta-train {cfg.run_name}", cfg.steps, "steps") as line:
        return run_meta_train(cfg, on_report=follow_reports(line, "step", meta_train_figure))


class TuneProgress:
    """Trial reports -> one line: trial-steps done of ``trials x steps``, trials finished, best val acc.

    A trial ASHA stops early counts as all its steps done: the work left shrinks, so does the ETA.
    """

    def __init__(self, line: StageProgress, trials: int, steps: int) -> None:
        self.line = line
        self.trials = trials
        self.steps = steps
        self.step: dict[str, float] = {}
        self.finished: set[str] = set()
        self.best: float | None = None
        self._lock = threading.Lock()

    def __call__(self, trial_id: str, metrics: dict[str, Any], finished: bool) -> None:
        with self._lock:
            if finished:
                self.finished.add(trial_id)
                self.step[trial_id] = self.steps
            elif (step := _num(metrics, "step")) is not None:
                self.step[trial_id] = step
            if (acc := _num(metrics, "val_accuracy")) is not None and (self.best is None or acc > self.best):
                self.best = acc
            best = f" · best val acc {self.best:.1%}" if self.best is not None else ""
            self.line.update(sum(self.step.values()), f"{len(self.finished)}/{self.trials} trials done{best}")


def run_tune_stage(cfg: Any, console: Console, title: str | None = None) -> Any:
    """``run_tune(cfg)`` with a progress line counting trial-steps (trials x meta-train steps)."""
    from pipeline.training import run_tune

    steps = cfg.meta_train.steps
    with stage_progress(console, title or f"tune {cfg.name}", cfg.num_samples * steps, "trial-steps") as line:
        return run_tune(cfg, on_result=TuneProgress(line, cfg.num_samples, steps))
