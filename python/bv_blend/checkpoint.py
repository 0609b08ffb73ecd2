"""Checkpoints: everything a run needs to continue exactly where it stopped.

<output_dir>/checkpoint-<step>/ holds the model and tokenizer (save_pretrained, so the directory
is also a usable model) and trainer_state.pt with the optimizer, scheduler, step, data position,
every process's RNG states, the BV-Blend history and the metrics so far. It is written under a
temporary name and renamed when complete, so a crash while saving never damages a checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save(output_dir: str, step: int, *, model, tokenizer, trainer_state: dict) -> str:
    path = os.path.join(output_dir, f"checkpoint-{step}")
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    torch.save(trainer_state, os.path.join(partial, STATE_FILE))
    if os.path.exists(path):  # the same step saved again after a resume
        shutil.rmtree(path)
    os.rename(partial, path)
    return path


def resolve(path: str) -> str:
    """`path` itself when it is a checkpoint, else the latest checkpoint-N inside it."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume_from {path!r} does not exist")
    steps = [int(m.group(1)) for name in os.listdir(path) if (m := _NAME.match(name))
             and os.path.isfile(os.path.join(path, name, STATE_FILE))]
    if not steps:
        raise FileNotFoundError(f"resume_from {path!r} is not a checkpoint and holds no "
                                f"checkpoint-N directories")
    return os.path.join(path, f"checkpoint-{max(steps)}")


def load_state(path: str) -> dict:
    # weights_only=False: the state holds Python and NumPy RNG states, which are not tensors.
    # Only load checkpoints you wrote (or trust), as with any pickle.
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def load_weights(model, path: str) -> None:
    """Copy the weights saved in checkpoint `path` into `model` (its class, dtype and device)."""
    saved = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype,
                                        local_files_only=True)
    model.load_state_dict(saved.state_dict())
