"""Matching engine: tiled, folded scores equal the straightforward head and a brute-force loop."""

import pytest
import torch
import torch.nn.functional as F

from qaconv.matching import Matcher, block_sizes, fold_head, pairwise_scores
from qaconv.models.pooled import PooledCosine
from qaconv.models.qaconv import QAConv

C, H, W = 5, 3, 2
HW = H * W
PAIR_BYTES = HW * HW * 4 + 2 * HW * 4  # one pair's share of a QAConv tile (fp32)


def _maps(n: int, seed: int, c: int = C) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, c, H, W, generator=g), dim=1)


def _randomise_bn(bn: torch.nn.BatchNorm1d, gen: torch.Generator, negative: bool = False) -> None:
    with torch.no_grad():
        bn.running_mean.fill_(float(torch.randn(1, generator=gen)) * 0.3)
        bn.running_var.fill_(0.5 + float(torch.rand(1, generator=gen)))
        scale = 0.5 + float(torch.rand(1, generator=gen))
        bn.weight.fill_(-scale if negative else scale)
        bn.bias.fill_(float(torch.randn(1, generator=gen)))


def _qaconv(version: str, seed: int = 0, negative: bool = False) -> QAConv:
    torch.manual_seed(seed)
    head = QAConv(C, H, W, version=version)
    gen = torch.Generator().manual_seed(seed + 100)
    _randomise_bn(head.bn, gen, negative=negative)
    _randomise_bn(head.logit_bn, gen)
    with torch.no_grad():
        head.fc.weight.add_(0.05 * torch.randn(head.fc.weight.shape, generator=gen))
        head.fc.bias.fill_(0.2)
    return head.eval()


def _pooled(seed: int = 0) -> PooledCosine:
    head = PooledCosine()
    _randomise_bn(head.logit_bn, torch.Generator().manual_seed(seed))
    return head.eval()


def _bn(bn: torch.nn.BatchNorm1d, x: float) -> float:
    gamma, beta = float(bn.weight.detach()), float(bn.bias.detach())
    return (x - float(bn.running_mean)) / (float(bn.running_var) + bn.eps) ** 0.5 * gamma + beta


def _brute(head: QAConv, prob: torch.Tensor, gal: torch.Tensor) -> torch.Tensor:
    """Pair-by-pair transcription of spec section 3 in float64."""
    w = head.fc.weight.detach().double().reshape(-1)
    c = float(head.fc.bias.detach())
    out = torch.empty(len(prob), len(gal), dtype=torch.float64)
    for i in range(len(prob)):
        for j in range(len(gal)):
            sim = prob[i].double().reshape(C, HW).t() @ gal[j].double().reshape(C, HW)  # [probe loc, gallery loc]
            a = [_bn(head.bn, float(v)) for v in sim.max(dim=1).values]  # per probe location
            b = [_bn(head.bn, float(v)) for v in sim.max(dim=0).values]  # per gallery location
            if head.version == "2.1":
                s = sum(float(w[k]) * a[k] for k in range(HW)) + c + sum(float(w[k]) * b[k] for k in range(HW)) + c
            else:
                s = sum(float(w[k]) * v for k, v in enumerate(b + a)) + c
            out[i, j] = _bn(head.logit_bn, s)
    return out.float()


@pytest.mark.parametrize("version", ["2.1", "1"])
@pytest.mark.parametrize("negative", [False, True])
def test_qaconv_matches_head_and_brute_force(version, negative):
    head = _qaconv(version, negative=negative)
    prob, gal = _maps(7, 1), _maps(11, 2)
    with torch.no_grad():
        direct = head(prob, gal)
    brute = _brute(head, prob, gal)
    torch.testing.assert_close(direct, brute, atol=1e-5, rtol=0)
    for memory in (None, 1, 3 * PAIR_BYTES, 10 * PAIR_BYTES):  # one tile .. one pair per tile
        got = Matcher(head, device="cpu", memory=memory).scores(prob, gal)
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (7, 11)
        torch.testing.assert_close(got, direct, atol=1e-5, rtol=0)


