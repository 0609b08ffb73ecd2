"""The `bv-blend` command: end to end in a few steps, YAML + flag precedence, resume, and the
errors it reports before any training starts."""

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from bv_blend import GRPOConfig
from bv_blend.cli import main

from helpers import read_metrics

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--num-generations", "4", "--batch-size", "8", "--save-steps", "0",
         "--progress-bar", "false", "--num-threads", "1"]




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
    for line in ("reward_mean", "history_weight_mean", "step time"):  # the summary
        assert line in result.stdout
    assert (out / "report.png").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    saved = torch.load(out / "checkpoint-3" / "trainer_state.pt", weights_only=True)["config"]
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


def test_sigint_saves_a_checkpoint_and_resume_appends(tmp_path):
    out = tmp_path / "out"
    metrics = out / "metrics.jsonl"
    run = subprocess.Popen(
        [sys.executable, "-m", "bv_blend", "train", *QUICK, "--max-steps", "100000",
         "--output-dir", str(out)],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert run.poll() is None and time.monotonic() < deadline, "no step was logged"
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, stderr[-3000:]
    found = re.search(r"bv-blend: SIGINT received: stopped after step (\d+); checkpoint saved in "
                      r"(\S+checkpoint-\d+)", stderr)
    assert found, stderr[-3000:]
    step = int(found.group(1))
    assert found.group(2) == str(out / f"checkpoint-{step}")
    assert (out / f"checkpoint-{step}" / "trainer_state.pt").is_file()
    logged = metrics.read_text()
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))

    assert main(["train", *QUICK, "--max-steps", str(step + 2), "--output-dir", str(out),
                 "--resume-from", str(out)]) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 3))
    assert metrics.read_text().startswith(logged)


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
    (["--learning-rate", "inf"], "learning_rate must be a finite number, got inf"),
    (["--max-grad-norm", "nan"], "max_grad_norm must be a finite number, got nan"),
    (["--reward-weights", "inf"], "reward_weights must be a finite number, got inf"),
    (["--save-total-limit", "0"], "save_total_limit must be > 0, got 0"),
    (["--device", "foo"], "device must be cpu, cuda or cuda:N, got 'foo'"),
    (["--task", "jsonl", "--dataset-path", "/no/such.jsonl"],
     "dataset_path '/no/such.jsonl' is not a file"),
    (["--resume-from", "/no/such/run"], "resume_from '/no/such/run' does not exist"),
    (["--bv-key", "cluster"], "bv_key must be 'none', 'prompt' or 'column:NAME'"),
    (["--bv-key", "column:"], "bv_key must be 'none', 'prompt' or 'column:NAME'"),
    (["--bv-key", "prompt", "--estimator", "grpo"],
     "bv_key 'prompt' needs estimator 'bv_blend' .*, got estimator 'grpo'"),
    (["--bv-key", "prompt"], "bv_key 'prompt' needs a finite dataset .*set num_prompts"),
    (["--bv-key-ema-decay", "0"], r"\bbv_key_ema_decay\b.*must be"),
    (["--bv-key-ema-decay", "1.5"], r"\bbv_key_ema_decay\b.*must be"),
    (["--bv-key-min-history", "-1"], r"\bbv_key_min_history\b.*must be"),
    (["--bv-key-min-history", "2.5"], "bv_key_min_history must be int, got '2.5'"),
    (["--num-prompts", "0"], "num_prompts must be > 0, got 0"),
    (["--bv-window", "1"], "bv_window must be an int >= 2, got 1"),
    (["--bv-min-history", "200"], r"bv_min_history must be an int in \[0, bv_window=100\]"),
    (["--advantage-eps", "-1"], r"\badvantage_eps\b.*must be"),
    (["--bv-scale", "std"],
     r"bv_scale must be one of \('group', 'blend', 'batch', 'none'\), got 'std'"),
    (["--task", "jsonl", "--dataset-path", "x.jsonl", "--num-prompts", "4"],
     "num_prompts applies to the procedural tasks"),
])
def test_bad_input_fails_before_training(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--output-dir", str(out), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bv-blend: error: ")
    assert re.search(message, err), err
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu(tmp_path, capsys):
    assert main(["train", *QUICK, "--output-dir", str(tmp_path / "out"), "--device", "cuda"]) == 1
    assert "device 'cuda' was requested but no CUDA device is available" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("", r"dataset_path '.*data.jsonl' holds no records"),
    ("\n\n", r"dataset_path '.*data.jsonl' holds no records"),
    ('{"prompt": "1+1=", "answer": "02"}\n{"prompt": "2+2=", \n',
     r"dataset_path '.*data.jsonl' line 2 is not valid JSON"),
    ('["1+1=", "02"]\n',
     r"dataset_path '.*data.jsonl' line 1 is a JSON array, expected an object with 'prompt'"),
    ('{"prompt": "1+1="}\n',
     r"dataset_path '.*data.jsonl' line 1 lacks the column\(s\) \['answer'\]"),
])
def test_bad_jsonl_file(tmp_path, capsys, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--output-dir", str(out), "--task", "jsonl",
                 "--dataset-path", str(data)]) == 1
    assert re.search("bv-blend: error: " + message, capsys.readouterr().err)
    assert not (out / "tiny_model").exists()  # the data is read before the model is built


