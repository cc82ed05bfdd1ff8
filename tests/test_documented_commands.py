"""Every documented job command parses: its config with its overrides validates, nothing is run.

A command is ``python jobs/<job>.py --config PATH [k=v ...]`` or ``stamp <verb> --config PATH [k=v ...]``
written in a comment of ``jobs/configs/**/*.yaml`` (the headers say how each config is run) or in
``README.md`` and ``docs/**/*.md`` (fenced code blocks and inline code spans), also after a prefix such as
``ray job submit --working-dir . --``. Continuation lines (``\\``) are joined; a shell operator
(``>``, ``&&``, ``|``, ``;``, ``&``) ends the command. Each one is loaded with
:func:`pipeline.config.load_config` and the config class of the job it names, so a command that
fails verbatim (an override the schema refuses, a cross-field check, a config file that moved) fails
here in a second, without training.

``test_the_checker_*`` plant commands in temporary files so that a checker which stopped finding or
stopping commands cannot pass quietly.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.config import (BenchmarkConfig, ConfigError, FitPrunerConfig, MetaTrainConfig, OutcomesConfig, PretrainConfig,
                             TuneConfig, load_config)

ROOT = Path(__file__).resolve().parents[1]

#: the job a command names -> the config class its entrypoint loads (jobs/<job>.py, `stamp <verb>`).
JOB_MODELS: dict[str, type[BaseModel]] = {
    "pretrain": PretrainConfig,
    "meta_train": MetaTrainConfig,
    "tune": TuneConfig,
    "benchmark": BenchmarkConfig,
    "outcomes": OutcomesConfig,
    "fit_pruner": FitPrunerConfig,
}
_COMMAND_RE = re.compile(r"(?:python jobs/(?P<script>\w+)\.py|stamp (?P<verb>[a-z][a-z-]*))\s.*--config")
#: a shell operator between words ends the command (a redirection, a pipe, a second command).
_SHELL_END_RE = re.compile(r"\s(?:>|2>|&&|\|\||\||;|&)(?:\s|$)")
_INLINE_CODE_RE = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Command:
    """One documented command: where it is written and the command text, from the job on."""

    source: Path
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.source.relative_to(ROOT) if self.source.is_relative_to(ROOT) else self.source}:{self.line}"


def _joined(lines: list[str]) -> Iterator[tuple[int, str]]:
    """(1-based first line, text) with backslash continuations folded into one line."""
    i = 0
    while i < len(lines):
        first, text = i + 1, lines[i].rstrip()
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1].rstrip() + " " + lines[i].strip()
        yield first, text
        i += 1


def _yaml_comment_lines(text: str) -> list[str]:
    # Only comments document commands; a non-comment line stays as an empty line to keep numbering.
    return [line.strip()[1:].strip() if line.strip().startswith("#") else "" for line in text.splitlines()]


def _readme_code_lines(text: str) -> list[str]:
    """Lines inside fenced code blocks as they are; elsewhere, the inline code spans of a line."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        elif fenced:
            out.append(line)
        else:
            out.append(" ; ".join(_INLINE_CODE_RE.findall(line)))
    return out


def find_commands(paths: Iterable[Path]) -> list[Command]:
    """Every documented command in ``paths`` (YAML: comments; Markdown: code)."""
    found = []
    for path in paths:
        text = path.read_text()
        lines = _yaml_comment_lines(text) if path.suffix in (".yaml", ".yml") else _readme_code_lines(text)
        for number, line in _joined(lines):
            for part in re.split(r"\s;\s", line):
                match = _COMMAND_RE.search(part)
                if match:
                    command = _SHELL_END_RE.split(part[match.start():])[0].strip()
                    found.append(Command(path, number, command))
    return found


def check_command(command: Command, root: Path = ROOT) -> str | None:
    """None when the command's config and overrides validate; else why not, in one message."""
    try:
        words = shlex.split(command.text)
    except ValueError as exc:
        return f"cannot be split into words ({exc})"
    job = words[1][len("jobs/"):-len(".py")] if words[0] == "python" else words[1].replace("-", "_")
    if words[0] == "python" and not (root / words[1]).is_file():
        return f"its entrypoint {words[1]} does not exist"
    if job not in JOB_MODELS:
        return f"names the job {job!r}, which has no config: expected one of {', '.join(JOB_MODELS)}"
    k = words.index("--config")
    if k + 1 >= len(words):
        return "--config has no value"
    config = words[k + 1]
    if not config.endswith((".yaml", ".yml")):
        return None  # a placeholder (`--config YAML`, `--config ...`) in a usage line: nothing to load
    if not (root / config).is_file():
        return f"its config {config} does not exist"
    # `[k=v ...]` is the usage notation for optional overrides, not an override.
    overrides = [w for w in words[k + 2:] if "=" in w and not w.startswith(("-", "["))]
    try:
        load_config(root / config, overrides, model=JOB_MODELS[job])
    except ConfigError as exc:
        return str(exc)
    return None


