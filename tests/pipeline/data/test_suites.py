"""Source suites: expansion and names, bad input refused before anything is written, held-out
benchmark targets refused, deterministic builds, idempotent and concurrent ingests (real SeaweedFS)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.apps.cli import app
from pipeline.data import (
    HELD_OUT_TARGETS,
    Catalog,
    HeldOutTargetError,
    SuiteError,
    build_dataset,
    ingest_suite,
    load_suite,
    s3,
)
from pipeline.data.suites import CIFAR10_CLASS_NAMES, DTD10_CLASS_NAMES, FASHION_MNIST_CLASS_NAMES

REPO = Path(__file__).resolve().parents[3]
runner = CliRunner()


def _npz(path: Path, class_names: list[str], per_class: int = 12, size: int = 12) -> Path:
    rng = np.random.default_rng(len(class_names))
    k = len(class_names)
    y_train, y_test = np.repeat(np.arange(k), per_class), np.repeat(np.arange(k), 3)
    x_train = rng.integers(0, 256, (len(y_train), size, size, 1), dtype=np.uint8)
    x_test = rng.integers(0, 256, (len(y_test), size, size, 1), dtype=np.uint8)
    np.savez_compressed(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=np.array(class_names))
    return path


@pytest.fixture()
def bases(tmp_path: Path) -> dict[str, Path]:
    return {
        "digits10": _npz(tmp_path / "digits10.npz", [str(i) for i in range(10)]),
        "fashion": _npz(tmp_path / "fashion.npz", list(FASHION_MNIST_CLASS_NAMES)),
    }


def _suite(tmp_path: Path, bases: dict[str, Path], datasets: str, name: str = "suite.yaml") -> Path:
    text = textwrap.dedent(f"""\
        suite: t
        defaults: {{train: 40, test: 8, seed: 0}}
        bases:
          digits10: npz:{bases['digits10']}
          fashion: npz:{bases['fashion']}
          stripes: procedural:stripes?n=4&test=1
        datasets:
        """) + textwrap.indent(textwrap.dedent(datasets), "  ")
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """\
- base: digits10
  subsets: [[0, 1, 2], [7, 8, 9]]
  variants: [[], [invert], [{rotate: {degrees: 90}}, {noise: {sigma: 10}}]]
- base: fashion
  classes: [0, 1, 2, 3, 4, 5]
  variants: [[random_colorize]]
- base: stripes
  variants: [[{blur: {sigma: 1.0}}]]
