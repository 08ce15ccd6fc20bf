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
