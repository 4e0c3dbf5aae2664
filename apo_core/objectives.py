"""The A*-PO math: V* from reference rewards, the least-squares regression loss, masking.

Pure functions of tensors: no I/O, no logging, no ``.item()`` (a device sync). Shapes use one
notation for the package: ``B`` prompts in a batch, ``N`` reference samples per prompt, ``T``
response tokens (right-padded, ``mask`` 1 on real tokens including EOS, 0 on padding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1. values, mask: (B, T) -> (B,)."""
    # where() rather than multiply so that inf/nan in padded slots cannot leak into the sum.
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1, over ``dim`` (all elements when None)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return masked_sum(values.flatten(), mask.flatten()) / mask.sum().clamp_min(1.0)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp_min(1.0)


def vstar(rewards: Tensor, beta1: float) -> Tensor:
    """Optimal value per prompt from N reference rewards. rewards: (B, N) -> (B,).

    V*(x) = beta1 * (logsumexp_i(r_i / beta1) - log N); beta1 = 0 is taken as the mean
    (the beta1 -> inf limit), as DESIGN.md specifies; beta1 -> 0+ tends to max_i r_i.
    """
    if beta1 < 0:
        raise ValueError(f"beta1 must be >= 0, got {beta1}")
    rewards = rewards.to(torch.float64)  # r / beta1 overflows float32 exp for small beta1
    if beta1 == 0:
        return rewards.mean(-1)
    n = rewards.shape[-1]
    return beta1 * (torch.logsumexp(rewards / beta1, dim=-1) - math.log(n))


def apo_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    vstar_values: Tensor,
    beta2: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A*-PO least-squares regression loss on one response per prompt.

    logprobs, ref_logprobs, mask: (B, T) per-token log-probabilities of the sampled response
    under pi and pi_ref; rewards, vstar_values: (B,). Returns (scalar loss, metrics) where the
    metrics are detached tensors (the caller decides when to sync them).
    """
    # log pi(y|x) - log pi_ref(y|x), summed over response tokens (not length-normalised).
    token_log_ratio = logprobs - ref_logprobs
    seq_log_ratio = masked_sum(token_log_ratio, mask)  # (B,)
    advantage = rewards.to(seq_log_ratio.dtype) - vstar_values.to(seq_log_ratio.dtype)  # r - V*
    # loss = mean_B (beta2 * log_ratio - (r - V*))^2
    residual = beta2 * seq_log_ratio - advantage
    loss = residual.pow(2).mean()
    metrics = {
        "loss": loss.detach(),
        # KL estimate as logged in the paper: mean over response tokens of log pi - log pi_ref.
        "kl": masked_mean(token_log_ratio.detach(), mask),
        "log_ratio_mean": seq_log_ratio.detach().mean(),
        "advantage_mean": advantage.detach().mean(),
        "advantage_std": advantage.detach().std(unbiased=False),
        "residual_abs_mean": residual.detach().abs().mean(),
    }
    return loss, metrics


def mean_entropy(token_entropy: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy of the policy over response tokens, from each position's entropy
    (`modeling.response_logprobs(..., with_entropy=True)`, computed chunk by chunk from the
    logits). token_entropy, mask: (B, T)."""
    return masked_mean(token_entropy, mask)
