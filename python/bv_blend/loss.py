"""The GRPO objective: clipped importance-weighted surrogate, optional k3 KL, four aggregations."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to backpropagate
    kl: torch.Tensor | None  # mean k3 KL over completion tokens; None without a reference model
    clip_ratio: torch.Tensor  # fraction of completion tokens whose clipped term was taken


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(d) - d - 1 with d = log ref - log pi (>= 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, loss_type: str, epsilon_low: float, epsilon_high: float,
              beta: float = 0.0, ref_logps: torch.Tensor | None = None,
              max_completion_length: int | None = None,
              num_items_in_batch: float | None = None, num_micro_batches: int = 1) -> LossOutput:
    """Loss of a batch of B completions of T tokens, one of `num_micro_batches` whose gradients are
    accumulated into one update: the sum of their losses is the loss of the whole step.

    logps, old_logps, ref_logps, mask: (B, T); advantages: (B,), one per completion.
    loss_type decides the denominator of the masked sum of per-token losses:
      grpo    - each sequence averaged over its own tokens, then averaged over sequences;
      bnpo    - the tokens of this batch;
      dr_grpo - B * max_completion_length, a constant (no length bias);
      dapo    - num_items_in_batch: the tokens of the whole step (all micro-batches, all
                processes), so that accumulated gradients equal those of one big batch;
                without it, the tokens of this batch.
    The first three (and dapo without num_items_in_batch) are means over this micro-batch, so
    their loss is divided by num_micro_batches; dapo's step-wide count already covers them all.
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1).to(logps.dtype)
    per_token = -torch.min(ratio * adv, clipped * adv)
    # The clipped term is the smaller one exactly in these two cases.
    was_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))

    kl = None
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        per_token_kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * per_token_kl

    tokens = mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (logps.shape[0] * max_completion_length)
    elif loss_type == "dapo":
        denominator = tokens if num_items_in_batch is None else num_items_in_batch
        loss = (per_token * mask).sum() / denominator
    else:
        raise ValueError(f"loss_type must be one of grpo, bnpo, dr_grpo, dapo, got {loss_type!r}")
    if loss_type != "dapo" or num_items_in_batch is None:
        loss = loss / num_micro_batches

    with torch.no_grad():
        if beta > 0:
            kl = (per_token_kl * mask).sum() / tokens
        clip_ratio = (was_clipped.to(mask.dtype) * mask).sum() / tokens
    return LossOutput(loss, kl, clip_ratio)
