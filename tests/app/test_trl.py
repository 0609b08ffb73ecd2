"""BVBlendGRPOTrainer against real TRL: a tiny random model trained for a few steps on the CPU.

Run as a script (`python tests/test_trl.py OUT_DIR MODEL_DIR`) this file is also the worker of
the two-process test, launched with torch.distributed.run.
"""

import os
import subprocess
import sys

import pytest

# Before anything imports huggingface_hub, which reads it once: nothing may be downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from bv_blend.tiny_model import build_tiny_model, load_model_and_tokenizer  # noqa: E402
from bv_blend.trl import (  # noqa: E402
    STATE_FILE, SUPPORTED_TRL, BVBlendGRPOConfig, BVBlendGRPOTrainer, check_trl_version)
from bv_blend.keys import key_name  # noqa: E402
from bv_blend_ext.reference import (  # noqa: E402
    DEFAULT_SCALE, HistoryReference, KeyedHistoryReference, blend_advantages)

REWARD_WEIGHTS = [1.0, 0.5]
PROMPTS = ["hello", "abc", "the cat", "xyz", "1 + 1 =", "Once upon", "def f(", "Q:"]


def letters_reward(completions, completion_ids, **kwargs):
    """0.25 per lowercase letter; None (unscorable by every function) when the first token id is a
    multiple of 4, so some rows carry TRL's all-NaN semantics."""
    return [None if ids[0] % 4 == 0 else 0.25 * sum(c.islower() for c in text)
            for text, ids in zip(completions, completion_ids)]


def starts_with_letter_reward(completions, completion_ids, **kwargs):
    """1 when the completion starts with a letter; None on the unscorable rows and, to exercise a
    partly missing reward (nansum), on rows whose last token id is 1 mod 4."""
    return [None if ids[0] % 4 == 0 or ids[-1] % 4 == 1 else float(text[:1].isalpha())
            for text, ids in zip(completions, completion_ids)]


REWARD_FUNCS = [letters_reward, starts_with_letter_reward]


def make_args(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir), num_generations=4, per_device_train_batch_size=8,
        max_completion_length=8, max_steps=3, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        # A window shorter than the 8 group means of a 4-step run, so the ring wraps around.
        reward_weights=REWARD_WEIGHTS, bv_window=6)
    settings.update(overrides)
    return BVBlendGRPOConfig(**settings)


