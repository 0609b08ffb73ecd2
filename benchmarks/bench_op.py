"""Op microbenchmarks: bv_blend_ext against pure PyTorch, eager and under torch.compile.

    python benchmarks/bench_op.py                 # full run: CPU 1 thread + all threads, CUDA if present
    python benchmarks/bench_op.py --quick         # seconds: small sizes, no torch.compile

Cases: ``forward`` (advantages), ``forward+backward`` (d advantages / d rewards through the
group statistics) and ``step`` (the stateful estimator: advantages + history update).
Implementations, side by side in one process:

    op        bv_blend_ext.blend_advantages / bv_blend_ext.BVBlend, as documented (validate=True)
    op_raw    torch.ops.bv_blend.* called directly (no Python checks)
    op_graph  the op replayed from a captured CUDA graph (CUDA only)
    eager     benchmarks/pytorch_baseline.py: vectorised pure PyTorch, what a user would write
    compile   the same under torch.compile(fullgraph=True, dynamic=False)
    loop_ref  bv_blend_ext.reference (the spec, a Python loop over groups; small sizes only)

Writes op.md, op.csv and op.png under benchmarks/results/<device-name>/.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import bv_blend_ext
from bv_blend_ext import reference

import pytorch_baseline as baseline

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("forward", "forward+backward", "step")
IMPLS = ("op", "op_raw", "op_graph", "eager", "compile", "loop_ref")
HIST_MEAN, HIST_VAR, EPS, SCALE = 0.3, 0.05, 1e-4, "blend"
WINDOW, MIN_HISTORY = 100, 2
CLONE_REWARDS = 1 << 26
LOOP_REF_MAX_GROUPS = 1024  # --loop-ref-max-groups
REPEATS = 7  # timed blocks per measurement (3 with --quick)
LOAD = [0.0]  # the load average when the device's run started
NOTES: list[str] = []  # what could not be measured, for the report


@dataclass(frozen=True)
class Size:
    groups: int
    group_size: int  # the mean size for a ragged case
    ragged: bool = False

    @property
    def label(self) -> str:
        return f"ragged {self.groups}x1..{2 * self.group_size - 1}" if self.ragged else \
            f"{self.groups}x{self.group_size}"


FULL_SIZES = (Size(64, 8), Size(1024, 16), Size(16384, 16), Size(65536, 16), Size(4096, 16, True))
QUICK_SIZES = (Size(64, 8), Size(1024, 16), Size(256, 16, True))


def make_inputs(size: Size, device: str, seed: int = 0):
    """Rewards (uniform in [0, 1); 1% NaN in the ragged case) and offsets (None unless ragged)."""
    g = torch.Generator().manual_seed(seed)
    if not size.ragged:
        rewards = torch.rand(size.groups * size.group_size, generator=g)
        return rewards.to(device), None
    lengths = torch.randint(1, 2 * size.group_size, (size.groups,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    rewards = torch.rand(int(offsets[-1]), generator=g)
    rewards[torch.rand(rewards.numel(), generator=g) < 0.01] = float("nan")
    return rewards.to(device), offsets.to(device)


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _stateful_step(rewards, offsets, group_size: int, ring, count, ema, var):
    out = baseline.blend_advantages(rewards, group_size if offsets is None else None,
                                    offsets=offsets, hist_mean=ema, hist_var=var, eps=EPS,
                                    scale=SCALE)
    ring, count, ema, var = baseline.push_history(out.group_mean, ring, count, ema,
                                                  2.0 / (WINDOW + 1), MIN_HISTORY)
    return out.advantages, ring, count, ema, var



def build(case: str, impl: str, size: Size, device: str):
    """A zero-argument callable running one `case` with `impl`, or None where it does not apply.
    The first call of a `compile` callable compiles it."""
    rewards, offsets = make_inputs(size, device)
    k = None if size.ragged else size.group_size
    h = torch.tensor(HIST_MEAN, dtype=torch.float64, device=device)
    u = torch.tensor(HIST_VAR, dtype=torch.float64, device=device)
    if impl == "loop_ref" and size.groups > LOOP_REF_MAX_GROUPS:
        return None
    if impl == "op_graph" and (device != "cuda" or case == "forward+backward"):
        return None
    if impl == "op_raw" and case == "forward+backward":
        return None
    if impl == "compile":
        # Inductor's CPU kernels are specialised on the thread count, which dynamo's guards do
        # not check: compile afresh for every case, size and thread setting.
        torch._dynamo.reset()

    if case in ("forward", "forward+backward"):
        if impl == "op":
            def f(r):
                return bv_blend_ext.blend_advantages(r, k, offsets=offsets, hist_mean=h,
                                                     hist_var=u, eps=EPS, scale=SCALE)
        elif impl in ("op_raw", "op_graph"):
            def f(r):
                return torch.ops.bv_blend.group_advantages(r, offsets, k or 0, h, u, EPS, SCALE)
        elif impl in ("eager", "compile"):
            def f(r):
                return baseline.blend_advantages(r, k, offsets=offsets, hist_mean=h, hist_var=u,
                                                 eps=EPS, scale=SCALE)
            if impl == "compile":
                f = _compiled(f)
        else:
            def f(r):
                return reference.blend_advantages(r, k, offsets=offsets, hist_mean=HIST_MEAN,
                                                  hist_var=HIST_VAR, eps=EPS, scale=SCALE)
        if case == "forward":
            fn = lambda: f(rewards)  # noqa: E731
        else:
            leaf = rewards.clone().requires_grad_(True)
            grad_out = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(1)).to(device)
            fn = lambda: torch.autograd.grad(f(leaf)[0], leaf, grad_out)  # noqa: E731
    else:  # step
        if impl == "op":
            est = bv_blend_ext.BVBlend(window=WINDOW, min_history=MIN_HISTORY, eps=EPS,
                                       scale=SCALE).to(device)
            fn = lambda: est(rewards, k, offsets=offsets)  # noqa: E731
        elif impl in ("op_raw", "op_graph"):
            hist = baseline.History(window=WINDOW, min_history=MIN_HISTORY, device=device)

            def fn():
                out = torch.ops.bv_blend.group_advantages(rewards, offsets, k or 0, hist.ema,
                                                          hist.var, EPS, SCALE)
                torch.ops.bv_blend.update_history(out[1], hist.ring, hist.count, hist.ema,
                                                  hist.var, hist.alpha, MIN_HISTORY)
                return out[0]
        elif impl == "eager":
            hist = baseline.History(window=WINDOW, min_history=MIN_HISTORY, device=device)
            fn = lambda: hist.step(rewards, k, offsets=offsets, eps=EPS, scale=SCALE)  # noqa: E731
        elif impl == "compile":
            step = _compiled(_stateful_step)
            hist = baseline.History(window=WINDOW, min_history=MIN_HISTORY, device=device)
            state = [hist.ring, hist.count, hist.ema, hist.var]

            def fn():
                adv, *new_state = step(rewards, offsets, k or 0, *state)
                state[:] = new_state
                return adv
        else:
            hist = reference.HistoryReference(window=WINDOW, min_history=MIN_HISTORY)
            fn = lambda: hist.step(rewards, k, offsets=offsets, eps=EPS, scale=SCALE)  # noqa: E731
    if impl == "op_graph":
        return _graphed(fn)
    return fn


def _graphed(fn):
    """Captures fn in a CUDA graph; returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def time_callable(fn, device: str, budget_s: float, repeats: int) -> tuple[float, float, float]:
    """(best, median, interquartile range) of the seconds per call over `repeats` timed blocks of
    a calibrated number of calls. CUDA blocks are timed with events after a synchronize."""
    cuda = device == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(budget_s / repeats / once))
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return min(samples), statistics.median(samples), q[2] - q[0]


