"""Global-average-pooling baseline matcher: cosine similarity of pooled, L2-normalised maps."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PooledCosine(nn.Module):
    """``forward(prob [P,C,H,W], gal [G,C,H,W]) -> logits [P, G]``: GAP, L2 norm, cosine, ``logit_bn``.

    ``logit_bn`` (BatchNorm1d(1) over the P*G pair scores) gives logits a scale comparable to QAConv's,
    so the same margin-16 triplet loss applies.
    """

    def __init__(self):
        super().__init__()
        self.logit_bn = nn.BatchNorm1d(1)

    @staticmethod
    def embed(maps: Tensor) -> Tensor:
        """Global-average-pool ``[N, C, H, W]`` maps and L2-normalise: ``[N, C]``."""
        if maps.dim() != 4:
            raise ValueError(f"PooledCosine expects [N, C, H, W] maps, got {list(maps.shape)}")
        return F.normalize(maps.mean(dim=(2, 3)), dim=1)

    def head(self, cosine: Tensor) -> Tensor:
        """Apply ``logit_bn`` to a ``[P, G]`` cosine matrix."""
        return self.logit_bn(cosine.reshape(-1, 1)).reshape(cosine.shape)

    def forward(self, prob: Tensor, gal: Tensor) -> Tensor:
        if prob.dim() != 4 or gal.dim() != 4 or prob.shape[1] != gal.shape[1]:
            raise ValueError(f"probe and gallery channels differ: {list(prob.shape)} vs {list(gal.shape)}")
        return self.head(self.embed(prob) @ self.embed(gal).t())
