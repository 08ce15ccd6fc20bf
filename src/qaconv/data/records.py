"""Image records and the Market-1501 file-name convention shared by loaders and the generator."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .filetypes import IMAGE_SUFFIXES

_EXTS = "|".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
MARKET_NAME = re.compile(rf"^(-?\d+)_c(\d)s(\d)_(\d+)_(\d+)\.({_EXTS})$", re.IGNORECASE)
MARKET_FPS = 25.0


@dataclass(frozen=True)
class Record:
    """One image: file path, identity, 0-based camera id and time stamp in seconds (or None)."""

    path: str
    pid: int
    camid: int
    time: float | None = None


def relabel_pids(records: list[Record]) -> list[Record]:
    """Training records with pids relabelled to 0..N-1 in sorted order of the raw pids."""
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [Record(r.path, mapping[r.pid], r.camid, r.time) for r in records]


def market_name(pid: int, cam: int, session: int, frame: int, index: int = 0, ext: str = "jpg") -> str:
    """File name in Market-1501 convention; ``cam`` and ``session`` are 1-based as on disk."""
    if not (1 <= cam <= 9 and 1 <= session <= 9):
        raise ValueError(f"Market names hold one-digit cameras and sessions, got c{cam}s{session}")
    return f"{pid:04d}_c{cam}s{session}_{frame:06d}_{index:02d}.{ext}"
