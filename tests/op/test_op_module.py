"""bv_blend_ext.BVBlend, the stateful estimator: its history against reference.HistoryReference
over many calls (ring wrap-around, min_history, ema_decay), state_dict round trip, reset,
step's statistics and gradients."""

import io

import pytest
import torch

import bv_blend_ext
from bv_blend_ext import reference

from helpers import assert_history, bits, differing_bits, per_thread_count, ragged_rewards

NAN = float("nan")

CONFIGS = {
    # window 4 with 3-6 groups a call: the ring wraps on the second call.
    "default_alpha": dict(window=4, ema_decay=None, initial_baseline=0.0, min_history=2,
                          scale="blend"),
    # min_history 5 > entries after the first call: σ_u² must stay 0 until the second.
    "min_history": dict(window=6, ema_decay=0.3, initial_baseline=1.5, min_history=5,
                        scale="group"),
    "ema_decay_1": dict(window=3, ema_decay=1.0, initial_baseline=-0.5, min_history=0,
                        scale="batch"),
    "none": dict(window=5, ema_decay=0.05, initial_baseline=2.0, min_history=3, scale="none"),
}


def calls(dtype, count=7):
    """Alternating fixed-size and ragged calls; each ragged call ends with an empty group and a
    group with no valid reward, neither of which may enter the history."""
    for i in range(count):
        if i % 2 == 0:
            gen = torch.Generator().manual_seed(100 + i)
            yield (torch.randn(12, generator=gen, dtype=torch.float64) + i).to(dtype), dict(group_size=4)
        else:
            rewards, offsets = ragged_rewards(4, 5, torch.float64, seed=200 + i)
            rewards = torch.cat([rewards + i, torch.tensor([NAN, NAN], dtype=torch.float64)])
            offsets = torch.cat([offsets, offsets[-1:], offsets[-1:] + 2])
            yield rewards.to(dtype), dict(offsets=offsets)



# (history, advantages) tolerances against the reference. History: float32 group means of op
# and reference may differ in the last bit. Advantages: also rounded to the rewards' dtype.
STEP_TOL = {
    torch.float64: (1e-12, dict(rtol=1e-12, atol=1e-11)),
    torch.float32: (1e-5, dict(rtol=1e-5, atol=1e-4)),
    torch.bfloat16: (1e-5, dict(rtol=1.6e-2, atol=1e-2)),
}


@pytest.mark.parametrize("dtype", STEP_TOL, ids=str)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_history_reference(config, dtype):
    settings = CONFIGS[config]
    scale = settings["scale"]
    history = {k: v for k, v in settings.items() if k != "scale"}
    est = bv_blend_ext.BVBlend(**settings, eps=1e-3)
    ref = reference.HistoryReference(**history)
    # `mirror` pushes the estimator's own group means, so its ring/EMA/variance must agree to
    # float64 rounding even where float32 group means of op and reference differ in the last bit.
    mirror = reference.HistoryReference(**history)
    loose, advantage_tol = STEP_TOL[dtype]
    for rewards, groups in calls(dtype):
        want = ref.step(rewards, **groups, eps=1e-3, scale=scale)
        got = est.step(rewards, **groups)
        torch.testing.assert_close(got.advantages, want.advantages, **advantage_tol)
        for name in ("group_mean", "group_std", "beta"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name),
                                       rtol=loose, atol=loose, equal_nan=True)
        mirror.push(got.group_mean)
        assert_history(est, mirror, 1e-12)
        assert_history(est, ref, loose)
    assert ref.count > settings["window"], "the ring never wrapped around"


def test_initial_state():
    est = bv_blend_ext.BVBlend(window=10, initial_baseline=0.25)
    for stat, value in ((est.history_mean, 0.25), (est.history_var, 0.0)):
        assert stat.dtype == torch.float64 and stat.dim() == 0 and float(stat) == value
    assert set(est.state_dict()) == {"ring", "count", "ema", "var"}


