"""The CUDA kernels: parity with the CPU op, bitwise determinism, CUDA-graph capture of the
stateful step, the current (non-default) stream, device guards on cuda:1, and device-mismatch
errors. Every test needs a GPU and is skipped without one."""

import pytest
import torch

import bv_blend_ext
from bv_blend_ext import reference

from helpers import (assert_blend_close, assert_history, assert_same_state, bits,
                     determinism_outputs, ragged_rewards, state_of)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NAN, INF = float("nan"), float("inf")
SCALES = ("group", "blend", "batch", "none")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OPS = torch.ops.bv_blend


def special_groups(dtype, device="cpu"):
    """Ragged groups with every corner of the contract: NaNs, n = 1, empty, all-NaN, all-equal,
    and groups larger than a warp and a block."""
    gen = torch.Generator().manual_seed(11)
    groups = [
        torch.tensor([1.0, NAN, 3.0]), torch.tensor([2.5]), torch.tensor([]),
        torch.tensor([NAN, NAN]), torch.full((7,), 0.75), torch.randn(33, generator=gen),
        torch.randn(1500, generator=gen), torch.randn(64, generator=gen),
    ]
    rewards = torch.cat(groups).to(torch.float64)
    offsets = torch.tensor([0] + [len(g) for g in groups]).cumsum(0)
    return rewards.to(device=device, dtype=dtype), offsets.to(device)


def on(device, rewards, offsets):
    return rewards.to(device), None if offsets is None else offsets.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ("ragged", "special", 1, 2, 7, 16, 64, 100))
def test_parity_with_cpu(layout, scale, dtype):
    if layout == "ragged":
        rewards, offsets = ragged_rewards(2000, 40, dtype, seed=12)
    elif layout == "special":
        rewards, offsets = special_groups(dtype)
    else:  # fixed group size: many groups of 1..100
        gen = torch.Generator().manual_seed(13)
        rewards, offsets = (torch.rand(layout * 1000, generator=gen) * 3).to(dtype), None
        rewards[::17] = NAN
    group_size = None if offsets is not None else layout
    kwargs = dict(offsets=offsets, hist_mean=0.4, hist_var=0.7, scale=scale)
    want = bv_blend_ext.blend_advantages(rewards, group_size, **kwargs)
    cuda_rewards, cuda_offsets = on("cuda", rewards, offsets)
    got = bv_blend_ext.blend_advantages(cuda_rewards, group_size,
                                        **{**kwargs, "offsets": cuda_offsets})
    assert all(t.device.type == "cuda" for t in got)
    assert_blend_close(got, want, dtype,
                       advantage_atol=1e-4 if dtype == torch.float32 else None)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_backward_parity_with_cpu(scale, dtype):
    rewards, offsets = ragged_rewards(500, 20, dtype, seed=14)
    grad_out = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(15), dtype=dtype)
    grads = []
    for device in ("cpu", "cuda"):
        r, o = on(device, rewards, offsets)
        r.requires_grad_()
        out = bv_blend_ext.blend_advantages(r, offsets=o, hist_mean=0.4, hist_var=0.7, scale=scale)
        (grad,) = torch.autograd.grad(out.advantages, r, grad_out.to(device))
        grads.append(grad.cpu())
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[1], grads[0], **tol)


