"""What every job config shares: the strict base model, name/URI/path checks, the data, scaling and MLflow
sections, the fields of every Ray job, and where unset locations resolve to (settings).

Method sections that mirror a stamp_core dataclass are built from it by :func:`section_from_dataclass`,
so a field is declared once, in stamp_core, and only its bounds and choices are added here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names every bad key."""


# ----------------------------------------------------------------------------------- helpers


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is invalid: use [A-Za-z0-9][A-Za-z0-9._-]* (at most 128 characters, no '..')"
        )
    return value


def check_uri_has_no_password(value: str | None) -> str | None:
    """URIs travel into MLflow params and worker configs: refuse embedded secrets."""
    if value and "://" in value and urlsplit(value).password:
        raise ValueError(
            "the URI embeds a password; put credentials in the environment "
            "(AWS_* for S3, MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD for MLflow) instead"
        )
    return value


def check_storage_path(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise ValueError("storage_path is empty: give a local directory or s3://bucket/prefix")
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if scheme != "s3":
            raise ValueError(f"storage_path scheme {scheme!r} is not supported: use a local path or s3://bucket/prefix")
        if not value[5:].split("/", 1)[0]:
            raise ValueError(f"storage_path {value!r} has no bucket: use s3://bucket/prefix")
        check_uri_has_no_password(value)
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())


def check_backbone(name: str) -> str:
    from stamp_core.backbones import list_backbones  # light: torch only

    if name not in list_backbones():
        raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(list_backbones())}")
    return name


