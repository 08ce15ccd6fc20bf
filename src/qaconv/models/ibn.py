"""IBN-Net-a / IBN-Net-b on torchvision's ResNet, with the official (XingangPan/IBN-Net) parameter names.

IBN-a: in every block of layer1-layer3, ``bn1`` becomes :class:`IBN` (InstanceNorm on the first half of
the channels, BatchNorm on the rest). IBN-b: the stem ``bn1`` is an affine InstanceNorm2d(64), and the last
block of layer1 and of layer2 applies an affine InstanceNorm ``IN`` after the residual addition, before the
final ReLU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ..choices import IBN_TYPES


class IBN(nn.Module):
    """Instance-Batch Normalization: IN on the first ``int(planes * ratio)`` channels, BN on the rest."""

    def __init__(self, planes: int, ratio: float = 0.5):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: Tensor) -> Tensor:
        first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(first.contiguous()), self.BN(rest.contiguous())), dim=1)


class BasicBlockIN(BasicBlock):
    """torchvision BasicBlock with InstanceNorm ``IN`` after the residual addition (IBN-Net-b)."""

    def __init__(self, inplanes: int, planes: int):
        super().__init__(inplanes, planes)
        self.IN = nn.InstanceNorm2d(planes * self.expansion, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.IN(out + identity))


class BottleneckIN(Bottleneck):
    """torchvision Bottleneck with InstanceNorm ``IN`` after the residual addition (IBN-Net-b)."""

    def __init__(self, inplanes: int, planes: int):
        super().__init__(inplanes, planes)
        self.IN = nn.InstanceNorm2d(planes * self.expansion, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.IN(out + identity))


def _with_instance_norm(block: nn.Module) -> nn.Module:
    """Return an IN-after-addition copy of a stride-1, no-downsample block, keeping its weights."""
    if block.downsample is not None or any(c.stride != (1, 1) for c in (block.conv1, block.conv2)):
        raise ValueError("IBN-b instance norm is only placed in the last (stride-1) block of a layer")
    cls = BottleneckIN if isinstance(block, Bottleneck) else BasicBlockIN
    new = cls(block.conv1.in_channels, block.conv1.out_channels)
    missing, unexpected = new.load_state_dict(block.state_dict(), strict=False)
    if unexpected or any(not k.startswith("IN.") for k in missing):
        raise RuntimeError(f"block conversion lost parameters: {missing + unexpected}")
    return new


def apply_ibn(net: ResNet, ibn: str) -> ResNet:
    """Turn a torchvision ResNet into IBN-Net-``ibn`` in place (fresh IN/IBN layers) and return it."""
    if ibn == "a":
        for layer in (net.layer1, net.layer2, net.layer3):
            for block in layer:
                block.bn1 = IBN(block.bn1.num_features)
    elif ibn == "b":
        net.bn1 = nn.InstanceNorm2d(net.bn1.num_features, affine=True)
        for layer in (net.layer1, net.layer2):
            layer[-1] = _with_instance_norm(layer[-1])
    else:
        raise ValueError(f"unknown IBN type {ibn!r}; choose one of {IBN_TYPES} or None")
    return net
