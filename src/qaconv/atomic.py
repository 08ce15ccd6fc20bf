"""Atomic file writing: readers see the old file or the complete new one, never a partial write."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import QAConvError


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


class _Recorder:
    """A file that remembers the first ``OSError`` of its writes: torch.save reports a full disk as an
    unrelated "inline_container.cc ... unexpected pos" RuntimeError, the recorded error says what happened."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


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
    f = None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as raw:
            f = _Recorder(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):
            exc = f.error if f is not None and f.error is not None else exc  # the real cause of torch's error
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
