"""bv_blend_ext.blend_advantages (the compiled op behind the functional API) against the contract:
hand-worked values, the pure-PyTorch reference, TRL 1.16's group formula, gradients, and
bitwise determinism across CPU thread counts."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bv_blend_ext
from bv_blend_ext import reference

from helpers import (assert_blend_close, bits, determinism_outputs, differing_bits,
                     per_thread_count, ragged_rewards)

NAN = float("nan")
SCALES = ("group", "blend", "batch", "none")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Rewards drawn from values exact in every dtype (quarters): an all-equal group then has a variance
# of exactly 0 in any summation order, so a scale of ~eps cannot magnify rounding noise into
# disagreements that say nothing about correctness.
GRID = (-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.5, 3.0)
reward_value = st.one_of(st.sampled_from(GRID), st.just(NAN))
any_group = st.lists(reward_value, min_size=0, max_size=6)  # includes empty, n=1, all-NaN
equal_group = st.builds(lambda v, n: [v] * n, st.sampled_from(GRID), st.integers(2, 5))
ragged_groups = st.lists(st.one_of(any_group, equal_group), min_size=0, max_size=8)
history = dict(hist_mean=st.sampled_from(GRID), hist_var=st.sampled_from((0.0, 0.25, 1.0, 2.5)),
               eps=st.sampled_from((1e-4, 0.1, 1.0)), scale=st.sampled_from(SCALES))
HYPOTHESIS = settings(max_examples=40, deadline=None)


def flatten(groups):
    """Rewards and int64 offsets (G+1,) of a list of groups."""
    rewards = [v for g in groups for v in g]
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + len(g))
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(offsets, dtype=torch.int64)


@pytest.mark.parametrize("scale,expected", [
    # Groups [1, 3] (μ 2, σ² 2) and [5, 5] (μ 5, σ² 0); H = 4, σ_u² = 6, eps = 0.5, so
    # β = 0.75 and 1 and the baselines are 3.5 and 4 (worked out in tests/cpp/test_ops.cpp).
    ("group", [-2.5 / (math.sqrt(2) + 0.5), -0.5 / (math.sqrt(2) + 0.5), 2.0, 2.0]),
    ("blend", [-2.5 / (math.sqrt(5) + 0.5), -0.5 / (math.sqrt(5) + 0.5),
               1 / (math.sqrt(6) + 0.5), 1 / (math.sqrt(6) + 0.5)]),
    ("batch", [x / (math.sqrt(11 / 3) + 0.5) for x in (-2.5, -0.5, 1.0, 1.0)]),
    ("none", [-2.5, -0.5, 1.0, 1.0]),
])
def test_hand_computed_values(scale, expected):
    out = bv_blend_ext.blend_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2, hist_mean=4.0,
                                        hist_var=6.0, eps=0.5, scale=scale)
    torch.testing.assert_close(out.advantages, torch.tensor(expected))
    torch.testing.assert_close(out.group_mean, torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(out.group_std, torch.tensor([math.sqrt(2), 0.0]))
    torch.testing.assert_close(out.beta, torch.tensor([0.75, 1.0]))


def test_nan_empty_and_single_reward_groups():
    # [2, NaN, 4] uses its two valid rewards; an empty group; [7] has σ = 0 so its only reward
    # sits on the baseline; [NaN, NaN] has no valid reward: NaN statistics and zero advantages.
    rewards = torch.tensor([2.0, NAN, 4.0, 7.0, NAN, NAN], dtype=torch.float64)
    offsets = torch.tensor([0, 3, 3, 4, 6])
    out = bv_blend_ext.blend_advantages(rewards, offsets=offsets, eps=1.0, scale="group")
    a = 1 / (math.sqrt(2) + 1)
    torch.testing.assert_close(out.advantages, torch.tensor([-a, 0, a, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(out.group_mean, torch.tensor([3, NAN, 7, NAN], dtype=torch.float64),
                               equal_nan=True)
    torch.testing.assert_close(out.group_std,
                               torch.tensor([math.sqrt(2), NAN, 0, NAN], dtype=torch.float64),
                               equal_nan=True)
    torch.testing.assert_close(out.beta, torch.tensor([0, NAN, 0, NAN], dtype=torch.float64),
                               equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@HYPOTHESIS
@given(groups=ragged_groups, **history)
def test_ragged_parity_with_reference(dtype, groups, hist_mean, hist_var, eps, scale):
    rewards, offsets = flatten(groups)
    rewards = rewards.to(dtype)
    kwargs = dict(offsets=offsets, hist_mean=hist_mean, hist_var=hist_var, eps=eps, scale=scale)
    got = bv_blend_ext.blend_advantages(rewards, **kwargs)
    assert_blend_close(got, reference.blend_advantages(rewards, **kwargs), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@HYPOTHESIS
@given(data=st.data(), group_size=st.integers(1, 6), num_groups=st.integers(0, 6), **history)
def test_fixed_size_parity_with_reference(dtype, data, group_size, num_groups, hist_mean, hist_var, eps, scale):
    values = data.draw(st.lists(reward_value, min_size=group_size * num_groups,
                                max_size=group_size * num_groups))
    rewards = torch.tensor(values, dtype=torch.float64).to(dtype)
    kwargs = dict(hist_mean=hist_mean, hist_var=hist_var, eps=eps, scale=scale)
    got = bv_blend_ext.blend_advantages(rewards, group_size, **kwargs)
    assert_blend_close(got, reference.blend_advantages(rewards, group_size, **kwargs), dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("scale", SCALES)
def test_continuous_rewards_parity_with_reference(dtype, scale):
    rewards, offsets = ragged_rewards(300, 12, dtype, seed=1)
    kwargs = dict(offsets=offsets, hist_mean=0.3, hist_var=0.8, scale=scale)
    got = bv_blend_ext.blend_advantages(rewards, **kwargs)
    assert_blend_close(got, reference.blend_advantages(rewards, **kwargs), dtype,
                       advantage_atol=1e-4 if dtype == torch.float32 else None)


def test_non_contiguous_rewards():
    # Any 1-D tensor is a valid rewards argument, including a strided view.
    base, offsets = ragged_rewards(40, 6, torch.float32, seed=2)
    rewards = torch.stack([base, torch.full_like(base, 1e6)], dim=1)[:, 0]
    assert not rewards.is_contiguous()
    got = bv_blend_ext.blend_advantages(rewards, offsets=offsets, hist_var=0.5)
    want = bv_blend_ext.blend_advantages(rewards.contiguous(), offsets=offsets, hist_var=0.5)
    assert torch.equal(got.advantages, want.advantages)


def test_validate_false_gives_the_same_result():
    rewards, offsets = ragged_rewards(50, 8, torch.float32, seed=3)
    got = bv_blend_ext.blend_advantages(rewards, offsets=offsets, hist_var=0.5, validate=False)
    want = bv_blend_ext.blend_advantages(rewards, offsets=offsets, hist_var=0.5)
    assert torch.equal(got.advantages, want.advantages)


def test_history_statistics_as_tensors():
    # 0-dim tensors (the estimator's float64 buffers) and plain floats are interchangeable.
    rewards, offsets = ragged_rewards(20, 6, torch.float32, seed=4)
    got = bv_blend_ext.blend_advantages(rewards, offsets=offsets,
                                        hist_mean=torch.tensor(0.7, dtype=torch.float64),
                                        hist_var=torch.tensor(1.3, dtype=torch.float64))
    want = bv_blend_ext.blend_advantages(rewards, offsets=offsets, hist_mean=0.7, hist_var=1.3)
    assert torch.equal(got.advantages, want.advantages)


# --- TRL 1.16 parity ------------------------------------------------------------------------------

def trl_nanstd(tensor, dim=None):
    """trl.trainer.utils.nanstd: NaN-ignoring std with Bessel's correction, NaN below 2 values."""
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, NAN))
    std = torch.sqrt(variance * correction)
    return std if dim is None else std.squeeze(dim)


