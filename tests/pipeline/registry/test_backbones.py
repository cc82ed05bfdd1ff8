"""pipeline.registry.backbones: the reference-backbone folder and its MLflow models, on a real MLflow server."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.registry.backbones import (
    BackboneManifestError,
    add_backbone,
    get_entry,
    load_backbone,
    load_reference_backbone,
    load_registered_backbone,
    read_manifest,
    register_backbones,
)
from pipeline.training import LocalContext, build_pruner, prepare_pretrain, pretrain_worker
from tests.pipeline.training._jobs import ingest_sources, tiny_meta_config

REPO = Path(__file__).resolve().parents[3]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(run directory, the command that made it, catalog URL) of a 2-epoch small_cnn pretraining."""
    root = tmp_path_factory.mktemp("bb")
    catalog = ingest_sources(str(root / "data"))
    config = root / "pretrain.yaml"
    config.write_text(f"kind: pretrain\nbackbone: small_cnn\nbackbone_kwargs: {{width: 8}}\nepochs: 2\nbatch_size: 32\n"
                      f"eval_samples: 20\ndata: {{catalog_url: {catalog}, sources: all}}\nmlflow: {{enabled: false}}\n")
    command = f"python jobs/pretrain.py --config {config} run_name=bb-test"
    cfg = load_config(config, ["run_name=bb-test"])  # what the command resolves to
    cfg, setup, labels, _ = prepare_pretrain(cfg)
    pretrain_worker(cfg, LocalContext(root / "run"), setup, labels)
    return root / "run", command, catalog


def test_add_records_digests_curve_recipe_and_data(pretrained_run: tuple[Path, str, str], tmp_path: Path) -> None:
    run, command, _ = pretrained_run
    entry = add_backbone(run, "tiny-procedural", command, folder=tmp_path)
    assert entry.epochs == 2 and len(entry.curve) == 2 and entry.val_top1 == entry.curve[-1]
    assert entry.command == command and entry.recipe["run_name"] == "bb-test" and entry.recipe["epochs"] == 2
    assert sorted(entry.sha256) == ["tiny-procedural.json", "tiny-procedural.pt"]
    assert all(len(d["content_sha256"]) == 64 for d in entry.datasets) and len(entry.datasets) == 2
    assert read_manifest(tmp_path) == [entry]
    from pipeline.data import load_backbone_dir

    assert _same(load_reference_backbone("tiny-procedural", tmp_path), load_backbone_dir(run / "checkpoint_00000002"))
    # adding again under the same name replaces the entry instead of listing it twice
    add_backbone(run, "tiny-procedural", command, folder=tmp_path, notes="again")
    assert [e.notes for e in read_manifest(tmp_path)] == ["again"]


def test_a_changed_file_or_an_unknown_name_is_refused(pretrained_run: tuple[Path, str, str], tmp_path: Path) -> None:
    run, command, _ = pretrained_run
    add_backbone(run, "tiny", command, folder=tmp_path)
    weights = tmp_path / "tiny.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BackboneManifestError, match="tiny.pt has sha256 .* the manifest records"):
        load_reference_backbone("tiny", tmp_path)
    with pytest.raises(BackboneManifestError, match="no backbone 'other' .* known: tiny"):
        get_entry("other", tmp_path)
    with pytest.raises(BackboneManifestError, match="not a pretrain config"):
        add_backbone(run, "x", "python jobs/meta_train.py --config jobs/configs/meta_train_small.yaml", folder=tmp_path)


@pytest.mark.integration
def test_register_then_load_by_alias_and_meta_train_from_it(pretrained_run: tuple[Path, str, str], tmp_path: Path,
                                                            mlflow_server: str) -> None:
    run, command, catalog = pretrained_run
    name = f"tiny-{secrets.token_hex(3)}"
    add_backbone(run, name, command, folder=tmp_path)
    [uri] = register_backbones(folder=tmp_path, tracking_uri=mlflow_server)
    assert uri == f"models:/stamp-backbone-{name}/1"
    local = load_reference_backbone(name, tmp_path)
    assert _same(load_registered_backbone(f"models:/stamp-backbone-{name}@champion", mlflow_server), local)
    assert _same(load_backbone(uri, mlflow_server), local)

    from mlflow import MlflowClient

    mv = MlflowClient(mlflow_server).get_model_version_by_alias(f"stamp-backbone-{name}", "champion")
    assert mv.tags["stamp.kind"] == "backbone" and mv.tags["lineage.command"] == command
    assert float(mv.tags["metric.val_top1"]) == pytest.approx(get_entry(name, tmp_path).val_top1, abs=1e-6)
    assert mv.tags["lineage.dataset_sha256"].count(",") == 1  # both sources

    meta = tiny_meta_config(catalog, pretrained=f"models:/stamp-backbone-{name}@champion",
                            mlflow={"enabled": False, "tracking_uri": mlflow_server})
    assert _same(build_pruner(meta).backbone, local)


def test_the_committed_reference_backbones_load_and_match_their_manifest() -> None:
    from pipeline.registry.backbones import BACKBONES_DIR, verify_entry

    entries = read_manifest(BACKBONES_DIR)
    assert entries, "backbones/manifest.json lists no reference backbone"
    for entry in entries:
        verify_entry(entry, BACKBONES_DIR)
        net = load_reference_backbone(entry.name)
        assert dict(net.config) == entry.architecture
        assert entry.val_top1 == entry.curve[-1] and len(entry.curve) == entry.epochs
        assert entry.command.startswith("python jobs/pretrain.py --config ") and len(entry.commit) == 40
        assert all(len(d["content_sha256"]) == 64 for d in entry.datasets)
