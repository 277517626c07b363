"""Atomic checkpoint files: a checkpoint on disk is always either the previous complete one or
the new complete one, never a half-written mix (write to a temporary file, fsync, rename)."""

from __future__ import annotations

import os
import signal
import tempfile
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

#: Marks files written by this harness; bumped if the layout of the dict changes.
FORMAT = "vse_cuda.train/1"
REQUIRED_KEYS = ("format", "config", "model", "epoch")
#: Temporary files of :func:`atomic_write` are named ``.{name}.{random}{TMP_SUFFIX}``.
TMP_SUFFIX = ".tmp"

#: Private test hook (python_tests/test_crash_safe.py): ``NAME:N[:after]`` items, comma-separated,
#: make this process SIGKILL itself at the N-th atomic write of a file named NAME (``*``: any
#: file) -- before the rename, when the temporary file is complete and the target untouched, or
#: with ``:after`` just after it. Unset (always, outside that test) it does nothing.
_KILL_ENV = "_VSE_CUDA_KILL_AT_WRITE"
_writes: Counter[str] = Counter()


def _kill_hook(name: str, when: str) -> None:
    for item in filter(None, os.environ.get(_KILL_ENV, "").split(",")):
        target, n, *phase = item.split(":")
        if target in (name, "*") and _writes[target] == int(n) and (phase or ["before"])[0] == when:
            os.kill(os.getpid(), signal.SIGKILL)


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or from another configuration."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path`` and fsync the directory, so a crash leaves the old file or the new one (and at
    worst a stray temporary file, which :func:`remove_stale_temporaries` deletes)."""
    path = Path(path)
    _writes.update((path.name, "*"))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _kill_hook(path.name, "before")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    _kill_hook(path.name, "after")


def remove_stale_temporaries(directory: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files that writes of ``names`` in ``directory`` left behind when
    their process was killed mid-write (no :func:`atomic_write` of them may be running)."""
    stale = [p for name in names for p in Path(directory).glob(f".{name}.*{TMP_SUFFIX}")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically save ``state`` (plain types and tensors only) with the format tag."""
    state = {"format": FORMAT, **state}
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def _reason(err: BaseException) -> str:
    """One line on why torch.load failed (its weights-only errors span paragraphs of advice)."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return f"{type(err).__name__}: {line[:200]}" if line else type(err).__name__


def load_checkpoint(path: Path, required: tuple[str, ...] = REQUIRED_KEYS) -> dict[str, Any]:
    """Load and check a checkpoint holding the ``required`` keys (``weights_only``: no code
    runs from the file; the zip entries' CRCs are checked first, so a torn or bit-flipped file
    is refused rather than loaded with wrong numbers).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or not written by this harness.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise CheckpointError(f"checkpoint {path} is truncated or corrupt (entry {bad} fails its CRC check)")
        with warnings.catch_warnings():  # torch's advice on a foreign pickle's protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # whatever a damaged or foreign file makes the unpickler raise
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt, or not a torch file ({_reason(err)})") \
            from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vse_cuda.train checkpoint (format {FORMAT!r} expected)")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def output_dir_problem(directory: Path, file_names: tuple[str, ...]) -> str | None:
    """Why ``directory`` cannot take a run's files named ``file_names``, or None when it can: the
    first existing path on its way must be a writable directory and no file name may be taken by
    a directory. Leaves nothing behind, so a command can check before its work, not after."""
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a directory"
    taken = [name for name in file_names if (directory / name).is_dir()]
    if taken:
        return f"{directory / taken[0]} is a directory, where the {taken[0]} file goes; move it away"
    if existing is not None and not _can_create_in(existing):
        return f"{existing} is not writable"
    return None


def _can_create_in(directory: Path) -> bool:
    """Whether a file can be created in ``directory``: tried with a probe file, removed at once.
    os.access answers from the mode bits, which root passes everywhere (a 0o555 directory, /proc),
    and knows nothing of what the file system itself refuses."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".vse_cuda-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True
