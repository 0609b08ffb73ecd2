"""Exact-gradient simulation of advantage estimators, vectorised over methods and seeds.

A task is P prompts, each a categorical policy over C candidate answers; answer a of prompt p
succeeds with probability q[p, a]. The policy is log-linear with weights shared by every prompt,
like an LLM's: logits[p, a] = phi[p, a] . w. Success follows a hidden direction u of the same
features plus a per-prompt difficulty b[p]: q = sigmoid(signal * phi . u + b[p]), b[p] drawn from
DIFFICULTIES[difficulty] ("mixed": hard prompts give all-zero groups, easy ones all-one groups;
"uniform": one bias for every prompt).

Everything an estimator is judged by is exact: J(w) = mean_p sum_a pi[p, a] q[p, a] and its
gradient, J on the hardest quartile of prompts (lowest success under the initial policy), and the
relative variance of the minibatch gradient measured at snapshots of each run's own policy and
estimator state.

A run is one (method, seed). All runs of a cell step together as one batch of tensors, and every
random draw (prompt schedule, answer uniforms, reward uniforms, reward noise) is shared by all
methods of a seed: answers are drawn by inverting each run's own policy CDF at the shared
uniforms, so two methods with the same policy draw the same answers and rewards (common random
numbers), which is what makes paired per-seed differences informative.

A method is a baseline x a scale (BASELINES x SCALES) with its own learning rate and setting:
    baseline  grpo    group mean (the GRPO/Dr.GRPO baseline)
              rloo    mean of the other k-1 rewards of the group (0 advantage at k = 1)
              bv      BV-Blend, one global history (bv_blend_ext.BVBlend): beta blends the group
                      mean with the EMA H of past group means; setting = the window
              bvk     BV-Blend, per-prompt history (BVBlend(num_keys=P)): the prompt's own EMA
                      moments once it has 2 visits, else the global history; setting = key alpha
              bvp     bv's history with the precision weight: beta = (s_G^2/k) / (s_G^2/k +
                      sigma_u^2), inverse-variance weighting of the group mean (variance s_G^2/k)
                      and H (spread sigma_u^2); s_G^2 = sigma_G^2, or the call's pooled within-
                      group variance for a tied group (see State.advantages); setting = window
              bvkp    bvk's history with the precision weight; setting = key alpha
              spo     the per-prompt success tracker of SPO (Xu & Ding, "Single-stream Policy
                      Optimization", arXiv 2509.13232): pseudo-counts a <- rho a + sum r,
                      b <- rho b + sum (1 - r), baseline a / (a + b); setting = the discount rho.
                      The paper adapts rho to the KL between the policies of successive visits
                      and initialises each prompt from extra samples; here rho is a tuned
                      constant, and a prompt's first visit uses its group mean (at k = 1 that
                      visit gives no gradient: the samples that initialise the tracker).
              oracle  the prompt's true expected (training) reward under the current policy
              global  the exact expected (training) reward over all prompts, J (or its noisy
                      counterpart)
    scale     none    1 (Dr.GRPO, RLOO and SPO's own baseline step)
              group   std of the group's rewards + eps (GRPO)
              blend   sqrt((1 - beta) sigma_G^2 + beta sigma_u^2) + eps, with the baseline's
                      own beta (BV-Blend's former default)
              batch   std of all the step's rewards + eps (SPO normalises over the batch)
The history baselines follow the op's contract (bv_blend_ext.reference), bvp and bvkp up to their
weight; tests/app/test_benchmarks_smoke.py checks them against BVBlend and KeyedHistoryReference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

BASELINES = ("grpo", "rloo", "bv", "bvk", "bvp", "bvkp", "spo", "oracle", "global", "exact")
SCALES = ("none", "group", "blend", "batch")
# The only baselines whose beta is not 0, so blend != group.
HISTORY_BASELINES = ("bv", "bvk", "bvp", "bvkp")
DIFFICULTIES = {"mixed": (-5.0, 1.0), "uniform": (-2.0, -2.0)}  # ranges of the prompt bias b
NOISES = ("clean", "flip", "gauss")
EPS = 1e-4


@dataclass(frozen=True)
class Method:
    baseline: str
    scale: str = "none"
    lr: float = 0.03
    setting: float = math.nan  # window (bv, bvp), key alpha (bvk, bvkp), discount (spo)

    @property
    def name(self) -> str:
        if self.baseline == "exact":
            return "exact_grad"
        return f"{self.baseline}/{self.scale}"


@dataclass(frozen=True)
class Cell:
    prompts: int = 256
    answers: int = 16
    features: int = 32
    signal: float = 2.0
    difficulty: str = "mixed"
    group_size: int = 8
    samples_per_step: int = 128  # batch prompts = samples_per_step / group_size
    steps: int = 200
    sampling: str = "epoch"  # "epoch": shuffled passes over the prompt set; "independent"
    noise: str = "clean"  # training rewards: clean, "flip" (labels flipped), "gauss" (+ N(0, s^2))
    noise_level: float = 0.0  # flip probability, or the Gaussian s
    snapshots: tuple = (0.25, 0.5)  # fractions of the run at which gradient noise is measured
    snapshot_draws: int = 256
    min_history: int = 2
    key_min_history: int = 2

    @property
    def batch_prompts(self) -> int:
        return self.samples_per_step // self.group_size

    @property
    def revisit_gap(self) -> float:
        return self.prompts / self.batch_prompts


class Tasks:
    """S tasks (one per seed) of one cell, as stacked tensors."""

    def __init__(self, cell: Cell, seeds: list[int]):
        s, p, c, d = len(seeds), cell.prompts, cell.answers, cell.features
        self.phi = torch.empty(s, p, c, d)
        self.q = torch.empty(s, p, c)
        lo, hi = DIFFICULTIES[cell.difficulty]
        for i, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            phi = torch.randn(p, c, d, generator=g, dtype=torch.float64)
            u = torch.randn(d, generator=g, dtype=torch.float64)
            bias = lo + (hi - lo) * torch.rand(p, 1, generator=g, dtype=torch.float64)
            self.phi[i] = phi.float()
            self.q[i] = torch.sigmoid(cell.signal * phi @ (u / u.norm()) + bias).float()
        self.j_max = self.q.amax(2).mean(1)  # (S,)
        v0 = self.q.mean(2)  # per-prompt success of the uniform initial policy
        self.hard = v0 <= v0.quantile(0.25, dim=1, keepdim=True)  # (S, P)


def expected_train_reward(v: torch.Tensor, cell: Cell) -> torch.Tensor:
    """E[training reward] of a prompt with clean success probability v."""
    if cell.noise == "flip":
        return cell.noise_level + (1 - 2 * cell.noise_level) * v
    return v


class Draws:
    """The random numbers of one cell and seed set, shared by every method."""

    def __init__(self, cell: Cell, seeds: list[int], stream: int):
        # A step's prompts must be distinct: the per-prompt histories take one group per prompt.
        if cell.prompts % cell.batch_prompts:
            raise ValueError(f"{cell.batch_prompts} prompts per step must divide {cell.prompts}")
        self.cell = cell
        self.gens = [torch.Generator().manual_seed(1_000_003 * stream + seed) for seed in seeds]
        self.order = [torch.empty(0, dtype=torch.int64) for _ in seeds]

    def prompts(self) -> torch.Tensor:
        """(S, B) prompt ids of the next step: distinct within a step."""
        cell, out = self.cell, []
        b = cell.batch_prompts
        for i, g in enumerate(self.gens):
            if cell.sampling == "independent":
                out.append(torch.randperm(cell.prompts, generator=g)[:b])
                continue
            if self.order[i].numel() < b:  # a new epoch
                self.order[i] = torch.cat([self.order[i], torch.randperm(cell.prompts, generator=g)])
            out.append(self.order[i][:b])
            self.order[i] = self.order[i][b:]
        return torch.stack(out)

    def uniforms(self, shape) -> torch.Tensor:
        """(S, *shape) uniforms, one row per seed."""
        return torch.stack([torch.rand(shape, generator=g) for g in self.gens])

    def normals(self, shape) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens])


class State:
    """Per-run state, (M methods, S seeds, ...): weights, Adam moments and every estimator's
    history (each run uses only its own baseline's; keeping all keeps the code one batch)."""

    def __init__(self, methods: list[Method], cell: Cell, num_seeds: int):
        m, s, p, d = len(methods), num_seeds, cell.prompts, cell.features
        self.cell = cell
        self.w = torch.zeros(m, s, d)
        self.adam_m = torch.zeros(m, s, d)
        self.adam_v = torch.zeros(m, s, d)
        self.t = 0
        self.lr = torch.tensor([x.lr for x in methods])[:, None, None]
        self.baseline = torch.tensor([BASELINES.index(x.baseline) for x in methods])
        self.scale = torch.tensor([SCALES.index(x.scale) for x in methods])
        # bv: a ring of the last `window` group means, and the EMA H with alpha = 2/(window + 1).
        # Column `max window` of the ring takes the writes of groups that a call of more than
        # `window` groups overwrites within the same call.
        window = torch.tensor([int(x.setting) if x.baseline in ("bv", "bvp") else 100
                               for x in methods])
        self.window = window[:, None].expand(m, s)
        self.ring = torch.zeros(m, s, int(window.max()) + 1, dtype=torch.float64)
        self.count = torch.zeros(m, s, dtype=torch.int64)
        self.ema = torch.zeros(m, s, dtype=torch.float64)
        self.alpha = (2.0 / (self.window + 1)).double()
        # bvk, bvkp: per-prompt visit count and EMA moments of the prompt's group means.
        self.key_alpha = torch.tensor([x.setting if x.baseline in ("bvk", "bvkp") else 0.25
                                       for x in methods], dtype=torch.float64)[:, None, None]
        self.key_n = torch.zeros(m, s, p, dtype=torch.int64)
        self.key_m = torch.zeros(m, s, p, dtype=torch.float64)
        self.key_v = torch.zeros(m, s, p, dtype=torch.float64)
        # spo: discounted success and failure pseudo-counts per prompt.
        self.rho = torch.tensor([x.setting if x.baseline == "spo" else 0.9 for x in methods],
                                dtype=torch.float64)[:, None, None]
        self.spo_a = torch.zeros(m, s, p, dtype=torch.float64)
        self.spo_b = torch.zeros(m, s, p, dtype=torch.float64)
        self.spo_n = torch.zeros(m, s, p, dtype=torch.int64)

    def global_history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, sigma_u^2) of the global history, (M, S): the ring's unbiased variance, 0 below
        max(2, min_history) entries."""
        n = torch.minimum(self.count, self.window)
        live = torch.arange(self.ring.shape[-1]) < n[..., None]
        mean = torch.where(live, self.ring, 0).sum(-1) / n.clamp(min=1)
        sq = torch.where(live, (self.ring - mean[..., None]) ** 2, 0).sum(-1)
        var = torch.where(n >= max(2, self.cell.min_history), sq / (n - 1).clamp(min=1), 0)
        return self.ema, var

    def advantages(self, rewards: torch.Tensor, prompts: torch.Tensor, v_batch: torch.Tensor,
                   j_all: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages (M, S, B, k) of rewards (M, S, B, k) float64 for prompts (S, B), given each
        batch prompt's expected training reward v_batch (M, S, B) and the global one j_all
        (M, S); with `update`, the histories then take in this step. Also returns which groups
        were tied (all rewards equal), (M, S, B)."""
        k = rewards.shape[-1]
        mu = rewards.mean(-1)
        var = rewards.var(-1) if k > 1 else torch.zeros_like(mu)
        idx = prompts[None].expand(mu.shape)
        h, u = self.global_history()
        h, u = h[..., None], u[..., None]

        def blend(hist_mean, hist_var):
            total = hist_var + var
            beta = torch.where(total > 0, hist_var / torch.where(total > 0, total, 1), 0)
            return (1 - beta) * mu + beta * hist_mean, beta, hist_var

        # The precision weight needs the variance of each group mean, s^2/k. A tied group's
        # sample variance 0 would claim an exact mean (beta = 0: B = mu_G, no advantage), yet
        # at small k ties are mostly chance (p = 0.3, k = 2: 58%). Its s^2 is the call's pooled
        # within-group variance instead: the mean sigma_G^2 over the call's groups, ties
        # included, an unbiased estimate of the batch prompts' average reward variance under the
        # current policy. It assumes no reward distribution (Bernoulli or not) and scales with
        # the rewards like sigma_G^2 and sigma_u^2, so beta is scale-free. With one reward per
        # group there is no within-group variance; the variance of all the call's rewards (within
        # plus between prompts: an upper bound) stands in.
        pooled = var.mean(-1, keepdim=True) if k > 1 else rewards.flatten(2).var(-1)[..., None]
        mean_var = torch.where(var > 0, var, pooled) / k

        def precision(hist_mean, hist_var):
            # sigma_u^2 = 0 is the op's "no usable history"; a history of identical group means
            # (two visits of a tied prompt) is no evidence that H is exact either: beta = 0.
            has = hist_var > 0
            beta = torch.where(has, mean_var / torch.where(has, mean_var + hist_var, 1), 0)
            return (1 - beta) * mu + beta * hist_mean, beta

        keyed = self.key_n.gather(2, idx) >= self.cell.key_min_history
        bvk_h = torch.where(keyed, self.key_m.gather(2, idx), h)
        bvk_u = torch.where(keyed, self.key_v.gather(2, idx), u)
        a, b = self.spo_a.gather(2, idx), self.spo_b.gather(2, idx)
        spo = torch.where(self.spo_n.gather(2, idx) > 0, a / (a + b).clamp(min=1e-300), mu)
        zero = torch.zeros_like(mu)
        # rloo's baseline is per sample (`loo`, below); exact's advantages are never used.
        bv_base, bv_beta, bv_u = blend(h, u)
        bvk_base, bvk_beta, bvk_u = blend(bvk_h, bvk_u)
        bvp_base, bvp_beta = precision(h, u)
        bvkp_base, bvkp_beta = precision(bvk_h, bvk_u)
        total = rewards.sum(-1, keepdim=True)
        loo = (total - rewards) / (k - 1) if k > 1 else rewards
        per_group = {"grpo": (mu, zero, zero), "bv": (bv_base, bv_beta, bv_u.expand_as(mu)),
                     "bvk": (bvk_base, bvk_beta, bvk_u),
                     "bvp": (bvp_base, bvp_beta, bv_u.expand_as(mu)),
                     "bvkp": (bvkp_base, bvkp_beta, bvk_u), "spo": (spo, zero, zero),
                     "oracle": (v_batch, zero, zero), "global": (j_all[..., None].expand_as(mu), zero, zero),
                     "exact": (mu, zero, zero), "rloo": (mu, zero, zero)}
        base = torch.stack([per_group[x][0] for x in BASELINES])  # (NB, M, S, B)
        beta = torch.stack([per_group[x][1] for x in BASELINES])
        hist_var = torch.stack([per_group[x][2] for x in BASELINES])
        pick = self.baseline[None, :, None, None].expand(1, *mu.shape)
        base, beta, hist_var = (t.gather(0, pick)[0] for t in (base, beta, hist_var))
        baseline = torch.where((self.baseline == BASELINES.index("rloo"))[:, None, None, None],
                               loo, base[..., None])
        flat = rewards.flatten(2)
        batch_std = flat.std(-1)[..., None] + EPS  # (M, S, 1)
        scales = torch.stack([torch.ones_like(mu), var.sqrt() + EPS,
                              ((1 - beta) * var + beta * hist_var).sqrt() + EPS,
                              batch_std.expand_as(mu)])
        scale = scales.gather(0, self.scale[None, :, None, None].expand(1, *mu.shape))[0]
        adv = (rewards - baseline) / scale[..., None]
        if update:
            self._push(mu, idx, rewards)
        return adv, var == 0

    def _push(self, mu, idx, rewards):
        g = mu.shape[-1]
        order = torch.arange(g)
        pos = (self.count[..., None] + order) % self.window[..., None]
        pos = torch.where(order >= g - self.window[..., None], pos, self.ring.shape[-1] - 1)
        self.ring.scatter_(2, pos, mu)
        decay = (1 - self.alpha)[..., None] ** (g - 1 - order)
        self.ema = (1 - self.alpha) ** g * self.ema + (self.alpha[..., None] * decay * mu).sum(-1)
        self.count += g

        n, m, v = (t.gather(2, idx) for t in (self.key_n, self.key_m, self.key_v))
        d = mu - m
        first = n == 0
        a = self.key_alpha
        self.key_m.scatter_(2, idx, torch.where(first, mu, m + a * d))
        self.key_v.scatter_(2, idx, torch.where(first, 0.0, (1 - a) * (v + a * d * d)))
        self.key_n.scatter_(2, idx, n + 1)

        k = rewards.shape[-1]
        successes = rewards.sum(-1)
        self.spo_a.scatter_(2, idx, self.rho * self.spo_a.gather(2, idx) + successes)
        self.spo_b.scatter_(2, idx, self.rho * self.spo_b.gather(2, idx) + (k - successes))
        self.spo_n.scatter_(2, idx, self.spo_n.gather(2, idx) + 1)

    def adam(self, grad: torch.Tensor) -> None:
        """One Adam ascent step (betas 0.9, 0.999) with each method's learning rate."""
        self.t += 1
        self.adam_m.mul_(0.9).add_(0.1 * grad)
        self.adam_v.mul_(0.999).add_(0.001 * grad * grad)
        m_hat = self.adam_m / (1 - 0.9 ** self.t)
        v_hat = self.adam_v / (1 - 0.999 ** self.t)
        self.w += self.lr * m_hat / (v_hat.sqrt() + 1e-8)


