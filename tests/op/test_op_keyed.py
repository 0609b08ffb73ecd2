"""Per-group history statistics ((G,) hist_mean / hist_var) and the keyed estimator
(BVBlend(num_keys=K) with keys), against reference.blend_advantages and
reference.KeyedHistoryReference: the CPU lane and per-group paths, thread-count determinism,
validation, state_dict, torch.compile, opcheck, and (with a GPU) CUDA parity, determinism and
graph capture."""

import io

import pytest
import torch

import bv_blend_ext
from bv_blend_ext import reference

from helpers import (HostReads, assert_blend_close, assert_history, assert_same_state, bits,
                     differing_bits, forward_backward_here_and_without_avx2, per_thread_count,
                     ragged_rewards, raises_naming, state_of, torch_threads)

NAN, INF = float("nan"), float("inf")
SCALES = ("group", "blend", "batch", "none")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OPS = torch.ops.bv_blend
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def per_group_history(num_groups, seed, unusable=False):
    """(G,) float64 H and σ_u²; with `unusable`, some groups get a history the kernels ignore."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(num_groups, generator=gen, dtype=torch.float64)
    var = torch.rand(num_groups, generator=gen, dtype=torch.float64) * 2
    var[::5] = 0.0
    if unusable:
        mean[1::7] = NAN
        var[2::7] = -0.5
        var[3::7] = INF
    return mean, var


# 1. Per-group history in the functional op ----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ("ragged", 16))
def test_per_group_history_matches_reference(layout, scale, dtype):
    if layout == "ragged":
        rewards, offsets = ragged_rewards(60, 9, dtype, seed=1)
        group_size, num_groups = None, 60
    else:
        gen = torch.Generator().manual_seed(2)
        rewards = (torch.rand(layout * 40, generator=gen) * 3).to(dtype)
        rewards[::13] = NAN
        offsets, group_size, num_groups = None, layout, 40
    h, u = per_group_history(num_groups, seed=3, unusable=True)
    kwargs = dict(offsets=offsets, hist_mean=h, hist_var=u, scale=scale)
    got = bv_blend_ext.blend_advantages(rewards, group_size, **kwargs, validate=False)
    want = reference.blend_advantages(rewards, group_size, **kwargs)
    assert_blend_close(got, want, dtype, advantage_atol=1e-4 if dtype == torch.float32 else None)


def run_both(rewards, group_size, offsets, grad, h, u, scale, eps=1e-4):
    out = OPS.group_advantages(rewards, offsets, group_size, h, u, eps, scale)
    grad_rewards = OPS.group_advantages_backward(grad, out[0], rewards, offsets, group_size, h, u,
                                                 eps, scale)
    return [bits(t) for t in (*out, grad_rewards)]


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("group_size", (2, 3, 8, 16, 64))
@pytest.mark.parametrize("scale", SCALES)
def test_one_value_per_group_is_bitwise_the_scalar(group_size, scale, dtype):
    num_groups = 37  # blocks of lanes plus a per-group tail
    gen = torch.Generator().manual_seed(group_size)
    rewards = (torch.randn(num_groups * group_size, generator=gen) * 2).to(dtype)
    rewards[::11] = NAN
    rewards[5 * group_size:6 * group_size] = 0.25  # a flat group
    grad = torch.randn(rewards.shape, generator=gen).to(dtype)
    offsets = torch.arange(0, rewards.numel() + 1, group_size)
    for h, u in ((0.3, 0.05), (0.0, 0.0), (-1.0, 2.0), (NAN, 1.0), (0.5, -1.0), (0.5, INF)):
        scalar = (torch.tensor(h, dtype=torch.float64), torch.tensor(u, dtype=torch.float64))
        full = tuple(t.expand(num_groups).clone() for t in scalar)
        for layout in ((group_size, None), (0, offsets)):
            want = run_both(rewards, *layout, grad, *scalar, scale)
            for got in (run_both(rewards, *layout, grad, *full, scale),
                        run_both(rewards, *layout, grad, full[0], scalar[1], scale),
                        run_both(rewards, *layout, grad, scalar[0], full[1], scale)):
                assert all(torch.equal(a, b) for a, b in zip(got, want)), (h, u, layout[0])


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("group_size", (2, 4, 8, 16, 32, 64))
@pytest.mark.parametrize("scale", SCALES)
def test_lanes_with_per_group_history_match_the_per_group_path(group_size, scale, dtype):
    num_groups = 67
    gen = torch.Generator().manual_seed(10 + group_size)
    rewards = (torch.randn(num_groups * group_size, generator=gen, dtype=torch.float64)).to(dtype)
    rewards[7 * group_size + 1] = NAN  # one block falls back to the per-group path
    grad = torch.randn(rewards.shape, generator=gen, dtype=torch.float64).to(dtype)
    offsets = torch.arange(0, rewards.numel() + 1, group_size)
    h, u = per_group_history(num_groups, seed=group_size, unusable=True)
    for num_threads in (1, 2):
        with torch_threads(num_threads):
            fixed = run_both(rewards, group_size, None, grad, h, u, scale)
            ragged = run_both(rewards, 0, offsets, grad, h, u, scale)
        assert all(torch.equal(a, b) for a, b in zip(fixed, ragged)), num_threads


def test_avx2_and_16_byte_paths_agree_with_per_group_history(tmp_path):
    cases = []
    for k in (4, 8, 16, 64):
        gen = torch.Generator().manual_seed(k)
        r = torch.randn(37 * k, generator=gen)
        r[3 * k] = NAN
        g = torch.randn(r.shape, generator=gen)
        h, u = per_group_history(37, seed=k, unusable=True)
        scalar = (torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64))
        for scale in SCALES:
            cases.append((r, g, k, h, u, scale))
            # One value per group against the scalar, compared below in the child's results.
            cases.append((r, g, k, *scalar, scale))
            cases.append((r, g, k, *(t.expand(37).clone() for t in scalar), scale))
    here, there = forward_backward_here_and_without_avx2(cases, tmp_path)
    for case, a, b in zip(cases, here, there):
        assert all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b)), (case[2], case[5])
    for i in range(1, len(cases), 3):
        assert all(torch.equal(bits(x), bits(y)) for x, y in zip(there[i], there[i + 1]))


@pytest.mark.parametrize("scale", SCALES)
def test_gradcheck_with_per_group_history(scale):
    rewards, offsets = ragged_rewards(6, 5, torch.float64, seed=4, nan_fraction=0.0)
    h, u = per_group_history(6, seed=5)
    rewards.requires_grad_()
    torch.autograd.gradcheck(
        lambda r: bv_blend_ext.blend_advantages(r, offsets=offsets, hist_mean=h, hist_var=u,
                                                scale=scale).advantages, (rewards,))


BAD_HISTORY = {
    "hist_mean nan": (dict(hist_mean=torch.tensor([0.1, NAN, 0.2])), "hist_mean"),
    "hist_mean inf": (dict(hist_mean=torch.tensor([0.1, 0.2, -INF])), "hist_mean"),
    "hist_var negative": (dict(hist_var=torch.tensor([0.1, -0.5, 0.2])), "hist_var"),
    "hist_var nan": (dict(hist_var=torch.tensor([NAN, 0.5, 0.2])), "hist_var"),
    "hist_mean of G+1": (dict(hist_mean=torch.zeros(4)), "hist_mean"),
    "hist_mean of G-1": (dict(hist_mean=torch.zeros(2)), "hist_mean"),
    "hist_var 2-D": (dict(hist_var=torch.zeros(3, 2)), "hist_var"),
    "hist_var int": (dict(hist_var=torch.zeros(3, dtype=torch.int64)), "hist_var"),
}


@pytest.mark.parametrize("case", BAD_HISTORY)
def test_bad_per_group_history_is_rejected_naming_it(case):
    kwargs, argument = BAD_HISTORY[case]
    with raises_naming(argument):
        bv_blend_ext.blend_advantages(torch.arange(6.0), 2, **kwargs)


def test_validation_reads_per_group_history_and_keys_in_one_transfer(monkeypatch):
    monkeypatch.setattr(bv_blend_ext.functional, "on_host", lambda tensor: False)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.25, 1.0])
    offsets = torch.tensor([0, 2, 6])
    h, u = torch.tensor([0.3, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.0])
    with HostReads() as reads:
        bv_blend_ext.blend_advantages(rewards, offsets=offsets, hist_mean=h, hist_var=u)
    assert reads.count == 1
    est = bv_blend_ext.BVBlend(num_keys=4)
    with HostReads() as reads:
        est(rewards, offsets=offsets, keys=torch.tensor([0, 3]))
    assert reads.count == 1
    with raises_naming("hist_var", ValueError):
        bv_blend_ext.blend_advantages(rewards, offsets=offsets, hist_mean=h,
                                      hist_var=torch.tensor([0.2, -1.0]))
    before = state_of(est)
    with raises_naming("keys", ValueError):
        est(rewards, offsets=offsets, keys=torch.tensor([0, 4]))
    assert_same_state(before, est)


# 2. The keyed estimator against KeyedHistoryReference -------------------------------------------

KEYED = dict(window=5, ema_decay=0.3, initial_baseline=0.2, min_history=2)


def keyed_calls(dtype, num_keys, count=6, seed=0):
    """Calls of fixed and ragged groups (with NaNs, an all-NaN group and an empty one) and their
    keys: duplicates within a call, keys never seen before, keys seen often."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        if i % 2 == 0:
            rewards = torch.randn(8 * 4, generator=gen, dtype=torch.float64) + 0.1 * i
            rewards[4:8] = NAN
            groups, num_groups = dict(group_size=4), 8
        else:
            rewards, offsets = ragged_rewards(7, 6, torch.float64, seed=seed * 100 + i)
            rewards = torch.cat([rewards, torch.tensor([NAN, NAN], dtype=torch.float64)])
            offsets = torch.cat([offsets, offsets[-1:], offsets[-1:] + 2])
            groups, num_groups = dict(offsets=offsets), 9
        keys = torch.randint(0, num_keys, (num_groups,), generator=gen)
        keys[1] = keys[0]
        keys[-1] = keys[0]
        yield rewards.to(dtype), groups, keys


