"""Op microbenchmarks: bv_blend_ext against pure PyTorch, eager and under torch.compile.

    python benchmarks/bench_op.py                 # full run: CPU 1 thread + all threads, CUDA if present
    python benchmarks/bench_op.py --quick         # seconds: small sizes, no torch.compile

Cases: ``forward`` (advantages), ``forward+backward`` (d advantages / d rewards through the
group statistics), ``step`` (the stateful estimator: advantages + history update) and ``keyed step``
(the estimator with a history per key: NUM_KEYS keys, fresh random keys every call).
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
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

if not __package__:
    # Run as `python benchmarks/bench_op.py`: the repository root makes this script's siblings
    # importable as the `benchmarks` package, as they are under pytest.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bv_blend_ext  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks import pytorch_baseline as baseline  # noqa: E402
from bv_blend_ext import reference  # noqa: E402

CASES = ("forward", "forward+backward", "step", "keyed step")
IMPLS = ("op", "op_raw", "op_graph", "eager", "compile", "loop_ref")
HIST_MEAN, HIST_VAR, EPS, SCALE = 0.3, 0.05, 1e-4, "blend"
WINDOW, MIN_HISTORY = 100, 2
CLONE_REWARDS = 1 << 26
KEY_POOL = 16  # key draws cycled through, so that the tables' cache lines are not all warm


@dataclass(frozen=True)
class Target:
    """The issue's speed targets on one device, checked against each run in its report."""
    who: str
    threads: int | None  # the CPU thread count whose rows they judge; None: every row (CUDA)
    vs_eager: dict[str, float]  # per case: op time x this <= eager time at every size
    vs_compile: float  # op time x this <= torch.compile time at `compile_size`, every case
    keyed_vs_step: float | None = None  # keyed step op time <= this x the step's at keyed_size
    keyed_size: str = "1024x16"
    compile_size: str = "1024x16"


TARGETS = {"cpu": Target("CPU 1 thread", threads=1,
                         vs_eager={"forward": 10.0, "step": 10.0, "forward+backward": 5.0,
                                   "keyed step": 10.0},
                         vs_compile=1.5, keyed_vs_step=1.5),
           "cuda": Target("CUDA", threads=None, vs_eager=dict.fromkeys(CASES, 10.0),
                          vs_compile=2.0)}


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


@dataclass(frozen=True)
class Plan:
    """What a run measures, and how long it times each measurement."""
    sizes: tuple[Size, ...]
    impls: tuple[str, ...]
    budget_s: float  # seconds of calls per measurement, over `repeats` timed blocks
    repeats: int
    loop_ref_max_groups: int  # the Python-loop reference is timed up to this many groups only
    compile_sizes: tuple[str, ...] | None = None  # torch.compile only at these size labels; None: all
    keyed_sizes: tuple[str, ...] = ("1024x16", "16384x16")  # the sizes of the keyed step
    num_keys: int = 10 ** 6


FULL = Plan(FULL_SIZES, IMPLS, budget_s=0.25, repeats=7, loop_ref_max_groups=1024)
QUICK = Plan(QUICK_SIZES, tuple(i for i in IMPLS if i != "compile"), budget_s=0.01, repeats=3,
             loop_ref_max_groups=64, keyed_sizes=("64x8",), num_keys=10 ** 4)


@dataclass(frozen=True)
class Inputs:
    """One size's inputs on one device, as every implementation is handed them."""
    rewards: torch.Tensor
    offsets: torch.Tensor | None  # None unless ragged
    group_size: int | None  # None when ragged
    hist_mean: torch.Tensor  # HIST_MEAN and HIST_VAR as float64 scalars on the device
    hist_var: torch.Tensor
    device: str
    key_draws: list[torch.Tensor]  # KEY_POOL draws of (G,) keys in [0, num_keys)
    num_keys: int


