"""Resumable training checkpoints: one file per saved step, written atomically, the last N kept.

A checkpoint holds what the base checkpoint does not: the trainable tensors by name, the optimizer and LR
scheduler states, every rank's global RNG states, the data position and the config. It is written by the first
process to a temporary file in the same folder and renamed into place, so ``checkpoints/step_00000040.pt``
either exists complete or not at all — a process killed mid-write leaves only a stray ``.tmp`` (removed on the
next save). Files are read back with ``torch.load(weights_only=True)``: tensors and plain containers only, no
pickled code.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from model_patches.weight_files import atomic_write

CHECKPOINT_FORMAT = "subject-customization/train-checkpoint"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, of another method or format, or does not fit the model being trained."""


def checkpoint_path(folder, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def list_checkpoints(folder) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(folder, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then delete all but the ``keep`` newest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stray in folder.glob(".step_*.tmp"):
        stray.unlink(missing_ok=True)
    path = checkpoint_path(folder, step)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, **state}
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path, method: str | None = None) -> dict:
    """The checkpoint at ``path``; with ``method`` set, refuse one written by another trainer."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:
        raise CheckpointError(f"{path.name} is not a readable training checkpoint ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path.name} is not a checkpoint of this pack's trainers")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path.name} has checkpoint version {state['version']}; this trainer reads up "
                              f"to {CHECKPOINT_VERSION} — update the pack")
    if method is not None and state.get("method") != method:
        raise CheckpointError(f"{path.name} was written by the {state.get('method')!r} trainer, not {method!r}")
    return state


def latest_checkpoint(folder) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None