def assert_keyed_state(est, ref, rtol):
    assert est.key_count.tolist() == ref.key_count
    for name in ("key_mean", "key_var"):
        torch.testing.assert_close(getattr(est, name).cpu(),
                                   torch.tensor(getattr(ref, name), dtype=torch.float64),
                                   rtol=rtol, atol=rtol, msg=lambda m, name=name: f"{name}: {m}")
    assert_history(est, ref, rtol)


KEYED_TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4),
             torch.float16: (1e-5, None), torch.bfloat16: (1e-5, None)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("key_min_history", (1, 2, 3))
def test_keyed_estimator_matches_reference(key_min_history, scale, dtype):
    settings = dict(num_keys=6, key_ema_decay=0.4, key_min_history=key_min_history, **KEYED)
    est = bv_blend_ext.BVBlend(**settings, scale=scale)
    ref = reference.KeyedHistoryReference(**settings)
    # Fed the estimator's own group means, so its state can be compared tightly.
    mirror = reference.KeyedHistoryReference(**settings)
    state_tol, advantage_atol = KEYED_TOL[dtype]
    for rewards, groups, keys in keyed_calls(dtype, num_keys=6, seed=key_min_history):
        want_h, want_u = ref.group_history(keys)
        got = est.step(rewards, **groups, keys=keys)
        want = ref.step(rewards, **groups, keys=keys, scale=scale)
        assert got.history_mean.dtype == torch.float64 and got.history_mean.shape == keys.shape
        torch.testing.assert_close(got.history_mean, want_h, rtol=state_tol, atol=state_tol)
        torch.testing.assert_close(got.history_var, want_u, rtol=state_tol, atol=state_tol)
        assert_blend_close(reference.BlendOutput(*got[:4]), want, dtype,
                           advantage_atol=advantage_atol)
        mirror.push_keys(got.group_mean, keys)
        mirror.push(got.group_mean)
        assert_keyed_state(est, mirror, 1e-12)
    assert_keyed_state(est, ref, state_tol)
    assert int(est.key_count.max()) >= 3


