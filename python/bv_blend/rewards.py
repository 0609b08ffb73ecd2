"""Reward functions with TRL's signature, and the checking and weighting of what they return.

A reward function is `f(prompts, completions, **dataset_columns) -> list[float | None]`, called
with keyword arguments. `None` (or NaN) means "cannot score this completion": it becomes NaN,
which the advantage op treats as unscorable (advantage 0, left out of the group statistics).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import numpy as np
import torch

DIGITS = "0123456789"


def _char_credit(produced: str, wanted: str) -> float:
    if produced == wanted:
        return 1.0
    if produced in DIGITS and wanted in DIGITS:
        # A wrong digit still earns up to 1/2, more the closer it is: a dense signal that makes
        # the reward non-zero for a random model and points towards the right digit.
        return 0.5 * (1.0 - abs(int(produced) - int(wanted)) / 9.0)
    return 0.0


def digit_partial_credit(prompts, completions, answer, **kwargs) -> list[float]:
    """Per-character credit against the answer, divided by the longer of the two lengths (so
    trailing junk costs as much as a missing character); 1.0 only for the exact answer."""
    scores = []
    for completion, target in zip(completions, answer):
        text, target = completion.strip(), str(target).strip()
        length = max(len(text), len(target))
        credit = sum(_char_credit(p, w) for p, w in zip(text, target))
        scores.append(credit / length if length else 1.0)
    return scores


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion, stripped of surrounding whitespace, is the answer; else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


REWARD_FUNCS: dict[str, Callable] = {f.__name__: f for f in (digit_partial_credit, exact_match)}


def get_reward_func(name: str) -> Callable:
    if name not in REWARD_FUNCS:
        raise ValueError(f"reward_funcs: unknown reward function {name!r}; built-in ones are "
                         f"{sorted(REWARD_FUNCS)}")
    return REWARD_FUNCS[name]


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something that is not one score per completion."""


def reward_name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


def _as_sequence(name: str, scores, expected: int) -> list:
    """The values of `scores` when it is a list, a tuple or a 1-D array or tensor; anything else
    (a dict, whose keys would pass for scores, a string, a set, a generator) is refused."""
    if isinstance(scores, (torch.Tensor, np.ndarray)):
        if scores.ndim != 1:
            raise RewardFunctionError(
                f"reward function {name!r} returned {type(scores).__name__} of shape "
                f"{tuple(scores.shape)}, expected a 1-D one of {expected} values")
        return scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(scores).__name__}, expected a list (or "
            f"tuple, 1-D numpy array, 1-D tensor) of {expected} floats or None")
    return list(scores)


def _check_scores(name: str, scores, expected: int) -> list[float]:
    scores = _as_sequence(name, scores, expected)
    if len(scores) != expected:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(scores)} values for {expected} completions")
    values = []
    for i, score in enumerate(scores):
        if score is None:
            values.append(math.nan)
        elif isinstance(score, numbers.Real) and not isinstance(score, bool):
            values.append(float(score))
        elif isinstance(score, torch.Tensor) and score.numel() == 1 and score.is_floating_point():
            values.append(float(score))
        else:
            raise RewardFunctionError(
                f"reward function {name!r} returned {score!r} ({type(score).__name__}) at index "
                f"{i}; each value must be a float, an int or None")
        if math.isinf(values[-1]):
            # None and NaN mean "cannot score this one"; an infinity is a bug in the function,
            # and it would make its group's mean and advantages infinite or NaN.
            raise RewardFunctionError(
                f"reward function {name!r} returned {values[-1]} at index {i}; scores must be "
                f"finite (None or NaN marks a completion that cannot be scored)")
    return values


class WeightedRewards:
    """Calls every reward function on a batch and combines their scores with the weights.

    The combined reward of a completion is the weighted sum over the functions that scored it;
    NaN when none did.
    """

    def __init__(self, funcs: Sequence[Callable], weights: Sequence[float] | None = None):
        if not funcs:
            raise ValueError("reward_funcs: at least one reward function is needed")
        for func in funcs:
            if not callable(func):
                raise TypeError(f"reward_funcs: {func!r} is not callable")
        if weights is None:
            weights = [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(funcs)} "
                             f"reward functions")
        for w in weights:
            if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"reward_weights must be finite numbers, got {w!r}")
        self.funcs = list(funcs)
        self.names = [reward_name(f) for f in self.funcs]
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)

    def _call(self, func, name, prompts, completions, columns) -> list[float]:
        try:
            scores = func(prompts=prompts, completions=completions, **columns)
        except Exception as err:
            culprit = self._failing_prompt(func, prompts, completions, columns)
            raise RewardFunctionError(
                f"reward function {name!r} raised {type(err).__name__}: {err} while scoring "
                f"prompt {culprit!r}") from err
        return _check_scores(name, scores, len(prompts))

    @staticmethod
    def _failing_prompt(func, prompts, completions, columns) -> str:
        # Re-score one completion at a time to name the prompt that breaks the function; when
        # only the whole batch fails, name its first prompt.
        for i, prompt in enumerate(prompts):
            try:
                func(prompts=[prompt], completions=[completions[i]],
                     **{k: [v[i]] for k, v in columns.items()})
            except Exception:
                return prompt
        return prompts[0]

    def __call__(self, prompts: list[str], completions: list[str],
                 columns: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (combined rewards (N,), per-function scores (N, F)), float32, NaN = unscored."""
        per_func = torch.tensor(
            [self._call(f, n, prompts, completions, columns) for f, n in zip(self.funcs, self.names)],
            dtype=torch.float32).T
        scored = ~torch.isnan(per_func)
        total = torch.where(scored, per_func * self.weights, 0.0).sum(dim=1)
        total = torch.where(scored.any(dim=1), total, math.nan)
        return total, per_func
