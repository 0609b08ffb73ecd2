"""Vectorised pure-PyTorch BV-Blend: the benchmarks' "what a user would write" baseline.

Same contract as ``bv_blend_ext.reference`` (the readable spec, which loops over groups in
Python), but with no Python loop and no host synchronisation, so it is a fair eager baseline and
traces whole under ``torch.compile``. ``tests/test_benchmarks_smoke.py`` checks it against the
reference. Statistics accumulate in float32 (float64 for float64 rewards), like the reference.
"""

from __future__ import annotations

import torch

from bv_blend_ext import reference
from bv_blend_ext.reference import (DEFAULT_SCALE, SCALE_MODES, BlendOutput, accumulation_dtype,
                                    blend_terms)


def _segments(valid_r: torch.Tensor, num_groups: int, group_size: int | None,
              offsets: torch.Tensor | None):
    """(per-group sum, gather) where gather maps a (G,) tensor to the (N,) rewards layout."""
    if offsets is None:
        def group_sum(x):
            return x.view(num_groups, group_size).sum(1)

        def gather(t):
            return t[:, None].expand(num_groups, group_size).reshape(-1)
        return group_sum, gather
    positions = torch.arange(valid_r.numel(), device=valid_r.device)
    group_id = torch.searchsorted(offsets[1:], positions, right=True)

    def group_sum(x):
        return x.new_zeros(num_groups).index_add(0, group_id, x)

    def gather(t):
        return t[group_id]
    return group_sum, gather


def blend_advantages(rewards: torch.Tensor, group_size: int | None = None, *,
                     offsets: torch.Tensor | None = None, hist_mean=0.0, hist_var=0.0,
                     eps: float = 1e-4, scale: str = DEFAULT_SCALE) -> BlendOutput:
    acc = accumulation_dtype(rewards.dtype)
    r = rewards.to(acc)
    valid = torch.isfinite(r)
    # Unscorable rewards are replaced before any arithmetic so that no NaN reaches autograd.
    r0 = torch.where(valid, r, 0.0)
    w = valid.to(acc)
    num_groups = offsets.numel() - 1 if offsets is not None else r.numel() // group_size
    group_sum, gather = _segments(r0, num_groups, group_size, offsets)

    n = group_sum(w)
    mu = group_sum(r0) / n.clamp(min=1)
    dev = (r0 - gather(mu)) * w
    var = group_sum(dev * dev) / (n - 1).clamp(min=1)

    h = torch.as_tensor(hist_mean, dtype=acc, device=r.device)
    u = torch.as_tensor(hist_var, dtype=acc, device=r.device)
    batch_scale = None
    if scale == "batch":
        # Not reference.batch_std: its masked square would send NaN into autograd here.
        count = w.sum()
        batch_mean = r0.sum() / count.clamp(min=1)
        batch_dev = (r0 - batch_mean) * w
        batch_var = (batch_dev * batch_dev).sum() / (count - 1).clamp(min=1)
        batch_scale = torch.where(count >= 2, batch_var.sqrt(), 0).expand(num_groups) + eps
    elif scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of group, blend, batch, none; got {scale!r}")
    beta, baseline, s = blend_terms(mu, var, h, u, eps, scale, batch_scale)
    advantages = torch.where(valid, (r0 - gather(baseline)) / gather(s), 0).to(rewards.dtype)

    empty = n == 0
    nan = torch.full_like(mu, float("nan"))
    return BlendOutput(advantages, torch.where(empty, nan, mu), torch.where(empty, nan, var.sqrt()),
                       torch.where(empty, nan, beta))


def push_history(group_mean: torch.Tensor, ring: torch.Tensor, count: torch.Tensor,
                 ema: torch.Tensor, alpha: float, min_history: int):
    """The history update of ``reference.HistoryReference.push`` without a loop: returns the new
    (ring, count, ema, var). Every finite group mean enters the ring and the EMA in order."""
    window = ring.numel()
    mu = group_mean.detach().to(torch.float64)
    valid = torch.isfinite(mu)
    m = valid.sum()
    rank = torch.cumsum(valid, 0) - 1
    # Only the last `window` valid means survive in the ring; the rest go to a discarded slot.
    keep = valid & (rank >= m - window)
    slot = torch.where(keep, (count + rank) % window, window)
    ring = torch.cat([ring, ring.new_zeros(1)]).scatter(0, slot, torch.where(keep, mu, 0))[:window]
    decay = 1.0 - alpha
    weights = torch.where(valid, alpha * decay ** (m - 1 - rank).to(torch.float64) * mu, 0)
    ema = decay ** m.to(torch.float64) * ema + weights.sum()
    count = count + m
    entries = torch.clamp(count, max=window)
    in_ring = (torch.arange(window, device=ring.device) < entries).to(torch.float64)
    ring_mean = (ring * in_ring).sum() / entries.clamp(min=1)
    ring_dev = (ring - ring_mean) * in_ring
    ring_var = (ring_dev * ring_dev).sum() / (entries - 1).clamp(min=1)
    var = torch.where(entries >= max(2, min_history), ring_var, 0)
    return ring, count, ema, var


