"""Two-stage search: pooled-cosine shortlist + exact QAConv re-scoring."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from qaconv.gallery.search import pooled_candidates, two_stage_topk
from qaconv.matching import Matcher
from qaconv.models.qaconv import QAConv

C, H, W = 6, 3, 2
HAS_FAISS = importlib.util.find_spec("faiss") is not None


def _maps(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, C, H, W, generator=g), dim=1)


def _qaconv(version: str = "2.1", seed: int = 0) -> QAConv:
    torch.manual_seed(seed)
    head = QAConv(C, H, W, version=version)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for bn in (head.bn, head.logit_bn):
            bn.running_mean.fill_(float(torch.randn(1, generator=gen)) * 0.3)
            bn.running_var.fill_(0.5 + float(torch.rand(1, generator=gen)))
            bn.weight.fill_(0.5 + float(torch.rand(1, generator=gen)))
            bn.bias.fill_(float(torch.randn(1, generator=gen)))
        head.fc.weight.add_(0.05 * torch.randn(head.fc.weight.shape, generator=gen))
        head.fc.bias.fill_(0.2)
    return head.eval()


@pytest.mark.parametrize("version", ["2.1", "1"])
@pytest.mark.parametrize("extra", [0, 5])
def test_exhaustive_equals_matcher_topk(version, extra):
    head = _qaconv(version)
    prob, gal = _maps(9, 1), _maps(23, 2)
    want_s, want_i = Matcher(head, "cpu").topk(prob, gal, 7)
    got_s, got_i = two_stage_topk(head, prob, gal, k=7, candidates=len(gal) + extra, device="cpu")
    assert torch.equal(got_s, want_s) and torch.equal(got_i, want_i)


@pytest.mark.parametrize("version", ["2.1", "1"])
@pytest.mark.parametrize("memory", [None, 1, 50_000])
def test_shortlist_scores_are_exact_and_sorted(version, memory):
    head = _qaconv(version, seed=3)
    prob, gal = _maps(11, 4), _maps(40, 5)
    full = Matcher(head, "cpu").scores(prob, gal)
    s, i = two_stage_topk(head, prob, gal, k=5, candidates=12, device="cpu", memory=memory, use_faiss=False)
    assert s.shape == i.shape == (11, 5) and i.dtype == torch.int64
    torch.testing.assert_close(s, full.gather(1, i), atol=1e-5, rtol=0)
    assert (s[:, :-1] >= s[:, 1:]).all()
    assert all(len(set(row.tolist())) == 5 for row in i)
    # the returned items are the QAConv top-k among the first-stage candidates
    _, cand = pooled_candidates(prob, gal, 12, use_faiss=False)
    for p in range(len(prob)):
        assert set(i[p].tolist()) <= set(cand[p].tolist())
        best = full[p, cand[p]].topk(5).values
        torch.testing.assert_close(s[p], best, atol=1e-5, rtol=0)


def test_pooled_candidates_torch_blocks(monkeypatch):
    prob, gal = _maps(5, 6), _maps(30, 7)
    monkeypatch.setattr("qaconv.gallery.search.FIRST_STAGE_BLOCK", 7)
    s, i = pooled_candidates(prob, gal, 8, use_faiss=False)
    ep = F.normalize(prob.mean(dim=(2, 3)), dim=1)
    eg = F.normalize(gal.mean(dim=(2, 3)), dim=1)
    ws, wi = (ep @ eg.t()).topk(8, dim=1)
    torch.testing.assert_close(s, ws)
    assert torch.equal(i, wi)


def test_recall_is_one_when_candidates_contain_exhaustive_topk():
    """Gallery = identity bases + noise; each probe's true matches lead both the pooled and the QAConv ranking."""
    head = _qaconv("2.1", seed=8)
    g = torch.Generator().manual_seed(9)
    ids, per_id, k = 6, 4, 4
    base = torch.randn(ids, C, H, W, generator=g)
    gal = F.normalize(base.repeat_interleave(per_id, 0) + 0.05 * torch.randn(ids * per_id, C, H, W, generator=g), 1)
    prob = F.normalize(base + 0.05 * torch.randn(ids, C, H, W, generator=g), dim=1)
    m = 8
    _, cand = pooled_candidates(prob, gal, m, use_faiss=False)
    ex_s, ex_i = Matcher(head, "cpu").topk(prob, gal, k)
    for p in range(ids):  # the construction: the shortlist holds the exhaustive top-k
        assert set(ex_i[p].tolist()) <= set(cand[p].tolist())
        assert set(ex_i[p].tolist()) == set(range(p * per_id, (p + 1) * per_id))
    s, i = two_stage_topk(head, prob, gal, k=k, candidates=m, use_faiss=False)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(i, ex_i, strict=True)) / ex_i.numel()
    assert recall == 1.0
    torch.testing.assert_close(s, ex_s, atol=1e-5, rtol=0)