def trl_advantages(rewards, num_generations, scale_rewards):
    """GRPOTrainer._generate_and_score_completions, multi_objective_aggregation=
    "sum_then_normalize", from the group means to nan_to_num (trl 1.16.0)."""
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped = mean_grouped.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ("group", "none"):
        if num_generations > 1:
            std = trl_nanstd(rewards.view(-1, num_generations), dim=1)
            std = std.repeat_interleave(num_generations, dim=0)
        else:
            std = torch.zeros_like(rewards)
    else:
        std = trl_nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean_grouped
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@HYPOTHESIS
@given(data=st.data(), num_generations=st.integers(2, 8), num_groups=st.integers(1, 6),
       scale=st.sampled_from(("group", "batch", "none")), hist_mean=st.sampled_from(GRID))
def test_trl_parity_without_history(data, num_generations, num_groups, scale, hist_mean):
    values = data.draw(st.lists(reward_value, min_size=num_generations * num_groups,
                                max_size=num_generations * num_groups))
    rewards = torch.tensor(values, dtype=torch.float32)
    # σ_u² = 0 gives β = 0, so H must not matter at all.
    got = bv_blend_ext.blend_advantages(rewards, num_generations, hist_mean=hist_mean, hist_var=0.0,
                                        eps=1e-4, scale=scale)
    torch.testing.assert_close(got.advantages, trl_advantages(rewards, num_generations, scale),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ("group", "batch", "none"))
