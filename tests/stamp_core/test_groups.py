"""``count_macs_params`` against torch-pruning's ``count_ops_and_params`` on every registered backbone.

The two agree on what both count, and every difference is one this test names:

* parameters: identical;
* MACs of conv and linear layers: torch-pruning also counts the classifier's bias additions (one per
  output, ``num_classes`` in all; the backbones' convolutions have no bias), ours leaves them out,
  because the spec's MAC budget (:class:`stamp_core.PrunableStructure` costs) counts the same
  products as we do and a pruned model's count must equal ``spec.macs_pruned`` exactly;
* total: torch-pruning adds the elementwise layers (norms, activations, poolings), which ours
  leaves out by definition (the figures quoted for CIFAR networks count conv and linear products).
"""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from stamp_core import build_backbone, count_macs_params, list_backbones

SHAPE = (3, 32, 32)
NUM_CLASSES = 10


@pytest.mark.parametrize("name", list_backbones())
def test_macs_and_params_match_torch_pruning(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=NUM_CLASSES).eval()
    macs, params = count_macs_params(model, SHAPE)
    tp_macs, tp_params, layer_macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, *SHAPE), layer_wise=True)

    assert params == tp_params
    costed = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    bias_adds = sum(m.out_features for m in costed if isinstance(m, nn.Linear) and m.bias is not None)
    assert not any(m.bias is not None for m in costed if isinstance(m, nn.Conv2d))  # else their count adds those too
    assert sum(layer_macs[m] for m in costed) == macs + bias_adds
    elementwise = sum(v for m, v in layer_macs.items() if isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                                                                          nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)))
    assert tp_macs == macs + bias_adds + elementwise


def test_count_macs_params_refuses_a_batch_shape() -> None:
    with pytest.raises(ValueError, match="expected \\(C, H, W\\) of one image"):
        count_macs_params(build_backbone("small_cnn", num_classes=2), (1, *SHAPE))
