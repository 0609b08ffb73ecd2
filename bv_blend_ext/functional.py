"""The functional entry point and the argument checks shared with the stateful estimator."""

from __future__ import annotations

import math
from numbers import Real

import torch

from .reference import SCALE_MODES, BlendOutput

REWARD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_scale(scale) -> None:
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}")


def check_eps(eps) -> None:
    if type(eps) is float and 0 <= eps < math.inf:  # the common case, without the ABC check
        return
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def check_groups(rewards, group_size, offsets, validate: bool) -> None:
    """Raises ValueError/TypeError naming the argument; the value checks of `offsets` read
    device memory (a GPU->CPU sync), so they only run with validate=True."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if rewards.dtype not in REWARD_DTYPES:
        raise TypeError(f"rewards must be float16, bfloat16, float32 or float64, got {rewards.dtype}")
    if (group_size is None) == (offsets is None):
        raise ValueError("pass exactly one of group_size and offsets")
    n = rewards.shape[0]
    if offsets is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n % group_size != 0:
            raise ValueError(f"group_size ({group_size}) must divide the number of rewards ({n})")
        return
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets must be an int64 torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be 1-D of length G+1 >= 1, got shape {tuple(offsets.shape)}")
    if offsets.device != rewards.device:
        raise ValueError(f"offsets must be on the rewards' device ({rewards.device}), "
                         f"got {offsets.device}")
    if validate and not torch.compiler.is_compiling():
        first, last = int(offsets[0]), int(offsets[-1])
        if first != 0:
            raise ValueError(f"offsets must start at 0, got offsets[0] = {first}")
        if last != n:
            raise ValueError(f"offsets must end at the number of rewards ({n}), "
                             f"got offsets[-1] = {last}")
        if offsets.shape[0] > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")


def history_scalar(value, name: str, rewards: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor for H or σ_u² (the op itself checks that it is floating-point)."""
    if isinstance(value, torch.Tensor):
        if value.device != rewards.device:
            raise ValueError(f"{name} must be on the rewards' device ({rewards.device}), "
                             f"got {value.device}")
        if value.dim() == 0:
            return value
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-dim tensor or float), "
                             f"got shape {tuple(value.shape)}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    return torch.scalar_tensor(float(value), dtype=torch.float64, device=rewards.device)


def blend_advantages(rewards: torch.Tensor, group_size: int | None = None, *,
                     offsets: torch.Tensor | None = None, hist_mean=0.0, hist_var=0.0,
                     eps: float = 1e-4, scale: str = "blend", validate: bool = True) -> BlendOutput:
    """BV-Blend advantages of one call with explicit history statistics H and σ_u².

    Groups are given by ``group_size`` (N divisible by it) or by ``offsets`` (G+1 int64 bounds).
    ``validate=False`` skips the checks of the offsets' values, the only ones that make the
    host wait for the device; invalid offsets are then clamped, never read out of bounds.
    """
    check_groups(rewards, group_size, offsets, validate)
    check_eps(eps)
    check_scale(scale)
    h = history_scalar(hist_mean, "hist_mean", rewards)
    u = history_scalar(hist_var, "hist_var", rewards)
    out = torch.ops.bv_blend.group_advantages(rewards, offsets, group_size or 0, h, u,
                                              float(eps), scale)
    return BlendOutput(*out)
