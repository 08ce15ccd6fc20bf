import math

import pytest
import torch
from torch import nn

from qaconv.losses import ClassMemoryLoss, PairwiseMatchingLoss, TripletLoss, finite_mean


def triplet_reference(scores, targets, margin):
    losses, accs = [], []
    B = len(targets)
    for i in range(B):
        pos = [scores[i, j].item() for j in range(B) if j != i and targets[j] == targets[i]]
        neg = [scores[i, j].item() for j in range(B) if targets[j] != targets[i]]
        if not pos or not neg:
            losses.append(math.nan)
            accs.append(None)
            continue
        losses.append(max(0.0, margin - (min(pos) - max(neg))))
        accs.append(float(min(pos) >= max(neg)))
    return losses, accs


@pytest.mark.parametrize("seed", range(5))
def test_triplet_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = 12
    scores = torch.randn(B, B, generator=g, dtype=torch.float64) * 10
    targets = torch.randint(0, 4, (B,), generator=g)
    loss, acc = TripletLoss(margin=16.0)(scores, targets)
    ref_loss, ref_acc = triplet_reference(scores, targets, 16.0)
    for i in range(B):
        if math.isnan(ref_loss[i]):
            assert not torch.isfinite(loss[i])
        else:
            assert loss[i].item() == pytest.approx(ref_loss[i])
            assert acc[i].item() == ref_acc[i]


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


def test_triplet_undefined_anchors_are_non_finite_and_dropped():
    scores = torch.randn(5, 5, requires_grad=True)
    targets = torch.tensor([0, 0, 1, 2, 2])  # anchor 2 has no positive
    loss, acc = TripletLoss()(scores, targets)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4]]).all()
    mean, mean_acc, n = finite_mean(loss, acc)
    assert n == 4
    assert mean.item() == pytest.approx(loss[[0, 1, 3, 4]].mean().item())
    assert mean_acc.item() == pytest.approx(acc[[0, 1, 3, 4]].mean().item())
    mean.backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.all(scores.grad[2] == 0)

    single_id = TripletLoss()(torch.randn(3, 3), torch.tensor([4, 4, 4]))[0]  # no negatives at all
    assert not torch.isfinite(single_id).any()


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


@pytest.mark.parametrize("seed", range(3))
def test_pairwise_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = 8
    scores = torch.randn(B, B, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 3, (B,), generator=g)
    loss, acc = PairwiseMatchingLoss()(scores, targets)
    for i in range(B):
        total = 0.0
        pos, neg = [], []
        for j in range(B):
            s, y = scores[i, j].item(), float(targets[i] == targets[j])
            p = 1 / (1 + math.exp(-s))
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
            if y and j != i:
                pos.append(s)
            elif not y:
                neg.append(s)
        assert loss[i].item() == pytest.approx(total)
        expected_acc = (min(pos) if pos else math.inf) > (max(neg) if neg else -math.inf)
        assert acc[i].item() == float(expected_acc)


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
