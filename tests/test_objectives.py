"""V*, the A*-PO loss and masking, against closed forms, hand computations and loops."""

import math

import pytest
import torch

from apo_core.objectives import apo_loss, masked_mean, masked_sum, vstar

PAPER_VSTAR = [0, 0.294, 0.477, 0.611, 0.717, 0.804, 0.878, 0.943, 1.0]


def binary_rewards(k: int, n: int = 8) -> torch.Tensor:
    return torch.tensor([[1.0] * k + [0.0] * (n - k)])


@pytest.mark.parametrize("k", range(9))
def test_vstar_binary_closed_form(k):
    got = vstar(binary_rewards(k), beta1=0.5).item()
    assert got == pytest.approx(0.5 * math.log((k * math.e**2 + 8 - k) / 8), abs=1e-12)
    assert got == pytest.approx(PAPER_VSTAR[k], abs=5e-4)


def test_vstar_small_beta1_tends_to_max():
    r = torch.tensor([[0.1, 0.7, 0.3, 0.2]])
    assert vstar(r, 1e-4).item() == pytest.approx(0.7, abs=1e-3)
    assert vstar(r, 1e-4).item() <= 0.7


def test_vstar_large_beta1_tends_to_mean():
    r = torch.tensor([[0.1, 0.7, 0.3, 0.2]])
    assert vstar(r, 1e4).item() == pytest.approx(r.mean().item(), abs=1e-4)


def test_vstar_beta1_zero_is_mean():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0] * 8])
    assert vstar(r, 0.0).tolist() == pytest.approx([0.375, 0.0])


def test_vstar_rejects_negative_beta1():
    with pytest.raises(ValueError, match="beta1"):
        vstar(binary_rewards(2), -0.1)


def test_vstar_is_monotone_between_mean_and_max():
    r = torch.rand(16, 8)
    v = vstar(r, 0.5)
    assert torch.all(v >= r.mean(-1).double() - 1e-9) and torch.all(v <= r.max(-1).values.double() + 1e-9)


def test_masked_sum_and_mean_ignore_padding_even_if_nan():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(values, mask).tolist() == [3.0, 8.0]
    assert masked_mean(values, mask, dim=-1).tolist() == [1.5, 4.0]
    assert masked_mean(values, mask).item() == pytest.approx(11.0 / 4)


def test_loss_matches_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = torch.tensor([1.0, 0.0])
    v = torch.tensor([0.6, 0.3])
    beta2 = 0.1
    # row 0: log ratio = (-1+1.5) + (-2+1) = -0.5; residual = 0.1*-0.5 - (1-0.6) = -0.45
    # row 1: log ratio = 3 * 0.5 = 1.5;            residual = 0.1*1.5 - (0-0.3) = 0.45
    loss, metrics = apo_loss(logp, ref, mask, rewards, v, beta2)
    assert loss.item() == pytest.approx((0.45**2 + 0.45**2) / 2)
    assert metrics["log_ratio_mean"].item() == pytest.approx(0.5)
    assert metrics["advantage_mean"].item() == pytest.approx((0.4 - 0.3) / 2)
    # KL: mean over the 5 real tokens of logp - ref = (0.5 - 1 + 0.5*3) / 5
    assert metrics["kl"].item() == pytest.approx(1.0 / 5)


def test_loss_invariant_to_padding_content_and_width():
    torch.manual_seed(0)
    B, T = 4, 6
    logp, ref = -torch.rand(B, T), -torch.rand(B, T)
    lengths = torch.tensor([6, 3, 1, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    rewards, v = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.rand(B)
    base, _ = apo_loss(logp, ref, mask, rewards, v, 1e-2)
    # garbage in padded slots
    noisy_logp = torch.where(mask.bool(), logp, torch.full_like(logp, 1e6))
    noisy_ref = torch.where(mask.bool(), ref, torch.full_like(ref, float("nan")))
    noisy, _ = apo_loss(noisy_logp, noisy_ref, mask, rewards, v, 1e-2)
    # extra padding columns
    pad = lambda x: torch.cat([x, torch.zeros(B, 5, dtype=x.dtype)], dim=1)
    wider, _ = apo_loss(pad(logp), pad(ref), pad(mask), rewards, v, 1e-2)
    assert noisy.item() == pytest.approx(base.item(), rel=1e-6)
    assert wider.item() == pytest.approx(base.item(), rel=1e-6)


def test_vectorised_loss_and_gradient_match_per_sample_loop():
    torch.manual_seed(1)
    B, T = 5, 7
    logits = torch.randn(B, T, requires_grad=True)
    logp = torch.nn.functional.logsigmoid(logits)
    ref = -torch.rand(B, T)
    mask = (torch.rand(B, T) > 0.3).long()
    rewards, v, beta2 = torch.randint(0, 2, (B,)).float(), torch.rand(B), 0.05
    loss, _ = apo_loss(logp, ref, mask, rewards, v, beta2)
    (grad_vec,) = torch.autograd.grad(loss, logits, retain_graph=True)

    loop = 0.0
    for i in range(B):
        ratio = sum(logp[i, t] - ref[i, t] for t in range(T) if mask[i, t])
        loop = loop + (beta2 * ratio - (rewards[i] - v[i])) ** 2
    loop = loop / B
    (grad_loop,) = torch.autograd.grad(loop, logits)
    assert loss.item() == pytest.approx(loop.item(), rel=1e-6)
    assert torch.allclose(grad_vec, grad_loop, atol=1e-7)


def test_loss_is_zero_at_optimum():
    # If beta2 * log ratio equals r - V* for every sample, the regression is solved.
    mask = torch.ones(2, 1)
    rewards, v, beta2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.25]), 0.5
    ratio = (rewards - v) / beta2
    loss, _ = apo_loss(ratio[:, None], torch.zeros(2, 1), mask, rewards, v, beta2)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_aggregate_vstar_per_prompt_and_refuses_uneven_sample_counts():
    from apo_core.rollouts import aggregate_vstar

    rows = aggregate_vstar(["a", "b", "a", "b"], [1.0, 0.0, 0.0, 0.0], beta1=0.5)
    by_id = {r["prompt_id"]: r for r in rows}
    assert by_id["a"]["n"] == 2 and by_id["a"]["mean_reward"] == 0.5 and by_id["a"]["pass_at_n"] == 1.0
    assert by_id["a"]["vstar"] == pytest.approx(0.5 * (math.log(math.exp(2.0) + 1.0) - math.log(2.0)))
    assert by_id["b"]["pass_at_n"] == 0.0 and by_id["b"]["vstar"] == pytest.approx(0.0)  # all-zero: what the filter drops
    assert aggregate_vstar([], [], beta1=0.5) == []
    with pytest.raises(ValueError, match=r"different sample counts \[1, 2\]"):
        aggregate_vstar(["a", "a", "b"], [1.0, 0.0, 1.0], beta1=0.5)


def test_mean_entropy_averages_response_positions_only():
    from apo_core.objectives import mean_entropy

    entropy = torch.tensor([[1.0, 3.0, float("nan")], [2.0, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert mean_entropy(entropy, mask).item() == pytest.approx(2.0)  # (1 + 3 + 2) / 3; padding ignored, even NaN