def build_info() -> str:
    """The commit of the working tree and the build time of the loaded extension."""
    lib = Path(bv_blend_ext._C.__file__)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=lib.parent,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(lib.stat().st_mtime))
    return f"commit {commit}, extension built {built}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_dir(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu {cpu_name()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_config(device: str, threads: int | None, sizes, impls, budget_s: float, repeats: int,
               log=print) -> list[dict]:
    """Times every (case, size, impl) on one device / thread setting."""
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    for case in CASES:
        for size in sizes:
            for impl in impls:
                t0 = time.perf_counter()
                try:
                    fn = build(case, impl, size, device)
                    if fn is None:
                        continue
                    fn()  # first call: compiles under torch.compile
                except Exception as err:  # noqa: BLE001
                    if impl not in ("op_graph", "compile"):
                        raise
                    # A baseline that cannot be built here (a failed CUDA-graph capture, no
                    # working compiler) is reported in the notes rather than ending the run.
                    NOTES.append(f"{impl} {case} {size.label}: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}")
                    log(f"  {NOTES[-1]}")
                    continue
                if device == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                best, median, iqr = time_callable(fn, device, budget_s, repeats)
                rewards, _ = make_inputs(size, "cpu")
                row = dict(device=device, threads=threads if threads is not None else "",
                           case=case, size=size.label, rewards=rewards.numel(), impl=impl,
                           best_us=best * 1e6, median_us=median * 1e6, iqr_us=iqr * 1e6,
                           compile_s=first_s if impl == "compile" else "")
                rows.append(row)
                log(f"  {device} threads={row['threads'] or '-'} {case:17s} {size.label:22s} "
                    f"{impl:9s} {best * 1e6:12.1f} us")
    return rows


