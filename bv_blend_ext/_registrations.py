"""Fake (meta) and autograd registrations of the bv_blend ops, so that they trace under
torch.compile and differentiate like built-in ops."""

from __future__ import annotations

import torch


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("bv_blend::group_advantages")
def _group_advantages_fake(rewards, offsets, group_size, hist_mean, hist_var, eps, scale):
    num_groups = offsets.shape[0] - 1 if offsets is not None else rewards.shape[0] // group_size
    stats = rewards.new_empty((num_groups,), dtype=_accumulation_dtype(rewards.dtype))
    return rewards.new_empty(rewards.shape), stats, torch.empty_like(stats), torch.empty_like(stats)


@torch.library.register_fake("bv_blend::group_advantages_backward")
def _group_advantages_backward_fake(grad_advantages, advantages, rewards, offsets, group_size,
                                    hist_mean, hist_var, eps, scale):
    return rewards.new_empty(rewards.shape)


@torch.library.register_fake("bv_blend::update_history")
def _update_history_fake(group_mean, ring, count, ema, var, alpha, min_history):
    return None


def _setup_context(ctx, inputs, output):
    rewards, offsets, group_size, hist_mean, hist_var, eps, scale = inputs
    advantages, group_mean, group_std, beta = output
    ctx.mark_non_differentiable(group_mean, group_std, beta)
    ctx.save_for_backward(rewards, offsets, hist_mean, hist_var, advantages)
    ctx.group_size, ctx.eps, ctx.scale = group_size, eps, scale


def _backward(ctx, grad_advantages, _grad_mean, _grad_std, _grad_beta):
    rewards, offsets, hist_mean, hist_var, advantages = ctx.saved_tensors
    grad_rewards = None
    if ctx.needs_input_grad[0]:
        grad_rewards = torch.ops.bv_blend.group_advantages_backward(
            grad_advantages, advantages, rewards, offsets, ctx.group_size, hist_mean, hist_var,
            ctx.eps, ctx.scale)
    # The history statistics are constants of the estimator: no gradient flows into them.
    return grad_rewards, None, None, None, None, None, None


torch.library.register_autograd("bv_blend::group_advantages", _backward,
                                setup_context=_setup_context)
