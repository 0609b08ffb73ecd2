"""Exact-gradient simulation of the advantage estimators.

A task is P prompts, each a categorical policy over C candidate answers; answer a of prompt p
succeeds with probability q[p, a] (a Bernoulli reward). The policy is log-linear with weights
shared by every prompt, like an LLM's: logits[p, a] = phi[p, a] . w, with random features phi.
The success probabilities follow a hidden direction u of the same features plus a per-prompt
difficulty b[p]: q = sigmoid(signal * phi . u + b[p]), b[p] ~ U(DIFFICULTIES[difficulty]).
"mixed" spreads the prompts from hard (many all-zero groups) to easy; "uniform" gives every
prompt the same bias, so the history mean is a good baseline for all of them.

Everything the estimators are judged against is exact:
    J(w)     = mean_p sum_a pi[p, a] q[p, a]                        (expected success)
    grad J   = mean_p sum_a pi[p, a] (q[p, a] - V[p]) phi[p, a]      (V[p] = sum_a pi q)
A minibatch draws B prompts without replacement and k answers per prompt, and estimates
    g = 1/(B k) sum_i A_i (phi[p_i, a_i] - sum_b pi[p_i, b] phi[p_i, b])
with the advantages A from each estimator: the trainer's own (bv_blend.advantages), so that the
simulation judges exactly what training uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bv_blend.advantages import AdvantageEstimator

ESTIMATORS = ("grpo", "rloo", "dr_grpo", "batch", "bv_blend_group", "bv_blend")


DIFFICULTIES = {"mixed": (-5.0, 1.0), "uniform": (-2.0, -2.0)}  # ranges of the prompt bias b


@dataclass(frozen=True)
class SimConfig:
    prompts: int = 512
    answers: int = 32
    features: int = 64
    signal: float = 2.0
    difficulty: str = "mixed"  # a key of DIFFICULTIES
    batch_prompts: int = 16
    group_size: int = 8
    window: int = 100  # BVBlend's default history window
    lr: float = 0.01  # Adam, the same for every estimator
    steps: int = 400
    gap_fraction: float = 0.8  # success threshold: J0 + gap_fraction (Jmax - J0)
    warmup_steps: int = 30  # history warm-up before measuring variance at a fixed policy
    variance_samples: int = 500  # minibatch gradients per variance measurement


class Task:
    def __init__(self, cfg: SimConfig, seed: int):
        g = torch.Generator().manual_seed(seed)
        p, c, d = cfg.prompts, cfg.answers, cfg.features
        self.phi = torch.randn(p, c, d, generator=g, dtype=torch.float64)
        u = torch.randn(d, generator=g, dtype=torch.float64)
        self.direction = u / u.norm()
        lo, hi = DIFFICULTIES[cfg.difficulty]
        bias = lo + (hi - lo) * torch.rand(p, 1, generator=g, dtype=torch.float64)
        self.q = torch.sigmoid(cfg.signal * self.phi @ self.direction + bias)
        self.j_max = float(self.q.max(1).values.mean())

    def policy(self, w: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.phi @ w, dim=-1)

    def success(self, w: torch.Tensor) -> float:
        return float((self.policy(w) * self.q).sum(1).mean())

    def exact_gradient(self, w: torch.Tensor) -> torch.Tensor:
        pi = self.policy(w)
        value = (pi * self.q).sum(1, keepdim=True)
        return torch.einsum("pc,pcd->d", pi * (self.q - value), self.phi) / self.q.shape[0]

    def weights_at(self, target: float) -> torch.Tensor:
        """w = c * u with J(w) = target (bisection on c >= 0; J grows along u)."""
        lo, hi = 0.0, 1.0
        while self.success(hi * self.direction) < target:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.success(mid * self.direction) < target else (lo, mid)
        return hi * self.direction


class Estimator:
    """rewards (B*k,) float32 -> advantages (B*k,); bv_blend variants keep a history."""

    def __init__(self, name: str, cfg: SimConfig):
        if name not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")
        self.name, self.k = name, cfg.group_size
        if name.startswith("bv_blend"):
            self.estimator = AdvantageEstimator(
                "bv_blend", window=cfg.window,
                bv_scale="group" if name == "bv_blend_group" else "blend")
        else:
            self.estimator = AdvantageEstimator(name)

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        return self.estimator(rewards, self.k).advantages


def sample_gradient(task: Task, cfg: SimConfig, w: torch.Tensor, estimator: Estimator,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(minibatch gradient estimate (d,), rewards (B*k,)) at weights w."""
    b, k = cfg.batch_prompts, cfg.group_size
    prompts = torch.randperm(task.q.shape[0], generator=gen)[:b]
    phi = task.phi[prompts]  # (B, C, d)
    pi = torch.softmax(phi @ w, dim=-1)  # (B, C)
    answers = torch.multinomial(pi, k, replacement=True, generator=gen)  # (B, k)
    rewards = torch.bernoulli(task.q[prompts].gather(1, answers), generator=gen)
    adv = estimator(rewards.reshape(-1).float()).double().view(b, k)
    chosen = phi.gather(1, answers[..., None].expand(b, k, phi.shape[-1]))  # (B, k, d)
    mean_phi = torch.einsum("bc,bcd->bd", pi, phi)
    score = chosen - mean_phi[:, None, :]
    return torch.einsum("bk,bkd->d", adv, score) / (b * k), rewards.reshape(-1)


