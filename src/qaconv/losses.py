"""Training losses on QAConv match logits (spec §4).

Every loss returns per-sample ``(loss [B], acc [B])``; ``finite_mean`` reduces them the way the
official trainer does (finite losses only, skip the step when none is finite).

* ``TripletLoss``: batch-hard triplet on a [B, B] logit matrix (QAConv-GS, v2.1 default).
* ``PairwiseMatchingLoss``: in-batch binary cross-entropy over all pairs (v2.0).
* ``ClassMemoryLoss``: focal BCE against a memory of one feature map per class (v1, ECCV).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_square(scores: Tensor, targets: Tensor) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square [B, B] matrix, got shape {tuple(scores.shape)}")
    if targets.shape != (scores.shape[0],):
        raise ValueError(f"targets must have shape ({scores.shape[0]},), got {tuple(targets.shape)}")


def _hardest(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Min positive score (j != i), max negative score, and whether each exists, per anchor."""
    same = targets[:, None] == targets[None, :]
    eye = torch.eye(len(targets), dtype=torch.bool, device=scores.device)
    pos = same & ~eye
    neg = ~same
    min_pos = scores.masked_fill(~pos, float("inf")).min(dim=1).values
    max_neg = scores.masked_fill(~neg, float("-inf")).max(dim=1).values
    return min_pos, max_neg, pos.any(dim=1), neg.any(dim=1)


