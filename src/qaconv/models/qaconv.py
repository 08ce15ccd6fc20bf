"""QAConv: query-adaptive convolution matching of two sets of feature maps (reference formulation).

Every probe location is a 1x1 kernel over the gallery map (cosine similarity of unit-norm vectors); the
similarities are max-pooled in both directions and a small learned head turns them into a logit.

Pooled layout used by :meth:`QAConv.pool` / :meth:`QAConv.head`: ``[P, G, 2, HW]`` where index 0 holds,
for each probe location, its best similarity over the gallery locations, and index 1 holds, for each
gallery location, its best similarity over the probe locations.

Versions:

* ``"2.1"`` (QAConv-GS, CVPR 2022, default): ``fc`` = Linear(HW -> 1), weight 1/HW, shared by the two
  directions, whose outputs are summed. Symmetric: score(p, g) == score(g, p).
* ``"1"`` (ECCV 2020 .. v2.0): ``fc`` = Linear(2*HW -> 1), default init, over the concatenation
  [gallery-indexed half (index 1: max over probe locations), probe-indexed half (index 0: max over
  gallery locations)], the order of the official v1 code (spec section 3.2). Not symmetric in general.

In both, ``bn`` = BatchNorm1d(1) over all pooled similarity values of the call and ``logit_bn`` =
BatchNorm1d(1) over the P*G pair scores (training-mode statistics are taken over the whole call).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..choices import VERSIONS

SEMANTICS = ("default", "official")  # of QAConv.correspondences


class QAConv(nn.Module):
    """QAConv matcher: ``forward(prob [P,C,H,W], gal [G,C,H,W]) -> logits [P, G]``."""

    def __init__(self, num_features: int, height: int, width: int, version: str = "2.1"):
        super().__init__()
        version = str(version)
        if version not in VERSIONS:
            raise ValueError(f"unknown QAConv version {version!r}; choose one of: {', '.join(VERSIONS)}")
        self.num_features = int(num_features)
        self.height = int(height)
        self.width = int(width)
        self.hw = self.height * self.width
        self.version = version
        self.bn = nn.BatchNorm1d(1)
        self.fc = nn.Linear(self.hw if version == "2.1" else 2 * self.hw, 1)
        self.logit_bn = nn.BatchNorm1d(1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.bn.reset_parameters()
        self.logit_bn.reset_parameters()
        self.fc.reset_parameters()
        if self.version == "2.1":
            nn.init.constant_(self.fc.weight, 1.0 / self.hw)

    def extra_repr(self) -> str:
        dims = f"num_features={self.num_features}, height={self.height}, width={self.width}"
        return f"{dims}, version={self.version!r}"

    def _flatten(self, maps: Tensor, name: str) -> Tensor:
        expected = (self.num_features, self.height, self.width)
        if maps.dim() != 4 or tuple(maps.shape[1:]) != expected:
            want = ", ".join(map(str, expected))
            raise ValueError(f"QAConv {name} maps must be [N, {want}], got {list(maps.shape)}")
        return maps.reshape(maps.shape[0], self.num_features, self.hw)

    def pool(self, prob: Tensor, gal: Tensor) -> Tensor:
        """Max-pooled local similarities ``[P, G, 2, HW]`` (see the module docstring for the layout)."""
        p = self._flatten(prob, "probe")
        g = self._flatten(gal, "gallery")
        sim = torch.einsum("pcs,gcr->pgsr", p, g)  # [P, G, HW probe, HW gallery]
        return torch.stack((sim.amax(dim=3), sim.amax(dim=2)), dim=2)

    def head(self, pooled: Tensor) -> Tensor:
        """Pooled similarities ``[P, G, 2, HW]`` -> logits ``[P, G]`` (bn, fc, sum/concat, logit_bn)."""
        num_p, num_g = pooled.shape[:2]
        x = self.bn(pooled.reshape(-1, 1, self.hw))
        if self.version == "2.1":
            x = self.fc(x.reshape(-1, self.hw)).reshape(num_p * num_g, 2).sum(dim=1, keepdim=True)
        else:
            x = x.reshape(num_p, num_g, 2, self.hw).flip(2).reshape(num_p * num_g, 2 * self.hw)
            x = self.fc(x)
        return self.logit_bn(x).reshape(num_p, num_g)

    def forward(self, prob: Tensor, gal: Tensor) -> Tensor:
        return self.head(self.pool(prob, gal))

    @torch.no_grad()
    def correspondences(self, prob_map: Tensor, gal_map: Tensor, semantics: str = "default") -> dict[str, np.ndarray]:
        """Best local matches between one probe map and one gallery map ``[C, H, W]``.

        Locations are flat row-major indices ``y * width + x``. Returns ``probe_to_gallery`` /
        ``probe_to_gallery_sim`` (best gallery location for each probe location and its cosine),
        ``gallery_to_probe`` / ``gallery_to_probe_sim`` (the reverse), ``probe_weight`` /
        ``gallery_weight`` (the fc weight applied to each location), ``probe_contribution`` /
        ``gallery_contribution`` (what each location adds to the score, see below), ``similarity``
        ``[HW probe, HW gallery]`` and ``semantics`` (a 0-d string array).

        ``semantics="default"``: the probe is the kernel side (the first argument of :meth:`forward`, as
        in the official training and evaluation code); contribution = cosine x fc weight (no BN).
        ``semantics="official"``: as the official ``matching/qaconv_match.py``, the gallery is the kernel
        side, so in version "1" the first fc half (the gallery half of ``forward(prob, gal)``) weighs the
        probe locations and the second half the gallery locations; contribution = fc weight x
        ``bn(cosine)`` with ``bn``'s running statistics (no fc bias). In version "2.1" both sides use the
        shared weight (the official script assumes the 2*HW fc and does not run on it).
        """
        if semantics not in SEMANTICS:
            raise ValueError(f"unknown correspondence semantics {semantics!r}; choose one of: {', '.join(SEMANTICS)}")
        dtype = torch.promote_types(prob_map.dtype, torch.float32)  # fp16 maps are compared in fp32
        p = self._flatten(prob_map.unsqueeze(0), "probe")[0].to(dtype)
        g = self._flatten(gal_map.unsqueeze(0), "gallery")[0].to(dtype)
        sim = p.t() @ g
        p2g_sim, p2g = sim.max(dim=1)
        g2p_sim, g2p = sim.max(dim=0)
        w = self.fc.weight.detach().reshape(-1).to(dtype)
        if self.version == "2.1":
            probe_w, gallery_w = w, w
        elif semantics == "default":
            probe_w, gallery_w = w[self.hw :], w[: self.hw]
        else:
            probe_w, gallery_w = w[: self.hw], w[self.hw :]
        if semantics == "default":
            probe_c, gallery_c = p2g_sim * probe_w, g2p_sim * gallery_w
        else:
            probe_c, gallery_c = self._bn_eval(p2g_sim) * probe_w, self._bn_eval(g2p_sim) * gallery_w
        out = dict(
            probe_to_gallery=p2g,
            probe_to_gallery_sim=p2g_sim,
            gallery_to_probe=g2p,
            gallery_to_probe_sim=g2p_sim,
            probe_weight=probe_w,
            gallery_weight=gallery_w,
            probe_contribution=probe_c,
            gallery_contribution=gallery_c,
            similarity=sim,
        )
        out = {k: v.cpu().numpy().copy() for k, v in out.items()}
        out["semantics"] = np.array(semantics)
        return out

    def _bn_eval(self, x: Tensor) -> Tensor:
        """``bn`` applied elementwise with its running statistics (eval mode, whatever the module's mode)."""
        bn = self.bn
        y = F.batch_norm(x.reshape(-1, 1), bn.running_mean.to(x.dtype), bn.running_var.to(x.dtype),
                         bn.weight.detach().to(x.dtype), bn.bias.detach().to(x.dtype), False, 0.0, bn.eps)
        return y.reshape(x.shape)
