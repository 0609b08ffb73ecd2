"""The CPU kernels' fixed-size path (several groups at once, one per SIMD lane) against their
per-group path: for float32/float64 rewards and a group size that is a multiple of the lane count,
the op runs whole blocks of groups in lanes and hands blocks holding a non-finite reward (or an
overflowing sum) back to the per-group path. Offsets describing the same groups always take the
per-group path, so the two must agree bit for bit: advantages, statistics and gradients."""

import pytest
import torch

from helpers import bits, forward_backward_here_and_without_avx2, torch_threads

ops = torch.ops.bv_blend
SCALES = ("group", "blend", "batch", "none")


def make_rewards(kind, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "binary":
        r = torch.randint(0, 2, (n,), generator=gen).double()
    elif kind == "continuous":
        r = torch.randn(n, generator=gen, dtype=torch.float64) * 3 + 0.5
    elif kind == "signed_zero":  # -0.0 rewards and flat groups: the signs of zeros must match too
        r = -torch.zeros(n, dtype=torch.float64)
        r[::5] = 1.0
    else:  # non-finite rewards in some blocks, so blocks fall back to the per-group path
        r = torch.randn(n, generator=gen, dtype=torch.float64)
        u = torch.rand(n, generator=gen)
        r[u < 0.01] = float("nan")
        r[(u > 0.01) & (u < 0.015)] = float("inf")
        r[(u > 0.015) & (u < 0.02)] = -float("inf")
    return r.to(dtype)


def run(rewards, group_size, offsets, grad, hist_mean, hist_var, eps, scale):
    hm = torch.tensor(hist_mean, dtype=torch.float64)
    hv = torch.tensor(hist_var, dtype=torch.float64)
    out = ops.group_advantages(rewards, offsets, group_size, hm, hv, eps, scale)
    grad_rewards = ops.group_advantages_backward(grad, out[0], rewards, offsets, group_size, hm,
                                                 hv, eps, scale)
    return [bits(t) for t in (*out, grad_rewards)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("group_size", (2, 4, 8, 16, 32, 64))
@pytest.mark.parametrize("kind", ("binary", "continuous", "signed_zero", "non_finite"))
@pytest.mark.parametrize("scale", SCALES)
def test_lanes_match_per_group_path(dtype, group_size, kind, scale):
    num_groups = 67  # not a multiple of any lane count: blocks plus a per-group tail
    n = num_groups * group_size
    rewards = make_rewards(kind, n, dtype, seed=group_size)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    offsets = torch.arange(0, n + 1, group_size, dtype=torch.int64)
    for num_threads in (1, 2):
        with torch_threads(num_threads):
            for hist_mean, hist_var, eps in ((0.3, 0.05, 1e-4), (0.0, 0.0, 0.0), (-1.0, 2.0, 0.5)):
                fixed = run(rewards, group_size, None, grad, hist_mean, hist_var, eps, scale)
                ragged = run(rewards, 0, offsets, grad, hist_mean, hist_var, eps, scale)
                names = ("advantages", "group_mean", "group_std", "beta", "grad")
                differing = [name for name, a, b in zip(names, fixed, ragged)
                             if not torch.equal(a, b)]
                assert not differing, (f"{num_threads} threads, history ({hist_mean}, "
                                       f"{hist_var}), eps {eps}: {differing}")


def test_avx2_and_16_byte_paths_agree(tmp_path):
    """BV_BLEND_CPU_AVX2=0 turns the AVX2 path off (it is used only where the CPU has AVX2): a
    child process without it must give the same bits as this one."""
    cases = []
    for k in (4, 8, 16, 32, 64):
        for kind in ("continuous", "non_finite", "signed_zero"):
            r = make_rewards(kind, 37 * k, torch.float32, seed=k)
            g = torch.randn(r.shape, generator=torch.Generator().manual_seed(k))
            for scale in SCALES:
                cases.append((r, g, k, torch.tensor(0.3, dtype=torch.float64),
                              torch.tensor(0.05, dtype=torch.float64), scale))
    here, there = forward_backward_here_and_without_avx2(cases, tmp_path)
    for case, a, b in zip(cases, here, there):
        for x, y in zip(a, b):
            assert torch.equal(bits(x), bits(y)), f"group size {case[2]}, scale {case[5]}"
