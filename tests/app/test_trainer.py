"""Few-step CPU runs of the trainer on the tiny model: every estimator and loss setting trains,
metrics and checkpoints are written, gradient accumulation equals one big batch, and a run
interrupted by a failing reward function resumes to exactly the metrics of an uninterrupted one."""

import json
import math
import os
import random
import re
import shutil
import signal

import numpy as np
import pytest
import torch

from bv_blend import GRPOConfig, GRPOTrainer, checkpoint
from bv_blend.checkpoint import STATE_FILE
from bv_blend.rewards import digit_partial_credit
from bv_blend.tasks import get_task, prompt_source
from bv_blend.trainer import StopOnSignal, TrainingInterrupted

from helpers import read_metrics

os.environ["HF_HUB_OFFLINE"] = "1"

REQUIRED_METRICS = (
    "reward_mean", "reward_std", "frac_reward_zero_std", "history_weight_mean", "history_mean",
    "history_var", "advantage_abs_max", "kl", "clip_ratio", "loss", "grad_norm",
    "completion_length", "step_time", "step_time_generation", "step_time_rewards",
    "step_time_advantage", "step_time_forward_backward")



def small_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), num_generations=4, batch_size=16,
                    max_steps=2, save_steps=0, progress_bar=False, seed=0, num_threads=1)
    settings.update(overrides)
    return GRPOConfig(**settings)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}



@pytest.mark.parametrize("estimator", ["bv_blend", "grpo", "dr_grpo", "batch", "rloo"])
def test_each_estimator_trains_and_writes_outputs(tmp_path, estimator):
    config = small_config(tmp_path, estimator=estimator)
    trainer = GRPOTrainer(config=config)
    before = snapshot(trainer.model)
    rows = trainer.train()

    after = snapshot(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    assert [r["step"] for r in rows] == [1, 2]
    assert read_metrics(config.output_dir) == rows
    for row in rows:
        for key in REQUIRED_METRICS:
            assert key in row, key
        assert row["kl"] is None  # beta = 0: no reference model, so no KL to report
        assert 0 <= row["frac_reward_zero_std"] <= 1
        assert row["completion_length"] <= get_task("add").max_completion_length
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
        split = sum(value for key, value in row.items() if key.startswith("step_time_"))
        assert row["step_time"] == pytest.approx(split)
    if estimator == "bv_blend":
        # The history holds the 4 group means of step 1 when step 2 runs.
        assert rows[0]["history_var"] == 0 and rows[1]["history_var"] > 0
        assert rows[1]["history_weight_mean"] > 0
    else:
        assert all(r["history_weight_mean"] == 0 and r["history_var"] == 0 for r in rows)
    assert os.path.isfile(os.path.join(config.output_dir, "report.png"))
    state = torch.load(os.path.join(config.output_dir, "checkpoint-2", STATE_FILE),
                       weights_only=True)
    assert state["step"] == 2 and state["data_position"] == 8
    if estimator == "bv_blend":
        assert int(state["estimator"]["count"]) == 8  # every group mean of both steps
    assert trainer.ref_model is None


@pytest.mark.parametrize("loss_type, beta, num_iterations", [
    ("grpo", 0.05, 2), ("dr_grpo", 0.0, 2), ("bnpo", 0.05, 1), ("dapo", 0.05, 3)])
def test_loss_settings_train(tmp_path, loss_type, beta, num_iterations):
    config = small_config(tmp_path, loss_type=loss_type, beta=beta, num_iterations=num_iterations,
                          gradient_accumulation_steps=2, learning_rate=1e-2)
    trainer = GRPOTrainer(config=config)
    assert (trainer.ref_model is not None) == (beta > 0)
    rows = trainer.train()
    for row in rows:
        if beta > 0:
            assert row["kl"] >= 0
        else:
            assert row["kl"] is None
        assert 0 <= row["clip_ratio"] <= 1
    if beta > 0:
        assert rows[-1]["kl"] > 0  # the policy has moved away from the frozen reference
    if num_iterations > 1:
        # Later updates of a batch see a moved policy; with this learning rate some ratios leave
        # the clip range.
        assert any(r["clip_ratio"] > 0 for r in rows)
    assert trainer.scheduler.last_epoch == config.max_steps * num_iterations


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_equals_one_batch(tmp_path, loss_type):
    rows, params = [], []
    for accumulation in (1, 4):
        config = small_config(tmp_path / str(accumulation), loss_type=loss_type, max_steps=1,
                              gradient_accumulation_steps=accumulation)
        trainer = GRPOTrainer(config=config)
        rows.append(trainer.train()[0])
        params.append(snapshot(trainer.model))
    # Adam's first update is blind to the gradient's scale, so the norm of the accumulated
    # gradient (and the loss) is what shows a wrong normalisation.
    assert rows[1]["grad_norm"] == pytest.approx(rows[0]["grad_norm"], rel=1e-5)
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5, abs=1e-7)
    for name in params[0]:
        torch.testing.assert_close(params[0][name], params[1][name], rtol=0, atol=1e-4)


