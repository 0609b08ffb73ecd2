"""Smoke tests of the benchmarks' quick modes, and checks of what the benchmarks rely on: the
vectorised pure-PyTorch baseline against the reference, and the simulation's exact gradient."""

import csv
import math

import pytest
import torch

from benchmarks import bench_estimators, bench_op, estimator_sim, pytorch_baseline
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
    cfg = estimator_sim.SimConfig(prompts=16, answers=5, features=4)
    task = estimator_sim.Task(cfg, seed=0)
    w = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = 1e-6
    numeric = torch.tensor([(task.success(w + h * e) - task.success(w - h * e)) / (2 * h)
                            for e in torch.eye(4, dtype=torch.float64)], dtype=torch.float64)
    torch.testing.assert_close(task.exact_gradient(w), numeric, rtol=1e-5, atol=1e-9)
    target = 0.5 * (task.success(torch.zeros(4, dtype=torch.float64)) + task.j_max)
    assert task.success(task.weights_at(target)) == pytest.approx(target, abs=1e-9)


def test_sim_rloo_is_rescaled_dr_grpo():
    """Same draws: RLOO's advantages are k/(k-1) times Dr.GRPO's, so their relative variance and
    cosines agree while the raw trace differs by (k/(k-1))^2 (up to float32 rounding)."""
    cfg = estimator_sim.SimConfig(prompts=32, features=8, group_size=4, warmup_steps=0,
                                  variance_samples=50)
    task = estimator_sim.Task(cfg, seed=1)
    w = torch.zeros(8, dtype=torch.float64)
    rloo, dr = (estimator_sim.gradient_stats(task, cfg, w, name, seed=5) for name in ("rloo", "dr_grpo"))
    assert rloo["rel_var"] == pytest.approx(dr["rel_var"], rel=1e-6)
    assert rloo["cos_sample"] == pytest.approx(dr["cos_sample"], rel=1e-6)
    assert rloo["trace_cov"] == pytest.approx(dr["trace_cov"] * (4 / 3) ** 2, rel=1e-6)


def test_median_ci_with_runs_that_never_reach():
    m, lo, hi = bench_estimators.median_ci([10, 12, math.inf, 11, math.inf, 13, 9])
    assert m == 12 and lo <= m <= hi and not math.isnan(lo) and not math.isnan(hi)


def test_bench_estimators_sim_quick(tmp_path):
    assert bench_estimators.main(["sim", "--quick", "--out-dir", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "sim_runs.csv").open()))
    assert {r["estimator"] for r in rows} == set(estimator_sim.ESTIMATORS)
    assert (tmp_path / "sim.png").stat().st_size > 0
    assert "| bv_blend |" in (tmp_path / "sim.md").read_text()


def test_bench_estimators_trainer_quick(tmp_path):
    assert bench_estimators.main(["trainer", "--quick", "--out-dir", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "trainer_runs.csv").open()))
    assert [r["estimator"] for r in rows] == ["grpo", "bv_blend"]
    assert all(0 <= float(r["final_reward"]) <= 1 for r in rows)
    assert (tmp_path / "trainer.png").stat().st_size > 0
