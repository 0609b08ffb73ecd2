"""Hostile and corrupted input to the op and the estimator: no crash, no uninitialised memory, no
silent NaN, errors of the documented type, and no more than one device-to-host read per call.
Each test here failed on the op as it was before the hardening; the CUDA side is in
test_op_cuda.py."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import bv_blend_ext
from bv_blend_ext import reference

from helpers import HostReads, assert_same_state, bits, raises_naming, state_of

NAN, INF = float("nan"), float("inf")
OPS = torch.ops.bv_blend
SCALES = ("group", "blend", "batch", "none")



# 1. The history state ----------------------------------------------------------------------

def test_negative_count_never_writes_outside_the_ring():
    # Runs in a child process: on the unhardened op this corrupted the heap and aborted.
    script = textwrap.dedent("""
        import torch, bv_blend_ext
        ring = torch.full((4,), 9.0, dtype=torch.float64)
        guard_before = torch.zeros(64, dtype=torch.float64)
        for count in (-1, -5, -(2**62)):
            ring.fill_(9.0)
            c = torch.tensor(count)
            ema = torch.tensor(0.0, dtype=torch.float64)
            var = torch.tensor(0.0, dtype=torch.float64)
            torch.ops.bv_blend.update_history(torch.tensor([1.0, 2.0, 3.0]), ring, c, ema, var,
                                              0.5, 2)
            assert ring.tolist() == [1.0, 2.0, 3.0, 9.0], ring
            assert int(c) == 3, c
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_count_saturates_instead_of_overflowing():
    ring = torch.zeros(4, dtype=torch.float64)
    count = torch.tensor(2**63 - 2)
    ema, var = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    OPS.update_history(torch.tensor([1.0, 2.0, 3.0, 4.0]), ring, count, ema, var, 0.5, 2)
    assert int(count) == 2**63 - 1
    assert sorted(ring.tolist()) == [1.0, 2.0, 3.0, 4.0]
    assert math.isfinite(float(var)) and float(var) > 0


BAD_STATES = {
    "count negative": ("count", torch.tensor(-3)),
    "count a float": ("count", torch.tensor(2.0, dtype=torch.float64)),
    "ring of another window": ("ring", torch.zeros(7, dtype=torch.float64)),
    "ring with inf": ("ring", torch.tensor([0.0, INF, 0.0, 0.0], dtype=torch.float64)),
    "ring with nan": ("ring", torch.tensor([0.0, NAN, 0.0, 0.0], dtype=torch.float64)),
    "ema nan": ("ema", torch.tensor(NAN, dtype=torch.float64)),
    "ema inf": ("ema", torch.tensor(-INF, dtype=torch.float64)),
    "var negative": ("var", torch.tensor(-0.5, dtype=torch.float64)),
    "var inf": ("var", torch.tensor(INF, dtype=torch.float64)),
    "var not a tensor": ("var", 0.5),
}


@pytest.mark.parametrize("case", BAD_STATES)
def test_load_state_dict_rejects_a_corrupted_history(case):
    field, value = BAD_STATES[case]
    estimator = bv_blend_ext.BVBlend(window=4)
    estimator(torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]), group_size=2)
    before = state_of(estimator)
    corrupted = {**before, field: value}
    with raises_naming(field, ValueError):
        estimator.load_state_dict(corrupted)
    assert_same_state(before, estimator)


def test_load_state_dict_checks_a_nested_estimator():
    holder = torch.nn.ModuleDict({"estimator": bv_blend_ext.BVBlend(window=4)})
    state = holder.state_dict()
    state["estimator.count"] = torch.tensor(-1)
    with raises_naming("count", ValueError):
        holder.load_state_dict(state)
    assert int(holder["estimator"].count) == 0


def test_load_state_dict_accepts_a_valid_history():
    source = bv_blend_ext.BVBlend(window=4)
    source(torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.25, 1.0]), group_size=2)
    target = bv_blend_ext.BVBlend(window=4)
    target.load_state_dict(source.state_dict())
    assert_same_state(state_of(source), target)


# 2. Rewards outside every group --------------------------------------------------------------