def test_qwen2_and_custom_reward_objects(tmp_path):
    from bv_blend.tiny_model import build_tiny_model, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        build_tiny_model(str(tmp_path / "qwen"), arch="qwen2", seed=3))

    def length_penalty(prompts, completions, **kwargs):
        return [-len(c) / 10 for c in completions]

    trainer = GRPOTrainer(model=model, tokenizer=tokenizer,
                          reward_funcs=[digit_partial_credit, length_penalty],
                          config=small_config(tmp_path, reward_weights=[1.0, 0.5]))
    rows = trainer.train()
    assert "reward/length_penalty" in rows[0] and "reward/digit_partial_credit" in rows[0]
    row = rows[0]
    assert row["reward_mean"] == pytest.approx(
        row["reward/digit_partial_credit"] + 0.5 * row["reward/length_penalty"], abs=1e-6)


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {i}:", "answer": str(i)}) + "\n"
                            for i in range(5)))
    config = small_config(tmp_path, task="jsonl", dataset_path=str(path),
                          max_completion_length=3, reward_funcs=["digit_partial_credit"])
    rows = GRPOTrainer(config=config).train()
    assert len(rows) == 2 and rows[0]["completion_length"] <= 3


def test_resume_after_reward_failure_is_exact(tmp_path):
    """6 steps straight == 3 steps, a reward function failing in step 4, resume, 3 more."""
    settings = dict(max_steps=6, save_steps=3, estimator="bv_blend", lr_scheduler_type="cosine",
                    warmup_steps=2, num_iterations=2, beta=0.02)
    straight_config = small_config(tmp_path / "straight", **settings)
    straight = GRPOTrainer(config=straight_config)
    straight_rows = straight.train()

    full_batch_calls = []

    def flaky(prompts, completions, answer, **kwargs):
        if len(prompts) == 16:
            full_batch_calls.append(prompts[0])
            if len(full_batch_calls) == 4:
                raise ConnectionError("reward server unreachable")
        return digit_partial_credit(prompts, completions, answer)
    flaky.__name__ = "digit_partial_credit"  # same metric names as the uninterrupted run

    run_dir = tmp_path / "interrupted"
    config = small_config(run_dir, **settings)
    with pytest.raises(RuntimeError, match="reward server unreachable") as failure:
        GRPOTrainer(reward_funcs=[flaky], config=config).train()
    # The message names the first prompt of step 4 (the batch fails as a whole).
    step4_prompt = prompt_source(get_task("add"), seed=0)[12]["prompt"]
    assert repr(step4_prompt) in str(failure.value)
    # The checkpoint of step 3 is complete and nothing later was written.
    output = config.output_dir
    assert sorted(d for d in os.listdir(output) if d.startswith("checkpoint")) == ["checkpoint-3"]
    assert len(read_metrics(output)) == 3
    assert not os.path.exists(os.path.join(output, "report.png"))

    resumed_config = small_config(run_dir, resume_from=output, **settings)
    resumed = GRPOTrainer(config=resumed_config)
    assert resumed.step_count == 3 and resumed.data_position == 12
    resumed_rows = resumed.train()

    def comparable(rows):
        return [{k: v for k, v in r.items() if not k.startswith("step_time")} for r in rows]

    assert comparable(resumed_rows) == comparable(straight_rows)
    assert comparable(read_metrics(output)) == comparable(straight_rows)
    for name, p in straight.model.named_parameters():
        assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name
    assert torch.equal(straight.estimator.blend.ring, resumed.estimator.blend.ring)


