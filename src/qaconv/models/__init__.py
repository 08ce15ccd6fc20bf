"""Models: feature-map backbones (ResNet / IBN-Net + neck) and matchers (QAConv, pooled cosine)."""

from __future__ import annotations

from torch import nn

from ..choices import MATCHERS
from .backbone import FeatureMapNet, build_backbone
from .pooled import PooledCosine
from .qaconv import QAConv
from .weights import WeightsNotFoundError

__all__ = [
    "MATCHERS",
    "FeatureMapNet",
    "PooledCosine",
    "QAConv",
    "WeightsNotFoundError",
    "build_backbone",
    "build_matcher",
]


def build_matcher(
    kind: str = "qaconv",
    num_features: int | None = None,
    height: int | None = None,
    width: int | None = None,
    version: str = "2.1",
) -> nn.Module:
    """Build ``"qaconv"`` (needs num_features, height, width; version "2.1" or "1") or ``"pooled"``."""
    if kind == "pooled":
        return PooledCosine()
    if kind == "qaconv":
        if num_features is None or height is None or width is None:
            raise ValueError("build_matcher('qaconv') needs the feature maps' num_features, height and width")
        return QAConv(num_features, height, width, version=version)
    raise ValueError(f"unknown matcher {kind!r}; choose one of: {', '.join(MATCHERS)}")
