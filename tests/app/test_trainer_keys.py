"""Keyed BV-Blend history in the trainer: the ids of prompts and columns, the keys each step hands
the estimator (checked against the contract's KeyedHistoryReference), the keyed_fraction metric,
and resuming with keys."""

import json
import os
import re

import pytest
import torch

from bv_blend import GRPOConfig, GRPOTrainer, checkpoint
from bv_blend.cli import main
from bv_blend.keys import KeyMap, key_name, parse_key
from bv_blend.tasks import get_task, prompt_source
from bv_blend_ext.reference import KeyedHistoryReference

from helpers import read_metrics

os.environ["HF_HUB_OFFLINE"] = "1"

CLUSTERS = ["b", "a", "b", "c", 1, "a"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def clustered_dataset(path, clusters=CLUSTERS):
    return write_jsonl(path, [{"prompt": f"{i}+{i}=", "answer": f"{2 * i:02d}", "cluster": c}
                              for i, c in enumerate(clusters)])


def small_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), num_generations=4, batch_size=16,
                    max_steps=3, save_steps=0, progress_bar=False, seed=0, num_threads=1,
                    reward_funcs=["digit_partial_credit"], max_completion_length=3)
    settings.update(overrides)
    return GRPOConfig(**settings)


class RecordingEstimator:
    """Forwards to the trainer's estimator and keeps the rewards and keys of every call."""

    def __init__(self, estimator):
        self.estimator, self.calls = estimator, []

    def __call__(self, rewards, group_size, keys=None):
        self.calls.append((rewards.clone(), None if keys is None else keys.clone()))
        return self.estimator(rewards, group_size, keys=keys)

    def __getattr__(self, name):
        return getattr(self.estimator, name)


def recording(trainer):
    trainer.estimator = RecordingEstimator(trainer.estimator)
    return trainer.estimator


def test_parse_key_and_names():
    assert parse_key("none") is None
    assert parse_key("prompt") == "prompt"
    assert parse_key("column:topic") == "topic"
    for bad in ("", "column:", "topic", "Prompt"):
        with pytest.raises(ValueError, match="bv_key must be"):
            parse_key(bad)
    # Values of different JSON types stay apart; equal messages lists are one key.
    assert key_name(1) != key_name("1")
    keys = KeyMap.from_values([[{"role": "user", "content": "x"}], "x",
                               [{"content": "x", "role": "user"}]])
    assert keys.num_keys == 2


def test_column_ids_in_order_of_first_appearance(tmp_path):
    config = small_config(tmp_path, task="jsonl", bv_key="column:cluster",
                          dataset_path=clustered_dataset(tmp_path / "data.jsonl"))
    trainer = GRPOTrainer(config=config)
    assert trainer.keys.names == ['"b"', '"a"', '"c"', "1"]
    assert trainer.record_keys.tolist() == [0, 1, 0, 2, 3, 1]
    assert trainer.estimator.blend.num_keys == 4


def test_prompt_keys_reach_the_estimator(tmp_path):
    """4 prompts, revisited every step in a reshuffled order: every key is visited once a step,
    the estimator's per-key history is the reference's, and keyed_fraction turns 1 once every
    key has key_min_history visits."""
    config = small_config(tmp_path, bv_key="prompt", num_prompts=4, max_steps=4,
                          bv_key_min_history=2)
    trainer = GRPOTrainer(config=config)
    source = prompt_source(get_task("add"), seed=0, num_prompts=4)
    assert trainer.keys.names == [key_name(source.records[i]["prompt"]) for i in range(4)]
    calls = recording(trainer).calls
    rows = trainer.train()

    reference = KeyedHistoryReference(4, key_ema_decay=config.bv_key_ema_decay,
                                      key_min_history=2, window=config.bv_window)
    for step, (rewards, keys) in enumerate(calls):
        # The keys are those of the step's prompts, in the order of the rewards' groups.
        prompts = [source[4 * step + i]["prompt"] for i in range(4)]
        assert keys.tolist() == [trainer.keys.id_of(p) for p in prompts]
        assert keys.dtype == torch.int64 and sorted(keys.tolist()) == [0, 1, 2, 3]
        reference.step(rewards, 4, keys=keys, eps=config.advantage_eps, scale=config.bv_scale)
    state = trainer.estimator.state_dict()
    assert state["key_count"].tolist() == reference.key_count == [4] * 4
    torch.testing.assert_close(state["key_mean"], torch.tensor(reference.key_mean,
                                                               dtype=torch.float64))
    torch.testing.assert_close(state["key_var"], torch.tensor(reference.key_var,
                                                              dtype=torch.float64))
    assert [r["keyed_fraction"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert all("history_weight_mean" in r for r in rows)


def test_keyed_fraction_is_logged_only_with_keys(tmp_path):
    rows = GRPOTrainer(config=small_config(tmp_path, max_steps=1)).train()
    assert "keyed_fraction" not in rows[0]


def test_column_keys_of_a_jsonl_file(tmp_path):
    config = small_config(tmp_path, task="jsonl", bv_key="column:cluster", batch_size=8,
                          dataset_path=clustered_dataset(tmp_path / "data.jsonl"))
    trainer = GRPOTrainer(config=config)
    calls = recording(trainer).calls
    trainer.train()
    source = prompt_source(get_task("jsonl"), seed=0, dataset=trainer.data.records)
    seen = [source.index(p) for p in range(6)]
    assert torch.cat([keys for _, keys in calls]).tolist() == [[0, 1, 0, 2, 3, 1][i] for i in seen]
    counts = torch.bincount(torch.tensor([[0, 1, 0, 2, 3, 1][i] for i in seen]), minlength=4)
    assert torch.equal(trainer.estimator.state_dict()["key_count"], counts)


def test_a_record_without_the_key_column(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "1+1=", "answer": "02", "topic": 1},
                                                 {"prompt": "1+2=", "answer": "03"}])
    assert main(["train", "--task", "jsonl", "--dataset-path", path, "--bv-key", "column:topic",
                 "--output-dir", str(tmp_path / "out"), "--num-threads", "1"]) == 1
    assert ("bv-blend: error: bv_key 'column:topic' names the column 'topic', which record 1 of "
            "the dataset lacks" in capsys.readouterr().err)


