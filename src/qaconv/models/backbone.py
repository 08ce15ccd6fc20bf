"""Feature-map extractor: truncated torchvision ResNet / IBN-Net, optional 3x3 neck, per-location L2 norm."""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ..choices import ARCHS, FINAL_LAYERS, INPUT_NORMS
from .ibn import IBN_TYPES, apply_ibn
from .weights import load_imagenet_state_dict, load_into_base, read_state_dict

PRETRAINED = ("imagenet",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureMapNet(nn.Module):
    """RGB images in [0, 1] ``[B, 3, H, W]`` -> unit-norm-per-location feature maps ``[B, C, h, w]``.

    ``base`` is the truncated backbone (trained at 0.1x lr), ``neck`` the 3x3 conv (v1: + BatchNorm2d; or Identity),
    ``config`` the architecture arguments of :func:`build_backbone` (``build_backbone(**config)``
    rebuilds the same architecture with fresh weights).
    """

    def __init__(self, base: nn.Module, neck: nn.Module, out_channels: int, stride: int, config: dict):
        super().__init__()
        self.base = base
        self.neck = neck
        self.out_channels = out_channels
        self.stride = stride
        self.config = dict(config)
        self.input_norm = config["input_norm"]
        if self.input_norm == "imagenet":
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_norm == "imagenet":
            x = (x - self.mean) / self.std
        x = self.neck(self.base(x))
        return F.normalize(x, dim=1)

    def reset_neck(self) -> None:
        """Fresh default initialisation of the neck (conv and BN), as the official v1.x pre-training trials do."""
        for m in self.neck.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the output map for an input of ``height`` x ``width`` pixels."""
        for _ in range(self.stride.bit_length() - 1):  # every stride-2 stage maps n -> ceil(n / 2)
            height, width = (height + 1) // 2, (width + 1) // 2
        return height, width


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}")


def build_backbone(
    arch: str = "resnet50",
    final_layer: str = "layer3",
    ibn: str | None = None,
    neck: int = 128,
    pretrained: str | None = None,
    weights_path: str | os.PathLike | None = None,
    input_norm: str = "imagenet",
    neck_bn: bool = False,
) -> FeatureMapNet:
    """Build a :class:`FeatureMapNet`.

    ``arch``: resnet18/34/50/101/152; ``final_layer``: layer2/3/4 (stride 8/16/32); ``ibn``: None, "a"
    or "b"; ``neck`` <= 0 disables the 3x3 neck conv; ``pretrained="imagenet"`` loads torchvision's cached
    IMAGENET1K_V1 weights (never downloads; plain ResNet only); ``weights_path`` loads a local state dict
    in torchvision or IBN-Net layout; ``input_norm``: "imagenet" (mean/std inside the model) or "none";
    ``neck_bn``: the v1.0-v2.0 neck (conv without bias, then BatchNorm2d) instead of v2.1's conv with bias.

    The neck keeps PyTorch's default initialisation (kaiming-uniform with a = sqrt(5), bias uniform in
    +-1/sqrt(fan_in)), as in every official version: every location is L2-normalised right after it, so
    the weight scale sets the neck's effective learning rate.
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice("final_layer", final_layer, tuple(FINAL_LAYERS))
    _check_choice("ibn", ibn, (None, *IBN_TYPES))
    _check_choice("input_norm", input_norm, INPUT_NORMS)
    _check_choice("pretrained", pretrained, (None, *PRETRAINED))
    if ibn is not None and arch == "resnet152":
        raise ValueError("IBN-Net has no resnet152 variant; use resnet18/34/50/101 with ibn")
    if pretrained is not None and weights_path is not None:
        raise ValueError("give either pretrained or weights_path, not both")
    if pretrained is not None and ibn is not None:
        raise ValueError(
            f"pretrained={pretrained!r} is only for plain ResNets; load IBN-Net weights with weights_path "
            f"(e.g. the official {arch}_ibn_{ibn} .pth file)"
        )
    neck = int(neck)

    resnet = getattr(torchvision.models, arch)(weights=None)
    if ibn is not None:
        apply_ibn(resnet, ibn)
    children = OrderedDict()
    for name, child in resnet.named_children():
        children[name] = child
        if name == final_layer:
            break
    base = nn.Sequential(children)
    last_block = children[final_layer][-1]
    channels = last_block.conv1.out_channels * last_block.expansion

    if pretrained == "imagenet":
        load_into_base(base, load_imagenet_state_dict(arch), f"torchvision {arch} IMAGENET1K_V1")
    elif weights_path is not None:
        load_into_base(base, read_state_dict(weights_path), os.fspath(weights_path))

    neck_bn = bool(neck_bn) and neck > 0
    if neck > 0:
        conv = nn.Conv2d(channels, neck, kernel_size=3, padding=1, bias=not neck_bn)  # default init, as official
        neck_module = nn.Sequential(conv, nn.BatchNorm2d(neck)) if neck_bn else conv
        channels = neck
    else:
        neck_module = nn.Identity()
    config = dict(arch=arch, final_layer=final_layer, ibn=ibn, neck=max(neck, 0), input_norm=input_norm)
    if neck_bn:  # only recorded when set, so configs of older checkpoints rebuild unchanged
        config["neck_bn"] = True
    return FeatureMapNet(base, neck_module, channels, FINAL_LAYERS[final_layer], config)
