"""k-reciprocal re-ranking: dense form vs a loop transcription of the official code; kNN form vs dense."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qaconv.rerank import k_reciprocal, k_reciprocal_knn, knn_lists, top_m


def rerank_loop(q_g, q_q, g_g, k1=20, k2=6, lam=0.3):
    """The official reranking(), written as plain loops (float64 V, stable argsort for ties)."""
    d = np.concatenate([np.concatenate([q_q, q_g], 1), np.concatenate([q_g.T, g_g], 1)], 0).astype(np.float32)
    d = np.transpose(d / np.max(d, axis=0))
    n, q = d.shape[0], q_g.shape[0]
    rank = np.argsort(d, axis=1, kind="stable")
    v = np.zeros((n, n))
    kh = int(np.around(k1 / 2.0))
    for i in range(n):
        fwd = rank[i, : k1 + 1]
        rec = [c for c in fwd if i in rank[c, : k1 + 1]]
        exp = list(rec)
        for c in rec:
            cf = rank[c, : kh + 1]
            crec = [x for x in cf if c in rank[x, : kh + 1]]
            if len(set(crec) & set(rec)) > 2.0 / 3 * len(crec):
                exp += crec
        exp = sorted(set(exp))
        w = np.exp(-d[i, exp].astype(np.float64))
        v[i, exp] = w / w.sum()
    if k2 != 1:
        v = np.array([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jac = np.zeros((q, n))
    for i in range(q):
        for j in range(n):
            smin = sum(min(v[i, f], v[j, f]) for f in range(n) if v[i, f] != 0 and v[j, f] != 0)
            jac[i, j] = 1 - smin / (2 - smin)
    return ((1 - lam) * jac + lam * d[:q])[:, q:]


def _dists(rng, q, g, dim=4, ids=5, decimals=None):
    centers = rng.normal(size=(ids, dim))
    x = centers[rng.integers(0, ids, q + g)] + 0.5 * rng.normal(size=(q + g, dim))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    if decimals is not None:
        d = np.round(d, decimals)
    return d[:q, q:], d[:q, :q], d[q:, q:]


@pytest.mark.parametrize("seed,k1,k2,decimals", [(0, 20, 6, None), (1, 5, 3, None), (2, 4, 1, 1), (3, 6, 4, 1),
                                                 (4, 3, 2, 0)])
def test_dense_matches_loop_reference(seed, k1, k2, decimals):
    rng = np.random.default_rng(seed)
    qg, qq, gg = _dists(rng, 7, 19, decimals=decimals)  # decimals -> many ties
    ref = rerank_loop(qg, qq, gg, k1, k2)
    out = k_reciprocal(qg, qq, gg, k1=k1, k2=k2)
    assert out.shape == (7, 19) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-6)


def test_asymmetric_input_matches_loop_reference():
    rng = np.random.default_rng(5)
    qg, qq, gg = (rng.random(s) for s in [(6, 14), (6, 6), (14, 14)])
    np.testing.assert_allclose(k_reciprocal(qg, qq, gg, k1=6, k2=3), rerank_loop(qg, qq, gg, 6, 3), atol=2e-6)


def test_top_m_is_stable_argsort_prefix():
    rng = np.random.default_rng(0)
    x = np.round(rng.random((30, 40)), 1)
    idx, val = top_m(x, 7)
    ref = np.argsort(x, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_array_equal(val, np.take_along_axis(x, ref, 1))


def _knn_inputs(qg, qq, gg, m, chunk=5):
    d = np.block([[qq, qg], [qg.T, gg]]).astype(np.float32)
    nn_index, nn_dist, col_max = knn_lists(lambda a, b: d[:, a:b], d.shape[0], m, chunk=chunk)
    return d, nn_index, nn_dist, col_max


@pytest.mark.parametrize("seed,k1,k2", [(0, 20, 6), (1, 6, 3), (2, 4, 1)])
def test_knn_form_equals_dense(seed, k1, k2):
    rng = np.random.default_rng(seed)
    qg, qq, gg = _dists(rng, 9, 30, ids=6)
    dense = k_reciprocal(qg, qq, gg, k1=k1, k2=k2)
    d, nn_index, nn_dist, col_max = _knn_inputs(qg, qq, gg, max(k1 + 1, k2))
    out = k_reciprocal_knn(nn_index, nn_dist, qg, col_max, k1=k1, k2=k2, pair_dist=lambda a, b: d[a, b])
    np.testing.assert_allclose(out, dense, atol=1e-6)
    # full-length lists hold every distance: no pair_dist needed
    d, nn_index, nn_dist, col_max = _knn_inputs(qg, qq, gg, d.shape[0])
    np.testing.assert_allclose(k_reciprocal_knn(nn_index, nn_dist, qg, col_max, k1=k1, k2=k2), dense, atol=1e-6)


def test_knn_form_errors():
    rng = np.random.default_rng(0)
    qg, qq, gg = _dists(rng, 4, 8)
    _, nn_index, nn_dist, col_max = _knn_inputs(qg, qq, gg, 3)
    with pytest.raises(ValueError, match="max\\(k1 \\+ 1, k2\\)"):
        k_reciprocal_knn(nn_index, nn_dist, qg, col_max, k1=5)
    with pytest.raises(ValueError, match="nn_index"):
        k_reciprocal_knn(nn_index[:-1], nn_dist[:-1], qg, col_max, k1=2, k2=2)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), q=st.integers(1, 6), g=st.integers(2, 12))
def test_gallery_permutation_and_range(seed, q, g):
    rng = np.random.default_rng(seed)
    qg, qq, gg = _dists(rng, q, g)
    out = k_reciprocal(qg, qq, gg, k1=4, k2=2)
    assert np.all(np.isfinite(out)) and np.all(out >= -1e-6) and np.all(out <= 1 + 1e-6)
    p = rng.permutation(g)
    out_p = k_reciprocal(qg[:, p], qq, gg[np.ix_(p, p)], k1=4, k2=2)
    # permutation only changes tie order, and random continuous distances have no ties
    np.testing.assert_allclose(out_p, out[:, p], atol=1e-6)
