"""Reading a config: YAML plus ``key=value`` overrides, validated into the job's model, errors named by key."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.base import ConfigError
from pipeline.config.benchmark import BenchmarkConfig
from pipeline.config.fit_pruner import FitPrunerConfig
from pipeline.config.meta_train import MetaTrainConfig
from pipeline.config.outcomes import OutcomesConfig
from pipeline.config.pretrain import PretrainConfig
from pipeline.config.tune import TuneConfig

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAMED_MSG_RE = re.compile(r"^([a-z_][a-z0-9_.]*): ")

JobConfig = Union[PretrainConfig, MetaTrainConfig, TuneConfig]
_KINDS: dict[str, type[BaseModel]] = {"pretrain": PretrainConfig, "meta_train": MetaTrainConfig, "tune": TuneConfig,
                                       "benchmark": BenchmarkConfig, "outcomes": OutcomesConfig,
                                       "fit_pruner": FitPrunerConfig}
M = TypeVar("M", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as a YAML scalar/flow value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. optim.lr=0.001)")
    parts = key.split(".")
    for p in parts:
        if not _KEY_RE.fullmatch(p):
            raise ConfigError(f"override {text!r}: {key!r} is not a dotted key (letters, digits, '_')")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``a.b=value`` in a copy of ``data`` (intermediate sections are created)."""
    out = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"{where}: is a value, not a section, so {'.'.join(parts)} cannot be set")
            node = child
        node[parts[-1]] = value
    return out


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``dotted.key: message``."""
    lines = []
    for err in exc.errors():
        # Union branches add type tags (e.g. 'list[str]') to the location: drop them.
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        # Cross-field checks cannot set a location; they start their message with "key: ".
        named = _NAMED_MSG_RE.match(msg)
        if named and err["type"] == "value_error":
            loc.append(named.group(1))
            msg = msg[named.end():]
        key = ".".join(loc) or "(top level)"
        lines.append(f"{key}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def validate_config(data: dict[str, Any], model: type[M], source: str = "config") -> M:
    """Validate plain data against ``model``; ConfigError naming each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    kind = data.get("kind")
    expected = model.model_fields["kind"].default if "kind" in model.model_fields else None
    if kind is not None and expected is not None and kind != expected:
        raise ConfigError(f"{source}: kind: this is a {kind!r} config, but a {expected!r} config is expected")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}:\n{format_validation_error(exc)}") from None


def load_config(path: str | Path, overrides: Sequence[str] = (), model: type[M] | None = None) -> M:
    """Read a YAML config, apply ``key=value`` overrides and validate.

    Args:
        path: YAML file; its ``kind`` (pretrain | meta_train | tune | benchmark | outcomes | fit_pruner) picks the model when
            ``model`` is not given.
        overrides: ``a.b=value`` strings; values are YAML (``0.001``, ``[2, 5]``, ``true``, ``null``).
        model: the expected config class (the jobs pass theirs).

    Raises:
        ConfigError: unreadable file, bad YAML, unknown kind, or invalid keys/values (all named).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys at the top level, got {type(data).__name__}")
    if model is None:
        kind = apply_overrides(data, overrides).get("kind")
        if kind not in _KINDS:
            raise ConfigError(f"{p}: kind: expected one of {', '.join(_KINDS)} (got {kind!r})")
        model = _KINDS[kind]  # type: ignore[assignment]
    if overrides:
        # Overrides land on the defaults too, so `search.lr.low=...` keeps the default `high`.
        # model_construct: the defaults without validation (a benchmark has required keys).
        data = _deep_merge(model.model_construct().model_dump(mode="json"), data)  # type: ignore[misc,attr-defined]
        data = apply_overrides(data, overrides)
    return validate_config(data, model, source=str(p))  # type: ignore[arg-type]


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

