"""The package's error type for problems a user can fix (bad data, arguments, checkpoints)."""


class QAConvError(Exception):
    """A user-facing problem: the CLI prints its one-line message and exits non-zero."""