def test_resume_from_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume_from"):
        GRPOTrainer(config=small_config(tmp_path, resume_from=str(tmp_path / "nothing")))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_cuda(tmp_path):
    config = small_config(tmp_path, device="cuda", beta=0.05, num_iterations=2)
    trainer = GRPOTrainer(config=config)
    assert trainer.autocast_dtype == torch.bfloat16  # the default on a GPU
    before = snapshot(trainer.model)
    rows = trainer.train()
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in rows)
    after = snapshot(trainer.model)
    assert all(p.dtype == torch.float32 for p in after.values())  # fp32 master weights
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("returned, message", [
    (lambda n: [0.0] * (n + 1), "returned 3 values for 2 completions"),
    (lambda n: ["1"] * n, r"returned '1' \(str\) at index 0"),
    (lambda n: [math.inf] * n, r"'bad' returned inf at index 0; scores must be finite"),
    (lambda n: {i: 1.0 for i in range(n)}, r"'bad' returned dict, expected a list"),
])
def test_bad_reward_function_fails_before_training(tmp_path, returned, message):
    calls = []

    def bad(prompts, completions, **kwargs):
        calls.append(len(prompts))
        return returned(len(prompts))

    config = small_config(tmp_path)
    with pytest.raises(RuntimeError, match=message):
        GRPOTrainer(reward_funcs=[bad], config=config)
    assert calls == [2]  # only the check before training ran
    assert not os.path.exists(os.path.join(config.output_dir, "metrics.jsonl"))


def test_model_object_needs_its_tokenizer(tmp_path):
    from bv_blend.tiny_model import build_tiny_model, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(build_tiny_model(str(tmp_path / "m")))
    with pytest.raises(ValueError, match="tokenizer is required"):
        GRPOTrainer(model=model, config=small_config(tmp_path))


# checkpoints: pruning, atomic writes, safe loading ----------------------------------------------

def checkpoint_names(output_dir):
    return sorted((p for p in os.listdir(output_dir) if p.startswith("checkpoint-")),
                  key=lambda name: int(name.split("-")[1].split(".")[0]))


@pytest.mark.parametrize("limit, kept", [
    (2, ["checkpoint-4", "checkpoint-5"]),
    (1, ["checkpoint-5"]),
    (None, [f"checkpoint-{step}" for step in range(1, 6)]),
])
def test_save_total_limit_keeps_the_newest(tmp_path, limit, kept):
    config = small_config(tmp_path, max_steps=5, save_steps=1, batch_size=8,
                          save_total_limit=limit)
    GRPOTrainer(config=config).train()
    assert checkpoint_names(config.output_dir) == kept


def test_the_final_checkpoint_is_never_pruned(tmp_path):
    config = small_config(tmp_path, max_steps=1, batch_size=8, save_total_limit=1)
    # A later checkpoint left by an earlier run in the same output_dir must not push out the
    # checkpoint this run has just written.
    stale = os.path.join(config.output_dir, "checkpoint-9")
    GRPOTrainer(config=small_config(tmp_path, max_steps=1, batch_size=8)).train()
    os.rename(os.path.join(config.output_dir, "checkpoint-1"), stale)
    GRPOTrainer(config=config).train()
    assert checkpoint_names(config.output_dir) == ["checkpoint-1"]


def fake_checkpoint(path, files=(STATE_FILE, "config.json", "model.safetensors")):
    os.makedirs(path)
    for name in files:
        open(os.path.join(path, name), "w").close()


