"""bv_blend.verl against real verl (0.9.1): the registered `bv_blend` estimator and the checkpoint
callback, on the CPU. verl cannot share .venv with TRL, so these tests run in .venv-verl
(`make test-verl`) and are skipped where verl is absent.
"""

import math
import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest

verl = pytest.importorskip("verl")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback  # noqa: E402
from verl.utils.checkpoint.checkpoint_manager import get_checkpoint_tracker_filename  # noqa: E402

import bv_blend.verl as bv_verl  # noqa: E402
from bv_blend.verl import (  # noqa: E402
    STATE_FILE, SUPPORTED_VERL, BVBlendCheckpointCallback, check_verl_version,
    compute_bv_blend_advantage)
from bv_blend_ext.reference import HistoryReference  # noqa: E402

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "verl.md")
RESPONSE_LENGTH = 6
# Ours against verl's own estimators, both float32: the op sums in another order than
# torch.mean/torch.std, which moves the last bits of advantages of order 1.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def fresh_driver(monkeypatch):
    # Every test is a new driver process: no estimator yet, no callback built. Registering again
    # also undoes any test (verl's TestRegisterAdvEst, say) that cleared verl's registry.
    monkeypatch.setattr(bv_verl, "_driver", bv_verl._Driver())
    bv_verl.register()


def algorithm(norm_adv_by_std_in_grpo=True, **settings):
    """config.algorithm as verl hands it to an estimator: a DictConfig."""
    return OmegaConf.create({"adv_estimator": "bv_blend", "gamma": 1.0, "lam": 1.0,
                             "norm_adv_by_std_in_grpo": norm_adv_by_std_in_grpo,
                             "bv_blend": settings})