def test_keyed_key_update_is_bitwise_the_sequential_definition():
    # Python floats are float64 rounded operation by operation: the definition itself.
    gen = torch.Generator().manual_seed(7)
    est = bv_blend_ext.BVBlend(num_keys=50, key_ema_decay=0.3)
    mirror = reference.KeyedHistoryReference(50, key_ema_decay=0.3)
    for _ in range(4):
        means = torch.randn(300, generator=gen, dtype=torch.float64)
        means[::9] = NAN
        keys = torch.randint(0, 50, (300,), generator=gen)
        OPS.update_keyed_history(means, keys, est.key_count, est.key_mean, est.key_var,
                                 est.key_alpha, est.ring, est.count, est.ema, est.var, est.alpha,
                                 est.min_history)
        mirror.push_keys(means, keys)
    assert est.key_count.tolist() == mirror.key_count
    assert torch.equal(bits(est.key_mean), bits(torch.tensor(mirror.key_mean, dtype=torch.float64)))
    assert torch.equal(bits(est.key_var), bits(torch.tensor(mirror.key_var, dtype=torch.float64)))


@pytest.mark.parametrize("groups", (5000, 70_000))  # the sequential and the key-range update
def test_keyed_update_is_thread_count_independent(groups):
    gen = torch.Generator().manual_seed(8)
    means = torch.rand(groups, generator=gen, dtype=torch.float64)
    means[torch.rand(groups, generator=gen) < 0.1] = NAN
    keys = torch.randint(-3, 1003, (groups,), generator=gen)  # duplicates, and some out of range

    def updated_state():
        est = bv_blend_ext.BVBlend(num_keys=1000)
        for _ in range(2):
            OPS.update_keyed_history(means, keys, est.key_count, est.key_mean, est.key_var,
                                     est.key_alpha, est.ring, est.count, est.ema, est.var,
                                     est.alpha, est.min_history)
        return est.state_dict()

    states = per_thread_count(updated_state)
    assert not differing_bits(*states)
    mirror = reference.KeyedHistoryReference(1000)
    for _ in range(2):
        mirror.push_keys(means, keys)
    assert states[0]["key_count"].tolist() == mirror.key_count
    assert torch.equal(bits(states[0]["key_mean"]),
                       bits(torch.tensor(mirror.key_mean, dtype=torch.float64)))


def test_out_of_range_keys_validated_or_ignored():
    est = bv_blend_ext.BVBlend(num_keys=4, key_min_history=1, **KEYED)
    ref = reference.KeyedHistoryReference(4, key_min_history=1, **KEYED)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.25, 1.0, 0.75, 0.0])
    est(rewards, group_size=2, keys=torch.tensor([0, 1, 2, 3]))
    ref.step(rewards, 2, keys=torch.tensor([0, 1, 2, 3]))
    for bad in ([0, 4, 1, 2], [-1, 0, 1, 2], [0, 1, 2, 2**62]):
        before = state_of(est)
        with raises_naming("keys", ValueError) as error:
            est(rewards, group_size=2, keys=torch.tensor(bad))
        assert str(max(bad) if max(bad) >= 4 else min(bad)) in str(error.value)
        assert_same_state(before, est)
    # Unvalidated: out-of-range keys read no table (their groups blend with the global history)
    # and update none.
    keys = torch.tensor([-(2**63), 3, 2**63 - 1, 5])
    global_mean, global_var = float(est.history_mean), float(est.history_var)
    got = est.step(rewards + 0.5, group_size=2, keys=keys, validate=False)
    want_h, want_u = ref.group_history(keys)
    want = ref.step(rewards + 0.5, 2, keys=keys)
    torch.testing.assert_close(got.history_mean, want_h)
    torch.testing.assert_close(got.history_var, want_u)
    for g in (0, 2, 3):
        assert (float(got.history_mean[g]), float(got.history_var[g])) == (global_mean, global_var)
    torch.testing.assert_close(got.advantages, want.advantages)
    assert_keyed_state(est, ref, 1e-6)


BAD_KEYS = {
    "missing": None,
    "float": torch.tensor([0.0, 1.0]),
    "int32": torch.tensor([0, 1], dtype=torch.int32),
    "too few": torch.tensor([0]),
    "too many": torch.tensor([0, 1, 2]),
    "2-D": torch.tensor([[0, 1]]),
    "a list": [0, 1],
    "another device": torch.tensor([0, 1], device="meta"),
}


@pytest.mark.parametrize("case", BAD_KEYS)
def test_bad_keys_are_rejected_naming_keys_without_state_change(case):
    est = bv_blend_ext.BVBlend(num_keys=4)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    est(rewards, group_size=2, keys=torch.tensor([0, 1]))
    before = state_of(est)
    with raises_naming("keys", ValueError):
        est.step(rewards, group_size=2, keys=BAD_KEYS[case])
    assert_same_state(before, est)


def test_large_key_tables_are_plain_tensors():
    """Records of more than a huge page live in their own mapping (module.key_records); the
    tables of the state_dict must still be zeroed, contiguous (K,) tensors whose storage, which
    torch.save writes whole, holds exactly their elements."""
    num_keys = 300_000  # 2.4 MB per table
    est = bv_blend_ext.BVBlend(num_keys=num_keys)
    for name in ("key_count", "key_mean", "key_var"):
        table = est.state_dict()[name]
        assert table.shape == (num_keys,) and table.is_contiguous()
        assert table.storage_offset() == 0
        assert table.untyped_storage().nbytes() == num_keys * table.element_size()
        assert not table.any()
    est(torch.tensor([1.0, 0.0, 0.5, 0.25]), group_size=2, keys=torch.tensor([5, num_keys - 1]))
    saved = io.BytesIO()
    torch.save(est.state_dict(), saved)
    assert saved.tell() < 3.1 * num_keys * 8
    other = bv_blend_ext.BVBlend(num_keys=num_keys)
    other.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))
    assert_same_state(state_of(est), other)
    est.reset()
    assert not est.key_count.any() and not est.key_mean.any()


