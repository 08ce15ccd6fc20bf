import math

import pytest
import torch
from torch import nn

from qaconv.losses import ClassMemoryLoss, PairwiseMatchingLoss, TripletLoss, finite_mean


def official_hardest(row, targets, i):
    """The official masking, one anchor at a time: +1e15 on non-positives and on self before the min,
    -1e15 on positives (self included) before the max, every score first multiplied by its 0/1 label."""
    lab = [float(t == targets[i]) for t in targets]
    to_min = [s * y + (1 - y + (j == i)) * 1e15 for j, (s, y) in enumerate(zip(row, lab, strict=True))]
    to_max = [s * (1 - y) - y * 1e15 for s, y in zip(row, lab, strict=True)]
    nan_in = any(math.isnan(v) for v in to_min + to_max)  # torch.min / max propagate NaN
    return (math.nan, math.nan) if nan_in else (min(to_min), max(to_max))


def triplet_reference(scores, targets, margin):
    """Per anchor: MarginRankingLoss(min_pos, max_neg, y=1) and acc = min_pos >= max_neg (official)."""
    losses, accs = [], []
    targets = targets.tolist()
    for i, row in enumerate(scores.tolist()):
        min_pos, max_neg = official_hardest(row, targets, i)
        losses.append(math.nan if math.isnan(min_pos) else max(0.0, -(min_pos - max_neg) + margin))
        accs.append(float(min_pos >= max_neg))
    return losses, accs


@pytest.mark.parametrize("seed", range(6))
def test_triplet_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = 12
    scores = torch.randn(B, B, generator=g, dtype=torch.float64) * 10
    targets = torch.randint(0, 6, (B,), generator=g)  # some identities appear once
    loss, acc = TripletLoss(margin=16.0)(scores, targets)
    ref_loss, ref_acc = triplet_reference(scores, targets, 16.0)
    assert loss.tolist() == pytest.approx(ref_loss)
    assert acc.tolist() == ref_acc


def test_triplet_hand_computed():
    # ids [0, 0, 1, 1]
    scores = torch.tensor(
        [
            [9.0, 5.0, 3.0, 1.0],  # minpos 5, maxneg 3 -> 4 - 2 = 2, acc 1
            [5.0, 9.0, 6.0, 0.0],  # minpos 5, maxneg 6 -> 4 - (-1) = 5, acc 0
            [3.0, 6.0, 9.0, 8.0],  # minpos 8, maxneg 6 -> 4 - 2 = 2, acc 1
            [1.0, 0.0, 8.0, 9.0],  # minpos 8, maxneg 1 -> 4 - 7 < 0 -> 0, acc 1
        ],
        requires_grad=True,
    )
    loss, acc = TripletLoss(margin=4.0)(scores, torch.tensor([0, 0, 1, 1]))
    assert loss.tolist() == [2.0, 5.0, 2.0, 0.0]
    assert acc.tolist() == [1.0, 0.0, 1.0, 1.0]
    loss.sum().backward()
    expected = torch.zeros(4, 4)
    expected[0, 1], expected[0, 2] = -1, 1
    expected[1, 0], expected[1, 2] = -1, 1
    expected[2, 3], expected[2, 1] = -1, 1
    assert torch.equal(scores.grad, expected)


@pytest.mark.parametrize(
    "targets",
    [
        [0, 0, 1, 2, 2],  # anchor 2 has no positive
        [3, 3, 3, 3],  # one identity: no anchor has a negative
        [0, 1, 2],  # all distinct: no anchor has a positive
        [7],  # a single image: neither
    ],
)
def test_triplet_anchors_without_positive_or_negative_count_as_zero_loss(targets):
    B = len(targets)
    scores = (torch.randn(B, B, generator=torch.Generator().manual_seed(B)) * 20).requires_grad_()
    targets = torch.tensor(targets)
    loss, acc = TripletLoss()(scores, targets)
    ref_loss, ref_acc = triplet_reference(scores.detach(), targets, 16.0)
    assert loss.tolist() == pytest.approx(ref_loss) and acc.tolist() == ref_acc
    same = targets[:, None] == targets[None, :]
    undefined = ~((same.sum(1) > 1) & (~same).any(1))
    assert undefined.any()
    assert loss[undefined].tolist() == [0.0] * int(undefined.sum()) and acc[undefined].min() == 1.0
    mean, mean_acc, n = finite_mean(loss, acc)
    assert n == B  # counted in the mean, as the official trainer does
    assert mean.item() == pytest.approx(loss.mean().item())
    assert mean_acc.item() == pytest.approx(acc.mean().item())
    mean.backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.all(scores.grad[undefined] == 0)