class TripletLoss(nn.Module):
    """Batch-hard triplet loss on similarity logits: ``relu(margin - (min_pos - max_neg))``.

    ``forward(scores [B, B], targets [B]) -> (loss [B], acc [B])``. Higher scores mean more similar.
    ``acc`` is 1.0 where the hardest positive scores at least as high as the hardest negative.
    As in the official loss (whose ±1e15 masking makes the missing side ~±1e15), an anchor without
    another image of its identity, or without any other identity in the batch, gets loss 0 and acc 1
    and so counts in the mean. A row holding any non-finite score gets a NaN loss and acc 0 (the
    official masking multiplies every score by 0 or 1, so NaN or inf anywhere spreads to the row);
    ``finite_mean`` drops those.
    """

    def __init__(self, margin: float = 16.0):
        super().__init__()
        self.margin = float(margin)

    def forward(self, scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        _check_square(scores, targets)
        min_pos, max_neg, has_pos, has_neg = _hardest(scores, targets)
        defined = has_pos & has_neg
        gap = torch.where(defined, min_pos - max_neg, torch.zeros_like(min_pos))
        loss = torch.where(defined, F.relu(self.margin - gap), torch.zeros_like(gap))
        finite = torch.isfinite(scores).all(dim=1)
        loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
        with torch.no_grad():
            acc = ((min_pos >= max_neg) | ~defined) & finite
        return loss, acc.to(scores.dtype)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class PairwiseMatchingLoss(nn.Module):
    """Binary cross-entropy with logits over all [B, B] pairs (label = same identity, diagonal included).

    ``forward(scores [B, B], targets [B]) -> (loss [B], acc [B])``: the loss is summed over each row;
    ``acc`` is 1.0 where the lowest positive score (self excluded) exceeds the highest negative one. As in
    the official v2.0 loss, an anchor without a positive or without a negative has acc 1.0, and one
    whose row holds a non-finite score has acc 0.0 (its loss is not finite either).
    """

    def forward(self, scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        _check_square(scores, targets)
        labels = (targets[:, None] == targets[None, :]).to(scores.dtype)
        loss = F.binary_cross_entropy_with_logits(scores, labels, reduction="none").sum(dim=1)
        with torch.no_grad():
            min_pos, max_neg, _, _ = _hardest(scores, targets)  # ±inf where missing: acc 1
            acc = (min_pos > max_neg) & torch.isfinite(scores).all(dim=1)
        return loss, acc.to(scores.dtype)


class ClassMemoryLoss(nn.Module):
    """Focal BCE of each sample against a memory holding the latest feature map of every class.

    Buffers: ``class_memory`` [N, C, H, W] and ``valid_class`` [N] (1 once a class has been written),
    both zero at start and saved in the state dict. ``matcher`` is any module with
    ``forward(prob [P, C, H, W], gal [G, C, H, W]) -> [P, G]`` logits; it is registered as a submodule.

    ``forward(features [B, C, H, W], targets [B]) -> (loss [B], acc [B])``: the batch is the probe side,
    the memory (a detached copy) the gallery side, matched ``mem_batch_size`` classes at a time. Per
    class, BCE-with-logits on the one-hot target times the focal weight (1 - σ(s))² for the true class
    and σ(s)² for the others, masked by ``valid_class`` and summed. ``acc`` = 1.0 where the arg-max
    class is the target. In training mode the memory is then overwritten with the batch features
    (the last sample of a class in the batch wins) and those classes are marked valid; in eval mode the
    memory is left untouched.

    ``mask_invalid=False`` (v1.0) sums over every class, also those whose memory was never written;
    ``joint_bn=True`` (v1.0) pools every memory chunk first and runs the matcher's head (its BNs in
    training mode) once over all classes, instead of once per chunk (v1.2+); it needs a matcher with
    ``pool`` and ``head`` (:class:`qaconv.models.QAConv`).
    """

    def __init__(
        self,
        matcher: nn.Module,
        num_classes: int,
        num_features: int,
        height: int,
        width: int,
        mem_batch_size: int = 16,
        mask_invalid: bool = True,
        joint_bn: bool = False,
    ):
        super().__init__()
        if joint_bn and not (hasattr(matcher, "pool") and hasattr(matcher, "head")):
            raise ValueError("joint_bn needs a QAConv matcher (with pool and head)")
        self.mask_invalid, self.joint_bn = bool(mask_invalid), bool(joint_bn)
        if num_classes < 1 or mem_batch_size < 1:
            raise ValueError(
                f"num_classes and mem_batch_size must be >= 1, got {num_classes} and {mem_batch_size}"
            )
        self.matcher = matcher
        self.num_classes = int(num_classes)
        self.mem_batch_size = int(mem_batch_size)
        self.register_buffer("class_memory", torch.zeros(num_classes, num_features, height, width))
        self.register_buffer("valid_class", torch.zeros(num_classes))

    def forward(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if features.dim() != 4 or features.shape[1:] != self.class_memory.shape[1:]:
            raise ValueError(
                f"features must have shape [B, {', '.join(map(str, self.class_memory.shape[1:]))}], "
                f"got {tuple(features.shape)}"
            )
        if targets.shape != (features.shape[0],):
            raise ValueError(f"targets must have shape ({features.shape[0]},), got {tuple(targets.shape)}")
        targets = targets.long()
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            raise ValueError(
                f"targets must be class indices in [0, {self.num_classes}), "
                f"got range [{int(targets.min())}, {int(targets.max())}]"
            )

        chunks = []
        for start in range(0, self.num_classes, self.mem_batch_size):
            # a copy, so the in-place memory update below cannot touch tensors saved for backward
            memory = self.class_memory[start : start + self.mem_batch_size].detach().clone()
            chunks.append(self.matcher.pool(features, memory) if self.joint_bn else self.matcher(features, memory))
        scores = self.matcher.head(torch.cat(chunks, dim=1)) if self.joint_bn else torch.cat(chunks, dim=1)

        one_hot = F.one_hot(targets, self.num_classes).to(scores.dtype)
        bce = F.binary_cross_entropy_with_logits(scores, one_hot, reduction="none")
        prob = torch.sigmoid(scores)
        weight = torch.where(one_hot.bool(), 1.0 - prob, prob).pow(2)
        loss = bce * weight
        if self.mask_invalid:
            loss = loss * self.valid_class.to(scores.dtype, copy=True)  # a copy: saved for backward, updated below
        loss = loss.sum(dim=1)
        with torch.no_grad():
            acc = (scores.argmax(dim=1) == targets).to(scores.dtype)
        if self.training:
            self._write(features.detach(), targets)
        return loss, acc

    @torch.no_grad()
    def _write(self, features: Tensor, targets: Tensor) -> None:
        """Store the last sample of each class present in the batch and mark the class valid."""
        order = torch.arange(len(targets), device=targets.device)
        last = torch.full((self.num_classes,), -1, dtype=torch.long, device=targets.device)
        last.scatter_reduce_(0, targets, order, reduce="amax")
        rows = last[last >= 0]
        classes = targets[rows]
        self.class_memory[classes] = features[rows].to(self.class_memory.dtype)
        self.valid_class[classes] = 1.0

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, mem_batch_size={self.mem_batch_size}, "
            f"mask_invalid={self.mask_invalid}, joint_bn={self.joint_bn}"
        )


def finite_mean(loss: Tensor, acc: Tensor) -> tuple[Tensor | None, Tensor | None, int]:
    """Mean loss and accuracy over samples whose loss is finite, and how many there are.

    Returns ``(None, None, 0)`` when no loss is finite (the caller skips the optimiser step). The mean
    loss keeps its graph; the mean accuracy is detached.
    """
    keep = torch.isfinite(loss)
    num = int(keep.sum())
    if num == 0:
        return None, None, 0
    return loss[keep].mean(), acc.detach()[keep].float().mean(), num