def test_restores_training_mode():
    head = _qaconv().train()
    two_stage_topk(head, _maps(3, 1), _maps(10, 2), k=2, candidates=4, use_faiss=False)
    assert head.training


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(k=0),
        dict(k=11),
        dict(k=3, candidates=2),
        dict(k=2.0),
        dict(memory=0),
        dict(use_faiss="yes"),
    ],
)
def test_bad_args(kwargs):
    with pytest.raises(ValueError):
        two_stage_topk(_qaconv(), _maps(3, 1), _maps(10, 2), **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError):
        two_stage_topk(torch.nn.Linear(2, 2), _maps(3, 1), _maps(10, 2))
    with pytest.raises(ValueError):
        two_stage_topk(_qaconv(), _maps(3, 1)[:, :, 0], _maps(10, 2))
    with pytest.raises(ValueError):
        two_stage_topk(_qaconv(), _maps(3, 1), torch.zeros(10, C + 1, H, W))


@pytest.mark.skipif(HAS_FAISS, reason="faiss is installed")
def test_use_faiss_true_without_faiss():
    with pytest.raises(ImportError, match="faiss"):
        two_stage_topk(_qaconv(), _maps(3, 1), _maps(10, 2), k=2, candidates=4, use_faiss=True)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_matches_torch():
    prob, gal = _maps(5, 6), _maps(30, 7)
    s1, i1 = pooled_candidates(prob, gal, 8, use_faiss=True)
    s2, i2 = pooled_candidates(prob, gal, 8, use_faiss=False)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=0)
    assert torch.equal(i1, i2)


@pytest.mark.parametrize("m", [1, 4, 9])
def test_two_stage_scores_shortlist_exact_and_tail_by_cosine(m):
    from qaconv.gallery.search import two_stage_scores

    head = _qaconv()
    prob, gal = _maps(5, 1), _maps(11, 2)
    full = Matcher(head, "cpu").scores(prob, gal)
    scores, mask = two_stage_scores(head, prob, gal, m, device="cpu")
    cos = F.normalize(prob.mean(dim=(2, 3)), dim=1) @ F.normalize(gal.mean(dim=(2, 3)), dim=1).t()
    for i in range(len(prob)):
        order = sorted(range(len(gal)), key=lambda j: -float(cos[i, j]))  # brute-force first stage
        short, tail = order[:m], order[m:]
        assert sorted(torch.nonzero(mask[i]).flatten().tolist()) == sorted(short)
        torch.testing.assert_close(scores[i, short], full[i, short], rtol=0, atol=1e-5)
        # every non-candidate ranks below every candidate, in pooled-cosine order
        assert float(scores[i, tail].max()) < float(scores[i, short].min())
        assert sorted(tail, key=lambda j: -float(scores[i, j])) == tail


def test_two_stage_scores_exhaustive_when_m_covers_gallery():
    from qaconv.gallery.search import two_stage_scores

    head = _qaconv("1")
    prob, gal = _maps(4, 3), _maps(6, 4)
    scores, mask = two_stage_scores(head, prob, gal, 6, device="cpu")
    torch.testing.assert_close(scores, Matcher(head, "cpu").scores(prob, gal))
    assert bool(mask.all())


@pytest.mark.parametrize("shift", [-1000.0, 1000.0])
def test_two_stage_tail_stays_below_the_shortlist_whatever_the_logits(shift):
    """Strongly negative (or positive) logits: the tail must still rank below every shortlisted item."""
    from qaconv.gallery.search import two_stage_scores

    head = _qaconv()
    with torch.no_grad():
        head.logit_bn.bias.fill_(shift)
    prob, gal = _maps(4, 5), _maps(12, 6)
    scores, mask = two_stage_scores(head, prob, gal, 3, device="cpu")
    full = Matcher(head, "cpu").scores(prob, gal)
    assert float(full.max()) < 0 if shift < 0 else float(full.min()) > 0
    for i in range(len(prob)):
        assert float(scores[i][~mask[i]].max()) < float(scores[i][mask[i]].min())
