"""Smoke tests of the benchmarks' quick modes, and checks of what the benchmarks rely on: the
vectorised pure-PyTorch baseline against the reference, and the simulation's exact gradient."""

import csv
import math

import numpy as np
import pytest
import torch

import bv_blend_ext
from benchmarks import bench_estimators, bench_key_layout, bench_op, estimator_sim, pytorch_baseline
from bv_blend_ext import reference



def _rewards(dtype):
    g = torch.Generator().manual_seed(0)
    r = (torch.randint(0, 3, (96,), generator=g) / 2).to(dtype)
    r[::7] = float("nan")
    r[3], r[50] = float("inf"), float("-inf")  # unscorable, like NaN
    r[16:24] = float("nan")  # a group with no valid reward
    return r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", reference.SCALE_MODES)
@pytest.mark.parametrize("groups", [dict(group_size=8),
                                    dict(offsets=torch.tensor([0, 0, 1, 5, 5, 20, 40, 41, 96]))])
def test_baseline_matches_reference(dtype, scale, groups):
    r = _rewards(dtype)
    want = reference.blend_advantages(r, **groups, hist_mean=0.3, hist_var=0.05, scale=scale)
    got = pytorch_baseline.blend_advantages(r, **groups, hist_mean=0.3, hist_var=0.05, scale=scale)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, equal_nan=True)


@pytest.mark.parametrize("scale", reference.SCALE_MODES)
def test_baseline_gradient_matches_reference(scale):
    r = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                   requires_grad=True)
    weights = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = [torch.autograd.grad((impl.blend_advantages(r, 8, hist_mean=0.3, hist_var=0.05,
                                                        scale=scale).advantages * weights).sum(), r)[0]
             for impl in (reference, pytorch_baseline)]
    torch.testing.assert_close(grads[1], grads[0])


def test_baseline_history_matches_reference():
    want = reference.HistoryReference(window=10, min_history=3)
    got = pytorch_baseline.History(window=10, min_history=3)
    g = torch.Generator().manual_seed(3)
    for step in range(20):
        r = torch.rand(4 * [1, 3, 17, 0, 5][step % 5], generator=g)
        r[::5] = float("nan")
        for w, o in zip(want.step(r, 4), got.step(r, 4)):
            torch.testing.assert_close(o, w, equal_nan=True)
        assert got.count.item() == want.count
        assert got.ema.item() == pytest.approx(want.ema, abs=1e-12)
        assert got.var.item() == pytest.approx(want.variance, abs=1e-12)


def test_bench_op_quick(tmp_path):
    assert bench_op.main(["--quick", "--device", "cpu", "--threads", "1",
                          "--out-dir", str(tmp_path)]) == 0
    (folder,) = tmp_path.iterdir()
    assert {p.name for p in folder.iterdir()} == {"op.md", "op.csv", "op.png"}
    rows = list(csv.DictReader((folder / "op.csv").open()))
    seen = {(r["case"], r["size"], r["impl"]) for r in rows}
    for case in bench_op.CASES:
        for size in bench_op.QUICK_SIZES:
            if case != "keyed step" or size.label in bench_op.QUICK.keyed_sizes:
                assert (case, size.label, "op") in seen and (case, size.label, "eager") in seen
    assert ("keyed step", "64x8", "op") in seen
    assert all(float(r["median_us"]) > 0 for r in rows)
    text = (folder / "op.md").read_text()
    assert "## Targets" in text and "op vs eager" in text


def test_bench_op_reports_a_baseline_that_cannot_be_built(monkeypatch):
    """A failing torch.compile (or CUDA-graph capture) becomes a note; the op is still timed."""
    def broken(fn, **options):
        def call(*args, **kwargs):
            raise RuntimeError("no compiler")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    plan = bench_op.Plan(bench_op.QUICK_SIZES[:1], ("op", "compile"), budget_s=0.002, repeats=2,
                         loop_ref_max_groups=0, keyed_sizes=("64x8",), num_keys=100)
    rows, notes = bench_op.run_config("cpu", 1, plan, log=lambda *_: None)
    assert [r["impl"] for r in rows] == ["op"] * len(bench_op.CASES)
    compiled = [case for case in bench_op.CASES if (case, "compile") in bench_op.BUILDERS]
    assert len(notes) == len(compiled)  # the keyed step has no compiled baseline
    assert all("RuntimeError: no compiler" in note for note in notes)