def test_trl_parity_continuous_rewards(scale):
    gen = torch.Generator().manual_seed(5)
    rewards = torch.rand(256 * 8, generator=gen)  # rewards in [0, 1], as from a verifier
    rewards[torch.rand(rewards.shape, generator=gen) < 0.05] = NAN
    got = bv_blend_ext.blend_advantages(rewards, 8, eps=1e-4, scale=scale)
    torch.testing.assert_close(got.advantages, trl_advantages(rewards, 8, scale),
                               rtol=1e-5, atol=1e-4)


# --- gradients ------------------------------------------------------------------------------------

GRAD_LAYOUTS = {
    # 4 groups of 3.
    "fixed": (torch.tensor([0.3, 1.7, -0.4, 2.2, 0.9, 1.1, -1.5, 0.2, 0.8, 3.0, 2.1, 2.6]), 3, None),
    # [NaN + 2 valid], [one reward], [], [4 rewards], [all NaN].
    "ragged": (torch.tensor([0.3, NAN, -0.4, 2.2, 0.9, 1.1, -1.5, 0.2, NAN, NAN]), None,
               torch.tensor([0, 3, 4, 4, 8, 10])),
}


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("hist_var", (0.6, 0.0))
def test_gradcheck(layout, scale, hist_var):
    values, group_size, offsets = GRAD_LAYOUTS[layout]
    rewards = values.to(torch.float64).requires_grad_()

    def advantages(r):
        return bv_blend_ext.blend_advantages(r, group_size, offsets=offsets, hist_mean=0.8,
                                             hist_var=hist_var, eps=1e-4, scale=scale).advantages

    assert torch.autograd.gradcheck(advantages, (rewards,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradient_is_zero_for_nan_rewards():
    values, _, offsets = GRAD_LAYOUTS["ragged"]
    rewards = values.to(torch.float64).requires_grad_()
    out = bv_blend_ext.blend_advantages(rewards, offsets=offsets, hist_mean=0.8, hist_var=0.6)
    (grad,) = torch.autograd.grad(out.advantages, rewards, torch.ones_like(rewards))
    assert torch.isfinite(grad).all()
    assert (grad[torch.isnan(values)] == 0).all()


# --- determinism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", SCALES)
def test_bitwise_equal_across_thread_counts(scale):
    # Large enough (~150k rewards) that both the per-group kernel and any whole-batch reduction
    # are split across threads.
    ragged, offsets = ragged_rewards(20000, 14, torch.float32, seed=6)
    fixed = torch.randn(8192 * 16, generator=torch.Generator().manual_seed(7))
    grad_out = torch.randn(ragged.shape, generator=torch.Generator().manual_seed(8))
    one, two = per_thread_count(
        lambda: determinism_outputs(ragged, offsets, fixed, grad_out, scale))
    differing = differing_bits(one, two)
    assert not differing, f"differ between 1 and 2 threads: {differing}"
