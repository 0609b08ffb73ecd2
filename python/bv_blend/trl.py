"""BV-Blend advantages inside Hugging Face TRL: a drop-in `GRPOTrainer` subclass.

    from bv_blend.trl import BVBlendGRPOConfig, BVBlendGRPOTrainer

`GRPOTrainer` has no advantage hook, so the subclass lets TRL generate, score, gather and compute
its own advantages as usual, then recomputes the advantages of the whole gathered batch with
`bv_blend_ext` and swaps in this process's slice. Every process sees the same gathered rewards,
so every process computes the same advantages and keeps the same BV-Blend history. The history
rides along with TRL's checkpoints (`bv_blend_state.pt` in each `checkpoint-*` folder), as the
history a run resumed there needs, so that it ends like an uninterrupted run (docs/trl.md).

The integration reads TRL internals, listed in docs/trl.md, that change between releases; the
version check below refuses a TRL outside the tested range instead of training with advantages
that may silently be TRL's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from bv_blend._versions import require_version

__all__ = ["BVBlendGRPOConfig", "BVBlendGRPOTrainer", "SUPPORTED_TRL", "STATE_FILE",
           "check_trl_version"]

# Keep in step with the `trl` extra in setup.py.
SUPPORTED_TRL = ">=1.16,<1.17"
# Written next to TRL's own files in every checkpoint folder.
STATE_FILE = "bv_blend_state.pt"


def check_trl_version(version: str) -> None:
    """Raise ImportError unless `version` is a TRL release this integration was tested against."""
    require_version("trl", version, SUPPORTED_TRL, "GRPOTrainer internals")


try:
    import trl
except ImportError as err:
    raise ImportError(
        f"bv_blend.trl needs TRL (trl{SUPPORTED_TRL}): `pip install 'bv-blend-ext[trl]'`") from err
check_trl_version(trl.__version__)

import bv_blend_ext  # noqa: E402  (after the version check: a bad TRL should fail first)
from bv_blend.keys import KeyMap  # noqa: E402
from bv_blend_ext.reference import DEFAULT_KEY_EMA_DECAY, DEFAULT_SCALE  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402
from transformers.utils import logging  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

logger = logging.get_logger(__name__)


@dataclass
class BVBlendGRPOConfig(GRPOConfig):
    """TRL's `GRPOConfig` plus the BV-Blend estimator settings (all prefixed `bv_`).

    `bv_scale` replaces TRL's `scale_rewards` for the advantages; TRL still uses `scale_rewards`
    for its `frac_reward_zero_std` metric. With `bv_use_history=False` the history weight is 0
    and the advantages are TRL's own: `bv_scale` "group" or "blend" equals `scale_rewards="group"`,
    "batch" equals "batch" and "none" equals "none".
    """

    bv_window: int = field(
        default=100,
        metadata={"help": "Number of recent group mean rewards whose variance gives the history "
                          "variance σ_u²."})
    bv_ema_decay: float | None = field(
        default=None,
        metadata={"help": "Decay of the EMA of group means that gives the history baseline H; "
                          "None means 2 / (bv_window + 1)."})
    bv_initial_baseline: float = field(
        default=0.0, metadata={"help": "Value of H before any group has been seen."})
    bv_min_history: int = field(
        default=2,
        metadata={"help": "Group means needed in the window before the history is used (before "
                          "that, the history weight is 0)."})
    bv_scale: str = field(
        default=DEFAULT_SCALE,
        metadata={"help": "Advantage scale: 'none' (s = 1), 'blend' (blended std), 'group' or "
                          "'batch'. Replaces TRL's scale_rewards for the advantages."})
    bv_eps: float = field(
        default=1e-4, metadata={"help": "Added to the scale, as TRL adds 1e-4 to the std."})
    bv_use_history: bool = field(
        default=True,
        metadata={"help": "False: the history weight is 0 (no history is used or updated), which "
                          "reproduces TRL's own advantages; for A/B runs."})
    bv_key: str = field(
        default="none",
        metadata={"help": "History per key: 'none' (one global history), 'prompt' (one per "
                          "distinct prompt of train_dataset) or the name of a train_dataset "
                          "column (one per distinct value, e.g. a cluster or topic)."})
    bv_key_ema_decay: float = field(
        default=DEFAULT_KEY_EMA_DECAY,
        metadata={"help": "Decay of each key's EMA mean and variance of its group means."})
    bv_key_min_history: int = field(
        default=2,
        metadata={"help": "Visits of a key before its own history is used (the global history "
                          "until then)."})

    @property
    def bv_key_column(self) -> str | None:
        """The train_dataset column whose values key the history; None without keys."""
        if self.bv_key == "none":
            return None
        return self.bv_key.removeprefix("column:")

    def __post_init__(self):
        super().__post_init__()
        # Every bv_* setting is checked here, before TRL loads the model, in the config's names.
        bv_blend_ext.check_settings(
            window=self.bv_window, ema_decay=self.bv_ema_decay,
            initial_baseline=self.bv_initial_baseline, min_history=self.bv_min_history,
            eps=self.bv_eps, scale=self.bv_scale, key_ema_decay=self.bv_key_ema_decay,
            key_min_history=self.bv_key_min_history, prefix="bv_")
        if not isinstance(self.bv_key, str) or not self.bv_key.removeprefix("column:"):
            raise ValueError(f"bv_key must be 'none', 'prompt' or a train_dataset column name, "
                             f"got {self.bv_key!r}")
        if self.bv_key_column is not None and not self.bv_use_history:
            raise ValueError(f"bv_key {self.bv_key!r} needs bv_use_history=True: without a "
                             f"history there is nothing to keep per key")
        if self.multi_objective_aggregation != "sum_then_normalize":
            # normalize_then_sum hands the advantage step per-function z-scores whose group means
            # are ~0 by construction, so a history of them carries no baseline information.
            raise ValueError("BV-Blend needs multi_objective_aggregation='sum_then_normalize', got "
                             f"{self.multi_objective_aggregation!r}")


class BVBlendGRPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer` with BV-Blend advantages; same constructor, `args` a BVBlendGRPOConfig.

    `trainer.bv_blend` is the `bv_blend_ext.BVBlend` estimator holding the history;
    `trainer.bv_keys` the `KeyMap` of its keys (None with bv_key="none").
    """

    def __init__(self, model, reward_funcs=None, args: BVBlendGRPOConfig | None = None,
                 *positional, **kwargs):
        if args is None:
            # Same default output directory as GRPOTrainer, with the BV-Blend config type.
            name = model if isinstance(model, str) else model.config._name_or_path
            args = BVBlendGRPOConfig(f"{name.split('/')[-1]}-GRPO")
        if not isinstance(args, BVBlendGRPOConfig):
            raise TypeError(f"args must be a BVBlendGRPOConfig, got {type(args).__name__}")
        train_dataset = kwargs.get("train_dataset", positional[0] if positional else None)
        self.bv_keys = self._bv_build_keys(args, train_dataset)
        keyed = {} if self.bv_keys is None else dict(
            num_keys=self.bv_keys.num_keys, key_ema_decay=args.bv_key_ema_decay,
            key_min_history=args.bv_key_min_history)
        self.bv_blend = bv_blend_ext.BVBlend(
            window=args.bv_window, ema_decay=args.bv_ema_decay,
            initial_baseline=args.bv_initial_baseline, min_history=args.bv_min_history,
            eps=args.bv_eps, scale=args.bv_scale, **keyed)
        self._bv_rewards_per_func = None
        # The history as it was before the latest training generation (see _save_checkpoint).
        self._bv_state_before_generation = None
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        self.bv_blend.to(self.accelerator.device)

    @staticmethod
    def _bv_build_keys(args: BVBlendGRPOConfig, train_dataset) -> KeyMap | None:
        """Ids of the history keys, from the whole train_dataset before training starts: they
        depend on the dataset alone, not on the batches, so every process builds the same ones
        and a resumed run the ones it was trained with."""
        column = args.bv_key_column
        if column is None:
            return None
        from datasets import Dataset

        if not isinstance(train_dataset, Dataset):
            raise ValueError(f"bv_key {args.bv_key!r} needs a map-style datasets.Dataset as "
                             f"train_dataset (its keys are built from all its rows up front), got "
                             f"{type(train_dataset).__name__}")
        if column not in train_dataset.column_names:
            raise ValueError(f"bv_key {args.bv_key!r}: train_dataset has no column {column!r} "
                             f"(it has {train_dataset.column_names})")
        return KeyMap.from_values(train_dataset[column])

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the rewards of all processes here (already gathered); keep them for the
        # advantage step that follows in _generate_and_score_completions.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        self._bv_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._bv_rewards_per_func = None
        if self.model.training:
            # state_dict() returns the live buffers, which this generation is about to advance.
            self._bv_state_before_generation = {
                key: value.clone() for key, value in self.bv_blend.state_dict().items()}
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._bv_rewards_per_func = self._bv_rewards_per_func, None
        if rewards_per_func is None:
            raise RuntimeError("GRPOTrainer._generate_and_score_completions did not call "
                               "_calculate_rewards; this TRL version is not supported by "
                               "bv_blend.trl")
        local = output["advantages"].shape[0]
        if rewards_per_func.shape[0] != local * self.accelerator.num_processes:
            raise RuntimeError(
                f"expected {local} completions per process x {self.accelerator.num_processes} "
                f"processes in the gathered rewards, got {rewards_per_func.shape[0]}; this TRL "
                f"version is not supported by bv_blend.trl")
        mode = "train" if self.model.training else "eval"
        keys = self._bv_group_keys(inputs) if mode == "train" else None
        advantages = self._bv_advantages(rewards_per_func, mode, keys)
        # TRL's slicing: process i owns rows [i * local, (i + 1) * local) of the gathered batch.
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start:start + local]
        self._bv_replace_logged_advantages(advantages)
        return output

    def _bv_group_keys(self, inputs) -> torch.Tensor | None:
        """The key id of every group of the gathered batch, (G,) int64; None without keys."""
        if self.bv_keys is None:
            return None
        column = self.args.bv_key_column
        try:
            local = [self.bv_keys.id_of(row[column]) for row in inputs]
        except KeyError:
            raise ValueError(f"a training row's {column!r} is not one of train_dataset's values "
                             f"(bv_key {self.args.bv_key!r}): was the dataset changed after the "
                             f"trainer was built?") from None
        # A group can span processes: gather the rows' ids in TRL's gathered row order, then
        # take each group's first row.
        rows = self.accelerator.gather(torch.tensor(local, dtype=torch.int64,
                                                    device=self.accelerator.device))
        return rows[::self.num_generations].contiguous()

    def _bv_advantages(self, rewards_per_func: torch.Tensor, mode: str,
                       keys: torch.Tensor | None = None) -> torch.Tensor:
        """BV-Blend advantages of the gathered batch; advances the history in training only.
        Evaluation blends with the global history: its prompts are usually not training
        prompts, so they have no key history of their own."""
        # TRL's sum_then_normalize reward: weighted nansum over the reward functions, NaN only
        # where every function returned None (unscorable); the op gives those a 0 advantage.
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        group_size = self.num_generations if mode == "train" else self.num_generations_eval

        metrics = self._metrics[mode]
        if self.args.bv_use_history and mode == "train":
            if keys is not None:
                visits = self.bv_blend.key_count[keys]
                metrics["bv_blend/keyed_fraction"].append(
                    (visits >= self.args.bv_key_min_history).float().mean().item())
            step = self.bv_blend.step(rewards, group_size=group_size,
                                      **({} if keys is None else {"keys": keys}))
            advantages, history_weight = step.advantages, step.beta
            # Keyed, each group has its own H and σ_u²: their mean over the groups is logged.
            hist_mean, hist_var = step.history_mean.mean().item(), step.history_var.mean().item()
        else:
            # Evaluation blends with the history but must not move it.
            hist_mean, hist_var = ((self.bv_blend.history_mean.item(),
                                    self.bv_blend.history_var.item())
                                   if self.args.bv_use_history else (0.0, 0.0))
            out = bv_blend_ext.blend_advantages(
                rewards, group_size, hist_mean=hist_mean, hist_var=hist_var,
                eps=self.args.bv_eps, scale=self.args.bv_scale)
            advantages, history_weight = out.advantages, out.beta

        metrics["bv_blend/history_weight_mean"].append(
            torch.nanmean(history_weight.float()).item())
        metrics["bv_blend/history_mean"].append(hist_mean)
        metrics["bv_blend/history_var"].append(hist_var)
        return advantages

    def _bv_replace_logged_advantages(self, advantages: torch.Tensor) -> None:
        # TRL appended its own advantages of this batch to the completions-table log (a bounded
        # deque); overwrite that tail so log_completions shows the advantages actually trained on.
        logged = self._logs["advantages"]
        values = advantages.tolist()
        replaced = min(len(values), len(logged))
        for _ in range(replaced):
            logged.pop()
        logged.extend(values[len(values) - replaced:])

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # Every process holds the same history, so the processes that save TRL's files save it.
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            path = os.path.join(folder, STATE_FILE)
            # Written aside and renamed, so that a crash meanwhile never leaves a truncated file
            # that a resume would fail on.
            torch.save({"estimator": self._bv_state_to_resume_from(), "trl_step": self._step,
                        "key_names": self.bv_keys.names if self.bv_keys is not None else None},
                       path + ".tmp")
            os.replace(path + ".tmp", path)

    def _bv_state_to_resume_from(self) -> dict[str, torch.Tensor]:
        """The history a run resumed from this point needs, which is not always the live one.

        TRL generates one buffer of completions every `steps_per_generation * num_iterations`
        micro-steps (`_step` counts them) and trains on slices of it in between. A resumed
        trainer has no buffer, so its first micro-step generates one from the data the
        checkpointed run would have used next: at a buffer boundary that is the next buffer, as
        in an uninterrupted run; in the middle of a buffer it is the current buffer again, and
        that generation pushes its group means a second time. So mid-buffer, the history saved
        is the one from before the current buffer was generated.
        """
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0:
            return self.bv_blend.state_dict()
        return self._bv_state_before_generation

    def _load_optimizer_and_scheduler(self, checkpoint):
        # The Trainer calls this exactly when resuming, with the resolved checkpoint folder.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            logger.warning(f"{checkpoint} has no {STATE_FILE} (not saved by BVBlendGRPOTrainer?); "
                           "BV-Blend starts from an empty history")
            return
        state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
        self._bv_check_keys(path, state.get("key_names") if "estimator" in state else None)
        if "estimator" not in state:
            # Written by bv_blend.trl before the micro-step count was saved: the history alone.
            logger.warning(f"{path} holds no TRL micro-step count (an older bv_blend.trl wrote "
                           "it); a run resumed from the middle of a generation buffer counts "
                           "that buffer's groups twice in the history")
            self.bv_blend.load_state_dict(state)
            return
        self.bv_blend.load_state_dict(state["estimator"])
        if not self.args.ignore_data_skip:
            # The Trainer fast-forwards the data to where the checkpointed run stopped, but TRL
            # restarts its micro-step count at 0, and its schedule (when to generate, which slice
            # of the buffer to train on) follows that count. Resumed mid-buffer, TRL would train
            # the regenerated buffer from its first slice again and generate every later buffer
            # off the data's buffer boundaries: the generations, and so the history, would differ
            # from an uninterrupted run's, and a later checkpoint would misjudge whether it is
            # mid-buffer. Restoring the count keeps the uninterrupted run's schedule. (With
            # ignore_data_skip the data restarts at the epoch's start, in step with a count of 0.)
            self._step = state["trl_step"]

    def _bv_check_keys(self, path: str, saved: list[str] | None) -> None:
        """A keyed history only means something for the keys it was built with."""
        if (saved is None) != (self.bv_keys is None):
            raise ValueError(f"{path} was saved with {'no' if saved is None else 'a'} bv_key and "
                             f"this run has bv_key={self.args.bv_key!r}: its BV-Blend history "
                             f"cannot be used with other keys")
        if self.bv_keys is not None:
            self.bv_keys.check_matches(saved, path)
