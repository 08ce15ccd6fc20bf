"""Safe file and folder names for user-given names (test sets named by a path or with odd characters)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


def safe_stem(name: str) -> str:
    """A file or folder name for ``name``: its base name with unsafe characters replaced, plus a short hash of
    the whole name when that differs, so it never leaves the folder it is joined to and two names with one
    base name (``a/market``, ``b/market``) never collide.

    >>> safe_stem("synth_A"), safe_stem("a/market") != safe_stem("b/market"), "/" in safe_stem("/x/../y.csv")
    ('synth_A', True, False)
    """
    name = str(name)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name or name).strip("._") or "testset"
    if base == name:
        return base
    return f"{base}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _base(name: str) -> list[str]:
    """The parts a test-set name is shown by, last first: ``/x/y/cams.csv`` -> ``['cams', 'y', 'x']``."""
    parts = [p for p in re.split(r"[\\/]+", name.strip()) if p not in ("", ".")]
    if not parts:
        return [name]
    if parts[-1].lower().endswith(".csv") and len(parts[-1]) > 4:
        parts[-1] = parts[-1][:-4]
    return parts[::-1]


def short_names(names) -> dict[str, str]:
    """A short display name per test-set name, for tables and reports: the base name of a path (a CSV without
    ``.csv``), with as many parent folders as it takes to tell apart two sets that share a base name
    (``a/market``, ``b/market``); a name given twice gets ``#2``, ``#3``. Benchmark and synthetic names stay.

    >>> short_names(["/data/cams.csv", "synth_B", "x/a/market", "y/a/market", "y/b/market"])
    {'/data/cams.csv': 'cams', 'synth_B': 'synth_B', 'x/a/market': 'x/a/market', 'y/a/market': 'y/a/market', \
'y/b/market': 'b/market'}
    """
    names = list(dict.fromkeys(str(n) for n in names))
    parts = {n: _base(n) for n in names}
    depth = dict.fromkeys(names, 1)
    while True:
        shown = {n: "/".join(parts[n][: depth[n]][::-1]) for n in names}
        clash = {n for n in names if sum(s == shown[n] for s in shown.values()) > 1 and depth[n] < len(parts[n])}
        if not clash:
            break
        for n in clash:
            depth[n] += 1
    seen: dict[str, int] = {}
    for n in names:  # still equal (e.g. 'a/m' and 'a//m'): numbered
        seen[shown[n]] = seen.get(shown[n], 0) + 1
        if seen[shown[n]] > 1:
            shown[n] = f"{shown[n]}#{seen[shown[n]]}"
    return shown
