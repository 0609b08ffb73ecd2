"""Estimator evidence: BV-Blend against GRPO, RLOO, Dr.GRPO and batch scaling.

    python benchmarks/bench_estimators.py sim        # exact-gradient simulation (~7.5 min, 1 core)
    python benchmarks/bench_estimators.py trainer    # the real trainer + tiny model (~20 min)
    python benchmarks/bench_estimators.py sim --quick       # seconds (smoke test)
    python benchmarks/bench_estimators.py trainer --quick

Trainer estimators: grpo (scale "group"), rloo (leave-one-out mean, unscaled), dr_grpo (group
mean, unscaled), batch (group mean, batch std), bv_blend_group / bv_blend / bv_blend_none
(BVBlend with scale "group", "blend", "none" (the default)), bv_keyed / bv_keyed_none (BVBlend
with a history per prompt, scale "blend" / "none") and spo (a per-prompt success tracker). The
simulation's names are baseline/scale pairs (see estimator_sim.py). Both report paired per-seed
differences with 95% bootstrap intervals. Writes <mode>.md, <mode>_runs.csv, <mode>_tuning.csv
and <mode>.png under benchmarks/results/estimators/.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

if not __package__:
    # Run as `python benchmarks/bench_estimators.py`: the repository root makes this script's
    # siblings importable as the `benchmarks` package, as they are under pytest.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import estimator_sim as sim  # noqa: E402
from benchmarks import harness  # noqa: E402
from bv_blend.advantages import AdvantageEstimator  # noqa: E402

RESULTS = harness.RESULTS / "estimators"


# statistics ----------------------------------------------------------------------------------

def median_ci(values, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(median, lower, upper): the median over seeds with a 95% percentile-bootstrap interval.
    Values may be inf (a run that never reached the threshold)."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boots = np.median(x[rng.integers(0, len(x), (resamples, len(x)))], axis=1)
    # inverted_cdf: no interpolation, so an interval bound may be inf but never nan.
    return (float(np.median(x)), float(np.quantile(boots, 0.025, method="inverted_cdf")),
            float(np.quantile(boots, 0.975, method="inverted_cdf")))


def fmt(stat: tuple[float, float, float], digits: int = 3, unit: str = "") -> str:
    def one(v):
        if math.isinf(v):
            return "never"
        return f"{v:.{digits}g}{unit}" if abs(v) < 1e4 else f"{v:.2e}{unit}"
    m, lo, hi = stat
    return f"{one(m)} [{one(lo)}, {one(hi)}]"


def summary(runs: list[dict], key: str, scale: float = 1.0) -> str:
    """`key` (times `scale`) over runs, one per seed: median [95% interval], as a table cell."""
    return fmt(median_ci([scale * r[key] for r in runs]))


def reached(runs: list[dict]) -> str:
    """How many of the runs reached the threshold, of how many."""
    return f"{sum(math.isfinite(r['steps_to_threshold']) for r in runs)}/{len(runs)}"


def _band(ax, curves: np.ndarray, label: str):
    steps = np.arange(1, curves.shape[1] + 1)
    ax.plot(steps, np.median(curves, 0), label=label, lw=1.2)
    ax.fill_between(steps, np.quantile(curves, 0.25, 0), np.quantile(curves, 0.75, 0), alpha=0.15)


# part B1: the simulation ---------------------------------------------------------------------

LRS = (0.03, 0.1, 0.3, 1.0)  # Adam learning rates tried for every method
SETTINGS = {"bv": (20, 100, 500),  # window
            "bvk": (0.1, 0.25, 0.5),  # key EMA alpha
            "bvp": (20, 100, 500),  # bv's history, the precision weight
            "bvkp": (0.1, 0.25, 0.5),
            "spo": (0.5, 0.8, 0.95)}  # discount rho
REFERENCE = "grpo/group"
NOISE_FLOOR = ("rloo/none", "grpo/none")  # RLOO = k/(k-1) x Dr.GRPO: a difference Adam cancels
TUNING_SEEDS = range(1000, 1005)


def grid(k: int) -> list[tuple[str, str]]:
    """(baseline, scale) pairs of the grid; blend differs from group only with a history."""
    pairs = [(b, s) for b in sim.BASELINES if b != "exact" for s in sim.SCALES
             if s != "blend" or b in sim.HISTORY_BASELINES]
    return pairs + [("exact", "none")]


def candidates(baseline: str, scale: str) -> list[sim.Method]:
    return [sim.Method(baseline, scale, lr, setting)
            for lr in LRS for setting in SETTINGS.get(baseline, (math.nan,))]


def sim_cells(quick: bool) -> dict[str, sim.Cell]:
    """The factors of issue 12. The k sweep keeps the prompt set (so the tasks of a seed) and
    the samples per step fixed, so k = 1 (128 x 1) and k = 8 (16 x 8) are compared on the same
    tasks; the revisit gap is then prompts / (samples / k) = 4k. The gap sweep varies the
    prompt set at a fixed k."""
    if quick:
        base = sim.Cell(prompts=32, answers=6, features=8, samples_per_step=16, steps=12,
                        snapshot_draws=4)
        return {"k=8 mixed": replace(base, group_size=8), "k=1 mixed": replace(base, group_size=1)}
    base = sim.Cell(prompts=512, features=64, steps=100)
    cells = {}
    for difficulty in ("mixed", "uniform"):
        for k in (1, 2, 4, 8, 16):
            cells[f"k={k} {difficulty}"] = replace(base, group_size=k, difficulty=difficulty)
    for k, prompts in ((8, 64), (8, 256), (8, 1024)):
        cells[f"k={k} mixed gap {prompts * k // 128}"] = replace(base, group_size=k, prompts=prompts)
    for k in (8, 1):
        cells[f"k={k} mixed independent"] = replace(base, group_size=k, sampling="independent")
        cells[f"k={k} mixed flip 0.2"] = replace(base, group_size=k, noise="flip", noise_level=0.2)
        cells[f"k={k} mixed gauss 0.5"] = replace(base, group_size=k, noise="gauss", noise_level=0.5)
    return cells


def tune(cell: sim.Cell, seeds) -> tuple[dict[str, sim.Method], list[dict]]:
    """Each grid method's (lr, setting) with the best mean AUC over the tuning seeds."""
    methods = [m for b, s in grid(cell.group_size) for m in candidates(b, s)]
    auc = sim.run_metrics(sim.run_cell(replace(cell, snapshots=()), methods, list(seeds)))["auc"]
    rows, best = [], {}
    for i, m in enumerate(methods):
        score = float(auc[i].mean())
        rows.append(dict(method=m.name, lr=m.lr, setting=m.setting, auc_mean=score))
        if m.name not in best or score > best[m.name][0]:
            best[m.name] = (score, m)
    return {name: m for name, (_, m) in best.items()}, rows


