import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qaconv.metrics import NoValidQueryError, RankResult, evaluate_rank

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Slow per-query loop: open-reid CMC, sklearn AP, INP of the last positive."""
    cmc = np.zeros(max_rank)
    aps, inps = [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        keep = [j for j in order if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        matches = np.array([g_pids[j] == q_pids[i] for j in keep], dtype=bool)
        if not matches.any():
            continue
        hits = np.flatnonzero(matches)
        if hits[0] < max_rank:
            cmc[hits[0] :] += 1
        aps.append(sklearn_metrics.average_precision_score(matches, -distmat[i][keep]))
        inps.append(matches.sum() / (hits[-1] + 1))
    n = len(aps)
    return cmc / n, float(np.mean(aps)), float(np.mean(inps)), n


def random_case(rng, Q, G, levels, n_ids=5, n_cams=3):
    distmat = rng.integers(0, levels, size=(Q, G)).astype(np.float64)
    return (
        distmat,
        rng.integers(0, n_ids, Q),
        rng.integers(0, n_ids, G),
        rng.integers(0, n_cams, Q),
        rng.integers(0, n_cams, G),
    )


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("levels", [3, 1000])
def test_matches_slow_reference_with_ties(seed, levels):
    rng = np.random.default_rng(seed)
    Q, G = int(rng.integers(5, 25)), int(rng.integers(5, 60))
    d, qp, gp, qc, gc = random_case(rng, Q, G, levels=levels)
    qp[0], qc[0], gp[0], gc[0] = 1, 0, 1, 1  # at least one valid query
    cmc, mAP, mINP, n = reference(d, qp, gp, qc, gc, max_rank=20)
    r = evaluate_rank(d, qp, gp, qc, gc, max_rank=20)
    assert r.num_valid == n and r.num_invalid == len(qp) - n
    np.testing.assert_allclose(r.cmc, cmc, atol=1e-12)
    assert r.mAP == pytest.approx(mAP, abs=1e-12)
    assert r.mINP == pytest.approx(mINP, abs=1e-12)


def test_chunking_and_torch_float32_input(monkeypatch):
    import qaconv.metrics as m

    rng = np.random.default_rng(7)
    d, qp, gp, qc, gc = random_case(rng, Q=40, G=30, levels=6)
    qp[0], qc[0], gp[0], gc[0] = 1, 0, 1, 1
    full = evaluate_rank(d, qp, gp, qc, gc, max_rank=10)
    monkeypatch.setattr(m, "_CHUNK_ELEMENTS", 50)  # forces chunks of one query
    chunked = evaluate_rank(torch.from_numpy(d).float(), torch.from_numpy(qp), gp, qc, gc, max_rank=10)
    np.testing.assert_allclose(chunked.cmc, full.cmc)
    assert chunked.mAP == pytest.approx(full.mAP) and chunked.mINP == pytest.approx(full.mINP)


def test_hand_computed_single_query():
    # item 2 (pid 1, cam 0) is junk; valid order: pid 2, 1, 3, 1 -> matches at ranks 2 and 4
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    r = evaluate_rank(d, [1], [2, 1, 1, 3, 1], [0], [1, 1, 0, 1, 1], max_rank=5)
    np.testing.assert_allclose(r.cmc, [0, 1, 1, 1, 1])
    assert r.mAP == pytest.approx(0.5 * (1 / 2 + 2 / 4))
    assert r.mINP == pytest.approx(2 / 4)
    assert (r.num_valid, r.num_invalid) == (1, 0)


def test_hand_computed_ties():
    # items 0 (neg) and 1 (pos) tie: one PR point (recall 1/2, precision 1/2); then item 2 (pos):
    # recall 1, precision 2/3.  The stable sort puts the negative first for CMC and INP.
    d = np.array([[0.1, 0.1, 0.2, 0.3]])
    r = evaluate_rank(d, [1], [2, 1, 1, 3], [0], [1, 1, 1, 1], max_rank=4)
    np.testing.assert_allclose(r.cmc, [0, 1, 1, 1])
    assert r.mAP == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert r.mINP == pytest.approx(2 / 3)


def test_hand_computed_two_queries_average():
    d = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    # query 0 (pid 1): matches at ranks 1 and 3 -> AP (1 + 2/3)/2, INP 2/3
    # query 1 (pid 2): reversed order 3,2,1,0 -> pids 2,1,2,1 -> match at ranks 1, 3 -> same numbers
    gp, gc = [1, 2, 1, 2], [1, 1, 1, 1]
    r = evaluate_rank(d, [1, 2], gp, [0, 0], gc, max_rank=3)
    np.testing.assert_allclose(r.cmc, [1, 1, 1])
    assert r.mAP == pytest.approx((1 + 2 / 3) / 2)
    assert r.mINP == pytest.approx(2 / 3)
    # shift query 1 so its first match is at rank 2: gallery order pids 1,2,1,2
    d2 = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    r2 = evaluate_rank(d2, [1, 2], gp, [0, 0], gc, max_rank=3)
    np.testing.assert_allclose(r2.cmc, [0.5, 1, 1])
    assert r2.mAP == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2 + 2 / 4) / 2) / 2)
    assert r2.mINP == pytest.approx((2 / 3 + 2 / 4) / 2)


def test_junk_rule_and_distractors():
    # gallery: distractor pid 0 in the query's camera (kept, negative), same pid + cam (junk), true match
    d = np.array([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    q_pids, q_cams = [5, 9], [0, 0]  # query 1 (pid 9) has no gallery image: invalid, not averaged
    r = evaluate_rank(d, q_pids, [0, 5, 5], q_cams, [0, 0, 1], max_rank=3)
    np.testing.assert_allclose(r.cmc, [0, 1, 1])
    assert r.mAP == pytest.approx(0.5)
    assert r.mINP == pytest.approx(0.5)
    assert (r.num_valid, r.num_invalid) == (1, 1)


def test_same_pid_other_camera_is_match_and_same_camera_other_pid_is_negative():
    d = np.array([[0.1, 0.2]])
    r = evaluate_rank(d, [3], [4, 3], [1], [1, 2], max_rank=2)
    np.testing.assert_allclose(r.cmc, [0, 1])


def test_max_rank_beyond_gallery_pads_with_last_value():
    d = np.array([[0.3, 0.2, 0.1]])
    r = evaluate_rank(d, [1], [1, 2, 2], [0], [1, 1, 1], max_rank=10)
    assert r.cmc.shape == (10,)
    np.testing.assert_allclose(r.cmc, [0, 0] + [1] * 8)
    assert r.rank(10) == 1.0


def test_result_accessors():
    d = np.array([[0.1, 0.2, 0.3]])
    r = evaluate_rank(d, [1], [2, 1, 3], [0], [1, 1, 1], max_rank=12)
    assert isinstance(r, RankResult)
    assert r.rank(1) == 0.0 and r.rank(2) == 1.0
    out = r.to_dict()
    assert set(out) == {"rank-1", "rank-5", "rank-10", "mAP", "mINP"}
    assert all(type(v) is float for v in out.values())
    assert set(evaluate_rank(d, [1], [2, 1, 3], [0], [1, 1, 1]).to_dict()) >= {"rank-20"}
    with pytest.raises(ValueError, match="rank k"):
        r.rank(0)
    with pytest.raises(ValueError, match="rank k"):
        r.rank(13)
    with pytest.raises(AttributeError):
        r.mAP = 1.0
    with pytest.raises(ValueError):
        r.cmc[0] = 1.0


def test_no_valid_query_message():
    d = np.zeros((3, 2))
    with pytest.raises(NoValidQueryError) as info:
        evaluate_rank(d, [1, 2, 2], [2, 3], [0, 0, 0], [0, 1])
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg
    assert "none of the 3 queries" in msg
    assert "1 query identities have no gallery image at all" in msg
    assert "1 appear in the gallery only under the query's own camera" in msg
    assert "check the query/gallery split and camera ids" in msg


def test_shape_errors():
    d = np.zeros((2, 3))
    with pytest.raises(ValueError, match="2-D"):
        evaluate_rank(np.zeros(3), [1], [1, 2, 3], [0], [1, 1, 1])
    with pytest.raises(ValueError, match=r"q_pids must have shape \(2,\).*\(2, 3\).*got \(3,\)"):
        evaluate_rank(d, [1, 2, 3], [1, 2, 3], [0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match=r"g_camids must have shape \(3,\)"):
        evaluate_rank(d, [1, 2], [1, 2, 3], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(d, [1, 2], [1, 2, 3], [0, 0], [1, 1, 1], max_rank=0)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(np.full((2, 3), np.nan), [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])


case_params = st.tuples(
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=2, max_value=25),
    st.integers(min_value=0, max_value=2**32 - 1),
)


def _valid_case(Q, G, seed, distinct):
    rng = np.random.default_rng(seed)
    d, qp, gp, qc, gc = random_case(rng, Q, G, levels=8, n_ids=3, n_cams=2)
    if distinct:
        d = rng.permutation(Q * G).reshape(Q, G).astype(np.float64)
    qp[0], qc[0], gp[0], gc[0] = 1, 0, 1, 1
    return d, qp, gp, qc, gc


def _same(a, b):
    np.testing.assert_allclose(a.cmc, b.cmc, atol=1e-12)
    assert a.mAP == pytest.approx(b.mAP, abs=1e-12)
    assert a.mINP == pytest.approx(b.mINP, abs=1e-12)
    assert (a.num_valid, a.num_invalid) == (b.num_valid, b.num_invalid)


@settings(max_examples=60, deadline=None)
@given(case_params)
def test_gallery_permutation_invariance_without_ties(params):
    Q, G, seed = params
    d, qp, gp, qc, gc = _valid_case(Q, G, seed, distinct=True)
    perm = np.random.default_rng(seed + 1).permutation(G)
    _same(evaluate_rank(d, qp, gp, qc, gc), evaluate_rank(d[:, perm], qp, gp[perm], qc, gc[perm]))


@settings(max_examples=60, deadline=None)
@given(case_params)
def test_query_permutation_invariance_with_ties(params):
    Q, G, seed = params
    d, qp, gp, qc, gc = _valid_case(Q, G, seed, distinct=False)
    perm = np.random.default_rng(seed + 2).permutation(Q)
    _same(evaluate_rank(d, qp, gp, qc, gc), evaluate_rank(d[perm], qp[perm], gp, qc[perm], gc))


@settings(max_examples=60, deadline=None)
@given(case_params)
def test_monotone_transform_invariance(params):
    Q, G, seed = params
    d, qp, gp, qc, gc = _valid_case(Q, G, seed, distinct=False)  # ties are kept by the transform
    transformed = d**3 + 2 * d - 7  # strictly increasing, exact on these small integers
    _same(evaluate_rank(d, qp, gp, qc, gc), evaluate_rank(transformed, qp, gp, qc, gc))


@settings(max_examples=40, deadline=None)
@given(case_params)
def test_hypothesis_against_reference(params):
    Q, G, seed = params
    d, qp, gp, qc, gc = _valid_case(Q, G, seed, distinct=False)
    cmc, mAP, mINP, n = reference(d, qp, gp, qc, gc, max_rank=5)
    r = evaluate_rank(d, qp, gp, qc, gc, max_rank=5)
    np.testing.assert_allclose(r.cmc, cmc, atol=1e-12)
    assert r.mAP == pytest.approx(mAP, abs=1e-12) and r.mINP == pytest.approx(mINP, abs=1e-12)
    assert r.num_valid == n