@pytest.mark.parametrize("content, message", [
    ("learning_rate: [1e-3\n", r"config '.*run.yaml' is not valid YAML: .*\n.*line 1, column 16"),
    ("- 1\n- 2\n", r"config '.*run.yaml' must be a YAML mapping"),
    ("learning_rate: .inf\n", "learning_rate must be a finite number, got inf"),
])
def test_bad_yaml_file(tmp_path, capsys, content, message):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    assert main(["train", "--config", str(config)]) == 1
    assert re.search("bv-blend: error: " + message, capsys.readouterr().err)


def test_missing_yaml_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 1
    assert re.search(r"bv-blend: error: config '.*none.yaml' is not a file",
                     capsys.readouterr().err)


@pytest.mark.parametrize("output_dir, message", [
    ("a_file", "output_dir '.*a_file' is a file, expected a directory"),
    ("a_file/run", r"output_dir '.*a_file/run' cannot be created \(Not a directory\)"),
])
def test_unusable_output_dir(tmp_path, capsys, output_dir, message):
    (tmp_path / "a_file").write_text("not a directory")
    assert main(["train", *QUICK, "--output-dir", str(tmp_path / output_dir)]) == 1
    assert re.search("bv-blend: error: " + message, capsys.readouterr().err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_output_dir(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["train", *QUICK, "--output-dir", str(out)]) == 1
    finally:
        out.chmod(0o755)
    assert re.search("bv-blend: error: output_dir '.*out' is not writable",
                     capsys.readouterr().err)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(["train", *QUICK, "--max-steps", "1", "--output-dir", str(out)]) == 0
    return out


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage, message", [
    (lambda ck: (ck / "trainer_state.pt").unlink(),
     r"checkpoint-1' is an incomplete checkpoint: it lacks trainer_state.pt"),
    (lambda ck: (ck / "model.safetensors").unlink(),
     r"checkpoint-1' is an incomplete checkpoint: it lacks model.safetensors"),
    (lambda ck: truncate(ck / "trainer_state.pt"),
     r"trainer_state.pt' is truncated or damaged \(not a complete torch.save file\)"),
    (lambda ck: truncate(ck / "model.safetensors"),
     r"the model weights in '.*checkpoint-1' cannot be loaded into this model"),
])
def test_damaged_checkpoint(tmp_path, capsys, finished_run, damage, message):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "checkpoint-1")
    assert main(["train", *QUICK, "--max-steps", "2", "--output-dir", str(tmp_path / "out"),
                 "--resume-from", str(run / "checkpoint-1")]) == 1
    assert re.search("bv-blend: error: .*" + message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


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
    assert config.bv_scale == GRPOConfig().bv_scale == "none" and config.bv_key == "none"