def test_fold_of_negative_bn_scale_is_exact():
    head = _qaconv("2.1", negative=True)
    fold = fold_head(head)
    assert fold["alpha"] < 0 < float(head.logit_bn.weight.detach())  # bn scale a < 0 flows into alpha
    prob, gal = _maps(4, 3), _maps(5, 4)
    with torch.no_grad():
        direct = head(prob, gal)
    torch.testing.assert_close(Matcher(head, memory=2 * PAIR_BYTES).scores(prob, gal), direct, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", ["2.1", "1"])
def test_qaconv_larger_odd_sizes_many_tiles(version):
    head = QAConv(16, H, W, version=version)
    _randomise_bn(head.bn, torch.Generator().manual_seed(5))
    head.eval()
    prob, gal = _maps(23, 6, c=16), _maps(37, 7, c=16)
    with torch.no_grad():
        direct = head(prob, gal)
    for memory in (5 * PAIR_BYTES, 17 * PAIR_BYTES, 100 * PAIR_BYTES):
        torch.testing.assert_close(Matcher(head, memory=memory).scores(prob, gal), direct, atol=1e-5, rtol=0)


def test_pooled_cosine_matches_head():
    head = _pooled()
    prob, gal = torch.randn(9, C, H, W), torch.randn(13, C, H, W)
    with torch.no_grad():
        direct = head(prob, gal)
    ep = F.normalize(prob.double().mean(dim=(2, 3)), dim=1)
    eg = F.normalize(gal.double().mean(dim=(2, 3)), dim=1)
    brute = torch.tensor([[_bn(head.logit_bn, float(ep[i] @ eg[j])) for j in range(13)] for i in range(9)])
    torch.testing.assert_close(direct, brute.float(), atol=1e-5, rtol=0)
    for memory in (None, 4, 4 * 7, 4 * 50):
        torch.testing.assert_close(Matcher(head, memory=memory).scores(prob, gal), direct, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [lambda: _qaconv("2.1"), lambda: _qaconv("1"), _pooled])
def test_self_scores_equal_full(make):
    head = make()
    x = _maps(19, 8)
    with torch.no_grad():
        direct = head(x, x)
    for memory in (None, 4 * PAIR_BYTES, 30 * PAIR_BYTES):
        m = Matcher(head, memory=memory)
        full = m.scores(x, x.clone())  # a different object: the full P x G path
        torch.testing.assert_close(full, direct, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.self_scores(x), full, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.scores(x, x), full, atol=1e-5, rtol=0)


def test_self_scores_compute_upper_blocks_only(monkeypatch):
    head = _qaconv("2.1")
    x = _maps(12, 9)
    calls = []
    original = torch.mm

    def counting_mm(a, b, **kw):
        calls.append((a.shape[0] // HW, b.shape[1] // HW))
        return original(a, b, **kw)

    monkeypatch.setattr(torch, "mm", counting_mm)
    Matcher(head, memory=16 * PAIR_BYTES).self_scores(x)  # 4x4 blocks -> 3 block rows
    assert len(calls) == 6  # 3 diagonal + 3 upper off-diagonal, not 9
    calls.clear()
    Matcher(head, memory=16 * PAIR_BYTES).scores(x, x.clone())
    assert len(calls) == 9


@pytest.mark.parametrize("make", [lambda: _qaconv("2.1"), lambda: _qaconv("1"), _pooled])
def test_topk_streams_exact(make):
    head = make()
    prob, gal = _maps(10, 10), _maps(29, 11)
    with torch.no_grad():
        direct = head(prob, gal)
    want_s, want_i = direct.topk(5, dim=1)
    for memory in (None, 3 * PAIR_BYTES, 7 * PAIR_BYTES):
        got_s, got_i = Matcher(head, memory=memory).topk(prob, gal, 5)
        assert got_s.shape == got_i.shape == (10, 5) and got_i.dtype == torch.int64
        torch.testing.assert_close(got_s, want_s, atol=1e-5, rtol=0)
        assert torch.equal(got_i, want_i)
    s, i = Matcher(head).topk(prob, gal, 29)
    assert torch.equal(i, direct.argsort(dim=1, descending=True))
    with pytest.raises(ValueError):
        Matcher(head).topk(prob, gal, 30)


def test_training_mode_falls_back_to_forward_on_blocks():
    head = _qaconv("2.1").train()
    prob, gal = _maps(6, 12), _maps(7, 13)
    assert fold_head(head) is None
    with torch.no_grad():
        direct = head(prob, gal)  # whole-call batch statistics
    whole = Matcher(head).scores(prob, gal)  # one block: identical
    torch.testing.assert_close(whole, direct, atol=1e-5, rtol=0)
    assert head.training


def test_block_sizes_respect_budget():
    for memory, num_p, num_g in [(1, 5, 5), (1000, 100, 3), (1000, 3, 100), (10**6, 7, 9), (50, 50, 50)]:
        p, g = block_sizes(1.0, num_p, num_g, memory)
        assert 1 <= p <= num_p and 1 <= g <= num_g
        assert p * g <= max(memory, 1)
    assert block_sizes(1.0, 100, 3, 1000) == (100, 3)


def test_pairwise_scores_uses_engine_and_restores_mode():
    head = _qaconv("2.1")
    head.train()
    prob, gal = _maps(5, 14), _maps(8, 15)
    head.eval()
    with torch.no_grad():
        direct = head(prob, gal)
    head.train()
    got = pairwise_scores(head, prob, gal, prob_batch=2, gal_batch=3, device="cpu")
    assert head.training
    torch.testing.assert_close(got, direct, atol=1e-5, rtol=0)
    with torch.no_grad():
        self_direct = head.eval()(prob, prob)
    torch.testing.assert_close(pairwise_scores(head, prob, prob, device="cpu"), self_direct, atol=1e-5, rtol=0)


def test_matcher_rejects_other_heads():
    with pytest.raises(TypeError):
        Matcher(torch.nn.Linear(2, 2))
