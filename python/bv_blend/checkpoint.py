"""Checkpoints: everything a run needs to continue exactly where it stopped.

<output_dir>/checkpoint-<step>/ holds the model and tokenizer (save_pretrained, so the directory
is also a usable model) and trainer_state.pt with the optimizer, scheduler, step, data position,
every process's RNG states, the BV-Blend history and the metrics so far.

A checkpoint is written as checkpoint-<step>.partial and renamed when complete (and deleted by
renaming it first), so a crash while saving or pruning never leaves a checkpoint-<step> folder
that a resume could pick up half-written.

trainer_state.pt holds only tensors and plain containers of numbers and strings and is read with
`torch.load(weights_only=True)`: loading a checkpoint never runs code stored in it.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import zipfile

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
# Layout of trainer_state.pt. Unversioned files (before format 2) pickled NumPy's RNG state and
# need weights_only=False, so they are refused.
FORMAT = 2
_NAME = re.compile(r"^checkpoint-(\d+)$")
_REQUIRED = {STATE_FILE: (STATE_FILE,), "config.json": ("config.json",),
             "model.safetensors": ("model.safetensors", "model.safetensors.index.json")}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, incomplete, damaged or unsafe to load."""


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain numbers (NumPy's key as an int64 tensor)."""
    algorithm, key, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"algorithm": str(algorithm), "key": torch.from_numpy(key.astype(np.int64)),
                       "position": int(position), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["algorithm"], numpy["key"].numpy().astype(np.uint32),
                         numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def output_dir_problem(path: str) -> str | None:
    """Why `path` cannot hold a run's outputs (creating it if needed), or None when it can."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, expected a directory"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        return f"cannot be created ({err.strerror or err})"
    if not os.access(path, os.W_OK | os.X_OK):
        return "is not writable"
    return None


def save(output_dir: str, step: int, *, model, tokenizer, trainer_state: dict) -> str:
    path = os.path.join(output_dir, f"checkpoint-{step}")
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    torch.save({"format": FORMAT, **trainer_state}, os.path.join(partial, STATE_FILE))
    _fsync_tree(partial)
    # A directory can only be renamed onto a missing (or empty) one: the same step saved again
    # after a resume moves the old folder aside first.
    replaced = path + ".replaced"
    if os.path.exists(path):
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(path, replaced)
    os.rename(partial, path)
    _fsync(output_dir)
    shutil.rmtree(replaced, ignore_errors=True)
    return path


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    # The rename must not reach the disk before the files it publishes (a power cut would
    # otherwise leave a complete-looking checkpoint of empty files).
    for folder, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def checkpoints(output_dir: str) -> list[int]:
    """Steps of the complete checkpoint-<step> folders in `output_dir`, ascending."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(output_dir) if (m := _NAME.match(name))
                  and not missing_files(os.path.join(output_dir, name)))


def prune(output_dir: str, keep: int, newest: int) -> list[str]:
    """Delete the oldest complete checkpoints so that at most `keep` remain, never that of step
    `newest` (the one just written). Returns the deleted folders."""
    older = [step for step in checkpoints(output_dir) if step != newest]
    deleted = []
    for step in older[:max(0, len(older) - (keep - 1))]:
        path = os.path.join(output_dir, f"checkpoint-{step}")
        # Renamed first, so that an interrupted deletion leaves no half-deleted checkpoint-N.
        doomed = path + ".deleting"
        os.rename(path, doomed)
        shutil.rmtree(doomed)
        deleted.append(path)
    return deleted


def missing_files(path: str) -> list[str]:
    """The files a resumable checkpoint needs that `path` lacks."""
    return [name for name, alternatives in _REQUIRED.items()
            if not any(os.path.isfile(os.path.join(path, a)) for a in alternatives)]


def resolve(path: str) -> str:
    """`path` itself when it is a checkpoint, else the latest complete checkpoint-N inside it."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume_from {path!r} does not exist or is not a directory")
    if os.path.isfile(os.path.join(path, STATE_FILE)) or \
            _NAME.match(os.path.basename(os.path.normpath(path))):
        missing = missing_files(path)
        if missing:
            raise CheckpointError(f"resume_from {path!r} is an incomplete checkpoint: it lacks "
                                  f"{', '.join(missing)}")
        return path
    steps = checkpoints(path)
    if not steps:
        incomplete = sorted(name for name in os.listdir(path) if _NAME.match(name))
        raise FileNotFoundError(
            f"resume_from {path!r} is not a checkpoint and holds no complete checkpoint-N "
            f"directories" + (f" (incomplete: {', '.join(incomplete)})" if incomplete else ""))
    return os.path.join(path, f"checkpoint-{steps[-1]}")


def load_state(path: str) -> dict:
    """trainer_state.pt of checkpoint `path`, refusing any file that would need to run code."""
    file = os.path.join(path, STATE_FILE)
    # torch.save writes a zip whose directory is at the end: a truncated file has none.
    if not zipfile.is_zipfile(file):
        raise CheckpointError(f"{file!r} is truncated or damaged (not a complete torch.save file)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise CheckpointError(
            f"{file!r} is not a safe checkpoint: it holds Python objects other than tensors and "
            f"plain containers{f' ({found.group(1)})' if found else ''}, which could run code "
            f"when loaded, so it is refused. Checkpoints written before format {FORMAT} "
            f"(unversioned) are refused for the same reason") from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{file!r} is damaged and cannot be read ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"{file!r} has format {found}, expected {FORMAT}: it was not written "
                              f"by this version of bv_blend")
    return state


def load_weights(model, path: str) -> None:
    """Copy the weights saved in checkpoint `path` into `model` (its class, dtype and device)."""
    from safetensors import SafetensorError

    try:
        saved = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype,
                                            local_files_only=True, use_safetensors=True)
        model.load_state_dict(saved.state_dict())
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"the model weights in {path!r} cannot be loaded into this model "
                              f"(truncated, damaged or another architecture): {err}") from None