def test_bench_op_targets_judge_the_declared_rows():
    """The CPU targets judge the 1-thread rows only: eager per case at every size (forward+backward
    against its own, lower bar), compile at 1024x16."""
    def row(threads, case, size, impl, best_us):
        return dict(threads=threads, case=case, size=size, impl=impl, best_us=best_us)
    rows = [row(1, "forward", "64x8", "op", 1.0), row(1, "forward", "64x8", "eager", 12.0),
            row(1, "forward", "1024x16", "op", 10.0), row(1, "forward", "1024x16", "eager", 110.0),
            row(1, "forward", "1024x16", "compile", 14.0),
            row(1, "forward+backward", "1024x16", "op", 10.0),
            row(1, "forward+backward", "1024x16", "eager", 60.0),
            row(1, "step", "1024x16", "op", 10.0), row(1, "step", "1024x16", "eager", 60.0),
            row(2, "forward", "1024x16", "op", 10.0), row(2, "forward", "1024x16", "eager", 20.0)]
    lines = bench_op.targets(bench_op.TARGETS["cpu"], rows)
    assert lines[2:5] == [
        "- CPU 1 thread, forward: op >= 10x eager at every size: met (lowest 11.0x at 1024x16)",
        "- CPU 1 thread, step: op >= 10x eager at every size: MISSED (lowest 6.0x at 1024x16)",
        "- CPU 1 thread, forward+backward: op >= 5x eager at every size: met (lowest 6.0x at "
        "1024x16)"]
    assert lines[5] == "- CPU 1 thread, op >= 1.5x torch.compile at 1024x16, forward: MISSED (1.4x)"
    assert len(lines) == 7