UNCHECKED_OFFSETS = {
    "short of N": [0, 4],
    "no group": [0],
    "decreasing": [0, 6, 4, 8],
    "starting late": [3, 5, 8],
    "negative and past N": [-4, 2, 12],
    "down to 0 and up again": [0, 5, 0, 3, 8],
}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", UNCHECKED_OFFSETS)
def test_unvalidated_offsets_give_defined_results(case, scale):
    rewards = torch.tensor([0.3, 1.0, 0.0, 0.7, 0.9, 0.1, 0.5, 0.6], requires_grad=True)
    offsets = torch.tensor(UNCHECKED_OFFSETS[case])
    outputs = []
    for _ in range(3):  # uninitialised memory would differ from call to call
        out = bv_blend_ext.blend_advantages(rewards, offsets=offsets, hist_mean=0.4,
                                            hist_var=0.05, scale=scale, validate=False)
        (grad,) = torch.autograd.grad((out.advantages * torch.arange(8.0)).sum(), rewards)
        outputs.append((out.advantages.detach(), grad))
    for advantages, grad in outputs[1:]:
        assert torch.equal(bits(advantages), bits(outputs[0][0]))
        assert torch.equal(bits(grad), bits(outputs[0][1]))

    bounds = reference.group_offsets(8, None, offsets, torch.device("cpu"))
    assert bool((bounds[1:] >= bounds[:-1]).all()), "groups must not overlap"
    covered = torch.zeros(8, dtype=torch.bool)
    covered[int(bounds[0]):int(bounds[-1])] = True
    advantages, grad = outputs[0]
    assert bool((advantages[~covered] == 0).all()) and bool((grad[~covered] == 0).all())
    want = reference.blend_advantages(rewards.detach(), offsets=offsets, hist_mean=0.4,
                                      hist_var=0.05, scale=scale)
    torch.testing.assert_close(advantages, want.advantages, rtol=1e-5, atol=1e-5)


def test_normalised_offsets_are_the_valid_ones_unchanged():
    offsets = torch.tensor([0, 0, 3, 3, 8])
    assert torch.equal(reference.group_offsets(8, None, offsets, torch.device("cpu")), offsets)


def test_estimator_with_unvalidated_offsets_pushes_only_real_groups():
    estimator = bv_blend_ext.BVBlend(window=8)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5])
    advantages = estimator(rewards, offsets=torch.tensor([0, 2, 1]), validate=False)
    assert int(estimator.count) == 1  # [0, 2) and the empty [2, 2)
    assert torch.equal(advantages[2:], torch.zeros(4))


# 3. Non-finite rewards are unscorable ----------------------------------------------------------

def with_inf_as_nan(rewards):
    return torch.where(rewards.isinf(), torch.full_like(rewards, NAN), rewards)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                         ids=str)
def test_infinite_rewards_are_unscorable(scale, dtype):
    rewards = torch.tensor([INF, 1.0, 0.0, 1.0, -INF, -INF, INF, INF, 0.5, NAN, 0.25, 1.0,
                            INF, 2.0, 3.0, -INF], dtype=dtype)
    got = bv_blend_ext.blend_advantages(rewards, 4, hist_mean=0.3, hist_var=0.1, scale=scale)
    same = bv_blend_ext.blend_advantages(with_inf_as_nan(rewards), 4, hist_mean=0.3,
                                         hist_var=0.1, scale=scale)
    for name, a, b in zip(got._fields, got, same):
        assert torch.equal(bits(a), bits(b)), name
    assert bool(got.advantages.isfinite().all())
    assert bool((got.advantages[rewards.isinf()] == 0).all())
    assert math.isnan(float(got.group_mean[1]))  # [-inf, -inf, inf, inf]: nothing valid
    want = reference.blend_advantages(rewards, 4, hist_mean=0.3, hist_var=0.1, scale=scale)
    torch.testing.assert_close(got.advantages, want.advantages, equal_nan=True,
                               rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("scale", SCALES)
def test_gradient_of_infinite_rewards_is_zero(scale):
    base = torch.tensor([INF, 1.0, 0.0, 1.0, 0.5, -INF, 0.25, 1.0], dtype=torch.float64)
    weights = torch.arange(1.0, 9.0, dtype=torch.float64)
    grads = []
    for rewards in (base, with_inf_as_nan(base)):
        rewards = rewards.clone().requires_grad_()
        out = bv_blend_ext.blend_advantages(rewards, 4, hist_mean=0.3, hist_var=0.1, scale=scale)
        grads.append(torch.autograd.grad((out.advantages * weights).sum(), rewards)[0])
    assert torch.equal(bits(grads[0]), bits(grads[1]))
    assert bool((grads[0][base.isinf()] == 0).all())


def test_infinite_rewards_never_reach_the_history():
    estimator = bv_blend_ext.BVBlend(window=4)
    estimator(torch.tensor([INF, INF, 1.0, 0.0, -INF, 1.0]), group_size=2)
    assert int(estimator.count) == 2
    assert math.isfinite(float(estimator.ema)) and math.isfinite(float(estimator.var))
    advantages = estimator(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2)
    assert bool(advantages.isfinite().all())


def test_a_sum_that_overflows_gives_zero_advantages_not_nan():
    big = torch.finfo(torch.float32).max
    rewards = torch.tensor([big, big, big, big, 1.0, 0.0, 1.0, 0.0])
    out = bv_blend_ext.blend_advantages(rewards, 4, hist_mean=0.5, hist_var=0.1)
    assert bool(out.advantages.isfinite().all())
    assert torch.equal(out.advantages[:4], torch.zeros(4))
    estimator = bv_blend_ext.BVBlend(window=4)
    estimator(rewards, group_size=4)
    assert int(estimator.count) == 1 and math.isfinite(float(estimator.ema))


# 4. A zero scale gives zero advantages -------------------------------------------------------

@pytest.mark.parametrize("scale", ("group", "blend", "batch"))
def test_zero_eps_and_zero_variance_give_zero_advantages(scale):
    # Flat groups; for "batch" the whole call is flat, so its scale is 0 too.
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64,
                           requires_grad=True)
    out = bv_blend_ext.blend_advantages(rewards, 3, eps=0.0, scale=scale)
    assert torch.equal(out.advantages.detach(), torch.zeros(6, dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.advantages.sum(), rewards)
    assert torch.equal(grad, torch.zeros(6, dtype=torch.float64))
    want = reference.blend_advantages(rewards.detach(), 3, eps=0.0, scale=scale)
    assert torch.equal(want.advantages, torch.zeros(6, dtype=torch.float64))


def test_zero_eps_keeps_informative_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5])
    out = bv_blend_ext.blend_advantages(rewards, 3, eps=0.0, scale="group")
    assert torch.equal(out.advantages[:3], torch.zeros(3))
    want = reference.blend_advantages(rewards, 3, eps=0.0, scale="group")
    torch.testing.assert_close(out.advantages, want.advantages)
    assert float(out.advantages[4]) > 0


