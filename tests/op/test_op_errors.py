"""Every bad input of the op's contract raises ValueError/TypeError naming the argument, and a
failing call leaves the estimator's history exactly as it was."""

import pytest
import torch

import bv_blend_ext

from helpers import assert_same_state, raises_naming, state_of

NAN = float("nan")
REWARDS = torch.tensor([1.0, 2.0, 4.0, 0.5, NAN, 3.0])  # N = 6

# (call kwargs on REWARDS, the argument the message must name). "meta" stands in for a second
# device on a CPU-only machine; test_op_cuda.py repeats the check with a real GPU.
BAD_GROUPS = {
    "offsets int32": (dict(offsets=torch.tensor([0, 3, 6], dtype=torch.int32)), "offsets"),
    "offsets float": (dict(offsets=torch.tensor([0.0, 3.0, 6.0])), "offsets"),
    "offsets not starting at 0": (dict(offsets=torch.tensor([1, 3, 6])), "offsets"),
    "offsets not ending at N": (dict(offsets=torch.tensor([0, 3, 5])), "offsets"),
    "offsets past N": (dict(offsets=torch.tensor([0, 3, 7])), "offsets"),
    "offsets decreasing": (dict(offsets=torch.tensor([0, 4, 3, 6])), "offsets"),
    "offsets 2-D": (dict(offsets=torch.tensor([[0, 3, 6]])), "offsets"),
    "offsets on another device": (dict(offsets=torch.tensor([0, 3, 6], device="meta")), "offsets"),
    "N not divisible by group_size": (dict(group_size=4), "group_size"),
    "group_size 0": (dict(group_size=0), "group_size"),
    "group_size negative": (dict(group_size=-2), "group_size"),
    "group_size float": (dict(group_size=2.0), "group_size"),
    "both group_size and offsets": (dict(group_size=3, offsets=torch.tensor([0, 3, 6])),
                                    "group_size|offsets"),
    "neither group_size nor offsets": (dict(), "group_size|offsets"),
}
BAD_REWARDS = {
    "rewards int64": torch.tensor([1, 2, 3, 4]),
    "rewards 2-D": torch.ones(2, 2),
    "rewards a list": [1.0, 2.0, 3.0, 4.0],
}
BAD_FUNCTIONAL = {
    "eps negative": (dict(eps=-1e-4), "eps"),
    "eps nan": (dict(eps=NAN), "eps"),
    "unknown scale": (dict(scale="mean"), "scale"),
    "hist_mean on another device": (dict(hist_mean=torch.tensor(0.0, device="meta")), "hist_mean"),
    "hist_var on another device": (dict(hist_var=torch.tensor(1.0, device="meta")), "hist_var"),
    "hist_var not 0-dim nor (G,)": (dict(hist_var=torch.ones(3)), "hist_var"),
}



@pytest.mark.parametrize("case", BAD_GROUPS)
def test_functional_bad_groups(case):
    kwargs, argument = BAD_GROUPS[case]
    kwargs = dict(kwargs)  # the table is shared with the estimator test below
    group_size = kwargs.pop("group_size", None)
    with raises_naming(argument):
        bv_blend_ext.blend_advantages(REWARDS, group_size, **kwargs)


@pytest.mark.parametrize("case", BAD_FUNCTIONAL)
def test_functional_bad_settings(case):
    kwargs, argument = BAD_FUNCTIONAL[case]
    with raises_naming(argument):
        bv_blend_ext.blend_advantages(REWARDS, 3, **kwargs)


@pytest.mark.parametrize("case", BAD_REWARDS)
def test_functional_bad_rewards(case):
    with raises_naming("rewards"):
        bv_blend_ext.blend_advantages(BAD_REWARDS[case], 2)


# The op itself (torch.ops.bv_blend.*, reachable from C++ and from other trainers) checks what it
# can without reading device memory. (A meta tensor would route the call to the fake kernel, so
# the device mismatch at this level is tested with a GPU in test_op_cuda.py.)
OP_ARGS = dict(rewards=REWARDS, offsets=None, group_size=3, hist_mean=torch.tensor(0.0),
               hist_var=torch.tensor(1.0), eps=1e-4, scale="blend")
BAD_OP = {
    "unknown scale": (dict(scale="mean"), "scale"),
    "eps negative": (dict(eps=-1.0), "eps"),
    "N not divisible by group_size": (dict(group_size=4), "group_size"),
    "offsets int32": (dict(offsets=torch.tensor([0, 3, 6], dtype=torch.int32)), "offsets"),
    "hist_var not 0-dim nor (G,)": (dict(hist_var=torch.ones(3)), "hist_var"),
    "rewards int64": (dict(rewards=torch.arange(6)), "rewards"),
}