def test_every_op_entry_point_defaults_to_scale_none():
    # The evaluation's verdict (README, "Why scale none is the default"): r - B, unscaled, from
    # the functional op, the module and the reference alike.
    assert bv_blend_ext.DEFAULT_SCALE == "none"
    assert bv_blend_ext.BVBlend().scale == "none"
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    history = dict(hist_mean=0.4, hist_var=0.05)
    got = bv_blend_ext.blend_advantages(rewards, 3, **history).advantages
    spec = reference.blend_advantages(rewards, 3, **history)
    assert torch.equal(bits(got), bits(bv_blend_ext.blend_advantages(rewards, 3, **history,
                                                                       scale="none").advantages))
    baseline = (1 - spec.beta) * spec.group_mean + spec.beta * 0.4
    torch.testing.assert_close(spec.advantages, rewards - baseline.repeat_interleave(3))
    torch.testing.assert_close(got, spec.advantages)


def test_groups_of_one_call_share_the_pre_call_history():
    # After the first call the ring is [0, 2]: H = 2 (ema_decay 1 keeps the last mean) and
    # σ_u² = 2. Both groups of the next call must blend with that, not with the history the
    # first group (mean 11) leaves behind.
    est = bv_blend_ext.BVBlend(window=2, ema_decay=1.0, min_history=2, scale="none")
    est(torch.tensor([0.0, 0.0, 2.0, 2.0]), 2)
    rewards = torch.tensor([10.0, 12.0, -3.0, -5.0])
    h, u = float(est.history_mean), float(est.history_var)
    got = est(rewards, 2)
    want = reference.blend_advantages(rewards, 2, hist_mean=h, hist_var=u, scale="none")
    torch.testing.assert_close(got, want.advantages)
    assert float(est.history_mean) == -4.0  # the last group mean, as ema_decay = 1