def policy_values(tasks: Tasks, w: torch.Tensor):
    """(pi (M, S, P, C), V (M, S, P)): the policy over all prompts and each prompt's success."""
    pi = torch.softmax(torch.einsum("spcd,msd->mspc", tasks.phi, w), -1)
    return pi, (pi * tasks.q).sum(-1)


def exact_gradient(tasks: Tasks, pi, v) -> torch.Tensor:
    """grad J (M, S, d)."""
    return torch.einsum("mspc,spcd->msd", pi * (tasks.q - v[..., None]), tasks.phi) / pi.shape[2]


def sample_step(tasks: Tasks, cell: Cell, state: State, draws: Draws, v_all: torch.Tensor,
                update: bool):
    """One minibatch: (gradient estimate (M, S, d), tied groups (M, S, B), prompts (S, B))."""
    prompts = draws.prompts()  # (S, B)
    s_idx = torch.arange(prompts.shape[0])[:, None]
    phi_b = tasks.phi[s_idx, prompts]  # (S, B, C, d)
    q_b = tasks.q[s_idx, prompts]  # (S, B, C)
    k = cell.group_size
    pi = torch.softmax(torch.einsum("sbcd,msd->msbc", phi_b, state.w), -1)
    m = pi.shape[0]
    u_answer = draws.uniforms((cell.batch_prompts, k))[None].expand(m, -1, -1, -1)
    cdf = pi.cumsum(-1)
    answers = torch.searchsorted(cdf.contiguous(), u_answer.contiguous()).clamp(max=cell.answers - 1)
    success = q_b[None].expand(m, -1, -1, -1).gather(3, answers)
    rewards = (draws.uniforms((cell.batch_prompts, k))[None] < success).double()
    if cell.noise == "flip":
        flip = draws.uniforms((cell.batch_prompts, k))[None] < cell.noise_level
        rewards = torch.where(flip, 1 - rewards, rewards)
    elif cell.noise == "gauss":
        rewards = rewards + cell.noise_level * draws.normals((cell.batch_prompts, k))[None].double()
    v_train = expected_train_reward(v_all, cell)
    v_batch = v_train.gather(2, prompts[None].expand(m, -1, -1)).double()
    adv, tied = state.advantages(rewards, prompts, v_batch, v_train.mean(-1).double(), update)
    adv = adv.float()
    weights = torch.zeros_like(pi).scatter_add_(3, answers, adv) - adv.sum(-1, keepdim=True) * pi
    grad = torch.einsum("msbc,sbcd->msd", weights, phi_b) / (cell.batch_prompts * k)
    return grad, tied, prompts


