"""Vectorised pure-PyTorch BV-Blend: the benchmarks' "what a user would write" baseline.

Same contract as ``bv_blend_ext.reference`` (the readable spec, which loops over groups in
Python), but with no Python loop and no host synchronisation, so it is a fair eager baseline and
traces whole under ``torch.compile``. ``tests/test_benchmarks_smoke.py`` checks it against the
reference. Statistics accumulate in float32 (float64 for float64 rewards), like the reference.
"""

from __future__ import annotations

import torch

from bv_blend_ext import reference
from bv_blend_ext.reference import SCALE_MODES, BlendOutput, accumulation_dtype, blend_terms


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
                     eps: float = 1e-4, scale: str = "blend") -> BlendOutput:
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
             scale: str = "blend") -> BlendOutput:
        out = blend_advantages(rewards, group_size, offsets=offsets, hist_mean=self.ema,
                               hist_var=self.var, eps=eps, scale=scale)
        self.ring, self.count, self.ema, self.var = push_history(
            out.group_mean, self.ring, self.count, self.ema, self.alpha, self.min_history)
        return out