def test_keys_given_to_an_unkeyed_estimator_are_rejected():
    est = bv_blend_ext.BVBlend()
    with raises_naming("keys", ValueError):
        est(torch.tensor([1.0, 0.0]), group_size=2, keys=torch.tensor([0]))
    assert int(est.count) == 0


BAD_SETTINGS = {
    "num_keys 0": (dict(num_keys=0), "num_keys"),
    "num_keys float": (dict(num_keys=2.0), "num_keys"),
    "num_keys bool": (dict(num_keys=True), "num_keys"),
    "key_ema_decay 0": (dict(num_keys=3, key_ema_decay=0.0), "key_ema_decay"),
    "key_ema_decay above 1": (dict(num_keys=3, key_ema_decay=1.5), "key_ema_decay"),
    "key_ema_decay a string": (dict(num_keys=3, key_ema_decay="0.1"), "key_ema_decay"),
    "key_min_history 0": (dict(num_keys=3, key_min_history=0), "key_min_history"),
    "key_min_history float": (dict(num_keys=3, key_min_history=2.0), "key_min_history"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_keyed_settings(case):
    kwargs, argument = BAD_SETTINGS[case]
    with raises_naming(argument, ValueError):
        bv_blend_ext.BVBlend(**kwargs)
    base = dict(window=4, ema_decay=None, initial_baseline=0.0, min_history=2, eps=1e-4,
                scale="blend")
    with raises_naming(f"bv_{argument}", ValueError):
        bv_blend_ext.check_settings(**base, **kwargs, prefix="bv_")


def test_keyed_settings_repr_buffers_casts_and_reset():
    est = bv_blend_ext.BVBlend(num_keys=3, key_ema_decay=0.5, key_min_history=4)
    assert "num_keys=3" in repr(est) and "key_ema_decay=0.5" in repr(est)
    assert "key_min_history=4" in repr(est)
    assert "num_keys" not in repr(bv_blend_ext.BVBlend())
    assert bv_blend_ext.BVBlend().num_keys is None
    est(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2, keys=torch.tensor([0, 0]))
    est.half()
    dtypes = {name: t.dtype for name, t in est.state_dict().items()}
    assert dtypes == {"ring": torch.float64, "count": torch.int64, "ema": torch.float64,
                      "var": torch.float64, "key_count": torch.int64, "key_mean": torch.float64,
                      "key_var": torch.float64}
    assert est.key_count.tolist() == [2, 0, 0]
    est.reset()
    assert not est.key_count.any() and not est.key_mean.any() and not est.key_var.any()


def test_key_tables_are_views_of_one_record_per_key():
    """The estimator's live tables are the columns of its (K, 4) key_records buffer, which
    nn.Module moves and casts; the state_dict holds the three tables as fresh contiguous copies,
    in the format of a state saved before the records existed."""
    est = bv_blend_ext.BVBlend(num_keys=6, key_ema_decay=0.25, key_min_history=1)
    est(torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0, 2.0]), group_size=2, keys=torch.tensor([4, 1, 4]))
    records = dict(est.named_buffers())["key_records"]
    assert records.shape == (6, 4) and records.dtype == torch.int64
    assert "key_records" not in est.state_dict()
    for name, column in (("key_count", 0), ("key_mean", 1), ("key_var", 2)):
        table = getattr(est, name)
        assert table.data_ptr() == records[:, column].data_ptr() and table.stride() == (4,)
        saved = est.state_dict()[name]
        assert saved.is_contiguous() and saved.data_ptr() != table.data_ptr()
        assert torch.equal(bits(saved), bits(table))
    assert est.key_count.tolist() == [0, 1, 0, 0, 2, 0]
    assert est.key_mean.tolist() == [0.0, 0.375, 0.0, 0.0, 0.5 + 0.25 * 1.5, 0.0]
    for copy in (__import__("copy").deepcopy(est), torch.load(io.BytesIO(_saved(est)),
                                                               weights_only=False)):
        assert_same_state(state_of(est), copy)
        copy(torch.tensor([3.0, 3.0]), group_size=2, keys=torch.tensor([1]))
        assert copy.key_count[1] == 2 and est.key_count[1] == 1
        assert copy.key_count.data_ptr() == copy._buffers["key_records"].data_ptr()
    with pytest.raises(AttributeError, match="key_count"):
        bv_blend_ext.BVBlend().key_count


def _saved(module):
    out = io.BytesIO()
    torch.save(module, out)
    return out.getvalue()


