"""Source suites: a declarative YAML file that expands a few base datasets into many derived ones.

A suite names its bases (any :func:`pipeline.data.sources.load_source` spec) and lists items; each
item expands into one dataset per (class subset x transform chain)::

    suite: demo
    defaults: {train: 2000, test: 400, seed: 0}     # images per dataset (stratified), seed
    bases:
      mnist: npz:../shared/datasets/mnist.npz
      stripes: procedural:stripes?n=200&test=50
    datasets:
      - base: mnist
        subsets: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # or classes: [0, 1, 2]; default: all classes
        variants: [[], [invert], [{rotate: {degrees: 90}}, {blur: {sigma: 1.5}}]]

Every derived dataset is named from its recipe (``mnist-c0-1-2-3-4-rot_90-blur_1.5``), built
deterministically (the suite seed, the name and the split seed every random choice, so the same
spec gives the same bytes in any process), and carries its lineage (base, recipe, fingerprint) into
the catalog. :func:`load_suite` checks the whole file before anything is built or written and
raises :class:`SuiteError` naming the file, the dataset and the field. The benchmark's unseen
targets (:data:`HELD_OUT_TARGETS`) can never enter a suite.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.data import s3
from pipeline.data.catalog import validate_name
from pipeline.data.sources import ArrayDataset, build_procedural, load_source, select_classes
from pipeline.data.transforms import TRANSFORMS, TRANSFORMS_VERSION, TransformParamError, apply_transform, transform_tag, validate_params

#: Part of every fingerprint: bump when the way a suite dataset is built (subsampling, seeding) changes.
SUITES_VERSION = 1
DEFAULT_TRAIN = 2000
DEFAULT_TEST = 400
MAX_IMAGES = 20_000  #: per split; suites are many modest datasets, not a few large ones

FASHION_MNIST_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: the ten Describable Textures classes of ../shared/datasets/dtd10.npz
DTD10_CLASS_NAMES = ("banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
                     "crosshatched", "crystalline")
OMNIGLOT_CLASS_NAME = r"[^/]+/character\d+"
#: The procedural family held out as the unseen target of the demo and the benchmark.
HELD_OUT_PROCEDURAL = "glyphs"


@dataclass(frozen=True)
class HeldOutTarget:
    """A benchmark target: never a source. ``classes`` None means every class of a matching base."""

    label: str
    kind: str | None = None  #: spec kind that matches (``digits``, ``procedural``)
    procedural: str | None = None  #: procedural family name that matches
    class_names: tuple[str, ...] | None = None  #: a base whose class names are all among these matches
    classes: frozenset[str] | None = None  #: held-out class names within a matching base
    #: a base whose class names all match this regular expression matches (Omniglot's ``Alphabet/characterNN``)
    class_name_pattern: str | None = None

    def conflict(self, kind: str, family: str, base_class_names: tuple[str, ...], chosen: tuple[str, ...]) -> list[str]:
        """The chosen class names that are this target (empty when none)."""
        matches = (
            (self.kind is not None and kind == self.kind and (self.procedural is None or family == self.procedural))
            # A subset counts too: a base spec may already select classes (npz:...?classes=5,6).
            or (self.class_names is not None and set(base_class_names) <= set(self.class_names))
            or (self.class_name_pattern is not None and bool(base_class_names)
                and all(re.fullmatch(self.class_name_pattern, c) for c in base_class_names))
        )
        if not matches:
            return []
        return [c for c in chosen if self.classes is None or c in self.classes]


#: The one list of benchmark targets that suites refuse (see jobs/configs/benchmark_*.yaml).
HELD_OUT_TARGETS: tuple[HeldOutTarget, ...] = (
    HeldOutTarget("scikit-learn digits (a benchmark target)", kind="digits"),
    HeldOutTarget("Fashion-MNIST classes 6-9 (a benchmark target)", class_names=FASHION_MNIST_CLASS_NAMES,
                  classes=frozenset(FASHION_MNIST_CLASS_NAMES[6:])),
    HeldOutTarget(f"procedural {HELD_OUT_PROCEDURAL} (the held-out procedural family)", kind="procedural",
                  procedural=HELD_OUT_PROCEDURAL),
    # The natural-image world's targets (jobs/configs/benchmark_natural.yaml): Tiny-ImageNet is its only source.
    HeldOutTarget("CIFAR-10 (a natural-image benchmark target)", class_names=CIFAR10_CLASS_NAMES),
    HeldOutTarget("DTD-10 textures (a natural-image benchmark target)", class_names=DTD10_CLASS_NAMES),
    HeldOutTarget("Omniglot characters (a natural-image benchmark target)", class_name_pattern=OMNIGLOT_CLASS_NAME),
)


class SuiteError(ValueError):
    """A suite file is invalid; the message names the file, the dataset and the field."""

    def __init__(self, suite: str, dataset: str, field_path: str, problem: str) -> None:
        super().__init__(f"{suite}: dataset {dataset}: field {field_path}: {problem}")
        self.suite, self.dataset, self.field, self.problem = suite, dataset, field_path, problem


class HeldOutTargetError(SuiteError):
    """A suite would make a benchmark target a source dataset."""


@dataclass(frozen=True)
class BaseInfo:
    """A base of a suite: its spec (as written and as loaded), kind and class names."""

    name: str
    spec: str
    resolved: str
    kind: str
    family: str
    class_names: tuple[str, ...]
    fingerprint: str


@dataclass(frozen=True)
class DatasetSpec:
    """One derived dataset, fully resolved: everything needed to build it in another process."""

    name: str
    base: str
    base_spec: str
    base_resolved: str
    base_fingerprint: str
    classes: tuple[int, ...] | None
    class_names: tuple[str, ...]
    transforms: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    train: int
    test: int
    seed: int
    where: str = field(default="", compare=False)  #: ``datasets[i] (subset j, variant k)``
    classes_field: str = field(default="", compare=False)  #: ``datasets[i].subsets[j]``: for messages

    @property
    def recipe(self) -> str:
        """Canonical, readable recipe: ``mnist[0,1,2] | rotate(degrees=90, jitter=0) ; train=2000 test=400 seed=0``."""
        head = self.base + (f"[{','.join(map(str, self.classes))}]" if self.classes is not None else "")
        steps = [f"{t}({', '.join(f'{k}={_fmt(v)}' for k, v in params)})" for t, params in self.transforms]
        return " | ".join([head, *steps]) + f" ; train={self.train} test={self.test} seed={self.seed}"

    def fingerprint(self, shard_size: int) -> str:
        """sha256 of what determines the shards: recipe, base content, code versions, shard size."""
        payload = [self.name, self.recipe, self.base_fingerprint, TRANSFORMS_VERSION, SUITES_VERSION, shard_size]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def lineage(self, shard_size: int) -> dict[str, str]:
        return {"base": self.base, "recipe": self.recipe, "fingerprint": self.fingerprint(shard_size)}


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Suite:
    """A validated, expanded suite."""

    path: str
    name: str
    bases: dict[str, BaseInfo]
    datasets: tuple[DatasetSpec, ...]


# ------------------------------------------------------------------------------------ parsing


def load_suite(path: str | Path) -> Suite:
    """Read, validate and expand a suite file; nothing is built or written.

    Raises:
        FileNotFoundError: no such file.
        SuiteError: anything invalid (HeldOutTargetError for a benchmark target); the message names
            the file, the dataset and the field, and says what is expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such suite file")
    where = str(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SuiteError(where, "-", "(file)", f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise SuiteError(where, "-", "(file)", "expected a mapping with keys suite, defaults, bases, datasets")
    unknown = set(doc) - {"suite", "defaults", "bases", "datasets"}
    if unknown:
        raise SuiteError(where, "-", sorted(unknown)[0], "unknown key; expected suite, defaults, bases, datasets")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise SuiteError(where, "-", "defaults", f"expected a mapping of train, test, seed; got {defaults!r}")
    unknown_defaults = sorted(set(defaults) - {"train", "test", "seed"})
    if unknown_defaults:
        raise SuiteError(where, "-", f"defaults.{unknown_defaults[0]}", "unknown key; expected train, test, seed")
    bases_raw = doc.get("bases")
    if not isinstance(bases_raw, dict) or not bases_raw:
        raise SuiteError(where, "-", "bases", f"expected a non-empty mapping of base name -> source spec; got {bases_raw!r}")
    bases = {name: _load_base(where, name, spec) for name, spec in bases_raw.items()}
    items = doc.get("datasets")
    if not isinstance(items, list) or not items:
        raise SuiteError(where, "-", "datasets", "expected a non-empty list of dataset items")
    specs: list[DatasetSpec] = []
    for i, item in enumerate(items):
        specs.extend(_expand_item(where, i, item, bases, defaults))
    seen: dict[str, DatasetSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise SuiteError(where, repr(spec.name), "name", f"defined twice, by {seen[spec.name].where} and {spec.where}; "
                             "expected unique names (change a parameter or set `name:` on one item)")
        seen[spec.name] = spec
    suite = Suite(path=where, name=str(doc.get("suite") or path.stem), bases=bases, datasets=tuple(specs))
    check_held_out(suite)
    return suite


def _load_base(where: str, name: Any, spec: Any) -> BaseInfo:
    """Class names and fingerprint of a base, without loading more than its metadata where possible."""
    field_path = f"bases.{name}"
    try:
        validate_name(str(name), "base name")
    except ValueError as exc:
        raise SuiteError(where, "-", field_path, str(exc)) from None
    if not isinstance(spec, str) or not spec:
        raise SuiteError(where, "-", field_path, f"expected a source spec string (npz:PATH, procedural:NAME?n=..&test=..), got {spec!r}")
    body, sep, query = spec.partition("?")
    kind, _, rest = body.partition(":")
    resolved = spec
    if kind == "npz":
        file = Path(rest).expanduser()
        if not file.is_file():
            raise SuiteError(where, "-", field_path, f"npz file {rest!r} not found (relative to {Path.cwd()}); expected an existing .npz")
        resolved = f"npz:{file.resolve()}{sep}{query}"
        fingerprint = _file_sha256(str(file.resolve()))
    else:
        fingerprint = hashlib.sha256(spec.encode()).hexdigest()
    try:
        if kind == "procedural":  # one image per class is enough to learn the class names
            probe = build_procedural(rest, n_per_class=1, n_test_per_class=0)
            ds = select_classes(probe, _query_classes(query)) if "classes=" in query else probe
        elif kind == "digits":
            ds = None
        else:
            ds = load_source(resolved)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise SuiteError(where, "-", field_path, f"cannot load base: {exc}") from None
    names = tuple(ds.class_names) if ds is not None else tuple(str(i) for i in range(10))
    return BaseInfo(name=str(name), spec=spec, resolved=resolved, kind=kind, family=rest.split(":")[0],
                    class_names=names, fingerprint=fingerprint)


def _query_classes(query: str) -> list[int]:
    raw = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("classes", "")
    return [int(t) for t in raw.split(",") if t.strip()]


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str) -> str:
    return s3.sha256_file(path)


def _int_field(value: Any, where: str, dataset: str, field_path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SuiteError(where, dataset, field_path, f"{value!r} is out of range: expected an integer in [{lo}, {hi}]")
    return value


def _expand_item(where: str, i: int, item: Any, bases: dict[str, BaseInfo], defaults: dict[str, Any]) -> list[DatasetSpec]:
    label = f"datasets[{i}]"
    if not isinstance(item, dict):
        raise SuiteError(where, label, label, f"expected a mapping with base, subsets/classes, variants; got {item!r}")
    unknown = set(item) - {"base", "classes", "subsets", "variants", "train", "test", "seed", "name"}
    if unknown:
        raise SuiteError(where, label, f"{label}.{sorted(unknown)[0]}",
                         "unknown key; expected base, classes or subsets, variants, train, test, seed, name")
    base_name = item.get("base")
    if base_name not in bases:
        raise SuiteError(where, label, f"{label}.base", f"unknown base {base_name!r}; expected one of: {', '.join(sorted(bases)) or 'none defined'}")
    base = bases[base_name]
    label = f"{label} (base {base_name})"
    if "classes" in item and "subsets" in item:
        raise SuiteError(where, label, f"datasets[{i}].subsets", "give either classes (one subset) or subsets (a list of them), not both")
    subsets_raw = [item["classes"]] if "classes" in item else item.get("subsets", [None])
    subsets_field = f"datasets[{i}].classes" if "classes" in item else f"datasets[{i}].subsets"
    if not isinstance(subsets_raw, list) or not subsets_raw:
        raise SuiteError(where, label, subsets_field, "expected a non-empty list of class-id lists")
    subsets = [_check_subset(where, label, f"{subsets_field}[{j}]" if "subsets" in item else subsets_field, s, base)
               for j, s in enumerate(subsets_raw)]
    variants_raw = item.get("variants", [[]])
    if not isinstance(variants_raw, list) or not variants_raw:
        raise SuiteError(where, label, f"datasets[{i}].variants", "expected a non-empty list of transform chains ([] = none)")
    variants = [_check_chain(where, label, f"datasets[{i}].variants[{k}]", chain) for k, chain in enumerate(variants_raw)]
    sizes = {key: _int_field(item.get(key, defaults.get(key, default)), where, label, f"datasets[{i}].{key}" if key in item else f"defaults.{key}", lo, hi)
             for key, default, lo, hi in (("train", DEFAULT_TRAIN, 1, MAX_IMAGES), ("test", DEFAULT_TEST, 0, MAX_IMAGES), ("seed", 0, 0, 2**31 - 1))}
    explicit = item.get("name")
    if explicit is not None and len(subsets) * len(variants) != 1:
        raise SuiteError(where, label, f"datasets[{i}].name", "an item that expands to several datasets cannot take one name; remove name")
    out = []
    for j, classes in enumerate(subsets):
        for k, chain in enumerate(variants):
            name = explicit or _derived_name(base_name, classes, chain, sizes["seed"])
            try:
                validate_name(name)
            except ValueError as exc:
                raise SuiteError(where, label, f"datasets[{i}].name", f"{exc}; expected a shorter recipe or an explicit name") from None
            chosen = tuple(base.class_names[c] for c in classes) if classes is not None else base.class_names
            out.append(DatasetSpec(
                name=name, base=base_name, base_spec=base.spec, base_resolved=base.resolved, base_fingerprint=base.fingerprint,
                classes=classes, class_names=chosen, transforms=chain, seed=sizes["seed"], train=sizes["train"], test=sizes["test"],
                where=f"datasets[{i}] (subset {j}, variant {k})",
                classes_field=(f"{subsets_field}[{j}]" if "subsets" in item else subsets_field) if classes is not None else f"datasets[{i}].base",
            ))
    return out


def _check_subset(where: str, label: str, field_path: str, subset: Any, base: BaseInfo) -> tuple[int, ...] | None:
    if subset is None:
        return None
    k = len(base.class_names)
    if (not isinstance(subset, list) or not subset or len(set(map(repr, subset))) != len(subset)
            or any(isinstance(c, bool) or not isinstance(c, int) for c in subset)):
        raise SuiteError(where, label, field_path, f"{subset!r} is not a list of distinct class ids; expected e.g. [0, 1, 2]")
    missing = [c for c in subset if not 0 <= c < k]
    if missing:
        raise SuiteError(where, label, field_path, f"class {missing[0]} does not exist in base {base.name!r}; expected class ids 0..{k - 1}")
    return tuple(subset)


def _check_chain(where: str, label: str, field_path: str, chain: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    if not isinstance(chain, list):
        raise SuiteError(where, label, field_path, f"expected a list of transforms (name or {{name: {{param: value}}}}), got {chain!r}")
    steps = []
    for s, step in enumerate(chain):
        step_field = f"{field_path}[{s}]"
        if isinstance(step, str):
            tname, params = step, {}
        elif isinstance(step, dict) and len(step) == 1:
            tname, params = next(iter(step.items()))
            params = {} if params is None else params
        else:
            raise SuiteError(where, label, step_field, f"expected a transform name or {{name: {{param: value}}}}, got {step!r}")
        if tname not in TRANSFORMS:
            raise SuiteError(where, label, step_field, f"unknown transform {tname!r}; expected one of: {', '.join(sorted(TRANSFORMS))}")
        if not isinstance(params, dict):
            raise SuiteError(where, label, f"{step_field}.{tname}", f"expected a mapping of parameters, got {params!r}")
        try:
            checked = validate_params(tname, params, f"{step_field}.{tname}")
        except TransformParamError as exc:
            raise SuiteError(where, label, exc.field, exc.message) from None
        steps.append((tname, tuple(checked.items())))
    return tuple(steps)


def _derived_name(base: str, classes: tuple[int, ...] | None, chain: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...], seed: int) -> str:
    parts = [base]
    if classes is not None:
        parts.append("c" + "-".join(map(str, classes)))
    parts.extend(transform_tag(t, dict(params)) for t, params in chain)
    if seed:
        parts.append(f"s{seed}")
    return "-".join(parts)


def check_held_out(suite: Suite) -> None:
    """Raise HeldOutTargetError for the first dataset that is (part of) a benchmark target."""
    for spec in suite.datasets:
        base = suite.bases[spec.base]
        for target in HELD_OUT_TARGETS:
            hit = target.conflict(base.kind, base.family, base.class_names, spec.class_names)
            if hit:
                raise HeldOutTargetError(
                    suite.path, repr(spec.name), spec.classes_field if target.classes is not None else spec.classes_field.split(".")[0] + ".base",
                    f"base {spec.base!r} ({base.spec}) with classes {', '.join(hit)} is {target.label}, which must never "
                    "be a source; expected other bases or classes (nothing was written)",
                )


# ------------------------------------------------------------------------------------ building


@functools.lru_cache(maxsize=4)
def _base_dataset(resolved: str) -> ArrayDataset:
    """Bases are shared by many derived datasets: load each once per process."""
    return load_source(resolved)


def _rng(spec: DatasetSpec, *stream: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, which would break "same spec, same bytes".
    return np.random.default_rng([spec.seed, zlib.crc32(spec.name.encode()), *stream])


def _subsample(y: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``total`` images, the same share of every class (seeded)."""
    classes = np.unique(y)
    if len(y) <= total or not len(classes):
        return np.arange(len(y))
    per_class = max(1, total // len(classes))
    keep = [np.flatnonzero(y == c)[rng.permutation(int((y == c).sum()))][:per_class] for c in classes]
    return np.sort(np.concatenate(keep))


def build_dataset(spec: DatasetSpec) -> ArrayDataset:
    """Build one derived dataset in memory (deterministic: same spec, same bytes)."""
    ds = _base_dataset(spec.base_resolved)
    if spec.classes is not None:
        ds = select_classes(ds, list(spec.classes))
    arrays: dict[str, np.ndarray] = {}
    for split_id, (split, limit) in enumerate((("train", spec.train), ("test", spec.test))):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        idx = _subsample(y, limit, _rng(spec, split_id, 0)) if limit else np.arange(0)
        x, y = x[idx], y[idx]
        for step, (tname, params) in enumerate(spec.transforms):
            if len(x):
                x = apply_transform(tname, x, _rng(spec, split_id, step + 1), dict(params))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    if not len(arrays["x_test"]):  # keep the channel count of the train images for an empty split
        arrays["x_test"] = np.zeros((0, *arrays["x_train"].shape[1:]), np.uint8)
    return ArrayDataset(name=spec.name, class_names=list(ds.class_names), source=spec.base_spec, **arrays)
