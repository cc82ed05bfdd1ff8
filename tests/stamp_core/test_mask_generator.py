"""Closed forms of the Kumaraswamy posterior against Monte Carlo estimates.

Tolerances: with n = 400k samples the Monte Carlo mean has standard error sd/sqrt(n); we accept
|closed - MC| <= 5 standard errors (a false failure has probability ~6e-7 per check), plus 1e-4 for
float32 rounding of the sample sums.
"""

import math

import pytest
import torch

from stamp_core import MaskGenerator, kl_kumaraswamy_beta, kumaraswamy_mean, kumaraswamy_sample, relaxed_bernoulli

N = 400_000
CASES = [(0.5, 0.5), (0.8, 2.0), (2.13, 1.0), (3.0, 0.7), (1.0, 3.0)]


def _tolerance(samples: torch.Tensor) -> float:
    return 5.0 * samples.std().item() / math.sqrt(len(samples)) + 1e-4


@pytest.mark.parametrize("a,b", CASES)
def test_mean_matches_monte_carlo(a: float, b: float) -> None:
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(N, generator=gen, dtype=torch.float64)
    pi = kumaraswamy_sample(torch.full((N,), a, dtype=torch.float64), torch.full((N,), b, dtype=torch.float64), u)
    closed = kumaraswamy_mean(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).item()
    assert abs(pi.mean().item() - closed) <= _tolerance(pi)


@pytest.mark.parametrize("alpha", [1e-4, 0.5, 1.0])
@pytest.mark.parametrize("a,b", CASES)
def test_kl_matches_monte_carlo(a: float, b: float, alpha: float) -> None:
    """KL = E_q[log q(pi) - log p(pi)] with q = Kumaraswamy(a, b), p = Beta(alpha, 1)."""
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(N, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    pi = (1 - u.pow(1 / b)).pow(1 / a)  # exact inverse CDF in float64 (no clamping bias)
    log_q = math.log(a * b) + (a - 1) * pi.log() + (b - 1) * torch.log1p(-pi.pow(a))
    log_p = math.log(alpha) + (alpha - 1) * pi.log()
    samples = log_q - log_p
    closed = kl_kumaraswamy_beta(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), alpha).item()
    assert abs(samples.mean().item() - closed) <= _tolerance(samples)


def test_kl_is_zero_only_when_posterior_equals_prior() -> None:
    # Kumaraswamy(1, 1) == Beta(1, 1) == Uniform.
    assert kl_kumaraswamy_beta(torch.tensor(1.0), torch.tensor(1.0), 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_kumaraswamy_beta(torch.tensor(2.0), torch.tensor(1.0), 1.0).item() > 0.1


def test_relaxed_bernoulli_approaches_bernoulli_at_low_temperature() -> None:
    gen = torch.Generator().manual_seed(2)
    pi = torch.full((200_000,), 0.3)
    z = relaxed_bernoulli(pi, 0.01, torch.rand(200_000, generator=gen))
    assert ((z < 0.01) | (z > 0.99)).float().mean() > 0.97
    assert z.mean().item() == pytest.approx(0.3, abs=0.01)


def test_generator_starts_at_base_posterior_and_depends_on_budget() -> None:
    torch.manual_seed(0)
    gen = MaskGenerator([8, 16], embed_dim=32)
    s = torch.randn(32)
    (a, b), _ = gen(s, 0.5)
    assert a.shape == (8,)
    assert a.mean().item() == pytest.approx(math.log1p(math.exp(2.0)), abs=0.2)
    assert b.mean().item() == pytest.approx(1.0, abs=0.2)
    a2, _ = gen(s, 0.1)[0]
    assert not torch.allclose(a, a2)


def test_running_standardize_removes_what_all_tasks_share() -> None:
    """Embeddings are measured against the running task mean; statistics move in training only."""
    from stamp_core.mask_generator import RunningStandardize

    std = RunningStandardize(4, momentum=0.01)
    shared = torch.tensor([5.0, -3.0, 2.0, 10.0])
    task_a, task_b = shared + torch.tensor([1.0, 0, 0, 0]), shared - torch.tensor([1.0, 0, 0, 0])
    std.train()
    for _ in range(50):
        std(task_a), std(task_b)
    std.eval()
    before = std.running_mean.clone()
    out_a, out_b = std(task_a), std(task_b)
    assert torch.equal(std.running_mean, before)  # eval never updates
    # The shared part is gone: the two tasks come out as (about) +-1 standard deviation in dim 0.
    assert torch.allclose(std.running_mean, shared, atol=0.05)
    assert out_a[0] == pytest.approx(1.0, abs=0.1) and out_b[0] == pytest.approx(-1.0, abs=0.1)
    assert torch.allclose(out_a[1:], torch.zeros(3), atol=1e-2)
    assert int(std.num_tasks) == 100