@pytest.mark.parametrize("scale", SCALES)
def test_gradcheck_cuda(scale):
    rewards, offsets = special_groups(torch.float64, "cuda")
    rewards, offsets = rewards[:50].clone().requires_grad_(), offsets[:6].clone()
    offsets[-1] = 50  # cut the large groups so that gradcheck stays quick

    def advantages(r):
        return bv_blend_ext.blend_advantages(r, offsets=offsets, hist_mean=0.8, hist_var=0.6,
                                             scale=scale).advantages

    assert torch.autograd.gradcheck(advantages, (rewards,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ("fixed", "ragged"))
def test_opcheck_cuda(layout):
    rewards = torch.tensor([0.3, NAN, -0.4, 2.2, 0.9, 1.1, -1.5, 0.2], device="cuda",
                           dtype=torch.float64, requires_grad=True)
    # No empty group: opcheck compares outputs without equal_nan.
    offsets, group_size = ((None, 4) if layout == "fixed"
                           else (torch.tensor([0, 3, 4, 8], device="cuda"), 0))
    h = torch.tensor(0.4, dtype=torch.float64, device="cuda")
    u = torch.tensor(0.9, dtype=torch.float64, device="cuda")
    for scale in SCALES:
        torch.library.opcheck(OPS.group_advantages.default,
                              (rewards, offsets, group_size, h, u, 1e-4, scale))
        r = rewards.detach()
        advantages = OPS.group_advantages(r, offsets, group_size, h, u, 1e-4, scale)[0]
        torch.library.opcheck(OPS.group_advantages_backward.default,
                              (torch.ones_like(r), advantages, r, offsets, group_size, h, u, 1e-4,
                               scale))
    state = (torch.zeros(4, dtype=torch.float64, device="cuda"),
             torch.tensor(2, device="cuda"), torch.tensor(0.7, dtype=torch.float64, device="cuda"),
             torch.tensor(0.0, dtype=torch.float64, device="cuda"))
    group_mean = torch.tensor([1.0, NAN, 3.0, 5.0, -2.0], device="cuda")
    torch.library.opcheck(OPS.update_history.default, (group_mean, *state, 0.25, 2))


@pytest.mark.parametrize("scale", SCALES)
def test_bitwise_deterministic_across_runs(scale):
    rewards, offsets = ragged_rewards(50000, 40, torch.float32, seed=16, device="cuda")
    fixed = torch.randn(65536 * 16, device="cuda")
    grad_out = torch.randn(rewards.shape, device="cuda")
    first = determinism_outputs(rewards, offsets, fixed, grad_out, scale)
    for _ in range(2):
        again = determinism_outputs(rewards, offsets, fixed, grad_out, scale)
        differing = [name for name in first if not torch.equal(first[name], again[name])]
        assert not differing, f"differ between runs: {differing}"



def test_stateful_step_matches_reference():
    settings = dict(window=6, ema_decay=0.3, initial_baseline=0.5, min_history=3)
    est = bv_blend_ext.BVBlend(**settings, scale="blend")
    ref = reference.HistoryReference(**settings)
    mirror = reference.HistoryReference(**settings)  # fed the estimator's own group means
    for seed in range(5):
        rewards, offsets = ragged_rewards(4, 6, torch.float32, seed=20 + seed)
        got = est.step(rewards.cuda(), offsets=offsets.cuda())
        want = ref.step(rewards, offsets=offsets, scale="blend")
        assert got.advantages.device.type == "cuda" and est.ring.device.type == "cuda"
        torch.testing.assert_close(got.advantages.cpu(), want.advantages, rtol=1e-5, atol=1e-4)
        mirror.push(got.group_mean.cpu())
        assert_history(est, mirror, 1e-12)
        assert_history(est, ref, 1e-5)


@pytest.mark.parametrize("num_groups", (3, 1024, 1025, 5000, 70_000))
def test_history_update_of_many_groups_matches_the_sequential_push(num_groups):
    # The update kernel gives each thread a contiguous run of groups: runs of 0, 1 and many
    # groups, with unscorable groups between them, must push in group order.
    group_mean = torch.rand(num_groups, generator=torch.Generator().manual_seed(num_groups))
    group_mean[torch.rand(num_groups, generator=torch.Generator().manual_seed(1)) < 0.2] = NAN
    settings = dict(window=64, ema_decay=0.01, initial_baseline=0.5, min_history=2)
    est, hist = bv_blend_ext.BVBlend(**settings).cuda(), reference.HistoryReference(**settings)
    for _ in range(2):
        OPS.update_history(group_mean.cuda(), est.ring, est.count, est.ema, est.var, est.alpha,
                           est.min_history)
        hist.push(group_mean)
    assert_history(est, hist, 1e-10)


@pytest.mark.parametrize("layout", ("fixed", "ragged"))
def test_cuda_graph_capture_and_replay_of_the_stateful_step(layout):
    settings = dict(window=5, ema_decay=0.3, initial_baseline=0.1, min_history=2)
    est = bv_blend_ext.BVBlend(**settings, scale="blend").cuda()
    ref = reference.HistoryReference(**settings)
    if layout == "fixed":
        batches = [torch.randn(24, generator=torch.Generator().manual_seed(s)) for s in range(7)]
        groups, cpu_groups = dict(group_size=8), dict(group_size=8)
    else:
        first, offsets = ragged_rewards(5, 6, torch.float32, seed=30)
        gen = torch.Generator().manual_seed(31)
        batches = [first + i + torch.randn(first.shape, generator=gen) for i in range(7)]
        # validate=False: checking offsets' values would read them on the host, which a capture
        # forbids.
        groups = dict(offsets=offsets.cuda(), validate=False)
        cpu_groups = dict(offsets=offsets)
    static_rewards = torch.zeros(batches[0].shape, device="cuda")

    # Warm-up steps on a side stream, as torch.cuda.graphs requires; they are real steps.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for rewards in batches[:2]:
            static_rewards.copy_(rewards)
            est(static_rewards, **groups)
            ref.step(rewards, **cpu_groups, scale="blend")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    before = state_of(est)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_advantages = est(static_rewards, **groups)
    torch.cuda.synchronize()
    # Capturing records the step without running it.
    assert_same_state(before, est)

    for rewards in batches[2:]:
        static_rewards.copy_(rewards)
        graph.replay()
        torch.cuda.synchronize()
        want = ref.step(rewards, **cpu_groups, scale="blend")
        torch.testing.assert_close(static_advantages.cpu(), want.advantages, rtol=1e-5, atol=1e-4)
        assert_history(est, ref, 1e-5)


def test_respects_the_current_stream():
    rewards, offsets = ragged_rewards(3000, 20, torch.float32, seed=40, device="cuda")
    settings = dict(window=8, ema_decay=0.2, min_history=2)
    want = bv_blend_ext.blend_advantages(rewards, offsets=offsets, hist_mean=0.3, hist_var=0.5)
    want_step = bv_blend_ext.BVBlend(**settings).cuda()(rewards, offsets=offsets)
    est = bv_blend_ext.BVBlend(**settings).cuda()
    target = torch.zeros_like(rewards)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        # The sleep holds `stream` back; a kernel launched on any other stream would run before
        # the copy and read zeros. validate=False avoids a host sync that could hide that.
        torch.cuda._sleep(100_000_000)
        target.copy_(rewards)
        got = bv_blend_ext.blend_advantages(target, offsets=offsets, hist_mean=0.3, hist_var=0.5,
                                            validate=False)
        got_step = est(target, offsets=offsets, validate=False)
    stream.synchronize()
    assert torch.equal(got.advantages, want.advantages)
    assert torch.equal(got_step, want_step)


def test_device_mismatch_errors():
    rewards = torch.tensor([1.0, 2.0, 4.0, 0.5], device="cuda")
    cpu_offsets = torch.tensor([0, 2, 4])
    with pytest.raises((ValueError, TypeError), match=r"\boffsets\b"):
        bv_blend_ext.blend_advantages(rewards, offsets=cpu_offsets)
    with pytest.raises((ValueError, TypeError), match=r"\bhist_mean\b"):
        bv_blend_ext.blend_advantages(rewards, 2, hist_mean=torch.tensor(0.0))
    h = torch.tensor(0.0, dtype=torch.float64, device="cuda")
    with pytest.raises((ValueError, TypeError, RuntimeError), match=r"\boffsets\b"):
        OPS.group_advantages(rewards, cpu_offsets, 0, h, h, 1e-4, "blend")

    est = bv_blend_ext.BVBlend(window=4)
    est(rewards, 2)
    before = state_of(est)
    assert est.ring.device.type == "cuda"
    with pytest.raises((ValueError, TypeError), match=r"\boffsets\b"):
        est(rewards, offsets=cpu_offsets)
    assert_same_state(before, est)


def test_cpu_rewards_with_cuda_tensors_get_value_errors():
    # The dispatcher sends these calls to the CUDA kernels, which must check before their device
    # guard (a CPU device there is an internal error) and name the argument.
    rewards = torch.tensor([1.0, 2.0, 4.0, 0.5])
    h = torch.tensor(0.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\boffsets\b"):
        OPS.group_advantages(rewards, torch.tensor([0, 2, 4], device="cuda"), 0, h, h, 1e-4,
                             "blend")
    with pytest.raises(ValueError, match=r"\bhist_var\b"):
        OPS.group_advantages(rewards, None, 2, h, h.cuda(), 1e-4, "blend")
    advantages = OPS.group_advantages(rewards, None, 2, h, h, 1e-4, "blend")[0]
    with pytest.raises(ValueError, match=r"\bgrad_advantages\b"):
        OPS.group_advantages_backward(torch.ones(4, device="cuda"), advantages, rewards, None, 2,
                                      h, h, 1e-4, "blend")
    cuda_rewards = rewards.cuda()
    with pytest.raises(ValueError, match=r"\bgrad_advantages\b"):
        OPS.group_advantages_backward(torch.ones(4), advantages.cuda(), cuda_rewards, None, 2,
                                      h.cuda(), h.cuda(), 1e-4, "blend")
    with pytest.raises(ValueError, match=r"\badvantages\b"):
        OPS.group_advantages_backward(torch.ones(4, device="cuda"), advantages, cuda_rewards,
                                      None, 2, h.cuda(), h.cuda(), 1e-4, "blend")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinite_rewards_match_cpu(scale, dtype):
    rewards = torch.tensor([INF, 1.0, 0.0, 1.0, -INF, -INF, INF, INF, 0.5, NAN, 0.25, 1.0,
                            INF, 2.0, 3.0, -INF, INF, INF, 0.5, 0.5], dtype=dtype)
    kwargs = dict(hist_mean=0.3, hist_var=0.1, scale=scale)
    want = bv_blend_ext.blend_advantages(rewards, 4, **kwargs)
    got = bv_blend_ext.blend_advantages(rewards.cuda(), 4, **kwargs)
    assert_blend_close(got, want, dtype)
    est, on_cpu = bv_blend_ext.BVBlend(window=4).cuda(), bv_blend_ext.BVBlend(window=4)
    est(rewards.cuda(), group_size=4)
    on_cpu(rewards, group_size=4)
    assert int(est.count) == int(on_cpu.count) == 4  # every group but the one with no finite reward
    assert torch.isfinite(est.ema) and torch.isfinite(est.var)
    torch.testing.assert_close(est.ring.cpu(), on_cpu.ring)


@pytest.mark.parametrize("offsets", ([0, 4], [0], [0, 6, 4, 8], [3, 5, 8], [-4, 2, 12]),
                         ids=str)
def test_unvalidated_offsets_match_cpu(offsets):
    rewards = torch.tensor([0.3, 1.0, 0.0, 0.7, 0.9, 0.1, 0.5, 0.6], dtype=torch.float64)
    offsets = torch.tensor(offsets)
    results = []
    for device in ("cpu", "cuda", "cuda"):
        r = rewards.to(device).requires_grad_()
        out = bv_blend_ext.blend_advantages(r, offsets=offsets.to(device), hist_mean=0.4,
                                            hist_var=0.05, validate=False)
        (grad,) = torch.autograd.grad((out.advantages * torch.arange(8.0, device=device)).sum(), r)
        results.append((out.advantages.detach().cpu(), grad.cpu()))
    assert torch.equal(bits(results[1][0]), bits(results[2][0]))  # no leftover memory
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", ("group", "blend", "batch"))
def test_zero_scale_gives_zero_advantages(scale):
    rewards = torch.ones(6, dtype=torch.float64, device="cuda", requires_grad=True)
    out = bv_blend_ext.blend_advantages(rewards, 3, eps=0.0, scale=scale)
    (grad,) = torch.autograd.grad(out.advantages.sum(), rewards)
    assert int((out.advantages != 0).sum()) == 0 and int((grad != 0).sum()) == 0


def test_unusable_history_is_ignored_on_cuda():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 1.0], device="cuda")
    bad = torch.tensor(NAN, dtype=torch.float64, device="cuda")
    got = bv_blend_ext.blend_advantages(rewards, 2, hist_mean=bad, hist_var=0.2, validate=False)
    want = bv_blend_ext.blend_advantages(rewards, 2)
    for a, b in zip(got, want):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("count", (-1, -7, -(2**62), 2**63 - 2))