def paired(diffs: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of per-seed differences with a 95% percentile-bootstrap interval, wins/losses and
    the two-sided sign-test p (ties dropped)."""
    rng = np.random.default_rng(seed)
    boots = diffs[rng.integers(0, len(diffs), (resamples, len(diffs)))].mean(1)
    wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n if n else 1.0
    return dict(mean=float(diffs.mean()), lo=float(np.quantile(boots, 0.025)),
                hi=float(np.quantile(boots, 0.975)), wins=wins, losses=losses, p=min(1.0, 2 * tail))


def run_sim(cells: dict[str, sim.Cell], seeds: int, log=print):
    """Tunes every method of every cell on TUNING_SEEDS, then runs the tuned methods on seeds
    0..seeds-1. Returns (run rows, tuning rows, J curves {(cell, method): (S, T+1)}, visits)."""
    torch.set_num_threads(1)
    runs, tuning, curves, visits = [], [], {}, {}
    for name, cell in cells.items():
        t0 = time.perf_counter()
        best, rows = tune(cell, TUNING_SEEDS)
        tuning += [dict(cell=name, **r) for r in rows]
        methods = list(best.values())
        out = sim.run_cell(cell, methods, list(range(seeds)))
        metrics = sim.run_metrics(out)
        for i, m in enumerate(methods):
            curves[(name, m.name)] = out["j"][i].numpy()
            for s in range(seeds):
                runs.append(dict(cell=name, k=cell.group_size, difficulty=cell.difficulty,
                                 prompts=cell.prompts, gap=cell.revisit_gap, sampling=cell.sampling,
                                 noise=cell.noise, noise_level=cell.noise_level, method=m.name,
                                 baseline=m.baseline, scale=m.scale, lr=m.lr, setting=m.setting,
                                 seed=s, **{key: float(v[i, s]) for key, v in metrics.items()}))
        v = out["visits"]
        visits[name] = dict(min=float(v.min()), median=float(v.median()), max=float(v.max()))
        log(f"  {name}: tuned {len(rows)} configs x {len(TUNING_SEEDS)} seeds, ran "
            f"{len(methods)} x {seeds} seeds in {time.perf_counter() - t0:.0f} s")
    return runs, tuning, curves, visits


def by_seed(runs, cell: str, method: str, key: str) -> np.ndarray:
    rows = sorted((r for r in runs if r["cell"] == cell and r["method"] == method),
                  key=lambda r: r["seed"])
    return np.array([r[key] for r in rows])


def reference_cell(cell: str) -> str:
    """Where a cell's reference (grpo/group) runs: k = 1 groups give GRPO no gradient at all, so
    k = 1 cells are compared with GRPO at k = 8 on the same tasks (same prompt set and seeds)
    and the same samples per step: SPO's 128 x 1 against GRPO's 16 x 8."""
    return cell.replace("k=1 ", "k=8 ", 1) if cell.startswith("k=1 ") else cell


def diff_cell(runs, cell: str, method: str, ref: str, key: str = "auc", scale: float = 100,
              ref_cell: str | None = None) -> str:
    """Paired difference of `key` (x scale), method - ref (in ref_cell, default this cell), as
    a table cell."""
    d = paired(scale * (by_seed(runs, cell, method, key)
                        - by_seed(runs, ref_cell or cell, ref, key)))
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] {d['wins']}/{d['losses']}"


def sim_markdown(runs, tuning, visits, cells, seeds: int, command: str) -> str:
    base = next(iter(cells.values()))
    lines = ["# Estimator simulation: baseline x scale grid, paired", "",
             f"Command: `{command}`", "",
             f"Each cell: a log-linear policy over {base.answers} answers per prompt on "
             f"{base.features} shared features, Bernoulli rewards, {base.samples_per_step} samples "
             f"per step (prompts x k), {base.steps} Adam steps. Every method's lr (from {LRS}) and "
             f"setting (bv/bvp window {SETTINGS['bv']}, bvk/bvkp key alpha {SETTINGS['bvk']}, "
             f"spo discount {SETTINGS['spo']}) is tuned per cell on seeds {TUNING_SEEDS.start}.."
             f"{TUNING_SEEDS.stop - 1} (best mean AUC); the tables are {seeds} other seeds "
             "(a seed = a task + its draws), all methods sharing the draws.", "",
             "- `AUC` = mean over the run of the fraction of the gap J0 -> Jmax closed (exact J "
             "over all prompts; x100). `J hard` = exact J on the hardest quartile of prompts "
             "after the run (x100).",
             "- `dAUC vs grpo/group` = mean per-seed paired difference x100 [95% bootstrap "
             "interval] wins/losses; `p` = two-sided sign test.",
             "- `rel var` = tr Cov(g) / |E g|^2 at a quarter of the run, from each run's own "
             f"policy and estimator state ({base.snapshot_draws} draws, state frozen); median "
             "per-seed ratio to grpo/group.",
             f"- noise floor: {NOISE_FLOOR[0]} - {NOISE_FLOOR[1]} (the same estimator up to a "
             "constant factor).", ""]
    names = list(cells)
    lines += ["## Summary: dAUC x100 vs grpo/group, mean [95% CI] wins/losses", "",
              "| cell | gap | visits/prompt | noise floor | " + " | ".join(SUMMARY) + " |",
              "|---|---:|---:|---|" + "---|" * len(SUMMARY)]
    for c in names:
        present = {r["method"] for r in runs if r["cell"] == c}
        cells_txt = [diff_cell(runs, c, m, REFERENCE, ref_cell=reference_cell(c))
                     if m in present else "" for m in SUMMARY]
        lines.append(f"| {c} | {cells[c].revisit_gap:g} | {visits[c]['median']:g} "
                     f"| {diff_cell(runs, c, *NOISE_FLOOR)} | " + " | ".join(cells_txt) + " |")
    sweep = [c for c in names if c.count(" ") == 1 and c.startswith("k=")]
    if any(f"k=8 {c.split()[1]}" in cells for c in sweep):
        lines += ["", "## Equal samples per step: dAUC x100 vs grpo/group at k=8 on the same tasks "
                  f"({base.samples_per_step} samples per step; prompts x k)", "",
                  "| cell | " + " | ".join(SUMMARY) + " |", "|---|" + "---|" * len(SUMMARY)]
        for c in sweep:
            ref = f"k=8 {c.split()[1]}"
            if ref in cells:
                present = {r["method"] for r in runs if r["cell"] == c}
                lines.append(f"| {c} | " + " | ".join(
                    diff_cell(runs, c, m, REFERENCE, ref_cell=ref) if m in present else ""
                    for m in SUMMARY) + " |")
    lines += ["", "## Contrasts: paired dAUC x100 within each cell, first minus second, mean "
              "[95% CI] wins/losses", "",
              "| cell | " + " | ".join(f"{a} - {b}" for a, b in CONTRASTS) + " |",
              "|---|" + "---|" * len(CONTRASTS)]
    for c in names:
        lines.append(f"| {c} | " + " | ".join(diff_cell(runs, c, a, b) for a, b in CONTRASTS) + " |")
    lines += ["", "## The precision weight against the article's: paired dAUC x100 within each cell, "
              "first minus second, mean [95% CI] wins/losses", "",
              "bvp, bvkp: beta = (s_G^2/k) / (s_G^2/k + sigma_u^2) on bv's and bvk's histories "
              "(s_G^2 of a tied group = the call's pooled within-group variance; at k = 1 the "
              "variance of the call's rewards); bv, bvk: the article's beta = sigma_u^2 / "
              "(sigma_u^2 + sigma_G^2).", "",
              "| cell | " + " | ".join(f"{a} - {b}" for a, b in WEIGHT_CONTRASTS) + " |",
              "|---|" + "---|" * len(WEIGHT_CONTRASTS)]
    for c in names:
        lines.append(f"| {c} | " + " | ".join(diff_cell(runs, c, a, b)
                                              for a, b in WEIGHT_CONTRASTS) + " |")
    for c in names:
        lines += ["", f"## {c}", "",
                  f"{cells[c].prompts} prompts, {cells[c].batch_prompts} x {cells[c].group_size} "
                  f"per step, {cells[c].sampling} sampling, revisit gap {cells[c].revisit_gap:g}, "
                  f"visits per prompt min {visits[c]['min']:g} / median {visits[c]['median']:g} / "
                  f"max {visits[c]['max']:g}, training rewards {cells[c].noise}"
                  + (f" {cells[c].noise_level}" if cells[c].noise != "clean" else "") + ".", "",
                  "| method | lr | setting | AUC | dAUC vs grpo/group | p | J final | J hard "
                  "| dJ hard | rel var x grpo | tied groups |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|"]
        rows = [r for r in runs if r["cell"] == c]
        rc = reference_cell(c)
        if rc != c:
            lines += [f"Reference: {REFERENCE} of cell `{rc}` (same tasks and seeds).", ""]
        ref_rv = by_seed(runs, rc, REFERENCE, "rel_var_25")
        for m in dict.fromkeys(r["method"] for r in rows):
            one = [r for r in rows if r["method"] == m]
            d = paired(100 * (by_seed(runs, c, m, "auc") - by_seed(runs, rc, REFERENCE, "auc")))
            rv = np.median(by_seed(runs, c, m, "rel_var_25") / ref_rv) if m != "exact_grad" else math.nan
            setting = "" if math.isnan(one[0]["setting"]) else f"{one[0]['setting']:g}"
            lines.append(
                f"| {m} | {one[0]['lr']:g} | {setting} | {fmt(median_ci([100 * r['auc'] for r in one]))} "
                f"| {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] {d['wins']}/{d['losses']} "
                f"| {d['p']:.2g} | {fmt(median_ci([100 * r['j_final'] for r in one]))} "
                f"| {fmt(median_ci([100 * r['j_hard_final'] for r in one]))} "
                f"| {diff_cell(runs, c, m, REFERENCE, 'j_hard_final', ref_cell=rc)} "
                f"| {'' if math.isnan(rv) else f'{rv:.3g}'} "
                f"| {np.mean([r['frac_tied'] for r in one]):.2f} |")
    return "\n".join(lines) + "\n"


CONTRASTS = (("bv/none", "bv/blend"), ("bvk/none", "bvk/blend"), ("bvk/none", "bv/none"),
             ("bvk/blend", "bv/blend"), ("bvk/none", "spo/batch"), ("bvk/none", "rloo/none"),
             ("oracle/none", "bvk/none"))
WEIGHT_CONTRASTS = (("bvp/none", "bv/none"), ("bvkp/none", "bvk/none"), ("bvp/blend", "bv/blend"),
                    ("bvkp/blend", "bvk/blend"), ("bvp/none", "bvp/blend"),
                    ("bvkp/none", "bvkp/blend"))
SUMMARY = ("grpo/none", "rloo/none", "bv/blend", "bv/none", "bvp/none", "bvk/blend", "bvk/none",
           "bvkp/none", "spo/batch", "spo/none", "oracle/none", "global/none")


def sim_plot(path: Path, runs, curves, cells) -> None:
    names = list(cells)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    shown = [m for m in methods if m not in ("exact_grad", REFERENCE)]
    table = np.full((len(names), len(shown)), np.nan)
    for i, c in enumerate(names):
        for j, m in enumerate(shown):
            if any(r["cell"] == c and r["method"] == m for r in runs):
                table[i, j] = 100 * np.mean(by_seed(runs, c, m, "auc")
                                            - by_seed(runs, reference_cell(c), REFERENCE, "auc"))
    with harness.figure(path, 1, 2, figsize=(17, 0.42 * len(names) + 3.5),
                        gridspec_kw=dict(width_ratios=[2.2, 1])) as (_, axes):
        # Clipped at +-3: the interesting differences are a few points; the failures (group
        # scale with a history, GRPO at k = 1) are tens and are printed in their cells.
        im = axes[0].imshow(np.clip(table, -3, 3), cmap="RdBu", vmin=-3, vmax=3, aspect="auto")
        for (i, j), v in np.ndenumerate(table):
            if np.isfinite(v):
                axes[0].text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=5)
        axes[0].set_xticks(range(len(shown)), shown, rotation=60, ha="right", fontsize=7)
        axes[0].set_yticks(range(len(names)), names, fontsize=7)
        axes[0].set_title("AUC x100 minus grpo/group's, mean paired difference (blue = better)",
                          fontsize=9)
        plt_colorbar = axes[0].figure.colorbar(im, ax=axes[0], fraction=0.03)
        plt_colorbar.ax.tick_params(labelsize=7)
        main = names[0] if len(names) < 4 else "k=2 mixed"
        for m in ("grpo/group", "rloo/none", "bv/blend", "bv/none", "bvp/none", "bvk/blend",
                  "bvk/none", "bvkp/none", "spo/batch", "oracle/none"):
            if (main, m) in curves:
                c = curves[(main, m)]
                _band(axes[1], c[:, 1:], m)
        axes[1].set(title=f"exact J, {main} (median, IQR over seeds)", xlabel="step", ylabel="J")
        axes[1].legend(fontsize=7)


# part B2: the real trainer -------------------------------------------------------------------

TRAINER_ESTIMATORS = {  # name -> GRPOConfig overrides; the benchmark builds the others itself
    "grpo": dict(estimator="grpo"),
    "rloo": dict(estimator="rloo"),
    "dr_grpo": dict(estimator="dr_grpo"),
    "batch": dict(estimator="batch"),
    "bv_blend_group": dict(estimator="bv_blend", bv_scale="group"),
    "bv_blend": dict(estimator="bv_blend", bv_scale="blend"),
    "bv_blend_none": dict(estimator="bv_blend", bv_scale="none"),
    # Keyed by prompt (PromptKeys below): the trainer's own --bv-key prompt needs a finite
    # prompt set (--num-prompts), which would change the data every other estimator sees.
    "bv_keyed": dict(estimator="bv_blend", bv_scale="blend"),
    "bv_keyed_none": dict(estimator="bv_blend", bv_scale="none"),
    "spo": {},
}


class PromptKeys:
    """Gives the trainer's estimator an id per distinct prompt of the task's endless stream, in
    order of first sight, and the keyed estimators the ids of the step's prompts."""

    def __init__(self, trainer, estimator, num_keys: int):
        self.ids, self.num_keys, self.current = {}, num_keys, []
        self.estimator = estimator
        next_positions = trainer._next_positions

        def remember():
            positions = next_positions()
            self.current = [self.ids.setdefault(trainer.data[p]["prompt"], len(self.ids))
                            for p in positions]
            return positions
        trainer._next_positions = remember

    def __call__(self, rewards, group_size, keys=None):
        # The trainer passes keys only under --bv-key; these runs use the benchmark's own ids.
        return self.estimator(rewards, group_size, keys=torch.tensor(self.current, dtype=torch.int64))


def keyed_estimator(trainer, name: str, num_keys: int):
    """bv_keyed*: per-prompt BV-Blend, the keyed op (BVBlend(num_keys=...)) with the config's
    settings and the default key settings; spo: advantages.AdvantageEstimator("spo")."""
    if name == "spo":
        return PromptKeys(trainer, AdvantageEstimator("spo", num_keys=num_keys), num_keys)
    cfg = trainer.config
    estimator = AdvantageEstimator(
        "bv_blend", eps=cfg.advantage_eps, window=cfg.bv_window, ema_decay=cfg.bv_ema_decay,
        min_history=cfg.bv_min_history, initial_baseline=cfg.bv_initial_baseline,
        bv_scale=cfg.bv_scale, num_keys=num_keys)
    return PromptKeys(trainer, estimator, num_keys)


def task_prompts(task: str) -> list[dict]:
    """Every distinct prompt of a procedural task with a small prompt set (add: 100)."""
    if task.startswith("add"):
        return [{"prompt": f"{a}+{b}=", "answer": f"{a + b:02d}"} for a in range(10) for b in range(10)]
    raise ValueError(f"no fixed evaluation set for task {task!r}")


@torch.no_grad()
def expected_reward(trainer, examples: list[dict], samples: int, seed: int = 12345) -> float:
    """Mean reward over every prompt of the task, `samples` sampled completions each, at the
    training temperature: the policy's expected reward up to ~0.3/sqrt(100 samples) noise, and
    the same random numbers at every evaluation of every run (the training RNG is restored)."""
    from bv_blend.sampling import sample_completions
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        rollout = trainer._sample(examples, samples)
    finally:
        torch.set_rng_state(state)
    prompts, columns = trainer._reward_inputs(examples, repeat=samples)
    rewards, _ = trainer.rewards(prompts, rollout.completions, columns)
    return float(rewards.nanmean())


def moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Trailing mean over the last `width` values (fewer at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - width)
    return (c[idx] - c[lo]) / (idx - lo)


def run_trainer(estimators, seeds, steps: int, eval_every: int, eval_samples: int, threshold: float,
                overrides: dict, workdir: Path, log=print):
    """Trains the tiny model once per (estimator, seed) on CPU, one thread; the expected reward
    over every prompt of the task is evaluated every `eval_every` steps."""
    import transformers
    from bv_blend import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    examples = task_prompts(overrides["task"])
    runs, curves = [], {}
    for est in estimators:
        for seed in seeds:
            t0 = time.perf_counter()
            cfg = GRPOConfig(**{**overrides, **TRAINER_ESTIMATORS[est]}, max_steps=steps,
                             seed=seed, device="cpu", save_steps=0, progress_bar=False,
                             output_dir=str(workdir / f"{est}-{seed}"))
            trainer = GRPOTrainer(config=cfg)
            if est.startswith("bv_keyed") or est == "spo":
                trainer.estimator = keyed_estimator(trainer, est, len(examples))
            evals = [expected_reward(trainer, examples, eval_samples)]
            rows = []
            for step in range(1, steps + 1):
                rows.append(trainer.step())
                if step % eval_every == 0:
                    evals.append(expected_reward(trainer, examples, eval_samples))
            evals = np.array(evals)
            hit = np.nonzero(evals >= threshold)[0]
            reward = np.array([r["reward_mean"] for r in rows])
            runs.append(dict(
                estimator=est, seed=seed, steps=steps, lr=overrides["learning_rate"],
                eval_auc=float(evals[1:].mean()), eval_final=float(evals[-1]),
                eval_steps_to_threshold=float(hit[0] * eval_every) if len(hit) else math.inf,
                batch_reward_last50=float(reward[-50:].mean()),
                frac_zero_std=float(np.mean([r["frac_reward_zero_std"] for r in rows])),
                advantage_abs_max=float(np.max([r["advantage_abs_max"] for r in rows])),
                seconds=time.perf_counter() - t0))
            curves.setdefault(est, []).append(evals)
            log(f"  {est} seed {seed}: eval AUC {runs[-1]['eval_auc']:.3f}, final "
                f"{runs[-1]['eval_final']:.3f} ({runs[-1]['seconds']:.0f} s)")
    return runs, curves


def seed_list(text: str) -> list[int]:
    """"a-b" (inclusive) or "a,b,c"."""
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(x) for x in text.split(",")]