def snapshot(tasks: Tasks, cell: Cell, state: State, seeds: list[int], stream: int,
             pi, v) -> dict:
    """Gradient noise of every run at its current policy and estimator state (frozen: the
    draws do not update the histories). rel_var = tr Cov(g) / |E g|^2; cos = cos(E g, grad J)."""
    draws = Draws(replace(cell, sampling="independent"), seeds, stream)
    total = torch.zeros_like(state.w, dtype=torch.float64)
    total_sq = torch.zeros(state.w.shape[:2], dtype=torch.float64)
    n = cell.snapshot_draws
    for _ in range(n):
        g, _, _ = sample_step(tasks, cell, state, draws, v, update=False)
        total += g.double()
        total_sq += (g.double() ** 2).sum(-1)
    mean = total / n
    mean_sq = (mean ** 2).sum(-1)
    trace = (total_sq - n * mean_sq) / (n - 1)
    exact = exact_gradient(tasks, pi, v).double()
    cos = (mean * exact).sum(-1) / (mean.norm(dim=-1) * exact.norm(dim=-1)).clamp(min=1e-300)
    # A method that gives no gradient at all (GRPO at k = 1) has no relative variance.
    return dict(rel_var=torch.where(mean_sq > 0, trace / mean_sq.clamp(min=1e-300), math.nan),
                cos=cos)


