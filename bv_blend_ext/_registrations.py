"""Fake (meta) registrations of the bv_blend ops, so that they trace under torch.compile.

Their autograd kernel is registered in C++ (csrc/autograd.cpp): a Python one would cost more
per call than the kernels themselves at typical batch sizes."""

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
