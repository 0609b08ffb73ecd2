"""What every benchmark script shares: where results go, the command line a report quotes,
timing, the CSV writer and figures written to files."""

from __future__ import annotations

import csv
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = RESULTS / "quick"  # git-ignored: what the --quick smoke modes write


def command_line(script: str, argv: list[str] | None) -> str:
    """The command a report quotes: `python benchmarks/<script> <arguments>`."""
    return " ".join([f"python benchmarks/{Path(script).name}",
                     *(sys.argv[1:] if argv is None else argv)])


def time_callable(fn: Callable[[], object], device: str, budget_s: float,
                  repeats: int) -> tuple[float, float, float]:
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


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per dict; the columns are the first row's keys, in order."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@contextmanager
def figure(path: Path, rows: int, cols: int, **subplots) -> Iterator[tuple]:
    """(figure, axes) of a new rows x cols grid, written to `path` when the block ends."""
    import matplotlib
    matplotlib.use("Agg")  # files only: benchmark machines have no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
