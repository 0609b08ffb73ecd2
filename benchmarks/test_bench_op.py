"""pytest-benchmark suite of the op cases of bench_op.py (not part of `make test`):

    pytest benchmarks/ --benchmark-only                    # everything (torch.compile: minutes)
    pytest benchmarks/ --benchmark-only -k "not compile"   # without the compile baseline

Benchmarks are grouped by device / threads / case / size, so each group's table puts the op,
the eager pure-PyTorch baseline and its torch.compile version side by side.
"""

import pytest
import torch

from benchmarks import bench_op

DEVICES = [("cpu", 1), ("cpu", torch.get_num_threads())]
if torch.cuda.is_available():
    DEVICES.append(("cuda", None))


@pytest.mark.parametrize("impl", ["op", "eager", "compile"])
@pytest.mark.parametrize("size", bench_op.FULL_SIZES, ids=lambda s: s.label.replace(" ", "_"))
@pytest.mark.parametrize("case", bench_op.CASES)
@pytest.mark.parametrize("device,threads", DEVICES, ids=lambda v: str(v))
def test_op(benchmark, device, threads, case, size, impl):
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        fn = bench_op.build(case, impl, size, device)
        if device == "cuda":
            inner = fn

            def fn():
                inner()
                torch.cuda.synchronize()
        fn()  # compiles under torch.compile; warms caches otherwise
        benchmark.group = f"{device} threads={threads} {case} {size.label}"
        benchmark(fn)
    finally:
        torch.set_num_threads(previous)
