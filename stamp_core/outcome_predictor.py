"""Which candidate mask will do best on this task? A ridge model of deployed outcomes.

Trained on an outcome table (for many source tasks: the task's features from one forward pass, and each
candidate's accuracy after the real fine-tune at several budgets), it predicts every candidate's accuracy
*relative to the mean over candidates* of the same task and budget, from the task's standardised features
``z`` and the budget ``r``::

    relative[c] = w_c . [1, r, r^2, z, z * r]

one weight vector per candidate, fitted in closed form; the budget terms are not penalised, the feature terms
by ``ridge``. With a large ``ridge`` (or the features of the average source task, ``z = 0``) it reduces to the
best *shared* candidate at each budget: adaptivity is what the feature terms add. Nothing here is learned by
gradient, so the model is small, exact to refit and cheap to evaluate (microseconds, against one forward pass
of the sample for the features). A task's features are clipped to the range seen in fitting first, so a task
unlike every source (say, 242 classes where sources had 5-20) gets the prediction of the nearest edge of the
table rather than a linear extrapolation; a budget outside the fitted ones is read as the nearest fitted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

_BUDGET_TERMS = 3  # 1, r, r^2


class OutcomePredictor(nn.Module):
    """Predicted relative accuracy of each of ``candidates`` from task features (named ``feature_names``).

    Args:
        candidates: the candidate mask names (stamp_core.candidates grammar), in output order.
        feature_names: names of the task features, in input order (stamp_core.candidates.FEATURE_NAMES).
    """

    def __init__(self, candidates: Sequence[str], feature_names: Sequence[str]) -> None:
        super().__init__()
        if not candidates or len(set(candidates)) != len(candidates):
            raise ValueError(f"candidates={list(candidates)}: expected one or more distinct names")
        if not feature_names or len(set(feature_names)) != len(feature_names):
            raise ValueError(f"feature_names={list(feature_names)}: expected one or more distinct names")
        self.candidates = list(candidates)
        self.feature_names = list(feature_names)
        n = len(self.feature_names)
        self.register_buffer("feature_mean", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("feature_scale", torch.ones(n, dtype=torch.float64))
        self.register_buffer("feature_low", torch.full((n,), -torch.inf, dtype=torch.float64))
        self.register_buffer("feature_high", torch.full((n,), torch.inf, dtype=torch.float64))
        self.register_buffer("budget_range", torch.tensor([0.0, 1.0], dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(len(self.candidates), _BUDGET_TERMS + 2 * n, dtype=torch.float64))

    def features_tensor(self, features: dict[str, float]) -> torch.Tensor:
        """The ``(F,)`` input of one task from its named features; KeyError names any missing one."""
        missing = [k for k in self.feature_names if k not in features]
        if missing:
            raise KeyError(f"task features lack {missing}: this predictor reads {self.feature_names}")
        return torch.tensor([float(features[k]) for k in self.feature_names], dtype=torch.float64)

    def _design(self, features: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        clipped = torch.minimum(torch.maximum(features.double(), self.feature_low), self.feature_high)
        z = (clipped - self.feature_mean) / self.feature_scale
        r = r.double().reshape(-1, 1).clamp(float(self.budget_range[0]), float(self.budget_range[1]))
        return torch.cat([torch.ones_like(r), r, r * r, z, z * r], dim=1)

    def forward(self, features: torch.Tensor, macs_ratio: float | torch.Tensor) -> torch.Tensor:
        """``(N, K)`` predicted accuracy relative to the candidates' mean for ``features`` ``(N, F)`` or ``(F,)``."""
        features = features.reshape(-1, len(self.feature_names))
        r = torch.as_tensor(macs_ratio, dtype=torch.float64).expand(len(features)) if torch.as_tensor(macs_ratio).ndim == 0 \
            else torch.as_tensor(macs_ratio, dtype=torch.float64)
        return self._design(features, r) @ self.weight.T

    def rank(self, features: torch.Tensor, macs_ratio: float) -> list[str]:
        """Candidate names of one task, best predicted first."""
        scores = self.forward(features, macs_ratio)[0]
        return [self.candidates[i] for i in torch.argsort(scores, descending=True, stable=True).tolist()]

    @classmethod
    def fit(cls, features: torch.Tensor, macs_ratio: torch.Tensor, relative: torch.Tensor, candidates: Sequence[str],
            feature_names: Sequence[str], ridge: float = 10.0) -> "OutcomePredictor":
        """Closed-form ridge fit.

        Args:
            features: ``(N, F)`` task features, one row per (task, budget) observation.
            macs_ratio: ``(N,)`` the budget of each observation.
            relative: ``(N, K)`` each candidate's accuracy minus the mean over candidates (same task, budget).
            candidates, feature_names: as in the constructor.
            ridge: penalty on the feature terms, per observation (the budget terms are not penalised).
        """
        if features.ndim != 2 or relative.shape != (len(features), len(candidates)) or macs_ratio.shape != (len(features),):
            raise ValueError(f"shapes: features {tuple(features.shape)}, macs_ratio {tuple(macs_ratio.shape)}, relative "
                             f"{tuple(relative.shape)}: expected (N, F), (N,), (N, {len(candidates)})")
        if len(features) < 2:
            raise ValueError("fit needs at least two observations")
        if ridge < 0:
            raise ValueError(f"ridge={ridge}: expected >= 0")
        model = cls(candidates, feature_names)
        x = features.double()
        model.feature_mean.copy_(x.mean(0))
        model.feature_scale.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
        model.feature_low.copy_(x.amin(0))
        model.feature_high.copy_(x.amax(0))
        model.budget_range.copy_(torch.stack([macs_ratio.double().min(), macs_ratio.double().max()]))
        design = model._design(x, macs_ratio)
        penalty = torch.full((design.shape[1],), float(ridge) * len(x), dtype=torch.float64)
        penalty[:_BUDGET_TERMS] = 1e-9 * len(x)  # the shared, budget-only part stays free
        gram = design.T @ design + torch.diag(penalty)
        model.weight.copy_(torch.linalg.solve(gram, design.T @ relative.double()).T)
        return model