def test_triplet_non_finite_scores_give_nan_rows():
    scores = torch.arange(16, dtype=torch.float64).view(4, 4) % 5  # rows 1, 2 would have acc 1 if finite
    scores[1, 1] = math.nan  # even on the diagonal, the official masking spreads it to the row
    scores[2, 3] = math.inf  # a positive: min_pos would be inf and the hinge 0
    targets = torch.tensor([0, 0, 1, 1])
    loss, acc = TripletLoss()(scores, targets)
    assert torch.isnan(loss[[1, 2]]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert acc[[1, 2]].tolist() == [0.0, 0.0]
    ref_loss, ref_acc = triplet_reference(scores, targets, 16.0)
    assert all(math.isnan(v) for v in ref_loss[1:3]) and ref_acc[1:3] == [0.0, 0.0]
    assert loss[[0, 3]].tolist() == pytest.approx([ref_loss[0], ref_loss[3]])
    mean, _, n = finite_mean(loss, acc)
    assert n == 2 and mean.item() == pytest.approx(loss[[0, 3]].mean().item())


def test_finite_mean_none_when_nothing_finite():
    loss = torch.tensor([math.nan, math.inf, -math.inf])
    assert finite_mean(loss, torch.ones(3)) == (None, None, 0)
    mean, acc, n = finite_mean(torch.tensor([1.0, math.nan, 3.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert (mean.item(), acc.item(), n) == (2.0, 0.5, 2)


def test_triplet_shape_errors():
    with pytest.raises(ValueError, match="square"):
        TripletLoss()(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="targets"):
        TripletLoss()(torch.zeros(3, 3), torch.zeros(4))


@pytest.mark.parametrize("seed", range(4))
def test_pairwise_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = 8
    scores = torch.randn(B, B, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 5, (B,), generator=g)
    if seed == 3:
        targets = torch.zeros(B, dtype=torch.long)  # no negatives anywhere
    loss, acc = PairwiseMatchingLoss()(scores, targets)
    for i in range(B):
        total = 0.0
        for j in range(B):
            s, y = scores[i, j].item(), float(targets[i] == targets[j])
            p = 1 / (1 + math.exp(-s))
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
        assert loss[i].item() == pytest.approx(total)
        min_pos, max_neg = official_hardest(scores[i].tolist(), targets.tolist(), i)
        assert acc[i].item() == float(min_pos > max_neg)


def test_pairwise_acc_without_positive_or_negative_and_non_finite():
    scores = torch.randn(4, 4)
    loss, acc = PairwiseMatchingLoss()(scores, torch.tensor([0, 1, 1, 2]))  # anchors 0 and 3: no positive
    assert acc[[0, 3]].tolist() == [1.0, 1.0]
    assert PairwiseMatchingLoss()(torch.randn(3, 3), torch.tensor([5, 5, 5]))[1].tolist() == [1.0] * 3
    assert PairwiseMatchingLoss()(torch.randn(1, 1), torch.tensor([5]))[1].tolist() == [1.0]
    scores[0, 0] = math.nan
    loss, acc = PairwiseMatchingLoss()(scores, torch.tensor([0, 1, 1, 2]))
    assert acc[0].item() == 0.0 and torch.isnan(loss[0])


class DotMatcher(nn.Module):
    """Score = sum of elementwise products of the two maps."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, prob, gal):
        self.calls.append(len(gal))
        return torch.einsum("pchw,gchw->pg", prob, gal)


def focal_reference(scores, targets, valid):
    out = []
    for i in range(len(scores)):
        total = 0.0
        for c in range(len(scores[i])):
            s = scores[i][c]
            p = 1 / (1 + math.exp(-s))
            if c == targets[i]:
                total += -math.log(p) * (1 - p) ** 2 * valid[c]
            else:
                total += -math.log(1 - p) * p**2 * valid[c]
        out.append(total)
    return out


def test_class_memory_hand_computed_and_update():
    matcher = DotMatcher()
    crit = ClassMemoryLoss(matcher, num_classes=5, num_features=2, height=1, width=1, mem_batch_size=2)
    assert crit.class_memory.shape == (5, 2, 1, 1) and crit.valid_class.tolist() == [0] * 5
    assert {"class_memory", "valid_class"} <= set(crit.state_dict())

    # first batch: memory all zero and no class valid -> zero loss, memory written afterwards
    f1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]]).view(3, 2, 1, 1)
    loss, acc = crit(f1, torch.tensor([1, 3, 1]))
    assert loss.tolist() == [0.0, 0.0, 0.0]
    assert matcher.calls == [2, 2, 1]  # 5 classes in chunks of 2
    assert crit.valid_class.tolist() == [0, 1, 0, 1, 0]
    assert crit.class_memory[1].flatten().tolist() == [3.0, 1.0]  # last sample of class 1 wins
    assert crit.class_memory[3].flatten().tolist() == [0.0, 2.0]
    assert crit.class_memory[[0, 2, 4]].abs().sum() == 0

    # second batch: scores against memory rows [0,0],[3,1],[0,0],[0,2],[0,0]
    f2 = torch.tensor([[1.0, 1.0], [0.5, -1.0]], requires_grad=True)
    targets = torch.tensor([3, 1])
    loss, acc = crit(f2.view(2, 2, 1, 1), targets)
    scores = [[0.0, 4.0, 0.0, 2.0, 0.0], [0.0, 0.5, 0.0, -2.0, 0.0]]
    valid = [0, 1, 0, 1, 0]
    assert loss.tolist() == pytest.approx(focal_reference(scores, [3, 1], valid))
    assert acc.tolist() == [0.0, 1.0]  # argmax: class 1 for both
    loss.sum().backward()
    assert f2.grad is not None and torch.isfinite(f2.grad).all()  # in-place update did not break backward
    assert crit.valid_class.tolist() == [0, 1, 0, 1, 0]
    assert crit.class_memory[3].flatten().tolist() == [1.0, 1.0]
    assert crit.class_memory[1].flatten().tolist() == [0.5, -1.0]


def test_class_memory_random_vs_reference_and_eval_mode_keeps_memory():
    torch.manual_seed(0)
    crit = ClassMemoryLoss(DotMatcher(), num_classes=7, num_features=3, height=2, width=2, mem_batch_size=3)
    crit.class_memory.copy_(torch.randn(7, 3, 2, 2))
    crit.valid_class.copy_(torch.tensor([1, 0, 1, 1, 0, 1, 1.0]))
    feats = torch.randn(4, 3, 2, 2) * 0.5
    targets = torch.tensor([0, 4, 6, 2])
    memory_before = crit.class_memory.clone()
    crit.eval()
    loss, acc = crit(feats, targets)
    scores = torch.einsum("pchw,gchw->pg", feats, memory_before)
    ref = focal_reference(scores.tolist(), targets.tolist(), crit.valid_class.tolist())
    assert loss.tolist() == pytest.approx(ref, rel=1e-5)
    assert acc.tolist() == (scores.argmax(1) == targets).float().tolist()
    assert torch.equal(crit.class_memory, memory_before)
    assert crit.valid_class.tolist() == [1, 0, 1, 1, 0, 1, 1]


def test_class_memory_bad_input():
    crit = ClassMemoryLoss(DotMatcher(), num_classes=3, num_features=2, height=1, width=1)
    with pytest.raises(ValueError, match=r"\[B, 2, 1, 1\]"):
        crit(torch.zeros(2, 3, 1, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        crit(torch.zeros(2, 2, 1, 1), torch.tensor([0, 3]))


def test_class_memory_v1_0_joint_bn_equals_one_call_over_all_classes():
    """v1.0: the head's training-mode BNs see every class at once; chunking must not change the scores."""
    from qaconv.models import QAConv

    torch.manual_seed(0)
    matcher = QAConv(4, 2, 2, version="1").train()
    memory = torch.nn.functional.normalize(torch.randn(7, 4, 2, 2), dim=1)
    feats = torch.nn.functional.normalize(torch.randn(5, 4, 2, 2), dim=1)
    targets = torch.tensor([0, 3, 6, 2, 3])

    def loss_of(**kw):
        crit = ClassMemoryLoss(matcher, num_classes=7, num_features=4, height=2, width=2, mem_batch_size=3, **kw)
        crit.class_memory.copy_(memory)
        crit.valid_class.fill_(1.0)
        return crit(feats, targets)[0]

    scores = matcher(feats, memory)  # the reference: one call over all 7 classes
    one_hot = torch.nn.functional.one_hot(targets, 7).float()
    p = torch.sigmoid(scores)
    ref = (torch.nn.functional.binary_cross_entropy_with_logits(scores, one_hot, reduction="none")
           * torch.where(one_hot.bool(), 1 - p, p) ** 2).sum(1)  # fmt: skip
    torch.testing.assert_close(loss_of(joint_bn=True), ref)
    assert not torch.allclose(loss_of(joint_bn=False), ref)  # per-chunk BN statistics differ


def test_class_memory_v1_0_counts_classes_never_written():
    matcher = DotMatcher()
    crit = ClassMemoryLoss(matcher, num_classes=3, num_features=2, height=1, width=1, mask_invalid=False)
    crit.class_memory[0] = torch.tensor([1.0, 0.0]).view(2, 1, 1)
    crit.valid_class[0] = 1.0
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)
    loss, _ = crit.eval()(feats, torch.tensor([0, 1]))
    scores = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # dot products with memories [e0, 0, 0]
    one_hot = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    p = torch.sigmoid(scores)
    bce = -(one_hot * torch.log(p) + (1 - one_hot) * torch.log(1 - p))
    ref = (bce * torch.where(one_hot.bool(), 1 - p, p) ** 2).sum(1)  # all three classes, none masked
    torch.testing.assert_close(loss, ref)
    masked = ClassMemoryLoss(matcher, num_classes=3, num_features=2, height=1, width=1)
    masked.load_state_dict(crit.state_dict())
    torch.testing.assert_close(masked.eval()(feats, torch.tensor([0, 1]))[0], (bce * torch.where(
        one_hot.bool(), 1 - p, p) ** 2)[:, :1].sum(1))  # fmt: skip
