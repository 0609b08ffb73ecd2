"""The functional entry point, and the checks that only Python can make.

The compiled op is the validator of its tensor arguments (dtype, shape, device, eps, scale): its
errors reach Python as ValueError/TypeError naming the argument, in eager mode and under
torch.compile alike. Python adds what the op cannot see: arguments that are not tensors or ints at
all, and, with validate=True, the values held in device memory (offsets, tensor history
statistics), read in one device-to-host transfer.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .reference import DEFAULT_SCALE, BlendOutput


def check_eps(eps, name: str = "eps") -> None:
    if type(eps) is float and 0 <= eps < math.inf:  # the common case, without the ABC check
        return
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")


def check_call(rewards, group_size, offsets) -> None:
    """The argument kinds the op's schema cannot tell apart or report by name. Skipped under
    torch.compile, where a Python raise cannot be traced: there the op raises instead."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if (group_size is None) == (offsets is None):
        raise ValueError("pass exactly one of group_size and offsets")
    if offsets is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    elif not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets must be an int64 torch.Tensor, got {type(offsets).__name__}")


def history_stat(value, name: str, rewards: torch.Tensor) -> torch.Tensor:
    """H or σ_u² as the op takes it: a 0-dim tensor (every group) or a (G,) one (group g uses
    element g). A float is checked at once (finite; σ_u² >= 0); a tensor's values are checked by
    check_values when validate=True, its kind and shape by the op."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 and value.numel() == 1:  # one value, whatever its shape: a scalar
            return value.reshape(())
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, a 0-dim tensor or a (G,) tensor, got "
                        f"{type(value).__name__}")
    value = float(value)
    if not torch.compiler.is_compiling() and not _history_value_ok(name, value):
        raise ValueError(_history_message(name, value))
    return torch.scalar_tensor(value, dtype=torch.float64, device=rewards.device)


def _history_value_ok(name: str, value: float) -> bool:
    return math.isfinite(value) and (name != "hist_var" or value >= 0)


def _history_message(name: str, value: float) -> str:
    wanted = "a finite number >= 0" if name == "hist_var" else "a finite number"
    return f"{name} must be {wanted}, got {value!r}"


def history_probe(name: str, value: torch.Tensor) -> torch.Tensor | None:
    """One 0-dim tensor standing for H or σ_u² given as a tensor: the first element that breaks
    the rule (finite; σ_u² >= 0), or, when none does, an element that keeps it. None when empty."""
    if value.dim() == 0:
        return value
    if value.numel() == 0:
        return None
    good = value.isfinite()
    if name == "hist_var":
        good &= value >= 0
    # take, not indexing: a 0-dim index tensor may be read on the host (a synchronisation).
    return value.take(good.logical_not().to(torch.uint8).argmax())


def check_values(num_rewards: int, offsets: torch.Tensor | None,
                 history: dict[str, torch.Tensor], keys: torch.Tensor | None = None,
                 num_keys: int | None = None) -> None:
    """The checks that read values in the tensors' memory, all in one transfer: offsets start at
    0, end at N and never decrease; the history statistics given as tensors are finite
    (σ_u² >= 0); keys, when given, lie in [0, num_keys). Call after the op has checked the
    tensors' dtype, shape and device."""
    probes = []
    if offsets is not None:
        probes += [offsets[0], offsets[-1], (offsets[1:] < offsets[:-1]).any()]
    history = {name: probe for name, value in history.items()
               if (probe := history_probe(name, value)) is not None}
    probes += history.values()
    if keys is not None and keys.numel() > 0:
        probes += torch.aminmax(keys)
    else:
        keys = None
    if not probes:
        return
    values = read_scalars(probes)
    if offsets is not None:
        first, last, decreasing = (int(v) for v in values[:3])
        values = values[3:]
        if first != 0:
            raise ValueError(f"offsets must start at 0, got offsets[0] = {first}")
        if last != num_rewards:
            raise ValueError(f"offsets must end at the number of rewards ({num_rewards}), "
                             f"got offsets[-1] = {last}")
        if decreasing:
            raise ValueError("offsets must be non-decreasing")
    for name, value in zip(history, values):
        if not _history_value_ok(name, value):
            raise ValueError(_history_message(name, value))
    if keys is not None:
        low, high = (int(v) for v in values[len(history):])
        if low < 0 or high >= num_keys:
            raise ValueError(f"keys must be in [0, num_keys) = [0, {num_keys}), "
                             f"got {low if low < 0 else high}")


def read_scalars(scalars: list[torch.Tensor]) -> list[float]:
    """The values of 0-dim tensors on one device, as floats. Off the CPU they are gathered into
    one tensor and copied in a single device-to-host transfer: one synchronisation, not one per
    value. (Float64 holds every offset below 2**53 exactly, and a larger one cannot equal N.)"""
    if on_host(scalars[0]):
        return [s.item() for s in scalars]
    return torch.stack([s.to(torch.float64) for s in scalars]).tolist()


def on_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def blend_advantages(rewards: torch.Tensor, group_size: int | None = None, *,
                     offsets: torch.Tensor | None = None, hist_mean=0.0, hist_var=0.0,
                     eps: float = 1e-4, scale: str = DEFAULT_SCALE, validate: bool = True) -> BlendOutput:
    """BV-Blend advantages of one call with explicit history statistics H and σ_u².

    Groups are given by ``group_size`` (N divisible by it) or by ``offsets`` (G+1 int64 bounds).
    ``hist_mean`` and ``hist_var`` are each a float or 0-dim tensor shared by every group, or a (G,)
    tensor, group g then blending with element g.
    ``validate=False`` skips the checks of values in device memory (offsets, tensor H and σ_u²),
    the only ones that make the host wait for the device; the kernels then normalise offsets and
    ignore an unusable history (README, "Validation and its cost").
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:
        check_call(rewards, group_size, offsets)
        check_eps(eps)
    h = history_stat(hist_mean, "hist_mean", rewards)
    u = history_stat(hist_var, "hist_var", rewards)
    out = BlendOutput(*torch.ops.bv_blend.group_advantages(
        rewards, offsets, group_size or 0, h, u, float(eps), scale))
    if validate and not compiling:
        history = {}
        if isinstance(hist_mean, torch.Tensor):
            history["hist_mean"] = h
        if isinstance(hist_var, torch.Tensor):
            history["hist_var"] = u
        if history or offsets is not None:
            check_values(rewards.shape[0], offsets, history)
    return out
