"""The package's error type for problems a user can fix (bad data, arguments, checkpoints)."""

from collections.abc import Iterator
from contextlib import contextmanager


class QAConvError(Exception):
    """A user-facing problem: the CLI prints its one-line message and exits non-zero."""


@contextmanager
def writing(path, what: str = "") -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block (a full disk, a read-only folder) into one line naming
    ``path``: ``cannot write [what in] PATH: No space left on device``. A full disk often raises with no
    file name at all (the error comes from a flush or close), hence the path of the caller's output."""
    try:
        yield
    except OSError as exc:
        target = f"{what} in {path}" if what else str(path)
        raise QAConvError(f"cannot write {target}: {exc.strerror or exc}") from None
