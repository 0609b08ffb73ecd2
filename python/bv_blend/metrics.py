"""Per-step metrics (the row, metrics.jsonl, TensorBoard), the end-of-run report.png and
summary."""

from __future__ import annotations

import json
import math
import os
import time

import torch

# The phases of a step, in order, and the keys of their times, which add up to step_time.
TIME_KEYS = {phase: f"step_time_{phase}"
             for phase in ("generation", "rewards", "advantage", "forward_backward")}


class StepClock:
    """Wall time of a step, split into the phases of TIME_KEYS as each ends (`lap`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.last = time.perf_counter()
        self.split = {}

    def lap(self, phase: str) -> None:
        # The time of asynchronous CUDA work is only known once it has finished.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.split[TIME_KEYS[phase]] = now - self.last
        self.last = now

    def times(self) -> dict[str, float]:
        return {"step_time": self.last - self.start, **self.split}


def step_row(step: int, rewards: torch.Tensor, rewards_per_func: torch.Tensor,
             reward_names: list[str], advantages, update: dict, *, learning_rate: float,
             completion_lengths: torch.Tensor, times: dict[str, float],
             keyed_fraction: float | None = None) -> dict:
    """The metrics row of one step. The tensors hold every process's completions: rewards (N,)
    and rewards_per_func (N, F), NaN where unscored; advantages is the estimator's output for
    them; update holds the loss metrics of the optimizer updates; keyed_fraction, logged only
    with a keyed history, is the fraction of groups that blended with their key's own history."""
    group_std = advantages.group_std
    return {
        "step": step,
        "reward_mean": _nanmean(rewards),
        "reward_std": _nanstd(rewards),
        "reward_group_std_mean": _nanmean(group_std),
        "frac_reward_zero_std": _frac_tied(rewards, group_std.numel()),
        "frac_reward_unscored": float(rewards.isnan().float().mean()),
        "history_weight_mean": _nanmean(advantages.history_weight),
        "history_mean": advantages.history_mean,
        "history_var": advantages.history_var,
        **({} if keyed_fraction is None else {"keyed_fraction": keyed_fraction}),
        "advantage_abs_max": float(advantages.advantages.abs().max()),
        **{f"reward/{name}": _nanmean(rewards_per_func[:, i])
           for i, name in enumerate(reward_names)},
        **update,
        "learning_rate": learning_rate,
        "completion_length": float(completion_lengths.mean()),
        **times,
    }


def _frac_tied(rewards: torch.Tensor, num_groups: int) -> float:
    """Fraction of groups whose valid rewards are all exactly equal (or that have fewer than
    two). Compared on the rewards, not on a computed std: a float std of tied rewards can come
    out ~1e-8 rather than 0 (RLOO's does)."""
    r = rewards.view(num_groups, -1)
    valid = torch.isfinite(r)
    high = torch.where(valid, r, -torch.inf).amax(1)
    low = torch.where(valid, r, torch.inf).amin(1)
    return float((high <= low).float().mean())


def _nanmean(values: torch.Tensor) -> float:
    return float(values.float().nanmean())


def _nanstd(values: torch.Tensor) -> float:
    valid = values[~values.isnan()].float()
    return float(valid.std()) if valid.numel() > 1 else 0.0


class MetricsLog:
    """Writes one JSON object per step; only the main process writes anything.

    A resumed run (previous_rows: the rows saved with its checkpoint) appends to metrics.jsonl
    after the checkpoint's last step; rows that an interrupted run wrote after its checkpoint are
    dropped, as those steps run again. A file that does not hold the checkpoint's steps (a new
    output_dir, say) is rewritten from the saved rows.
    """

    def __init__(self, output_dir: str, *, enabled: bool, report_to: str = "none",
                 previous_rows: list[dict] | None = None):
        self.rows = list(previous_rows or [])
        self.enabled = enabled
        self.file = self.writer = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        kept = _prefix_length(path, [r["step"] for r in self.rows])
        if kept is None:
            _write_rows(path, self.rows)
        elif os.path.exists(path):
            os.truncate(path, kept)
        self.file = open(path, "a")
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides the scalars an interrupted run logged after its checkpoint.
            resumed = self.rows[-1]["step"] if self.rows else 0
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                        purge_step=resumed + 1 if resumed else None)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _prefix_length(path: str, steps: list[int]) -> int | None:
    """Length in bytes of the start of `path` that holds exactly the rows of `steps`, in order;
    None when the file does not start that way. What follows (rows of later steps, a line cut
    short by a crash) is left to the caller to drop."""
    if not os.path.exists(path):
        return None if steps else 0
    length = 0
    with open(path, "rb") as f:
        for expected in steps:
            line = f.readline()
            try:
                if not line.endswith(b"\n") or json.loads(line)["step"] != expected:
                    return None
            except (ValueError, KeyError, TypeError):
                return None
            length += len(line)
    return length


def _write_rows(path: str, rows: list[dict]) -> None:
    # Written aside and renamed, so that a crash meanwhile leaves the old file whole.
    partial = path + ".partial"
    with open(partial, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(partial, path)


def _window_mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return sum(values) / len(values) if values else math.nan


def summary(rows: list[dict], wall_time: float) -> str:
    """A few lines: reward at the start and end (means over a tenth of the run), and where the
    time of a step goes."""
    if not rows:
        return "no steps were run"
    span = max(1, len(rows) // 10)
    head, tail = rows[:span], rows[-span:]
    lines = [
        f"steps {rows[0]['step']}-{rows[-1]['step']} in {wall_time:.1f}s",
        f"reward_mean {_window_mean(head, 'reward_mean'):.3f} (first {span} steps) -> "
        f"{_window_mean(tail, 'reward_mean'):.3f} (last {span}); best step "
        f"{max(r['reward_mean'] for r in rows if not math.isnan(r['reward_mean'])):.3f}"
        if any(not math.isnan(r["reward_mean"]) for r in rows) else "reward_mean: no scored step",
        f"history_weight_mean {_window_mean(tail, 'history_weight_mean'):.3f}, "
        f"frac_reward_zero_std {_window_mean(tail, 'frac_reward_zero_std'):.2f} (last {span})",
    ]
    step_time = _window_mean(rows, "step_time")
    parts = ", ".join(f"{phase} {_window_mean(rows, key):.3f}s "
                      f"({100 * _window_mean(rows, key) / step_time:.0f}%)"
                      for phase, key in TIME_KEYS.items())
    lines.append(f"step time {step_time:.3f}s: {parts}")
    return "\n".join(lines)


def write_report(rows: list[dict], path: str) -> None:
    """report.png: reward mean with a +-std band; the mean history weight of BV-Blend and the
    fraction of zero-std groups, per step."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    mean = [r["reward_mean"] for r in rows]
    std = [r["reward_std"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(steps, mean, label="reward mean")
    top.fill_between(steps, [m - s for m, s in zip(mean, std)],
                     [m + s for m, s in zip(mean, std)], alpha=0.25, label="± std")
    top.set_ylabel("reward")
    top.legend(loc="lower right")
    bottom.plot(steps, [r["history_weight_mean"] for r in rows], color="tab:orange",
                label="history weight (mean over groups)")
    bottom.plot(steps, [r["frac_reward_zero_std"] for r in rows], color="tab:gray", alpha=0.6,
                label="groups with zero reward std")
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_xlabel("step")
    bottom.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
