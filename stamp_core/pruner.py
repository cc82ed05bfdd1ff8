"""StampPruner: set encoder + mask generator + shared backbone, and one-pass pruning of a new task.

``StampPruner.generate(images, labels, macs_ratio=r)`` reads a sample of a dataset and returns the
:class:`~stamp_core.spec.PruneSpec` of a pruned backbone whose real MACs are at most ``r`` of the
full network's and as close to it as the channel granularity allows. It costs one forward pass of
the sample through the backbone plus a few milliseconds: the budget is met by ranking every
channel's expected keep probability and moving one global threshold over an exact MACs model.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from stamp_core.backbones import MIN_IMAGE_SIZE, Backbone, build_backbone, build_backbone_from_config
from stamp_core.baselines import score_synflow
from stamp_core.candidates import MaskCandidate, task_features
from stamp_core.channel_generator import ChannelMaskGenerator, TaskSummary, channel_response_hook, channel_statistics
from stamp_core.groups import ChannelGates, PrunableStructure, analyze_structure, score_l1
from stamp_core.mask_generator import TASK_NORMS, MaskGenerator, kumaraswamy_mean
from stamp_core.outcome_generator import OutcomeMaskGenerator
from stamp_core.set_encoder import SetEncoder
from stamp_core.calibration import __version__, calibrate_masks, deployed_structure, spec_from_kept
from stamp_core.spec import PruneSpec


_CONFIG_FILE = "pruner.json"
SCORE_INITS = ("l1", "none")
#: "faithful": the paper's generator, per-layer heads on the set embedding; "channel": one scorer
#: shared across channels reads each channel's response statistics too (stamp_core.channel_generator);
#: "outcome": picks one of ``candidates`` with a model of deployed outcomes (stamp_core.outcome_generator).
GENERATORS = ("faithful", "channel", "outcome")
_WEIGHTS_FILE = "pruner_state_dict.pt"


class WeightsFileError(ValueError):
    """A weights/state file cannot be read as plain tensors (corrupt, truncated or not a torch file)."""


class UnsafeWeightsError(WeightsFileError):
    """A weights file holds more than plain tensors (e.g. a pickled callable); it was refused unread."""


_WO_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", re.DOTALL)


def load_weights(
    source: str | os.PathLike[str] | io.BytesIO,
    map_location: str | torch.device = "cpu",
    what: str | None = None,
) -> Any:
    """``torch.load(..., weights_only=True)`` with typed, readable refusals.

    torch's own message for a refused file recommends retrying without the weights-only
    restriction, which is exactly what must not be done with an untrusted file; ours names the
    file and says that nothing in it was run.

    Raises:
        UnsafeWeightsError: the file needs more than tensors and plain containers to load.
        WeightsFileError: the file is not a readable torch file (truncated, corrupt, missing).
    """
    label = what or (str(source) if not isinstance(source, io.BytesIO) else "the weights")
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _WO_REASON.search(str(exc))
        reason = " ".join(found.group(1).split())[:300] if found else type(exc).__name__
        raise UnsafeWeightsError(
            f"refused to load {label}: it is not a plain state_dict of tensors ({reason}). "
            "Nothing in it was executed; it was tampered with or written by other code. "
            "Use weights saved by STAMP (state_dict + JSON) from a source you trust."
        ) from None
    except FileNotFoundError:
        raise WeightsFileError(f"cannot load {label}: no such file") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise WeightsFileError(
            f"cannot load {label}: not a readable torch weights file ({type(exc).__name__}: {first}); "
            "it is truncated or corrupt: write it again"
        ) from None


@dataclass
class PrunerConfig:
    """Architecture of a StampPruner; saved as JSON next to its state_dict."""

    backbone: dict[str, Any]  #: backbone config (see ``Backbone.config``)
    image_size: int = 32  #: side of the square inputs the MACs budget refers to
    embed_dim: int = 128  #: width of the task embedding and attention blocks
    num_heads: int = 4  #: attention heads in the set encoder
    num_inducing: int = 32  #: inducing points of each ISAB
    hidden_dim: int = 256  #: width of the mask generator's trunk
    prior_alpha: float = 1e-4  #: Beta(alpha, 1) prior on keep probabilities
    temperature: float = 0.1  #: relaxed Bernoulli temperature during meta-training
    support_per_class: int = 20  #: images per class the encoder reads
    max_support: int = 400  #: cap on the encoder's set size
    #: where channel scores start: "l1" = the pretrained weights' group L1 ranking plus a
    #: zero-initialised task residual (the first mask is L1's); "none" = v1's equal base posteriors.
    score_init: str = "l1"
    #: "batch": task embeddings standardised across each meta-batch (v2, needs >= 2 episodes per
    #: training step); "running": v1's running statistics of single tasks + LayerNorm.
    task_norm: str = "batch"
    #: "faithful" (set embedding -> per-layer heads) or "channel" (per-channel statistics of the
    #: task's sample + a scorer shared across channels and layers); see GENERATORS.
    generator: str = "faithful"
    #: the outcome generator's candidate masks (stamp_core.candidates names); unused by the other generators.
    candidates: list[str] = field(default_factory=list)
    version: str = __version__
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score_init not in SCORE_INITS:
            raise ValueError(f"score_init={self.score_init!r}: expected one of {', '.join(SCORE_INITS)}")
        if self.task_norm not in TASK_NORMS:
            raise ValueError(f"task_norm={self.task_norm!r}: expected one of {', '.join(TASK_NORMS)}")
        if self.generator not in GENERATORS:
            raise ValueError(f"generator={self.generator!r}: expected one of {', '.join(GENERATORS)}")
        if self.generator == "outcome" and not self.candidates:
            raise ValueError("generator='outcome' needs candidates: the mask names it chooses from, e.g. ['l1', 'uniform']")


class StampPruner(nn.Module):
    """Meta-learned pruner of one backbone architecture.

    Args:
        config: architecture; ``config.backbone`` names the backbone.
        backbone: optional backbone instance (e.g. pretrained); built from the config if omitted.
    """

    def __init__(self, config: PrunerConfig, backbone: Backbone | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone_from_config(config.backbone)
        if backbone is not None:
            config.backbone = dict(backbone.config)
        self.input_shape = (self.backbone.in_channels, config.image_size, config.image_size)
        self.structure: PrunableStructure = analyze_structure(self.backbone, self.input_shape)
        self.encoder = SetEncoder(self.backbone.feature_dim, config.embed_dim, config.num_heads, config.num_inducing)
        sizes = [g.size for g in self.structure.groups]
        self.generator: MaskGenerator | OutcomeMaskGenerator
        if config.generator == "channel":
            self.generator = ChannelMaskGenerator(
                sizes, _channel_costs(self.structure), config.embed_dim, config.hidden_dim, task_norm=config.task_norm)
        elif config.generator == "outcome":
            self.generator = OutcomeMaskGenerator(sizes, config.candidates)
        else:
            self.generator = MaskGenerator(sizes, config.embed_dim, config.hidden_dim,
                                           zero_init_heads=config.score_init != "none", task_norm=config.task_norm)
        self.gates = ChannelGates(self.backbone, self.structure)

    @classmethod
    def create(
        cls,
        backbone: str | Backbone,
        num_classes: int = 10,
        image_size: int = 32,
        backbone_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> "StampPruner":
        """Build a pruner for a backbone name (fresh weights) or an existing backbone.

        ``backbone_kwargs`` go to ``build_backbone``; other ``kwargs`` are PrunerConfig fields.
        """
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, num_classes, **(backbone_kwargs or {}))
        pruner = cls(PrunerConfig(backbone=dict(backbone.config), image_size=image_size, **kwargs), backbone)
        if pruner.config.score_init == "l1":
            pruner.generator.init_base_scores(score_l1(pruner.backbone, pruner.structure))
        return pruner

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.structure.groups]

    @property
    def device(self) -> torch.device:
        """Where the pruner's weights (and with them its cost model) live."""
        return next(self.parameters()).device

    def _apply(self, fn: Any, recurse: bool = True) -> "StampPruner":
        # Every device move of the module (.to, .cuda, .cpu) takes the MACs cost model along:
        # the budget penalty multiplies gate sums with it on the gates' device.
        super()._apply(fn, recurse)
        self.structure.to(self.device)
        return self

    # ------------------------------------------------------------------ inputs
    def check_images(self, images: torch.Tensor | np.ndarray, labels: Sequence[int] | torch.Tensor | np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate a set for the encoder; returns ``(images, labels)`` as tensors.

        Raises ``ValueError`` naming what was wrong and what is expected.
        """
        expected = f"float images of shape (N, {self.backbone.in_channels}, H, W), H and W >= {MIN_IMAGE_SIZE}"
        if not isinstance(images, (torch.Tensor, np.ndarray)):
            raise ValueError(f"images is a {type(images).__name__}: expected {expected}")
        x = torch.as_tensor(images)
        if x.ndim != 4:
            raise ValueError(f"images have shape {tuple(x.shape)}: expected {expected}")
        if x.shape[0] == 0:
            raise ValueError("the image set is empty: expected at least one image (20 per class is typical)")
        if not x.is_floating_point():
            raise ValueError(
                f"images have dtype {x.dtype}: expected {expected}; "
                "convert raw pixels with stamp_core.prepare_images"
            )
        if x.shape[1] != self.backbone.in_channels:
            raise ValueError(f"images have {x.shape[1]} channels: expected {expected}")
        if min(x.shape[2], x.shape[3]) < MIN_IMAGE_SIZE:
            raise ValueError(f"images are {x.shape[2]}x{x.shape[3]} pixels: expected {expected}")
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf values: expected finite pixels")
        x = x.float()
        if labels is None:
            return x, None
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"labels have shape {tuple(y.shape)} but there are {x.shape[0]} images: "
                "expected one integer label per image"
            )
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"labels have dtype {y.dtype}: expected integer class ids")
        if (y < 0).any():
            raise ValueError("labels contain negative values: expected class ids >= 0")
        return x, y.long()

    def _on_device(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (and labels) on the pruner's device: callers pass CPU tensors or numpy arrays."""
        device = self.device
        return x.to(device), None if y is None else y.to(device)

    def select_support(self, labels: torch.Tensor | None, n: int, min_per_class: int = 1) -> torch.Tensor:
        """Indices of a deterministic class-balanced subset of at most ``max_support`` images.

        With ``min_per_class`` > 1 and more classes than the cap allows at that many images each (or as many as
        a typical class holds, if fewer), an evenly spread subset of the classes is kept instead.
        """
        cap = self.config.max_support
        if n <= cap and min_per_class <= 1:
            return torch.arange(n)
        if labels is None:
            return torch.linspace(0, n - 1, min(n, cap)).round().long()
        classes, counts = torch.unique(labels, return_counts=True)
        per_class = max(min_per_class, min(self.config.support_per_class, cap // len(classes)))
        per_class = min(per_class, max(2, int(counts.median())))  # no more than the classes hold
        if per_class * len(classes) > cap:
            classes = classes[torch.linspace(0, len(classes) - 1, max(1, cap // per_class)).round().long().unique()]
        picked = [torch.nonzero(labels == c).flatten()[:per_class] for c in classes]
        return torch.cat(picked)[:cap].sort().values

    # ------------------------------------------------------------------ forward pieces
    @property
    def reads_channels(self) -> bool:
        """Whether the generator reads per-channel statistics (``generator: channel`` or ``outcome``)."""
        return self.config.generator in ("channel", "outcome")

    @torch.no_grad()
    def extract_features(
        self, images: torch.Tensor, batch_size: int = 256, channel_responses: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Pooled penultimate features of the ungated backbone in eval mode.

        With ``channel_responses`` also each group's spatially pooled post-ReLU response ``(N, C)``
        from the same pass (averaged over the group's gated modules, e.g. the convs of a residual
        stage that share its channels).
        """
        was_training = self.backbone.training
        self.backbone.eval()
        recorded: list[list[torch.Tensor]] = [[] for _ in self.structure.groups]
        handles = []
        if channel_responses:
            for gi, group in enumerate(self.structure.groups):
                for name in group.gate_modules:
                    handles.append(self.backbone.get_submodule(name).register_forward_hook(channel_response_hook(recorded[gi])))
        try:
            with self.gates.apply(None):
                feats = torch.cat([self.backbone.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        finally:
            for h in handles:
                h.remove()
            self.backbone.train(was_training)
        if not channel_responses:
            return feats
        per_group = []
        for group, chunks in zip(self.structure.groups, recorded):
            per_module = len(group.gate_modules)
            # chunks arrive batch by batch, one per gated module: average modules, then join batches
            batches = [torch.stack(chunks[i:i + per_module]).mean(0) for i in range(0, len(chunks), per_module)]
            per_group.append(torch.cat(batches))
        return feats, per_group

    def embed(self, features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.encoder(features, labels)

    @property
    def min_support_per_class(self) -> int:
        """Images per class the generator needs in its sample: a caller that subsamples a many-class task keeps this
        many of a subset of the classes (and passes the class count to :meth:`summarize`) rather than one of each."""
        return self.config.support_per_class if isinstance(self.generator, OutcomeMaskGenerator) else 1

    def summarize(self, images: torch.Tensor, labels: torch.Tensor | None, num_classes: int | None = None) -> TaskSummary:
        """What the generator reads of a task: the set embedding of a class-balanced subset of
        ``images`` (checked, prepared images) and, for the channel generator, per-channel statistics
        of the same forward pass. Gradients flow to the encoder, not to the backbone.

        ``num_classes``: the task's class count when ``images`` hold a subset of its classes (read by the outcome
        generator's task features; default: the classes among ``labels``).
        """
        if isinstance(self.generator, OutcomeMaskGenerator):
            # The predictor was fitted on probes of support_per_class images per class: a many-class task keeps
            # that many per class on a subset of its classes, not one or two images of each (class separability
            # from two images per class is mostly noise: by chance it is (classes - 1) / (images - 1)).
            idx = self.select_support(labels, len(images), min_per_class=self.min_support_per_class)
            if labels is not None and num_classes is None:
                num_classes = int(torch.unique(labels).numel())
            return self._probe_summary(images[idx], None if labels is None else labels[idx], num_classes)
        idx = self.select_support(labels, len(images))
        x, y = images[idx], (None if labels is None else labels[idx])
        if not self.reads_channels:
            return TaskSummary(self.embed(self.extract_features(x), y))
        feats, responses = self.extract_features(x, channel_responses=True)
        return TaskSummary(self.embed(feats, y), channel_statistics(responses, y))

    def _probe_summary(self, x: torch.Tensor, y: torch.Tensor | None, num_classes: int | None = None) -> TaskSummary:
        """The outcome generator's summary: the named task features as the embedding, channel statistics beside
        (``num_classes``: the task's class count when the sample holds a subset of its classes)."""
        if y is None:
            raise ValueError("this pruner's outcome generator reads class labels (class separability, class count): "
                             "pass one integer label per image")
        feats, responses = self.extract_features(x, channel_responses=True)
        stats = channel_statistics(responses, y)
        with torch.no_grad():
            logits = self.backbone.classifier(feats)
        features = task_features(x, y, feats, logits, responses, stats, num_classes)
        return TaskSummary(self.generator.predictor.features_tensor(features).float(), stats)

    def keep_probabilities(self, summary: TaskSummary | torch.Tensor, macs_ratio: float) -> list[torch.Tensor]:
        """Deterministic per-channel ``E[pi]`` for each group."""
        if isinstance(self.generator, OutcomeMaskGenerator):
            raise ValueError("the outcome generator chooses whole masks, it has no keep probabilities: use generate()")
        summary = self._as_summary(summary)
        return [kumaraswamy_mean(a, b) for a, b in self.generator(summary.embedding, macs_ratio, summary.channel_stats)]

    def _as_summary(self, summary: TaskSummary | torch.Tensor) -> TaskSummary:
        if isinstance(summary, TaskSummary):
            return summary
        if self.reads_channels:
            raise ValueError(
                "this pruner's generator reads per-channel statistics: pass a TaskSummary "
                "(StampPruner.summarize or mean_embedding), not a bare embedding tensor"
            )
        return TaskSummary(summary)

    # ------------------------------------------------------------------ meta-test
    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | np.ndarray,
        labels: Sequence[int] | torch.Tensor | np.ndarray | None = None,
        macs_ratio: float = 0.5,
        round_to: int = 1,
        embedding: TaskSummary | torch.Tensor | None = None,
        num_classes: int | None = None,
    ) -> PruneSpec:
        """Prune for the task the sample comes from.

        Args:
            images: the task's sample, prepared with ``prepare_images`` ((N, C, H, W) floats).
            labels: class ids per image (two-level pooling) or None (label-free pooling).
            macs_ratio: budget ``r`` in (0, 1]: real MACs of the pruned net <= r * full.
            round_to: keep a multiple of this many channels per group (hardware-friendly widths).
            embedding: use this task summary (or, for the faithful generator, bare embedding)
                instead of the one of ``images`` (ablations such as the mean embedding).
            num_classes: the deployed net's classes (its head is rebuilt for the task); the budget is met, and
                the spec's MACs and params counted, with that head. None: the backbone's own head.
        """
        r = _check_ratio(macs_ratio)
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to={round_to!r}: expected a positive integer")
        x, y = self._on_device(*self.check_images(images, labels))
        was_training = self.training
        self.eval()
        try:
            if embedding is None:
                embedding = self.summarize(x, y)
            if isinstance(self.generator, OutcomeMaskGenerator):
                summary = self._as_summary(embedding)
                chosen = self.generator.choose(summary.embedding.double(), r)
                return self._build_candidates([chosen], summary, r, round_to, num_classes)[0]
            probs = self.keep_probabilities(embedding, r)
        finally:
            self.train(was_training)
        deployed = deployed_structure(self.structure, num_classes)
        kept = calibrate_masks(probs, deployed, r, round_to)
        return spec_from_kept(kept, deployed, self.backbone.config, r, self.config.version)

    @torch.no_grad()
    def propose(
        self,
        images: torch.Tensor | np.ndarray,
        labels: Sequence[int] | torch.Tensor | np.ndarray | None,
        macs_ratio: float,
        k: int,
        round_to: int = 1,
        embedding: TaskSummary | torch.Tensor | None = None,
        num_classes: int | None = None,
    ) -> list[PruneSpec]:
        """The ``k`` masks the generator ranks best for the task, best first (``generate`` returns the first;
        arguments as there).

        Only the outcome generator ranks whole masks; the others raise ``ValueError``.
        """
        if not isinstance(self.generator, OutcomeMaskGenerator):
            raise ValueError(f"proposing several masks needs a pruner with generator 'outcome' (this one is "
                             f"{self.config.generator!r}): it ranks whole candidate masks, the others score channels")
        r = _check_ratio(macs_ratio)
        x, y = self._on_device(*self.check_images(images, labels))
        was_training = self.training
        self.eval()
        try:
            summary = self._as_summary(embedding if embedding is not None else self.summarize(x, y))
        finally:
            self.train(was_training)
        ranked = self.generator.predictor.rank(summary.embedding.double(), r)[:max(1, k)]
        return self._build_candidates(ranked, summary, r, round_to, num_classes)

    def _build_candidates(self, names: Sequence[str], summary: TaskSummary, macs_ratio: float,
                          round_to: int, num_classes: int | None) -> list[PruneSpec]:
        """The outcome generator's candidates ``names`` for a task summary (SynFlow scores once, and only when one of
        them reads them: they depend on the weights alone and cost one pass of a single image)."""
        assert isinstance(self.generator, OutcomeMaskGenerator)
        needs = any(MaskCandidate.parse(name).uses_synflow for name in names)
        synflow = score_synflow(self.backbone, self.structure) if needs else None
        return [self.generator.build(name, summary.channel_stats or [], self.structure, self.backbone.config,
                                     macs_ratio, round_to, synflow=synflow, num_classes=num_classes) for name in names]

    @torch.no_grad()
    def mean_embedding(self, tasks: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> TaskSummary:
        """Average task summary over ``tasks`` (``(images, labels)`` sets, prepared images): the
        embedding and, for the channel generator, the channel statistics.

        The mean-embedding ablation prunes every target with this embedding: if its masks do as
        well as the target's own, the set encoder's adaptivity is not what makes STAMP work.
        Draw the tasks from data the pruner may see (source / meta-validation tasks), never a target.
        """
        if not tasks:
            raise ValueError("mean_embedding needs at least one (images, labels) task")
        was_training = self.training
        self.eval()
        try:
            summaries = [self.summarize(*self._on_device(*self.check_images(images, labels))) for images, labels in tasks]
        finally:
            self.train(was_training)
        return TaskSummary.mean(summaries)

    def build_pruned(self, spec: PruneSpec, num_classes: int | None = None) -> Backbone:
        """The pruner's backbone weights, physically pruned by ``spec``; new classifier if asked."""
        model = build_backbone_from_config(self.backbone.config)
        model.load_state_dict(self.backbone.state_dict())
        spec.apply(model)
        if num_classes is not None:
            model.reset_classifier(num_classes)
        return model

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``pruner.json`` (config) and ``pruner_state_dict.pt`` (weights) to ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        cfg["structure"] = self.structure.signature()
        _atomic_write(d / _CONFIG_FILE, json.dumps(cfg, indent=2, sort_keys=True).encode())
        tmp = d / f".{_WEIGHTS_FILE}.tmp"
        torch.save(self.state_dict(), tmp)
        tmp.replace(d / _WEIGHTS_FILE)
        return d

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "StampPruner":
        """Rebuild a saved pruner; weights are loaded with ``weights_only=True``."""
        d = Path(directory)
        if not (d / _CONFIG_FILE).is_file() or not (d / _WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a saved StampPruner: expected {_CONFIG_FILE} and {_WEIGHTS_FILE}")
        cfg = json.loads((d / _CONFIG_FILE).read_text())
        # Saved before v2: trained from equal base posteriors, single tasks standardised by running stats.
        cfg.setdefault("score_init", "none")
        cfg.setdefault("task_norm", "running")
        signature = cfg.pop("structure", None)
        pruner = cls(PrunerConfig(**cfg))
        if signature is not None and signature != pruner.structure.signature():
            raise ValueError(f"{d}: saved group structure does not match backbone {cfg['backbone']}")
        state = load_weights(d / _WEIGHTS_FILE, map_location)
        missing, unexpected = _state_dict_mismatch(pruner.state_dict(), state)
        if missing or unexpected:
            raise ValueError(
                f"{d}: weights do not match this stamp_core {__version__} (saved by "
                f"{cfg.get('version', 'unknown')}); missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        pruner.load_state_dict(state)
        return pruner


def _channel_costs(structure: PrunableStructure) -> list[float]:
    """MACs of one channel of each group at full width, as a fraction of the full network's."""
    full = torch.tensor([float(g.size) for g in structure.groups], dtype=torch.float64, device=structure.device)
    base = float(structure.macs(full))
    costs = []
    for g in range(structure.num_groups):
        one_less = full.clone()
        one_less[g] -= 1
        costs.append((base - float(structure.macs(one_less))) / structure.macs_full)
    return costs


def _state_dict_mismatch(expected: dict[str, torch.Tensor], got: Any) -> tuple[list[str], list[str]]:
    if not isinstance(got, dict):
        return sorted(expected), [f"<{type(got).__name__}>"]
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def _check_ratio(macs_ratio: float) -> float:
    try:
        r = float(macs_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"macs_ratio={macs_ratio!r}: expected a number in (0, 1]") from None
    if not (0.0 < r <= 1.0) or not np.isfinite(r):
        raise ValueError(f"macs_ratio={macs_ratio!r}: expected a number in (0, 1]")
    return r


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
