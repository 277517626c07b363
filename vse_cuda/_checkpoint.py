"""Atomic checkpoint files: a checkpoint on disk is always either the previous complete one or
the new complete one, never a half-written mix (write to a temporary file, fsync, rename)."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

#: Marks files written by this harness; bumped if the layout of the dict changes.
FORMAT = "vse_cuda.train/1"
REQUIRED_KEYS = ("format", "config", "model", "epoch")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or from another configuration."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path`` and fsync the directory, so a crash leaves the old file or the new one."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically save ``state`` (plain types and tensors only) with the format tag."""
    state = {"format": FORMAT, **state}
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, required: tuple[str, ...] = REQUIRED_KEYS) -> dict[str, Any]:
    """Load and check a checkpoint holding the ``required`` keys (``weights_only``: no code
    runs from the file).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or not written by this harness.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vse_cuda.train checkpoint (format {FORMAT!r} expected)")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state