def make_batch(scores_per_group, seed=0, pad_rows=0):
    """A verl batch: each response's score on its last token, responses of random lengths >= 1,
    a fresh uid per prompt, rows shuffled (as _balance_batch leaves them), then `pad_rows` of
    verl's padding (one shared uid, empty response mask, zero rewards) at the end."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for scores in scores_per_group:
        uid = str(uuid.uuid4())
        for score in scores:
            length = int(torch.randint(1, RESPONSE_LENGTH + 1, (), generator=generator))
            mask = torch.zeros(RESPONSE_LENGTH, dtype=torch.int64)
            mask[:length] = 1
            rewards = torch.zeros(RESPONSE_LENGTH)
            rewards[length - 1] = score
            rows.append((rewards, mask, uid))
    rows = [rows[i] for i in torch.randperm(len(rows), generator=generator)]
    pad_uid = f"pad{uuid.uuid4().hex}"
    rows += [(torch.zeros(RESPONSE_LENGTH), torch.zeros(RESPONSE_LENGTH, dtype=torch.int64),
              pad_uid)] * pad_rows
    rewards, mask, uids = zip(*rows)
    return torch.stack(rewards), torch.stack(mask), list(uids)


def as_index(uids):
    """The uid array as verl keeps it in non_tensor_batch."""
    return np.array(uids, dtype=object)


def random_groups(generator, groups=6, size=4):
    return [torch.rand(size, generator=generator).tolist() for _ in range(groups)]


# ------------------------------------------------------------------------------ registration

def test_version_check_names_the_supported_range():
    for good in ("0.9.1", "0.9.7"):
        check_verl_version(good)
    for bad in ("0.9.0", "0.8.0", "0.10.0", "0.10.0.dev0", "1.0.0", "unknown"):
        with pytest.raises(ImportError, match=r"verl>=0\.9\.1,<0\.10"):
            check_verl_version(bad)
    assert SUPPORTED_VERL == ">=0.9.1,<0.10"
    assert check_verl_version(verl.__version__) is None


def test_import_fails_loudly_with_unsupported_verl(monkeypatch, caplog):
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    monkeypatch.delitem(sys.modules, "bv_blend.verl")
    with caplog.at_level("WARNING", logger="bv_blend.verl"):
        with pytest.raises(ImportError, match=r"supports verl>=0\.9\.1,<0\.10 but verl 0\.10\.0"):
            import bv_blend.verl  # noqa: F401
    # verl's plugin loader swallows the ImportError; the warning is what the user sees.
    assert any("verl 0.10.0 is installed" in record.getMessage() for record in caplog.records)


def test_import_verl_registers_the_estimator_through_the_entry_point(tmp_path):
    script = (
        "import sys, importlib.metadata as md\n"
        "eps = [ep for ep in md.entry_points(group='verl.plugins') if ep.name == 'bv_blend']\n"
        "assert [ep.value for ep in eps] == ['bv_blend.verl'], eps\n"
        "assert 'bv_blend.verl' not in sys.modules\n"
        "import verl\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
        "fn = get_adv_estimator_fn('bv_blend')\n"
        "print('registered', fn.__module__, fn.__name__)\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered bv_blend.verl compute_bv_blend_advantage" in result.stdout


def test_registration_is_idempotent(monkeypatch):
    bv_verl.register()
    bv_verl.register()
    assert core_algos.get_adv_estimator_fn("bv_blend") is compute_bv_blend_advantage
    # As verl's own registry tests leave it: emptied.
    monkeypatch.setattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {})
    with pytest.raises(ValueError, match="Unknown advantage estimator"):
        core_algos.get_adv_estimator_fn("bv_blend")
    bv_verl.register()
    assert core_algos.get_adv_estimator_fn("bv_blend") is compute_bv_blend_advantage


# ------------------------------------------------------------------------------ advantages

@pytest.mark.parametrize("scale, norm_adv_by_std_in_grpo",
                         [("group", True), ("blend", True), ("none", False)])
def test_empty_history_gives_verls_grpo_advantages(scale, norm_adv_by_std_in_grpo):
    generator = torch.Generator().manual_seed(1)
    # Random scores, plus a flat group of 1.0 (exact in float32, so verl's mean is exact too).
    groups = random_groups(generator, groups=7, size=5) + [[1.0] * 5]
    rewards, mask, uids = make_batch(groups, seed=2)
    config = algorithm(norm_adv_by_std_in_grpo, scale=scale)

    fn = core_algos.get_adv_estimator_fn("bv_blend")
    advantages, returns = fn(token_level_rewards=rewards, response_mask=mask,
                             index=as_index(uids), config=config)
    expected, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=rewards, response_mask=mask, index=as_index(uids),
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo)

    assert advantages.shape == returns.shape == rewards.shape
    assert advantages.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(advantages, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(returns, advantages, rtol=0, atol=0)
    assert bool((advantages[mask == 0] == 0).all())
    assert float(advantages.abs().max()) > 0.5  # not trivially zero


def test_verls_compute_advantage_calls_the_registered_estimator():
    # The v1 trainer's compute_advantage_for_multi_trajectories hands every estimator but grpo
    # to this function unchanged (it needs TransferQueue to import, which these tests lack).
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    generator = torch.Generator().manual_seed(10)
    rewards, mask, uids = make_batch(random_groups(generator), seed=11, pad_rows=2)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"uid": as_index(uids)})
    config = algorithm(window=10)
    data = compute_advantage(data, adv_estimator="bv_blend", num_repeat=4, config=config)
    through_verl = {k: v.clone() for k, v in bv_verl._driver.estimator.state_dict().items()}

    bv_verl._driver = bv_verl._Driver()
    direct = compute_bv_blend_advantage(rewards, mask, as_index(uids), config)[0]
    assert torch.equal(data.batch["advantages"], direct)
    assert torch.equal(data.batch["returns"], direct)
    assert all(torch.equal(v, through_verl[k])
               for k, v in bv_verl._driver.estimator.state_dict().items())


def test_padding_rows_get_zero_and_stay_out_of_the_history():
    generator = torch.Generator().manual_seed(3)
    groups = random_groups(generator)
    rewards, mask, uids = make_batch(groups, seed=4, pad_rows=3)
    real = slice(0, len(uids) - 3)

    padded = compute_bv_blend_advantage(rewards, mask, as_index(uids), algorithm())[0]
    padded_state = {k: v.clone() for k, v in bv_verl._driver.estimator.state_dict().items()}
    assert int(padded_state["count"]) == len(groups)  # the padding group never reached it
    assert bool((padded[real.stop:] == 0).all())

    bv_verl._driver = bv_verl._Driver()
    unpadded = compute_bv_blend_advantage(rewards[real], mask[real], as_index(uids[real]),
                                          algorithm())[0]
    assert torch.equal(padded[real], unpadded)
    for name, value in bv_verl._driver.estimator.state_dict().items():
        assert torch.equal(value, padded_state[name]), name


def test_an_empty_response_is_unscorable_inside_its_group():
    # One response of a real group with an all-zero mask: left out of its group's mean and std.
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [3.0, 0.0], [9.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [0, 0]])
    out = compute_bv_blend_advantage(rewards, mask, as_index(["a"] * 4),
                                     algorithm(scale="none"))[0]
    # Scores 1, 0, 3 (mean 4/3); the fourth row is unscorable.
    expected = torch.tensor([[-1 / 3, -1 / 3], [-4 / 3, 0.0], [5 / 3, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    assert bv_verl._driver.estimator.ring[0].item() == pytest.approx(4 / 3)


def test_shuffled_rows_keep_their_advantages_and_groups_enter_in_order_of_appearance():
    generator = torch.Generator().manual_seed(5)
    groups = random_groups(generator, groups=5, size=4)
    rewards, mask, uids = make_batch(groups, seed=6)
    first = compute_bv_blend_advantage(rewards, mask, as_index(uids), algorithm())[0]

    # The uids in the order they first appear in the batch, and their group means.
    appearance = list(dict.fromkeys(uids))
    means = [rewards.sum(-1)[[u == uid for u in uids]].mean().item() for uid in appearance]
    ring = bv_verl._driver.estimator.ring
    torch.testing.assert_close(ring[:len(groups)], torch.tensor(means, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)

    permutation = torch.randperm(len(uids), generator=generator)
    bv_verl._driver = bv_verl._Driver()
    shuffled = compute_bv_blend_advantage(rewards[permutation], mask[permutation],
                                          as_index([uids[i] for i in permutation]),
                                          algorithm())[0]
    torch.testing.assert_close(shuffled, first[permutation], rtol=1e-6, atol=1e-7)


def test_a_flat_group_gets_the_history_signal_on_a_later_step():
    settings = {"window": 8, "min_history": 2, "scale": "blend", "eps": 1e-6}
    reference = HistoryReference(window=8, min_history=2)
    generator = torch.Generator().manual_seed(7)
    config = algorithm(**settings)

    first_groups = random_groups(generator, groups=4, size=4)
    rewards, mask, uids = make_batch(first_groups, seed=8)
    compute_bv_blend_advantage(rewards, mask, as_index(uids), config)
    # The group means enter the history in order of the uids' first appearance.
    scores = rewards.sum(-1)
    reference.push(torch.stack([scores[[u == uid for u in uids]].mean()
                                for uid in dict.fromkeys(uids)]))

    # Step 2: a flat group (all 1.0), whose GRPO advantages are 0, and an informative one.
    second_groups = [[1.0] * 4, [0.0, 1.0, 0.0, 0.0]]
    rewards, mask, uids = make_batch(second_groups, seed=9)
    out = compute_bv_blend_advantage(rewards, mask, as_index(uids), config)[0]
    grpo = core_algos.compute_grpo_outcome_advantage(rewards, mask, as_index(uids))[0]

    flat_rows = [i for i, uid in enumerate(uids) if rewards[[u == uid for u in uids]].sum()
                 == 4.0]
    assert len(flat_rows) == 4
    assert bool((grpo[flat_rows] == 0).all())
    # BV-Blend: β = 1 for the flat group, A = (1 − H) / (σ_u + eps) on its response tokens.
    expected = (1.0 - reference.ema) / (math.sqrt(reference.variance) + 1e-6)
    assert expected > 0.5
    for row in flat_rows:
        tokens = mask[row].bool()
        torch.testing.assert_close(out[row][tokens], torch.full((int(tokens.sum()),), expected),
                                   rtol=1e-5, atol=1e-6)
        assert bool((out[row][~tokens] == 0).all())


# ------------------------------------------------------------------------------ checkpoints

def trainer_config(tmp_path, resume_mode="auto", resume_from_path=None, **settings):
    """The parts of verl's full config that the callback reads."""
    return OmegaConf.create({
        "algorithm": OmegaConf.to_container(algorithm(**settings)),
        "trainer": {"checkpoint_callback_class": "bv_blend.verl.BVBlendCheckpointCallback",
                    "resume_mode": resume_mode, "resume_from_path": resume_from_path,
                    "default_local_dir": str(tmp_path / "checkpoints"),
                    "default_hdfs_dir": None}})