def test_keyed_state_dict_missing_or_unexpected_entries():
    est = bv_blend_ext.BVBlend(num_keys=3)
    est(torch.tensor([1.0, 0.0]), group_size=2, keys=torch.tensor([2]))
    state = est.state_dict()
    other = bv_blend_ext.BVBlend(num_keys=3)
    partial = {name: value for name, value in state.items() if name != "key_var"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*key_var"):
        other.load_state_dict(partial)
    result = other.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["key_var"] and result.unexpected_keys == []
    assert other.key_count.tolist() == [0, 0, 1]
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*key_records"):
        other.load_state_dict({**state, "key_records": torch.zeros(3, 4, dtype=torch.int64)})
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*key_count"):
        bv_blend_ext.BVBlend().load_state_dict(state)


def test_keyed_state_dict_round_trip():
    est = bv_blend_ext.BVBlend(num_keys=5, **KEYED)
    for rewards, groups, keys in keyed_calls(torch.float32, num_keys=5):
        est(rewards, **groups, keys=keys)
    copy = bv_blend_ext.BVBlend(num_keys=5, **KEYED)
    copy.load_state_dict(est.state_dict())
    assert_same_state(state_of(est), copy)
    rewards, groups, keys = next(keyed_calls(torch.float32, num_keys=5, seed=9))
    assert torch.equal(est(rewards, **groups, keys=keys), copy(rewards, **groups, keys=keys))


CORRUPTED = {
    "key_count wrong length": ("key_count", torch.zeros(4, dtype=torch.int64)),
    "key_count negative": ("key_count", torch.tensor([0, -1, 0, 0, 0])),
    "key_count float": ("key_count", torch.zeros(5)),
    "key_mean nan": ("key_mean", torch.tensor([0.0, NAN, 0.0, 0.0, 0.0], dtype=torch.float64)),
    "key_mean int": ("key_mean", torch.zeros(5, dtype=torch.int64)),
    "key_var negative": ("key_var", torch.tensor([0.0, 0.0, -1.0, 0.0, 0.0])),
    "key_var inf": ("key_var", torch.tensor([0.0, 0.0, INF, 0.0, 0.0])),
    "key_var 2-D": ("key_var", torch.zeros(5, 1, dtype=torch.float64)),
}


@pytest.mark.parametrize("case", CORRUPTED)
def test_corrupted_key_state_is_rejected_leaving_the_estimator_unchanged(case):
    name, value = CORRUPTED[case]
    est = bv_blend_ext.BVBlend(num_keys=5)
    est(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2, keys=torch.tensor([1, 3]))
    before = state_of(est)
    state = est.state_dict()
    state[name] = value
    with raises_naming(name, ValueError):
        est.load_state_dict(state)
    assert_same_state(before, est)


def test_keyed_gradient_flows_with_the_pre_call_history():
    est = bv_blend_ext.BVBlend(num_keys=3, key_min_history=1)
    est(torch.tensor([1.0, 0.0, 0.5, 0.75]), group_size=2, keys=torch.tensor([0, 1]))
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.7], dtype=torch.float64, requires_grad=True)
    keys = torch.tensor([0, 0])
    step = est.step(rewards, group_size=2, keys=keys)
    (grad,) = torch.autograd.grad(step.advantages.sum(), rewards)
    want = reference.blend_advantages(rewards, 2, hist_mean=step.history_mean,
                                      hist_var=step.history_var)
    (want_grad,) = torch.autograd.grad(want.advantages.sum(), rewards)
    torch.testing.assert_close(grad, want_grad)


# 3. The ops as library citizens -----------------------------------------------------------------

def key_tables(num_keys=5):
    return (torch.tensor([0, 3, 1, 2, 5])[:num_keys],
            torch.tensor([0.0, 0.5, -0.25, 1.0, 2.0], dtype=torch.float64)[:num_keys],
            torch.tensor([0.0, 0.3, 0.1, 0.0, 0.7], dtype=torch.float64)[:num_keys])


def test_opcheck_keyed_ops():
    keys = torch.tensor([1, 4, 1, 0, 2, 9, -1])
    history = (torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64))
    torch.library.opcheck(OPS.keyed_history.default, (keys, *key_tables(), *history, 2))
    means = torch.tensor([0.5, NAN, 1.5, -0.5, 2.0, 0.0, 1.0])
    ring = torch.tensor([0.5, 1.5, 0.0, 0.0], dtype=torch.float64)
    state = (ring, torch.tensor(2), *history)
    torch.library.opcheck(OPS.update_keyed_history.default,
                          (means, keys, *key_tables(), 0.25, *state, 0.3, 2))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ("fixed", "ragged"))
def test_keyed_group_advantages_is_the_gather_then_the_blend(layout, scale):
    rewards = torch.tensor([0.3, NAN, -0.4, 2.2, 0.9, 1.1, -1.5, 0.2], dtype=torch.float64,
                           requires_grad=True)
    offsets, group_size = (None, 4) if layout == "fixed" else (torch.tensor([0, 3, 4, 8]), 0)
    keys = torch.tensor([1, 4]) if layout == "fixed" else torch.tensor([1, 7, 3])
    history = (torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64))
    args = (rewards, offsets, group_size, keys, *key_tables(), *history, 2, 1e-4, scale)
    fused = OPS.keyed_group_advantages(*args)
    h, u = OPS.keyed_history(keys, *key_tables(), *history, 2)
    apart = OPS.group_advantages(rewards, offsets, group_size, h, u, 1e-4, scale)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(fused, (*apart, h, u)))
    torch.library.opcheck(OPS.keyed_group_advantages.default, args)
    torch.autograd.gradcheck(lambda r: OPS.keyed_group_advantages(r, *args[1:])[0], (rewards,))
    with raises_naming("keys"):
        OPS.keyed_group_advantages(rewards, offsets, group_size, keys[:1], *args[4:])


def keyed_state(num_keys=5):
    """A keyed step's mutable state: the key tables, then ring, count, ema and var."""
    return [*key_tables(num_keys), torch.tensor([0.5, 1.5, 0.0, 0.0], dtype=torch.float64),
            torch.tensor(2), torch.tensor(0.2, dtype=torch.float64),
            torch.tensor(0.6, dtype=torch.float64)]


def keyed_step_args(rewards, offsets, group_size, keys, state, scale="blend", validate=True):
    count, mean, var, ring, pushed, ema, global_var = state
    return (rewards, offsets, group_size, keys, count, mean, var, 0.25, 2, ring, pushed, ema,
            global_var, 0.3, 2, 1e-4, scale, validate)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ("fixed", "ragged"))
def test_keyed_step_is_the_keyed_forward_then_the_keyed_update(layout, scale):
    rewards = torch.tensor([0.3, NAN, -0.4, 2.2, 0.9, 1.1, -1.5, 0.2, NAN, NAN, 0.7, 0.1],
                           requires_grad=True)
    offsets, group_size = ((None, 2) if layout == "fixed" else
                           (torch.tensor([0, 3, 4, 8, 10, 10, 12]), 0))
    keys = torch.tensor([1, 4, 1, 0, 9, -1])  # a duplicate, and two outside [0, 5)
    fused, apart = keyed_state(), keyed_state()
    got = OPS.keyed_step(*keyed_step_args(rewards, offsets, group_size, keys, fused, scale,
                                          validate=False))
    count, mean, var, ring, pushed, ema, global_var = apart
    want = OPS.keyed_group_advantages(rewards, offsets, group_size, keys, count, mean, var, ema,
                                      global_var, 2, 1e-4, scale)
    OPS.update_keyed_history(want[1], keys, count, mean, var, 0.25, ring, pushed, ema,
                             global_var, 0.3, 2)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, want))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(fused, apart))
    (grad,) = torch.autograd.grad(got[0].sum(), rewards)
    (want_grad,) = torch.autograd.grad(want[0].sum(), rewards)
    assert torch.equal(bits(grad), bits(want_grad))
    # (opcheck compares outputs without equal_nan: no group without a valid reward here.)
    valid = rewards.detach().nan_to_num(0.5).requires_grad_()
    nonempty = None if offsets is None else torch.tensor([0, 3, 4, 8, 10, 11, 12])
    torch.library.opcheck(OPS.keyed_step.default,
                          keyed_step_args(valid, nonempty, group_size, keys, keyed_state(), scale,
                                          validate=False))