def test_sim_exact_gradient_matches_finite_differences():
    cell = estimator_sim.Cell(prompts=16, answers=5, features=4)
    tasks = estimator_sim.Tasks(cell, [0])
    tasks.phi, tasks.q = tasks.phi.double(), tasks.q.double()
    w = torch.randn(1, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def success(x):
        return float(estimator_sim.policy_values(tasks, x)[1].mean())
    h = 1e-6
    numeric = torch.tensor([(success(w + h * e) - success(w - h * e)) / (2 * h)
                            for e in torch.eye(4, dtype=torch.float64)], dtype=torch.float64)
    pi, v = estimator_sim.policy_values(tasks, w)
    torch.testing.assert_close(estimator_sim.exact_gradient(tasks, pi, v)[0, 0], numeric,
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("window", [10, 2])  # 2: fewer than the 3 groups of a call
@pytest.mark.parametrize("scale", reference.SCALE_MODES)
def test_sim_histories_match_the_op_and_the_keyed_spec(window, scale):
    """The simulation's vectorised BV-Blend histories give the advantages of bv_blend_ext.BVBlend
    (global) and of reference.KeyedHistoryReference (per prompt) on the same rewards."""
    cell = estimator_sim.Cell(prompts=8, group_size=4, samples_per_step=12)
    methods = [estimator_sim.Method("bv", scale, setting=window),
               estimator_sim.Method("bvk", scale, setting=0.25)]
    state = estimator_sim.State(methods, cell, num_seeds=1)
    glob = bv_blend_ext.BVBlend(window=window, scale=scale)
    keyed = reference.KeyedHistoryReference(num_keys=8, key_ema_decay=0.25)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        prompts = torch.randperm(8, generator=g)[:3]
        r = torch.randint(0, 3, (3, 4), generator=g).double() / 2
        adv, _ = state.advantages(r.expand(2, 1, 3, 4).clone(), prompts[None],
                                  torch.zeros(2, 1, 3, dtype=torch.float64),
                                  torch.zeros(2, 1, dtype=torch.float64), update=True)
        flat = r.reshape(-1)
        torch.testing.assert_close(adv[0, 0].reshape(-1), glob.step(flat, group_size=4).advantages,
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(adv[1, 0].reshape(-1),
                                   keyed.step(flat, 4, keys=prompts, scale=scale).advantages,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group_size", [4, 1])
def test_sim_precision_weight(group_size):
    """bvp and bvkp blend with bv's and bvk's histories (the H and sigma_u^2 of BVBlend and of
    KeyedHistoryReference) by beta = (s^2/k) / (s^2/k + sigma_u^2): s^2 = sigma_G^2, for a tied
    group the call's mean sigma_G^2 (k = 1: the variance of the call's rewards); beta = 0 where
    sigma_u^2 = 0."""
    k = group_size
    cell = estimator_sim.Cell(prompts=8, group_size=k, samples_per_step=3 * k)
    methods = [estimator_sim.Method("bvp", "none", setting=10),
               estimator_sim.Method("bvkp", "none", setting=0.25)]
    state = estimator_sim.State(methods, cell, num_seeds=1)
    glob = bv_blend_ext.BVBlend(window=10, scale="none")
    keyed = reference.KeyedHistoryReference(num_keys=8, key_ema_decay=0.25)
    g = torch.Generator().manual_seed(5)
    used_history = 0
    for _ in range(15):
        prompts = torch.randperm(8, generator=g)[:3]
        r = torch.randint(0, 3, (3, k), generator=g).double() / 2
        adv, _ = state.advantages(r.expand(2, 1, 3, k).clone(), prompts[None],
                                  torch.zeros(2, 1, 3, dtype=torch.float64),
                                  torch.zeros(2, 1, dtype=torch.float64), update=True)
        flat = r.reshape(-1)
        var = r.var(-1) if k > 1 else torch.zeros(3, dtype=torch.float64)
        pooled = var.mean() if k > 1 else flat.var()
        mean_var = torch.where(var > 0, var, pooled) / k
        keyed_history = keyed.group_history(prompts)
        keyed.step(flat, k, keys=prompts)
        step = glob.step(flat, group_size=k)
        for row, (h, u) in enumerate([(step.history_mean, step.history_var), keyed_history]):
            beta = torch.where(u > 0, mean_var / (mean_var + u), 0.0)
            used_history += int((beta > 0).sum())
            base = (1 - beta) * r.mean(-1) + beta * h
            torch.testing.assert_close(adv[row, 0], r - base[:, None])
    assert used_history > 0


def test_sim_spo_tracker_and_rloo():
    """SPO: the first visit uses the group mean, later ones the discounted success rate of the
    earlier visits. RLOO = k/(k-1) x Dr.GRPO."""
    cell = estimator_sim.Cell(prompts=4, group_size=2, samples_per_step=4)
    methods = [estimator_sim.Method("spo", "none", setting=0.5),
               estimator_sim.Method("rloo", "none"), estimator_sim.Method("grpo", "none")]
    state = estimator_sim.State(methods, cell, num_seeds=1)
    zeros = (torch.zeros(3, 1, 2, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64))
    prompts = torch.tensor([[0, 1]])
    first = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64).expand(3, 1, 2, 2).clone()
    adv, tied = state.advantages(first, prompts, *zeros, update=True)
    torch.testing.assert_close(adv[0, 0], torch.tensor([[0.5, -0.5], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(adv[1], 2 * adv[2])
    assert tied[2, 0].tolist() == [False, True]
    second = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64).expand(3, 1, 2, 2).clone()
    adv, _ = state.advantages(second, prompts, *zeros, update=True)
    # prompt 0: a = 1, b = 1 -> 0.5; prompt 1: a = 2, b = 0 -> 1
    torch.testing.assert_close(adv[0, 0], torch.tensor([[0.5, 0.5], [-1.0, -1.0]], dtype=torch.float64))
    assert state.spo_a[0, 0, 0].item() == pytest.approx(0.5 * 1 + 2)


def test_paired_statistics():
    d = bench_estimators.paired(np.array([1.0, 2.0, 3.0, -1.0, 0.0]))
    assert d["mean"] == pytest.approx(1.0) and d["lo"] <= 1.0 <= d["hi"]
    assert (d["wins"], d["losses"]) == (3, 1) and d["p"] == pytest.approx(0.625)


def test_median_ci_with_runs_that_never_reach():
    m, lo, hi = bench_estimators.median_ci([10, 12, math.inf, 11, math.inf, 13, 9])
    assert m == 12 and lo <= m <= hi and not math.isnan(lo) and not math.isnan(hi)


def test_bench_estimators_sim_quick(tmp_path):
    assert bench_estimators.main(["sim", "--quick", "--out-dir", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "sim_runs.csv").open()))
    assert {r["method"] for r in rows} >= {"grpo/group", "rloo/none", "bv/blend", "bvk/blend",
                                            "bvp/none", "bvkp/blend", "spo/batch", "oracle/none",
                                            "global/none", "exact_grad"}
    assert {r["cell"] for r in rows} == {"k=8 mixed", "k=1 mixed"}
    assert all(0 <= float(r["j_final"]) <= 1 for r in rows)
    assert (tmp_path / "sim_tuning.csv").stat().st_size > 0
    assert (tmp_path / "sim.png").stat().st_size > 0
    text = (tmp_path / "sim.md").read_text()
    assert "| bvk/blend |" in text and "| k=8 mixed | " in text.split("precision weight")[1]


def test_bench_estimators_trainer_quick(tmp_path):
    assert bench_estimators.main(["trainer", "--quick", "--out-dir", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "trainer_runs.csv").open()))
    assert [r["estimator"] for r in rows] == ["grpo", "bv_keyed"]
    assert all(0 <= float(r["eval_final"]) <= 1 for r in rows)
    assert (tmp_path / "trainer.png").stat().st_size > 0


def test_frac_reward_zero_std_counts_exact_ties():
    """Tied groups are found on the rewards: RLOO's float std of tied rewards is not exactly 0.
    Groups: tied, tied once NaN is left out, spread, one valid reward, none valid."""
    from bv_blend.advantages import AdvantageEstimator
    from bv_blend.metrics import step_row
    nan = float("nan")
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.7, nan, 0.7, 0.7, 0.0, 1.0, 0.0, 0.0,
                            nan, 0.3, nan, nan, nan, nan, nan, nan])
    for name in ("rloo", "grpo", "bv_blend"):
        adv = AdvantageEstimator(name)(rewards, 4)
        row = step_row(1, rewards, rewards[:, None], ["r"], adv, {}, learning_rate=0.0,
                       completion_lengths=torch.ones(20), times={})
        assert row["frac_reward_zero_std"] == pytest.approx(4 / 5)


def test_trainer_spo_estimator_matches_the_simulation():
    """advantages.AdvantageEstimator("spo") is the simulation's spo/batch, and its state survives
    a state_dict round trip."""
    from bv_blend.advantages import AdvantageEstimator
    cell = estimator_sim.Cell(prompts=6, group_size=4, samples_per_step=12)
    state = estimator_sim.State([estimator_sim.Method("spo", "batch", setting=0.8)], cell, 1)
    est = AdvantageEstimator("spo", num_keys=6, spo_discount=0.8)
    g = torch.Generator().manual_seed(4)
    for step in range(10):
        prompts = torch.randperm(6, generator=g)[:3]
        r = torch.randint(0, 2, (3, 4), generator=g).double()
        want, _ = state.advantages(r[None, None].clone(), prompts[None],
                                   torch.zeros(1, 1, 3, dtype=torch.float64),
                                   torch.zeros(1, 1, dtype=torch.float64), update=True)
        got = est(r.reshape(-1), 4, keys=prompts).advantages
        torch.testing.assert_close(got, want.reshape(-1))
        if step == 5:
            again = AdvantageEstimator("spo", num_keys=6, spo_discount=0.8)
            again.load_state_dict(est.state_dict())
            est = again
    with pytest.raises(ValueError, match="keys"):
        est(torch.zeros(4), 4)


def test_bench_key_layout_runs_both_layouts_to_the_same_state(tmp_path):
    times = bench_key_layout.main(["--groups", "8", "--group-size", "4", "--num-keys", "64",
                                   "--rounds", "2", "--calls", "3", "--out-dir", str(tmp_path)])
    assert list(times) == ["three tables", "one record per key"]
    assert all(len(values) == 2 and min(values) > 0 for values in times.values())
    assert "| one record per key |" in (tmp_path / "key_layout.md").read_text()