def save_like_verl(callback, root, step):
    """What verl's _save_checkpoint does around the callback: the step folder, the tracker file
    (written before on_save), then on_save."""
    folder = root / f"global_step_{step}"
    folder.mkdir(parents=True)
    with open(get_checkpoint_tracker_filename(str(root)), "w") as f:
        f.write(str(step))
    callback.on_save(trainer=None, global_step=step, checkpoint_dir=str(folder), async_save=False)
    return folder


def train_steps(steps, seed):
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for step in range(steps):
        rewards, mask, uids = make_batch(random_groups(generator, groups=3, size=4),
                                         seed=seed * 100 + step)
        outputs.append(compute_bv_blend_advantage(rewards, mask, as_index(uids),
                                                  algorithm(window=5))[0])
    return outputs


def state():
    return {k: v.clone() for k, v in bv_verl._driver.estimator.state_dict().items()}


def test_history_is_saved_and_restored_bitwise_through_the_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = trainer_config(tmp_path, window=5)
    # verl's own builder, as the trainer's constructor calls it.
    callback = build_checkpoint_callback(config)
    assert isinstance(callback, BVBlendCheckpointCallback)
    train_steps(3, seed=1)
    saved = state()
    folder = save_like_verl(callback, tmp_path / "checkpoints", 3)
    uninterrupted = train_steps(2, seed=2)
    uninterrupted_state = state()

    on_disk = torch.load(folder / STATE_FILE, weights_only=True)
    assert all(torch.equal(on_disk[k], saved[k]) for k in saved)
    assert int(on_disk["count"]) == 9

    resumes = {"auto": trainer_config(tmp_path, window=5),
               "resume_path": trainer_config(tmp_path, "resume_path",
                                             "checkpoints/global_step_3", window=5)}
    for mode, resumed_config in resumes.items():
        bv_verl._driver = bv_verl._Driver()  # a new driver process
        build_checkpoint_callback(resumed_config)
        restored = state()
        assert all(torch.equal(restored[k], saved[k]) for k in saved), mode
        resumed = train_steps(2, seed=2)
        assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted)), mode
        assert all(torch.equal(state()[k], uninterrupted_state[k]) for k in saved), mode

    bv_verl._driver = bv_verl._Driver()
    build_checkpoint_callback(trainer_config(tmp_path, "disable", window=5))
    assert int(state()["count"]) == 0