def trl_reward(rewards_per_func):
    """TRL's sum_then_normalize reward: weighted nansum, NaN where every function gave None."""
    rewards = (rewards_per_func * torch.tensor(REWARD_WEIGHTS)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    return rewards


class RecordingTrainer(BVBlendGRPOTrainer):
    """Records, per generation batch, the history before it, the gathered rewards and the local
    advantages handed to the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def _calculate_rewards(self, *args):
        rewards_per_func = super()._calculate_rewards(*args)
        self.calls[-1]["rewards_per_func"] = rewards_per_func.detach().cpu().clone()
        return rewards_per_func

    def _bv_group_keys(self, inputs):
        keys = super()._bv_group_keys(inputs)
        self.calls[-1]["keys"] = None if keys is None else keys.cpu().clone()
        self.calls[-1]["rows"] = [dict(row) for row in inputs]
        return keys

    def _generate_and_score_completions(self, inputs):
        state = {k: v.detach().cpu().clone() for k, v in self.bv_blend.state_dict().items()}
        self.calls.append({"state_before": state,
                           "history_mean": self.bv_blend.history_mean.item(),
                           "history_var": self.bv_blend.history_var.item()})
        output = super()._generate_and_score_completions(inputs)
        self.calls[-1]["advantages"] = output["advantages"].detach().cpu().clone()
        return output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), arch="llama", seed=0)


def make_trainer(model_dir, args, reward_funcs=REWARD_FUNCS, dataset=None, **kwargs):
    model, tokenizer = load_model_and_tokenizer(model_dir)
    dataset = dataset if dataset is not None else Dataset.from_dict({"prompt": PROMPTS * 4})
    return RecordingTrainer(model=model, processing_class=tokenizer, reward_funcs=reward_funcs,
                            args=args, train_dataset=dataset, **kwargs)


@pytest.fixture
def trl_advantages(monkeypatch):
    """The advantages TRL itself computes inside each BVBlendGRPOTrainer generation batch."""
    recorded = []
    original = GRPOTrainer._generate_and_score_completions

    def recording(self, inputs):
        output = original(self, inputs)
        recorded.append(output["advantages"].detach().cpu().clone())
        return output

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", recording)
    return recorded


def replay_reference(calls, args, group_size):
    """Advantages and final history from the contract's reference, fed the gathered rewards."""
    reference = HistoryReference(window=args.bv_window, ema_decay=args.bv_ema_decay,
                                 initial_baseline=args.bv_initial_baseline,
                                 min_history=args.bv_min_history)
    advantages = [reference.step(trl_reward(call["rewards_per_func"]), group_size,
                                 eps=args.bv_eps, scale=args.bv_scale).advantages
                  for call in calls]
    return advantages, reference


def assert_history_matches(history_mean, history_var, reference):
    assert history_mean == pytest.approx(reference.ema, rel=1e-6, abs=1e-9)
    assert history_var == pytest.approx(reference.variance, rel=1e-6, abs=1e-9)


def test_version_check_names_the_supported_range():
    for good in ("1.16.0", "1.16.7"):
        check_trl_version(good)
    for bad in ("1.15.2", "1.17.0", "1.17.0.dev0", "2.0.0", "unknown"):
        with pytest.raises(ImportError, match=r"trl>=1\.16,<1\.17"):
            check_trl_version(bad)
    assert SUPPORTED_TRL == ">=1.16,<1.17"


def test_import_fails_with_unsupported_trl(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    monkeypatch.delitem(sys.modules, "bv_blend.trl")
    with pytest.raises(ImportError, match=r"supports trl>=1\.16,<1\.17 but trl 1\.17\.0"):
        import bv_blend.trl  # noqa: F401


def test_config_defaults_follow_the_op(tmp_path):
    args = make_args(tmp_path)
    assert args.bv_scale == DEFAULT_SCALE == "none" and args.bv_key == "none"


def test_config_rejects_settings_the_integration_cannot_honour(tmp_path):
    with pytest.raises(ValueError, match="bv_scale"):
        make_args(tmp_path, bv_scale="std")
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        make_args(tmp_path, multi_objective_aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match="bv_key must be"):
        make_args(tmp_path, bv_key="column:")
    with pytest.raises(ValueError, match="bv_key 'prompt' needs bv_use_history=True"):
        make_args(tmp_path, bv_key="prompt", bv_use_history=False)
    with pytest.raises(ValueError, match=r"\bbv_key_ema_decay\b"):
        make_args(tmp_path, bv_key_ema_decay=0.0)
    with pytest.raises(ValueError, match=r"\bbv_key_min_history\b"):
        make_args(tmp_path, bv_key_min_history=-1)


def test_trainer_requires_the_bv_blend_config(model_dir, tmp_path):
    args = trl.GRPOConfig(output_dir=str(tmp_path), num_generations=4,
                          per_device_train_batch_size=8, use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match="BVBlendGRPOConfig"):
        make_trainer(model_dir, args)


def test_training_updates_parameters_and_logs_bv_metrics(model_dir, tmp_path):
    trainer = make_trainer(model_dir, make_args(tmp_path))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    changed = [name for name, p in trainer.model.named_parameters()
               if not torch.equal(before[name], p.detach())]
    assert changed, "no parameter moved in three GRPO steps"

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry, call in zip(logs, trainer.calls):
        # One generation batch per step: each log holds exactly the history that batch used.
        assert entry["bv_blend/history_mean"] == pytest.approx(call["history_mean"])
        assert entry["bv_blend/history_var"] == pytest.approx(call["history_var"])
        assert 0.0 <= entry["bv_blend/history_weight_mean"] <= 1.0
    first, last = logs[0], logs[-1]
    assert first["bv_blend/history_var"] == 0.0 and first["bv_blend/history_weight_mean"] == 0.0
    assert last["bv_blend/history_var"] > 0.0 and last["bv_blend/history_weight_mean"] > 0.0


@pytest.mark.parametrize("bv_scale, scale_rewards",
                         [("blend", "group"), ("group", "group"), ("batch", "batch"),
                          ("none", "none")])
def test_history_off_reproduces_trl_advantages(model_dir, tmp_path, trl_advantages, bv_scale,
                                               scale_rewards):
    args = make_args(tmp_path, bv_use_history=False, bv_scale=bv_scale,
                     scale_rewards=scale_rewards, max_steps=2)
    trainer = make_trainer(model_dir, args)
    trainer.train()

    assert len(trl_advantages) == len(trainer.calls) == 2
    for ours, theirs in zip((c["advantages"] for c in trainer.calls), trl_advantages):
        # Up to float32 rounding: the op and TRL sum the group statistics in a different order.
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert int(trainer.bv_blend.state_dict()["count"]) == 0, "history moved while disabled"


def test_history_on_follows_the_contract_and_departs_from_trl(model_dir, tmp_path,
                                                               trl_advantages):
    args = make_args(tmp_path, max_steps=4)
    trainer = make_trainer(model_dir, args)
    trainer.train()

    expected, reference = replay_reference(trainer.calls, args, args.num_generations)
    for call, adv in zip(trainer.calls, expected):
        torch.testing.assert_close(call["advantages"], adv, rtol=1e-5, atol=1e-5)
    assert_history_matches(trainer.bv_blend.history_mean.item(),
                           trainer.bv_blend.history_var.item(), reference)
    assert int(trainer.bv_blend.state_dict()["count"]) == reference.count == 8

    # Once the window holds two group means, the history moves the advantages off TRL's.
    last = trainer.calls[-1]["advantages"]
    assert not torch.allclose(last, trl_advantages[-1], rtol=1e-3, atol=1e-3)
    # The completions-table log (one generation batch long) shows the advantages trained on.
    assert list(trainer._logs["advantages"]) == last.tolist()

    # TRL's NaN semantics survive: unscorable rows get a zero advantage (the fixture's reward
    # functions produced some, which keeps this check meaningful).
    rewards_per_func = torch.cat([c["rewards_per_func"] for c in trainer.calls])
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    partly_missing = torch.isnan(rewards_per_func).any(dim=1) & ~unscorable
    assert unscorable.any() and partly_missing.any()
    assert (torch.cat([c["advantages"] for c in trainer.calls])[unscorable] == 0).all()


def test_evaluation_uses_but_does_not_move_the_history(model_dir, tmp_path):
    args = make_args(tmp_path, max_steps=3, per_device_eval_batch_size=8)
    trainer = make_trainer(model_dir, args, eval_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    trainer.train()
    state = {k: v.clone() for k, v in trainer.bv_blend.state_dict().items()}
    hist_mean, hist_var = trainer.bv_blend.history_mean.item(), trainer.bv_blend.history_var.item()
    metrics = trainer.evaluate()

    for key, value in trainer.bv_blend.state_dict().items():
        assert torch.equal(value, state[key]), f"evaluation changed the history's {key}"
    assert hist_var > 0
    assert metrics["eval_bv_blend/history_var"] == pytest.approx(hist_var)
    assert metrics["eval_bv_blend/history_mean"] == pytest.approx(hist_mean)
    # The evaluation batches were blended with that history, as the reference does it.
    for call in trainer.calls[3:]:
        rewards = trl_reward(call["rewards_per_func"])
        out = blend_advantages(rewards, args.num_generations, hist_mean=hist_mean,
                               hist_var=hist_var, eps=args.bv_eps,
                               scale=args.bv_scale)
        torch.testing.assert_close(call["advantages"], out.advantages, rtol=1e-5, atol=1e-5)


def test_history_survives_save_and_resume(model_dir, tmp_path):
    first = make_trainer(model_dir, make_args(tmp_path, max_steps=2, save_strategy="steps",
                                              save_steps=2))
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    # One generation per step here, so every checkpoint is at a buffer boundary and holds the
    # live history.
    for key, value in first.bv_blend.state_dict().items():
        assert torch.equal(saved["estimator"][key], value), f"checkpoint holds a stale {key}"
    assert int(saved["estimator"]["count"]) == 4  # two steps of two groups
    assert saved["trl_step"] == 2

    resumed = make_trainer(model_dir, make_args(tmp_path, max_steps=4))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(resumed.calls) == 2, "resume should run only steps 3 and 4"
    for key, value in saved["estimator"].items():
        assert torch.equal(resumed.calls[0]["state_before"][key], value), \
            f"resumed training did not start from the saved {key}"
    assert int(resumed.bv_blend.state_dict()["count"]) == 8


TOPICS = ["greeting", "letters", "animal", "letters", "math", "story", "code", "math"]


@pytest.mark.parametrize("bv_key, column", [("prompt", "prompt"), ("topic", "topic"),
                                            ("column:topic", "topic")])
def test_keys_are_stable_ids_per_prompt_or_column(model_dir, tmp_path, bv_key, column):
    dataset = Dataset.from_dict({"prompt": PROMPTS * 4, "topic": TOPICS * 4})
    args = make_args(tmp_path, max_steps=4, bv_key=bv_key)
    trainer = make_trainer(model_dir, args, dataset=dataset)
    values = PROMPTS if column == "prompt" else TOPICS
    # Ids in order of first appearance in the dataset, one per distinct value.
    assert trainer.bv_keys.names == list(dict.fromkeys(key_name(v) for v in values))
    trainer.train()

    reference = KeyedHistoryReference(trainer.bv_keys.num_keys, key_ema_decay=args.bv_key_ema_decay,
                                      key_min_history=args.bv_key_min_history,
                                      window=args.bv_window)
    for call in trainer.calls:
        # Each group's key is its row's value, whichever batch position the row came in.
        group_values = [row[column] for row in call["rows"][::args.num_generations]]
        assert call["keys"].tolist() == [trainer.bv_keys.id_of(v) for v in group_values]
        out = reference.step(trl_reward(call["rewards_per_func"]), args.num_generations,
                             keys=call["keys"], eps=args.bv_eps, scale=args.bv_scale)
        torch.testing.assert_close(call["advantages"], out.advantages, rtol=1e-5, atol=1e-5)
    state = trainer.bv_blend.state_dict()
    assert state["key_count"].tolist() == reference.key_count
    assert sum(reference.key_count) == 8  # 4 steps of 2 groups
    torch.testing.assert_close(state["key_mean"], torch.tensor(reference.key_mean,
                                                               dtype=torch.float64))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(0 <= entry["bv_blend/keyed_fraction"] <= 1 for entry in logs)
    assert logs[0]["bv_blend/keyed_fraction"] == 0


def test_keys_need_a_column_of_a_map_style_dataset(model_dir, tmp_path):
    with pytest.raises(ValueError, match="train_dataset has no column 'topic'"):
        make_trainer(model_dir, make_args(tmp_path, bv_key="topic"))
    iterable = Dataset.from_dict({"prompt": PROMPTS}).to_iterable_dataset()
    with pytest.raises(ValueError, match="needs a map-style datasets.Dataset"):
        make_trainer(model_dir, make_args(tmp_path, bv_key="prompt"), dataset=iterable)


def test_resume_on_other_keys_is_refused(model_dir, tmp_path):
    make_trainer(model_dir, make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1,
                                      bv_key="prompt")).train()
    checkpoint = tmp_path / "checkpoint-1"
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert saved["key_names"] == [key_name(p) for p in PROMPTS]
    assert not list(tmp_path.glob(f"checkpoint-1/{STATE_FILE}.tmp"))

    other = Dataset.from_dict({"prompt": PROMPTS[::-1] * 4})
    resumed = make_trainer(model_dir, make_args(tmp_path, max_steps=2, bv_key="prompt"),
                           dataset=other)
    with pytest.raises(ValueError, match=r"other history keys than this dataset gives \(key id 0 "
                                         r"was \"hello\" and is now \"Q:\"\)"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    unkeyed = make_trainer(model_dir, make_args(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="saved with a bv_key and this run has bv_key='none'"):
        unkeyed.train(resume_from_checkpoint=str(checkpoint))


def prompt_length_reward(prompts, **kwargs):
    """Depends on the prompt only, so a regenerated buffer scores exactly as the original did.

    The regenerated completions themselves differ: the resumed run samples with the RNG state
    saved at the checkpoint, not the one the original generation drew from (they differ even at
    learning_rate=0), and with weights that the steps since then have moved.
    """
    return [len(prompt) / 8 for prompt in prompts]


# Generation schedules where one generation feeds several optimizer steps. Each micro-step
# trains one group of 4 (per_device_train_batch_size=4 = num_generations), so a buffer of
# steps_per_generation micro-steps pushes that many group means.
BUFFERED = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2,
                steps_per_generation=4)


@pytest.mark.parametrize("settings, checkpoints, max_steps, reward_funcs", [
    # Step 2 ends the first buffer (micro-steps 0-3): the resumed run generates only the second
    # buffer, like the uninterrupted run and with the same weights and RNG state, so even
    # rewards of the sampled text are identical.
    pytest.param(BUFFERED, [2], 4, REWARD_FUNCS, id="boundary"),
    # Step 1 is half-way through the first buffer, which the resumed run generates again.
    pytest.param(BUFFERED, [1], 4, [prompt_length_reward], id="mid-buffer"),
    # The same with a history per prompt: the key buffers are saved as of before the buffer too.
    pytest.param(dict(BUFFERED, bv_key="prompt"), [1], 4, [prompt_length_reward],
                 id="mid-buffer-keyed"),
    pytest.param(dict(BUFFERED, bv_key="prompt"), [2], 4, REWARD_FUNCS, id="boundary-keyed"),
    # A buffer serves steps_per_generation x num_iterations = 4 micro-steps: step 1 is half-way
    # through it although each pass over it is 2 micro-steps long.
    pytest.param(dict(BUFFERED, steps_per_generation=2, num_iterations=2), [1], 4,
                 [prompt_length_reward], id="num_iterations"),
    # Buffers of 3 steps (micro-steps 0-5, 6-11), resumed three times: from mid-buffer, again
    # before the regenerated buffer is used up, then from the middle of the second buffer.
    pytest.param(dict(BUFFERED, steps_per_generation=6), [1, 2, 4], 6,
                 [prompt_length_reward], id="resumed-repeatedly"),
    # The resumed run replays the data from the start of the epoch, i.e. from the first buffer,
    # which is also the one step 1 is in: both runs then generate the same two buffers.
    pytest.param(dict(BUFFERED, ignore_data_skip=True), [1], 4, [prompt_length_reward],
                 id="ignore_data_skip"),
])
def test_resumed_run_ends_with_the_uninterrupted_history(model_dir, tmp_path, settings,
                                                         checkpoints, max_steps, reward_funcs):
    def train(output_dir, steps, resume=None, **overrides):
        args = make_args(output_dir, max_steps=steps, reward_weights=None, **settings,
                         **overrides)
        trainer = make_trainer(model_dir, args, reward_funcs=reward_funcs)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = train(tmp_path / "straight", max_steps)
    expected = straight.bv_blend.state_dict()
    # One group mean per micro-step, except that num_iterations passes share a generation (every
    # group here has a scorable completion).
    assert int(expected["count"]) == max_steps * settings["gradient_accumulation_steps"] \
        // settings.get("num_iterations", 1)

    resume = None
    for step in checkpoints:
        train(tmp_path / "run", step, resume, save_strategy="steps", save_steps=step)
        resume = str(tmp_path / "run" / f"checkpoint-{step}")
    resumed = train(tmp_path / "run", max_steps, resume).bv_blend.state_dict()

    assert int(resumed["count"]) == int(expected["count"])
    # The same rewards were pushed in the same order: the ring, the EMA and σ_u² are bitwise equal.
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), f"resumed history differs in {key}"


def test_resume_without_state_file_warns_and_starts_empty(model_dir, tmp_path, caplog):
    first = make_trainer(model_dir, make_args(tmp_path, max_steps=1, save_strategy="steps",
                                              save_steps=1))
    first.train()
    assert int(first.bv_blend.state_dict()["count"]) == 2
    # As if the checkpoint had been written by plain GRPOTrainer.
    checkpoint = tmp_path / "checkpoint-1"
    (checkpoint / STATE_FILE).unlink()

    resumed = make_trainer(model_dir, make_args(tmp_path, max_steps=2))
    with caplog.at_level("WARNING", logger="bv_blend.trl"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert any(STATE_FILE in record.getMessage() and "empty history" in record.getMessage()
               for record in caplog.records)
    assert len(resumed.calls) == 1
    assert int(resumed.calls[0]["state_before"]["count"]) == 0
    assert int(resumed.bv_blend.state_dict()["count"]) == 2


def test_resume_from_a_state_file_of_the_older_format(model_dir, tmp_path, caplog):
    first = make_trainer(model_dir, make_args(tmp_path, max_steps=1, save_strategy="steps",
                                              save_steps=1))
    first.train()
    checkpoint = tmp_path / "checkpoint-1"
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    torch.save(saved["estimator"], checkpoint / STATE_FILE)  # the bare history, as written before

    resumed = make_trainer(model_dir, make_args(tmp_path, max_steps=2))
    with caplog.at_level("WARNING", logger="bv_blend.trl"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert any("micro-step" in record.getMessage() for record in caplog.records)
    for key, value in saved["estimator"].items():
        assert torch.equal(resumed.calls[0]["state_before"][key], value), key


def _distributed_worker(out_dir, model_dir, bv_key="none"):
    """One rank of the two-process run: each group of 8 completions spans both processes."""
    args = make_args(out_dir, per_device_train_batch_size=4, num_generations=8, max_steps=3,
                     bv_key=bv_key)
    trainer = make_trainer(model_dir, args)
    trainer.train()
    estimator = trainer.bv_blend
    torch.save({"calls": trainer.calls, "state": estimator.state_dict(),
                "history": (estimator.history_mean.item(), estimator.history_var.item()),
                "rank": trainer.accelerator.process_index,
                "world": trainer.accelerator.num_processes},
               os.path.join(out_dir, f"rank{trainer.accelerator.process_index}.pt"))


def run_two_processes(tmp_path, model_dir, *worker_args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", __file__, str(tmp_path), model_dir, *worker_args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_keep_identical_history(model_dir, tmp_path):
    ranks = run_two_processes(tmp_path, model_dir)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"ranks disagree on the history's {key}"
    for call0, call1 in zip(ranks[0]["calls"], ranks[1]["calls"]):
        torch.testing.assert_close(call0["rewards_per_func"], call1["rewards_per_func"],
                                   rtol=0, atol=0, equal_nan=True)

    # Each rank trains on its own slice of the advantages of the gathered batch.
    # The workers' bv_* settings are make_args' defaults (their batch shape needs two processes).
    expected, reference = replay_reference(ranks[0]["calls"], make_args(tmp_path), group_size=8)
    for step, adv in enumerate(expected):
        assert adv.numel() == 8
        for rank in ranks:
            local = rank["calls"][step]["advantages"]
            r = rank["rank"]
            torch.testing.assert_close(local, adv[r * 4:(r + 1) * 4], rtol=1e-5, atol=1e-5)
    assert_history_matches(*ranks[0]["history"], reference)
    assert int(ranks[0]["state"]["count"]) == reference.count == 3


@pytest.mark.slow
def test_two_processes_agree_on_the_keys_of_groups_split_between_them(model_dir, tmp_path):
    ranks = run_two_processes(tmp_path, model_dir, "prompt")
    ids = {key_name(p): i for i, p in enumerate(PROMPTS)}
    for call0, call1 in zip(ranks[0]["calls"], ranks[1]["calls"]):
        # Each group of 8 is 4 rows on rank 0 and 4 on rank 1, of one prompt.
        assert call0["rows"][0]["prompt"] == call1["rows"][0]["prompt"]
        assert call0["keys"].tolist() == call1["keys"].tolist() == [ids[key_name(
            call0["rows"][0]["prompt"])]]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"ranks disagree on the history's {key}"
    assert int(ranks[0]["state"]["key_count"].sum()) == 3


if __name__ == "__main__":
    _distributed_worker(*sys.argv[1:])
    # An explicit teardown: left to interpreter exit, the process group's threads once aborted
    # rank 0 ("terminate called without an active exception") after its results were saved.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
