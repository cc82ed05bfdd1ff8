"""pipeline.apps.stages: job reports -> the figures and position of a stage's progress line."""

from __future__ import annotations

import io
import re

from rich.console import Console

from pipeline.apps.stages import TuneProgress, follow_reports, meta_train_figure, pretrain_figure
from pipeline.apps.terminal import stage_progress


def _quiet_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=200)


def test_pretrain_figure_names_loss_accuracies_and_throughput() -> None:
    m = {"epoch": 2, "loss": 0.41234, "train_accuracy": 0.871, "test_accuracy": 0.85, "samples_per_s": 1234.4}
    assert pretrain_figure(m) == "loss 0.412 · train acc 87.1% · test acc 85.0% · 1,234 img/s"
    assert pretrain_figure({"loss": float("nan"), "samples_per_s": 10}) == "10 img/s"  # no nan on screen


def test_meta_train_line_keeps_the_last_validation_accuracy_between_validations() -> None:
    console = _quiet_console()
    with stage_progress(console, "meta-train", 10, "steps") as line:
        on_report = follow_reports(line, "step", meta_train_figure)
        on_report({"step": 5, "loss": 1.2, "expected_macs_ratio": 0.312, "target_macs_ratio": 0.3,
                   "episodes_per_s": 2.4, "val_accuracy": 0.712})
        on_report({"step": 8, "loss": 1.1, "expected_macs_ratio": 0.305, "target_macs_ratio": 0.3, "episodes_per_s": 2.5})
        assert line.done == 8
        assert line.figure == "loss 1.100 · E[MACs] 0.30 (target 0.30) · 2.50 episodes/s · val acc 71.2%"


def test_tune_line_counts_trial_steps_and_an_early_stop_as_finished_work() -> None:
    console = _quiet_console()
    with stage_progress(console, "tune", 2 * 6, "trial-steps") as line:
        progress = TuneProgress(line, trials=2, steps=6)
        progress("a", {"step": 3, "val_accuracy": 0.5}, False)
        progress("b", {"step": 3, "val_accuracy": 0.625}, False)
        assert (line.done, line.figure) == (6, "0/2 trials done · best val acc 62.5%")
        progress("a", {}, True)  # ASHA stopped trial a at step 3: none of its steps are left
        progress("b", {"step": 6, "val_accuracy": 0.6}, False)
        assert (line.done, line.figure) == (12, "1/2 trials done · best val acc 62.5%")
        progress("b", {}, True)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert re.fullmatch(r"ok tune 12/12 trial-steps in \d+\.\d s · 2/2 trials done · best val acc 62\.5%\n", text), text
