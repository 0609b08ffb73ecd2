"""BVBlend: the stateful estimator. Its history lives in buffers on the rewards' device, so a
step runs without host synchronisation and can be captured in a CUDA graph."""

from __future__ import annotations

import math
import mmap
from numbers import Real
from typing import NamedTuple

import torch

from . import functional
from .functional import check_call, check_eps, check_values
from .reference import (DEFAULT_KEY_EMA_DECAY, DEFAULT_SCALE, SCALE_MODES, BlendOutput,
                        default_ema_decay)

HISTORY_BUFFERS = ("ring", "count", "ema", "var")
KEY_TABLES = ("key_count", "key_mean", "key_var")
# A key's record: its count (int64), the bits of its two moments (float64) and a spare word, so
# that records of 32 bytes never straddle a 64-byte cache line.
KEY_RECORD_WORDS = 4
HUGE_PAGE = 1 << 21  # a transparent huge page where base pages are 4 KiB (x86-64, most arm64)


def key_records(num_keys: int) -> torch.Tensor:
    """The zeroed (num_keys, KEY_RECORD_WORDS) int64 CPU records of the per-key history (see
    key_tables). Keys are typically prompt ids met in random order, so a keyed step visits each
    group's key at a random place in a table of 10^6 keys or more, where nearly every access
    misses the cache. One record per key costs one miss per visit where three separate tables
    cost three: about 6 us of a 30 us step at 1024 groups on the benchmark machine. With 4 KiB
    pages nearly every such access also misses the TLB (about 3 us more), so where the system
    grants transparent huge pages on request (Linux, THP "madvise" or "always"), records of at
    least one huge page live in an anonymous mapping advised for them, their data aligned to one;
    the kernel zeroes the pages as they are first touched."""
    numel = num_keys * KEY_RECORD_WORDS
    nbytes = numel * torch.int64.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(num_keys, KEY_RECORD_WORDS, dtype=torch.int64)
    # Private, like any allocation (a forked process gets a copy on write).
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # no THP in this kernel: the mapping still serves, with base pages
        pass
    start = -torch.frombuffer(mapping, dtype=torch.uint8).data_ptr() % HUGE_PAGE
    records = torch.frombuffer(mapping, dtype=torch.int64, count=numel, offset=start)
    return records.view(num_keys, KEY_RECORD_WORDS)


