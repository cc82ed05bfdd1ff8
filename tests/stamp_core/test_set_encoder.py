"""Set encoder: permutation invariance, any class count, masked padding, label-free mode."""

import pytest
import torch

from stamp_core import SetEncoder


@pytest.fixture(scope="module")
def encoder() -> SetEncoder:
    torch.manual_seed(0)
    return SetEncoder(feature_dim=64).eval()


@pytest.mark.parametrize("num_classes", [2, 3, 5, 10, 20])
def test_permutation_invariance_any_class_count(encoder: SetEncoder, num_classes: int) -> None:
    gen = torch.Generator().manual_seed(num_classes)
    labels = torch.arange(num_classes).repeat_interleave(7)
    feats = torch.randn(len(labels), 64, generator=gen)
    perm = torch.randperm(len(labels), generator=gen)
    with torch.no_grad():
        a = encoder(feats, labels)
        b = encoder(feats[perm], labels[perm])
    assert a.shape == (128,)
    assert (a - b).abs().max().item() < 1e-5


def test_relabelling_classes_does_not_change_embedding(encoder: SetEncoder) -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat(5)
    feats = torch.randn(20, 64, generator=gen)
    relabel = torch.tensor([3, 0, 2, 1])
    with torch.no_grad():
        assert (encoder(feats, labels) - encoder(feats, relabel[labels] + 10)).abs().max() < 1e-5


def test_unequal_class_sizes_padding_is_masked(encoder: SetEncoder) -> None:
    """Padding must not act like extra zero-feature images: the embedding of an unbalanced set
    equals the one computed class by class with no padding at all."""
    gen = torch.Generator().manual_seed(2)
    labels = torch.tensor([0] * 9 + [1] * 2 + [2] * 5)
    feats = torch.randn(len(labels), 64, generator=gen)
    with torch.no_grad():
        got = encoder(feats, labels)
        x = encoder.input(feats)
        protos = torch.cat([encoder.within(x[labels == c].unsqueeze(0)) for c in range(3)])
        expected = encoder.out(encoder.across(protos.unsqueeze(0))[0])
    assert (got - expected).abs().max().item() < 1e-5


def test_label_free_mode_is_permutation_invariant(encoder: SetEncoder) -> None:
    feats = torch.randn(50, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = encoder(feats)
        b = encoder(feats.flip(0))
    assert (a - b).abs().max().item() < 1e-5
    assert not torch.allclose(a, encoder(feats, torch.arange(50) % 5))


def test_embedding_depends_on_the_set(encoder: SetEncoder) -> None:
    gen = torch.Generator().manual_seed(4)
    labels = torch.arange(3).repeat(5)
    with torch.no_grad():
        a = encoder(torch.randn(15, 64, generator=gen), labels)
        b = encoder(torch.randn(15, 64, generator=gen) + 3.0, labels)
    assert (a - b).norm() > 1e-2
