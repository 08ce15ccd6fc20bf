"""Resolve a dataset name to records: synthetic domains, or any folder in Market-1501 layout."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import QAConvError
from .benchmarks import BENCHMARKS, combine, load_benchmark
from .market import load_market_layout

BENCHMARK_NAMES = ("market", "duke", "cuhk03_np_detected", "cuhk03_np_labeled", "msmt17", "randperson", "clonedperson")

SYNTH_NAME = re.compile(r"^synth[_-]?([a-z])$", re.IGNORECASE)
DEFAULT_DATA_DIR = "data"  # where benchmarks and named folders are looked up when no data_dir is given
HOW_TO_NAME = (
    "a benchmark (" + ", ".join(BENCHMARK_NAMES) + ") under --data-dir (default ./data), a CSV manifest, "
    "a folder in Market-1501 layout, or synth_A/synth_B/synth_C (generated on first use into --data-dir, "
    "default the cache folder ~/.cache/qaconv)"
)


def cache_dir() -> Path:
    """qaconv's cache folder: ``$XDG_CACHE_HOME/qaconv``, else ``~/.cache/qaconv`` (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache") / "qaconv"


def synth_dir(data_dir: str | Path | None) -> Path:
    """Where synthetic domains live: ``data_dir`` when given, else :func:`cache_dir`."""
    return Path(data_dir) if data_dir else cache_dir()


def synth_folder(domain: str, data_dir: str | Path | None) -> Path:
    return synth_dir(data_dir) / f"synth_{domain.upper()}"


def ensure_synth(domain: str, data_dir: str | Path | None, seed: int = 0, progress: bool = True) -> Path:
    """The synthetic domain's folder under ``data_dir`` (None: the cache folder, :func:`cache_dir`), generated
    (default sizes, ``seed``) first if it is absent or partial, saying where; a complete folder made by
    ``qaconv synth`` with other sizes is used as it is."""
    from .synth import DOMAINS, META_FILE, PARTIAL_FILE, SYNTH_VERSION, generate_domain

    domain = domain.upper()
    if domain not in DOMAINS:
        raise QAConvError(f"unknown synthetic domain '{domain}': choose from {', '.join(sorted(DOMAINS))}")
    folder = synth_folder(domain, data_dir)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    complete = meta.get("domain") == domain and meta.get("version") == SYNTH_VERSION
    if complete and not (folder / PARTIAL_FILE).exists():
        return folder  # a complete generation of this domain by this generator version, any sizes
    if progress:
        print(f"generating synthetic domain {domain} into {folder}")
    generate_domain(domain, folder, seed=seed, progress=progress)
    return folder


def _is_benchmark(name: str) -> bool:
    return name.strip().lower().replace("-", "_") in BENCHMARKS


def load_dataset(name: str, data_dir: str | Path | None = None, combine_all: bool = False, progress: bool = True,
                 require=None):
    """Records of ``name``: a benchmark (market, duke, cuhk03_np_detected, cuhk03_np_labeled, msmt17,
    randperson, clonedperson; usual folder names under ``data_dir``), a synthetic domain ``synth_A``,
    ``synth_B``, ... (generated on first use), a CSV manifest, or a folder in Market-1501 layout (a name
    under ``data_dir`` or a path). Several comma-separated names are pooled for multi-source training
    (identities and cameras made disjoint). ``combine_all`` is MSMT17's "all" setting.

    ``data_dir`` None: benchmarks and named folders are looked up under ``./data`` and synthetic domains live
    in the cache folder (:func:`cache_dir`); a given ``data_dir`` holds both. ``require``: the splits a
    Market-layout folder must have (see :func:`~qaconv.data.market.load_market_layout`; default all three).
    A folder or CSV given by path is named by its base name (``/x/cams.csv`` -> ``cams``)."""
    names = [n.strip() for n in name.split(",") if n.strip()]
    if not names:
        raise QAConvError("no dataset name given")
    if len(names) > 1:
        return combine([load_dataset(n, data_dir, combine_all, progress, require=("train",)) for n in names])
    m = SYNTH_NAME.match(name)
    if m:
        folder = ensure_synth(m.group(1), data_dir, progress=progress)
        return load_market_layout(folder, name=f"synth_{m.group(1).upper()}", require=require)
    lookup = Path(data_dir if data_dir else DEFAULT_DATA_DIR)
    if _is_benchmark(name):
        return load_benchmark(name, lookup, combine_all=combine_all)
    if combine_all:
        raise QAConvError(f"--combine-all is only defined for msmt17, not for '{name}'")
    for candidate in (lookup / name, Path(name)):
        if candidate.is_file() and candidate.suffix.lower() == ".csv":
            from .manifest import load_manifest

            return load_manifest(candidate)
        if candidate.is_dir():
            return load_market_layout(candidate, name=candidate.name or name, require=require)
    raise QAConvError(f"dataset '{name}' not found: looked for {lookup / name} and {Path(name)}; use {HOW_TO_NAME}")


def check_dataset(name: str, data_dir: str | Path | None = None, combine_all: bool = False) -> None:
    """Raise the one-line error :func:`load_dataset` would give for a name that cannot be found, without
    loading anything big or generating synthetic data (benchmarks: their folder must exist)."""
    names = [n.strip() for n in name.split(",") if n.strip()]
    if not names:
        raise QAConvError("no dataset name given")
    lookup = Path(data_dir if data_dir else DEFAULT_DATA_DIR)
    for n in names:
        m = SYNTH_NAME.match(n)
        if m:
            from .synth import DOMAINS

            if m.group(1).upper() not in DOMAINS:
                known = ", ".join(sorted(DOMAINS))
                raise QAConvError(f"unknown synthetic domain '{m.group(1).upper()}': choose from {known}")
            continue
        if _is_benchmark(n):
            load_benchmark(n, lookup, combine_all=combine_all)  # reads its file lists: fails fast if absent
            continue
        if combine_all:
            raise QAConvError(f"--combine-all is only defined for msmt17, not for '{n}'")
        if not any(
            (c.is_file() and c.suffix.lower() == ".csv") or c.is_dir() for c in (lookup / n, Path(n))
        ):
            load_dataset(n, data_dir)  # raises the not-found message