def trainer_markdown(runs, args, command: str) -> str:
    names = list(dict.fromkeys(r["estimator"] for r in runs))
    ref = "grpo" if "grpo" in names else names[0]

    def seeds_of(est, key):
        return np.array([r[key] for r in sorted((r for r in runs if r["estimator"] == est),
                                                key=lambda r: r["seed"])])
    lines = ["# Estimators with the real trainer (tiny model), fixed evaluation", "",
             f"Command: `{command}`", "",
             f"Task `{args.task}`, {args.steps} steps, {args.batch_size} completions per step in "
             f"groups of {args.num_generations}, AdamW lr per estimator (column `lr`) chosen from "
             f"{args.learning_rates} by mean eval AUC on seeds {args.tune_seeds}, CPU, seeds "
             f"{args.seeds_list[0]}..{args.seeds_list[-1]} for every estimator (seed = model init "
             f"+ data + sampling). Evaluation: the mean reward of {args.eval_samples} sampled "
             f"completions (temperature 1, the same random numbers for every run) of each of the "
             f"task's {len(task_prompts(args.task))} prompts, every {args.eval_every} steps "
             "(never the batch reward).", "",
             f"- `eval AUC` = mean evaluation reward over the evaluations after step 0 (x100); "
             f"`d vs {ref}` = mean per-seed paired difference x100 [95% bootstrap interval] "
             "wins/losses, sign-test p; `steps to thr` = first evaluation with reward >= "
             f"{args.threshold}.",
             "- keyed estimators get an id per distinct prompt from the benchmark; bv_keyed* are "
             "BVBlend(num_keys=...) (key alpha 0.25, 2 visits before a key is used).", "",
             f"| estimator | lr | eval AUC | d vs {ref} | p | eval final | d vs {ref} | steps to thr "
             "| reached | tied groups | max abs A |",
             "|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for est in names:
        rs = [r for r in runs if r["estimator"] == est]
        cells = []
        for key in ("eval_auc", "eval_final"):
            d = paired(100 * (seeds_of(est, key) - seeds_of(ref, key)))
            cells.append((fmt(median_ci([100 * r[key] for r in rs])),
                          f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] {d['wins']}/{d['losses']}",
                          f"{d['p']:.2g}"))
        lines.append(f"| {est} | {rs[0]['lr']:g} | {cells[0][0]} | {cells[0][1]} | {cells[0][2]} | {cells[1][0]} "
                     f"| {cells[1][1]} | {summary(rs, 'eval_steps_to_threshold')} "
                     f"| {sum(math.isfinite(r['eval_steps_to_threshold']) for r in rs)}/{len(rs)} "
                     f"| {np.mean([r['frac_zero_std'] for r in rs]):.2f} "
                     f"| {np.median([r['advantage_abs_max'] for r in rs]):.3g} |")
    if {"rloo", "dr_grpo"} <= set(names):
        d = paired(100 * (seeds_of("rloo", "eval_auc") - seeds_of("dr_grpo", "eval_auc")))
        lines += ["", f"Noise floor (rloo - dr_grpo, the same estimator up to a factor AdamW "
                      f"cancels): eval AUC {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] "
                      f"{d['wins']}/{d['losses']}, p {d['p']:.2g}."]
    return "\n".join(lines) + "\n"


