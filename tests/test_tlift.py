"""TLift against a plain-loop transcription of the official algorithm (spec §8)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qaconv.errors import QAConvError
from qaconv.tlift import tlift


def tlift_loop(score, q_cams, q_times, g_cams, g_times, tau=100.0, sigma=200.0, k=10, alpha=0.2):
    """Official per-probe loop, written out plainly (cameras: every id seen, empty ones skipped)."""
    n_q, n_g = score.shape
    w = np.zeros((n_q, n_g))
    for i in range(n_q):
        co = [j for j in range(n_q) if q_cams[j] == q_cams[i] and abs(q_times[j] - q_times[i]) < tau]
        for c in sorted(set(g_cams.tolist())):
            gal = [g for g in range(n_g) if g_cams[g] == c]
            values = sorted(float(score[j, g]) for j in co for g in gal)
            thr = values[-k] if len(values) > k else values[0]
            pivots = [g for j in co for g in gal if score[j, g] >= thr]
            for g2 in gal:
                w[i, g2] = sum(math.exp(-((g_times[g2] - g_times[p]) ** 2) / sigma**2) for p in pivots) / len(pivots)
    return (w + alpha) * score


def _random_case(rng, n_q, n_g, cams_q, cams_g, decimals=1, span=400.0):
    score = np.round(rng.random((n_q, n_g)), decimals)
    q_cams = rng.choice(cams_q, n_q)
    g_cams = rng.choice(cams_g, n_g)
    q_times = np.round(rng.random(n_q) * span)
    g_times = np.round(rng.random(n_g) * span)
    return score, q_cams, q_times, g_cams, g_times


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    # non-contiguous ids; probe camera 7 has no gallery images; gallery camera 9 has no probes
    case = _random_case(rng, 23, 31, [1, 4, 7], [1, 4, 9], decimals=1)
    for k in (1, 3, 10, 500):  # 500: more than every candidate count
        ref = tlift_loop(*case, tau=60.0, sigma=150.0, k=k)
        out = tlift(*case, tau=60.0, sigma=150.0, k=k)
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_single_probe_camera_and_camera_without_gallery():
    rng = np.random.default_rng(11)
    score, _, q_times, g_cams, g_times = _random_case(rng, 9, 12, [0], [3, 5])
    q_cams = np.full(9, 2)  # a probe camera that no gallery image has
    np.testing.assert_allclose(tlift(score, q_cams, q_times, g_cams, g_times),
                               tlift_loop(score, q_cams, q_times, g_cams, g_times), rtol=1e-12)


def test_all_probes_cooccur_and_boundary_is_strict():
    score = np.array([[0.5, 0.1, 0.3], [0.2, 0.4, 0.3], [0.3, 0.3, 0.9]])
    q_cams = np.zeros(3, int)
    g_cams = np.array([0, 0, 1])
    q_times = np.array([0.0, 100.0, 50.0])  # |0 - 100| == tau: not co-occurring
    g_times = np.array([0.0, 300.0, 10.0])
    for k in (1, 2, 4):
        np.testing.assert_allclose(tlift(score, q_cams, q_times, g_cams, g_times, k=k),
                                   tlift_loop(score, q_cams, q_times, g_cams, g_times, k=k), rtol=1e-12)


def test_hand_computed_single_probe():
    # one probe, one gallery camera with two images; k=1 -> pivot = argmax (gallery 0 at t=0)
    score = np.array([[0.8, 0.2]])
    out = tlift(score, [0], [0.0], [0, 0], [0.0, 200.0], sigma=200.0, k=1, alpha=0.2)
    np.testing.assert_allclose(out, [[(1.0 + 0.2) * 0.8, (math.exp(-1.0) + 0.2) * 0.2]])


def test_dtype_kept_and_chunking_equivalent(monkeypatch):
    rng = np.random.default_rng(3)
    case = _random_case(rng, 40, 50, [0, 1], [0, 1, 2], decimals=2, span=200.0)
    ref = tlift(*case)
    import qaconv.tlift as mod

    monkeypatch.setattr(mod, "_KERNEL_ELEMS", 7)  # one column per chunk
    monkeypatch.setattr(mod, "_PIVOT_ELEMS", 1)  # one probe per group
    np.testing.assert_allclose(tlift(*case), ref, rtol=1e-12)
    out32 = tlift(case[0].astype(np.float32), *case[1:])
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ref, rtol=1e-5)


def test_bad_shapes_raise():
    with pytest.raises(QAConvError, match="q_cams"):
        tlift(np.zeros((2, 3)), [0], [0, 0], [0, 0, 0], [0, 0, 0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_q=st.integers(1, 12), n_g=st.integers(1, 15))
def test_properties(seed, n_q, n_g):
    rng = np.random.default_rng(seed)
    score, q_cams, q_times, g_cams, g_times = _random_case(rng, n_q, n_g, [0, 2], [0, 2, 5])
    out = tlift(score, q_cams, q_times, g_cams, g_times, k=3)
    # weights lie in (0, 1]: score * alpha <= out <= score * (1 + alpha)
    assert np.all(out >= 0.2 * score - 1e-12) and np.all(out <= 1.2 * score + 1e-12)
    # permuting the gallery permutes the output columns; permuting probes permutes rows
    pg, pq = rng.permutation(n_g), rng.permutation(n_q)
    out_p = tlift(score[np.ix_(pq, pg)], q_cams[pq], q_times[pq], g_cams[pg], g_times[pg], k=3)
    np.testing.assert_allclose(out_p, out[np.ix_(pq, pg)], rtol=1e-12, atol=1e-15)
    # alpha huge: output proportional to score
    big = tlift(score, q_cams, q_times, g_cams, g_times, k=3, alpha=1e9)
    np.testing.assert_allclose(big / 1e9, score, rtol=1e-8)
    # relabelling cameras changes nothing
    out_r = tlift(score, q_cams * 3 + 1, q_times, g_cams * 3 + 1, g_times, k=3)
    np.testing.assert_allclose(out_r, out, rtol=1e-12)


def test_all_scores_tied():
    rng = np.random.default_rng(7)
    _, q_cams, q_times, g_cams, g_times = _random_case(rng, 15, 40, [0, 1], [0, 1])
    score = np.full((15, 40), 0.5)
    for k in (1, 10):
        np.testing.assert_allclose(tlift(score, q_cams, q_times, g_cams, g_times, k=k),
                                   tlift_loop(score, q_cams, q_times, g_cams, g_times, k=k), rtol=1e-12)