def test_history_update_stays_inside_the_ring(count):
    ring = torch.full((4,), 9.0, dtype=torch.float64, device="cuda")
    state = dict(count=torch.tensor(count, device="cuda"),
                 ema=torch.tensor(0.0, dtype=torch.float64, device="cuda"),
                 var=torch.tensor(0.0, dtype=torch.float64, device="cuda"))
    OPS.update_history(torch.tensor([1.0, 2.0, 3.0, INF], device="cuda"), ring, state["count"],
                       state["ema"], state["var"], 0.5, 2)
    torch.cuda.synchronize()
    assert sorted(ring.tolist())[:3] == [1.0, 2.0, 3.0]
    assert int(state["count"]) == (3 if count < 0 else 2**63 - 1)
    assert torch.isfinite(state["ema"]) and torch.isfinite(state["var"])


def test_validation_synchronises_once():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.25, 1.0], device="cuda")
    offsets = torch.tensor([0, 2, 6], device="cuda")
    hist = dict(hist_mean=torch.tensor(0.3, device="cuda"),
                hist_var=torch.tensor(0.1, device="cuda"))
    bv_blend_ext.blend_advantages(rewards, offsets=offsets, **hist)  # warm-up (allocations)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            bv_blend_ext.blend_advantages(rewards, offsets=offsets, **hist)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in record if "synchroniz" in str(w.message)]) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    # The current device stays cuda:0 while everything lives on cuda:1: the kernels must set a
    # device guard from their inputs.
    rewards, offsets = ragged_rewards(200, 12, torch.float32, seed=50)
    want = bv_blend_ext.blend_advantages(rewards, offsets=offsets, hist_mean=0.2, hist_var=0.6)
    weights = torch.linspace(-1, 1, rewards.numel())
    cpu_rewards = rewards.clone().requires_grad_()
    (bv_blend_ext.blend_advantages(cpu_rewards, offsets=offsets, hist_mean=0.2,
                                   hist_var=0.6).advantages * weights).sum().backward()
    with torch.cuda.device(0):
        r = rewards.to("cuda:1").requires_grad_()
        got = bv_blend_ext.blend_advantages(r, offsets=offsets.to("cuda:1"), hist_mean=0.2,
                                            hist_var=0.6)
        (got.advantages * weights.to("cuda:1")).sum().backward()
        est = bv_blend_ext.BVBlend(window=4)
        step = est(rewards.to("cuda:1"), offsets=offsets.to("cuda:1"))
        torch.cuda.synchronize(1)
    assert all(t.device == torch.device("cuda:1") for t in (*got, r.grad, step, est.ring))
    torch.testing.assert_close(got.advantages.cpu(), want.advantages, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r.grad.cpu(), cpu_rewards.grad, rtol=1e-4, atol=1e-3)
    hist = reference.HistoryReference(window=4)
    hist.step(rewards, offsets=offsets)
    assert_history(est, hist, 1e-5)
