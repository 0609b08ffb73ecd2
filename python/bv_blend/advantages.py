"""The estimator switch: bv_blend, grpo, dr_grpo and batch run through the op; rloo and spo
beside it.

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
ESTIMATORS = ("bv_blend", *OP_SCALES, "rloo", "spo")


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


class SPOTracker:
    """The per-prompt success tracker of SPO (Xu & Ding, "Single-stream Policy Optimization",
    arXiv 2509.13232), with a constant discount rho where the paper adapts rho to the KL between
    the policies of successive visits. Key k holds discounted pseudo-counts a_k, b_k of successes
    and failures; its baseline is p_k = a_k / (a_k + b_k). A = (r - p_k) / (std of the step's valid
    rewards + eps), the paper normalising over the batch, not the group. A key not seen yet (or
    outside [0, num_keys)) uses its group's mean, so a prompt's first visit initialises the
    tracker (the paper spends extra samples on that). After the call each valid reward r of key k,
    group by group, updates a_k <- rho a_k + sum r, b_k <- rho b_k + sum (1 - r): for rewards
    outside {0, 1} (partial credit, noise) p_k is the discounted mean reward."""

    def __init__(self, num_keys: int, discount: float, eps: float):
        if num_keys is None or num_keys < 1:
            raise ValueError(f"spo needs num_keys >= 1 (one per prompt), got {num_keys!r}")
        if not 0 < discount <= 1:
            raise ValueError(f"spo_discount must be in (0, 1], got {discount!r}")
        self.num_keys, self.discount, self.eps = num_keys, discount, eps
        self.a = torch.zeros(num_keys, dtype=torch.float64)
        self.b = torch.zeros(num_keys, dtype=torch.float64)
        self.visits = torch.zeros(num_keys, dtype=torch.int64)

    def __call__(self, rewards: torch.Tensor, group_size: int, keys: torch.Tensor | None):
        if keys is None:
            raise ValueError("spo needs keys: the (G,) prompt ids of the groups")
        r = rewards.double().view(-1, group_size)
        if keys.shape != (r.shape[0],):
            raise ValueError(f"keys must have shape ({r.shape[0]},), got {tuple(keys.shape)}")
        if self.a.device != rewards.device:
            self.a, self.b, self.visits = (t.to(rewards.device) for t in (self.a, self.b, self.visits))
        keys = keys.to(rewards.device)
        valid = torch.isfinite(r)
        n = valid.sum(1)
        total = torch.where(valid, r, 0).sum(1)
        mean = total / n  # NaN for a group with no valid reward
        std = torch.where(valid, (r - mean[:, None]) ** 2, 0).sum(1) / (n - 1).clamp(min=1)
        known = (keys >= 0) & (keys < self.num_keys)
        k = keys.clamp(0, self.num_keys - 1)
        tracked = known & (self.visits[k] > 0)
        p = self.a[k] / (self.a[k] + self.b[k]).clamp(min=1e-300)
        baseline = torch.where(tracked, p, mean)
        flat = rewards.double()[torch.isfinite(rewards)]
        scale = (flat.std() if flat.numel() >= 2 else flat.new_zeros(())) + self.eps
        advantages = torch.where(valid, (r - baseline[:, None]) / scale, 0)
        for g in torch.nonzero(known & (n > 0)).flatten().tolist():  # in group order: keys may repeat
            key = int(k[g])
            self.a[key] = self.discount * self.a[key] + total[g]
            self.b[key] = self.discount * self.b[key] + (n[g] - total[g])
            self.visits[key] += 1
        return Advantages(advantages.reshape(-1).to(rewards.dtype), mean.to(torch.float32),
                          torch.where(n >= 2, std.sqrt(), torch.where(n == 1, 0.0, torch.nan)).float(),
                          torch.where(n > 0, tracked.double(), torch.nan).float(),
                          float(baseline[tracked].mean()) if tracked.any() else 0.0, 0.0)

    def state_dict(self) -> dict:
        return {"spo_a": self.a.clone(), "spo_b": self.b.clone(), "spo_visits": self.visits.clone()}

    def load_state_dict(self, state: dict) -> None:
        a, b, visits = state["spo_a"], state["spo_b"], state["spo_visits"]
        if any(t.shape != (self.num_keys,) for t in (a, b, visits)):
            raise ValueError(f"spo state must hold ({self.num_keys},) tensors")
        self.a, self.b, self.visits = a.double().clone(), b.double().clone(), visits.long().clone()


class AdvantageEstimator:
    """One of ESTIMATORS; bv_blend (its history) and spo (its tracker) have state, saved in
    checkpoints."""

    def __init__(self, name: str, *, eps: float = 1e-4, window: int = 100,
                 ema_decay: float | None = None, min_history: int = 2,
                 initial_baseline: float = 0.0,
                 bv_scale: str = bv_blend_ext.reference.DEFAULT_SCALE,
                 num_keys: int | None = None,
                 key_ema_decay: float = bv_blend_ext.reference.DEFAULT_KEY_EMA_DECAY,
                 key_min_history: int = 2, spo_discount: float = 0.8):
        self.name = name
        self.eps = eps
        self.blend = None
        self.spo = None
        if name == "bv_blend":
            keyed = {} if num_keys is None else dict(num_keys=num_keys, key_ema_decay=key_ema_decay,
                                                     key_min_history=key_min_history)
            self.blend = bv_blend_ext.BVBlend(window=window, ema_decay=ema_decay,
                                              initial_baseline=initial_baseline,
                                              min_history=min_history, eps=eps, scale=bv_scale,
                                              **keyed)
        elif name == "spo":
            self.spo = SPOTracker(num_keys, spo_discount, eps)
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
        if self.spo is not None:
            return self.spo(rewards, group_size, keys)
        if self.name == "rloo":
            out = rloo_advantages(rewards, group_size)
        else:
            out = bv_blend_ext.blend_advantages(rewards, group_size, eps=self.eps,
                                                scale=OP_SCALES[self.name])
        return Advantages(out.advantages, out.group_mean, out.group_std, out.beta, 0.0, 0.0)

    def state_dict(self) -> dict:
        if self.spo is not None:
            return self.spo.state_dict()
        return {} if self.blend is None else self.blend.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.blend is not None:
            self.blend.load_state_dict(state)
        elif self.spo is not None:
            self.spo.load_state_dict(state)
        elif state:
            raise ValueError(f"checkpoint holds an estimator state but estimator is {self.name!r}")
