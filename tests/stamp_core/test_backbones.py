"""Backbone registry: names, shapes, and MACs against torch-pruning and published figures."""

import pytest
import torch
import torch_pruning as tp

from stamp_core import build_backbone, count_macs_params, list_backbones

# Published CIFAR figures (MACs at 32x32, 10 classes) with a 3% tolerance.
KNOWN_MACS = {"resnet18": 0.556e9, "vgg19": 0.399e9, "resnet56": 0.125e9}


def test_registry_lists_all_backbones() -> None:
    assert list_backbones() == ["resnet18", "resnet20", "resnet56", "small_cnn", "vgg11", "vgg16", "vgg19"]


def test_unknown_backbone_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet1000'.*resnet18.*vgg19"):
        build_backbone("resnet1000", 10)


@pytest.mark.parametrize("name", list_backbones())
@pytest.mark.parametrize("size", [28, 32])
def test_forward_shapes(name: str, size: int) -> None:
    model = build_backbone(name, 7).eval()
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, model.feature_dim)


@pytest.mark.parametrize("name", list_backbones())
def test_macs_agree_with_torch_pruning(name: str) -> None:
    model = build_backbone(name, 10)
    macs, params = count_macs_params(model, (3, 32, 32))
    tp_macs, tp_params = tp.utils.count_ops_and_params(model, torch.randn(1, 3, 32, 32))
    # tp also counts BN/ReLU/pooling elementwise ops; conv+linear MACs dominate.
    assert macs == pytest.approx(tp_macs, rel=0.03)
    assert params == tp_params
    if name in KNOWN_MACS:
        assert macs == pytest.approx(KNOWN_MACS[name], rel=0.03)


def test_reset_classifier_updates_config() -> None:
    model = build_backbone("resnet20", 10)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.config["num_classes"] == 3
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_bad_class_count() -> None:
    with pytest.raises(ValueError, match="num_classes=0"):
        build_backbone("small_cnn", 0)
