"""Two processes under torchrun (gloo, CPU): prompts are sharded, rewards gathered, and both ranks
compute identical advantages, hold identical BV-Blend histories and identical weights."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from bv_blend.tasks import get_task, prompt_source

WORKER = textwrap.dedent("""
    import os, sys, torch
    from bv_blend import GRPOConfig, GRPOTrainer, distributed
    from bv_blend.rewards import digit_partial_credit

    out_dir = sys.argv[1]
    seen = []

    def recording(prompts, completions, answer, **kwargs):
        if len(prompts) == 8:  # a training batch, not the check before training
            seen.append(list(prompts))
        return digit_partial_credit(prompts, completions, answer)

    keyed = dict(bv_key="prompt", num_prompts=4) if sys.argv[2:] == ["keyed"] else {}
    config = GRPOConfig(output_dir=out_dir, num_generations=4, batch_size=8, max_steps=3,
                        save_steps=0, progress_bar=False, estimator="bv_blend", seed=0, **keyed)
    trainer = GRPOTrainer(reward_funcs=[recording], config=config)
    advantages, rows, keys = [], [], []
    for _ in range(config.max_steps):
        positions = trainer._next_positions()
        keys.append(trainer._group_keys(positions))
        rows.append(trainer.step())
        advantages.append(trainer.last_advantages.clone())
    trainer.save_checkpoint()
    rank = trainer.dist.rank
    torch.save({"world_size": trainer.dist.world_size, "advantages": advantages, "rows": rows,
                "history": trainer.estimator.state_dict(), "prompts": seen, "keys": keys,
                "key_names": trainer.keys and trainer.keys.names,
                "params": {k: v.detach().clone() for k, v in trainer.model.named_parameters()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.cleanup()
""")

CLI_SMOKE = ["-m", "bv_blend", "train", "--num-generations", "4", "--batch-size", "8",
             "--max-steps", "2", "--save-steps", "0", "--progress-bar", "false"]


def torchrun(args, tmp_path, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--standalone", *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_two_gloo_processes_share_advantages_and_history(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun([str(script), str(tmp_path / "run")], tmp_path)
    ranks = [torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    assert [r["world_size"] for r in ranks] == [2, 2]
    for step in range(3):
        a0, a1 = ranks[0]["advantages"][step], ranks[1]["advantages"][step]
        assert a0.shape == (16,)  # both processes' completions, gathered
        assert torch.equal(a0, a1)
        assert ranks[0]["rows"][step]["reward_mean"] == ranks[1]["rows"][step]["reward_mean"]
    for key, value in ranks[0]["history"].items():
        assert torch.equal(value, ranks[1]["history"][key]), key
    assert int(ranks[0]["history"]["count"]) == 3 * 4  # 4 groups a step, 2 on each process
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name  # DDP kept the replicas equal

    # Sharding: each step rank 0 takes the first 2 prompts of the step, rank 1 the next 2.
    source = prompt_source(get_task("add"), seed=0)
    for step in range(3):
        expected = [source[4 * step + i]["prompt"] for i in range(4)]
        unique = [ranks[r]["prompts"][step][::4] for r in (0, 1)]
        assert unique[0] + unique[1] == expected

    state = torch.load(tmp_path / "run" / "checkpoint-3" / "trainer_state.pt",
                       weights_only=True)
    assert state["data_position"] == 12 and len(state["rng"]) == 2


def test_two_processes_pass_every_group_key_in_gathered_order(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun([str(script), str(tmp_path / "run"), "keyed"], tmp_path)
    ranks = [torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    ids = {name: i for i, name in enumerate(ranks[0]["key_names"])}
    assert ranks[0]["key_names"] == ranks[1]["key_names"]
    for step in range(3):
        # Rank 0's groups first, then rank 1's, as the rewards are gathered.
        prompts = ranks[0]["prompts"][step][::4] + ranks[1]["prompts"][step][::4]
        expected = [ids[json.dumps(p)] for p in prompts]
        assert ranks[0]["keys"][step].tolist() == ranks[1]["keys"][step].tolist() == expected
    for key, value in ranks[0]["history"].items():
        assert torch.equal(value, ranks[1]["history"][key]), key
    # 4 prompts, all of them in every step.
    assert ranks[0]["history"]["key_count"].tolist() == [3, 3, 3, 3]
    assert all(0 <= row["keyed_fraction"] <= 1 for row in ranks[0]["rows"])


def test_cli_under_torchrun(tmp_path):
    result = torchrun([*CLI_SMOKE, "--output-dir", "out"], tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]  # written once, by rank 0
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.pt").is_file()
    assert result.stdout.count("reward_mean") == 1  # one summary, from rank 0


SIGNALLED_WORKER = textwrap.dedent("""
    import json, os, signal, sys
    from bv_blend import GRPOConfig, GRPOTrainer, distributed
    from bv_blend.rewards import digit_partial_credit
    from bv_blend.trainer import TrainingInterrupted

    batches = []

    def digit_partial_credit_signalling(prompts, completions, answer, **kwargs):
        # Only process 1 gets the signal, while scoring its second training batch.
        if len(prompts) > 2:
            batches.append(1)
            if len(batches) == 2 and int(os.environ["RANK"]) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return digit_partial_credit(prompts, completions, answer)

    config = GRPOConfig(output_dir=sys.argv[1], num_generations=4, batch_size=8, max_steps=6,
                        save_steps=0, progress_bar=False, seed=0)
    trainer = GRPOTrainer(reward_funcs=[digit_partial_credit_signalling], config=config)
    try:
        trainer.train()
        outcome = {"step": trainer.step_count}
    except TrainingInterrupted as stop:
        outcome = {"step": stop.step, "exit_code": stop.exit_code}
    with open(os.path.join(sys.argv[1], f"outcome{trainer.dist.rank}.json"), "w") as f:
        json.dump(outcome, f)
    distributed.cleanup()
""")


def test_a_signal_to_one_process_stops_all_after_the_same_step(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SIGNALLED_WORKER)
    run = tmp_path / "run"
    torchrun([str(script), str(run)], tmp_path)
    outcomes = [json.loads((run / f"outcome{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes == [{"step": 2, "exit_code": 143}] * 2
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    state = torch.load(run / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()] == [1, 2]