def key_tables(records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """key_count (int64), key_mean and key_var (float64): (K,) views of the records' first three
    columns, the tables the keyed ops read and write in place (all three with stride
    KEY_RECORD_WORDS)."""
    return (records[:, 0], records[:, 1].view(torch.float64),
            records[:, 2].view(torch.float64))


class BlendStep(NamedTuple):
    """What one BVBlend.step returns."""

    advantages: torch.Tensor  # (N,), dtype of the rewards
    group_mean: torch.Tensor  # (G,); NaN for a group with no valid reward
    group_std: torch.Tensor  # (G,)
    beta: torch.Tensor  # (G,), the history's weight in each group's baseline
    # The H and σ_u² this call blended with: 0-dim float64, or (G,) float64 for a keyed estimator
    # (each group's, from its key or from the global history).
    history_mean: torch.Tensor
    history_var: torch.Tensor


class BVBlend(torch.nn.Module):
    """Blends each group's mean with an EMA of past group means (see README, "The contract").

    Calling it returns the advantages (`step` returns them with every statistic) and then pushes
    every group mean with at least one valid reward into the history, so all groups of a call
    share the pre-call H and σ_u².

    With `num_keys` = K, each call also takes `keys` (G,) int64 in [0, K), a key per group (its
    prompt, say): a group whose key has been visited at least `key_min_history` times blends with
    the key's own EMA moments (m_k, v_k, decay `key_ema_decay`) instead of the global H and σ_u²,
    which every group keeps feeding (reference.KeyedHistoryReference is the specification).
    """

    def __init__(self, window: int = 100, ema_decay: float | None = None,
                 initial_baseline: float = 0.0, min_history: int = 2, eps: float = 1e-4,
                 scale: str = DEFAULT_SCALE, num_keys: int | None = None,
                 key_ema_decay: float = DEFAULT_KEY_EMA_DECAY, key_min_history: int = 2):
        super().__init__()
        check_settings(window=window, ema_decay=ema_decay, initial_baseline=initial_baseline,
                       min_history=min_history, eps=eps, scale=scale, num_keys=num_keys,
                       key_ema_decay=key_ema_decay, key_min_history=key_min_history)
        self.window = window
        self.alpha = default_ema_decay(window) if ema_decay is None else float(ema_decay)
        self.initial_baseline = float(initial_baseline)
        self.min_history = min_history
        self.eps = float(eps)
        self.scale = scale
        self.num_keys = num_keys  # None: a single global history
        self.key_alpha = float(key_ema_decay)
        self.key_min_history = key_min_history
        self.register_buffer("ring", torch.zeros(window, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("ema", torch.tensor(self.initial_baseline, dtype=torch.float64))
        self.register_buffer("var", torch.zeros((), dtype=torch.float64))
        if num_keys is not None:
            # O(K): a count and two EMA moments per key, no ring. The state_dict holds them as the
            # three tables, not as records (see _save_to_state_dict).
            self.register_buffer("key_records", key_records(num_keys), persistent=False)

    @property
    def history_mean(self) -> torch.Tensor:
        """H, the baseline the next call blends in."""
        return self.ema

    @property
    def history_var(self) -> torch.Tensor:
        """σ_u² the next call uses: the ring's unbiased variance, 0 below min_history entries."""
        return self.var

    @property
    def key_count(self) -> torch.Tensor:
        """n_k, visits of each key: (K,) int64, a view of the live state."""
        return self._key_tables(self._keyed_buffer("key_count"))[0]

    @property
    def key_mean(self) -> torch.Tensor:
        """m_k, each key's EMA of its group means: (K,) float64, a view of the live state."""
        return self._key_tables(self._keyed_buffer("key_mean"))[1]

    @property
    def key_var(self) -> torch.Tensor:
        """v_k, each key's EMA variance: (K,) float64, a view of the live state."""
        return self._key_tables(self._keyed_buffer("key_var"))[2]

    def _keyed_buffer(self, wanted: str) -> torch.Tensor:
        if self.num_keys is None:
            raise AttributeError(f"{wanted}: this estimator has no per-key history "
                                 f"(num_keys=None)")
        return self._buffers["key_records"]

    def _key_tables(self, records: torch.Tensor):
        """key_tables(records), made once per records tensor in eager mode: three views cost a
        few microseconds from Python, a tenth of a keyed step. Under torch.compile the views are
        traced from the buffer each time (a buffer that is itself a view of another dtype cannot
        be mutated in a compiled graph)."""
        if torch.compiler.is_compiling():
            return key_tables(records)
        cached = self.__dict__.get("_key_table_views")
        if cached is None or cached[0] is not records:
            cached = (records, *key_tables(records))
            self.__dict__["_key_table_views"] = cached
        return cached[1:]

    def __getstate__(self):
        # The cached views are derived state; pickling them beside the records would write views
        # of one storage with different dtypes, which torch.save refuses.
        state = super().__getstate__().copy()
        state.pop("_key_table_views", None)
        return state

    def reset(self) -> None:
        self.ring.zero_()
        self.count.zero_()
        self.ema.fill_(self.initial_baseline)
        self.var.zero_()
        if self.num_keys is not None:
            self._buffers["key_records"].zero_()

    def step(self, rewards: torch.Tensor, group_size: int | None = None, *,
             offsets: torch.Tensor | None = None, keys: torch.Tensor | None = None,
             validate: bool = True) -> BlendStep:
        """Advantages of one call with everything a trainer logs: the group statistics, β, and
        the H and σ_u² this call blended with (copies: the history has moved on by the return).
        Then the history is updated. `keys`: (G,) int64, required exactly when num_keys is set."""
        out, hist_mean, hist_var = self._blend_then_update(rewards, group_size, offsets, keys,
                                                           validate, return_history=True)
        return BlendStep(*out, hist_mean, hist_var)

    def forward(self, rewards: torch.Tensor, group_size: int | None = None, *,
                offsets: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                validate: bool = True) -> torch.Tensor:
        """The advantages alone (see step for the statistics); then the history is updated."""
        return self._blend_then_update(rewards, group_size, offsets, keys, validate,
                                       return_history=False)[0].advantages

    def _blend_then_update(self, rewards, group_size, offsets, keys, validate: bool,
                           return_history: bool):
        compiling = torch.compiler.is_compiling()
        if not compiling:
            check_call(rewards, group_size, offsets)
            self._check_keys(keys, rewards)
        # The buffers by name, read from the module's dict: nn.Module's attribute lookup costs
        # about half a microsecond per buffer, and a keyed step reads a dozen.
        buffers = self._buffers
        moving = buffers["ema"].device != rewards.device
        if self.num_keys is not None and not (compiling or moving) and functional.on_host(rewards):
            # On the host one op makes the whole step, and validates the values check_values
            # reads before it changes any state: there is no transfer to share there.
            *stats, hist_mean, hist_var = torch.ops.bv_blend.keyed_step(
                rewards, offsets, group_size or 0, keys,
                *self._key_tables(buffers["key_records"]), self.key_alpha, self.key_min_history,
                buffers["ring"], buffers["count"], buffers["ema"], buffers["var"], self.alpha,
                self.min_history, self.eps, self.scale, validate)
            return BlendOutput(*stats), hist_mean, hist_var

        def state(name: str) -> torch.Tensor:
            # The state follows the rewards, but only once the call has passed every check:
            # until then a call on another device reads copies.
            return buffers[name].to(rewards.device) if moving else buffers[name]

        if self.num_keys is None:
            hist_mean, hist_var = state("ema"), state("var")
            keep_history = return_history or (rewards.requires_grad and torch.is_grad_enabled())
            if keep_history and not moving:
                # The history update below overwrites the buffers in place; autograd and step's
                # caller need the values this call used.
                hist_mean, hist_var = hist_mean.clone(), hist_var.clone()
            out = BlendOutput(*torch.ops.bv_blend.group_advantages(
                rewards, offsets, group_size or 0, hist_mean, hist_var, self.eps, self.scale))
        else:
            # One op: the gather of each group's history and the blend. Its (G,) statistics are
            # fresh tensors, which the update below leaves alone.
            *stats, hist_mean, hist_var = torch.ops.bv_blend.keyed_group_advantages(
                rewards, offsets, group_size or 0, keys, *self._key_tables(state("key_records")),
                state("ema"), state("var"), self.key_min_history, self.eps, self.scale)
            out = BlendOutput(*stats)
        if validate and not compiling:
            check_values(rewards.shape[0], offsets, {}, keys, self.num_keys)
        if moving:
            self.to(rewards.device)
        history = (buffers["ring"], buffers["count"], buffers["ema"], buffers["var"], self.alpha,
                   self.min_history)
        if self.num_keys is None:
            torch.ops.bv_blend.update_history(out.group_mean.detach(), *history)
        else:
            torch.ops.bv_blend.update_keyed_history(
                out.group_mean.detach(), keys, *self._key_tables(buffers["key_records"]),
                self.key_alpha, *history)
        return out, hist_mean, hist_var

    def _check_keys(self, keys, rewards) -> None:
        """`keys` is given exactly when the estimator is keyed, as an int64 tensor on the rewards'
        device. (Its shape, (G,), is the op's to check; its values are checked by the op on the
        host, elsewhere with the other values in device memory.)"""
        if self.num_keys is None:
            if keys is not None:
                raise ValueError("keys were given but this estimator has no per-key history "
                                 "(num_keys=None)")
            return
        if keys is None:
            raise ValueError(f"keys (G,) int64 are required: this estimator keeps a per-key "
                             f"history (num_keys={self.num_keys})")
        if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64:
            kind = keys.dtype if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must be an int64 tensor, got {kind}")
        if keys.device != rewards.device:
            raise ValueError(f"keys must be on the rewards' device ({rewards.device}), got "
                             f"{keys.device}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.num_keys is not None:
            # Contiguous copies: a file holds the tables as they were saved, whatever the layout
            # in memory, and a state saved before the records existed loads unchanged.
            for name, table in zip(KEY_TABLES, self._key_tables(self._buffers["key_records"])):
                destination[prefix + name] = table.clone(memory_format=torch.contiguous_format)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checked before anything is copied, so a corrupted or hand-edited state (a checkpoint
        # file, say) raises here and leaves the estimator as it was.
        check_history_state({name: state_dict[prefix + name] for name in HISTORY_BUFFERS
                             if prefix + name in state_dict}, self.window)
        tables = {}
        if self.num_keys is not None:
            tables = {name: state_dict[prefix + name] for name in KEY_TABLES
                      if prefix + name in state_dict}
            check_key_state(tables, self.num_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.num_keys is None:
            return
        # nn.Module knows the records only (not saved): the tables are this method's to load.
        for name, table in zip(KEY_TABLES, self._key_tables(self._buffers["key_records"])):
            if name in tables:
                with torch.no_grad():
                    table.copy_(tables[name])
                if prefix + name in unexpected_keys:
                    unexpected_keys.remove(prefix + name)
            elif strict:
                missing_keys.append(prefix + name)

    def _apply(self, fn, recurse=True):
        # Module-wide casts (model.half(), .to(bfloat16)) must not lower the history's
        # precision or type: only device moves apply to it.
        dtypes = {name: buf.dtype for name, buf in self._buffers.items()}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def extra_repr(self) -> str:
        keyed = ("" if self.num_keys is None else
                 f", num_keys={self.num_keys}, key_ema_decay={self.key_alpha:g}, "
                 f"key_min_history={self.key_min_history}")
        return (f"window={self.window}, ema_decay={self.alpha:g}, initial_baseline="
                f"{self.initial_baseline:g}, min_history={self.min_history}, eps={self.eps:g}, "
                f"scale={self.scale!r}{keyed}")


def check_settings(*, window, ema_decay, initial_baseline, min_history, eps, scale,
                   num_keys=None, key_ema_decay=DEFAULT_KEY_EMA_DECAY, key_min_history=2,
                   prefix: str = "", names: dict[str, str] | None = None) -> None:
    """Raise ValueError for a BVBlend setting that is out of range. The estimator checks its own
    settings with this; a configuration that builds one later (a trainer's) calls it up front,
    so that errors use the names its user writes: `prefix` + the setting (prefix "bv_": window ->
    bv_window), except where `names` spells a setting otherwise (eps -> advantage_eps)."""
    def name(setting: str) -> str:
        return (names or {}).get(setting, prefix + setting)

    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"{name('window')} must be an int >= 2, got {window!r}")
    if ema_decay is not None and (isinstance(ema_decay, bool) or not isinstance(ema_decay, Real)
                                  or not 0 < ema_decay <= 1):
        raise ValueError(f"{name('ema_decay')} must be None or in (0, 1], got {ema_decay!r}")
    if (isinstance(initial_baseline, bool) or not isinstance(initial_baseline, Real)
            or not math.isfinite(initial_baseline)):
        raise ValueError(f"{name('initial_baseline')} must be a finite number, "
                         f"got {initial_baseline!r}")
    if (isinstance(min_history, bool) or not isinstance(min_history, int)
            or not 0 <= min_history <= window):
        raise ValueError(f"{name('min_history')} must be an int in [0, {name('window')}={window}], "
                         f"got {min_history!r}")
    check_eps(eps, name("eps"))
    if scale not in SCALE_MODES:
        raise ValueError(f"{name('scale')} must be one of {SCALE_MODES}, got {scale!r}")
    if num_keys is not None and (isinstance(num_keys, bool) or not isinstance(num_keys, int)
                                 or num_keys < 1):
        raise ValueError(f"{name('num_keys')} must be None or an int >= 1, got {num_keys!r}")
    if (isinstance(key_ema_decay, bool) or not isinstance(key_ema_decay, Real)
            or not 0 < key_ema_decay <= 1):
        raise ValueError(f"{name('key_ema_decay')} must be in (0, 1], got {key_ema_decay!r}")
    if (isinstance(key_min_history, bool) or not isinstance(key_min_history, int)
            or key_min_history < 1):
        raise ValueError(f"{name('key_min_history')} must be an int >= 1, "
                         f"got {key_min_history!r}")


def check_history_state(state: dict, window: int) -> None:
    """Raise ValueError naming the field unless `state` (any subset of ring, count, ema, var) is
    a history this estimator can hold: ring (window,) of finite floats, count an integer >= 0,
    ema finite, var finite and >= 0."""
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"history state {name!r} must be a tensor, got "
                             f"{type(value).__name__}")
    ring = state.get("ring")
    if ring is not None:
        if ring.shape != (window,) or not ring.is_floating_point():
            raise ValueError(f"history state 'ring' must be a float tensor of shape ({window},) "
                             f"(the window), got {ring.dtype} of shape {tuple(ring.shape)}")
        if not bool(ring.isfinite().all()):
            raise ValueError("history state 'ring' must hold finite values")
    scalars = {"count": "an integer >= 0", "ema": "a finite number",
               "var": "a finite number >= 0"}
    for name, wanted in scalars.items():
        value = state.get(name)
        if value is None:
            continue
        kind = "integer" if name == "count" else "float"
        right_kind = (value.is_floating_point() if kind == "float" else
                      not value.is_floating_point() and not value.is_complex()
                      and value.dtype != torch.bool)
        if value.numel() != 1 or not right_kind:
            raise ValueError(f"history state {name!r} must be a single {kind}, got {value.dtype} "
                             f"of shape {tuple(value.shape)}")
        number = value.item()
        if not math.isfinite(number) or (name != "ema" and number < 0):
            raise ValueError(f"history state {name!r} must be {wanted}, got {number!r}")


def check_key_state(state: dict, num_keys: int) -> None:
    """Raise ValueError naming the field unless `state` (any subset of key_count, key_mean,
    key_var) is a per-key history of `num_keys` keys: each of shape (num_keys,), key_count
    integers >= 0, key_mean finite floats, key_var finite floats >= 0."""
    wanted = {"key_count": "integers >= 0", "key_mean": "finite floats",
              "key_var": "finite floats >= 0"}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"history state {name!r} must be a tensor, got "
                             f"{type(value).__name__}")
        integer = name == "key_count"
        right_kind = (value.is_floating_point() if not integer else
                      not value.is_floating_point() and not value.is_complex()
                      and value.dtype != torch.bool)
        if value.shape != (num_keys,) or not right_kind:
            kind = "an integer" if integer else "a float"
            raise ValueError(f"history state {name!r} must be {kind} tensor of shape "
                             f"({num_keys},) (num_keys), got {value.dtype} of shape "
                             f"{tuple(value.shape)}")
        good = value >= 0 if integer else value.isfinite()
        if name == "key_var":
            good &= value >= 0
        if not bool(good.all()):
            raise ValueError(f"history state {name!r} must hold {wanted[name]}")
