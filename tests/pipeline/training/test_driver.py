"""Tests for pipeline.training.driver: which config locations travel to other Ray nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.training.driver import check_locations_reach_every_node, node_local_locations, scaling_config, torch_config
from tests.pipeline.training._jobs import tiny_meta_config

S3 = {"storage_path": "s3://b/ray", "mlflow": {"enabled": True, "tracking_uri": "http://127.0.0.1:5000"}}


def test_s3_and_http_locations_pass_on_any_cluster() -> None:
    cfg = tiny_meta_config("s3://b/datasets/catalog.json", pretrained="s3://b/pre", **S3)
    assert node_local_locations(cfg) == {}
    check_locations_reach_every_node(cfg, nodes=5)


def test_every_local_location_is_named_on_a_multi_node_cluster(tmp_path: Path) -> None:
    cfg = tiny_meta_config(str(tmp_path / "catalog.json"), storage_path=str(tmp_path / "ray"), pretrained=str(tmp_path),
                           mlflow={"enabled": True, "tracking_uri": f"sqlite:///{tmp_path}/m.db"})
    assert set(node_local_locations(cfg)) == {"storage_path", "data.catalog_url", "pretrained", "mlflow.tracking_uri"}
    check_locations_reach_every_node(cfg, nodes=1)  # one node: every worker shares the disk
    with pytest.raises(ConfigError) as err:
        check_locations_reach_every_node(cfg, nodes=2)
    msg = str(err.value)
    assert msg.startswith("storage_path, data.catalog_url, pretrained, mlflow.tracking_uri: node-local location(s)")
    assert "this Ray cluster has 2 nodes" in msg and f"storage_path: {tmp_path / 'ray'}" in msg
    assert "storage_path=s3://BUCKET/ray_results" in msg


def test_strict_spread_counts_as_multi_node_even_before_the_nodes_exist(tmp_path: Path) -> None:
    cfg = tiny_meta_config("s3://b/datasets/catalog.json", storage_path=str(tmp_path / "ray"),
                           scaling={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"}, mlflow={"enabled": False})
    with pytest.raises(ConfigError, match=r"^storage_path: .*scaling.placement_strategy=STRICT_SPREAD"):
        check_locations_reach_every_node(cfg, nodes=1)
    one = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 1})})
    check_locations_reach_every_node(one, nodes=1)


def test_scaling_config_carries_the_placement_strategy() -> None:
    cfg = tiny_meta_config("s3://b/c.json", scaling={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"})
    sc = scaling_config(cfg)
    assert (sc.num_workers, sc.placement_strategy) == (2, "STRICT_SPREAD")
    with pytest.raises(ValueError, match="placement_strategy"):
        tiny_meta_config("s3://b/c.json", scaling={"placement_strategy": "EVERYWHERE"})


def test_gpu_runs_use_nccl_and_cpu_runs_gloo() -> None:
    cpu = tiny_meta_config("s3://b/c.json")
    gpu = tiny_meta_config("s3://b/c.json", scaling={"use_gpu": True})
    assert torch_config(cpu).backend == "gloo"
    assert torch_config(gpu).backend == "nccl"
    assert scaling_config(gpu).use_gpu and scaling_config(gpu).resources_per_worker["GPU"] == 1


def test_the_benchmark_takes_device_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from tests.benchmarks.bench_meta_train import parse_args

    assert parse_args(["--precision", "bf16"]).device == "cpu"
    if torch.cuda.is_available():
        assert parse_args(["--device", "cuda"]).device == "cuda"
        return
    with pytest.raises(SystemExit) as exit_info:  # accepted, then refused because no GPU is visible
        parse_args(["--device", "cuda", "--precision", "bf16"])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA device is visible to torch" in capsys.readouterr().err


def test_source_patterns_pick_one_suite_out_of_a_shared_catalog(local_catalog: str) -> None:
    from pipeline.data import Catalog
    from pipeline.training.driver import resolve_sources

    catalog = Catalog.load(local_catalog)
    names = catalog.names()
    first = names[0].split("-")[0]
    assert resolve_sources("all", catalog) == names
    assert resolve_sources([f"{first}*"], catalog) == sorted(n for n in names if n.startswith(first))
    # a name and a pattern that also matches it: drawn once, in the order given
    assert resolve_sources([names[-1], "*"], catalog) == [names[-1]] + [n for n in names if n != names[-1]]
    with pytest.raises(ConfigError, match="pattern 'nothing-\\*' matches no dataset"):
        resolve_sources(["nothing-*"], catalog)


def test_a_source_pattern_is_a_valid_config_and_a_bad_one_is_not(tmp_path: Path) -> None:
    assert tiny_meta_config(str(tmp_path / "c.json"), data={"sources": ["tin-*", "mnist-c0-?"]}).data.sources == ["tin-*", "mnist-c0-?"]
    with pytest.raises(Exception, match="dataset name or pattern"):
        tiny_meta_config(str(tmp_path / "c.json"), data={"sources": ["../*"]})