def make_inputs(size: Size, device: str, num_keys: int = QUICK.num_keys) -> Inputs:
    """Rewards uniform in [0, 1), with 1% NaN and offsets in the ragged case; keys uniform."""
    g = torch.Generator().manual_seed(0)
    if size.ragged:
        lengths = torch.randint(1, 2 * size.group_size, (size.groups,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        rewards = torch.rand(int(offsets[-1]), generator=g)
        rewards[torch.rand(rewards.numel(), generator=g) < 0.01] = float("nan")
        offsets, group_size = offsets.to(device), None
    else:
        rewards = torch.rand(size.groups * size.group_size, generator=g)
        offsets, group_size = None, size.group_size
    key_draws = [torch.randint(0, num_keys, (size.groups,), generator=g).to(device)
                 for _ in range(KEY_POOL)]
    return Inputs(rewards.to(device), offsets, group_size,
                  torch.tensor(HIST_MEAN, dtype=torch.float64, device=device),
                  torch.tensor(HIST_VAR, dtype=torch.float64, device=device), device, key_draws,
                  num_keys)


# The implementations, each a function of the Inputs. Those of the advantages return
# f(rewards), which the forward cases below call; those of the stateful step return the call to
# time, so they are builders themselves.

def _compile(fn):
    # Inductor's CPU kernels are specialised on the thread count, which dynamo's guards do not
    # check: compile afresh for every case, size and thread setting.
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def op_advantages(x: Inputs):
    return lambda r: bv_blend_ext.blend_advantages(r, x.group_size, offsets=x.offsets,
                                                   hist_mean=x.hist_mean, hist_var=x.hist_var,
                                                   eps=EPS, scale=SCALE)


def raw_advantages(x: Inputs):
    return lambda r: torch.ops.bv_blend.group_advantages(r, x.offsets, x.group_size or 0,
                                                         x.hist_mean, x.hist_var, EPS, SCALE)


def eager_advantages(x: Inputs):
    return lambda r: baseline.blend_advantages(r, x.group_size, offsets=x.offsets,
                                               hist_mean=x.hist_mean, hist_var=x.hist_var,
                                               eps=EPS, scale=SCALE)


def compiled_advantages(x: Inputs):
    return _compile(eager_advantages(x))


def reference_advantages(x: Inputs):
    return lambda r: reference.blend_advantages(r, x.group_size, offsets=x.offsets,
                                                hist_mean=HIST_MEAN, hist_var=HIST_VAR, eps=EPS,
                                                scale=SCALE)


def op_step(x: Inputs):
    est = bv_blend_ext.BVBlend(window=WINDOW, min_history=MIN_HISTORY, eps=EPS,
                               scale=SCALE).to(x.device)
    return lambda: est(x.rewards, x.group_size, offsets=x.offsets)


def raw_step(x: Inputs):
    hist = baseline.History(window=WINDOW, min_history=MIN_HISTORY, device=x.device)

    def step():
        out = torch.ops.bv_blend.group_advantages(x.rewards, x.offsets, x.group_size or 0,
                                                  hist.ema, hist.var, EPS, SCALE)
        torch.ops.bv_blend.update_history(out[1], hist.ring, hist.count, hist.ema, hist.var,
                                          hist.alpha, MIN_HISTORY)
        return out[0]
    return step


def eager_step(x: Inputs):
    hist = baseline.History(window=WINDOW, min_history=MIN_HISTORY, device=x.device)
    return lambda: hist.step(x.rewards, x.group_size, offsets=x.offsets, eps=EPS, scale=SCALE)


def _functional_step(rewards, offsets, group_size: int, ring, count, ema, var):
    """eager_step with its history passed in and returned, the form torch.compile traces whole."""
    out = baseline.blend_advantages(rewards, group_size if offsets is None else None,
                                    offsets=offsets, hist_mean=ema, hist_var=var, eps=EPS,
                                    scale=SCALE)
    ring, count, ema, var = baseline.push_history(out.group_mean, ring, count, ema,
                                                  2.0 / (WINDOW + 1), MIN_HISTORY)
    return out.advantages, ring, count, ema, var


def compiled_step(x: Inputs):
    step = _compile(_functional_step)
    hist = baseline.History(window=WINDOW, min_history=MIN_HISTORY, device=x.device)
    state = [hist.ring, hist.count, hist.ema, hist.var]

    def call():
        adv, *new_state = step(x.rewards, x.offsets, x.group_size or 0, *state)
        state[:] = new_state
        return adv
    return call


def reference_step(x: Inputs):
    hist = reference.HistoryReference(window=WINDOW, min_history=MIN_HISTORY)
    return lambda: hist.step(x.rewards, x.group_size, offsets=x.offsets, eps=EPS, scale=SCALE)


def _cycled_keys(x: Inputs):
    draws = iter(range(1 << 62))
    return lambda: x.key_draws[next(draws) % KEY_POOL]


def op_keyed_step(x: Inputs):
    est = bv_blend_ext.BVBlend(window=WINDOW, min_history=MIN_HISTORY, eps=EPS, scale=SCALE,
                               num_keys=x.num_keys).to(x.device)
    keys = _cycled_keys(x)
    return lambda: est(x.rewards, x.group_size, offsets=x.offsets, keys=keys())


def graphed_keyed_step(x: Inputs):
    """One key draw: a captured graph replays fixed addresses."""
    est = bv_blend_ext.BVBlend(window=WINDOW, min_history=MIN_HISTORY, eps=EPS, scale=SCALE,
                               num_keys=x.num_keys).to(x.device)
    return _graphed(lambda: est(x.rewards, x.group_size, offsets=x.offsets, keys=x.key_draws[0],
                                validate=False))


def eager_keyed_step(x: Inputs):
    hist = baseline.KeyedHistory(x.num_keys, window=WINDOW, min_history=MIN_HISTORY,
                                 device=x.device)
    keys = _cycled_keys(x)
    return lambda: hist.step(x.rewards, x.group_size, offsets=x.offsets, keys=keys(), eps=EPS,
                             scale=SCALE)


def reference_keyed_step(x: Inputs):
    hist = reference.KeyedHistoryReference(x.num_keys, window=WINDOW, min_history=MIN_HISTORY)
    keys = _cycled_keys(x)
    return lambda: hist.step(x.rewards, x.group_size, offsets=x.offsets, keys=keys(), eps=EPS,
                             scale=SCALE)


# The forward cases, each around an implementation of the advantages.

Builder = Callable[[Inputs], Callable[[], object]]


def forward(advantages) -> Builder:
    def build_forward(x: Inputs):
        f = advantages(x)
        return lambda: f(x.rewards)
    return build_forward


def forward_backward(advantages) -> Builder:
    """d advantages / d rewards for a fixed random cotangent, through the group statistics."""
    def build_forward_backward(x: Inputs):
        f = advantages(x)
        leaf = x.rewards.clone().requires_grad_(True)
        grad_out = torch.randn(x.rewards.shape,
                               generator=torch.Generator().manual_seed(1)).to(x.device)
        return lambda: torch.autograd.grad(f(leaf)[0], leaf, grad_out)
    return build_forward_backward


def on_cuda_graph(builder: Builder) -> Builder:
    return lambda x: _graphed(builder(x))


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


# (case, implementation) -> its builder. A pair that is absent is not measured: the raw op and
# its CUDA graph have no autograd.
BUILDERS: dict[tuple[str, str], Builder] = {
    ("forward", "op"): forward(op_advantages),
    ("forward", "op_raw"): forward(raw_advantages),
    ("forward", "op_graph"): on_cuda_graph(forward(raw_advantages)),
    ("forward", "eager"): forward(eager_advantages),
    ("forward", "compile"): forward(compiled_advantages),
    ("forward", "loop_ref"): forward(reference_advantages),
    ("forward+backward", "op"): forward_backward(op_advantages),
    ("forward+backward", "eager"): forward_backward(eager_advantages),
    ("forward+backward", "compile"): forward_backward(compiled_advantages),
    ("forward+backward", "loop_ref"): forward_backward(reference_advantages),
    ("step", "op"): op_step,
    ("step", "op_raw"): raw_step,
    ("step", "op_graph"): on_cuda_graph(raw_step),
    ("step", "eager"): eager_step,
    ("step", "compile"): compiled_step,
    ("step", "loop_ref"): reference_step,
    ("keyed step", "op"): op_keyed_step,
    ("keyed step", "op_graph"): graphed_keyed_step,
    ("keyed step", "eager"): eager_keyed_step,
    ("keyed step", "loop_ref"): reference_keyed_step,
}


def applies(case: str, impl: str, size: Size, device: str, plan: Plan) -> bool:
    """Whether `impl` runs `case` at `size` on `device`, within the plan's limits."""
    return ((case, impl) in BUILDERS and (impl != "op_graph" or device == "cuda")
            and (impl != "loop_ref" or size.groups <= plan.loop_ref_max_groups)
            and (impl != "compile" or plan.compile_sizes is None
                 or size.label in plan.compile_sizes)
            and (case != "keyed step" or size.label in plan.keyed_sizes))


def build(case: str, impl: str, size: Size, device: str, num_keys: int) -> Callable[[], object]:
    """The zero-argument call that runs `case` with `impl` on fresh inputs. The first call of a
    `compile` one compiles it."""
    return BUILDERS[(case, impl)](make_inputs(size, device, num_keys))


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


@dataclass
class DeviceRun:
    """One device's measurements, and what its report says besides them."""
    device: str
    load_at_start: float  # the 1-minute load average when the device's run started
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the baselines that could not be built
    clone: dict | None = None  # CUDA: the op against rewards.clone(), see clone_ratio
    floor: dict | None = None  # CUDA: see launch_floor


def run_config(device: str, threads: int | None, plan: Plan,
               log=print) -> tuple[list[dict], list[str]]:
    """Times every (case, size, impl) of `plan` on one device / thread setting. Returns the rows
    and a note for each baseline that could not be built."""
    if threads is not None:
        torch.set_num_threads(threads)
    rows, notes = [], []
    for case in CASES:
        for size in plan.sizes:
            for impl in plan.impls:
                if not applies(case, impl, size, device, plan):
                    continue
                t0 = time.perf_counter()
                try:
                    fn = build(case, impl, size, device, plan.num_keys)
                    fn()  # first call: compiles under torch.compile
                except Exception as err:  # noqa: BLE001
                    if impl not in ("op_graph", "compile"):
                        raise
                    # A baseline that cannot be built here (a failed CUDA-graph capture, no
                    # working compiler) is reported in the notes rather than ending the run.
                    notes.append(f"{impl} {case} {size.label}: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}")
                    log(f"  {notes[-1]}")
                    continue
                if device == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                best, median, iqr = harness.time_callable(fn, device, plan.budget_s, plan.repeats)
                row = dict(device=device, threads=threads if threads is not None else "",
                           case=case, size=size.label,
                           rewards=make_inputs(size, "cpu").rewards.numel(), impl=impl,
                           best_us=best * 1e6, median_us=median * 1e6, iqr_us=iqr * 1e6,
                           compile_s=first_s if impl == "compile" else "")
                rows.append(row)
                log(f"  {device} threads={row['threads'] or '-'} {case:17s} {size.label:22s} "
                    f"{impl:9s} {best * 1e6:12.1f} us")
    return rows, notes


def clone_ratio(budget_s: float, repeats: int) -> dict:
    """CUDA: the op's forward at 2^26 rewards against rewards.clone() (one read + one write of
    every reward, like the op): achieved bandwidth and the ratio t_clone / t_op."""
    rewards = torch.rand(CLONE_REWARDS, device="cuda")
    h = torch.tensor(HIST_MEAN, dtype=torch.float64, device="cuda")
    u = torch.tensor(HIST_VAR, dtype=torch.float64, device="cuda")
    t_clone, *_ = harness.time_callable(rewards.clone, "cuda", budget_s, repeats)
    t_op, *_ = harness.time_callable(
        lambda: torch.ops.bv_blend.group_advantages(rewards, None, 16, h, u, EPS, SCALE),
        "cuda", budget_s, repeats)
    traffic = 2 * rewards.numel() * rewards.element_size()
    return dict(rewards=CLONE_REWARDS, clone_us=t_clone * 1e6, op_us=t_op * 1e6,
                clone_gbs=traffic / t_clone / 1e9, op_gbs=traffic / t_op / 1e9,
                ratio=t_clone / t_op)


def launch_floor(budget_s: float, repeats: int) -> dict:
    """CUDA: what the stateful step costs beside the floor of a CUDA graph launch (one
    one-element kernel replayed), and the history update alone beside the forward at 65,536
    groups, each replayed from a CUDA graph."""
    one = torch.zeros(1, device="cuda")
    floor, *_ = harness.time_callable(_graphed(lambda: one.add_(1)), "cuda", budget_s, repeats)
    x = make_inputs(Size(65536, 16), "cuda")
    out = raw_advantages(x)(x.rewards)
    hist = baseline.History(window=WINDOW, min_history=MIN_HISTORY, device="cuda")
    update = _graphed(lambda: torch.ops.bv_blend.update_history(
        out[1], hist.ring, hist.count, hist.ema, hist.var, hist.alpha, MIN_HISTORY))
    t_update, *_ = harness.time_callable(update, "cuda", budget_s, repeats)
    t_forward, *_ = harness.time_callable(on_cuda_graph(forward(raw_advantages))(x), "cuda",
                                          budget_s, repeats)
    return dict(floor_us=floor * 1e6, update_65536_us=t_update * 1e6,
                forward_65536_us=t_forward * 1e6)


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


def markdown(run: DeviceRun, repeats: int, command: str) -> str:
    rows = run.rows
    present = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    lines = [f"# bv_blend_ext op benchmark: {device_dir(run.device)}", "",
             f"torch {torch.__version__}, "
             f"{cpu_name() if run.device == 'cpu' else torch.cuda.get_device_name()}, "
             f"scale={SCALE!r}, rewards float32. Time per call in microseconds: the best of "
             f"{repeats} timed blocks of calls, each block's mean (the least disturbed by other "
             "processes; op.csv also has the median and IQR of the blocks). `vs eager` / "
             "`vs compile` = baseline time / op time (higher is better).", "",
             f"Command: `{command}`", "",
             f"Build: {build_info()}. "
             "Load average (1 min) at the start and end of this device's run: "
             f"{run.load_at_start:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.", ""]
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
    lines += targets(TARGETS[run.device], rows)
    if run.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in run.notes] + [""]
    if run.clone is not None:
        clone = run.clone
        lines += ["## Bandwidth at 2^26 rewards", "",
                  "| rewards | clone us | op us | clone GB/s | op GB/s | clone/op |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {clone['rewards']} | {clone['clone_us']:,.0f} | {clone['op_us']:,.0f} | "
                  f"{clone['clone_gbs']:,.0f} | {clone['op_gbs']:,.0f} | {clone['ratio']:.2f} |", ""]
    if run.floor is not None:
        floor = run.floor
        step = speedups(rows).get(("", "step", "1024x16"), {}).get("op_graph")
        lines += ["## Launch floor and history update (CUDA graph replays)", "",
                  f"- Floor (one one-element kernel): {floor['floor_us']:.1f} us"]
        if step is not None:
            lines.append(f"- Stateful step at 1024x16: {step:.1f} us = "
                         f"{step / floor['floor_us']:.2f}x the floor (target <= 1.5x)")
        lines += [f"- History update alone at 65,536 groups: {floor['update_65536_us']:.1f} us; "
                  f"forward at 65,536x16: {floor['forward_65536_us']:.1f} us (target: update <= "
                  "forward)", ""]
    return "\n".join(lines) + "\n"


def targets(target: Target, rows: list[dict]) -> list[str]:
    """`target` checked on this run's numbers."""
    table = speedups(rows)
    out = ["## Targets", ""]
    keys = [key for key in table if target.threads is None or key[0] == target.threads]
    for case, wanted in target.vs_eager.items():
        eager = [(table[key]["eager"] / table[key]["op"], key) for key in keys
                 if key[1] == case and "eager" in table[key] and "op" in table[key]]
        if eager:
            worst, key = min(eager)
            out.append(f"- {target.who}, {case}: op >= {wanted:g}x eager at every size: "
                       f"{'met' if worst >= wanted else 'MISSED'} (lowest {worst:.1f}x at {key[2]})")
    if target.keyed_vs_step is not None:
        for threads, case, size in keys:
            step = table.get((threads, "step", size), {}).get("op")
            if (case == "keyed step" and size == target.keyed_size and step is not None
                    and "op" in table[(threads, case, size)]):
                ratio = table[(threads, case, size)]["op"] / step
                out.append(f"- {target.who}, keyed step within {target.keyed_vs_step:g}x of the "
                           f"step at {size}: {'met' if ratio <= target.keyed_vs_step else 'MISSED'}"
                           f" ({ratio:.2f}x)")
    for key in keys:
        if key[2] == target.compile_size and "compile" in table[key] and "op" in table[key]:
            ratio = table[key]["compile"] / table[key]["op"]
            out.append(f"- {target.who}, op >= {target.vs_compile:g}x torch.compile at "
                       f"{target.compile_size}, {key[1]}: "
                       f"{'met' if ratio >= target.vs_compile else 'MISSED'} ({ratio:.1f}x)")
    return out + [""]


def plot(path: Path, device: str, rows: list[dict]) -> None:
    configs = list(dict.fromkeys(r["threads"] for r in rows))
    with harness.figure(path, len(configs), len(CASES),
                        figsize=(5 * len(CASES), 3.8 * len(configs)), squeeze=False) as (fig, axes):
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


def parse_threads(spec: str) -> list[int]:
    all_threads = torch.get_num_threads()
    return list(dict.fromkeys(all_threads if t == "all" else int(t) for t in spec.split(",")))


def plan_from(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    loop_ref_max_groups = args.loop_ref_max_groups
    if args.quick:  # the quick run keeps the Python loop at its small sizes, whatever the flag
        loop_ref_max_groups = min(loop_ref_max_groups, QUICK.loop_ref_max_groups)
    compile_sizes = tuple(args.compile_sizes.split(",")) if args.compile_sizes else None
    return replace(plan, impls=tuple(i for i in plan.impls if not (args.no_compile and i == "compile")),
                   loop_ref_max_groups=loop_ref_max_groups, compile_sizes=compile_sizes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes, short timing, no torch.compile (smoke test)")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                   help="all = CPU, plus CUDA when available")
    p.add_argument("--threads", default="1,all", help="CPU thread counts, e.g. 1,all")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-sizes", default=None,
                   help="time torch.compile only at these sizes, e.g. 1024x16 (default: all; "
                        "each compile costs seconds to a minute)")
    p.add_argument("--loop-ref-max-groups", type=int, default=FULL.loop_ref_max_groups,
                   help="time the Python-loop reference only up to this many groups")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="results root: files go to <out-dir>/<device-name>/ (default "
                        "benchmarks/results, benchmarks/results/quick with --quick)")
    args = p.parse_args(argv)
    out_dir = args.out_dir or (harness.QUICK_RESULTS if args.quick else harness.RESULTS)
    plan = plan_from(args)

    devices = []
    if args.device in ("cpu", "all"):
        devices.append("cpu")
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device")
        devices.append("cuda")

    for device in devices:
        print(f"{device_dir(device)}:")
        run = DeviceRun(device, load_at_start=os.getloadavg()[0])
        for threads in parse_threads(args.threads) if device == "cpu" else [None]:
            rows, notes = run_config(device, threads, plan)
            run.rows += rows
            run.notes += notes
        if device == "cuda" and not args.quick:
            run.clone = clone_ratio(plan.budget_s, plan.repeats)
            run.floor = launch_floor(plan.budget_s, plan.repeats)
        out = out_dir / device_dir(device)
        out.mkdir(parents=True, exist_ok=True)
        harness.write_csv(out / "op.csv", run.rows)
        (out / "op.md").write_text(markdown(run, plan.repeats, harness.command_line(__file__, argv)))
        plot(out / "op.png", device, run.rows)
        print((out / "op.md").read_text())
        print(f"wrote {out}/op.md, op.csv, op.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
