"""Atomic checkpoints of the full training state.

A checkpoint is one ``torch.save`` file, ``checkpoint.pt`` in the run's
folder: written to a temporary file in the same folder, flushed to disk, then
renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so a
run killed at any moment leaves either the previous or the new checkpoint,
never a torn one.
"""
from __future__ import annotations

import os
import pathlib
import tempfile

import torch

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(folder, state: dict) -> pathlib.Path:
    """Write ``state`` to ``folder/checkpoint.pt`` atomically; returns the path."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(folder) -> dict:
    """The state saved in ``folder/checkpoint.pt`` (our own files: full unpickling)."""
    path = pathlib.Path(folder) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {str(folder)!r} (expected {path.name})")
    return torch.load(path, map_location="cpu", weights_only=False)