def test_resolve_picks_only_complete_checkpoints(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-2")
    fake_checkpoint(tmp_path / "checkpoint-9.partial")
    fake_checkpoint(tmp_path / "checkpoint-8.deleting")
    fake_checkpoint(tmp_path / "checkpoint-7", files=(STATE_FILE, "config.json"))
    fake_checkpoint(tmp_path / "checkpoint-6", files=("config.json", "model.safetensors"))
    assert checkpoint.resolve(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with pytest.raises(checkpoint.CheckpointError, match="incomplete checkpoint: it lacks "
                                                         "model.safetensors"):
        checkpoint.resolve(str(tmp_path / "checkpoint-7"))


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    config = small_config(tmp_path, max_steps=2, batch_size=8, save_steps=1)
    trainer = GRPOTrainer(config=config)
    trainer.train()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.torch, "save", crash)
    trainer.step()
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    output = config.output_dir
    assert checkpoint_names(output) == ["checkpoint-1", "checkpoint-2", "checkpoint-3.partial"]
    assert checkpoint.resolve(output) == os.path.join(output, "checkpoint-2")
    # Saving the same step again (a resumed run) replaces the old folder only once complete.
    trainer.step_count = 2
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert checkpoint.load_state(os.path.join(output, "checkpoint-2"))["step"] == 2


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.standard_normal()  # and in NumPy's
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")

    def draws():
        return (random.gauss(0, 1), random.random(), np.random.standard_normal(),
                np.random.random(), torch.rand(1).item())
    expected = draws()
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


class MarkerOnUnpickle:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("payload", ["malicious", "old_format"])
def test_unsafe_checkpoint_is_refused(tmp_path, payload):
    config = small_config(tmp_path, max_steps=1, batch_size=8)
    GRPOTrainer(config=config).train()
    state_file = os.path.join(config.output_dir, "checkpoint-1", STATE_FILE)
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "code_ran"
    if payload == "malicious":
        state["step"] = MarkerOnUnpickle(str(marker))
    else:  # the layout before format 2: NumPy's RNG state as a pickled tuple with an ndarray
        del state["format"]
        state["rng"][0]["numpy"] = np.random.get_state()
    torch.save(state, state_file)
    resumed = small_config(tmp_path, max_steps=2, batch_size=8, resume_from=config.output_dir)
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"{re.escape(repr(state_file))} is not a safe checkpoint"):
        GRPOTrainer(config=resumed)
    assert not marker.exists()


# signals and metrics.jsonl on resume ------------------------------------------------------------

def signal_at_batch(number, signal_number):
    """digit_partial_credit that sends this process `signal_number` while scoring training batch
    `number` (the check before training, on 2 completions, is not counted)."""
    batches = []

    def digit_partial_credit_signalling(prompts, completions, answer, **kwargs):
        if len(prompts) > 2:
            batches.append(len(prompts))
            if len(batches) == number:
                os.kill(os.getpid(), signal_number)
        return digit_partial_credit(prompts, completions, answer)
    digit_partial_credit_signalling.__name__ = "digit_partial_credit"
    return digit_partial_credit_signalling


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path):
    config = small_config(tmp_path, max_steps=6, batch_size=8)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    trainer = GRPOTrainer(reward_funcs=[signal_at_batch(2, signal.SIGTERM)], config=config)
    with pytest.raises(TrainingInterrupted, match="SIGTERM received: stopped after step 2") as stop:
        trainer.train()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert stop.value.exit_code == 143 and stop.value.step == 2
    assert stop.value.checkpoint == os.path.join(config.output_dir, "checkpoint-2")
    assert checkpoint_names(config.output_dir) == ["checkpoint-2"]
    assert [r["step"] for r in read_metrics(config.output_dir)] == [1, 2]

    resumed = GRPOTrainer(config=small_config(tmp_path, max_steps=4, batch_size=8,
                                              resume_from=config.output_dir))
    assert [r["step"] for r in resumed.train()] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(config.output_dir)] == [1, 2, 3, 4]


def test_stop_handler_records_only_the_first_signal():
    before = signal.getsignal(signal.SIGINT)
    with StopOnSignal(announce=False) as stop:
        assert signal.getsignal(signal.SIGINT) == stop.handle
        stop.handle(signal.SIGINT)
        stop.handle(signal.SIGTERM)
    assert stop.received == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_appends_to_metrics_and_drops_rows_after_the_checkpoint(tmp_path):
    config = small_config(tmp_path, max_steps=3, batch_size=8, save_steps=2)
    GRPOTrainer(config=config).train()
    output = config.output_dir
    # As if the run had been killed after logging step 3 but before checkpointing it.
    shutil.rmtree(os.path.join(output, "checkpoint-3"))
    path = os.path.join(output, "metrics.jsonl")
    with open(path) as f:
        lines = f.readlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "note": "written by the first run"}) + "\n"
    with open(path, "w") as f:
        f.writelines(lines)

    resumed = small_config(tmp_path, max_steps=4, batch_size=8, resume_from=output)
    GRPOTrainer(config=resumed).train()
    rows = read_metrics(output)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["note"] == "written by the first run"  # appended to, not rewritten
