"""Pure-PyTorch reference of the BV-Blend contract.

Readable rather than fast: tests compare the compiled ops against it and the benchmarks use it
as the "what a user would write" baseline. Every statistic is accumulated in float32 (float64
for float64 input), exactly as the compiled kernels do.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

SCALE_MODES = ("group", "blend", "batch", "none")


# A valid reward is a finite one: NaN and ±inf are "unscorable" (advantage 0, out of every
# statistic and of the history).
class BlendOutput(NamedTuple):
    advantages: torch.Tensor  # (N,), dtype of the rewards
    group_mean: torch.Tensor  # (G,), accumulation dtype; NaN for a group with no valid reward
    group_std: torch.Tensor  # (G,), unbiased; 0 when a group has one valid reward, NaN with none
    beta: torch.Tensor  # (G,), weight of the history in the baseline; NaN with no valid reward


def default_ema_decay(window: int) -> float:
    """α of the history EMA when none is given: the EMA then has the ring's centre of mass."""
    return 2.0 / (window + 1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_offsets(num_rewards: int, group_size: int | None, offsets: torch.Tensor | None,
                  device: torch.device) -> torch.Tensor:
    """Group bounds as the kernels use them. Offsets are clamped to [0, N] and each bound raised
    to at least the one before, so groups never overlap; valid offsets come out unchanged."""
    if offsets is not None:
        clamped = offsets.to(device=device, dtype=torch.int64).clamp(0, num_rewards)
        return clamped.cummax(0).values
    return torch.arange(0, num_rewards + 1, group_size, device=device, dtype=torch.int64)


def usable_history(hist_mean: torch.Tensor, hist_var: torch.Tensor):
    """A history that is not finite, or has σ_u² < 0, is ignored: H = σ_u² = 0, hence β = 0."""
    if bool(hist_mean.isfinite()) and bool(hist_var.isfinite()) and float(hist_var) >= 0:
        return hist_mean, hist_var
    return torch.zeros_like(hist_mean), torch.zeros_like(hist_var)


def _as_scalar(value, dtype, device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype, device=device).reshape(())


def batch_std(rewards: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the finite rewards of the whole call; 0 with fewer than two."""
    r = rewards.to(accumulation_dtype(rewards.dtype))
    valid = torch.isfinite(r)
    count = valid.sum()
    mean = torch.where(valid, r, 0).sum() / count.clamp(min=1)
    sq = torch.where(valid, (r - mean) ** 2, 0).sum()
    return torch.where(count >= 2, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))


def blend_terms(mu: torch.Tensor, var: torch.Tensor, hist_mean: torch.Tensor,
                hist_var: torch.Tensor, eps: float, scale: str,
                batch_scale: torch.Tensor | None = None):
    """β, baseline B and scale s of groups with mean μ and unbiased variance σ² (elementwise, so
    one group or a tensor of groups). `batch_scale` is the s of scale="batch". A group whose s is
    not positive and finite, or whose B is not finite, is unusable: its advantages are 0, which
    the caller gets from B = 0 and s = inf."""
    total = hist_var + var
    beta = torch.where(total > 0, hist_var / torch.where(total > 0, total, 1), 0)
    baseline = (1 - beta) * mu + beta * hist_mean
    if scale == "group":
        s = var.sqrt() + eps
    elif scale == "blend":
        s = ((1 - beta) * var + beta * hist_var).sqrt() + eps
    elif scale == "batch":
        s = batch_scale
    else:
        s = torch.ones_like(mu)
    usable = (s > 0) & s.isfinite() & baseline.isfinite()
    return beta, torch.where(usable, baseline, 0), torch.where(usable, s, torch.inf)


def blend_advantages(rewards: torch.Tensor, group_size: int | None = None, *,
                     offsets: torch.Tensor | None = None, hist_mean=0.0, hist_var=0.0,
                     eps: float = 1e-4, scale: str = "blend") -> BlendOutput:
    """Advantages of one call, with the history statistics H (hist_mean) and σ_u² (hist_var) given."""
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
    acc = accumulation_dtype(rewards.dtype)
    device = rewards.device
    bounds = group_offsets(rewards.numel(), group_size, offsets, device).tolist()
    r = rewards.to(acc)
    h, u = usable_history(_as_scalar(hist_mean, acc, device), _as_scalar(hist_var, acc, device))
    batch_scale = batch_std(rewards) + eps if scale == "batch" else None

    advantages = torch.zeros_like(r)
    means, stds, betas = [], [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        group = r[start:end]
        valid = torch.isfinite(group)
        n = int(valid.sum())
        if n == 0:
            nan = torch.tensor(float("nan"), dtype=acc, device=device)
            means.append(nan), stds.append(nan), betas.append(nan)
            continue
        values = group[valid]
        mu = values.mean()
        var = values.var(unbiased=True) if n >= 2 else torch.zeros((), dtype=acc, device=device)
        beta, baseline, s = blend_terms(mu, var, h, u, eps, scale, batch_scale)
        advantages[start:end] = torch.where(valid, (group - baseline) / s, 0)
        means.append(mu), stds.append(var.sqrt()), betas.append(beta)

    def stack(xs):
        return torch.stack(xs) if xs else torch.empty(0, dtype=acc, device=device)

    return BlendOutput(advantages.to(rewards.dtype), stack(means), stack(stds), stack(betas))


class HistoryReference:
    """The estimator's history as plain Python: a ring of recent group means and an EMA."""

    def __init__(self, window: int = 100, ema_decay: float | None = None,
                 initial_baseline: float = 0.0, min_history: int = 2):
        self.window = window
        self.alpha = default_ema_decay(window) if ema_decay is None else ema_decay
        self.min_history = min_history
        self.ring = [0.0] * window
        self.count = 0
        self.ema = float(initial_baseline)

    @property
    def variance(self) -> float:
        entries = self.ring[: min(self.count, self.window)]
        if len(entries) < max(2, self.min_history):
            return 0.0
        mean = sum(entries) / len(entries)
        return sum((x - mean) ** 2 for x in entries) / (len(entries) - 1)

    def push(self, group_means: torch.Tensor) -> None:
        for mu in group_means.double().tolist():
            if not math.isfinite(mu):
                continue
            self.ring[self.count % self.window] = mu
            self.count += 1
            self.ema = (1 - self.alpha) * self.ema + self.alpha * mu

    def step(self, rewards: torch.Tensor, group_size: int | None = None, *,
             offsets: torch.Tensor | None = None, eps: float = 1e-4,
             scale: str = "blend") -> BlendOutput:
        out = blend_advantages(rewards, group_size, offsets=offsets, hist_mean=self.ema,
                               hist_var=self.variance, eps=eps, scale=scale)
        self.push(out.group_mean)
        return out