def test_estimator_with_zero_eps_trains_on():
    estimator = bv_blend_ext.BVBlend(window=4, eps=0.0, scale="group", min_history=0)
    for _ in range(3):
        advantages = estimator(torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]), group_size=2)
        assert bool(advantages.isfinite().all())


# 5. History statistics -------------------------------------------------------------------------

BAD_HISTORY = {
    "hist_var negative": dict(hist_var=-0.3),
    "hist_var nan": dict(hist_var=NAN),
    "hist_var inf": dict(hist_var=INF),
    "hist_mean nan": dict(hist_mean=NAN),
    "hist_mean inf": dict(hist_mean=-INF),
}


@pytest.mark.parametrize("as_tensor", (False, True), ids=("float", "tensor"))
@pytest.mark.parametrize("case", BAD_HISTORY)
def test_bad_history_statistics_are_rejected(case, as_tensor):
    kwargs = BAD_HISTORY[case]
    if as_tensor:
        kwargs = {k: torch.tensor(v) for k, v in kwargs.items()}
    with raises_naming(next(iter(kwargs)), ValueError):
        bv_blend_ext.blend_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, **kwargs)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", BAD_HISTORY)
def test_unvalidated_bad_history_is_ignored(case, scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 1.0])
    kwargs = {k: torch.tensor(v, dtype=torch.float64) for k, v in BAD_HISTORY[case].items()}
    kwargs = {"hist_mean": torch.tensor(0.4, dtype=torch.float64),
              "hist_var": torch.tensor(0.2, dtype=torch.float64), **kwargs}
    got = bv_blend_ext.blend_advantages(rewards, 2, scale=scale, validate=False, **kwargs)
    without_history = bv_blend_ext.blend_advantages(rewards, 2, scale=scale)
    for name, a, b in zip(got._fields, got, without_history):
        assert torch.equal(bits(a), bits(b)), name
    want = reference.blend_advantages(rewards, 2, scale=scale, **kwargs)
    torch.testing.assert_close(got.advantages, want.advantages)


# 6. Devices --------------------------------------------------------------------------------------
# "meta" stands in for a second device here; test_op_cuda.py has the CPU/CUDA cases.

def op_args(**overrides):
    args = dict(rewards=torch.tensor([1.0, 0.0, 0.5, 0.25]), offsets=None, group_size=2,
                hist_mean=torch.tensor(0.0), hist_var=torch.tensor(0.0), eps=1e-4,
                scale="blend")
    args.update(overrides)
    return args


@pytest.mark.parametrize("argument", ("offsets", "hist_mean", "hist_var"))
def test_raw_forward_checks_every_device(argument):
    meta = {"offsets": torch.tensor([0, 2, 4], device="meta"),
            "hist_mean": torch.tensor(0.0, device="meta"),
            "hist_var": torch.tensor(0.0, device="meta")}[argument]
    args = op_args(**{argument: meta}, **({"group_size": 0} if argument == "offsets" else {}))
    with raises_naming(argument, ValueError):
        OPS.group_advantages(*args.values())


