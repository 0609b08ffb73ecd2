"""Fake (meta) registrations of the bv_blend ops, so that they trace under torch.compile.

Their autograd kernel is registered in C++ (csrc/autograd.cpp): a Python one would cost more
per call than the kernels themselves at typical batch sizes.

The fake kernels only compute output shapes and never reject arguments while tracing: a raise
there would reach a compiled caller as a dynamo error, whereas the real kernel, which checks every
argument, raises the same ValueError/TypeError at run time as in eager mode. Called with real meta
tensors (not under FakeTensorMode), they are the op's meta kernel and do check devices, since a
meta tensor next to CPU tensors dispatches here.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .reference import accumulation_dtype


def _check_devices(rewards: torch.Tensor, *, reference: str = "rewards", **tensors) -> None:
    if is_fake(rewards):
        return
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != rewards.device:
            raise ValueError(f"{name} must be on the {reference}' device ({rewards.device}), "
                             f"got {tensor.device}")


def _num_groups(rewards, offsets, group_size) -> int:
    if offsets is not None:
        return max(offsets.shape[0] - 1, 0)
    return rewards.shape[0] // group_size if group_size > 0 else 0


@torch.library.register_fake("bv_blend::group_advantages")
def _group_advantages_fake(rewards, offsets, group_size, hist_mean, hist_var, eps, scale):
    _check_devices(rewards, offsets=offsets, hist_mean=hist_mean, hist_var=hist_var)
    num_groups = _num_groups(rewards, offsets, group_size)
    stats = rewards.new_empty((num_groups,), dtype=accumulation_dtype(rewards.dtype))
    return rewards.new_empty(rewards.shape), stats, torch.empty_like(stats), torch.empty_like(stats)


@torch.library.register_fake("bv_blend::group_advantages_backward")
def _group_advantages_backward_fake(grad_advantages, advantages, rewards, offsets, group_size,
                                    hist_mean, hist_var, eps, scale):
    _check_devices(rewards, grad_advantages=grad_advantages, advantages=advantages,
                   offsets=offsets, hist_mean=hist_mean, hist_var=hist_var)
    return rewards.new_empty(rewards.shape)


@torch.library.register_fake("bv_blend::update_history")
def _update_history_fake(group_mean, ring, count, ema, var, alpha, min_history):
    _check_devices(group_mean, reference="group_mean", ring=ring, count=count, ema=ema, var=var)
    return None


@torch.library.register_fake("bv_blend::keyed_history")
def _keyed_history_fake(keys, key_count, key_mean, key_var, hist_mean, hist_var,
                        key_min_history):
    _check_devices(keys, reference="keys", key_count=key_count, key_mean=key_mean,
                   key_var=key_var, hist_mean=hist_mean, hist_var=hist_var)
    out = keys.new_empty(keys.shape, dtype=torch.float64)
    return out, torch.empty_like(out)


@torch.library.register_fake("bv_blend::update_keyed_history")
def _update_keyed_history_fake(group_mean, keys, key_count, key_mean, key_var, key_alpha, ring,
                               count, ema, var, alpha, min_history):
    _check_devices(group_mean, reference="group_mean", keys=keys, key_count=key_count,
                   key_mean=key_mean, key_var=key_var, ring=ring, count=count, ema=ema, var=var)
    return None


@torch.library.register_fake("bv_blend::keyed_group_advantages")
def _keyed_group_advantages_fake(rewards, offsets, group_size, keys, key_count, key_mean, key_var,
                                 hist_mean, hist_var, key_min_history, eps, scale):
    _check_devices(rewards, offsets=offsets, keys=keys, key_count=key_count, key_mean=key_mean,
                   key_var=key_var, hist_mean=hist_mean, hist_var=hist_var)
    num_groups = _num_groups(rewards, offsets, group_size)
    stats = rewards.new_empty((num_groups,), dtype=accumulation_dtype(rewards.dtype))
    history = rewards.new_empty((num_groups,), dtype=torch.float64)
    return (rewards.new_empty(rewards.shape), stats, torch.empty_like(stats),
            torch.empty_like(stats), history, torch.empty_like(history))


@torch.library.register_fake("bv_blend::keyed_step")
def _keyed_step_fake(rewards, offsets, group_size, keys, key_count, key_mean, key_var, key_alpha,
                     key_min_history, ring, count, ema, var, alpha, min_history, eps, scale,
                     validate):
    _check_devices(rewards, ring=ring, count=count)
    return _keyed_group_advantages_fake(rewards, offsets, group_size, keys, key_count, key_mean,
                                        key_var, ema, var, key_min_history, eps, scale)
