"""Atomic checkpoints of the full training state, and the run folder's lock.

A checkpoint is one ``torch.save`` file, ``checkpoint.pt`` in the run's
folder: written to a temporary file in the same folder, flushed to disk, then
renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so a
run killed at any moment leaves either the previous or the new checkpoint,
never a torn one. A write that fails (disk full, I/O error) removes its
temporary file, leaves the previous checkpoint as it was and raises
:class:`CheckpointError` naming the folder.

A checkpoint is data, not code: tensors, numbers, strings, booleans, None and
lists/tuples/dicts of them (the trainer stores its decoder, plasticity state
and generator state in that form). It is read with
``torch.load(..., weights_only=True)``, which rebuilds only those types: a
file whose unpickling would import or call anything else is refused with a
:class:`CheckpointError` before anything in it runs, and so is a truncated
or corrupted file.

:class:`RunLock` keeps two runs off one folder: ``run.lock`` in the folder,
held with an exclusive ``fcntl.flock`` for as long as the run lives. The
kernel drops the lock when the process ends in any way (even SIGKILL), so the
lock file a dead run leaves behind is stale by construction and the next run
simply takes it over; a second live run gets a :class:`RunLockedError` naming
the folder and the holder's pid. (Without ``fcntl``, e.g. on Windows, the
file holds the pid and a lock whose pid is no longer alive is taken over.)
"""
from __future__ import annotations

import os
import pathlib
import pickle
import tempfile
import zipfile

import torch

__all__ = ["CHECKPOINT_NAME", "LOCK_NAME", "CheckpointError", "RunLockedError", "RunLock", "save_checkpoint",
           "load_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = "run.lock"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, or a file that is not a checkpoint
    this version can read (refused, truncated, corrupted, missing fields)."""


class RunLockedError(RuntimeError):
    """The run folder is in use by another live run."""


def save_checkpoint(folder, state: dict) -> pathlib.Path:
    """Write ``state`` to ``folder/checkpoint.pt`` atomically; returns the path.

    Raises:
        CheckpointError: the write failed (``OSError``: disk full, I/O error,
            permissions); the previous checkpoint is left intact.
    """
    folder = pathlib.Path(folder)
    path = folder / CHECKPOINT_NAME
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise CheckpointError(f"checkpoint: writing to {str(folder)!r} failed ({exc.strerror or exc}); "
                              f"the previous checkpoint, if any, is intact") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(folder) -> dict:
    """The state saved in ``folder/checkpoint.pt``, read with ``weights_only=True``.

    Raises:
        FileNotFoundError: no checkpoint in ``folder``.
        CheckpointError: the file is refused (it would import or call code to
            unpickle), truncated or corrupted.
    """
    path = pathlib.Path(folder) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {str(folder)!r} (expected {path.name})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        why = next((ln for ln in first if "Unsupported" in ln or "global" in ln.lower()), first[0] if first else "")
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError(f"resume: refused {str(path)!r}: it holds objects other than tensors, numbers, "
                                  f"strings and lists, whose unpickling could run code; nothing in it was run "
                                  f"({why.strip()})") from None
        raise CheckpointError(f"resume: {str(path)!r} is corrupted and cannot be read ({exc})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, IndexError, KeyError,
            AttributeError, TypeError) as exc:
        raise CheckpointError(f"resume: {str(path)!r} is truncated or corrupted and cannot be read "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"resume: {str(path)!r} is not a cellkern checkpoint (holds {type(state).__name__}, "
                              f"expected a dict)")
    return state


class RunLock:
    """An exclusive lock on a run folder (``folder/run.lock``), see the module docstring.

    ``acquire()`` raises :class:`RunLockedError` when another live run holds it;
    ``release()`` (idempotent) lets it go; the lock is also dropped when the process ends.
    """

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def _busy(self, holder) -> RunLockedError:
        who = f"pid {holder}" if holder else "another process"
        return RunLockedError(f"run folder {str(self.folder)!r} is in use by another run ({who}, lock file "
                              f"{self.path.name}); wait for it to end or choose another folder")

    def acquire(self) -> "RunLock":
        if self._fh is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="ascii")
        try:
            import fcntl
        except ImportError:  # no flock: a pid file, taken over when its pid is dead
            fcntl = None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    fh.seek(0)
                    raise self._busy(fh.read().strip()) from None
            else:
                fh.seek(0)
                holder = fh.read().strip()
                if holder.isdigit() and int(holder) != os.getpid() and _alive(int(holder)):
                    raise self._busy(holder)
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
        except BaseException:
            fh.close()
            raise
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()  # closing the descriptor drops the flock
            finally:
                self._fh = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