"""


def test_items_expand_into_named_datasets(tmp_path: Path, bases: dict[str, Path]) -> None:
    suite = load_suite(_suite(tmp_path, bases, GOOD))
    assert [d.name for d in suite.datasets] == [
        "digits10-c0-1-2", "digits10-c0-1-2-inv", "digits10-c0-1-2-rot_90-noise_10",
        "digits10-c7-8-9", "digits10-c7-8-9-inv", "digits10-c7-8-9-rot_90-noise_10",
        "fashion-c0-1-2-3-4-5-rcol", "stripes-blur",
    ]
    spec = suite.datasets[2]
    assert spec.recipe == "digits10[0,1,2] | rotate(degrees=90, jitter=0) | noise(sigma=10) ; train=40 test=8 seed=0"
    assert spec.class_names == ("0", "1", "2")
    ds = build_dataset(spec)
    # train: all 12 per class (36 <= 40); test: 9 > 8, so the same share of each class, 8 // 3 = 2.
    assert (len(ds.y_train), len(ds.y_test), ds.class_names) == (36, 6, ["0", "1", "2"])
    assert np.bincount(ds.y_test).tolist() == [2, 2, 2]
    assert build_dataset(suite.datasets[6]).image_shape == (12, 12, 3)  # colourised


def test_build_is_byte_identical_across_processes(tmp_path: Path, bases: dict[str, Path]) -> None:
    path = _suite(tmp_path, bases, GOOD)
    suite = load_suite(path)

    def digest(ds: object) -> str:
        return hashlib.sha256(b"".join(getattr(ds, k).tobytes() for k in ("x_train", "y_train", "x_test", "y_test"))).hexdigest()

    here = [digest(build_dataset(d)) for d in suite.datasets]
    assert here == [digest(build_dataset(d)) for d in load_suite(path).datasets]
    assert len(set(here)) == len(here)  # every recipe gives different pixels
    code = (
        "import hashlib, sys\nfrom pipeline.data import load_suite, build_dataset\n"
        "for d in load_suite(sys.argv[1]).datasets:\n"
        "    ds = build_dataset(d)\n"
        "    print(hashlib.sha256(b''.join(getattr(ds, k).tobytes() for k in ('x_train', 'y_train', 'x_test', 'y_test'))).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "999"}  # a different str-hash salt must not matter
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == here


BAD_INPUTS = [
    ("unknown transform",
     "- base: digits10\n  variants: [[invert, {sepia: {}}]]\n",
     "dataset datasets[0] (base digits10): field datasets[0].variants[0][1]: unknown transform 'sepia'; expected one of: "
     "affine, blur, color_shift, colorize, flip, grayscale, invert, low_contrast, noise, random_colorize, rotate, texture_background"),
    ("unknown base",
     "- base: kmnist\n",
     "dataset datasets[0]: field datasets[0].base: unknown base 'kmnist'; expected one of: digits10, fashion, stripes"),
    ("class the base lacks",
     "- base: stripes\n  subsets: [[0, 1], [6, 8]]\n",
     "dataset datasets[0] (base stripes): field datasets[0].subsets[1]: class 8 does not exist in base 'stripes'; expected class ids 0..7"),
    ("same name twice",
     "- base: digits10\n  classes: [0, 1]\n- base: digits10\n  subsets: [[2, 3], [0, 1]]\n",
     "dataset 'digits10-c0-1': field name: defined twice, by datasets[0] (subset 0, variant 0) and datasets[1] (subset 1, variant 0); "
     "expected unique names (change a parameter or set `name:` on one item)"),
    ("parameter out of range",
     "- base: digits10\n  variants: [[{rotate: {degrees: 400}}]]\n",
     "dataset datasets[0] (base digits10): field datasets[0].variants[0][0].rotate.degrees: 400 is out of range: "
     "expected a number in [-180, 180]"),
]


@pytest.mark.parametrize(("case", "items", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_before_anything_is_written(tmp_path: Path, bases: dict[str, Path], case: str, items: str, message: str) -> None:
    path = _suite(tmp_path, bases, items)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert str(info.value) == f"{path}: {message}"
    dest = tmp_path / "dest"
    result = runner.invoke(app, ["ingest", "--suite", str(path), "--dest", str(dest)])
    assert result.exit_code == 2
    assert "SuiteError" in result.output and "field" in result.output
    assert not dest.exists()  # nothing was written


HELD_OUT = [
    ("sklearn digits", "bases_extra: {sk: digits}", "- base: sk\n  classes: [0, 1]\n", "datasets[0].base",
     "base 'sk' (digits) with classes 0, 1 is scikit-learn digits (a benchmark target)"),
    ("fashion 6-9", "", "- base: fashion\n  subsets: [[0, 1], [5, 6]]\n", "datasets[0].subsets[1]",
     "base 'fashion' ({fashion}) with classes Shirt is Fashion-MNIST classes 6-9 (a benchmark target)"),
    ("fashion, all classes", "", "- base: fashion\n  variants: [[invert]]\n", "datasets[0].base",
     "base 'fashion' ({fashion}) with classes Shirt, Sneaker, Bag, Ankle boot is Fashion-MNIST classes 6-9 (a benchmark target)"),
    ("fashion 6 selected in the base spec", "bases_extra: {fs: 'npz:{fashion}?classes=5,6'}", "- base: fs\n  classes: [1]\n",
     "datasets[0].classes", "base 'fs' ({fashion}?classes=5,6) with classes Shirt is Fashion-MNIST classes 6-9"),
    ("glyphs", "bases_extra: {gl: 'procedural:glyphs?n=2'}", "- base: gl\n  classes: [3]\n", "datasets[0].base",
     "base 'gl' (procedural:glyphs?n=2) with classes glyph3 is procedural glyphs (the held-out procedural family)"),
]


@pytest.mark.parametrize(("case", "extra", "items", "field", "problem"), HELD_OUT, ids=[c[0] for c in HELD_OUT])
def test_held_out_targets_never_enter_a_suite(tmp_path: Path, bases: dict[str, Path], case: str, extra: str, items: str,
                                               field: str, problem: str) -> None:
    path = _suite(tmp_path, bases, items)
    if extra:  # one more base, defined in the bases section
        key, value = extra.split(": ", 1)[1].strip("{}").replace("{fashion}", str(bases["fashion"])).split(": ", 1)
        path.write_text(path.read_text().replace("bases:\n", f"bases:\n  {key}: {value}\n"))
    with pytest.raises(HeldOutTargetError) as info:
        load_suite(path)
    assert info.value.field == field
    assert info.value.problem.startswith(problem.format(fashion=f"npz:{bases['fashion']}"))
    assert "must never be a source" in str(info.value) and str(path) in str(info.value)
    dest = tmp_path / "dest"
    result = runner.invoke(app, ["ingest", "--suite", str(path), "--dest", str(dest)])
    assert result.exit_code == 2 and "HeldOutTargetError" in result.output
    assert not dest.exists()


def test_held_out_list_covers_the_benchmark_targets() -> None:
    labels = " ".join(t.label for t in HELD_OUT_TARGETS)
    for target in ("scikit-learn digits", "Fashion-MNIST classes 6-9", "glyphs"):
        assert target in labels
    for config in (REPO / "jobs" / "configs").glob("benchmark_*.yaml"):
        text = config.read_text()
        assert "data: digits" in text and "fashion_mnist.npz?classes=6,7,8,9" in text


def test_the_demo_suite_is_valid_and_needs_no_files() -> None:
    demo = load_suite(REPO / "jobs/configs/sources/suite_demo.yaml")
    assert 6 <= len(demo.datasets) <= 8 and {d.base_spec.split(":")[0] for d in demo.datasets} == {"procedural"}


def test_suite_64_is_valid(shared_datasets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # its npz paths are relative to the repository root, like every config
    big = load_suite(REPO / "jobs/configs/sources/suite_64.yaml")
    assert len(big.datasets) >= 64
    assert max(d.train for d in big.datasets) <= 2000
    fashion = [d for d in big.datasets if d.base == "fashion"]
    assert fashion and all(set(d.classes or ()) <= set(range(6)) and d.classes for d in fashion)


def test_ingest_is_idempotent_and_records_lineage(tmp_path: Path, bases: dict[str, Path]) -> None:
    path = _suite(tmp_path, bases, GOOD)
    dest = str(tmp_path / "data")
    first = ingest_suite(load_suite(path), dest, jobs=1, progress=False)
    assert (len(first.built), first.skipped, first.samples) == (8, [], 6 * (36 + 6) + (36 + 6) + (32 + 8))
    assert first.uploaded_shards == first.shards == 16 and first.bytes > 0
    catalog = Catalog.load(f"{dest}/catalog.json")
    entry = catalog.get("digits10-c7-8-9-inv")
    assert (entry.base, entry.recipe) == ("digits10", "digits10[7,8,9] | invert() ; train=40 test=8 seed=0")
    assert entry.fingerprint == load_suite(path).datasets[4].fingerprint(5000)
    assert [e.name for e in catalog.find(recipe="invert")] == ["digits10-c0-1-2-inv", "digits10-c7-8-9-inv"]
    assert len(catalog.find(base="digits10")) == 6
    again = ingest_suite(load_suite(path), dest, jobs=1, progress=False)
    assert (again.built, len(again.skipped), again.uploaded_shards, again.samples) == ([], 8, 0, 0)
    # A changed recipe builds that dataset only: a new parameter value is a new name ...
    path.write_text(path.read_text().replace("sigma: 1.0", "sigma: 2.0"))
    changed = ingest_suite(load_suite(path), dest, jobs=1, progress=False)
    assert (changed.built, len(changed.skipped)) == (["stripes-blur_2"], 7)
    # ... a new size keeps the name and replaces the dataset (its fingerprint differs).
    path.write_text(path.read_text().replace("- base: stripes\n", "- base: stripes\n    train: 16\n"))
    resized = ingest_suite(load_suite(path), dest, jobs=1, progress=False)
    assert (resized.built, resized.samples) == (["stripes-blur_2"], 16 + 8)
    assert Catalog.load(f"{dest}/catalog.json").get("stripes-blur_2").splits["train"].samples == 16


def _pairs_suite(path: Path, family: str, variant: str) -> Path:
    """28 class pairs x 2 variants = 56 tiny datasets: ingest time is mostly catalog writes, so two such
    ingests running together keep writing the catalog at the same moments."""
    pairs = [[a, b] for a in range(8) for b in range(a + 1, 8)]
    path.write_text(textwrap.dedent(f"""\
        suite: {family}-pairs
        defaults: {{train: 2, test: 0}}
        bases: {{{family}: 'procedural:{family}?n=1&test=0'}}
        datasets:
          - base: {family}
            subsets: {pairs}
            variants: [[], [{variant}]]
        """))
    return path


@pytest.mark.integration
def test_two_concurrent_suite_ingests_keep_every_entry(tmp_path: Path, seaweedfs: object, s3_bucket: str) -> None:
    """Two real `stamp ingest --suite` processes against SeaweedFS at the same time (3 writers: one with
    2 worker processes, one in-process), 112 datasets. Checked by hand: with a read-modify-write of one
    catalog document instead of entry objects, this loses entries."""
    one = _pairs_suite(tmp_path / "one.yaml", "stripes", "invert")
    two = _pairs_suite(tmp_path / "two.yaml", "blobs", "flip")
    dest = f"s3://{s3_bucket}/data"
    cmd = [sys.executable, "-m", "pipeline.apps.cli", "ingest", "--dest", dest]
    procs = [subprocess.Popen([*cmd, "--jobs", jobs, "--suite", str(p)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p, jobs in ((one, "2"), (two, "1"))]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    expected = sorted(d.name for p in (one, two) for d in load_suite(p).datasets)
    assert len(expected) == 2 * 56
    catalog = Catalog.load(f"{dest}/catalog.json")
    assert catalog.names() == expected
    assert all(s3.exists(u) for name in expected for u in catalog.get(name).shard_urls)  # every entry is complete
    assert "suite stripes-pairs: 56 datasets (56 ingested, 0 already there)" in outputs[0].replace("\n", " ")
    rerun = runner.invoke(app, ["ingest", "--suite", str(two), "--dest", dest])
    assert rerun.exit_code == 0 and "(0 ingested, 56 already there)" in rerun.output.replace("\n", " ")


def test_explicit_names_and_missing_base_files(tmp_path: Path, bases: dict[str, Path]) -> None:
    named = load_suite(_suite(tmp_path, bases, "- base: digits10\n  classes: [1, 2]\n  variants: [[invert]]\n  name: my-digits\n"))
    assert [d.name for d in named.datasets] == ["my-digits"] and named.datasets[0].recipe.startswith("digits10[1,2] | invert()")
    path = _suite(tmp_path, bases, "- base: digits10\n  subsets: [[1], [2]]\n  name: my-digits\n")
    with pytest.raises(SuiteError, match=r"field datasets\[0\]\.name: an item that expands to several datasets cannot take one name"):
        load_suite(path)
    path.write_text(path.read_text().replace(str(bases["fashion"]), "no/such/fashion.npz"))
    with pytest.raises(SuiteError, match=r"suite\.yaml: dataset -: field bases\.fashion: npz file 'no/such/fashion\.npz' not found"):
        load_suite(path)


NATURAL_TARGETS = [
    ("cifar10", list(CIFAR10_CLASS_NAMES), "CIFAR-10 (a natural-image benchmark target)"),
    ("dtd10", list(DTD10_CLASS_NAMES), "DTD-10 textures (a natural-image benchmark target)"),
    ("omniglot", [f"{a}/character{i:02d}" for a in ("Balinese", "Korean") for i in (1, 2)],
     "Omniglot characters (a natural-image benchmark target)"),
]


@pytest.mark.parametrize(("file", "class_names", "label"), NATURAL_TARGETS, ids=[t[0] for t in NATURAL_TARGETS])
def test_natural_targets_never_enter_a_suite(tmp_path: Path, file: str, class_names: list[str], label: str) -> None:
    target = _npz(tmp_path / f"{file}.npz", class_names)
    path = tmp_path / "natural.yaml"
    path.write_text(f"suite: natural\nbases:\n  t: npz:{target}\ndatasets:\n  - base: t\n    subsets: [[0, 1]]\n")
    with pytest.raises(HeldOutTargetError) as info:
        load_suite(path)
    # the whole base is a target: the error names the base or the subset that uses it
    assert info.value.field in ("datasets[0].base", "datasets[0].subsets[0]") and label in info.value.problem


def test_a_reference_dataset_with_other_class_names_is_a_valid_base(tmp_path: Path) -> None:
    # Tiny-ImageNet's names, plus one that only looks like an Omniglot character: the pattern needs all of them
    ref = _npz(tmp_path / "ref.npz", ["goldfish", "bullfrog", "koala", "Latin/character01"])
    path = tmp_path / "ref.yaml"
    path.write_text(f"suite: ref\nbases:\n  r: npz:{ref}\ndatasets:\n  - base: r\n    subsets: [[0, 1], [2, 3]]\n")
    assert [d.classes for d in load_suite(path).datasets] == [(0, 1), (2, 3)]


def test_suite_tinyimagenet_is_valid(shared_datasets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    suite = load_suite(REPO / "jobs/configs/sources/suite_tinyimagenet.yaml")
    assert len(suite.datasets) >= 64 and {d.base for d in suite.datasets} == {"tin"}
    assert max(d.train for d in suite.datasets) <= 3500
    sizes = sorted({len(d.class_names) for d in suite.datasets})
    assert sizes[0] == 5 and sizes[-2] == 20 and sizes[-1] == 100  # the many-way sources: every class
    many = {d.name: d for d in suite.datasets if len(d.class_names) == 100}
    assert sorted(many) == ["tin100", "tin100-gray"] and all(d.test == 5000 for d in many.values())
    assert not any(fnmatch.fnmatchcase(name, "tin-*") for name in many)  # kept out of the tin-* patterns
    domains = {t[0] for d in suite.datasets for t in d.transforms}
    assert {"grayscale", "color_shift", "blur", "low_contrast", "affine"} <= domains
