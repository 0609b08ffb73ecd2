"""BV-Blend advantages inside verl: the `bv_blend` advantage estimator and a checkpoint callback.

    algorithm.adv_estimator=bv_blend
    trainer.checkpoint_callback_class=bv_blend.verl.BVBlendCheckpointCallback

`pip install 'bv-blend-ext[verl]'` is the whole setup: `import verl` imports this module through
the `verl.plugins` entry point, and importing it registers the estimator. verl's trainer calls the
estimator on its driver process once per training step (per sub-step with parameter_sync_step >
1) with the batch's token-level rewards, response mask and uid array. The driver process holds
one `bv_blend_ext.BVBlend` (the history), which the checkpoint callback saves in every
`global_step_N` folder and restores when the trainer builds it (docs/verl.md).

The integration relies on verl internals listed in docs/verl.md; the version check below refuses
a verl outside the tested range instead of training with an interface that may have changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from bv_blend._versions import require_version

__all__ = ["BVBlendCheckpointCallback", "ESTIMATOR_NAME", "STATE_FILE", "SUPPORTED_VERL",
           "check_verl_version", "compute_bv_blend_advantage", "driver_estimator",
           "read_settings", "register", "resume_folder"]

# Keep in step with the `verl` extra in setup.py.
SUPPORTED_VERL = ">=0.9.1,<0.10"
# The name users give as algorithm.adv_estimator, and the config section of its settings.
ESTIMATOR_NAME = "bv_blend"
# Written next to verl's own files in every global_step_N checkpoint folder.
STATE_FILE = "bv_blend_state.pt"

logger = logging.getLogger(__name__)


def check_verl_version(version: str) -> None:
    """Raise ImportError unless `version` is a verl release this integration was tested against."""
    require_version("verl", version, SUPPORTED_VERL, "trainer internals")


try:
    import verl
except ImportError as err:
    raise ImportError(
        f"bv_blend.verl needs verl (verl{SUPPORTED_VERL}): `pip install 'bv-blend-ext[verl]'`"
    ) from err
try:
    check_verl_version(verl.__version__)
except ImportError as err:
    # verl imports this module from its plugin loader, which logs import errors at debug level
    # only: without this line the user would just see "Unknown advantage estimator bv_blend".
    logger.warning("%s", err)
    raise

import bv_blend_ext  # noqa: E402  (after the version check: a bad verl should fail first)
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.checkpoint_callback import CheckpointCallback  # noqa: E402
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path  # noqa: E402

# The estimator settings under algorithm.bv_blend: BVBlend's defaults, except eps, verl's GRPO
# epsilon, so that with no history yet and scale "group" the advantages are verl's `grpo` ones.
DEFAULT_SETTINGS = {"window": 100, "ema_decay": None, "initial_baseline": 0.0, "min_history": 2,
                    "eps": 1e-6, "scale": bv_blend_ext.DEFAULT_SCALE}


def read_settings(algorithm) -> dict:
    """The estimator settings of `algorithm` (the trainer's config.algorithm): those given under
    algorithm.bv_blend, the defaults for the rest. Raises ValueError naming a bad setting."""
    given = algorithm.get(ESTIMATOR_NAME)
    if given is None:
        given = {}
    if isinstance(given, DictConfig):
        given = OmegaConf.to_container(given, resolve=True)
    if not isinstance(given, Mapping):
        raise ValueError(f"algorithm.{ESTIMATOR_NAME} must hold the estimator settings "
                         f"{sorted(DEFAULT_SETTINGS)}, got {given!r}")
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"algorithm.{ESTIMATOR_NAME}.{unknown[0]} is not a setting of the "
                         f"{ESTIMATOR_NAME} estimator; its settings are {sorted(DEFAULT_SETTINGS)}")
    settings = {**DEFAULT_SETTINGS, **given}
    bv_blend_ext.check_settings(
        **settings, prefix=f"algorithm.{ESTIMATOR_NAME}.")
    if not algorithm.get("norm_adv_by_std_in_grpo", True) and settings["scale"] != "none":
        # verl's switch for Dr. GRPO does not reach a registered estimator; honour the intent
        # rather than scale advantages the user asked to leave unscaled.
        raise ValueError(
            f"algorithm.norm_adv_by_std_in_grpo=False asks for unscaled advantages (Dr. GRPO); "
            f"with {ESTIMATOR_NAME} set algorithm.{ESTIMATOR_NAME}.scale=none instead "
            f"(got scale={settings['scale']!r})")
    return settings


class _Driver:
    """What one driver process keeps between calls: its estimator and whether it is saved."""

    def __init__(self):
        self.estimator: bv_blend_ext.BVBlend | None = None
        self.settings: dict | None = None
        self.saved_with_checkpoints = False
        self.warned_unsaved = False


_driver = _Driver()


def driver_estimator(algorithm) -> bv_blend_ext.BVBlend:
    """This process's estimator, built at first use from the settings under algorithm.bv_blend."""
    settings = read_settings(algorithm)
    if _driver.estimator is None:
        _driver.estimator = bv_blend_ext.BVBlend(**settings)
        _driver.settings = settings
    elif settings != _driver.settings:
        raise ValueError(
            f"this process already holds a {ESTIMATOR_NAME} history built with "
            f"algorithm.{ESTIMATOR_NAME}={_driver.settings}, now asked for {settings}: one driver "
            f"process trains one run")
    return _driver.estimator


@torch.no_grad()  # the advantages are constants of the policy loss
def compute_bv_blend_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                               index=None, config=None, **_unused):
    """verl advantage estimator `bv_blend`: BV-Blend advantages, one per response, broadcast over
    its response tokens. Returns (advantages, returns), both (B, T); returns = advantages.

    A row's score is the sum of its token-level rewards. A row whose response mask is all zero
    (verl's padding rows) is unscorable: advantage 0, and left out of its group's statistics and
    of the history. Groups are the rows sharing a uid (`index`), taken in order of first
    appearance. `_unused` takes the extras verl hands to every registered estimator when its
    batch has them (reward_baselines); BV-Blend needs none.
    """
    if index is None:
        raise ValueError(f"the {ESTIMATOR_NAME} advantage estimator groups responses by prompt "
                         f"and needs the batch's uid array (verl passes it as `index` when the "
                         f"batch has non_tensor_batch['uid'])")
    if config is None:
        raise ValueError(f"the {ESTIMATOR_NAME} advantage estimator needs the trainer's "
                         f"config.algorithm (`config`), which holds its settings")
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"token_level_rewards and response_mask must both be (batch, "
                         f"response_length), got {tuple(token_level_rewards.shape)} and "
                         f"{tuple(response_mask.shape)}")
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"index (the uids) has {len(index)} entries for "
                         f"{token_level_rewards.shape[0]} rows")
    estimator = driver_estimator(config)
    if not _driver.saved_with_checkpoints and not _driver.warned_unsaved:
        _driver.warned_unsaved = True
        logger.warning(f"the {ESTIMATOR_NAME} history is not saved with checkpoints, so a resumed "
                       f"run starts from an empty history; set trainer.checkpoint_callback_class="
                       f"bv_blend.verl.BVBlendCheckpointCallback")

    device = token_level_rewards.device
    scorable = (response_mask != 0).any(dim=-1)
    scores = token_level_rewards.sum(dim=-1).masked_fill(~scorable, float("nan"))
    # The op takes each group as a contiguous run of rows: number the uids in order of first
    # appearance, sort the rows by that number (stably, so rows keep their order inside a
    # group), and give the op the run boundaries.
    group_numbers: dict = {}
    group_of_row = torch.tensor([group_numbers.setdefault(uid, len(group_numbers))
                                 for uid in index], dtype=torch.int64, device=device)
    order = torch.argsort(group_of_row, stable=True)
    offsets = torch.zeros(len(group_numbers) + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.bincount(group_of_row, minlength=len(group_numbers)).cumsum(0)
    # validate=False: these offsets are valid by construction, so the check's host read is waste.
    sorted_advantages = estimator(scores[order], offsets=offsets, validate=False)
    advantages = torch.empty_like(sorted_advantages)
    advantages[order] = sorted_advantages
    advantages = advantages.unsqueeze(-1) * response_mask
    return advantages, advantages


def register() -> None:
    """Register `bv_blend` with verl's advantage estimators. Importing this module does it; call
    it again after something has cleared verl's registry. Registering twice is harmless."""
    core_algos.register_adv_est(ESTIMATOR_NAME)(compute_bv_blend_advantage)


register()


def resume_folder(trainer) -> str | None:
    """The global_step_N folder the trainer will resume from, None when it starts afresh.

    `trainer` is config.trainer; the folder is resolved as verl's v1 trainer resolves it in
    _load_checkpoint: resume_mode "disable" never resumes, "auto" takes the latest checkpoint
    recorded under default_local_dir, "resume_path" takes resume_from_path; relative paths are
    relative to the working directory.
    """
    mode = trainer.resume_mode
    if mode == "disable":
        return None
    if mode == "auto":
        # os.path.join keeps an absolute default_local_dir as it is.
        return find_latest_ckpt_path(os.path.join(os.getcwd(), trainer.default_local_dir))
    if mode == "resume_path":
        path = trainer.resume_from_path
        if not isinstance(path, str) or "global_step_" not in path:
            raise ValueError(f"trainer.resume_mode=resume_path needs trainer.resume_from_path to "
                             f"be a global_step_N checkpoint folder, got {path!r}")
        return os.path.join(os.getcwd(), path)
    raise ValueError(f"trainer.resume_mode must be 'auto', 'resume_path' or 'disable', "
                     f"got {mode!r}")


class BVBlendCheckpointCallback(CheckpointCallback):
    """Keeps the BV-Blend history with verl's checkpoints.

    Select it with trainer.checkpoint_callback_class=bv_blend.verl.BVBlendCheckpointCallback.
    verl builds it in the trainer's constructor, on the driver process, which is when it restores
    the history of the checkpoint the trainer will resume from (verl has no load hook); after
    every checkpoint it writes the history to `bv_blend_state.pt` in the global_step_N folder.
    Subclass it (and call super()) to add checkpoint work of your own.
    """

    def __init__(self, config):
        super().__init__(config)
        adv_estimator = config.algorithm.adv_estimator
        if adv_estimator != ESTIMATOR_NAME:
            raise ValueError(
                f"trainer.checkpoint_callback_class=BVBlendCheckpointCallback saves the history "
                f"of the {ESTIMATOR_NAME} estimator, but algorithm.adv_estimator="
                f"{adv_estimator!r}; set algorithm.adv_estimator={ESTIMATOR_NAME} or drop the "
                f"callback")
        estimator = driver_estimator(config.algorithm)
        folder = resume_folder(config.trainer)
        if folder is not None:
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                # load_state_dict checks the state and raises ValueError naming a bad field.
                estimator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                logger.warning(f"{folder} has no {STATE_FILE} (saved without "
                               f"BVBlendCheckpointCallback?); {ESTIMATOR_NAME} starts from an "
                               f"empty history")
        _driver.saved_with_checkpoints = True

    def on_save(self, trainer, global_step: int, checkpoint_dir: str, async_save: bool = False,
                **kwargs) -> None:
        # On CPU, so that a checkpoint written on a GPU driver resumes on any machine.
        state = {name: tensor.cpu()
                 for name, tensor in driver_estimator(self.config.algorithm).state_dict().items()}
        path = os.path.join(checkpoint_dir, STATE_FILE)
        # Written whole or not at all: verl has already recorded this checkpoint as the latest,
        # and a torn file would stop the resumed run at load_state_dict.
        partial = f"{path}.partial"
        torch.save(state, partial)
        os.replace(partial, path)
