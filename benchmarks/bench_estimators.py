"""Estimator evidence: BV-Blend against GRPO, RLOO, Dr.GRPO and batch scaling.

    python benchmarks/bench_estimators.py sim        # exact-gradient simulation (~15 min, 1 core)
    python benchmarks/bench_estimators.py trainer    # the real trainer + tiny model (~20 min)
    python benchmarks/bench_estimators.py sim --quick       # seconds (smoke test)
    python benchmarks/bench_estimators.py trainer --quick

Estimators: grpo (scale "group"), rloo (leave-one-out mean, unscaled), dr_grpo (group mean,
unscaled), batch (group mean, batch std), bv_blend_group (BVBlend scale="group") and bv_blend
(BVBlend scale="blend", the default). Intervals are 95% bootstrap intervals of the median over
seeds; "x grpo" columns are the median over seeds of the per-seed ratio to grpo (same task, same
draws), with its interval. Writes <mode>.md, <mode>_runs.csv and <mode>.png under
benchmarks/results/estimators/.
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

RESULTS = harness.RESULTS / "estimators"
ESTIMATORS = sim.ESTIMATORS


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


def ratios(runs: list[dict], key: str, name: str) -> list[float]:
    """Per-seed ratio of `key` for estimator `name` to grpo's on the same seed."""
    base = {(r["scenario"], r["seed"]): r[key] for r in runs if r["estimator"] == "grpo"}
    return [r[key] / base[(r["scenario"], r["seed"])] for r in runs if r["estimator"] == name]


def _band(ax, curves: np.ndarray, label: str):
    steps = np.arange(1, curves.shape[1] + 1)
    ax.plot(steps, np.median(curves, 0), label=label, lw=1.2)
    ax.fill_between(steps, np.quantile(curves, 0.25, 0), np.quantile(curves, 0.75, 0), alpha=0.15)


# part B1: the simulation ---------------------------------------------------------------------

def scenario_name(cfg: sim.SimConfig) -> str:
    return f"k={cfg.group_size} {cfg.difficulty}"


def run_sim(base: sim.SimConfig, group_sizes, difficulties, seeds: int, log=print):
    """Every (scenario, estimator, seed): gradient statistics at the initial policy and at the
    policy halfway to Jmax, then a training run. Returns (runs, curves)."""
    torch.set_num_threads(1)
    runs, curves = [], {}
    for k in group_sizes:
        for difficulty in difficulties:
            cfg = replace(base, group_size=k, difficulty=difficulty)
            name = scenario_name(cfg)
            t0 = time.perf_counter()
            for seed in range(seeds):
                task = sim.Task(cfg, seed)
                j0 = task.success(torch.zeros(cfg.features, dtype=torch.float64))
                points = {"init": torch.zeros(cfg.features, dtype=torch.float64),
                          "mid": task.weights_at(j0 + 0.5 * (task.j_max - j0))}
                for est in ESTIMATORS:
                    row = dict(scenario=name, group_size=k, difficulty=difficulty, seed=seed,
                               estimator=est)
                    for label, w in points.items():
                        stats = sim.gradient_stats(task, cfg, w, est, seed=10_000 + seed)
                        row.update({f"{key}_{label}": v for key, v in stats.items()})
                    result = sim.train(task, cfg, est, seed=20_000 + seed)
                    row.update(steps_to_threshold=result["steps_to_threshold"],
                               final_success=result["curve"][-1], threshold=result["threshold"],
                               j0=result["j0"], j_max=result["j_max"])
                    runs.append(row)
                    curves.setdefault((name, est), []).append(result["curve"])
            log(f"  {name}: {seeds} seeds x {len(ESTIMATORS)} estimators in "
                f"{time.perf_counter() - t0:.0f} s")
    return runs, curves


