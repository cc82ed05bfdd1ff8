"""stamp_core: the STAMP algorithm (Set-based Task-Adaptive Meta-Pruning) in plain PyTorch.

Depends on PyTorch and torch-pruning only: no Ray, MLflow, S3 or CLI code lives here.
"""

from stamp_core.prune import (
    PruneResult,
    build_pruned_model,
    build_task_model,
    default_finetune,
    load_pruned_model,
    prune_and_finetune,
    prune_for_task,
    recalibrate_batchnorm,
)
from stamp_core.channel_generator import ChannelMaskGenerator, TaskSummary, channel_statistics
from stamp_core.backbones import MIN_IMAGE_SIZE, Backbone, build_backbone, build_backbone_from_config, list_backbones, task_classes
from stamp_core.groups import ChannelGates, ChannelGroup, PrunableStructure, analyze_structure, count_macs_params
from stamp_core.mask_generator import MaskGenerator, kl_kumaraswamy_beta, kumaraswamy_mean, kumaraswamy_sample, relaxed_bernoulli
from stamp_core.meta import Episode, MetaConfig, budget_neutral_gradient, episode_loss, layer_es_surrogate, frozen_norm_statistics, make_optimizer, meta_batch_loss, meta_train_step, prototype_head, task_summary
from stamp_core.preprocess import prepare_images
from stamp_core.pruner import PrunerConfig, StampPruner, __version__, calibrate_masks, spec_from_kept
from stamp_core.set_encoder import ISAB, MAB, PMA, SAB, SetEncoder
from stamp_core.spec import PruneSpec, SpecMismatchError, jaccard_distance
from stamp_core.supervised import TrainConfig, evaluate_accuracy, init_classifier_from_prototypes, measure_latency, random_crop_flip, random_shift, torch_threads, train_classifier

__all__ = [
    "PruneResult", "build_pruned_model", "build_task_model", "default_finetune", "load_pruned_model", "prune_and_finetune", "prune_for_task", "recalibrate_batchnorm",
    "ChannelMaskGenerator", "TaskSummary", "channel_statistics",
    "MIN_IMAGE_SIZE", "Backbone", "build_backbone", "build_backbone_from_config", "list_backbones", "task_classes",
    "ChannelGates", "ChannelGroup", "PrunableStructure", "analyze_structure", "count_macs_params",
    "MaskGenerator", "kl_kumaraswamy_beta", "kumaraswamy_mean", "kumaraswamy_sample", "relaxed_bernoulli",
    "Episode", "MetaConfig", "budget_neutral_gradient", "episode_loss", "layer_es_surrogate", "frozen_norm_statistics", "make_optimizer", "meta_batch_loss", "meta_train_step",
    "prototype_head", "task_summary",
    "prepare_images", "PrunerConfig", "StampPruner", "__version__", "calibrate_masks", "spec_from_kept",
    "ISAB", "MAB", "PMA", "SAB", "SetEncoder", "PruneSpec", "SpecMismatchError", "jaccard_distance",
    "TrainConfig", "evaluate_accuracy", "init_classifier_from_prototypes", "measure_latency", "random_crop_flip", "random_shift", "torch_threads", "train_classifier",
]
