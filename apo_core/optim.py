"""AdamW with its two moments stored in bfloat16: half of AdamW's state memory.

AdamW keeps two fp32 tensors per weight, twice the model; on a 0.5B model that is 4 GB of the
~10 GB a training process holds. Here the moments are stored in bfloat16 and widened to fp32
for the update, a slice of a weight at a time. Rounding back to bfloat16 is stochastic:
with beta2 = 0.999 an update moves exp_avg_sq by 0.1%, under half a bfloat16 step, so
round-to-nearest would freeze the average; stochastic rounding keeps it unbiased. The update
arithmetic and order are torch.optim.AdamW's (decoupled weight decay, bias correction, eps
outside the square root). The rounding noise comes from a generator seeded by (seed, step,
weight index), so a run is reproducible and a resumed run continues bit for bit without any
generator state in the checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .seeds import ORDER_STRIDE, derived_seed

CHUNK = 1 << 22  # elements widened at a time: 16 MB per fp32 temporary, whatever the weight's size


def round_to_bfloat16(x: Tensor, generator: torch.Generator) -> Tensor:
    """fp32 -> bf16 with stochastic rounding: up with probability the dropped fraction of a bf16 step.

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.full((100000,), 1 + 2**-9)  # a quarter of the way from 1 to the next bf16, 1 + 2**-7
    >>> y = round_to_bfloat16(x, g).float()
    >>> sorted(set(y.tolist())) == [1.0, 1 + 2**-7], abs(y.mean().item() - x[0].item()) < 1e-4
    (True, True)
    """
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=generator, device=x.device)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class BF16StateAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update with exp_avg and exp_avg_sq stored in bfloat16 (stochastic rounding)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

        self._where: dict[int, tuple[dict, int]] = {}  # id(weight) -> (its group, its index over all groups)
        for group in self.param_groups:
            for p in group["params"]:
                self._where[id(p)] = (group, len(self._where) + 1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_weight(p, p.grad)
        return loss

    @torch.no_grad()
    def step_weight(self, p: Tensor, grad: Tensor, scale: float = 1.0) -> None:
        """The update of one weight from `grad` * `scale` (scale: a clipping coefficient), as
        step() makes it: lets a trainer update each weight as soon as its gradient is final."""
        self.advance(p)
        self.step_rows(p, None, grad, scale)

    def advance(self, p: Tensor) -> None:
        """Start this step's update of `p` (its step count, bias correction and rounding noise);
        step_rows then updates its rows in parts."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        state["step"] += 1

    @torch.no_grad()
    def step_rows(self, p: Tensor, rows: Tensor | None, grad: Tensor, scale: float = 1.0) -> None:
        """This step's update of the rows `rows` (indices along dim 0; None: all of `p`) from their
        gradient `grad` (len(rows), ...), after advance(p): each row of a weight once per step,
        in any number of parts (an output matrix whose gradient arrives a tile at a time)."""
        group, index = self._where[id(p)]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        t = int(state["step"])
        seed = derived_seed(self.seed, derived_seed(t, index, ORDER_STRIDE))
        if rows is not None:  # the part's own noise, whichever parts the rows come in
            seed = derived_seed(seed, int(rows[0]) + 1 if rows.numel() else 0, ORDER_STRIDE)
        generator = torch.Generator(device=p.device).manual_seed(seed)
        step_size = lr / (1 - beta1**t)
        bc2_sqrt = math.sqrt(1 - beta2**t)
        held = (p, state["exp_avg"], state["exp_avg_sq"])
        # the rows gathered (they need not be contiguous) and written back after the update
        weights, means, squares = (t.view(-1) if rows is None else t[rows].view(-1) for t in held)
        grads = grad.reshape(-1)
        for start in range(0, weights.numel(), CHUNK):
            part = slice(start, start + CHUNK)
            w, g = weights[part], grads[part].float()
            if scale != 1.0:
                g = g * scale
            m = means[part].float().lerp_(g, 1 - beta1)
            v = squares[part].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if wd:
                w.mul_(1 - lr * wd)
            w.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)
            means[part] = round_to_bfloat16(m, generator)
            squares[part] = round_to_bfloat16(v, generator)
        if rows is not None:
            for into, part in zip(held, (weights, means, squares)):
                into.index_copy_(0, rows, part.view(len(rows), *p.shape[1:]))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # torch casts floating state to each weight's dtype: narrow it back (exact)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)