def test_keyed_ops_take_tables_of_any_shared_stride():
    """Contiguous tables and the columns of one record per key give the same bits; tables whose
    strides differ, or repeat one entry, are rejected naming them."""
    rewards = torch.tensor([0.3, NAN, -0.4, 2.2, 0.9, 1.1, -1.5, 0.2, 0.4, 0.6, 0.7, 0.1])
    keys = torch.tensor([1, 4, 1, 0, 9, 3])
    apart = keyed_state()
    records = torch.zeros(5, 4, dtype=torch.int64)
    records[:, 0] = apart[0]
    records[:, 1:3] = torch.stack(apart[1:3], 1).view(torch.int64)
    strided = [*bv_blend_ext.module.key_tables(records), *(t.clone() for t in apart[3:])]
    want = OPS.keyed_step(*keyed_step_args(rewards, None, 2, keys, apart, validate=False))
    got = OPS.keyed_step(*keyed_step_args(rewards, None, 2, keys, strided, validate=False))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, want))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(strided, apart))
    assert records[:, 3].eq(0).all()
    history = (torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(
        OPS.keyed_history(keys, *strided[:3], *history, 2),
        OPS.keyed_history(keys, *apart[:3], *history, 2)))
    count, mean, var = key_tables()
    pairs = torch.zeros(6, 2, dtype=torch.int64)  # stride 2: the variances on the next counts
    for tables in ((strided[0], mean, var), (count, mean, torch.zeros(1, dtype=torch.float64)
                                             .expand(5)),
                   (count, mean, mean),
                   (pairs[:5, 0], pairs[:5, 1].view(torch.float64),
                    pairs[1:, 0].view(torch.float64))):
        with raises_naming("key_count|key_mean|key_var", ValueError):
            OPS.keyed_history(keys, *tables, *history, 2)
    interleaved = torch.zeros(5, 3, dtype=torch.int64)  # no word shared: accepted
    OPS.keyed_history(keys, interleaved[:, 0], interleaved[:, 1].view(torch.float64),
                      interleaved[:, 2].view(torch.float64), *history, 2)


KEYED_STEP_BAD = {
    "key above": (dict(keys=torch.tensor([0, 5, 1])), "keys"),
    "key below": (dict(keys=torch.tensor([-1, 0, 1])), "keys"),
    "offsets start": (dict(offsets=torch.tensor([1, 3, 4, 6])), "offsets"),
    "offsets end": (dict(offsets=torch.tensor([0, 3, 4, 5])), "offsets"),
    "offsets decrease": (dict(offsets=torch.tensor([0, 4, 3, 6])), "offsets"),
    "keys short": (dict(keys=torch.tensor([0, 1])), "keys"),
    "ring float32": (dict(ring=torch.zeros(4)), "ring"),
    "key_alpha": (dict(key_alpha=0.0), "key_alpha|key_ema_decay"),
}


@pytest.mark.parametrize("case", KEYED_STEP_BAD)
def test_keyed_step_checks_and_validates_before_writing(case):
    state = keyed_state()
    names = ("key_count", "key_mean", "key_var", "ring", "count", "ema", "var")
    args = dict(zip(("rewards", "offsets", "group_size", "keys"),
                    (torch.arange(6.0), torch.tensor([0, 3, 4, 6]), 0, torch.tensor([0, 4, 1]))))
    args.update(zip(names, state))
    args.update(key_alpha=0.25, key_min_history=2, alpha=0.3, min_history=2, eps=1e-4,
                scale="blend", validate=True)
    before = [t.clone() for t in state]
    changes, argument = KEYED_STEP_BAD[case]
    with raises_naming(argument):
        OPS.keyed_step(**{**args, **changes})
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(state, before))
    if case.startswith(("key ", "offsets")):  # values: unvalidated, the step runs
        OPS.keyed_step(**{**args, **changes, "validate": False})


@pytest.mark.parametrize("layout", ("fixed", "ragged"))
def test_opcheck_group_advantages_with_per_group_history(layout):
    rewards = torch.tensor([0.3, NAN, -0.4, 2.2, 0.9, 1.1, -1.5, 0.2], requires_grad=True)
    offsets, group_size = (None, 4) if layout == "fixed" else (torch.tensor([0, 3, 4, 8]), 0)
    num_groups = 2 if layout == "fixed" else 3
    h, u = per_group_history(num_groups, seed=6)
    torch.library.opcheck(OPS.group_advantages.default,
                          (rewards, offsets, group_size, h, u, 1e-4, "blend"))


RAW_BAD = {
    "keys int32": (dict(keys=torch.tensor([0, 1], dtype=torch.int32)), "keys"),
    "key_count float": (dict(key_count=torch.zeros(5)), "key_count"),
    "key_var short": (dict(key_var=torch.zeros(4, dtype=torch.float64)), "key_var"),
    "hist_mean (G,)": (dict(hist_mean=torch.zeros(2, dtype=torch.float64)), "hist_mean"),
    "key_min_history 0": (dict(key_min_history=0), "key_min_history"),
}


@pytest.mark.parametrize("case", RAW_BAD)
def test_raw_keyed_history_checks_its_arguments(case):
    count, mean, var = key_tables()
    args = dict(keys=torch.tensor([0, 1]), key_count=count, key_mean=mean, key_var=var,
                hist_mean=torch.tensor(0.0, dtype=torch.float64),
                hist_var=torch.tensor(0.0, dtype=torch.float64), key_min_history=2)
    changes, argument = RAW_BAD[case]
    with raises_naming(argument):
        OPS.keyed_history(**{**args, **changes})