def sim_markdown(runs, base: sim.SimConfig, seeds: int, command: str, main: str) -> str:
    lines = ["# Estimator simulation (exact gradients)", "",
             f"Command: `{command}`", "",
             f"Setup: {base.prompts} prompts x {base.answers} candidate answers, log-linear policy "
             f"on {base.features} shared features, Bernoulli rewards; minibatch {base.batch_prompts} "
             f"prompts x k answers; BVBlend window {base.window}; Adam lr {base.lr} for every "
             f"estimator; {seeds} seeds (a seed = a new task + new draws); variance from "
             f"{base.variance_samples} minibatch gradients after {base.warmup_steps} warm-up "
             f"steps, the same draws for every estimator. Threshold: J0 + {base.gap_fraction} "
             f"(Jmax - J0), J the exact expected success.", "",
             "- `rel var` = tr Cov(g) / |E g|^2: the gradient noise relative to its own mean "
             "(scale-free: comparable across estimators whose advantages have different scales). "
             "`tr Cov` = the raw trace of the covariance of the minibatch gradient.",
             "- `cos` = E[cos(g, grad J)], the alignment of one minibatch gradient with the exact "
             "gradient; `init` = the uniform initial policy, `mid` = the policy halfway to Jmax.",
             "- Values: median over seeds [95% bootstrap interval]; `x grpo`: median per-seed "
             "ratio to grpo [interval] (< 1 = less noise than grpo).", ""]
    sel = [r for r in runs if r["scenario"] == main]
    lines += [f"## Main scenario: {main}", "",
              "| estimator | tr Cov init | rel var init | x grpo | cos init | rel var mid | x grpo "
              "| cos mid | steps to threshold | reached |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for est in ESTIMATORS:
        rs = [r for r in sel if r["estimator"] == est]
        lines.append(
            f"| {est} | {summary(rs, 'trace_cov_init')} | {summary(rs, 'rel_var_init')} "
            f"| {fmt(median_ci(ratios(sel, 'rel_var_init', est)))} | {summary(rs, 'cos_sample_init')} "
            f"| {summary(rs, 'rel_var_mid')} | {fmt(median_ci(ratios(sel, 'rel_var_mid', est)))} "
            f"| {summary(rs, 'cos_sample_mid')} | {summary(rs, 'steps_to_threshold')} | {reached(rs)} |")
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    for key, title in (("rel_var_init", "Relative gradient variance at the initial policy, x grpo"),
                       ("rel_var_mid", "Relative gradient variance halfway to Jmax, x grpo"),
                       ("steps_to_threshold", "Steps to the threshold (median [95% CI])")):
        lines += ["", f"## {title}", "",
                  "| scenario | " + " | ".join(ESTIMATORS) + " |",
                  "|---|" + "---:|" * len(ESTIMATORS)]
        for sc in scenarios:
            sel = [r for r in runs if r["scenario"] == sc]
            if key == "steps_to_threshold":
                cells = [summary([r for r in sel if r["estimator"] == e], key) for e in ESTIMATORS]
            else:
                cells = [fmt(median_ci(ratios(sel, key, e))) for e in ESTIMATORS]
            lines.append(f"| {sc} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sim_plot(path: Path, runs, curves, main: str, max_steps: int) -> None:
    with harness.figure(path, 2, 2, figsize=(12, 8.5)) as (_, axes):
        for est in ESTIMATORS:
            _band(axes[0][0], np.asarray(curves[(main, est)]), est)
        axes[0][0].set(title=f"exact success J during training ({main}); median, IQR",
                       xlabel="step", ylabel="J")
        axes[0][0].legend(fontsize=7)

        scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
        width = 0.8 / len(ESTIMATORS)
        for ax, key, title in ((axes[0][1], "rel_var_init", "relative gradient variance x grpo, initial policy"),
                               (axes[1][0], "rel_var_mid", "relative gradient variance x grpo, halfway policy")):
            for i, est in enumerate(ESTIMATORS):
                stats = [median_ci(ratios([r for r in runs if r["scenario"] == sc], key, est)) for sc in scenarios]
                x = np.arange(len(scenarios)) + (i - len(ESTIMATORS) / 2 + 0.5) * width
                m = np.array([s[0] for s in stats])
                err = np.array([[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]])
                ax.bar(x, m, width, yerr=err, capsize=2, label=est)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(scenarios)), scenarios, rotation=20, fontsize=8)
            ax.set_title(title + " (95% CI)", fontsize=10)
        axes[0][1].legend(fontsize=7)

        ax = axes[1][1]
        for i, est in enumerate(ESTIMATORS):
            stats = [median_ci([r["steps_to_threshold"] for r in runs
                                if r["scenario"] == sc and r["estimator"] == est]) for sc in scenarios]
            x = np.arange(len(scenarios)) + (i - len(ESTIMATORS) / 2 + 0.5) * width
            cap = max_steps * 1.05
            m = np.array([min(s[0], cap) for s in stats])
            err = np.array([[m[j] - min(s[1], cap) for j, s in enumerate(stats)],
                            [min(s[2], cap) - m[j] for j, s in enumerate(stats)]])
            ax.bar(x, m, width, yerr=err, capsize=2, label=est)
        ax.set_xticks(range(len(scenarios)), scenarios, rotation=20, fontsize=8)
        ax.axhline(max_steps, color="grey", lw=0.8, ls=":")
        ax.set_title("steps to threshold, median (95% CI; above the dotted line = never)", fontsize=10)