def clone_ratio(budget_s: float, repeats: int) -> dict:
    """CUDA: the op's forward at 2^26 rewards against rewards.clone() (one read + one write of
    every reward, like the op): achieved bandwidth and the ratio t_clone / t_op."""
    rewards = torch.rand(CLONE_REWARDS, device="cuda")
    h = torch.tensor(HIST_MEAN, dtype=torch.float64, device="cuda")
    u = torch.tensor(HIST_VAR, dtype=torch.float64, device="cuda")
    t_clone, *_ = time_callable(rewards.clone, "cuda", budget_s, repeats)
    t_op, *_ = time_callable(
        lambda: torch.ops.bv_blend.group_advantages(rewards, None, 16, h, u, EPS, SCALE),
        "cuda", budget_s, repeats)
    traffic = 2 * rewards.numel() * rewards.element_size()
    return dict(rewards=CLONE_REWARDS, clone_us=t_clone * 1e6, op_us=t_op * 1e6,
                clone_gbs=traffic / t_clone / 1e9, op_gbs=traffic / t_op / 1e9,
                ratio=t_clone / t_op)


def speedups(rows: list[dict]):
    """{(threads, case, size): {impl: best_us}}."""
    table: dict = {}
    for r in rows:
        table.setdefault((r["threads"], r["case"], r["size"]), {})[r["impl"]] = r["best_us"]
    return table


def _fmt_us(x):
    return "" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def _fmt_ratio(a, b):
    return "" if a is None or b is None else f"{b / a:.1f}x"


def markdown(device: str, rows: list[dict], clone: dict | None, impls, command: str,
             repeats: int) -> str:
    present = [i for i in IMPLS if i in impls and any(r["impl"] == i for r in rows)]
    lines = [f"# bv_blend_ext op benchmark: {device_dir(device)}", "",
             f"torch {torch.__version__}, {cpu_name() if device == 'cpu' else torch.cuda.get_device_name()}, "
             f"scale={SCALE!r}, rewards float32. Time per call in microseconds: the best of "
             f"{repeats} timed blocks of calls, each block's mean (the least disturbed by other "
             "processes; op.csv also has the median and IQR of the blocks). `vs eager` / "
             "`vs compile` = baseline time / op time (higher is better).", "",
             f"Command: `{command}`", "",
             f"Build: {build_info()}. "
             "Load average (1 min) at the start and end of this device's run: "
             f"{LOAD[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.", ""]
    table = speedups(rows)
    for threads in dict.fromkeys(r["threads"] for r in rows):
        title = f"{threads} thread(s)" if threads != "" else "CUDA"
        lines += [f"## {title}", "",
                  "| case | size | " + " | ".join(f"{i} us" for i in present)
                  + " | op vs eager | op vs compile |",
                  "|---|---|" + "---:|" * (len(present) + 2)]
        for (t, case, size), cell in table.items():
            if t != threads:
                continue
            lines.append(f"| {case} | {size} | " + " | ".join(_fmt_us(cell.get(i)) for i in present)
                         + f" | {_fmt_ratio(cell.get('op'), cell.get('eager'))}"
                         f" | {_fmt_ratio(cell.get('op'), cell.get('compile'))} |")
        compile_times = [r["compile_s"] for r in rows if r["threads"] == threads and r["compile_s"] != ""]
        if compile_times:
            lines += ["", f"torch.compile first-call (compile) time: median "
                      f"{statistics.median(compile_times):.1f} s, max {max(compile_times):.1f} s."]
        lines.append("")
    lines += targets(device, rows)
    if NOTES:
        lines += ["## Notes", ""] + [f"- {note}" for note in NOTES] + [""]
    if clone is not None:
        lines += ["## Bandwidth at 2^26 rewards", "",
                  "| rewards | clone us | op us | clone GB/s | op GB/s | clone/op |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {clone['rewards']} | {clone['clone_us']:,.0f} | {clone['op_us']:,.0f} | "
                  f"{clone['clone_gbs']:,.0f} | {clone['op_gbs']:,.0f} | {clone['ratio']:.2f} |", ""]
    return "\n".join(lines) + "\n"


