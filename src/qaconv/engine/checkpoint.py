"""Atomic checkpoint writing and safe loading (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write, remove_stale_temp  # noqa: F401  (re-exported)
from ..errors import QAConvError

FORMAT = "qaconv-checkpoint-1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def safe_torch_load(path, what: str, map_location: str | torch.device = "cpu", safe_globals=()) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors: ``PATH is corrupt or not WHAT (...)``.
    torch's own message for a pickle holding other objects suggests allowlisting them; it is never shown."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        text = str(exc)
        if "weights only load failed" in text.lower() or "unsupported global" in text.lower():
            raise QAConvError(
                f"{path} is corrupt or not {what}: it holds objects other than tensors and plain values"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise QAConvError(f"{path} is corrupt or not {what} ({first})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; clear errors for wrong or broken files."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise QAConvError(f"checkpoint {path} does not exist")
    state = safe_torch_load(path, "a qaconv checkpoint", map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise QAConvError(f"{path} is not a qaconv checkpoint (expected format '{FORMAT}')")
    return state
