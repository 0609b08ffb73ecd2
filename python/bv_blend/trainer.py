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
from bv_blend.keys import KeyMap
from bv_blend.loss import LossOutput, grpo_loss
from bv_blend.metrics import MetricsLog, StepClock, step_row, summary, write_report
from bv_blend.rewards import RewardFunctionError, WeightedRewards, get_reward_func
from bv_blend.sampling import Rollout, sample_completions, token_logprobs
from bv_blend.tasks import ProceduralPrompts, get_task, load_jsonl, prompt_source
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

        self.rewards = self._build_rewards(reward_funcs)
        self.data = self._build_data(train_dataset)
        self.keys, self.record_keys = self._build_keys()
        self.model, self.tokenizer, self.ref_model = self._build_models(model, tokenizer)
        self.autocast_dtype = self._autocast_dtype()
        self.max_completion_length = config.max_completion_length or self.task.max_completion_length
        self.estimator = self._build_estimator()
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = self._build_optimizer()
        self.ddp_model = DistributedDataParallel(self.model) if self.dist.enabled else self.model

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

    def _build_rewards(self, reward_funcs) -> WeightedRewards:
        config = self.config
        if reward_funcs is None:
            reward_funcs = ([get_reward_func(n) for n in config.reward_funcs]
                            if config.reward_funcs else list(self.task.reward_funcs))
        elif callable(reward_funcs):
            reward_funcs = [reward_funcs]
        return WeightedRewards(reward_funcs, config.reward_weights)

    def _build_data(self, train_dataset):
        if train_dataset is None and self.config.dataset_path:
            train_dataset = load_jsonl(self.config.dataset_path)
        return prompt_source(self.task, self.config.seed, train_dataset, self.config.num_prompts)

    def _build_keys(self) -> tuple[KeyMap | None, torch.Tensor | None]:
        """The BV-Blend history keys of the dataset (None without keys) and the key id of every
        record, (len(dataset),) int64."""
        column = self.config.key_column
        if column is None:
            return None, None
        if isinstance(self.data, ProceduralPrompts):
            raise ValueError(f"bv_key {self.config.bv_key!r} needs a finite dataset whose prompts "
                             f"come back every epoch: set num_prompts for the procedural task "
                             f"{self.task.name!r}, or train on a dataset")
        values = []
        for index in range(len(self.data)):
            record = self.data.records[index]
            if column not in record:
                raise ValueError(f"bv_key {self.config.bv_key!r} names the column {column!r}, "
                                 f"which record {index} of the dataset lacks (it has "
                                 f"{sorted(record)})")
            values.append(record[column])
        keys = KeyMap.from_values(values)
        return keys, torch.tensor([keys.id_of(v) for v in values], dtype=torch.int64)

    def _build_models(self, model, tokenizer):
        """The policy on this process's device, its tokenizer, and the frozen reference model
        (None without a KL term)."""
        model, tokenizer = self._load_model(model, tokenizer)
        model.to(self.device)
        # No dropout anywhere: the log-probabilities of the loss must be those of the sampler.
        model.eval()
        ref_model = copy.deepcopy(model).requires_grad_(False) if self.config.beta > 0 else None
        return model, tokenizer, ref_model

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

    def _build_estimator(self) -> AdvantageEstimator:
        config = self.config
        return AdvantageEstimator(
            config.estimator, eps=config.advantage_eps, window=config.bv_window,
            ema_decay=config.bv_ema_decay, min_history=config.bv_min_history,
            initial_baseline=config.bv_initial_baseline, bv_scale=config.bv_scale,
            num_keys=self.keys.num_keys if self.keys is not None else None,
            key_ema_decay=config.bv_key_ema_decay, key_min_history=config.bv_key_min_history)

    def _build_optimizer(self):
        """AdamW and its learning-rate schedule, counted in optimizer updates."""
        from transformers import get_scheduler

        config = self.config
        optimizer = torch.optim.AdamW(
            self.trainable_params, lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
        scheduler = get_scheduler(
            config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps * config.num_iterations)
        return optimizer, scheduler

    def _check_reward_funcs(self) -> None:
        """Score one real group before training, so that a reward function returning the wrong
        length or a non-number fails now rather than after the first generation of a long run.
        The probe runs on its own RNG stream: training samples are the same with or without it."""
        example = self.data[0]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            rollout = self._sample([example], num_generations=2)
        prompts, columns = self._reward_inputs([example], repeat=2)
        self.rewards(prompts, rollout.completions, columns)

    # one step --------------------------------------------------------------------------------

    def step(self) -> dict:
        """One training step; returns its metrics row."""
        group, batch = self.config.num_generations, self.config.batch_size
        clock = StepClock(self.device)
        positions = self._next_positions()
        examples = [self.data[p] for p in positions]
        rollout = self._sample(examples, group)
        clock.lap("generation")
        rewards, rewards_per_func = self._score(examples, rollout.completions)
        clock.lap("rewards")
        keys = self._group_keys(positions)
        keyed_fraction = self._keyed_fraction(keys) if keys is not None else None
        adv = self.estimator(rewards, group, keys=keys)
        clock.lap("advantage")
        self.last_advantages = adv.advantages
        own = slice(self.dist.rank * batch, (self.dist.rank + 1) * batch)  # in the gathered batch
        update = self._optimize(rollout, adv.advantages[own])
        clock.lap("forward_backward")

        self.step_count += 1
        self.data_position += len(examples) * self.dist.world_size
        lengths = distributed.all_gather(self.dist, rollout.completion_mask.sum(1).float())
        return step_row(self.step_count, rewards, rewards_per_func, self.rewards.names, adv,
                        update, learning_rate=self.scheduler.get_last_lr()[0],
                        completion_lengths=lengths, times=clock.times(),
                        keyed_fraction=keyed_fraction)

    def _next_positions(self) -> list[int]:
        """Data positions of this process's prompts of the step: its shard of the next ones of
        all processes."""
        per_process = self.config.batch_size // self.config.num_generations
        first = self.data_position + self.dist.rank * per_process
        return list(range(first, first + per_process))

    def _group_keys(self, positions: list[int]) -> torch.Tensor | None:
        """The history key of every group of the step, all processes' in the order of the
        gathered rewards; None without keys."""
        if self.keys is None:
            return None
        own = self.record_keys[[self.data.index(p) for p in positions]]
        return distributed.all_gather(self.dist, own.to(self.device))

    def _keyed_fraction(self, keys: torch.Tensor) -> float:
        """Fraction of the groups whose key has enough visits to blend with its own history."""
        visits = self.estimator.blend.key_count.to(keys.device)[keys]
        return float((visits >= self.config.bv_key_min_history).float().mean())

    def _sample(self, examples: list[dict], num_generations: int) -> Rollout:
        return sample_completions(
            self.model, self.tokenizer, [e["prompt"] for e in examples],
            num_generations=num_generations, max_completion_length=self.max_completion_length,
            temperature=self.config.temperature, top_p=self.config.top_p,
            autocast_dtype=self.autocast_dtype)

    @staticmethod
    def _reward_inputs(examples: list[dict], repeat: int) -> tuple[list[str], dict[str, list]]:
        """The prompts and every other dataset column, as the reward functions take them: each
        example's values repeated for its `repeat` completions."""
        prompts = [e["prompt"] for e in examples for _ in range(repeat)]
        columns = {key: [e[key] for e in examples for _ in range(repeat)]
                   for key in examples[0] if key != "prompt"}
        return prompts, columns

    def _score(self, examples: list[dict], completions: list[str]):
        """Rewards of every process's completions, in process order: combined (N,) and per
        reward function (N, F)."""
        prompts, columns = self._reward_inputs(examples, repeat=self.config.num_generations)
        error = None
        try:
            rewards, rewards_per_func = self.rewards(prompts, completions, columns)
        except RewardFunctionError as err:
            error = err
        # Every process must leave together, or the others would wait forever in all_gather.
        if distributed.any_rank(self.dist, error is not None):
            raise error or RewardFunctionError("a reward function failed in another process")
        return (distributed.all_gather(self.dist, rewards.to(self.device)),
                distributed.all_gather(self.dist, rewards_per_func.to(self.device)))

    def _optimize(self, rollout: Rollout, advantages: torch.Tensor) -> dict:
        """num_iterations optimizer updates on this process's completions, each accumulating the
        gradients of gradient_accumulation_steps micro-batches. Returns the loss metrics,
        averaged over the updates and the processes."""
        config = self.config
        accumulation = config.gradient_accumulation_steps
        size = config.batch_size // accumulation
        micro_batches = [slice(i * size, (i + 1) * size) for i in range(accumulation)]
        with torch.no_grad():
            # With one update per batch the policy has not moved yet: its own detached
            # log-probabilities are the old ones and save a forward pass.
            old = ([self._logprobs(self.model, rollout, rows) for rows in micro_batches]
                   if config.num_iterations > 1 else [None] * accumulation)
            ref = ([self._logprobs(self.ref_model, rollout, rows) for rows in micro_batches]
                   if self.ref_model is not None else [None] * accumulation)
        tokens = self._tokens_per_process(rollout.completion_mask)

        sums = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "grad_norm": 0.0}
        for _ in range(config.num_iterations):
            for k, rows in enumerate(micro_batches):
                out = self._accumulate_gradients(rollout, rows, advantages[rows], old[k], ref[k],
                                                 tokens, last=k == accumulation - 1)
                sums["loss"] += float(out.loss.detach())
                sums["clip_ratio"] += float(out.clip_ratio) / accumulation
                if out.kl is not None:
                    sums["kl"] += float(out.kl) / accumulation
            sums["grad_norm"] += self._optimizer_step()
        update = {k: distributed.mean_over_ranks(self.dist, v / config.num_iterations)
                  for k, v in sums.items()}
        # Without a reference model there is no KL to report (not a KL of zero).
        if self.ref_model is None:
            update["kl"] = None
        return update

    def _logprobs(self, model, rollout: Rollout, rows: slice) -> torch.Tensor:
        return token_logprobs(model, rollout.input_ids[rows], rollout.attention_mask[rows],
                              rollout.completion_mask.shape[1], self.config.temperature,
                              self.autocast_dtype)

    def _tokens_per_process(self, completion_mask: torch.Tensor) -> float:
        # dapo divides by the tokens of the whole step; DDP then averages over the processes,
        # so each process divides by the global count over the number of processes.
        tokens = distributed.all_reduce_sum(self.dist, completion_mask.sum().float())
        return float(tokens) / self.dist.world_size

    def _accumulate_gradients(self, rollout: Rollout, rows: slice, advantages: torch.Tensor,
                              old_logps, ref_logps, tokens: float, last: bool) -> LossOutput:
        """Forward and backward of one micro-batch. DDP averages the gradients over the
        processes only on the `last` micro-batch of an update."""
        config = self.config
        no_sync = (self.ddp_model.no_sync() if self.dist.enabled and not last
                   else contextlib.nullcontext())
        with no_sync:
            logps = self._logprobs(self.ddp_model, rollout, rows)
            out = grpo_loss(
                logps, old_logps if old_logps is not None else logps.detach(), advantages,
                rollout.completion_mask[rows], loss_type=config.loss_type,
                epsilon_low=config.epsilon, epsilon_high=config.epsilon_upper, beta=config.beta,
                ref_logps=ref_logps, max_completion_length=self.max_completion_length,
                num_items_in_batch=tokens, num_micro_batches=config.gradient_accumulation_steps)
            out.loss.backward()
        return out

    def _optimizer_step(self) -> float:
        """Clip the accumulated gradients, step, and return their norm before clipping."""
        max_norm = self.config.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(
            self.trainable_params, max_norm if max_norm is not None else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

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
                    "key_names": self.keys.names if self.keys is not None else None,
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
        self._check_keys(path, state)
        checkpoint.load_weights(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.estimator.load_state_dict(state["estimator"])
        self.step_count = state["step"]
        self.data_position = state["data_position"]
        checkpoint.set_rng_state(state["rng"][self.dist.rank])
        return state["metrics"]

    def _check_keys(self, path: str, state: dict) -> None:
        """A keyed history only means something for the keys it was built with."""
        saved = state["config"].get("bv_key", "none")
        if saved != self.config.bv_key:
            raise checkpoint.CheckpointError(
                f"resume_from {path!r} was trained with bv_key {saved!r}, not "
                f"{self.config.bv_key!r}: its BV-Blend history cannot be used with other keys")
        if self.keys is not None:
            try:
                self.keys.check_matches(state["key_names"], f"resume_from {path!r}")
            except ValueError as err:
                raise checkpoint.CheckpointError(str(err)) from None

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

