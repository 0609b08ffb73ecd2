"""The keyed step's table layout, side by side in one process: torch.ops.bv_blend.keyed_step on
three separate (K,) tables against the same tables as columns of one 32-byte record per key
(what BVBlend keeps), both in memory advised for transparent huge pages.

    python benchmarks/bench_key_layout.py    # 1024x16, K = 10^6, one thread; writes key_layout.md
                                             # under benchmarks/results/keyed-step-check/

Each call takes fresh keys from a pool of 16 uniformly random draws (as bench_op.py's keyed
case), validate=True. Prints the median over rounds of the best of three timings per layout,
the two layouts alternating round by round so that drifts in the machine's load hit both."""

import argparse
import itertools
import statistics
import sys
import timeit
from pathlib import Path

import torch

from bv_blend_ext.module import key_records, key_tables


def huge_page_table(num_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed (num_keys,) table in its own huge-page mapping, as each table was before the
    records (num_keys a multiple of 4)."""
    return key_records(num_keys // 4).view(-1).view(dtype)


def keyed_state(tables, window: int = 100):
    return [*tables, torch.zeros(window, dtype=torch.float64), torch.zeros((), dtype=torch.int64),
            torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)]


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--num-keys", type=int, default=10**6)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--out-dir", type=Path,
                        default=Path(__file__).parent / "results" / "keyed-step-check")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    pool = [(torch.rand(args.groups * args.group_size, generator=gen),
             torch.randint(0, args.num_keys, (args.groups,), generator=gen)) for _ in range(16)]
    layouts = {
        "three tables": keyed_state([huge_page_table(args.num_keys, torch.int64),
                                     huge_page_table(args.num_keys, torch.float64),
                                     huge_page_table(args.num_keys, torch.float64)]),
        "one record per key": keyed_state(key_tables(key_records(args.num_keys))),
    }

    def stepper(state):
        calls = itertools.count()

        def step():
            rewards, keys = pool[next(calls) % len(pool)]
            count, mean, var, ring, pushed, ema, global_var = state
            torch.ops.bv_blend.keyed_step(rewards, None, args.group_size, keys, count, mean, var,
                                          0.25, 2, ring, pushed, ema, global_var, 0.02, 2, 1e-4,
                                          "none", True)
        return step

    steps = {name: stepper(state) for name, state in layouts.items()}
    for step in steps.values():  # every key table page touched, caches warm
        for _ in range(4 * args.calls):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            best = min(timeit.repeat(step, number=args.calls, repeat=3))
            times[name].append(best / args.calls * 1e6)
    # Both made the same calls in the same order: the layouts must hold the same bits.
    for got, want in zip(*layouts.values()):
        if not torch.equal(got.view(torch.int64), want.view(torch.int64)):
            raise AssertionError("the two layouts' states differ after the same calls")
    command = ["python", "benchmarks/bench_key_layout.py",
               *(sys.argv[1:] if argv is None else argv)]
    lines = [f"`{' '.join(command)}`",
             "",
             f"keyed_step {args.groups}x{args.group_size}, K = {args.num_keys}, one thread, "
             f"validate=True: us per call, the median of {args.rounds} rounds (each the best of "
             f"3 x {args.calls} calls), then every round.",
             "",
             "| layout | median us | rounds |",
             "|---|---|---|"]
    lines += [f"| {name} | {statistics.median(values):.1f} | "
              f"{' '.join(f'{v:.1f}' for v in values)} |" for name, values in times.items()]
    print("\n".join(lines))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "key_layout.md").write_text("\n".join(lines) + "\n")
    return times


if __name__ == "__main__":
    main()