def gradient_stats(task: Task, cfg: SimConfig, w: torch.Tensor, name: str, seed: int) -> dict:
    """Trace of the covariance of the minibatch gradient at fixed weights w, and its alignment
    with the exact gradient. Every estimator sees the same draws (common random numbers)."""
    gen = torch.Generator().manual_seed(seed)
    est = Estimator(name, cfg)
    for _ in range(cfg.warmup_steps):
        sample_gradient(task, cfg, w, est, gen)
    exact = task.exact_gradient(w)
    m = cfg.variance_samples
    total = torch.zeros_like(exact)
    total_sq = 0.0
    cos_sum = 0.0
    for _ in range(m):
        g, _ = sample_gradient(task, cfg, w, est, gen)
        total += g
        total_sq += float(g @ g)
        norm = float(g.norm())
        cos_sum += float(g @ exact) / (norm * float(exact.norm())) if norm > 0 else 0.0
    mean = total / m
    trace = (total_sq - m * float(mean @ mean)) / (m - 1)
    return dict(trace_cov=trace, rel_var=trace / float(mean @ mean),
                cos_sample=cos_sum / m,
                cos_mean=float(mean @ exact) / (float(mean.norm()) * float(exact.norm())),
                norm_ratio=float(mean.norm() / exact.norm()))


def train(task: Task, cfg: SimConfig, name: str, seed: int) -> dict:
    """Adam on the sampled gradient from w = 0 (the uniform policy): the exact success J after
    every step, the batch mean reward of every step, and the first step with J >= threshold."""
    gen = torch.Generator().manual_seed(seed)
    est = Estimator(name, cfg)
    w = torch.zeros(task.phi.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=cfg.lr, maximize=True)
    j0 = task.success(w.detach())
    threshold = j0 + cfg.gap_fraction * (task.j_max - j0)
    curve, batch_reward = [], []
    hit = math.inf
    for step in range(1, cfg.steps + 1):
        g, rewards = sample_gradient(task, cfg, w.detach(), est, gen)
        w.grad = g
        opt.step()
        j = task.success(w.detach())
        curve.append(j)
        batch_reward.append(float(rewards.mean()))
        if j >= threshold and hit == math.inf:
            hit = step
    return dict(curve=curve, batch_reward=batch_reward, steps_to_threshold=hit,
                threshold=threshold, j0=j0, j_max=task.j_max)