# part B2: the real trainer -------------------------------------------------------------------

TRAINER_ESTIMATORS = {  # name -> GRPOConfig overrides
    "grpo": dict(estimator="grpo"),
    "rloo": dict(estimator="rloo"),
    "dr_grpo": dict(estimator="dr_grpo"),
    "batch": dict(estimator="batch"),
    "bv_blend_group": dict(estimator="bv_blend", bv_scale="group"),
    "bv_blend": dict(estimator="bv_blend", bv_scale="blend"),
}


def moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Trailing mean over the last `width` values (fewer at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - width)
    return (c[idx] - c[lo]) / (idx - lo)


def run_trainer(estimators, seeds: int, steps: int, threshold: float, smooth: int, overrides: dict,
                workdir: Path, log=print):
    """Trains the tiny model once per (estimator, seed) on CPU, one thread."""
    import transformers
    from bv_blend import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    runs, curves = [], {}
    for est in estimators:
        for seed in range(seeds):
            t0 = time.perf_counter()
            cfg = GRPOConfig(**{**overrides, **TRAINER_ESTIMATORS[est]}, max_steps=steps,
                             seed=seed, device="cpu", save_steps=0, progress_bar=False,
                             output_dir=str(workdir / f"{est}-{seed}"))
            trainer = GRPOTrainer(config=cfg)
            rows = [trainer.step() for _ in range(steps)]
            reward = np.array([r["reward_mean"] for r in rows])
            smoothed = moving_average(reward, smooth)
            hit = np.nonzero(smoothed >= threshold)[0]
            tail = reward[len(reward) // 2:]
            runs.append(dict(
                estimator=est, seed=seed, steps=steps,
                steps_to_threshold=float(hit[0] + 1) if len(hit) else math.inf,
                final_reward=float(reward[-min(50, len(reward)):].mean()),
                reward_var=float(np.var(reward, ddof=1)),
                reward_step_var=float(np.var(np.diff(reward), ddof=1) / 2),
                reward_step_var_2nd_half=float(np.var(np.diff(tail), ddof=1) / 2) if len(tail) > 2 else math.nan,
                within_batch_std=float(np.mean([r["reward_std"] for r in rows])),
                frac_zero_std=float(np.mean([r["frac_reward_zero_std"] for r in rows])),
                advantage_abs_max=float(np.max([r["advantage_abs_max"] for r in rows])),
                seconds=time.perf_counter() - t0))
            curves.setdefault(est, []).append(reward)
            log(f"  {est} seed {seed}: steps to {threshold} = {runs[-1]['steps_to_threshold']}, "
                f"final {runs[-1]['final_reward']:.3f} ({runs[-1]['seconds']:.0f} s)")
    return runs, curves


def trainer_markdown(runs, args, command: str) -> str:
    est_names = list(dict.fromkeys(r["estimator"] for r in runs))
    lines = ["# Estimators with the real trainer (tiny model)", "",
             f"Command: `{command}`", "",
             f"Task `{args.task}`, {args.steps} steps, batch {args.batch_size} completions, group "
             f"size {args.num_generations}, lr {args.learning_rate}, CPU, {args.seeds} seeds per "
             f"estimator (seed = model init + data + sampling). Threshold: the {args.smooth}-step "
             f"trailing mean of the batch reward >= {args.threshold}.", "",
             "- `final` = mean batch reward over the last 50 steps; `step var` = var(r_t+1 - r_t)/2 "
             "of the batch mean reward r_t (step-to-step noise, insensitive to the learning "
             "trend); `var` = variance of r_t over the run (includes the trend); `|A| max` = "
             "largest advantage seen.",
             "- Values: median over seeds [95% bootstrap interval].", "",
             "| estimator | steps to threshold | reached | final reward | step var (x1e-3) "
             "| var (x1e-3) | |A| max |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for est in est_names:
        rs = [r for r in runs if r["estimator"] == est]
        lines.append(
            f"| {est} | {summary(rs, 'steps_to_threshold')} | {reached(rs)} "
            f"| {summary(rs, 'final_reward')} | {summary(rs, 'reward_step_var', 1e3)} "
            f"| {summary(rs, 'reward_var', 1e3)} | {summary(rs, 'advantage_abs_max')} |")
    return "\n".join(lines) + "\n"


def trainer_plot(path: Path, runs, curves, args) -> None:
    with harness.figure(path, 1, 2, figsize=(12, 4.2)) as (_, axes):
        for est, cs in curves.items():
            _band(axes[0], np.stack([moving_average(c, args.smooth) for c in cs]), est)
        axes[0].axhline(args.threshold, color="k", lw=0.8, ls="--")
        axes[0].set(title=f"batch reward ({args.smooth}-step mean), median and IQR over seeds",
                    xlabel="step", ylabel="reward")
        axes[0].legend(fontsize=7)
        names = list(curves)
        for i, est in enumerate(names):
            steps = [min(r["steps_to_threshold"], args.steps * 1.05) for r in runs if r["estimator"] == est]
            axes[1].scatter(np.full(len(steps), i) + np.linspace(-0.15, 0.15, len(steps)), steps, s=12)
            m, lo, hi = median_ci([r["steps_to_threshold"] for r in runs if r["estimator"] == est])
            axes[1].errorbar(i + 0.3, min(m, args.steps * 1.05),
                             yerr=[[min(m, args.steps * 1.05) - min(lo, args.steps * 1.05)],
                                   [min(hi, args.steps * 1.05) - min(m, args.steps * 1.05)]],
                             fmt="o", color="k", capsize=3)
        axes[1].axhline(args.steps, color="grey", lw=0.8, ls=":")
        axes[1].set_xticks(range(len(names)), names, rotation=20)
        axes[1].set_title("steps to threshold per seed (dots; top line = never), median + 95% CI",
                          fontsize=10)


# command line --------------------------------------------------------------------------------

def main(argv=None) -> int:
    # Long because it declares both sub-commands' flags; each mode's work is in its own function.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("sim", help="exact-gradient simulation")
    s.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds (smoke test)")
    s.add_argument("--seeds", type=int, default=10)
    s.add_argument("--group-sizes", default="8,2,4,16", help="the first one is the main scenario")
    s.add_argument("--difficulties", default="mixed,uniform",
                   help=f"from {', '.join(sim.DIFFICULTIES)}; the first one is the main scenario")
    t = sub.add_parser("trainer", help="the real trainer with the tiny model")
    t.add_argument("--quick", action="store_true", help="2 estimators, 1 seed, 4 steps (smoke test)")
    t.add_argument("--seeds", type=int, default=8)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--estimators", default=",".join(TRAINER_ESTIMATORS))
    t.add_argument("--task", default="add")
    t.add_argument("--threshold", type=float, default=0.4)
    t.add_argument("--smooth", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--num-generations", type=int, default=8)
    t.add_argument("--learning-rate", type=float, default=3e-3)
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
        base = sim.SimConfig()
        seeds = args.seeds
        group_sizes = [int(k) for k in args.group_sizes.split(",")]
        difficulties = args.difficulties.split(",")
        if args.quick:
            base = replace(base, prompts=64, features=8, steps=20, warmup_steps=3,
                           variance_samples=10)
            seeds, group_sizes, difficulties = 2, group_sizes[:1], difficulties[:1]
        runs, curves = run_sim(base, group_sizes, difficulties, seeds)
        main_scenario = scenario_name(replace(base, group_size=group_sizes[0],
                                              difficulty=difficulties[0]))
        harness.write_csv(args.out_dir / "sim_runs.csv", runs)
        (args.out_dir / "sim.md").write_text(
            sim_markdown(runs, base, seeds, command, main_scenario)
            + f"\nConfig: `{asdict(base)}`. Wall time {time.perf_counter() - start:.0f} s.\n")
        sim_plot(args.out_dir / "sim.png", runs, curves, main_scenario, base.steps)
        print((args.out_dir / "sim.md").read_text())
        print(f"wrote {args.out_dir}/sim.md, sim_runs.csv, sim.png")
    else:
        estimators = args.estimators.split(",")
        unknown = set(estimators) - set(TRAINER_ESTIMATORS)
        if unknown:
            p.error(f"unknown estimators {sorted(unknown)}; choose from {list(TRAINER_ESTIMATORS)}")
        if args.quick:
            estimators, args.seeds, args.steps, args.batch_size = estimators[:1] + ["bv_blend"], 1, 4, 16
        overrides = dict(task=args.task, batch_size=args.batch_size,
                         num_generations=args.num_generations, learning_rate=args.learning_rate)
        with tempfile.TemporaryDirectory() as work:
            runs, curves = run_trainer(list(dict.fromkeys(estimators)), args.seeds, args.steps,
                                       args.threshold, args.smooth, overrides, Path(work))
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
