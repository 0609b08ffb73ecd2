"""The `bv-blend` command: end to end in a few steps, YAML + flag precedence, resume, and the
errors it reports before any training starts."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from bv_blend import GRPOConfig
from bv_blend.cli import main

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--num-generations", "4", "--batch-size", "8", "--save-steps", "0",
         "--progress-bar", "false", "--num-threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_with_yaml_and_flag_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    # 1e-3 is a string to YAML 1.1; the config converts it. max_steps is overridden by the flag.
    config.write_text("estimator: grpo\nlearning_rate: 1e-3\nmax_steps: 50\ntask: add_sparse\n"
                      "num_generations: 4\nbatch_size: 8\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "bv_blend", "train", "--config", str(config), "--max-steps", "3",
         "--output-dir", str(out), "--save-steps", "2", "--progress-bar", "false",
         "--num-threads", "1", "--report-to", "tensorboard"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert "reward_mean" in result.stdout and "step time" in result.stdout  # the summary
    assert (out / "report.png").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    saved = torch.load(out / "checkpoint-3" / "trainer_state.pt", weights_only=False)["config"]
    assert saved["estimator"] == "grpo" and saved["learning_rate"] == 1e-3
    assert saved["task"] == "add_sparse" and saved["max_steps"] == 3
    # The checkpoint is a plain Hugging Face model directory.
    assert (out / "checkpoint-3" / "config.json").is_file()
    assert (out / "checkpoint-3" / "tokenizer.json").is_file()


def test_resume_from_flag(tmp_path):
    out = str(tmp_path / "out")
    assert main(["train", *QUICK, "--max-steps", "2", "--output-dir", out]) == 0
    assert main(["train", *QUICK, "--max-steps", "4", "--output-dir", out,
                 "--resume-from", out]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("flags, message", [
    (["--estimator", "ppo"], "estimator must be one of"),
    (["--loss-type", "sft"], "loss_type must be one of"),
    (["--task", "chess"], "task must be one of"),
    (["--num-generations", "1"], "num_generations must be >= 2"),
    (["--batch-size", "10"], r"batch_size \(10\) must be a positive multiple of num_generations"),
    (["--model", "/no/such/model"], "model '/no/such/model' is neither a local directory"),
    (["--learning-rate", "fast"], "learning_rate must be float, got 'fast'"),
    (["--reward-funcs", "exact_match", "--reward-weights", "1", "2"],
     "reward_weights has 2 entries for 1 reward_funcs"),
    (["--task", "jsonl"], "task 'jsonl' needs dataset_path"),
])
def test_bad_input_fails_before_training(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--output-dir", str(out), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bv-blend: error: ")
    assert re.search(message, err), err
    assert not (out / "metrics.jsonl").exists()


def test_unknown_yaml_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 0.001\nlearnig_rate: 0.01\n")
    assert main(["train", "--config", str(config)]) == 1
    assert "unknown setting(s) ['learnig_rate']" in capsys.readouterr().err


def test_every_setting_has_a_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(GRPOConfig):
        assert "--" + field.name.replace("_", "-") in text, field.name


def test_tasks_command(capsys):
    assert main(["tasks"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"add", "add_sparse", "reverse", "reverse_sparse", "jsonl"} <= set(listed)


def test_default_config_is_valid():
    config = GRPOConfig.from_yaml(os.path.join(REPO, "configs", "train_default.yaml"))
    assert config.task == "add" and config.estimator == "bv_blend" and config.model == "tiny"
