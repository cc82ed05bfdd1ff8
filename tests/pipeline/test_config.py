"""Tests for pipeline.config: YAML + overrides, errors that name the key, fail-fast job entrypoints."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    MetaTrainConfig,
    PretrainConfig,
    TuneConfig,
    apply_overrides,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture()
def meta_yaml(tmp_path: Path) -> Path:
    return _write(tmp_path, "kind: meta_train\nbackbone: small_cnn\noptim:\n  lr: 0.01\n")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert type(cfg).__name__ in {"PretrainConfig", "MetaTrainConfig", "TuneConfig", "BenchmarkConfig", "OutcomesConfig", "FitPrunerConfig"}


def test_shipped_configs_cover_every_job() -> None:
    kinds = {type(load_config(p)).__name__ for p in CONFIGS}
    assert kinds == {"PretrainConfig", "MetaTrainConfig", "TuneConfig", "BenchmarkConfig", "OutcomesConfig", "FitPrunerConfig"}
    gpu = load_config(REPO / "jobs/configs/meta_train_resnet18_gpu.yaml", model=MetaTrainConfig)
    assert gpu.scaling.use_gpu and gpu.backbone == "resnet18"


def test_overrides_parse_yaml_values_and_nested_keys(meta_yaml: Path) -> None:
    cfg = load_config(meta_yaml, [
        "optim.kl_weight=1e-3",
        "episodes.ways=[2, 4]",
        "data.sources=blobs,stripes",
        "scaling.use_gpu=true",
        "fault_injection.step=3",
        "fault_injection.marker=/tmp/m",
        "fault_injection.rank=0",
    ], MetaTrainConfig)
    assert cfg.optim.lr == 0.01  # from the file
    assert cfg.optim.kl_weight == 1e-3
    assert cfg.episodes.ways == (2, 4)
    assert cfg.data.sources == ["blobs", "stripes"]
    assert cfg.scaling.use_gpu is True
    assert cfg.fault_injection is not None and cfg.fault_injection.step == 3


def test_override_keeps_sibling_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "kind: tune\nmeta_train: {backbone: small_cnn}\n")
    cfg = load_config(path, ["search.lr.low=0.001"], TuneConfig)
    assert cfg.search.lr is not None and (cfg.search.lr.low, cfg.search.lr.high) == (0.001, 0.01)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=-1", "optim.lr: Input should be greater than 0"),
        ("optim.lrr=1", "optim.lrr: Extra inputs are not permitted"),
        ("backbone=resnet9000", "backbone: unknown backbone 'resnet9000'"),
        ("episodes.ways=[5, 2]", "episodes.ways: ways must be [min, max]"),
        ("episodes.macs_ratio_range=[0, 1]", "episodes.macs_ratio_range:"),
        ("scaling.num_workers=two", "scaling.num_workers: Input should be a valid integer"),
        ("checkpoint_every=15", "checkpoint_every: 15 must be a multiple of report_every"),
        ("data.sources=[]", "data.sources: sources is empty"),
        ("data.max_open_streams=0", "data.max_open_streams: Input should be greater than or equal to 1"),
        ("data.sources=../etc", "data.sources: dataset name or pattern '../etc' is invalid"),
        ("storage_path=gs://bucket/x", "storage_path: storage_path scheme 'gs' is not supported"),
        ("mlflow.tracking_uri=http://user:pw@host:5000", "mlflow.tracking_uri: the URI embeds a password"),
        ("run_name=a/b", "run_name: run_name 'a/b' is invalid"),
        ("pruner.num_heads=3", "pruner.embed_dim: 128 must be a multiple of num_heads (3)"),
        ("fault_injection.step=2", "fault_injection.marker: Field required"),
    ],
)
def test_errors_name_the_key(meta_yaml: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(meta_yaml, [override], MetaTrainConfig)
    assert expected in str(err.value)
    assert str(meta_yaml) in str(err.value)  # and the file


def test_nested_errors_carry_the_full_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "kind: tune\nmeta_train: {backbone: small_cnn}\n")
    with pytest.raises(ConfigError, match=r"meta_train\.optim\.macs_weight: Input should be greater than or equal to 0"):
        load_config(path, ["meta_train.optim.macs_weight=-2"], TuneConfig)
    with pytest.raises(ConfigError, match=r"search\.lr\.low: a log range needs low > 0"):
        load_config(path, ["search.lr.low=0"], TuneConfig)
    with pytest.raises(ConfigError, match=r"scheduler\.grace_period: 500 exceeds meta_train\.steps"):
        load_config(path, ["scheduler.grace_period=500"], TuneConfig)


def test_every_error_is_reported_at_once(meta_yaml: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(meta_yaml, ["optim.lr=0", "steps=0"], MetaTrainConfig)
    assert "optim.lr:" in str(err.value) and "steps:" in str(err.value)


def test_kind_mismatch_and_inference(tmp_path: Path, meta_yaml: Path) -> None:
    with pytest.raises(ConfigError, match="kind: this is a 'meta_train' config, but a 'tune' config is expected"):
        load_config(meta_yaml, [], TuneConfig)
    assert isinstance(load_config(meta_yaml), MetaTrainConfig)
    with pytest.raises(ConfigError, match="kind: expected one of pretrain, meta_train, tune"):
        load_config(_write(tmp_path, "backbone: small_cnn\n", "nokind.yaml"))


@pytest.mark.parametrize("bad", ["lr", "=3", "a..b=1", "a.b-c=1", "x=[1,"])
def test_malformed_overrides(bad: str) -> None:
    with pytest.raises(ConfigError, match="override|not valid YAML"):
        parse_override(bad)


def test_override_through_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="optim: is a value, not a section"):
        apply_overrides({"optim": 3}, ["optim.lr=1"])


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n", "list.yaml"))


def test_storage_paths_are_normalised(tmp_path: Path) -> None:
    cfg = MetaTrainConfig(storage_path="s3://bucket/runs/")
    assert cfg.storage_path == "s3://bucket/runs"
    rel = PretrainConfig(storage_path="relative/dir")
    assert rel.storage_path is not None and Path(rel.storage_path).is_absolute()


def test_config_hash_ignores_run_length_but_not_the_method() -> None:
    a = MetaTrainConfig(backbone="small_cnn")
    b = MetaTrainConfig(backbone="small_cnn", steps=5000, run_name="other", storage_path="s3://b/p")
    c = MetaTrainConfig(backbone="small_cnn", optim={"kl_weight": 0.5})
    assert a.meta_config_hash() == b.meta_config_hash()
    assert a.meta_config_hash() != c.meta_config_hash()


def test_flat_params_are_strings_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    params = MetaTrainConfig(backbone="small_cnn").flat_params()
    assert params["optim.lr"] == "0.001" and params["episodes.ways"] == "[2, 10]"
    assert all(isinstance(v, str) for v in params.values())
    assert not any("s3cr3t" in v for v in params.values())


def test_job_entrypoint_fails_fast_naming_the_key(tmp_path: Path) -> None:
    """A bad value exits 2 with the key named, before Ray or S3 are touched (no cluster needed)."""
    cfg = REPO / "jobs" / "configs" / "meta_train_small.yaml"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "meta_train.py"), "--config", str(cfg), "optim.lr=-1"],
        capture_output=True, text=True, timeout=120,
        # An unreachable Ray address and S3 endpoint: any cluster work would hang or fail differently.
        env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "127.0.0.1:1", "STAMP_HOME": str(tmp_path),
             "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "optim.lr: Input should be greater than 0" in proc.stderr
    assert time.perf_counter() - t0 < 60


def test_episode_weighting_is_one_of_the_known_schemes() -> None:
    assert MetaTrainConfig(backbone="small_cnn").data.weighting == "uniform"
    assert MetaTrainConfig(backbone="small_cnn", data={"weighting": "base"}).data.weighting == "base"
    with pytest.raises(ValueError, match="weighting"):
        MetaTrainConfig(backbone="small_cnn", data={"weighting": "popular"})


def test_tune_refuses_to_search_what_the_template_objective_ignores() -> None:
    template = load_config(REPO / "jobs/configs/meta_train_tinyimagenet.yaml").model_dump(mode="json")
    with pytest.raises(ValueError, match=r"search.kl_weight: meta_train.optim \(objective 'deployed', deployed_gradient "
                                         r"'layer_es', inner_steps 2\) ignores kl_weight, macs_weight"):
        TuneConfig.model_validate({"meta_train": template})
    tuned = TuneConfig.model_validate({"meta_train": template, "search": {
        "kl_weight": None, "macs_weight": None, "es_sigma": {"low": 0.2, "high": 1.0}, "inner_lr": {"low": 1e-3, "high": 0.1}}})
    assert tuned.search.es_sigma.high == 1.0
    with pytest.raises(ValueError, match="search.es_sigma: .*ignores es_sigma"):
        TuneConfig.model_validate({"search": {"es_sigma": {"low": 0.2, "high": 1.0}}})
