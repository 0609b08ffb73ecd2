"""GRPOTrainer: the training loop, one readable step at a time.

A step: take the next prompts (each process its own shard), sample `num_generations`
completions per prompt, score them, gather every process's rewards, compute advantages with the
chosen estimator (identically on every process, so the BV-Blend history stays in lockstep), then
make `num_iterations` optimizer updates on the clipped surrogate, each over
`gradient_accumulation_steps` micro-batches.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import threading
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from bv_blend import checkpoint, distributed
from bv_blend.advantages import AdvantageEstimator
from bv_blend.config import GRPOConfig
from bv_blend.loss import grpo_loss
from bv_blend.metrics import MetricsLog, summary, write_report
from bv_blend.rewards import RewardFunctionError, WeightedRewards, get_reward_func
from bv_blend.sampling import sample_completions, token_logprobs
from bv_blend.tasks import get_task, load_jsonl, prompt_source
from bv_blend.tiny_model import build_tiny_model, load_model_and_tokenizer


class GRPOTrainer:
    def __init__(self, model=None, tokenizer=None, reward_funcs=None, train_dataset=None,
                 config: GRPOConfig | None = None):
        """model: a causal LM object or a path (default: config.model, where 'tiny' builds one);
        reward_funcs: callables with TRL's signature (default: config.reward_funcs by name, else
        the task's); train_dataset: rows with a 'prompt' column and the columns the reward
        functions read (default: the task's generator, or config.dataset_path)."""
        self.config = config = config if config is not None else GRPOConfig()
        config.validate()
        self.task = get_task(config.task)
        if config.num_threads is not None:
            # Process-wide. Small models gain nothing from intra-op threads, and on a busy machine
            # threads waiting for each other make every step many times slower.
            torch.set_num_threads(config.num_threads)
        self.dist = distributed.setup(config.device)
        self.device = self.dist.device
        self._prepare_output_dir()
        resume_path = checkpoint.resolve(config.resume_from) if config.resume_from else None
        checkpoint.seed_everything(config.seed + self.dist.rank)

        if reward_funcs is None:
            reward_funcs = ([get_reward_func(n) for n in config.reward_funcs]
                            if config.reward_funcs else list(self.task.reward_funcs))
        elif callable(reward_funcs):
            reward_funcs = [reward_funcs]
        self.rewards = WeightedRewards(reward_funcs, config.reward_weights)
        if train_dataset is None and config.dataset_path:
            train_dataset = load_jsonl(config.dataset_path)
        self.data = prompt_source(self.task, config.seed, train_dataset)

        self.model, self.tokenizer = self._load_model(model, tokenizer)
        self.model.to(self.device)
        # No dropout anywhere: the log-probabilities of the loss must be those of the sampler.
        self.model.eval()
        self.ref_model = None
        if config.beta > 0:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False)
        self.autocast_dtype = self._autocast_dtype()
        self.max_completion_length = (config.max_completion_length
                                      or self.task.max_completion_length)

        self.estimator = AdvantageEstimator(
            config.estimator, eps=config.advantage_eps, window=config.bv_window,
            ema_decay=config.bv_ema_decay, min_history=config.bv_min_history,
            initial_baseline=config.bv_initial_baseline, bv_scale=config.bv_scale)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
        from transformers import get_scheduler
        self.scheduler = get_scheduler(
            config.lr_scheduler_type, self.optimizer, num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps * config.num_iterations)
        self.ddp_model = (DistributedDataParallel(self.model) if self.dist.enabled
                          else self.model)

        self.step_count = 0
        self.data_position = 0  # prompts consumed by all processes together
        self.last_advantages = None  # the whole step's advantages, for inspection and tests
        self._check_reward_funcs()
        previous_rows = self._resume(resume_path) if resume_path else []
        self.metrics = MetricsLog(config.output_dir, enabled=self.dist.is_main,
                                  report_to=config.report_to, previous_rows=previous_rows)

    # setup -----------------------------------------------------------------------------------

    def _prepare_output_dir(self) -> None:
        """Create output_dir now, so that an unusable one fails before the model is loaded rather
        than at the first checkpoint. Every process learns of a failure on the main one."""
        problem = checkpoint.output_dir_problem(self.config.output_dir) if self.dist.is_main \
            else None
        if distributed.any_rank(self.dist, problem is not None):
            raise ValueError(f"output_dir {self.config.output_dir!r} "
                             f"{problem or 'cannot be used by the main process'}")

    def _load_model(self, model, tokenizer):
        config = self.config
        if model is None:
            model = config.model
        if not isinstance(model, str):
            if tokenizer is None:
                raise ValueError("tokenizer is required when model is given as an object")
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return model, tokenizer
        if model == "tiny":
            model = os.path.join(config.output_dir, "tiny_model")
            if self.dist.is_main:
                build_tiny_model(model, arch=config.tiny_arch, seed=config.seed)
            distributed.barrier(self.dist)
        loaded, loaded_tokenizer = load_model_and_tokenizer(model)
        return loaded, tokenizer if tokenizer is not None else loaded_tokenizer

    def _autocast_dtype(self):
        bf16 = self.config.bf16
        if bf16 is None:
            bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None

    def _check_reward_funcs(self) -> None:
        """Score one real group before training, so that a reward function returning the wrong
        length or a non-number fails now rather than after the first generation of a long run.
        The probe runs on its own RNG stream: training samples are the same with or without it."""
        example = self.data[0]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            rollout = sample_completions(
                self.model, self.tokenizer, [example["prompt"]], num_generations=2,
                max_completion_length=self.max_completion_length,
                temperature=self.config.temperature, top_p=self.config.top_p,
                autocast_dtype=self.autocast_dtype)
        self.rewards([example["prompt"]] * 2, rollout.completions, self._columns([example], 2))

    @staticmethod
    def _columns(examples: list[dict], repeat: int) -> dict[str, list]:
        return {key: [e[key] for e in examples for _ in range(repeat)]
                for key in examples[0] if key != "prompt"}

    # one step --------------------------------------------------------------------------------

    def _sync(self) -> None:
        # Timings of asynchronous CUDA work are only meaningful after a synchronisation.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> dict:
        """One training step; returns its metrics row."""
        config = self.config
        group = config.num_generations
        per_rank = config.batch_size // group
        start = time.perf_counter()

        first = self.data_position + self.dist.rank * per_rank
        examples = [self.data[first + i] for i in range(per_rank)]
        prompts = [e["prompt"] for e in examples]
        rollout = sample_completions(
            self.model, self.tokenizer, prompts, num_generations=group,
            max_completion_length=self.max_completion_length, temperature=config.temperature,
            top_p=config.top_p, autocast_dtype=self.autocast_dtype)
        self._sync()
        t_generated = time.perf_counter()

        error = None
        try:
            rewards, per_func = self.rewards([p for p in prompts for _ in range(group)],
                                             rollout.completions, self._columns(examples, group))
        except RewardFunctionError as err:
            error = err
        # Every process must leave together, or the others would wait forever in all_gather.
        if distributed.any_rank(self.dist, error is not None):
            raise error or RewardFunctionError("a reward function failed in another process")
        rewards = distributed.all_gather(self.dist, rewards.to(self.device))
        per_func = distributed.all_gather(self.dist, per_func.to(self.device))
        t_rewarded = time.perf_counter()

        adv = self.estimator(rewards, group)
        self._sync()
        t_advantaged = time.perf_counter()
        self.last_advantages = adv.advantages
        rank = self.dist.rank
        local = adv.advantages[rank * config.batch_size:(rank + 1) * config.batch_size]
        update = self._optimize(rollout, local)
        self._sync()
        t_end = time.perf_counter()

        self.step_count += 1
        self.data_position += per_rank * self.dist.world_size
        lengths = distributed.all_gather(self.dist, rollout.completion_mask.sum(1).float())
        std = adv.group_std
        row = {
            "step": self.step_count,
            "reward_mean": _nanmean(rewards),
            "reward_std": _nanstd(rewards),
            "reward_group_std_mean": _nanmean(std),
            "frac_reward_zero_std": float(((std == 0) | std.isnan()).float().mean()),
            "frac_reward_unscored": float(rewards.isnan().float().mean()),
            "history_weight_mean": _nanmean(adv.beta),
            "history_mean": adv.history_mean,
            "history_var": adv.history_var,
            "advantage_abs_max": float(adv.advantages.abs().max()),
            **{f"reward/{name}": _nanmean(per_func[:, i])
               for i, name in enumerate(self.rewards.names)},
            **update,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "completion_length": float(lengths.mean()),
            "step_time": t_end - start,
            "step_time_generation": t_generated - start,
            "step_time_rewards": t_rewarded - t_generated,
            "step_time_advantage": t_advantaged - t_rewarded,
            "step_time_forward_backward": t_end - t_advantaged,
        }
        return row

    def _optimize(self, rollout, advantages: torch.Tensor) -> dict:
        config = self.config
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
        mask = rollout.completion_mask
        num_tokens = mask.shape[1]
        accumulation = config.gradient_accumulation_steps
        micro = config.batch_size // accumulation
        chunks = [slice(i * micro, (i + 1) * micro) for i in range(accumulation)]

        def logprobs(model, rows):
            return token_logprobs(model, input_ids[rows], attention_mask[rows], num_tokens,
                                  config.temperature, self.autocast_dtype)

        with torch.no_grad():
            # With one update per batch the policy has not moved yet: its own detached
            # log-probabilities are the old ones and save a forward pass.
            old = ([logprobs(self.model, rows) for rows in chunks]
                   if config.num_iterations > 1 else None)
            ref = ([logprobs(self.ref_model, rows) for rows in chunks]
                   if self.ref_model is not None else None)
        # dapo divides by the tokens of the whole step; DDP then averages over the processes,
        # so each process divides by the global count over the number of processes.
        items = (float(distributed.all_reduce_sum(self.dist, mask.sum().float()))
                 / self.dist.world_size)

        sums = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "grad_norm": 0.0}
        params = [p for p in self.model.parameters() if p.requires_grad]
        for _ in range(config.num_iterations):
            for k, rows in enumerate(chunks):
                last = k == accumulation - 1
                no_sync = (self.ddp_model.no_sync() if self.dist.enabled and not last
                           else contextlib.nullcontext())
                with no_sync:
                    logps = logprobs(self.ddp_model, rows)
                    out = grpo_loss(
                        logps, old[k] if old is not None else logps.detach(), advantages[rows],
                        mask[rows], loss_type=config.loss_type, epsilon_low=config.epsilon,
                        epsilon_high=config.epsilon_upper, beta=config.beta,
                        ref_logps=ref[k] if ref is not None else None,
                        max_completion_length=self.max_completion_length,
                        num_items_in_batch=items)
                    loss = out.loss if config.loss_type == "dapo" else out.loss / accumulation
                    loss.backward()
                sums["loss"] += float(loss.detach())
                sums["clip_ratio"] += float(out.clip_ratio) / accumulation
                if out.kl is not None:
                    sums["kl"] += float(out.kl) / accumulation
            max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        update = {k: distributed.mean_over_ranks(self.dist, v / config.num_iterations)
                  for k, v in sums.items()}
        # Without a reference model there is no KL to report (not a KL of zero).
        if self.ref_model is None:
            update["kl"] = None
        return update

    # checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> str | None:
        """Write checkpoint-<step> (main process; every process contributes its RNG state)."""
        rng_states = distributed.gather_objects(self.dist, checkpoint.rng_state())
        path = None
        if self.dist.is_main:
            path = checkpoint.save(
                self.config.output_dir, self.step_count, model=self.model,
                tokenizer=self.tokenizer, trainer_state={
                    "step": self.step_count,
                    "data_position": self.data_position,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "estimator": self.estimator.state_dict(),
                    "rng": rng_states,
                    "metrics": self.metrics.rows,
                    "config": self.config.to_dict(),
                })
            if self.config.save_total_limit is not None:
                checkpoint.prune(self.config.output_dir, self.config.save_total_limit,
                                 newest=self.step_count)
        distributed.barrier(self.dist)
        return path

    def _resume(self, path: str) -> list[dict]:
        state = checkpoint.load_state(path)
        if len(state["rng"]) != self.dist.world_size:
            raise checkpoint.CheckpointError(
                f"resume_from {path!r} was saved by {len(state['rng'])} process(es); resume it "
                f"with the same number (now {self.dist.world_size})")
        checkpoint.load_weights(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.estimator.load_state_dict(state["estimator"])
        self.step_count = state["step"]
        self.data_position = state["data_position"]
        checkpoint.set_rng_state(state["rng"][self.dist.rank])
        return state["metrics"]

    # the loop --------------------------------------------------------------------------------

    def _run_steps(self, bar, signals: "StopOnSignal") -> None:
        config = self.config
        while self.step_count < config.max_steps:
            row = self.step()
            self.metrics.log(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}",
                            history_weight=f"{row['history_weight_mean']:.2f}")
            if self.step_count == config.max_steps:
                return
            # Processes may get a signal at different moments (or only one of them gets it):
            # agreeing after every step makes them all stop after the same one.
            received = distributed.max_over_ranks(self.dist, signals.received)
            if received:
                self.save_checkpoint()
                path = os.path.join(config.output_dir, f"checkpoint-{self.step_count}")
                raise TrainingInterrupted(received, self.step_count, path)
            if config.save_steps and self.step_count % config.save_steps == 0:
                self.save_checkpoint()

    def train(self) -> list[dict]:
        """Run to max_steps, checkpointing every save_steps and at the end; returns all metrics
        rows (including those restored from a checkpoint).

        The first SIGINT or SIGTERM stops the run after the current step (on every process at
        the same step), saves a checkpoint and raises TrainingInterrupted; the previous signal
        handlers are restored on the way out. A signal during the last step lets the run end
        normally."""
        from tqdm.auto import tqdm

        config = self.config
        bar = tqdm(total=config.max_steps, initial=self.step_count, desc="GRPO",
                   disable=not (config.progress_bar and self.dist.is_main))
        started = time.perf_counter()
        first_step = self.step_count + 1
        with StopOnSignal(announce=self.dist.is_main) as signals:
            try:
                self._run_steps(bar, signals)
            finally:
                bar.close()
                self.metrics.close()
            if self.step_count >= first_step:
                self.save_checkpoint()
        if self.dist.is_main:
            write_report(self.metrics.rows, os.path.join(config.output_dir, "report.png"))
            ran = [r for r in self.metrics.rows if r["step"] >= first_step]
            print(summary(ran, time.perf_counter() - started), flush=True)
        return self.metrics.rows


