"""The benchmark's config (``kind: benchmark``): STAMP against pruning baselines on unseen targets."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import MlflowSection, Strict, check_backbone, check_name, check_uri_has_no_password, flatten, unique

BENCHMARK_METHODS = ("full", "uniform", "random", "l1", "snip", "grasp", "synflow", "bbd", "stamp", "stamp_mean")

class BenchmarkModel(Strict):
    """One backbone under test: its meta-trained pruner and (for the baselines) its pretrained weights."""

    #: backbone name; must be the pruner's backbone (checked when the pruner loads).
    backbone: str
    #: the pruner: a saved pruner directory, a Ray meta-train run directory (latest checkpoint),
    #: or a registry URI (models:/stamp-pruner@champion).
    pruner: str
    #: pretrain checkpoint or run directory whose weights the baselines prune; None = the pruner's backbone.
    pretrained: str | None = None

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str) -> str:
        return check_backbone(v)

    @field_validator("pruner", "pretrained")
    @classmethod
    def _location(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("is empty: give a directory or a models:/ URI")
        return check_uri_has_no_password(v)


class BenchmarkTarget(Strict):
    """An unseen target dataset: a ``load_source`` spec (``npz:PATH?classes=6,7``, ``digits``,
    ``folder:PATH``), ``catalog:NAME`` or ``s3://BUCKET/PREFIX/NAME``."""

    name: str
    data: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "target name")

    @field_validator("data")
    @classmethod
    def _data(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("data is empty: give a dataset spec such as digits or npz:PATH?classes=6,7,8,9")
        return check_uri_has_no_password(v) or v


class BenchFinetuneSection(Strict):
    """The fine-tune every method gets after pruning (same budget for all)."""

    epochs: int = Field(3, ge=0, le=1000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0, le=10)
    weight_decay: float = Field(5e-4, ge=0)
    augment: bool = True
    #: further fine-tune lengths (epochs) for the accuracy-vs-epochs view, each a complete schedule from the
    #: same pruned start; 0 (the prototype head) and ``epochs`` are always recorded.
    curve: list[int] = Field(default_factory=lambda: [1])

    @field_validator("curve")
    @classmethod
    def _curve(cls, v: list[int]) -> list[int]:
        if any(e < 0 for e in v):
            raise ValueError(f"epoch counts must be >= 0, got {v}")
        return sorted(set(v))


class BenchBBDSection(Strict):
    """Beta-Bernoulli dropout training on the target (its own budget, reported as mask time)."""

    epochs: int = Field(2, ge=1, le=1000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0, le=10)
    gate_lr: float = Field(0.05, gt=0, le=10)
    kl_weight: float | None = Field(None, ge=0)
    macs_weight: float = Field(20.0, ge=0)


class BenchAblationSection(Strict):
    """Where the mean task embedding of the ``stamp_mean`` ablation comes from: source tasks only."""

    #: dataset specs of the sources (meta-validation data); required when stamp_mean is run.
    sources: list[str] = Field(default_factory=list)
    split: Literal["train", "test"] = "test"
    tasks: int = Field(8, ge=1, le=10_000)
    ways: int = Field(5, ge=1)
    per_class: int = Field(20, ge=1)
    seed: int = 0


class BenchLatencySection(Strict):
    """CPU latency: median of ``repeats`` forward passes at a fixed thread count."""

    threads: int = Field(1, ge=1, le=512)
    repeats_b1: int = Field(10, ge=1)
    repeats_b64: int = Field(3, ge=1)


class BenchmarkConfig(Strict):
    """STAMP against pruning baselines on unseen targets at matched MACs (``stamp benchmark``)."""

    kind: Literal["benchmark"] = "benchmark"
    name: str = "benchmark"
    #: output directory (results.csv, results.md, PNGs); None = STATE_DIR/benchmark/<name>.
    out_dir: str | None = None
    models: list[BenchmarkModel]
    targets: list[BenchmarkTarget]
    methods: list[str] = Field(default_factory=lambda: list(BENCHMARK_METHODS))
    #: weight sets every mask is applied to: "pretrained" (models[].pretrained) and "meta" (the pruner's
    #: meta-trained backbone); None = both where every model has pretrained weights, else "meta".
    weights: list[Literal["pretrained", "meta"]] | None = None
    #: with two or more targets, also apply STAMP's mask generated for each *other* target (``stamp@U``
    #: cells): the adaptivity matrix.
    adaptivity: bool = True
    #: compute only this share of the grid, "K/N" (cells K, K+N, ... of the plan), so N processes can
    #: fill one results.csv in parallel; the report covers every recorded cell either way.
    shard: str | None = None
    #: MACs budgets r (pruned / full); "full" runs once per target, backbone and seed.
    budgets: list[float] = Field(default_factory=lambda: [0.5, 0.3, 0.1])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    #: training images per class drawn (per seed) from the target's train split; None = all.
    max_train_per_class: int | None = Field(100, ge=1)
    #: test images per class (fixed subset, the same for every method and seed); None = all.
    max_test_per_class: int | None = Field(200, ge=1)
    #: "test": score on the target's test split (claims). "dev": never read the test split; score on
    #: ``dev_per_class`` images per class held out of the *train* split (the same for every method and
    #: seed) and draw training subsets from the rest: the split method development may look at.
    evaluate_on: Literal["test", "dev"] = "test"
    dev_per_class: int = Field(50, ge=1)
    #: images per class the STAMP set encoder reads.
    sample_per_class: int = Field(20, ge=1)
    #: class-balanced images in the one batch SNIP and GraSP score on.
    score_batch: int = Field(128, ge=2)
    #: recompute BatchNorm statistics on the target's training images after pruning (every method).
    recalibrate_bn: bool = True
    round_to: int = Field(1, ge=1)
    finetune: BenchFinetuneSection = Field(default_factory=BenchFinetuneSection)
    bbd: BenchBBDSection = Field(default_factory=BenchBBDSection)
    ablation: BenchAblationSection = Field(default_factory=BenchAblationSection)
    latency: BenchLatencySection = Field(default_factory=BenchLatencySection)
    #: torch threads for everything else (mask, fine-tune); None = torch's default.
    threads: int | None = Field(None, ge=1, le=512)
    #: where fine-tuning and evaluation run ("cpu", "cuda", "cuda:1"); masks, MACs and latency stay on CPU.
    device: str = "cpu"
    #: recompute cells recorded as failed when the run is resumed.
    retry_failed: bool = True
    #: other runs' results.csv files: a cell of this grid recorded there with the same fingerprint (the same
    #: settings and input contents) is copied into this run instead of computed, e.g. the baselines on the same
    #: pretrained weights when benchmarking a second pruner of the backbone.
    reuse_results: list[str] = Field(default_factory=list)
    mlflow: MlflowSection = Field(default_factory=lambda: MlflowSection(experiment="stamp-benchmark"))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "name")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r} is not supported: expected cpu, cuda or cuda:N")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from stamp_core.baselines import list_criteria  # the criteria registry: user-registered ones count

        known = ["full", "stamp", "stamp_mean", *list_criteria()]
        unknown = [m for m in v if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}: expected some of {', '.join(known)}")
        return unique(v, "methods")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        for r in v:
            if not (math.isfinite(r) and 0.0 < r <= 1.0):
                raise ValueError(f"budget {r} is not in (0, 1]: a budget is pruned MACs / full MACs, e.g. 0.3")
        return unique(v, "budgets")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        return unique(v, "seeds")

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        m = re.fullmatch(r"(\d+)/(\d+)", str(v)) if v is not None else None
        if v is not None and not (m and 1 <= int(m.group(1)) <= int(m.group(2))):
            raise ValueError(f"shard {v!r}: expected K/N with 1 <= K <= N, e.g. 1/2")
        return v

    def shard_index(self) -> tuple[int, int]:
        """(K - 1, N) of ``shard``; (0, 1) without one."""
        if self.shard is None:
            return 0, 1
        k, n = self.shard.split("/")
        return int(k) - 1, int(n)

    @model_validator(mode="after")
    def _bench_checks(self) -> "BenchmarkConfig":
        unique([m.backbone for m in self.models], "models (backbone names)")
        unique([t.name for t in self.targets], "targets (names)")
        missing = [m.backbone for m in self.models if not m.pretrained]
        if self.weights is None:
            self.weights = ["meta"] if missing else ["pretrained", "meta"]
        unique(self.weights, "weights")
        if "pretrained" in self.weights and missing:
            raise ValueError(
                f"weights: the pretrained weight set needs models[].pretrained: {', '.join(missing)} has none; "
                "add it or set weights: [meta]"
            )
        if "stamp_mean" in self.methods and not self.ablation.sources:
            raise ValueError(
                "ablation.sources: the stamp_mean method needs source dataset specs to average task "
                "embeddings over (never the targets); add them or drop stamp_mean from methods"
            )
        return self

    def flat_params(self) -> dict[str, str]:
        return flatten(self.model_dump(mode="json"))