def targets(device: str, rows: list[dict]) -> list[str]:
    """The issue's targets, checked on this run's numbers."""
    table = speedups(rows)
    out = ["## Targets", ""]
    if device == "cpu":
        keys = [key for key in table if key[0] == 1]
        need_eager, need_compile, who = 10.0, 1.5, "CPU 1 thread"
    else:
        keys = list(table)
        need_eager, need_compile, who = 10.0, 2.0, "CUDA"
    eager = [(table[key]["eager"] / table[key]["op"], key) for key in keys
             if "eager" in table[key] and "op" in table[key]]
    if eager:
        worst, key = min(eager)
        out.append(f"- {who}, op >= {need_eager:g}x eager at every size and case: "
                   f"{'met' if worst >= need_eager else 'MISSED'} (lowest {worst:.1f}x: {key[1]} {key[2]})")
    for key in keys:
        if key[2] == "1024x16" and "compile" in table[key] and "op" in table[key]:
            ratio = table[key]["compile"] / table[key]["op"]
            out.append(f"- {who}, op >= {need_compile:g}x torch.compile at 1024x16, {key[1]}: "
                       f"{'met' if ratio >= need_compile else 'MISSED'} ({ratio:.1f}x)")
    return out + [""]


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, device: str, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["threads"] for r in rows))
    fig, axes = plt.subplots(len(configs), len(CASES), figsize=(5 * len(CASES), 3.8 * len(configs)),
                             squeeze=False)
    for ci, threads in enumerate(configs):
        for cj, case in enumerate(CASES):
            ax = axes[ci][cj]
            sel = [r for r in rows if r["threads"] == threads and r["case"] == case]
            sizes = list(dict.fromkeys(r["size"] for r in sel))
            for impl in IMPLS:
                pts = [(sizes.index(r["size"]), r["best_us"]) for r in sel if r["impl"] == impl]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl, color=f"C{IMPLS.index(impl)}")
            ax.set_xticks(range(len(sizes)), sizes, rotation=20, fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("us per call")
            where = f"{threads} thread(s)" if threads != "" else "CUDA"
            ax.set_title(f"{case}, {where}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"bv_blend_ext op vs pure PyTorch ({device_dir(device)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_threads(spec: str) -> list[int]:
    all_threads = torch.get_num_threads()
    return list(dict.fromkeys(all_threads if t == "all" else int(t) for t in spec.split(",")))


def main(argv=None) -> int:
    global LOOP_REF_MAX_GROUPS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes, short timing, no torch.compile (smoke test)")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                   help="all = CPU, plus CUDA when available")
    p.add_argument("--threads", default="1,all", help="CPU thread counts, e.g. 1,all")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--loop-ref-max-groups", type=int, default=LOOP_REF_MAX_GROUPS,
                   help="time the Python-loop reference only up to this many groups")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="results root: files go to <out-dir>/<device-name>/ (default "
                        "benchmarks/results, benchmarks/results/quick with --quick)")
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = RESULTS / "quick" if args.quick else RESULTS
    LOOP_REF_MAX_GROUPS = min(args.loop_ref_max_groups, 64) if args.quick else args.loop_ref_max_groups

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    budget_s, repeats = (0.01, 3) if args.quick else (0.25, REPEATS)
    impls = [i for i in IMPLS if not (i == "compile" and (args.quick or args.no_compile))]

    devices = []
    if args.device in ("cpu", "all"):
        devices.append("cpu")
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device")
        devices.append("cuda")

    for device in devices:
        print(f"{device_dir(device)}:")
        LOAD[0] = os.getloadavg()[0]
        rows = []
        if device == "cpu":
            for threads in parse_threads(args.threads):
                rows += run_config("cpu", threads, sizes, impls, budget_s, repeats)
        else:
            rows += run_config("cuda", None, sizes, impls, budget_s, repeats)
        clone = clone_ratio(budget_s, repeats) if device == "cuda" and not args.quick else None
        out = args.out_dir / device_dir(device)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "op.csv", rows)
        command = " ".join(["python benchmarks/bench_op.py", *(sys.argv[1:] if argv is None else argv)])
        (out / "op.md").write_text(markdown(device, rows, clone, impls, command, repeats))
        plot(out / "op.png", device, rows)
        print((out / "op.md").read_text())
        print(f"wrote {out}/op.md, op.csv, op.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
