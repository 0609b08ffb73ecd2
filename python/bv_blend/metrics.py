"""Per-step metrics (metrics.jsonl, TensorBoard), the end-of-run report.png and summary."""

from __future__ import annotations

import json
import math
import os

TIME_SPLIT = ("step_time_generation", "step_time_rewards", "step_time_advantage",
              "step_time_forward_backward")


class MetricsLog:
    """Writes one JSON object per step; only the main process writes anything."""

    def __init__(self, output_dir: str, *, enabled: bool, report_to: str = "none",
                 previous_rows: list[dict] | None = None):
        self.rows = list(previous_rows or [])
        self.enabled = enabled
        self.file = self.writer = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        # Rewritten from the rows restored with a checkpoint, so that a resumed run's file holds
        # exactly one row per step even when the interrupted run got further than its checkpoint.
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "w")
        for row in self.rows:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

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
        f"beta_mean {_window_mean(tail, 'beta_mean'):.3f}, frac_reward_zero_std "
        f"{_window_mean(tail, 'frac_reward_zero_std'):.2f} (last {span})",
    ]
    step_time = _window_mean(rows, "step_time")
    parts = ", ".join(f"{key.removeprefix('step_time_')} {_window_mean(rows, key):.3f}s "
                      f"({100 * _window_mean(rows, key) / step_time:.0f}%)" for key in TIME_SPLIT)
    lines.append(f"step time {step_time:.3f}s: {parts}")
    return "\n".join(lines)


def write_report(rows: list[dict], path: str) -> None:
    """report.png: reward mean with a +-std band, and the mean BV-Blend weight beta, per step."""
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
    bottom.plot(steps, [r["beta_mean"] for r in rows], color="tab:orange", label="β mean")
    bottom.plot(steps, [r["frac_reward_zero_std"] for r in rows], color="tab:gray", alpha=0.6,
                label="groups with zero reward std")
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_xlabel("step")
    bottom.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
