"""Offline loading of backbone weights: torchvision's cache for ImageNet, or a local state-dict file."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from ..engine.checkpoint import safe_torch_load
from ..errors import QAConvError

# Top-level children of a torchvision / IBN-Net ResNet, in order; keys under a name that the truncated
# base does not have (fc, avgpool, layers after final_layer) are ignored on load.
RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
_WRAPPER_KEYS = ("state_dict", "model")
_SHOW = 5


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on disk (nothing is ever downloaded)."""


def imagenet_weights_file(arch: str) -> tuple[str, str]:
    """Return (cache path, download url) of torchvision's IMAGENET1K_V1 weights for ``arch``."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    url = weights.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return path, url


def load_imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """Load torchvision's cached ImageNet weights for ``arch``; raise WeightsNotFoundError if absent."""
    path, url = imagenet_weights_file(arch)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"ImageNet weights for {arch} are not cached and will not be downloaded: put "
            f"{os.path.basename(path)} (from {url}) at {path}, or pass a local file with --backbone-weights"
        )
    return read_state_dict(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True``; unwrap ``state_dict``/``model`` and ``module.``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        obj = safe_torch_load(path, "a backbone weights file")
    except QAConvError as exc:  # this module reports bad weights as ValueError
        raise ValueError(str(exc)) from None
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"backbone weights file {path} holds no state dict (got {type(obj).__name__})")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"backbone weights file {path}: entry {key!r} is not a tensor")
        while key.startswith("module."):
            key = key[len("module.") :]
        state[key] = value
    return state


def load_into_base(base: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a full-ResNet state dict into a truncated ``base``; mismatches raise a one-line ValueError."""
    own = base.state_dict()
    kept_children = {name for name, _ in base.named_children()}
    dropped = set(RESNET_CHILDREN) - kept_children
    kept = {k: v for k, v in state.items() if k.split(".")[0] not in dropped}
    missing = [k for k in own if k not in kept and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in kept if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:_SHOW])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:_SHOW])})")
        raise ValueError(f"backbone weights from {source} do not fit the model: {'; '.join(parts)}")
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in kept.items() if v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(
            f"backbone weights from {source} have {len(wrong)} shape mismatches "
            f"(file vs model, e.g. {', '.join(wrong[:_SHOW])})"
        )
    base.load_state_dict(kept, strict=True)