def trainer_plot(path: Path, runs, curves, args) -> None:
    with harness.figure(path, 1, 1, figsize=(7, 4.2)) as (_, ax):
        steps = np.arange(0, args.steps + 1, args.eval_every)
        for est, cs in curves.items():
            c = np.stack(cs)
            ax.plot(steps, np.median(c, 0), label=est, lw=1.2)
            ax.fill_between(steps, np.quantile(c, 0.25, 0), np.quantile(c, 0.75, 0), alpha=0.12)
        ax.set(title=f"expected reward over all prompts ({args.task}, k={args.num_generations}); "
                     "median, IQR", xlabel="step", ylabel="reward")
        ax.legend(fontsize=7)


# command line --------------------------------------------------------------------------------

def main(argv=None) -> int:
    # Long because it declares both sub-commands' flags; each mode's work is in its own function.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("sim", help="exact-gradient simulation")
    s.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds (smoke test)")
    s.add_argument("--seeds", type=int, default=20)
    s.add_argument("--cells", default=None,
                   help="comma-separated cell names to run (default: all; see sim_cells)")
    t = sub.add_parser("trainer", help="the real trainer with the tiny model")
    t.add_argument("--quick", action="store_true", help="2 estimators, 1 seed, 4 steps (smoke test)")
    t.add_argument("--seeds", default="0-19", help="a range a-b or a comma-separated list")
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--eval-every", type=int, default=15)
    t.add_argument("--eval-samples", type=int, default=4, help="completions per prompt")
    t.add_argument("--estimators", default="grpo,rloo,dr_grpo,bv_blend,bv_blend_none,bv_keyed,"
                                            "bv_keyed_none,spo")
    t.add_argument("--task", default="add")
    t.add_argument("--threshold", type=float, default=0.4)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--num-generations", type=int, default=8)
    t.add_argument("--learning-rates", default="1e-3,3e-3",
                   help="AdamW lrs tried per estimator on --tune-seeds (best mean eval AUC)")
    t.add_argument("--tune-seeds", default="100-102")
    for q in (s, t):
        q.add_argument("--out-dir", type=Path, default=None,
                       help="default benchmarks/results/estimators (with --quick: "
                            "benchmarks/results/quick)")
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = harness.QUICK_RESULTS if args.quick else RESULTS
    command = harness.command_line(__file__, argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    if args.mode == "sim":
        cells = sim_cells(args.quick)
        if args.cells:
            cells = {name: cells[name] for name in args.cells.split(",")}
        seeds = 3 if args.quick else args.seeds
        runs, tuning, curves, visits = run_sim(cells, seeds)
        harness.write_csv(args.out_dir / "sim_runs.csv", runs)
        harness.write_csv(args.out_dir / "sim_tuning.csv", tuning)
        (args.out_dir / "sim.md").write_text(
            sim_markdown(runs, tuning, visits, cells, seeds, command)
            + f"\nWall time {time.perf_counter() - start:.0f} s.\n")
        sim_plot(args.out_dir / "sim.png", runs, curves, cells)
        print((args.out_dir / "sim.md").read_text())
        print(f"wrote {args.out_dir}/sim.md, sim_runs.csv, sim_tuning.csv, sim.png")
    else:
        estimators = args.estimators.split(",")
        unknown = set(estimators) - set(TRAINER_ESTIMATORS)
        if unknown:
            p.error(f"unknown estimators {sorted(unknown)}; choose from {list(TRAINER_ESTIMATORS)}")
        if args.quick:
            estimators, args.seeds, args.steps, args.batch_size = estimators[:1] + ["bv_keyed"], "0", 4, 16
            args.eval_every, args.eval_samples = 2, 2
        args.seeds_list, tune_seeds = seed_list(args.seeds), seed_list(args.tune_seeds)
        lrs = [float(x) for x in args.learning_rates.split(",")]
        overrides = dict(task=args.task, batch_size=args.batch_size,
                         num_generations=args.num_generations)
        runs, curves, tuning = [], {}, []
        with tempfile.TemporaryDirectory() as work:
            for est in dict.fromkeys(estimators):
                best = lrs[0]
                if len(lrs) > 1 and not args.quick:
                    scores = {}
                    for lr in lrs:
                        tried, _ = run_trainer([est], tune_seeds, args.steps, args.eval_every,
                                               args.eval_samples, args.threshold,
                                               {**overrides, "learning_rate": lr}, Path(work))
                        scores[lr] = float(np.mean([r["eval_auc"] for r in tried]))
                        tuning.append(dict(estimator=est, lr=lr, eval_auc_mean=scores[lr]))
                    best = max(scores, key=scores.get)
                r, c = run_trainer([est], args.seeds_list, args.steps, args.eval_every,
                                   args.eval_samples, args.threshold,
                                   {**overrides, "learning_rate": best}, Path(work))
                runs += r
                curves.update(c)
                # Written as each estimator finishes: a long study that stops keeps what it ran.
                harness.write_csv(args.out_dir / "trainer_runs.csv", runs)
                if tuning:
                    harness.write_csv(args.out_dir / "trainer_tuning.csv", tuning)
        if tuning:
            harness.write_csv(args.out_dir / "trainer_tuning.csv", tuning)
        harness.write_csv(args.out_dir / "trainer_runs.csv", runs)
        (args.out_dir / "trainer.md").write_text(
            trainer_markdown(runs, args, command)
            + f"\nWall time {time.perf_counter() - start:.0f} s.\n")
        trainer_plot(args.out_dir / "trainer.png", runs, curves, args)
        print((args.out_dir / "trainer.md").read_text())
        print(f"wrote {args.out_dir}/trainer.md, trainer_runs.csv, trainer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