def documented_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "jobs" / "configs").rglob("*.yaml")) + [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


COMMANDS = find_commands(documented_files())


def test_the_documentation_has_commands_to_check() -> None:
    """A checker that finds nothing passes everything: make sure the known commands are found."""
    sources = {c.source.name for c in COMMANDS}
    assert {"README.md", "cluster.md", "meta_train_suite64.yaml", "benchmark_real.yaml", "pretrain_mnist_fmnist.yaml"} <= sources
    assert any("optim.deployed_gradient=layer_es" in c.text for c in COMMANDS)  # a command spread over 3 lines
    assert any(c.text.startswith("python jobs/meta_train.py") and "scaling.num_workers=8" in c.text for c in COMMANDS)
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_validates(command: Command) -> None:
    problem = check_command(command)
    assert problem is None, f"{command.where}: `{command.text}` does not run as written:\n{problem}"


# ------------------------------------------------------------------------------ the checker itself


def test_the_checker_stops_a_bad_override_on_a_continuation_line(tmp_path: Path) -> None:
    header = tmp_path / "planted.yaml"
    header.write_text(
        "# Run with:\n"
        "#   python jobs/meta_train.py --config jobs/configs/meta_train_suite64.yaml run_name=x \\\n"
        "#     steps=120 checkpoint_every=40\n"
        "kind: meta_train\n"
    )
    [command] = find_commands([header])
    assert command.line == 2 and command.text.endswith("checkpoint_every=40")
    assert "checkpoint_every: 40 must be a multiple of report_every (25)" in (check_command(command) or "")


def test_the_checker_reads_readme_code_blocks_and_inline_code(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "Prose that mentions stamp pretrain --config jobs/configs/pretrain_small.yaml epochs=-1 is not code.\n"
        "```bash\n"
        "ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_small.yaml "
        "no_such_key=1 > run.log 2>&1 &\n"
        "```\n"
        "Inline: `stamp meta-train --config jobs/configs/meta_train_small.yaml steps=0` and `stamp datasets list`.\n"
        "Usage: `stamp benchmark --config YAML [k=v ...]`.\n"
        "Moved: `stamp tune --config jobs/configs/tune_gone.yaml`.\n"
    )
    commands = find_commands([readme])
    assert [c.line for c in commands] == [3, 5, 6, 7]
    assert commands[0].text.endswith("no_such_key=1")  # the redirection and `&` are not part of it
    problems = [check_command(c) for c in commands]
    assert "no_such_key: Extra inputs are not permitted" in (problems[0] or "")
    assert "steps: Input should be greater than or equal to 1" in (problems[1] or "")
    assert problems[2] is None  # a usage line with placeholders
    assert "jobs/configs/tune_gone.yaml does not exist" in (problems[3] or "")


def test_the_checker_loads_the_config_class_of_the_named_job(tmp_path: Path) -> None:
    """A pretrain config handed to the meta-train job is an error even though the file alone is valid."""
    header = tmp_path / "planted.yaml"
    header.write_text("#   stamp meta-train --config jobs/configs/pretrain_small.yaml\n"
                      "#   stamp pretrain --config jobs/configs/pretrain_small.yaml\n")
    wrong, right = find_commands([header])
    assert "'pretrain' config, but a 'meta_train' config is expected" in (check_command(wrong) or "")
    assert check_command(right) is None


def test_a_command_naming_a_missing_entrypoint_fails(tmp_path: Path) -> None:
    """jobs/<job>.py must exist, not only its config class (a job once shipped without its script)."""
    header = tmp_path / "planted.yaml"
    header.write_text("#   python jobs/outcomes_gone.py --config jobs/configs/outcomes_natural.yaml\n"
                      "#   python jobs/outcomes.py --config jobs/configs/outcomes_natural.yaml max_tasks=2\n")
    gone, present = find_commands([header])
    assert check_command(gone) == "its entrypoint jobs/outcomes_gone.py does not exist"
    assert check_command(present) is None
    assert all((ROOT / "jobs" / f"{job}.py").is_file() for job in JOB_MODELS)
