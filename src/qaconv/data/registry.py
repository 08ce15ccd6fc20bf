"""Resolve a dataset name to records: synthetic domains, or any folder in Market-1501 layout."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import QAConvError
from .market import ReidDataset, load_market_layout

SYNTH_NAME = re.compile(r"^synth[_-]?([a-z])$", re.IGNORECASE)


def synth_folder(domain: str, data_dir: str | Path) -> Path:
    return Path(data_dir) / f"synth_{domain.upper()}"


def ensure_synth(domain: str, data_dir: str | Path, seed: int = 0, progress: bool = True) -> Path:
    """The synthetic domain's folder under ``data_dir``, generated first if it is absent or partial."""
    from .synth import DOMAINS, generate_domain, is_generated

    domain = domain.upper()
    if domain not in DOMAINS:
        raise QAConvError(f"unknown synthetic domain '{domain}': choose from {', '.join(sorted(DOMAINS))}")
    folder = synth_folder(domain, data_dir)
    if is_generated(folder, domain, seed=seed):
        return folder
    if progress:
        print(f"generating synthetic domain {domain} into {folder}")
    generate_domain(domain, folder, seed=seed, progress=progress)
    return folder


def load_dataset(name: str, data_dir: str | Path = "data", progress: bool = True) -> ReidDataset:
    """Records of ``name``: ``synth_A``/``synth_B``/... (generated on first use), a folder name under
    ``data_dir`` or a path, in Market-1501 layout."""
    m = SYNTH_NAME.match(name)
    if m:
        folder = ensure_synth(m.group(1), data_dir, progress=progress)
        return load_market_layout(folder, name=f"synth_{m.group(1).upper()}")
    for candidate in (Path(data_dir) / name, Path(name)):
        if candidate.is_dir():
            return load_market_layout(candidate, name=name)
    raise QAConvError(
        f"dataset '{name}' not found: looked for folder {Path(data_dir) / name} and {Path(name)}; "
        "use synth_A, synth_B, ... or a folder in Market-1501 layout"
    )