def test_raw_keyed_update_checks_before_writing():
    est = bv_blend_ext.BVBlend(num_keys=5)
    before = state_of(est)
    for keys, argument in ((torch.tensor([0, 1, 2]), "keys"),
                           (torch.tensor([0.0, 1.0]), "keys")):
        with raises_naming(argument):
            OPS.update_keyed_history(torch.tensor([1.0, 2.0]), keys, est.key_count, est.key_mean,
                                     est.key_var, 0.25, est.ring, est.count, est.ema, est.var,
                                     est.alpha, est.min_history)
    with raises_naming("key_alpha|key_ema_decay"):
        OPS.update_keyed_history(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), est.key_count,
                                 est.key_mean, est.key_var, 0.0, est.ring, est.count, est.ema,
                                 est.var, est.alpha, est.min_history)
    assert_same_state(before, est)


@pytest.mark.slow
def test_compile_keyed_step_fullgraph():
    settings = dict(num_keys=7, key_min_history=1, **KEYED)
    eager, compiled_est = bv_blend_ext.BVBlend(**settings), bv_blend_ext.BVBlend(**settings)

    def step(est, rewards, keys):
        out = est.step(rewards, group_size=4, keys=keys)
        return out.advantages * 2, out.history_mean

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    gen = torch.Generator().manual_seed(12)
    for _ in range(4):
        rewards = torch.randn(24, generator=gen)
        keys = torch.randint(0, 7, (6,), generator=gen)
        want = step(eager, rewards, keys)
        got = compiled(compiled_est, rewards, keys)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert_same_state(state_of(eager), compiled_est)
    assert int(compiled_est.key_count.max()) >= 2


# 4. CUDA ---------------------------------------------------------------------------------------

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("ragged", 16))
def test_cuda_per_group_history_parity(layout, dtype):
    if layout == "ragged":
        rewards, offsets = ragged_rewards(500, 20, dtype, seed=20)
        group_size, num_groups = None, 500
    else:
        rewards = (torch.rand(16 * 300, generator=torch.Generator().manual_seed(21)) * 3).to(dtype)
        offsets, group_size, num_groups = None, 16, 300
    h, u = per_group_history(num_groups, seed=22, unusable=True)
    want = bv_blend_ext.blend_advantages(rewards, group_size, offsets=offsets, hist_mean=h,
                                         hist_var=u, validate=False)
    got = bv_blend_ext.blend_advantages(
        rewards.cuda(), group_size, offsets=None if offsets is None else offsets.cuda(),
        hist_mean=h.cuda(), hist_var=u.cuda(), validate=False)
    assert_blend_close(got, want, dtype, advantage_atol=1e-4 if dtype == torch.float32 else None)
    # One value per group gives the scalar's bits on the GPU too.
    scalar = bv_blend_ext.blend_advantages(rewards.cuda(), group_size,
                                           offsets=None if offsets is None else offsets.cuda(),
                                           hist_mean=torch.tensor(0.3, device="cuda"),
                                           hist_var=torch.tensor(0.2, device="cuda"))
    full = bv_blend_ext.blend_advantages(rewards.cuda(), group_size,
                                         offsets=None if offsets is None else offsets.cuda(),
                                         hist_mean=torch.full((num_groups,), 0.3, device="cuda"),
                                         hist_var=torch.full((num_groups,), 0.2, device="cuda"))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(scalar, full))


def cuda_keyed_calls(num_calls=5, num_groups=3000, num_keys=500, seed=30):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num_calls):
        rewards = torch.randn(num_groups * 8, generator=gen)
        rewards[torch.rand(rewards.shape, generator=gen) < 0.05] = NAN
        rewards[:8] = NAN  # a group that visits no key
        keys = torch.randint(0, num_keys, (num_groups,), generator=gen)
        keys[::3] = keys[0]  # a long run of one key
        yield rewards, keys


