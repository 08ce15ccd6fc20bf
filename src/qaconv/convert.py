"""Official QAConv ``checkpoint.pth.tar`` -> a checkpoint in this package's format (``qaconv convert``)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .engine.checkpoint import save_checkpoint
from .engine.runner import DEFAULTS
from .engine.trainer import CHECKPOINT
from .errors import QAConvError
from .models.official import load_official_checkpoint


def convert_official(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str = "resnet50",
    ibn: str | None = "b",
    final_layer: str = "layer3",
    neck: int = 128,
    height: int = 384,
    width: int = 128,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/checkpoint.pt`` (+ ``config.yaml``) from an official checkpoint; return its path.

    The architecture arguments are those of :func:`qaconv.load_official_checkpoint`. The result loads
    with :func:`qaconv.load` and ``qaconv evaluate --checkpoint out_dir``; its model takes un-normalised
    [0, 1] RGB (``input_norm: none``) like the official code.

    Example::

        convert_official("logs/Market/qaconv/checkpoint.pth.tar", "runs/official_market")
        m = qaconv.load("runs/official_market")
    """
    out = Path(out_dir)
    target = out / CHECKPOINT
    if target.exists() and not overwrite:
        raise QAConvError(f"{target} already exists: choose another output folder or pass --overwrite")
    backbone, matcher = load_official_checkpoint(
        src, arch=arch, ibn=ibn, final_layer=final_layer, neck=neck, height=height, width=width
    )
    cfg = {
        **DEFAULTS,
        "dataset": None,
        "out_dir": str(out),
        "arch": arch,
        "final_layer": final_layer,
        "ibn": ibn,
        "neck": max(int(neck), 0),
        "input_norm": "none",
        "pretrained": None,
        "backbone_weights": None,
        "height": int(height),
        "width": int(width),
        "matcher": "qaconv",
        "qaconv_version": matcher.version,
    }
    state = {
        "config": cfg,
        "model": backbone.state_dict(),
        "matcher": matcher.state_dict(),
        "converted_from": os.fspath(src),
    }
    save_checkpoint(state, target)
    header = f"# converted by 'qaconv convert' from the official checkpoint {os.fspath(src)}\n"
    (out / "config.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return target