def test_step_returns_every_statistic_and_the_history_it_used():
    settings = dict(window=5, ema_decay=0.3, initial_baseline=0.2, min_history=2)
    stepped, called = bv_blend_ext.BVBlend(**settings), bv_blend_ext.BVBlend(**settings)
    ref = reference.HistoryReference(**settings)
    for rewards, groups in calls(torch.float32, count=4):
        h, u = ref.ema, ref.variance
        want = bv_blend_ext.blend_advantages(rewards, **groups, hist_mean=called.ema.clone(),
                                             hist_var=called.var.clone())
        got = stepped.step(rewards, **groups)
        advantages = called(rewards, **groups)
        assert isinstance(got, bv_blend_ext.BlendStep)
        assert torch.equal(bits(got.advantages), bits(advantages))
        for name in want._fields:
            assert torch.equal(bits(getattr(got, name)), bits(getattr(want, name))), name
        torch.testing.assert_close(float(got.history_mean), h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(float(got.history_var), u, rtol=1e-5, atol=1e-6)
        # Copies, not the live buffers that the update has already moved on.
        assert got.history_mean.data_ptr() != stepped.ema.data_ptr()
        ref.push(got.group_mean)
    for name, value in stepped.state_dict().items():
        assert torch.equal(value, called.state_dict()[name]), name


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_state_dict_round_trip():
    settings = dict(window=5, ema_decay=0.2, initial_baseline=0.5, min_history=3, scale="blend")
    est = bv_blend_ext.BVBlend(**settings)
    batches = list(calls(torch.float32, count=6))
    for rewards, groups in batches[:4]:
        est(rewards, **groups)
    restored = bv_blend_ext.BVBlend(**settings)
    restored.load_state_dict(round_trip(est.state_dict()))
    for rewards, groups in batches[4:]:
        assert torch.equal(restored(rewards, **groups), est(rewards, **groups))
        for name, value in est.state_dict().items():
            assert torch.equal(restored.state_dict()[name], value), name


def test_reset():
    settings = dict(window=4, ema_decay=0.5, initial_baseline=1.0, min_history=2)
    est = bv_blend_ext.BVBlend(**settings)
    batches = list(calls(torch.float32, count=4))
    for rewards, groups in batches[:3]:
        est(rewards, **groups)
    est.reset()
    fresh = bv_blend_ext.BVBlend(**settings)
    for name, value in fresh.state_dict().items():
        assert torch.equal(est.state_dict()[name], value), name
    rewards, groups = batches[3]
    assert torch.equal(est(rewards, **groups), fresh(rewards, **groups))


def test_step_statistics_are_detached_and_advantages_differentiable():
    est = bv_blend_ext.BVBlend(window=4, ema_decay=0.5, min_history=2)
    est(torch.tensor([1.0, 2.0, 4.0, 7.0]), 2)
    rewards = torch.tensor([0.5, 3.0, NAN, 2.0, 6.0, 6.0], requires_grad=True)
    h, u = est.history_mean.clone(), est.history_var.clone()
    got = est.step(rewards, 3)
    want = bv_blend_ext.blend_advantages(rewards.detach(), 3, hist_mean=h, hist_var=u)
    assert got.advantages.requires_grad
    assert torch.equal(got.advantages.detach(), want.advantages)
    for stat, expected in zip(got[1:], want[1:]):
        assert not stat.requires_grad
        assert torch.equal(stat.nan_to_num(-1), expected.nan_to_num(-1))


@pytest.mark.parametrize("scale", ("group", "blend", "batch", "none"))
def test_gradient_uses_the_pre_call_history(scale):
    # The history buffers change in place after the forward; backward must still differentiate
    # with the H and σ_u² the forward used.
    est = bv_blend_ext.BVBlend(window=4, ema_decay=0.5, min_history=2, scale=scale)
    est(torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64), 2)
    est(torch.tensor([-3.0, 0.0, 9.0, 8.0], dtype=torch.float64), 2)
    h, u = est.history_mean.clone(), est.history_var.clone()
    assert u > 0
    rewards = torch.tensor([0.5, 3.0, 1.0, 2.0, 6.0, 5.5], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25], dtype=torch.float64)
    (est(rewards, 3) * weights).sum().backward()
    expected = rewards.detach().clone().requires_grad_()
    out = bv_blend_ext.blend_advantages(expected, 3, hist_mean=h, hist_var=u, scale=scale)
    (out.advantages * weights).sum().backward()
    torch.testing.assert_close(rewards.grad, expected.grad, rtol=1e-12, atol=1e-12)


def test_module_dtype_casts_keep_the_history_float64():
    # A trainer may cast a whole model (estimator included) to bfloat16; H and σ_u² must not
    # lose precision with it.
    est = bv_blend_ext.BVBlend(window=4).to(torch.bfloat16)
    est(torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.bfloat16), 2)
    assert {name: t.dtype for name, t in est.state_dict().items()} == {
        "ring": torch.float64, "count": torch.int64, "ema": torch.float64, "var": torch.float64}


@pytest.mark.parametrize("groups", (5000, 50_000))  # one chunk of the CPU update, and several
def test_large_history_update_is_thread_count_independent_and_matches_the_recursion(groups):
    gen = torch.Generator().manual_seed(3)
    means = torch.rand(groups, generator=gen, dtype=torch.float64)
    means[torch.rand(groups, generator=gen) < 0.1] = NAN

    def updated_state():
        est = bv_blend_ext.BVBlend(window=64, initial_baseline=0.25)
        torch.ops.bv_blend.update_history(means, est.ring, est.count, est.ema, est.var,
                                          est.alpha, est.min_history)
        return est.state_dict()

    states = per_thread_count(updated_state)
    assert not differing_bits(*states)
    ref = reference.HistoryReference(window=64, initial_baseline=0.25)
    ref.push(means)
    est = bv_blend_ext.BVBlend(window=64, initial_baseline=0.25)
    est.load_state_dict(states[0])
    assert_history(est, ref, 1e-12)