@pytest.mark.cuda
@needs_cuda
def test_cuda_keyed_step_matches_cpu():
    settings = dict(num_keys=500, key_min_history=2, **KEYED)
    cpu, gpu = bv_blend_ext.BVBlend(**settings), bv_blend_ext.BVBlend(**settings).cuda()
    for rewards, keys in cuda_keyed_calls():
        keys[5], keys[7] = -1, 2**40  # unvalidated: their groups use the global history
        want = cpu.step(rewards, group_size=8, keys=keys, validate=False)
        got = gpu.step(rewards.cuda(), group_size=8, keys=keys.cuda(), validate=False)
        for name in ("history_mean", "history_var"):
            torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name),
                                       rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.advantages.cpu(), want.advantages, rtol=1e-4, atol=1e-3)
        for name, value in cpu.state_dict().items():
            torch.testing.assert_close(gpu.state_dict()[name].cpu(), value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
    # The same group means give the CPU's key tables bit for bit (visit_key rounds every
    # operation on its own on both devices; the global EMA is summed differently).
    cpu_est, gpu_est = bv_blend_ext.BVBlend(**settings), bv_blend_ext.BVBlend(**settings).cuda()
    gen = torch.Generator().manual_seed(31)
    for _ in range(3):
        means = torch.randn(5000, generator=gen, dtype=torch.float64)
        means[::17] = NAN
        update_on_both_devices(cpu_est, gpu_est, means,
                               torch.randint(-5, 505, (5000,), generator=gen))
    assert_same_key_update_bits(cpu_est, gpu_est)
    torch.testing.assert_close(gpu_est.ema.cpu(), cpu_est.ema, rtol=1e-12, atol=1e-12)


def update_on_both_devices(cpu_est, gpu_est, means, keys):
    """update_keyed_history with the same group means and keys on each estimator's device."""
    for est, device in ((cpu_est, "cpu"), (gpu_est, "cuda")):
        OPS.update_keyed_history(means.to(device), keys.to(device), est.key_count, est.key_mean,
                                 est.key_var, est.key_alpha, est.ring, est.count, est.ema,
                                 est.var, est.alpha, est.min_history)


def assert_same_key_update_bits(cpu_est, gpu_est):
    """The key tables and the ring bit for bit (the global EMA is summed differently)."""
    for name in ("key_count", "key_mean", "key_var", "ring", "count"):
        assert torch.equal(bits(getattr(cpu_est, name)), bits(getattr(gpu_est, name).cpu())), name


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("num_groups", (1, 1023, 1025, 8192, 8193, 20000))
def test_cuda_keyed_update_matches_cpu_bitwise_on_both_paths(num_groups):
    """Up to 8192 groups the keyed update is one block sorting 1024 groups at a time, above it a
    device-wide sort: either way a key's visits apply in group order, within and across chunks,
    and give the CPU's tables bit for bit."""
    cpu_est = bv_blend_ext.BVBlend(num_keys=37, **KEYED)
    gpu_est = bv_blend_ext.BVBlend(num_keys=37, **KEYED).cuda()
    gen = torch.Generator().manual_seed(num_groups)
    for _ in range(2):
        means = torch.randn(num_groups, generator=gen, dtype=torch.float64)
        means[1::13] = NAN
        keys = torch.randint(-2, 39, (num_groups,), generator=gen)  # duplicates, some outside
        update_on_both_devices(cpu_est, gpu_est, means, keys)
    assert_same_key_update_bits(cpu_est, gpu_est)


@pytest.mark.cuda
@needs_cuda
def test_cuda_keyed_step_is_two_launches():
    """The keyed step of the estimator on CUDA at 1024 groups (validate=False, as in a captured
    graph): the forward, which gathers each group's history from its key, and the one-block
    update of the keys and the global history."""
    profiler = pytest.importorskip("torch.profiler")
    est = bv_blend_ext.BVBlend(num_keys=10_000, **KEYED).cuda()
    calls = [(r.cuda(), k.cuda()) for r, k in cuda_keyed_calls(num_calls=3, num_groups=1024,
                                                                num_keys=10_000)]
    est(calls[0][0], group_size=8, keys=calls[0][1], validate=False)
    torch.cuda.synchronize()
    with profiler.profile(activities=[profiler.ProfilerActivity.CUDA]) as prof:
        for rewards, keys in calls[1:]:
            est(rewards, group_size=8, keys=keys, validate=False)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    assert len(kernels) == 2 * (len(calls) - 1), kernels


@pytest.mark.cuda
@needs_cuda
def test_cuda_keyed_step_op_is_the_two_ops_and_validates():
    """keyed_step on CUDA: the forward and update launches of the two ops, bit for bit, and with
    validate the checks of the values (one transfer) before any state changes."""
    rewards, keys = next(cuda_keyed_calls(num_calls=1, num_groups=300, num_keys=5))
    rewards, keys = rewards.cuda(), keys.cuda()
    fused = [t.cuda() for t in keyed_state()]
    apart = [t.cuda() for t in keyed_state()]
    got = OPS.keyed_step(*keyed_step_args(rewards, None, 8, keys, fused))
    count, mean, var, ring, pushed, ema, global_var = apart
    want = OPS.keyed_group_advantages(rewards, None, 8, keys, count, mean, var, ema, global_var,
                                      2, 1e-4, "blend")
    OPS.update_keyed_history(want[1], keys, count, mean, var, 0.25, ring, pushed, ema,
                             global_var, 0.3, 2)
    assert all(torch.equal(bits(a.cpu()), bits(b.cpu())) for a, b in zip(got, want))
    assert all(torch.equal(bits(a.cpu()), bits(b.cpu())) for a, b in zip(fused, apart))
    for case in ("key above", "key below", "offsets start", "offsets end", "offsets decrease"):
        changes, argument = KEYED_STEP_BAD[case]
        offsets = changes.get("offsets", torch.tensor([0, 3, 4, 6])).cuda()
        bad_keys = changes.get("keys", torch.tensor([0, 4, 1])).cuda()
        state = [t.cuda() for t in keyed_state()]
        before = [t.clone() for t in state]
        with raises_naming(argument, ValueError):
            OPS.keyed_step(*keyed_step_args(torch.arange(6.0, device="cuda"), offsets, 0,
                                            bad_keys, state))
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(state, before))


@pytest.mark.cuda
@needs_cuda
def test_cuda_keyed_step_is_deterministic():
    runs = []
    for _ in range(2):
        est = bv_blend_ext.BVBlend(num_keys=500, **KEYED).cuda()
        outputs = [bits(est.step(r.cuda(), group_size=8, keys=k.cuda()).advantages)
                   for r, k in cuda_keyed_calls(num_groups=20000)]
        runs.append((outputs, {n: bits(v) for n, v in est.state_dict().items()}))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_capture_and_replay_of_the_keyed_step():
    settings = dict(num_keys=64, key_min_history=1, **KEYED)
    est = bv_blend_ext.BVBlend(**settings).cuda()
    cpu = bv_blend_ext.BVBlend(**settings)
    calls = list(cuda_keyed_calls(num_calls=6, num_groups=40, num_keys=64, seed=32))
    static_rewards = torch.zeros(calls[0][0].shape, device="cuda")
    static_keys = torch.zeros(calls[0][1].shape, dtype=torch.int64, device="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for rewards, keys in calls[:2]:
            static_rewards.copy_(rewards)
            static_keys.copy_(keys)
            est(static_rewards, group_size=8, keys=static_keys, validate=False)
            cpu(rewards, group_size=8, keys=keys)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = est(static_rewards, group_size=8, keys=static_keys, validate=False)
    for rewards, keys in calls[2:]:
        static_rewards.copy_(rewards)
        static_keys.copy_(keys)
        graph.replay()
        want = cpu(rewards, group_size=8, keys=keys)
        torch.testing.assert_close(static_out.cpu(), want, rtol=1e-4, atol=1e-3)
        for name, value in cpu.state_dict().items():
            torch.testing.assert_close(est.state_dict()[name].cpu(), value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
