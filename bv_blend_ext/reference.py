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
# The scale when none is given: the paired evaluation (docs/benchmarks.md, Results) found no
# scale better than none (s = 1) with a history baseline, and "blend" worse in every mixed cell.
DEFAULT_SCALE = "none"


# A valid reward is a finite one: NaN and ±inf are "unscorable" (advantage 0, out of every
# statistic and of the history).
class BlendOutput(NamedTuple):
    advantages: torch.Tensor  # (N,), dtype of the rewards
    group_mean: torch.Tensor  # (G,), accumulation dtype; NaN for a group with no valid reward
    group_std: torch.Tensor  # (G,), unbiased; 0 when a group has one valid reward, NaN with none
    beta: torch.Tensor  # (G,), weight of the history in the baseline; NaN with no valid reward


# α_k of the per-key EMA when none is given: a prompt is revisited a few times per run, not
# hundreds, so its EMA must move in a few visits (about the last 7 weigh in).
DEFAULT_KEY_EMA_DECAY = 0.25


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
    """A history that is not finite, or has σ_u² < 0, is ignored: H = σ_u² = 0, hence β = 0.
    Elementwise, so per-group statistics are judged group by group."""
    usable = hist_mean.isfinite() & hist_var.isfinite() & (hist_var >= 0)
    return torch.where(usable, hist_mean, 0), torch.where(usable, hist_var, 0)


def _as_history(value, dtype, device, num_groups: int) -> torch.Tensor:
    """H or σ_u² as a (G,) tensor: a scalar (float or 0-dim tensor) is shared by every group."""
    return torch.as_tensor(value, dtype=dtype, device=device).reshape(-1).expand(num_groups)


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
                     eps: float = 1e-4, scale: str = DEFAULT_SCALE) -> BlendOutput:
    """Advantages of one call, with the history statistics H (hist_mean) and σ_u² (hist_var) given:
    scalars shared by every group, or (G,) tensors, group g then using H[g] and σ_u²[g]."""
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
    acc = accumulation_dtype(rewards.dtype)
    device = rewards.device
    bounds = group_offsets(rewards.numel(), group_size, offsets, device).tolist()
    r = rewards.to(acc)
    num_groups = len(bounds) - 1
    h, u = usable_history(_as_history(hist_mean, acc, device, num_groups),
                          _as_history(hist_var, acc, device, num_groups))
    batch_scale = batch_std(rewards) + eps if scale == "batch" else None

    advantages = torch.zeros_like(r)
    means, stds, betas = [], [], []
    for g, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
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
        beta, baseline, s = blend_terms(mu, var, h[g], u[g], eps, scale, batch_scale)
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
             scale: str = DEFAULT_SCALE) -> BlendOutput:
        out = blend_advantages(rewards, group_size, offsets=offsets, hist_mean=self.ema,
                               hist_var=self.variance, eps=eps, scale=scale)
        self.push(out.group_mean)
        return out


class KeyedHistoryReference(HistoryReference):
    """Per-key history (a key per prompt or per cluster) over the global one, as plain Python.

    Key k holds a visit count n_k and EMA moments m_k, v_k of the group means it has seen. A group
    whose key has n_k >= key_min_history blends with H = m_k, σ_u² = v_k; any other group, and a
    group whose key is outside [0, num_keys), uses the global history. Every group of a call sees
    the pre-call state. Then each group with a valid reward updates its key, in group order
    (first visit: m_k = μ; then d = μ - m_k, m_k += α_k·d, v_k = (1 - α_k)·(v_k + α_k·d²)), and
    the global history is updated as HistoryReference does.
    """

    def __init__(self, num_keys: int, key_ema_decay: float = DEFAULT_KEY_EMA_DECAY,
                 key_min_history: int = 2, **global_history):
        super().__init__(**global_history)
        self.num_keys = num_keys
        self.key_alpha = key_ema_decay
        self.key_min_history = key_min_history
        self.key_count = [0] * num_keys
        self.key_mean = [0.0] * num_keys
        self.key_var = [0.0] * num_keys

    def group_history(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_g, σ_u,g²) of every group, float64, from the pre-call state."""
        means, variances = [], []
        for k in keys.tolist():
            if 0 <= k < self.num_keys and self.key_count[k] >= self.key_min_history:
                means.append(self.key_mean[k]), variances.append(self.key_var[k])
            else:
                means.append(self.ema), variances.append(self.variance)
        return (torch.tensor(means, dtype=torch.float64), torch.tensor(variances, dtype=torch.float64))

    def push_keys(self, group_means: torch.Tensor, keys: torch.Tensor) -> None:
        a = self.key_alpha
        for mu, k in zip(group_means.double().tolist(), keys.tolist()):
            if not math.isfinite(mu) or not 0 <= k < self.num_keys:
                continue
            if self.key_count[k] == 0:
                self.key_mean[k], self.key_var[k] = mu, 0.0
            else:
                d = mu - self.key_mean[k]
                self.key_mean[k] += a * d
                self.key_var[k] = (1 - a) * (self.key_var[k] + a * d * d)
            self.key_count[k] += 1

    def step(self, rewards: torch.Tensor, group_size: int | None = None, *,
             offsets: torch.Tensor | None = None, keys: torch.Tensor, eps: float = 1e-4,
             scale: str = DEFAULT_SCALE) -> BlendOutput:
        hist_mean, hist_var = self.group_history(keys)
        out = blend_advantages(rewards, group_size, offsets=offsets, hist_mean=hist_mean,
                               hist_var=hist_var, eps=eps, scale=scale)
        self.push_keys(out.group_mean, keys)
        self.push(out.group_mean)
        return out