@pytest.mark.parametrize("argument", ("grad_advantages", "advantages"))
def test_raw_backward_checks_every_device(argument):
    args = op_args()
    advantages = OPS.group_advantages(*args.values())[0]
    tensors = {"grad_advantages": torch.ones(4), "advantages": advantages}
    tensors[argument] = tensors[argument].to("meta")
    with raises_naming(argument, ValueError):
        OPS.group_advantages_backward(tensors["grad_advantages"], tensors["advantages"],
                                      *args.values())


@pytest.mark.parametrize("argument", ("grad_advantages", "advantages"))
def test_raw_backward_checks_shapes(argument):
    args = op_args()
    tensors = {"grad_advantages": torch.ones(4), "advantages": torch.ones(4)}
    tensors[argument] = torch.ones(3)
    with raises_naming(argument, ValueError):
        OPS.group_advantages_backward(tensors["grad_advantages"], tensors["advantages"],
                                      *args.values())


def test_raw_history_update_checks_every_device():
    ring = torch.zeros(4, dtype=torch.float64)
    count, ema, var = (torch.tensor(0), torch.tensor(0.0, dtype=torch.float64),
                       torch.tensor(0.0, dtype=torch.float64, device="meta"))
    with raises_naming("var", ValueError):
        OPS.update_history(torch.tensor([1.0]), ring, count, ema, var, 0.5, 2)
    assert int(count) == 0 and float(ema) == 0.0


# 7. torch.compile(fullgraph=True) gets the eager error types ------------------------------------

COMPILED_ERRORS = {
    "N not divisible by group_size": (dict(group_size=4), "group_size"),
    "both group_size and offsets": (dict(group_size=3, offsets=torch.tensor([0, 3, 6])),
                                    "group_size|offsets"),
    "neither": (dict(), "group_size|offsets"),
    "offsets int32": (dict(offsets=torch.tensor([0, 3, 6], dtype=torch.int32)), "offsets"),
    "unknown scale": (dict(group_size=3, scale="mean"), "scale"),
    "eps negative": (dict(group_size=3, eps=-1.0), "eps"),
    "hist_var on another device": (dict(group_size=3, hist_var=torch.tensor(1.0, device="meta")),
                                   "hist_var"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", COMPILED_ERRORS)
def test_compiled_callers_get_the_eager_error(case):
    kwargs, argument = COMPILED_ERRORS[case]
    kwargs = dict(kwargs)
    group_size = kwargs.pop("group_size", None)
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])

    def advantages(rewards):
        return bv_blend_ext.blend_advantages(rewards, group_size, **kwargs).advantages

    torch._dynamo.reset()
    with raises_naming(argument):
        advantages(rewards)
    with raises_naming(argument):
        torch.compile(advantages, fullgraph=True)(rewards)


@pytest.mark.slow
def test_compiled_estimator_gets_the_eager_error_and_keeps_its_history():
    estimator = bv_blend_ext.BVBlend(window=4)
    torch._dynamo.reset()
    step = torch.compile(lambda rewards: estimator(rewards, group_size=4), fullgraph=True)
    with raises_naming("group_size", ValueError):
        step(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert int(estimator.count) == 0


# 8. validate=True reads device memory once -----------------------------------------------------

@pytest.mark.parametrize("history", ("floats", "tensors"))
def test_validation_reads_device_memory_in_one_transfer(history, monkeypatch):
    # CPU tensors are read in place; pretend they live on a device to check the path a GPU
    # takes (test_op_cuda.py counts the real synchronisations).
    monkeypatch.setattr(bv_blend_ext.functional, "on_host", lambda tensor: False)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.25, 1.0])
    offsets = torch.tensor([0, 2, 6])
    stats = dict(hist_mean=0.3, hist_var=0.1)
    if history == "tensors":
        stats = {k: torch.tensor(v) for k, v in stats.items()}
    with HostReads() as reads:
        bv_blend_ext.blend_advantages(rewards, offsets=offsets, **stats)
    assert reads.count == 1
    with HostReads() as reads:
        bv_blend_ext.BVBlend()(rewards, offsets=offsets)
    assert reads.count == 1
    for bad, message in (([0, 4, 3, 6], "non-decreasing"), ([1, 2, 6], "start at 0")):
        with raises_naming("offsets", ValueError) as error:
            bv_blend_ext.blend_advantages(rewards, offsets=torch.tensor(bad), **stats)
        assert message in str(error.value)


def test_fixed_groups_and_float_history_read_nothing():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    with HostReads() as reads:
        bv_blend_ext.blend_advantages(rewards, 2, hist_mean=0.3, hist_var=0.1)
        bv_blend_ext.BVBlend()(rewards, group_size=2)
    assert reads.count == 0