class History:
    """Vectorised counterpart of ``reference.HistoryReference`` with tensor state (the same
    buffers as ``bv_blend_ext.BVBlend``)."""

    def __init__(self, window: int = 100, ema_decay: float | None = None,
                 initial_baseline: float = 0.0, min_history: int = 2, device="cpu"):
        # Looked up at call time: ab_builds.py imports this module next to older builds of
        # bv_blend_ext, whose reference may predate the function.
        self.alpha = reference.default_ema_decay(window) if ema_decay is None else ema_decay
        self.min_history = min_history
        self.ring = torch.zeros(window, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.ema = torch.tensor(float(initial_baseline), dtype=torch.float64, device=device)
        self.var = torch.zeros((), dtype=torch.float64, device=device)

    def step(self, rewards: torch.Tensor, group_size: int | None = None, *,
             offsets: torch.Tensor | None = None, eps: float = 1e-4,
             scale: str = DEFAULT_SCALE) -> BlendOutput:
        out = blend_advantages(rewards, group_size, offsets=offsets, hist_mean=self.ema,
                               hist_var=self.var, eps=eps, scale=scale)
        self.ring, self.count, self.ema, self.var = push_history(
            out.group_mean, self.ring, self.count, self.ema, self.alpha, self.min_history)
        return out


def keyed_group_history(keys: torch.Tensor, key_count: torch.Tensor, key_mean: torch.Tensor,
                        key_var: torch.Tensor, ema: torch.Tensor, var: torch.Tensor,
                        key_min_history: int):
    """Each group's (H, σ_u²): its key's moments once the key has enough visits, else the global
    history; keys outside the tables use the global history."""
    num_keys = key_count.numel()
    inside = (keys >= 0) & (keys < num_keys)
    k = keys.clamp(0, num_keys - 1)
    use_key = inside & (key_count[k] >= key_min_history)
    return torch.where(use_key, key_mean[k], ema), torch.where(use_key, key_var[k], var)


def push_keys(group_mean: torch.Tensor, keys: torch.Tensor, key_count: torch.Tensor,
              key_mean: torch.Tensor, key_var: torch.Tensor, alpha: float) -> None:
    """The per-key update of ``reference.KeyedHistoryReference.push_keys``, in place, with
    gathers and scatters. A key seen several times in one call is updated once per occurrence
    level (first visits, then second visits...), which keeps group order without a Python loop
    over groups."""
    num_keys = key_count.numel()
    mu = group_mean.detach().to(torch.float64)
    update = torch.isfinite(mu) & (keys >= 0) & (keys < num_keys)
    k, mu = keys[update], mu[update]
    if k.numel() == 0:
        return
    sorted_keys, order = torch.sort(k, stable=True)
    position = torch.arange(k.numel(), device=k.device)
    new_run = torch.ones_like(sorted_keys, dtype=torch.bool)
    new_run[1:] = sorted_keys[1:] != sorted_keys[:-1]
    run_start = torch.cummax(torch.where(new_run, position, 0), 0).values
    occurrence = torch.empty_like(position)
    occurrence[order] = position - run_start
    for level in range(int(occurrence.max()) + 1):
        at = occurrence == level
        kk, x = k[at], mu[at]
        n, m, v = key_count[kk], key_mean[kk], key_var[kk]
        d = x - m
        first = n == 0
        key_mean[kk] = torch.where(first, x, m + alpha * d)
        key_var[kk] = torch.where(first, 0.0, (1 - alpha) * (v + alpha * d * d))
        key_count[kk] = n + 1


class KeyedHistory(History):
    """Vectorised counterpart of ``reference.KeyedHistoryReference``: per-key tables over the
    global history, the buffers of a keyed ``bv_blend_ext.BVBlend``."""

    def __init__(self, num_keys: int, key_ema_decay: float = reference.DEFAULT_KEY_EMA_DECAY,
                 key_min_history: int = 2, device="cpu", **global_history):
        super().__init__(device=device, **global_history)
        self.key_alpha = key_ema_decay
        self.key_min_history = key_min_history
        self.key_count = torch.zeros(num_keys, dtype=torch.int64, device=device)
        self.key_mean = torch.zeros(num_keys, dtype=torch.float64, device=device)
        self.key_var = torch.zeros(num_keys, dtype=torch.float64, device=device)

    def step(self, rewards: torch.Tensor, group_size: int | None = None, *,
             offsets: torch.Tensor | None = None, keys: torch.Tensor, eps: float = 1e-4,
             scale: str = DEFAULT_SCALE) -> BlendOutput:
        hist_mean, hist_var = keyed_group_history(keys, self.key_count, self.key_mean,
                                                  self.key_var, self.ema, self.var,
                                                  self.key_min_history)
        out = blend_advantages(rewards, group_size, offsets=offsets, hist_mean=hist_mean,
                               hist_var=hist_var, eps=eps, scale=scale)
        push_keys(out.group_mean, keys, self.key_count, self.key_mean, self.key_var,
                  self.key_alpha)
        self.ring, self.count, self.ema, self.var = push_history(
            out.group_mean, self.ring, self.count, self.ema, self.alpha, self.min_history)
        return out
