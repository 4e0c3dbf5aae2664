"""BF16StateAdamW: torch's AdamW update with moments stored in bfloat16 (stochastic rounding)."""

import torch

from apo_core.optim import BF16StateAdamW, round_to_bfloat16


def _quadratic_run(opt_cls, steps=50, **kwargs):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(300, 7))
    target = torch.randn(300, 7)
    opt = opt_cls([w], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
    return w.detach(), opt


def test_tracks_torch_adamw_and_stores_bfloat16_moments():
    ref, _ = _quadratic_run(torch.optim.AdamW)
    got, opt = _quadratic_run(BF16StateAdamW)
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert (got - ref).abs().max() < 1e-2  # after 50 steps of lr 1e-2 (each moves a weight ~1e-2): within one step
    assert not torch.equal(got, ref)


def test_second_moment_decays_where_round_to_nearest_would_freeze_it():
    """beta2 = 0.999 moves exp_avg_sq by 0.1% per step, under half a bfloat16 step."""
    w = torch.nn.Parameter(torch.zeros(4096))
    opt = BF16StateAdamW([w], lr=0.0, betas=(0.9, 0.999), weight_decay=0.0)
    w.grad = torch.ones(4096)
    opt.step()
    first = opt.state[w]["exp_avg_sq"].float().mean().item()
    w.grad = torch.zeros(4096)
    for _ in range(200):
        opt.step()
    last = opt.state[w]["exp_avg_sq"].float().mean().item()
    assert abs(last / first - 0.999**200) < 0.01  # 0.819 in expectation; round-to-nearest keeps 1.0
    nearest = torch.tensor([first]).to(torch.bfloat16)
    assert (nearest.float() * 0.999).to(torch.bfloat16).item() == nearest.item()  # why stochastic rounding is needed


def test_resume_from_state_dict_continues_bit_for_bit():
    def make():
        torch.manual_seed(1)
        return torch.nn.Parameter(torch.randn(64, 5))

    def grad(step):
        return torch.randn(64, 5, generator=torch.Generator().manual_seed(100 + step))

    a = make()
    opt = BF16StateAdamW([a], lr=1e-2, seed=3)
    for step in range(6):
        a.grad = grad(step)
        opt.step()
    b = make()
    first = BF16StateAdamW([b], lr=1e-2, seed=3)
    for step in range(3):
        b.grad = grad(step)
        first.step()
    saved = first.state_dict()
    resumed = BF16StateAdamW([b], lr=1e-2, seed=3)
    resumed.load_state_dict(saved)
    assert resumed.state[b]["exp_avg"].dtype == torch.bfloat16
    for step in range(3, 6):
        b.grad = grad(step)
        resumed.step()
    assert torch.equal(a, b)


def test_stochastic_rounding_is_unbiased_and_lands_on_bfloat16_neighbours():
    x = torch.full((200000,), 3.0 + 3 * 2**-8)  # 3/4 of the way from 3 to the next bfloat16, 3 + 2**-6
    y = round_to_bfloat16(x, torch.Generator().manual_seed(0)).float()
    assert set(y.unique().tolist()) == {3.0, 3.0 + 2**-6}
    assert abs(y.mean().item() - x[0].item()) < 2e-5
    assert round_to_bfloat16(-x, torch.Generator().manual_seed(0)).float().mean().item() < -3.0
