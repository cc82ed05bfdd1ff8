"""The method sections are stamp_core's dataclasses plus bounds: nothing is declared twice, drift is an error."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import ConfigError, MetaTrainConfig, OptimSection, PrunerSection, load_config, section_from_dataclass
from stamp_core import MetaConfig, PrunerConfig
from stamp_core.meta import OBJECTIVES

OPTIMISER_KEYS = {"lr", "backbone_lr", "weight_decay", "grad_clip"}
#: set by the job, or (candidates) used only by the outcome generator, which is fitted, not meta-trained
SET_BY_THE_JOB = {"backbone", "image_size", "support_per_class", "max_support", "version", "metadata", "candidates"}


def _defaults(dc: type) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(dc) if f.default is not dataclasses.MISSING}


def test_optim_section_is_meta_config_plus_the_optimiser() -> None:
    meta = {f.name for f in dataclasses.fields(MetaConfig)}
    assert set(OptimSection.model_fields) == meta | OPTIMISER_KEYS
    section = OptimSection()
    assert {k: getattr(section, k) for k in meta} == _defaults(MetaConfig)
    assert section.meta_config() == MetaConfig()
    tuned = OptimSection(objective="deployed", deployed_gradient="layer_es", es_pairs=2)
    assert tuned.meta_config() == MetaConfig(objective="deployed", deployed_gradient="layer_es", es_pairs=2)


def test_pruner_section_is_pruner_config_less_what_the_job_sets() -> None:
    fields = {f.name for f in dataclasses.fields(PrunerConfig)}
    assert set(PrunerSection.model_fields) == fields - SET_BY_THE_JOB
    defaults = _defaults(PrunerConfig)
    assert PrunerSection().model_dump() == {k: defaults[k] for k in PrunerSection.model_fields}


def test_variant_names_and_bounds_are_enforced_with_the_key_named(tmp_path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text("kind: meta_train\nbackbone: small_cnn\n")
    with pytest.raises(ConfigError, match="optim.objective: Input should be 'relaxed' or 'deployed'"):
        load_config(cfg, ["optim.objective=hard"])
    with pytest.raises(ConfigError, match="optim.es_pairs: Input should be less than or equal to 64"):
        load_config(cfg, ["optim.es_pairs=65"])
    with pytest.raises(ConfigError, match="pruner.embed_dim: 30 must be a multiple of num_heads \\(4\\)"):
        load_config(cfg, ["pruner.embed_dim=30"])
    deployed = load_config(cfg, ["optim.objective=deployed", "optim.deployed_gradient=layer_es"], MetaTrainConfig)
    assert deployed.optim.objective == OBJECTIVES[1]


def test_options_the_objective_ignores_and_losing_variants_are_refused(tmp_path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text("kind: meta_train\nbackbone: small_cnn\n")
    es = ["optim.objective=deployed", "optim.deployed_gradient=layer_es"]
    with pytest.raises(ConfigError, match="optim.kl_weight: objective 'deployed' with deployed_gradient 'layer_es' ignores kl_weight, macs_weight"):
        load_config(cfg, [*es, "optim.kl_weight=0.01", "optim.macs_weight=5"])
    with pytest.raises(ConfigError, match="optim.es_sigma: objective 'relaxed' .* ignores es_sigma"):
        load_config(cfg, ["optim.es_sigma=1.0"])
    with pytest.raises(ConfigError, match="optim.deployed_gradient: 'plain' lost to 'layer_es'.*experimental: true"):
        load_config(cfg, ["optim.objective=deployed"])
    with pytest.raises(ConfigError, match="pruner.task_norm: 'running' .v1. lost to 'batch'"):
        load_config(cfg, ["pruner.task_norm=running"])
    old = load_config(cfg, ["optim.objective=deployed", "optim.deployed_macs_penalty=true", "optim.macs_weight=5",
                            "experimental=true"], MetaTrainConfig)
    assert old.optim.deployed_gradient == "plain" and old.optim.deployed_macs_penalty
    # a dump read back (what Ray workers and Tune trials receive) names every field and is still valid
    assert MetaTrainConfig.model_validate(load_config(cfg, [*es, "optim.es_pairs=2"]).model_dump(mode="json"))


def test_a_section_naming_a_field_the_dataclass_lacks_is_refused() -> None:
    """When stamp_core renames a field, building the section fails at import instead of drifting."""
    with pytest.raises(TypeError, match=r"OptimSection: \['kl_wieght'\] are not fields of MetaConfig"):
        section_from_dataclass("OptimSection", MetaConfig, "x", bounds={"kl_wieght": {"ge": 0}})
    built = section_from_dataclass("S", MetaConfig, "doc", bounds={"kl_weight": {"ge": 0}}, exclude=("precision",))
    assert "precision" not in built.model_fields and built.__doc__ == "doc"
    with pytest.raises(ValueError, match="kl_weight"):
        built(kl_weight=-1.0)
