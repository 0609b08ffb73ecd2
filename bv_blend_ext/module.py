"""BVBlend: the stateful estimator. Its history lives in buffers on the rewards' device, so a
step is two kernel launches with no host synchronisation and can be captured in a CUDA graph."""

from __future__ import annotations

import math
from numbers import Real

import torch

from .functional import check_eps, check_groups, check_scale
from .reference import BlendOutput


class BVBlend(torch.nn.Module):
    """Blends each group's mean with an EMA of past group means (see README, "The contract").

    Calling it returns the advantages and then pushes every group mean with at least one valid
    reward into the history, so all groups of a call share the pre-call H and σ_u².
    """

    def __init__(self, window: int = 100, ema_decay: float | None = None,
                 initial_baseline: float = 0.0, min_history: int = 2, eps: float = 1e-4,
                 scale: str = "blend"):
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        if ema_decay is not None and (isinstance(ema_decay, bool) or not isinstance(ema_decay, Real)
                                      or not 0 < ema_decay <= 1):
            raise ValueError(f"ema_decay must be None or in (0, 1], got {ema_decay!r}")
        if (isinstance(initial_baseline, bool) or not isinstance(initial_baseline, Real)
                or not math.isfinite(initial_baseline)):
            raise ValueError(f"initial_baseline must be a finite number, got {initial_baseline!r}")
        if (isinstance(min_history, bool) or not isinstance(min_history, int)
                or not 0 <= min_history <= window):
            raise ValueError(f"min_history must be an int in [0, window={window}], "
                             f"got {min_history!r}")
        check_eps(eps)
        check_scale(scale)
        self.window = window
        self.alpha = 2.0 / (window + 1) if ema_decay is None else float(ema_decay)
        self.initial_baseline = float(initial_baseline)
        self.min_history = min_history
        self.eps = float(eps)
        self.scale = scale
        self.last_stats: BlendOutput | None = None
        self.register_buffer("ring", torch.zeros(window, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("ema", torch.tensor(self.initial_baseline, dtype=torch.float64))
        self.register_buffer("var", torch.zeros((), dtype=torch.float64))

    @property
    def history_mean(self) -> torch.Tensor:
        """H, the baseline the next call blends in."""
        return self.ema

    @property
    def history_var(self) -> torch.Tensor:
        """σ_u² the next call uses: the ring's unbiased variance, 0 below min_history entries."""
        return self.var

    def reset(self) -> None:
        self.ring.zero_()
        self.count.zero_()
        self.ema.fill_(self.initial_baseline)
        self.var.zero_()
        self.last_stats = None

    def forward(self, rewards: torch.Tensor, group_size: int | None = None, *,
                offsets: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
        check_groups(rewards, group_size, offsets, validate)
        if self.ring.device != rewards.device:
            self.to(rewards.device)
        hist_mean, hist_var = self.ema, self.var
        if rewards.requires_grad and torch.is_grad_enabled():
            # Autograd keeps these for backward, and the history update below overwrites them.
            hist_mean, hist_var = hist_mean.clone(), hist_var.clone()
        out = BlendOutput(*torch.ops.bv_blend.group_advantages(
            rewards, offsets, group_size or 0, hist_mean, hist_var, self.eps, self.scale))
        torch.ops.bv_blend.update_history(out.group_mean.detach(), self.ring, self.count, self.ema,
                                          self.var, self.alpha, self.min_history)
        self.last_stats = BlendOutput(*(t.detach() for t in out)) if rewards.requires_grad else out
        return out.advantages

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
        return (f"window={self.window}, ema_decay={self.alpha:g}, initial_baseline="
                f"{self.initial_baseline:g}, min_history={self.min_history}, eps={self.eps:g}, "
                f"scale={self.scale!r}")
