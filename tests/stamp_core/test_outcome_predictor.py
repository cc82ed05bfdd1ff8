"""stamp_core.outcome_predictor: the ridge model of deployed outcomes that picks a candidate per task."""

from __future__ import annotations

import pytest
import torch

from stamp_core.outcome_predictor import OutcomePredictor

CANDIDATES = ["l1", "uniform", "tilt+1"]
FEATURES = ["colourfulness", "noise"]


def _table(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colourful tasks favour l1, grey ones uniform; tilt+1 is never best; a noise feature means nothing."""
    gen = torch.Generator().manual_seed(seed)
    colour = (torch.rand(n, generator=gen) > 0.5).double()
    feats = torch.stack([colour * 0.3, torch.randn(n, generator=gen, dtype=torch.float64)], 1)
    r = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)[torch.randint(0, 4, (n,), generator=gen)]
    acc = torch.stack([60 + 8 * colour, 64 - 2 * colour, 55 + 0 * colour], 1) + torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return feats, r, acc - acc.mean(1, keepdim=True)


def test_it_learns_which_feature_decides_and_ranks_per_task() -> None:
    feats, r, rel = _table()
    model = OutcomePredictor.fit(feats, r, rel, CANDIDATES, FEATURES, ridge=0.01)
    grey, colourful = torch.tensor([0.0, 0.0]), torch.tensor([0.3, 0.0])
    assert model.rank(grey, 0.3)[0] == "uniform" and model.rank(colourful, 0.3)[0] == "l1"
    assert model.rank(grey, 0.3)[-1] == model.rank(colourful, 0.7)[-1] == "tilt+1"
    assert model(torch.stack([grey, colourful]), torch.tensor([0.3, 0.5])).shape == (2, 3)


def test_features_outside_the_fitted_range_are_clipped_to_its_edge() -> None:
    feats, r, rel = _table()
    model = OutcomePredictor.fit(feats, r, rel, CANDIDATES, FEATURES, ridge=0.01)
    edge, far = torch.tensor([0.3, 0.0]), torch.tensor([30.0, 0.0])  # colourfulness 100x the largest seen
    assert torch.equal(model(far, 0.3), model(edge, 0.3))
    assert model.rank(far, 0.3)[0] == "l1"
    assert torch.equal(model(edge, 0.95), model(edge, 0.7)) and torch.equal(model(edge, 0.01), model(edge, 0.1))


def test_a_large_penalty_leaves_the_shared_choice() -> None:
    feats, r, rel = _table()
    shared = OutcomePredictor.fit(feats, r, rel, CANDIDATES, FEATURES, ridge=1e6)
    # Half the tasks are colourful: on average l1 (64) beats uniform (63); the features no longer matter.
    assert shared.rank(torch.tensor([0.0, 0.0]), 0.3)[0] == shared.rank(torch.tensor([0.3, 3.0]), 0.3)[0] == "l1"


def test_it_round_trips_through_its_state_dict_and_reads_named_features() -> None:
    feats, r, rel = _table()
    model = OutcomePredictor.fit(feats, r, rel, CANDIDATES, FEATURES, ridge=1.0)
    copy = OutcomePredictor(CANDIDATES, FEATURES)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy(feats, r), model(feats, r))
    x = model.features_tensor({"noise": 1.0, "colourfulness": 0.2, "extra": 5.0})
    assert x.tolist() == [0.2, 1.0]
    with pytest.raises(KeyError, match=r"task features lack \['noise'\]"):
        model.features_tensor({"colourfulness": 0.2})


def test_bad_input_is_refused() -> None:
    feats, r, rel = _table(10)
    with pytest.raises(ValueError, match=r"expected \(N, F\), \(N,\), \(N, 2\)"):
        OutcomePredictor.fit(feats, r, rel, CANDIDATES[:2], FEATURES)
    with pytest.raises(ValueError, match="ridge=-1: expected >= 0"):
        OutcomePredictor.fit(feats, r, rel, CANDIDATES, FEATURES, ridge=-1)
    with pytest.raises(ValueError, match="distinct names"):
        OutcomePredictor(["l1", "l1"], FEATURES)
