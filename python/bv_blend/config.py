"""GRPOConfig: every setting of a run, its default, its help text and its validation.

The CLI builds one flag per field from this dataclass and a YAML file may set any field, so this
file is the single list of what can be configured. Defaults suit the tiny model on the built-in
`add` task on a CPU; a real pretrained LM wants a learning rate around 1e-6.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field

import torch

import bv_blend_ext
from bv_blend_ext.reference import DEFAULT_KEY_EMA_DECAY, DEFAULT_SCALE, SCALE_MODES
from bv_blend.advantages import ESTIMATORS
from bv_blend.keys import parse_key
from bv_blend.rewards import get_reward_func
from bv_blend.tasks import get_task

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCHEDULERS = ("constant", "linear", "cosine")
REPORT_TO = ("none", "tensorboard")

def _f(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class GRPOConfig:
    # model and data
    model: str = _f("tiny", "local path or cached name of a causal LM, or 'tiny' for a small "
                    "random model built in <output_dir>/tiny_model")
    tiny_arch: str = _f("llama", "architecture of the tiny model: llama or qwen2")
    task: str = _f("add", "built-in task (see `bv-blend tasks`), or 'jsonl' with dataset_path")
    dataset_path: str | None = _f(None, "JSONL file with 'prompt' and 'answer' columns")
    num_prompts: int | None = _f(None, "procedural tasks: train on a fixed set of the first N "
                                 "generated prompts, revisited every epoch in a reshuffled order "
                                 "(default: an endless stream of fresh prompts)")
    reward_funcs: list[str] | None = _f(None, "built-in reward functions to use instead of the "
                                        "task's own", nargs="+")
    reward_weights: list[float] | None = _f(None, "one weight per reward function (default 1)",
                                            nargs="+")

    # sampling
    num_generations: int = _f(8, "completions sampled per prompt (the group size)")
    batch_size: int = _f(64, "completions per process per step; a multiple of num_generations")
    max_completion_length: int | None = _f(None, "max new tokens per completion (default: the "
                                           "task's)")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling threshold")

    # advantages
    estimator: str = _f("bv_blend", f"advantage estimator: {', '.join(ESTIMATORS)}")
    advantage_eps: float = _f(1e-4, "added to the advantage scale")
    bv_window: int = _f(100, "BV-Blend: group means kept for the history variance")
    bv_ema_decay: float | None = _f(None, "BV-Blend: EMA decay of the history mean "
                                    "(default 2/(window+1))")
    bv_min_history: int = _f(2, "BV-Blend: group means needed before the history is used")
    bv_initial_baseline: float = _f(0.0, "BV-Blend: starting value of the history mean")
    bv_scale: str = _f(DEFAULT_SCALE, "BV-Blend advantage scale: none (s = 1), blend (the std of "
                       "the blended baseline), group (the article's σ_G + eps) or batch")
    bv_key: str = _f("none", "BV-Blend history per key: none (one global history), prompt (one "
                     "per distinct prompt) or column:NAME (one per value of a dataset column)")
    bv_key_ema_decay: float = _f(DEFAULT_KEY_EMA_DECAY, "BV-Blend keyed: EMA decay of each "
                                 "key's mean and variance of its group means")
    bv_key_min_history: int = _f(2, "BV-Blend keyed: visits of a key before its own history is "
                                 "used (the global history until then)")

    # loss
    loss_type: str = _f("dapo", f"loss aggregation: {', '.join(LOSS_TYPES)}")
    epsilon: float = _f(0.2, "lower clip range of the importance ratio")
    epsilon_high: float | None = _f(None, "upper clip range (default: epsilon)")
    beta: float = _f(0.0, "KL coefficient; > 0 loads a frozen reference model")
    num_iterations: int = _f(1, "optimizer updates per batch of completions (mu)")

    # optimisation
    learning_rate: float = _f(1e-3, "AdamW peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.99, "AdamW beta2")
    lr_scheduler_type: str = _f("constant", f"schedule after warm-up: {', '.join(SCHEDULERS)}")
    warmup_steps: int = _f(0, "optimizer updates of linear warm-up")
    max_grad_norm: float | None = _f(1.0, "gradient clipping norm (none to disable)")
    gradient_accumulation_steps: int = _f(1, "micro-batches each batch is split into for the "
                                          "forward/backward; batch_size must divide evenly")
    bf16: bool | None = _f(None, "bfloat16 autocast (default: on with CUDA)")

    # run
    max_steps: int = _f(200, "training steps (one batch of completions each)")
    seed: int = _f(0, "seed of the model init (tiny), data order and sampling")
    device: str | None = _f(None, "cpu, cuda, cuda:N (default: cuda when available)")
    num_threads: int | None = _f(None, "CPU threads of this process (torch.set_num_threads); "
                                 "default: torch's. Small models run fastest with 1")
    output_dir: str = _f("runs/bv_blend", "where checkpoints, metrics.jsonl and report.png go")
    save_steps: int = _f(50, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int | None = _f(2, "keep at most N checkpoints in output_dir, deleting the "
                                      "oldest (none: keep all); the newest is never deleted")
    resume_from: str | None = _f(None, "checkpoint directory, or an output_dir to take its "
                                 "latest checkpoint")
    report_to: str = _f("none", "also log to: none or tensorboard")
    progress_bar: bool = _f(True, "show a tqdm progress bar")

    def __post_init__(self):
        self.validate()

    @property
    def key_column(self) -> str | None:
        """The dataset column whose values key the BV-Blend history, None without keys."""
        return parse_key(self.bv_key)

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self) -> None:
        """Raise ValueError naming the setting for anything that cannot train.

        Long on purpose: one flat list, a line or two per setting in the order of the fields,
        is the easiest way to see which rule applies to which setting."""
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        def positive(name, allow_zero=False):
            value = getattr(self, name)
            if value is None or value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, "
                                 f"got {value!r}")

        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, float) and not math.isfinite(item):
                    raise ValueError(f"{setting.name} must be a finite number, got {item!r}")
        get_task(self.task)
        for name in self.reward_funcs or []:
            get_reward_func(name)
        choice("estimator", ESTIMATORS)
        choice("loss_type", LOSS_TYPES)
        choice("lr_scheduler_type", SCHEDULERS)
        choice("report_to", REPORT_TO)
        choice("bv_scale", SCALE_MODES)
        choice("tiny_arch", ("llama", "qwen2"))
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (a group needs two completions to "
                             f"compare), got {self.num_generations}")
        if self.batch_size <= 0 or self.batch_size % self.num_generations:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of "
                             f"num_generations ({self.num_generations})")
        positive("gradient_accumulation_steps")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by "
                             f"gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        if self.max_completion_length is not None:
            positive("max_completion_length")
        positive("temperature")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        # The estimator's own rules, checked before a model is loaded, in this config's names.
        bv_blend_ext.check_settings(
            window=self.bv_window, ema_decay=self.bv_ema_decay,
            initial_baseline=self.bv_initial_baseline, min_history=self.bv_min_history,
            eps=self.advantage_eps, scale=self.bv_scale, key_ema_decay=self.bv_key_ema_decay,
            key_min_history=self.bv_key_min_history, prefix="bv_",
            names={"eps": "advantage_eps"})
        if self.key_column is not None and self.estimator != "bv_blend":
            # The other estimators keep no history, so keys would be silently meaningless.
            raise ValueError(f"bv_key {self.bv_key!r} needs estimator 'bv_blend' (the only one "
                             f"with a history), got estimator {self.estimator!r}")
        positive("epsilon", allow_zero=True)
        if self.epsilon_high is not None:
            positive("epsilon_high", allow_zero=True)
        positive("beta", allow_zero=True)
        positive("num_iterations")
        positive("learning_rate")
        positive("weight_decay", allow_zero=True)
        positive("warmup_steps", allow_zero=True)
        if self.max_grad_norm is not None:
            positive("max_grad_norm")
        positive("max_steps")
        if self.num_threads is not None:
            positive("num_threads")
        positive("save_steps", allow_zero=True)
        if self.save_total_limit is not None:
            positive("save_total_limit")
        if self.device is not None:
            self._check_device()
        if self.num_prompts is not None:
            positive("num_prompts")
            if self.task == "jsonl":
                raise ValueError("num_prompts applies to the procedural tasks; a JSONL dataset is "
                                 "already a fixed set of prompts")
        if self.task == "jsonl" and not self.dataset_path:
            raise ValueError("task 'jsonl' needs dataset_path (a JSONL file with 'prompt' and "
                             "'answer' columns)")
        if self.reward_weights is not None and self.reward_funcs is not None and \
                len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for "
                             f"{len(self.reward_funcs)} reward_funcs")

    def _check_device(self) -> None:
        # Only the form is checked here; whether such a device exists is known when the run
        # starts (distributed.setup).
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> "GRPOConfig":
        """Build from loosely typed values (YAML, command-line strings), converted per field."""
        unknown = set(values) - set(cls.field_names())
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; see `bv-blend train --help`")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _convert(name, hints[name], v) for name, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "GRPOConfig":
        """Settings from a YAML mapping (field names as keys), then `overrides` on top."""
        import yaml

        if not os.path.isfile(path):
            raise FileNotFoundError(f"config {path!r} is not a file")
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"config {path!r} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config {path!r} must be a YAML mapping of setting: value")
        return cls.from_dict({**values, **overrides})


def _convert(name: str, hint, value):
    """`value` as the field's type. YAML 1.1 reads `1e-3` as a string and the command line gives
    only strings, so numbers and booleans are parsed here, with an error naming the setting."""
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    optional = type(None) in members
    base = next(m for m in members if m is not type(None))
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if not optional:
            raise ValueError(f"{name} cannot be empty")
        return None
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_scalar(name, item, v) for v in items]
    return _scalar(name, base, value)


def _scalar(name: str, kind: type, value):
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if isinstance(value, bool):
            raise ValueError
        if kind is int:
            number = float(value) if isinstance(value, str) and "e" in value.lower() else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}") from None
