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


def test_task_standardize_keeps_the_spread_between_tasks_whatever_its_size() -> None:
    """A meta-batch is centred on its own mean and scaled by its own spread, gradient flowing: tasks
    whose embeddings nearly coincide (v1's collapse) still reach the generator at unit spread."""
    from stamp_core.mask_generator import TaskStandardize

    torch.manual_seed(0)
    shared, diff = torch.randn(16) * 50, torch.randn(4, 16)
    norm = TaskStandardize(16)
    outs = [norm(shared + eps * diff) for eps in (1.0, 1e-2)]  # 100x closer together
    assert torch.allclose(outs[0], outs[1], atol=1e-2)
    assert outs[0].pow(2).mean().item() == pytest.approx(1.0, abs=1e-3)
    assert outs[0].mean(0).abs().max().item() < 1e-5
    x = (shared + diff).requires_grad_(True)
    norm(x)[0, 0].backward()  # the batch statistics are part of the graph
    assert x.grad[1:].abs().sum() > 0
    norm.eval()
    before = norm.running_mean.clone()
    single = norm(shared + diff[0])
    assert torch.equal(norm.running_mean, before) and single.shape == (16,)


def test_generator_takes_a_meta_batch() -> None:
    torch.manual_seed(0)
    gen = MaskGenerator([8, 16], embed_dim=32, task_norm="batch", zero_init_heads=False)
    params = gen(torch.randn(3, 32), torch.tensor([0.2, 0.5, 0.9]))
    assert [tuple(a.shape) for a, _ in params] == [(3, 8), (3, 16)]
    assert not torch.allclose(params[0][0][0], params[0][0][1])
    gen.eval()
    (a, b), _ = gen(torch.randn(32), 0.5)
    assert a.shape == b.shape == (8,)
    with pytest.raises(ValueError, match="task_norm='layer': expected one of batch, running"):
        MaskGenerator([8], embed_dim=32, task_norm="layer")