@pytest.mark.parametrize("case", BAD_OP)
def test_op_checks_its_arguments(case):
    changes, argument = BAD_OP[case]
    with raises_naming(argument):
        torch.ops.bv_blend.group_advantages(**{**OP_ARGS, **changes})


def test_unvalidated_bad_offsets_cannot_fault():
    # validate=False trusts the offsets; values outside [0, N] must be clamped, never read or
    # written out of bounds.
    out = bv_blend_ext.blend_advantages(REWARDS, offsets=torch.tensor([-5, 4, 2, 100]),
                                        validate=False)
    assert out.advantages.shape == REWARDS.shape and torch.isfinite(out.advantages).all()


BAD_ESTIMATORS = {
    "window 1": (dict(window=1), "window"),
    "window 0": (dict(window=0), "window"),
    "window float": (dict(window=10.0), "window"),
    "ema_decay 0": (dict(ema_decay=0.0), "ema_decay"),
    "ema_decay negative": (dict(ema_decay=-0.1), "ema_decay"),
    "ema_decay above 1": (dict(ema_decay=1.5), "ema_decay"),
    "eps negative": (dict(eps=-1e-4), "eps"),
    "unknown scale": (dict(scale="mean"), "scale"),
    "min_history negative": (dict(min_history=-1), "min_history"),
    "initial_baseline nan": (dict(initial_baseline=NAN), "initial_baseline"),
}


@pytest.mark.parametrize("case", BAD_ESTIMATORS)
def test_estimator_bad_settings(case):
    kwargs, argument = BAD_ESTIMATORS[case]
    with raises_naming(argument):
        bv_blend_ext.BVBlend(**kwargs)


def test_estimator_good_boundary_settings():
    # The edges of the valid ranges are accepted: window 2, ema_decay 1, eps 0.
    est = bv_blend_ext.BVBlend(window=2, ema_decay=1.0, eps=0.0, min_history=0)
    est(torch.tensor([1.0, 2.0, 3.0, 5.0]), 2)
    assert float(est.history_mean) == 4.0  # ema_decay 1: H is the last group mean


def warm_estimator():
    est = bv_blend_ext.BVBlend(window=3, ema_decay=0.4, initial_baseline=0.5, min_history=2)
    est(torch.tensor([1.0, 2.0, 4.0, 7.0, 3.0, 3.5]), 2)
    est(torch.tensor([0.0, 6.0, 2.0, 2.5]), offsets=torch.tensor([0, 1, 4]))
    return est


BAD_CALLS = {**{case: (REWARDS, *BAD_GROUPS[case]) for case in BAD_GROUPS},
             **{case: (rewards, dict(group_size=2), "rewards")
                for case, rewards in BAD_REWARDS.items()}}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_failed_call_leaves_history_untouched(case):
    rewards, kwargs, argument = BAD_CALLS[case]
    kwargs = dict(kwargs)
    est, twin = warm_estimator(), warm_estimator()
    before = state_of(est)
    group_size = kwargs.pop("group_size", None)
    with raises_naming(argument):
        est(rewards, group_size, **kwargs)
    assert_same_state(before, est)
    # And the estimator carries on exactly as one that never saw the bad call.
    good = torch.tensor([2.0, 5.0, 1.0, 1.5])
    assert torch.equal(est(good, 2), twin(good, 2))


def test_messages_spell_out_numbers_and_shapes():
    # The op formats numbers itself (op_common.h, as_text); these are the texts users read.
    ops = torch.ops.bv_blend
    h = torch.tensor(0.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"got shape \[1, 3\]$"):
        ops.group_advantages(REWARDS, torch.tensor([[0, 3, 6]]), 0, h, h, 1e-4, "blend")
    with pytest.raises(ValueError, match=r"group_size \(4\) must divide the number of rewards \(6\)"):
        ops.group_advantages(REWARDS, None, 4, h, h, 1e-4, "blend")
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -0\.25$"):
        ops.group_advantages(REWARDS, None, 3, h, h, -0.25, "blend")
    with pytest.raises(ValueError, match=r"\(G,\) = \(2,\) \(one value per group\), got shape \[3\]"):
        ops.group_advantages(REWARDS, None, 3, torch.zeros(3, dtype=torch.float64), h, 1e-4,
                             "blend")