def run_cell(cell: Cell, methods: list[Method], seeds: list[int]) -> dict:
    """Trains every (method, seed) for cell.steps steps. Returns tensors (M, S, ...): J and
    hard-quartile J after every step (index 0 = initial), snapshot statistics, the fraction of
    tied groups, and per-seed visit counts of the prompts."""
    torch.manual_seed(0)
    tasks = Tasks(cell, seeds)
    state = State(methods, cell, len(seeds))
    draws = Draws(cell, seeds, stream=1)
    is_exact = state.baseline == BASELINES.index("exact")
    steps = cell.steps
    j = torch.empty(len(methods), len(seeds), steps + 1)
    j_hard = torch.empty_like(j)
    tied = torch.zeros(len(methods), len(seeds))
    visits = torch.zeros(len(seeds), cell.prompts)
    snap_at = {max(1, round(f * steps)): f for f in cell.snapshots}
    snaps = {}
    hard = tasks.hard.float()
    for t in range(steps + 1):
        pi, v = policy_values(tasks, state.w)
        j[:, :, t] = v.mean(-1)
        j_hard[:, :, t] = (v * hard).sum(-1) / hard.sum(-1)
        if t in snap_at:
            snaps[snap_at[t]] = snapshot(tasks, cell, state, seeds, 2 + t, pi, v)
        if t == steps:
            break
        grad, tied_t, prompts = sample_step(tasks, cell, state, draws, v, update=True)
        if is_exact.any():
            grad[is_exact] = exact_gradient(tasks, pi[is_exact], v[is_exact])
        tied += tied_t.double().mean(-1).float()
        visits.scatter_add_(1, prompts, torch.ones(prompts.shape))
        state.adam(grad)
    return dict(j=j, j_hard=j_hard, j_max=tasks.j_max, snapshots=snaps, tied=tied / steps,
                visits=visits)


def run_metrics(out: dict, gap_fraction: float = 0.8) -> dict:
    """Per-run scalar metrics (M, S) from run_cell's output. auc = mean over the run of the
    fraction of the gap J0 -> Jmax closed; j_at_x = J after x of the sample budget."""
    j, j_max = out["j"], out["j_max"][None, :]
    j0 = j[:, :, :1]
    gap = (j - j0) / (j_max[..., None] - j0)
    steps = j.shape[-1] - 1
    reached = gap >= gap_fraction
    first = torch.where(reached.any(-1), reached.float().argmax(-1).float(), torch.tensor(math.inf))
    metrics = dict(auc=gap[..., 1:].mean(-1), j_final=j[..., -1], j_hard_final=out["j_hard"][..., -1],
                   j_at_25=j[..., round(0.25 * steps)], j_at_50=j[..., round(0.5 * steps)],
                   steps_to_80=first, frac_tied=out["tied"])
    for f, snap in out["snapshots"].items():
        metrics[f"rel_var_{round(100 * f)}"] = snap["rel_var"].float()
        metrics[f"cos_{round(100 * f)}"] = snap["cos"].float()
    return metrics
