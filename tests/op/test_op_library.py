"""The ops as torch library citizens: torch.library.opcheck of every op (schema, fake kernel,
autograd registration, AOT dispatch), torch.compile(fullgraph=True) of code calling them, and a
bare `import bv_blend_ext`."""

import subprocess
import sys

import pytest
import torch

import bv_blend_ext

from helpers import ragged_rewards

NAN = float("nan")
SCALES = ("group", "blend", "batch", "none")
OPS = torch.ops.bv_blend


def history(dtype=torch.float64):
    return torch.tensor(0.4, dtype=dtype), torch.tensor(0.9, dtype=dtype)


def op_inputs(layout, dtype, requires_grad=False):
    rewards = torch.tensor([0.3, NAN, -0.4, 2.2, 0.9, 1.1, -1.5, 0.2], dtype=dtype)
    rewards.requires_grad_(requires_grad)
    if layout == "fixed":
        return rewards, None, 4
    # [3 with a NaN], [1], [4]. No empty group: its NaN statistics would fail opcheck's output
    # comparisons, which treat NaN as unequal to itself (the contract's NaN is tested elsewhere).
    return rewards, torch.tensor([0, 3, 4, 8]), 0


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ("fixed", "ragged"))
def test_opcheck_group_advantages(layout, scale):
    rewards, offsets, group_size = op_inputs(layout, torch.float32, requires_grad=True)
    torch.library.opcheck(OPS.group_advantages.default,
                          (rewards, offsets, group_size, *history(), 1e-4, scale))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float64), ids=str)
def test_opcheck_group_advantages_dtypes(dtype):
    rewards, offsets, group_size = op_inputs("ragged", dtype, requires_grad=dtype == torch.float64)
    torch.library.opcheck(OPS.group_advantages.default,
                          (rewards, offsets, group_size, *history(), 1e-4, "blend"))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ("fixed", "ragged"))
def test_opcheck_group_advantages_backward(layout, scale):
    rewards, offsets, group_size = op_inputs(layout, torch.float64)
    h, u = history()
    advantages = OPS.group_advantages(rewards, offsets, group_size, h, u, 1e-4, scale)[0]
    grad = torch.linspace(-1, 1, rewards.numel(), dtype=torch.float64)
    torch.library.opcheck(OPS.group_advantages_backward.default,
                          (grad, advantages, rewards, offsets, group_size, h, u, 1e-4, scale))


@pytest.mark.parametrize("mean_dtype", (torch.float32, torch.float64), ids=str)
def test_opcheck_update_history(mean_dtype):
    group_mean = torch.tensor([1.0, NAN, 3.0, 5.0, -2.0], dtype=mean_dtype)
    ring = torch.tensor([0.5, 1.5, 0.0, 0.0], dtype=torch.float64)
    state = (ring, torch.tensor(2), torch.tensor(0.7, dtype=torch.float64),
             torch.tensor(0.5, dtype=torch.float64))
    torch.library.opcheck(OPS.update_history.default, (group_mean, *state, 0.25, 2))


def test_compile_functional_fullgraph():
    # One compiled function covering both group layouts and the backward, so that the (slow)
    # compilation happens once.
    def loss_and_stats(fixed, ragged, offsets, weights):
        a = bv_blend_ext.blend_advantages(fixed, 8, hist_mean=0.3, hist_var=0.7, scale="blend")
        b = bv_blend_ext.blend_advantages(ragged, offsets=offsets, hist_mean=0.3, hist_var=0.7,
                                          scale="group")
        loss = (a.advantages * weights).sum() + (b.advantages ** 2).sum()
        return loss, a.group_mean, b.beta

    fixed = torch.randn(64, generator=torch.Generator().manual_seed(0))
    ragged, offsets = ragged_rewards(12, 7, torch.float32, seed=1)
    weights = torch.linspace(-1, 1, 64)
    compiled = torch.compile(loss_and_stats, fullgraph=True)
    results = []
    for fn in (loss_and_stats, compiled):
        x, y = fixed.clone().requires_grad_(), ragged.clone().requires_grad_()
        loss, mean, beta = fn(x, y, offsets, weights)
        loss.backward()
        results.append((loss, mean, beta, x.grad, y.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_compile_module_step_fullgraph():
    settings = dict(window=4, ema_decay=0.5, initial_baseline=0.2, min_history=2, scale="blend")
    eager, compiled_est = bv_blend_ext.BVBlend(**settings), bv_blend_ext.BVBlend(**settings)

    def step(est, rewards, offsets):
        return est(rewards, offsets=offsets) * 2

    compiled = torch.compile(step, fullgraph=True)
    # Same shapes every step, so that one graph serves them all and the history has to advance
    # inside it; 6 groups a step wrap the window of 4 on the first.
    first, offsets = ragged_rewards(6, 4, torch.float32, seed=2, nan_fraction=0.0)
    gen = torch.Generator().manual_seed(3)
    for rewards in [first] + [first + torch.randn(first.shape, generator=gen) for _ in range(3)]:
        want = step(eager, rewards, offsets)
        got = compiled(compiled_est, rewards, offsets)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for name, value in eager.state_dict().items():
            torch.testing.assert_close(compiled_est.state_dict()[name], value, msg=name)
    assert int(compiled_est.count) > settings["window"]


def test_import_without_torch_first():
    # `import bv_blend_ext` must work on its own: the compiled module links against libc10 and
    # friends, which only resolve once torch itself is loaded.
    result = subprocess.run([sys.executable, "-c", "import bv_blend_ext"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