def test_a_checkpoint_without_state_file_warns_and_starts_empty(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "checkpoints" / "global_step_2"
    folder.mkdir(parents=True)  # as saved by a run without the callback
    with open(get_checkpoint_tracker_filename(str(tmp_path / "checkpoints")), "w") as f:
        f.write("2")
    with caplog.at_level("WARNING", logger="bv_blend.verl"):
        build_checkpoint_callback(trainer_config(tmp_path))
    assert any(STATE_FILE in r.getMessage() and "empty history" in r.getMessage()
               for r in caplog.records)
    assert int(state()["count"]) == 0


def test_a_corrupted_state_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callback = build_checkpoint_callback(trainer_config(tmp_path, window=5))
    train_steps(1, seed=3)
    folder = save_like_verl(callback, tmp_path / "checkpoints", 1)
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    saved["ring"][0] = float("nan")
    torch.save(saved, folder / STATE_FILE)
    bv_verl._driver = bv_verl._Driver()
    with pytest.raises(ValueError, match="'ring' must hold finite values"):
        build_checkpoint_callback(trainer_config(tmp_path, window=5))


def test_without_the_callback_the_first_call_warns_once(caplog):
    rewards, mask, uids = make_batch([[0.0, 1.0]], seed=0)
    with caplog.at_level("WARNING", logger="bv_blend.verl"):
        compute_bv_blend_advantage(rewards, mask, as_index(uids), algorithm())
        compute_bv_blend_advantage(rewards, mask, as_index(uids), algorithm())
    warnings = [r for r in caplog.records if "checkpoint_callback_class" in r.getMessage()]
    assert len(warnings) == 1


def documented_overrides():
    """The Hydra overrides of the GRPO run in docs/verl.md (its first bash block)."""
    with open(DOCS) as f:
        block = re.search(r"```bash\n(python3 -m verl\.trainer\.main_ppo.*?)```", f.read(),
                          re.DOTALL).group(1)
    return [line.strip().rstrip("\\").strip() for line in block.splitlines()[1:] if line.strip()]


def test_the_documented_run_configures_the_estimator_and_the_callback(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    overrides = documented_overrides()
    assert "algorithm.adv_estimator=bv_blend" in overrides
    monkeypatch.chdir(tmp_path)  # default_local_dir is relative: no checkpoint to resume there
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
        bare = compose(config_name="ppo_trainer",
                       overrides=["algorithm.adv_estimator=bv_blend"])
    assert config.trainer.use_v1 and config.trainer.v1.trainer_mode == "sync"
    assert bv_verl.read_settings(config.algorithm) == bv_verl.DEFAULT_SETTINGS
    assert bv_verl.read_settings(bare.algorithm) == bv_verl.DEFAULT_SETTINGS
    assert isinstance(build_checkpoint_callback(config), BVBlendCheckpointCallback)
    rewards, mask, uids = make_batch([[0.0, 1.0, 1.0]], seed=0)
    compute_bv_blend_advantage(rewards, mask, as_index(uids), config.algorithm)
    assert int(state()["count"]) == 1


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("settings, message", [
    ({"window": 1}, r"algorithm\.bv_blend\.window must be an int >= 2, got 1"),
    ({"ema_decay": 1.5}, r"algorithm\.bv_blend\.ema_decay must be None or in \(0, 1\]"),
    ({"min_history": 200}, r"algorithm\.bv_blend\.min_history must be an int in \[0, "
                           r"algorithm\.bv_blend\.window=100\]"),
    ({"eps": -1.0}, r"algorithm\.bv_blend\.eps"),
    ({"scale": "std"}, r"algorithm\.bv_blend\.scale must be one of"),
    ({"initial_baseline": float("inf")}, r"algorithm\.bv_blend\.initial_baseline"),
    ({"windw": 10}, r"algorithm\.bv_blend\.windw is not a setting of the bv_blend estimator"),
], ids=["window", "ema_decay", "min_history", "eps", "scale", "initial_baseline", "unknown"])
def test_bad_settings_name_the_setting_at_the_first_call(settings, message):
    rewards, mask, uids = make_batch([[0.0, 1.0]], seed=0)
    with pytest.raises(ValueError, match=message):
        compute_bv_blend_advantage(rewards, mask, as_index(uids), algorithm(**settings))
    assert bv_verl._driver.estimator is None


def test_settings_and_inputs_the_estimator_cannot_honour():
    rewards, mask, uids = make_batch([[0.0, 1.0]], seed=0)
    index = as_index(uids)
    with pytest.raises(ValueError, match=r"norm_adv_by_std_in_grpo=False.*scale=none"):
        compute_bv_blend_advantage(rewards, mask, index, algorithm(False, scale="blend"))
    assert bv_verl._driver.estimator is None
    compute_bv_blend_advantage(rewards, mask, index, algorithm(False))  # the default: scale none
    bv_verl._driver = bv_verl._Driver()
    with pytest.raises(ValueError, match="needs the batch's uid array"):
        compute_bv_blend_advantage(rewards, mask, config=algorithm())
    with pytest.raises(ValueError, match=r"index \(the uids\) has 1 entries for 2 rows"):
        compute_bv_blend_advantage(rewards, mask, index[:1], algorithm())
    compute_bv_blend_advantage(rewards, mask, index, algorithm(window=10))
    with pytest.raises(ValueError, match="one driver process trains one run"):
        compute_bv_blend_advantage(rewards, mask, index, algorithm(window=20))


def test_callback_refuses_configs_it_cannot_serve(tmp_path):
    config = trainer_config(tmp_path)
    config.algorithm.adv_estimator = "grpo"
    with pytest.raises(ValueError, match="algorithm.adv_estimator='grpo'"):
        build_checkpoint_callback(config)
    with pytest.raises(ValueError, match="trainer.resume_from_path to be a global_step_N"):
        build_checkpoint_callback(trainer_config(tmp_path, "resume_path", "checkpoints/last"))
    with pytest.raises(ValueError, match="trainer.resume_mode must be"):
        build_checkpoint_callback(trainer_config(tmp_path, "latest"))
