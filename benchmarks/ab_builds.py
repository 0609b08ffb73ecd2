"""Before/after timing of the op in two source trees (two builds of bv_blend_ext), side by side.

    python benchmarks/ab_builds.py /path/to/before-checkout            # vs this tree
    python benchmarks/ab_builds.py OLD NEW --rounds 4 --sizes 1024x16,65536x16

A process can load only one build of the op library, so each measurement runs in a child process
importing the given tree's `bv_blend_ext` (built in place there) and this tree's benchmark code
(bench_op's cases, the harness's timing); the trees alternate round by round so that both see the
same machine load. Reports the best time per case and tree, and after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("forward", "forward+backward", "step")

# Both trees hold a `bv_blend_ext` and may hold a `benchmarks` package, so the child puts each
# tree first on sys.path in turn, before anything else there (the current directory included),
# while it imports the package it wants from it.
CHILD = """
import json, sys, torch
tree, this_tree, sizes, cases = sys.argv[1:]
sys.path.insert(0, tree)
import bv_blend_ext
sys.path[0] = this_tree
from benchmarks import bench_op, harness
torch.set_num_threads(1)
seconds = {}
for size in [bench_op.Size(*map(int, s.split("x"))) for s in sizes.split(",")]:
    for case in cases.split(","):
        fn = bench_op.build(case, "op", size, "cpu")
        seconds[f"{case} {size.label}"] = harness.time_callable(fn, "cpu", 0.5, 5)[0]
print(json.dumps(dict(library=bv_blend_ext.__file__, seconds=seconds)))
"""


def measure(tree: Path, sizes: str, cases: str) -> dict[str, float]:
    tree = tree.resolve()
    result = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(HERE.parent), sizes, cases],
                            check=True, capture_output=True, text=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # A child that loaded another tree's build would compare one build with itself.
    if not Path(report["library"]).is_relative_to(tree):
        raise RuntimeError(f"timing {tree}, the child loaded {report['library']}")
    return report["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path, nargs="?", default=HERE.parent)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="1024x16,65536x16")
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    best: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            for key, seconds in measure(getattr(args, name), args.sizes, args.cases).items():
                best[name][key] = min(seconds, best[name].get(key, float("inf")))
    print(f"1 thread, best of {args.rounds} rounds x 5 blocks, us per call; load "
          f"{os.getloadavg()[0]:.2f} at the end")
    print("| case | before | after | after/before |\n|---|---:|---:|---:|")
    for key, before in best["before"].items():
        after = best["after"][key]
        print(f"| {key} | {before * 1e6:,.1f} | {after * 1e6:,.1f} | {after / before:.3f} |")


if __name__ == "__main__":
    main()