class TrainingInterrupted(Exception):
    """train() stopped early on a signal, after saving a checkpoint of the last finished step."""

    def __init__(self, signal_number: int, step: int, checkpoint_path: str):
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint_path
        # The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM.
        self.exit_code = 128 + signal_number
        super().__init__(f"{signal.Signals(signal_number).name} received: stopped after step "
                         f"{step}; checkpoint saved in {checkpoint_path} (continue with "
                         f"--resume-from {checkpoint_path})")


class StopOnSignal:
    """While active, SIGINT and SIGTERM only record that the run should stop (`received`, the
    first signal's number, 0 before any). Later signals are ignored: torchrun forwards a Ctrl-C
    that its workers already got from the terminal, and that must not abort the final save."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.received = 0
        self._previous = {}

    def __enter__(self) -> "StopOnSignal":
        # Python lets only the main thread install handlers; elsewhere signals keep their meaning.
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be reinstalled from here.
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def handle(self, signal_number: int, frame=None) -> None:
        if self.announce:
            name = signal.Signals(signal_number).name
            message = ("stopping after the current step and saving a checkpoint"
                       if not self.received else "already stopping after the current step")
            print(f"\nbv-blend: {name} received: {message}", file=sys.stderr, flush=True)
        self.received = self.received or signal_number


def _nanmean(values: torch.Tensor) -> float:
    return float(values.float().nanmean())


def _nanstd(values: torch.Tensor) -> float:
    valid = values[~values.isnan()].float()
    return float(valid.std()) if valid.numel() > 1 else 0.0