class Strict(BaseModel):
    """Base: unknown keys are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)



def unique(v: list[Any], what: str) -> list[Any]:
    if not v:
        raise ValueError(f"{what} is empty: give at least one")
    if len(set(v)) != len(v):
        raise ValueError(f"{what} lists a value twice: {v}")
    return v


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix.rstrip(".")] = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
    return out


def section_from_dataclass(
    name: str,
    source: type,
    doc: str,
    *,
    bounds: Mapping[str, Mapping[str, Any]] | None = None,
    choices: Mapping[str, tuple[str, ...]] | None = None,
    exclude: Iterable[str] = (),
    extra: Mapping[str, tuple[Any, Any]] | None = None,
    base: type[BaseModel] | None = None,
) -> type[BaseModel]:
    """A strict config section whose fields are those of the dataclass ``source`` (same names and defaults).

    Args:
        name: class name of the section (error messages and reprs).
        source: a stamp_core config dataclass.
        doc: the section's docstring.
        bounds: per field, ``pydantic.Field`` constraints (``{"lr": {"gt": 0}}``).
        choices: per string field, the allowed values (a ``Literal``); take them from stamp_core's constants.
        exclude: fields of ``source`` that are not configured here (set by the job, not the YAML).
        extra: fields that ``source`` does not have, as ``name: (type, default or Field)``.
        base: the section's base class (methods shared by the section); default :class:`Strict`.

    Raises:
        TypeError: ``bounds``, ``choices`` or ``exclude`` name a field ``source`` does not have (the
            dataclass changed and this section must follow).
    """
    bounds, choices, extra, exclude = dict(bounds or {}), dict(choices or {}), dict(extra or {}), set(exclude)
    hints = typing.get_type_hints(source)
    fields = {f.name: f for f in dataclasses.fields(source)}
    stale = (set(bounds) | set(choices) | exclude) - set(fields)
    if stale:
        raise TypeError(f"{name}: {sorted(stale)} are not fields of {source.__name__} ({', '.join(fields)})")
    definitions: dict[str, Any] = {}
    for key, f in fields.items():
        if key in exclude:
            continue
        annotation = Literal[choices[key]] if key in choices else hints[key]  # type: ignore[valid-type]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        definitions[key] = (annotation, Field(default, **bounds.get(key, {})))
    definitions.update(extra)
    section = create_model(name, __base__=base or Strict, __module__=source.__module__, **definitions)
    section.__doc__ = doc
    return section

# ----------------------------------------------------------------------------------- sections


class DataConfig(Strict):
    """Where the source datasets are and how they are read."""

    #: catalog.json URL (s3://... or a local path); None = the platform's catalog from settings.
    catalog_url: str | None = None
    #: catalog dataset names (or shell patterns such as ``tin-*``) to train on, or "all" for every dataset.
    sources: Union[Literal["all"], list[str]] = "all"
    #: relative sampling weight per source (missing ones weigh 1), applied on top of ``weighting``.
    weights: dict[str, float] = Field(default_factory=dict)
    #: how each episode's dataset is drawn: every dataset equally ("uniform"), by its number of images
    #: ("size"), or every suite base equally ("base": many variants of MNIST do not crowd out the rest).
    weighting: Literal["uniform", "size", "base"] = "uniform"
    #: split the job trains on.
    split: str = "train"
    #: side of the square inputs (>= 28: the deepest backbones pool five times).
    image_size: int = Field(32, ge=28, le=512)
    #: check each shard's sha256 against the catalog before use (costs one extra read).
    verify_sha256: bool = False
    #: fail when more than this share of samples is unusable.
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)
    #: DataLoader processes per training worker for episode assembly (0 = in the training loop).
    loader_workers: int = Field(0, ge=0, le=32)
    #: episodes assembled ahead by a background thread, overlapping the training step (0 = off).
    prefetch: int = Field(2, ge=0, le=64)
    #: dataset streams (each one open S3 connection) a reader process keeps open at once. Each worker
    #: reads only its share of the sources (about len(sources) / workers, the sampling weights kept
    #: exactly over the job); beyond this bound, drawing another dataset closes the least recently
    #: used stream, which later resumes where it stopped with one ranged GET.
    max_open_streams: int = Field(8, ge=1, le=1024)

    @field_validator("catalog_url")
    @classmethod
    def _catalog(cls, v: str | None) -> str | None:
        return check_uri_has_no_password(v)

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v == "all":
                return v
            # "a,b" on the command line is friendlier than a YAML list.
            v = [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, (list, tuple)):
            if not v:
                raise ValueError("sources is empty: name at least one dataset, or use 'all'")
            for s in v:
                if not isinstance(s, str):
                    raise ValueError(f"source {s!r} is not a dataset name")
                # a shell pattern (tin-*) picks one suite out of a shared catalog: the characters around
                # the wildcards must still be those of dataset names
                check_name(re.sub(r"[*?\[\]]", "x", s), "dataset name or pattern")
            if len(set(v)) != len(v):
                raise ValueError(f"sources lists a dataset twice: {list(v)}")
            return list(v)
        raise ValueError("expected 'all' or a list of catalog dataset names")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {name!r} is {w}: expected a finite number >= 0")
        return v

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        return check_name(v, "split name")

    @model_validator(mode="after")
    def _weights_name_sources(self) -> "DataConfig":
        if self.sources != "all":
            unknown = sorted(set(self.weights) - set(self.sources))
            if unknown:
                raise ValueError(f"weights: names datasets that are not in sources: {unknown}")
        return self


class ScalingSection(Strict):
    """How many Ray Train workers and what each one gets."""

    num_workers: int = Field(1, ge=1, le=1024)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    #: Ray placement of the workers: PACK fills a node first; STRICT_SPREAD puts every worker on
    #: its own node (a run then needs num_workers nodes, and a lost node is a lost worker).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class MlflowSection(Strict):
    """Experiment tracking; the tracking URI defaults to settings (MLFLOW_TRACKING_URI / the stack)."""

    enabled: bool = True
    experiment: str = "stamp-meta-train"
    tracking_uri: str | None = None

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return check_uri_has_no_password(v)

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("experiment name is empty")
        return v


class JobBase(Strict):
    """Fields every Ray job shares."""

    #: Ray run name: re-running with the same name and storage_path resumes from its checkpoint.
    run_name: str = "stamp"
    #: where Ray keeps checkpoints: a local directory or s3://bucket/prefix; None = STATE_DIR/ray_results.
    storage_path: str | None = None
    seed: int = 0
    backbone: str = "resnet20"
    #: backbone-specific options (small_cnn: width).
    backbone_kwargs: dict[str, int] = Field(default_factory=dict)
    data: DataConfig = Field(default_factory=DataConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    #: worker-group restarts from the latest checkpoint before the job fails (-1 = unlimited).
    max_failures: int = Field(1, ge=-1)
    #: checkpoints kept in storage (oldest deleted first).
    keep_checkpoints: int = Field(2, ge=1)

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        return check_name(v, "run_name")

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        return check_storage_path(v)

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str) -> str:
        return check_backbone(v)

    def config_hash(self, exclude: Iterable[str] = ()) -> str:
        """sha256 of the canonical JSON of the config without ``exclude`` (top-level keys)."""
        data = self.model_dump(mode="json", exclude=set(exclude))
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def flat_params(self) -> dict[str, str]:
        """The config as flat ``a.b -> str`` pairs for MLflow params (no secrets are ever in it)."""
        return flatten(self.model_dump(mode="json"))


# ----------------------------------------------------------------------------- resolution


def resolved_catalog_url(cfg: DataConfig) -> str:
    """The configured catalog URL, else the platform's (settings)."""
    if cfg.catalog_url:
        return cfg.catalog_url if "://" in cfg.catalog_url else str(Path(cfg.catalog_url).expanduser().resolve())
    from pipeline.settings import get_settings

    return get_settings().catalog_url


def resolved_storage_path(storage_path: str | None) -> str:
    """The configured storage path, else ``STATE_DIR/ray_results``."""
    if storage_path:
        return storage_path
    from pipeline.settings import get_settings

    return str(get_settings().state_dir / "ray_results")


def resolved_tracking_uri(cfg: MlflowSection) -> str:
    """The configured MLflow URI, else settings (MLFLOW_TRACKING_URI, the stack, a local sqlite file)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    from pipeline.settings import get_settings

    return get_settings().mlflow_uri
