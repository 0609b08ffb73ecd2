"""Helpers shared by the tests (tests/ is on pytest's pythonpath: `from helpers import ...`)."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import bv_blend_ext
from bv_blend_ext.reference import accumulation_dtype

# Advantages are rounded to the rewards' dtype at the very end, so two correct implementations
# (op and reference, CPU and CUDA) can differ by one unit in the last place of that dtype; the
# statistics stay in float32 (float64 for float64 rewards).
ADVANTAGE_TOL = {
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
}
STAT_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def ragged_rewards(num_groups, max_size, dtype, seed, nan_fraction=0.1, device="cpu"):
    """Continuous rewards in ragged groups of 0..max_size rewards, with NaNs sprinkled in.
    Returns (rewards (N,), offsets (G+1,) int64), both on `device`."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, max_size + 1, (num_groups,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    rewards = torch.randn(int(offsets[-1]), generator=gen, dtype=torch.float64) * 2 + 0.5
    rewards[torch.rand(rewards.shape, generator=gen) < nan_fraction] = float("nan")
    return rewards.to(device=device, dtype=dtype), offsets.to(device)


def bits(tensor):
    """The exact bit pattern of a tensor, so that NaNs compare equal and -0.0 differs from 0.0."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.detach().contiguous().view(ints[tensor.element_size()])


def assert_blend_close(got, want, dtype, advantage_atol=None):
    """Two BlendOutputs of `dtype` rewards agree: dtypes exactly, values to ADVANTAGE_TOL and
    STAT_TOL, NaN statistics where the other has them. `advantage_atol` loosens the advantages'
    absolute tolerance for continuous rewards, where nearly equal pairs give tiny σ and rounding
    of r - B is divided by ~σ + eps."""
    acc = accumulation_dtype(dtype)
    assert got.advantages.dtype == dtype
    assert [t.dtype for t in got[1:4]] == [acc, acc, acc]
    tol = dict(ADVANTAGE_TOL[dtype])
    if advantage_atol is not None:
        tol["atol"] = advantage_atol
    torch.testing.assert_close(got.advantages.cpu(), want.advantages.cpu(), equal_nan=True, **tol)
    for name in ("group_mean", "group_std", "beta"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name).cpu(),
                                   equal_nan=True, **STAT_TOL[acc],
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_history(est, hist, rtol):
    """The estimator's buffers (on any device) hold what a reference.HistoryReference holds."""
    state = {name: value.cpu() for name, value in est.state_dict().items()}
    assert int(state["count"]) == hist.count
    torch.testing.assert_close(state["ring"], torch.tensor(hist.ring, dtype=torch.float64),
                               rtol=rtol, atol=rtol)
    torch.testing.assert_close(float(est.history_mean), hist.ema, rtol=rtol, atol=rtol)
    torch.testing.assert_close(float(est.history_var), hist.variance, rtol=rtol, atol=rtol)


def determinism_outputs(ragged, offsets, fixed, grad_out, scale):
    """Every output of a forward and backward over ragged groups and of a forward over fixed groups
    of 16, by name, as bit patterns: what the determinism tests compare from run to run."""
    r = ragged.clone().requires_grad_()
    out = bv_blend_ext.blend_advantages(r, offsets=offsets, hist_mean=0.2, hist_var=0.9,
                                        scale=scale)
    (grad,) = torch.autograd.grad(out.advantages, r, grad_out)
    fixed_out = bv_blend_ext.blend_advantages(fixed, 16, hist_mean=0.2, hist_var=0.9, scale=scale)
    named = zip(("advantages", "group_mean", "group_std", "beta", "grad", "fixed advantages",
                 "fixed group_mean", "fixed group_std", "fixed beta"), (*out, grad, *fixed_out))
    return {name: bits(t) for name, t in named}


_FORWARD_BACKWARD_CHILD = """
import sys, torch
sys.path[:0] = {paths!r}
import bv_blend_ext
ops = torch.ops.bv_blend
results = []
for (r, g, k, hm, hv, s) in torch.load({inputs!r}):
    out = list(ops.group_advantages(r, None, k, hm, hv, 1e-4, s))
    results.append(out + [ops.group_advantages_backward(g, r, r, None, k, hm, hv, 1e-4, s)])
torch.save(results, {outputs!r})
"""


def forward_backward_here_and_without_avx2(cases, tmp_path):
    """The four forward outputs and the backward of each case (rewards, grad, group_size,
    hist_mean, hist_var, scale) from this process and from a child process started with
    BV_BLEND_CPU_AVX2=0, whose CPU kernels take the 16-byte path instead. (The backward's
    advantages argument only matters for scale="batch"; the rewards stand in for it.)"""
    inputs, outputs = str(tmp_path / "in.pt"), str(tmp_path / "out.pt")
    torch.save(cases, inputs)
    ops = torch.ops.bv_blend
    here = [[*ops.group_advantages(r, None, k, hm, hv, 1e-4, s),
             ops.group_advantages_backward(g, r, r, None, k, hm, hv, 1e-4, s)]
            for (r, g, k, hm, hv, s) in cases]
    paths = [os.path.dirname(os.path.dirname(bv_blend_ext.__file__))] + sys.path
    child = _FORWARD_BACKWARD_CHILD.format(paths=paths, inputs=inputs, outputs=outputs)
    subprocess.run([sys.executable, "-c", child], env=dict(os.environ, BV_BLEND_CPU_AVX2="0"),
                   check=True)
    return here, torch.load(outputs)


@contextlib.contextmanager
def torch_threads(count):
    """torch's CPU thread count set to `count` inside the block, the caller's restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def per_thread_count(compute, counts=(1, 2)):
    """compute() once with each CPU thread count: the list of its results."""
    results = []
    for count in counts:
        with torch_threads(count):
            results.append(compute())
    return results


def differing_bits(one, two):
    """The names whose tensors differ in any bit between two dicts of tensors of the same names."""
    assert one.keys() == two.keys()
    return [name for name in one if not torch.equal(bits(one[name]), bits(two[name]))]


def state_of(estimator):
    """A copy of an estimator's history buffers, to compare with after a call."""
    return {name: value.clone() for name, value in estimator.state_dict().items()}


def assert_same_state(before, estimator):
    """The estimator's history is `before` (a state_of), in values and in device."""
    after = estimator.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]) and value.device == after[name].device, name


def raises_naming(argument, error=(ValueError, TypeError)):
    """pytest.raises for an error whose message names `argument` (a regex alternative)."""
    return pytest.raises(error, match=rf"\b({argument})\b")


class HostReads(TorchFunctionMode):
    """Counts the tensor methods that copy values to the host (each a sync on a GPU)."""

    READS = {"tolist", "item", "__int__", "__bool__", "__float__", "__index__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
