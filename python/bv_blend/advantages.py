"""The estimator switch: bv_blend, grpo, dr_grpo and batch run through the op; rloo beside it.

All estimators take the rewards of the whole step (every process's, gathered) as one flat tensor
in which each run of `group_size` entries is one prompt's group, NaN marking an unscorable
completion, and return per-completion advantages plus the per-group statistics for the metrics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

import bv_blend_ext

# The stateless estimators are scale settings of the op with the history off (hist_var = 0 gives
# beta = 0), as the op's contract defines them.
OP_SCALES = {"grpo": "group", "dr_grpo": "none", "batch": "batch"}
ESTIMATORS = ("bv_blend", *OP_SCALES, "rloo")


class Advantages(NamedTuple):
    advantages: torch.Tensor  # (N,), 0 where the reward is NaN or ±inf
    group_mean: torch.Tensor  # (G,)
    group_std: torch.Tensor  # (G,), unbiased; NaN for a group with no valid reward
    history_weight: torch.Tensor  # (G,), β: the weight of the history in each group's baseline
    history_mean: float  # H used for this call, its mean over groups when keyed (0 without history)
    history_var: float  # sigma_u^2 used for this call, likewise


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> bv_blend_ext.BlendOutput:
    """REINFORCE leave-one-out: each reward minus the mean of the other valid (finite) rewards of
    its group (0 for an unscorable reward, and for the only valid reward of a group). Unscaled."""
    acc = bv_blend_ext.reference.accumulation_dtype(rewards.dtype)
    r = rewards.to(acc).view(-1, group_size)
    valid = torch.isfinite(r)
    n = valid.sum(1, keepdim=True).to(acc)
    values = torch.where(valid, r, 0)
    total = values.sum(1, keepdim=True)
    others = (n - 1).clamp(min=1)
    advantages = torch.where(valid & (n >= 2), r - (total - values) / others, 0)
    mean = total / n  # NaN for a group without valid rewards (0 / 0)
    var = torch.where(valid, (values - mean) ** 2, 0).sum(1, keepdim=True) / others
    std = torch.where(n >= 2, var.sqrt(), torch.where(n == 1, 0.0, torch.nan))
    beta = torch.where(n > 0, 0.0, torch.nan)
    return bv_blend_ext.BlendOutput(advantages.reshape(-1).to(rewards.dtype), mean.squeeze(1),
                                    std.squeeze(1), beta.squeeze(1))


class AdvantageEstimator:
    """One of ESTIMATORS; only bv_blend has state (its history), saved in checkpoints."""

    def __init__(self, name: str, *, eps: float = 1e-4, window: int = 100,
                 ema_decay: float | None = None, min_history: int = 2,
                 initial_baseline: float = 0.0, bv_scale: str = "blend",
                 num_keys: int | None = None,
                 key_ema_decay: float = bv_blend_ext.reference.DEFAULT_KEY_EMA_DECAY,
                 key_min_history: int = 2):
        self.name = name
        self.eps = eps
        self.blend = None
        if name == "bv_blend":
            keyed = {} if num_keys is None else dict(num_keys=num_keys, key_ema_decay=key_ema_decay,
                                                     key_min_history=key_min_history)
            self.blend = bv_blend_ext.BVBlend(window=window, ema_decay=ema_decay,
                                              initial_baseline=initial_baseline,
                                              min_history=min_history, eps=eps, scale=bv_scale,
                                              **keyed)
        elif name not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")

    def __call__(self, rewards: torch.Tensor, group_size: int,
                 keys: torch.Tensor | None = None) -> Advantages:
        """`keys`: (G,) int64 ids of each group's prompt (or cluster), for the keyed estimators;
        the others ignore them."""
        if self.blend is not None:
            keyed = {} if self.blend.num_keys is None else {"keys": keys}
            step = self.blend.step(rewards, group_size=group_size, **keyed)
            return Advantages(step.advantages, step.group_mean, step.group_std, step.beta,
                              float(step.history_mean.mean()), float(step.history_var.mean()))
        if self.name == "rloo":
            out = rloo_advantages(rewards, group_size)
        else:
            out = bv_blend_ext.blend_advantages(rewards, group_size, eps=self.eps,
                                                scale=OP_SCALES[self.name])
        return Advantages(out.advantages, out.group_mean, out.group_std, out.beta, 0.0, 0.0)

    def state_dict(self) -> dict:
        return {} if self.blend is None else self.blend.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.blend is not None:
            self.blend.load_state_dict(state)
        elif state:
            raise ValueError(f"checkpoint holds a BV-Blend history but estimator is {self.name!r}")