RESUME = dict(max_steps=6, save_steps=3, bv_key="column:cluster", num_iterations=2, beta=0.02,
              task="jsonl", batch_size=8)


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("step_time")} for r in rows]


def test_resume_with_keys_is_exact(tmp_path):
    """6 steps straight == 3 steps, then a resume for 3 more: metrics, weights and the keyed
    history bitwise equal."""
    data = clustered_dataset(tmp_path / "data.jsonl")
    straight = GRPOTrainer(config=small_config(tmp_path / "straight", dataset_path=data,
                                               **RESUME))
    straight_rows = straight.train()

    run = tmp_path / "interrupted"
    first = GRPOTrainer(config=small_config(run, dataset_path=data, **dict(RESUME, max_steps=3)))
    first.train()
    output = first.config.output_dir
    saved = checkpoint.load_state(os.path.join(output, "checkpoint-3"))
    assert saved["key_names"] == first.keys.names
    resumed = GRPOTrainer(config=small_config(run, dataset_path=data, resume_from=output,
                                              **RESUME))
    resumed_rows = resumed.train()

    assert comparable(resumed_rows) == comparable(straight_rows)
    assert comparable(read_metrics(output)) == comparable(straight_rows)
    assert all(0 <= r["keyed_fraction"] <= 1 for r in straight_rows)
    assert straight_rows[-1]["keyed_fraction"] > 0
    for name, p in straight.model.named_parameters():
        assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name
    expected = straight.estimator.state_dict()
    assert expected.keys() == resumed.estimator.state_dict().keys()
    for key, value in expected.items():
        assert torch.equal(resumed.estimator.state_dict()[key], value), key


@pytest.fixture
def keyed_checkpoint(tmp_path):
    data = clustered_dataset(tmp_path / "data.jsonl")
    config = small_config(tmp_path, dataset_path=data, **dict(RESUME, max_steps=1, batch_size=4))
    GRPOTrainer(config=config).train()
    return config.output_dir


@pytest.mark.parametrize("flags, message", [
    (["--dataset-path", "{other}"], r"was trained with other history keys than this dataset "
                                    r"gives \(key id 0 was \"b\" and is now \"z\"\)"),
    (["--dataset-path", "{fewer}"], r"\(4 keys were saved and this dataset gives 3\)"),
    (["--bv-key", "prompt"], "was trained with bv_key 'column:cluster', not 'prompt'"),
    (["--bv-key", "none"], "was trained with bv_key 'column:cluster', not 'none'"),
])
def test_resume_on_other_keys_is_refused(tmp_path, capsys, keyed_checkpoint, flags, message):
    other = clustered_dataset(tmp_path / "other.jsonl", ["z", "a", "z", "c", 1, "a"])
    fewer = clustered_dataset(tmp_path / "fewer.jsonl", CLUSTERS[:4])
    base = {"--task": "jsonl", "--dataset-path": str(tmp_path / "data.jsonl"),
            "--bv-key": "column:cluster", "--num-generations": "4", "--batch-size": "4",
            "--max-steps": "2", "--output-dir": keyed_checkpoint, "--resume-from": keyed_checkpoint,
            "--reward-funcs": "digit_partial_credit", "--max-completion-length": "3",
            "--progress-bar": "false", "--num-threads": "1"}
    base.update({flag: value.format(other=other, fewer=fewer)
                 for flag, value in zip(flags[::2], flags[1::2])})
    assert main(["train", *[item for pair in base.items() for item in pair]]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("bv-blend: error: resume_from ")
    assert re.search(message, err), err


def test_num_prompts_revisits_prompts_every_epoch():
    source = prompt_source(get_task("add"), seed=0, num_prompts=5)
    first, second = ([source.index(p) for p in range(e * 5, e * 5 + 5)] for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    stream = prompt_source(get_task("add"), seed=0)
    assert [source.records[i] for i in range(5)] == [stream[i] for i in range(5)]


def test_key_settings_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("bv_key: column:cluster\nbv_key_ema_decay: 5e-1\nbv_key_min_history: 3\n"
                    "task: jsonl\ndataset_path: data.jsonl\n")
    config = GRPOConfig.from_yaml(str(path), bv_key="prompt")
    assert (config.bv_key, config.key_column) == ("prompt", "prompt")
    assert (config.bv_key_ema_decay, config.bv_key_min_history) == (0.5, 3)
    assert GRPOConfig.from_yaml(str(path)).key_column == "cluster"
    assert GRPOConfig().bv_key == "none" and GRPOConfig().key_column is None
