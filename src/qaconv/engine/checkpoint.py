"""Atomic checkpoint writing and safe loading (``weights_only=True``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import QAConvError

FORMAT = "qaconv-checkpoint-1"


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (setting it briefly races threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, sync it, then rename it to ``path``:
    readers see the old file or the complete new one, never a partial write. A failed write (a full disk,
    a read-only folder) leaves the old file as it was and raises one line naming ``path`` and the reason."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise QAConvError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
            raise QAConvError(f"cannot write {path}: {reason}; the previous file is unchanged") from None
        raise
    return path


def remove_stale_temp(path: str | Path) -> list[Path]:
    """Delete temporary files that a kill during :func:`atomic_write` of ``path`` left behind; returns them."""
    path = Path(path)
    stale = sorted(path.parent.glob(path.name + ".*.tmp")) if path.parent.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; clear errors for wrong or broken files."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise QAConvError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        if "weights only load failed" in str(exc).lower():  # torch's text would suggest unsafe loading: never
            raise QAConvError(
                f"{path} is corrupt or not a qaconv checkpoint: it holds objects other than tensors and plain "
                "values (qaconv checkpoints never do)"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QAConvError(f"{path} is corrupt or not a qaconv checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise QAConvError(f"{path} is not a qaconv checkpoint (expected format '{FORMAT}')")
    return state
