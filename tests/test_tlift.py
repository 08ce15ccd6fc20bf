"""TLift against a plain-loop transcription of the official algorithm (spec §8)."""

import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qaconv.tlift as mod
from qaconv.errors import QAConvError
from qaconv.tlift import tlift


def tlift_loop(score, q_cams, q_times, g_cams, g_times, tau=100.0, sigma=200.0, k=10, alpha=0.2):
    """Official per-probe loop (reid/tlift.py of QAConv v2.1), written out plainly: for every probe and gallery
    camera, the scores of the probes of its camera within tau seconds, threshold = K-th largest (the smallest
    when there are at most K), pivots = every entry >= threshold (a gallery image once per such entry), weight =
    mean Gaussian kernel to the pivots. Cameras: every id seen; a camera with no gallery images is skipped."""
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


@contextmanager
def blocks(kernel_elems=None, pivot_elems=None, spans=None):
    """Force small blocks in the fast path: kernel chunks, probe groups, parallel spans."""
    saved = mod._KERNEL_ELEMS, mod._PIVOT_ELEMS, mod._n_spans
    try:
        if kernel_elems is not None:
            mod._KERNEL_ELEMS = kernel_elems
        if pivot_elems is not None:
            mod._PIVOT_ELEMS = pivot_elems
        if spans is not None:
            mod._n_spans = lambda n: max(1, min(n, spans))
        yield
    finally:
        mod._KERNEL_ELEMS, mod._PIVOT_ELEMS, mod._n_spans = saved


def _random_case(rng, n_q, n_g, cams_q, cams_g, decimals=1, span=400.0):
    score = np.round(rng.random((n_q, n_g)), decimals)
    q_cams = rng.choice(cams_q, n_q)
    g_cams = rng.choice(cams_g, n_g)
    q_times = np.round(rng.random(n_q) * span)
    g_times = np.round(rng.random(n_g) * span)
    return score, q_cams, q_times, g_cams, g_times


def _close(out, ref):
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-300)  # atol: subnormal kernel sums only


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    # non-contiguous ids; probe camera 7 has no gallery images; gallery camera 9 has no probes
    case = _random_case(rng, 23, 31, [1, 4, 7], [1, 4, 9], decimals=1)
    for k in (1, 3, 10, 500):  # 500: more than every candidate count
        _close(tlift(*case, tau=60.0, sigma=150.0, k=k), tlift_loop(*case, tau=60.0, sigma=150.0, k=k))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_q=st.integers(1, 14),
    n_g=st.integers(1, 45),
    n_cq=st.integers(1, 3),
    n_cg=st.integers(1, 4),
    k=st.integers(1, 12),
    decimals=st.sampled_from([1, 2, 6]),  # 1: many tied scores (pivots beyond a row's top-k list)
    span=st.sampled_from([0.0, 50.0, 400.0, 6000.0, 40000.0]),  # 0: all times tied; 40000: banded kernel
    tau=st.sampled_from([1.0, 60.0, 1e6]),  # 1: most probes alone in their window; 1e6: all co-occur
    alpha=st.sampled_from([0.0, 0.2, 3.0]),  # 0: no kernel value left out
    kernel_elems=st.sampled_from([None, 1, 23]),
    pivot_elems=st.sampled_from([None, 1, 17]),
    spans=st.sampled_from([None, 1, 3]),
)
def test_fast_path_equals_loop(seed, n_q, n_g, n_cq, n_cg, k, decimals, span, tau, alpha, kernel_elems,
                               pivot_elems, spans):
    rng = np.random.default_rng(seed)
    # camera ids overlap only partly: some probe cameras have no gallery images and vice versa
    case = _random_case(rng, n_q, n_g, [0, 2, 5][:n_cq], [2, 0, 7, 8][:n_cg], decimals=decimals, span=span)
    kw = dict(tau=tau, sigma=200.0, k=k, alpha=alpha)
    with blocks(kernel_elems, pivot_elems, spans):
        out = tlift(*case, **kw)
    _close(out, tlift_loop(*case, **kw))


def test_top_k_lists_past_the_block_maxima():
    """Gallery cameras much larger than 4k (the block-maxima filter of the per-row top-k), with scores
    rising along the columns (each block's maximum at its end) and a few exact ties at the threshold."""
    rng = np.random.default_rng(5)
    n_q, n_g = 9, 120
    score = np.tile(np.linspace(0, 1, n_g), (n_q, 1)) + 0.01 * rng.random((n_q, n_g))
    score[:, ::7] = 0.9
    q_cams, g_cams = rng.integers(0, 2, n_q), rng.integers(0, 2, n_g)
    q_times, g_times = rng.random(n_q) * 300, rng.random(n_g) * 3000
    for k in (1, 4, 10):
        for perm in (np.arange(n_g), rng.permutation(n_g)):
            case = (score[:, perm], q_cams, q_times, g_cams[perm], g_times[perm])
            _close(tlift(*case, k=k), tlift_loop(*case, k=k))


def test_kernel_band_is_exact_to_rounding():
    """Times far apart (most kernel values under alpha * 2^-60, left out) still give the loop's result."""
    rng = np.random.default_rng(2)
    case = _random_case(rng, 12, 40, [0, 1], [0, 1], decimals=3, span=200_000.0)
    for alpha in (0.0, 1e-9, 0.2):
        _close(tlift(*case, k=3, alpha=alpha), tlift_loop(*case, k=3, alpha=alpha))


def test_single_probe_camera_and_camera_without_gallery():
    rng = np.random.default_rng(11)
    score, _, q_times, g_cams, g_times = _random_case(rng, 9, 12, [0], [3, 5])
    q_cams = np.full(9, 2)  # a probe camera that no gallery image has
    _close(tlift(score, q_cams, q_times, g_cams, g_times), tlift_loop(score, q_cams, q_times, g_cams, g_times))


def test_all_probes_cooccur_and_boundary_is_strict():
    score = np.array([[0.5, 0.1, 0.3], [0.2, 0.4, 0.3], [0.3, 0.3, 0.9]])
    q_cams = np.zeros(3, int)
    g_cams = np.array([0, 0, 1])
    q_times = np.array([0.0, 100.0, 50.0])  # |0 - 100| == tau: not co-occurring
    g_times = np.array([0.0, 300.0, 10.0])
    for k in (1, 2, 4):
        _close(tlift(score, q_cams, q_times, g_cams, g_times, k=k),
               tlift_loop(score, q_cams, q_times, g_cams, g_times, k=k))


def test_hand_computed_single_probe():
    # one probe, one gallery camera with two images; k=1 -> pivot = argmax (gallery 0 at t=0)
    score = np.array([[0.8, 0.2]])
    out = tlift(score, [0], [0.0], [0, 0], [0.0, 200.0], sigma=200.0, k=1, alpha=0.2)
    np.testing.assert_allclose(out, [[(1.0 + 0.2) * 0.8, (math.exp(-1.0) + 0.2) * 0.2]])


def test_hand_computed_tied_pivots_count_once_per_entry():
    # two co-occurring probes; k=2 over {0.9, 0.5, 0.9, 0.1}: thr = 0.9, pivots = gallery 0 twice
    score = np.array([[0.9, 0.5], [0.9, 0.1]])
    out = tlift(score, [0, 0], [0.0, 10.0], [0, 0], [0.0, 200.0], sigma=200.0, k=2, alpha=0.0)
    np.testing.assert_allclose(out, [[0.9, 0.5 * math.exp(-1.0)], [0.9, 0.1 * math.exp(-1.0)]], rtol=1e-15)


def test_dtype_kept_and_blocking_equivalent():
    rng = np.random.default_rng(3)
    case = _random_case(rng, 40, 50, [0, 1], [0, 1, 2], decimals=2, span=200.0)
    ref = tlift(*case)
    with blocks(kernel_elems=7, pivot_elems=1, spans=40):  # one column per chunk, one probe per group and span
        _close(tlift(*case), ref)
    out32 = tlift(case[0].astype(np.float32), *case[1:])
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ref, rtol=1e-6)
    hundredths = np.round(case[0] * 100)
    out_int = tlift(hundredths.astype(np.int64), *case[1:])
    assert out_int.dtype == np.float64
    _close(out_int, tlift(hundredths, *case[1:]))
    _close(tlift(np.asfortranarray(case[0]), *case[1:]), ref)


def test_empty_inputs():
    assert tlift(np.zeros((0, 3)), [], [], [0, 1, 1], [0.0, 1.0, 2.0]).shape == (0, 3)
    assert tlift(np.zeros((2, 0)), [0, 0], [0.0, 1.0], [], []).shape == (2, 0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(score=np.zeros(3)), "2-D"),
        (dict(q_cams=[0]), "q_cams"),
        (dict(g_times=[0.0, np.nan, 1.0]), "g_times"),
        (dict(k=0), "k must"),
        (dict(k=2.5), "k must"),
        (dict(tau=0.0), "tau"),
        (dict(sigma=-1.0), "sigma"),
        (dict(score=np.array([[0.1, np.nan, 0.2], [0.3, 0.4, 0.5]])), "NaN"),
        (dict(score=np.array([["a", "b", "c"], ["d", "e", "f"]])), "dtype"),
    ],
)
def test_bad_input_raises_one_line(change, match):
    args = dict(score=np.ones((2, 3)), q_cams=[0, 0], q_times=[0.0, 1.0], g_cams=[0, 0, 1], g_times=[0.0, 1.0, 2.0])
    kw = {key: change.pop(key) for key in ("k", "tau", "sigma") if key in change}
    args.update(change)
    with pytest.raises(QAConvError, match=match):
        tlift(**args, **kw)


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
        _close(tlift(score, q_cams, q_times, g_cams, g_times, k=k),
               tlift_loop(score, q_cams, q_times, g_cams, g_times, k=k))


@pytest.mark.parametrize("seed", range(3))
def test_benchmark_reference_loops_equal_the_plain_loop(seed):
    """benchmarks/postprocess.py times qaconv.tlift against two loops (lean numpy, and the official code's
    structure with torch): both must compute the official algorithm, on all rows and on a subset of rows."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from postprocess import tlift_loop_rows, tlift_official_rows
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(seed)
    case = _random_case(rng, 30, 45, [0, 1, 2], [0, 1, 2, 3], decimals=2)  # cameras 0..C-1, ties
    ref = tlift_loop(*case)
    rows = np.sort(rng.choice(30, 7, replace=False))
    for fn in (tlift_loop_rows, tlift_official_rows):
        _close(fn(*case, np.arange(30)), ref)
        _close(fn(*case, rows), ref[rows])


def test_vectorised_exp_matches_library_exp():
    """The kernel's own exp (polynomial on x = j ln 2 + r) within 2 ulp of math.exp: over the range TLift uses,
    at both ends of the reduction interval, at the switch to the library exp (-700), for subnormal results,
    zero and -inf, each alone and beside ordinary values (a block holding one value under -700 goes to the
    library exp whole)."""
    rng = np.random.default_rng(3)
    half = math.log(2) / 2
    special = [0.0, -0.0, -1e-300, -half, -half - 1e-12, -math.log(2), -43.2, -699.999, -700.0, -700.5, -708.5,
               -745.1, -746.0, -1e300, -np.inf]
    cases = [-rng.random(2000) * 50, -rng.random(600) * 700, np.array(special[:9])]
    cases += [np.array([v]) for v in special] + [np.concatenate([-rng.random(7) * 3, [v]]) for v in special]
    for x in cases:
        got = x.copy()
        mod._exp_block(got, np.empty(len(x)))
        ref = np.array([math.exp(v) for v in x])
        assert np.all(np.abs(got - ref) <= 2 * np.spacing(ref)), (x, got, ref)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([-128, -100, -5, -1, 0, 3, 5, 100, 127]), min_size=1, max_size=40),
       st.sampled_from([np.int8, np.int64, np.uint16, np.uint64]), st.integers(0, 2**62), st.data())
def test_camera_codes_and_orders_match_numpy(values, dtype, shift, data):
    """The set-up's camera codes equal np.unique's inverse (table path for integer ids spanning < 2^16 values,
    in narrow types too, np.unique otherwise; string ids below), and its orders equal np.lexsort, ties (equal
    camera and time) in the given order."""
    ids = np.array(values)
    if np.dtype(dtype).kind == "u":
        ids = ids - ids.min()
    ids = ids.astype(dtype)
    if dtype == np.uint64 and shift:
        ids = ids + np.uint64(shift)  # large ids; a wide spread goes through np.unique
        ids[0] = np.uint64(2**63 + shift) if len(ids) > 1 else ids[0]
    codes = mod._codes(ids)
    np.testing.assert_array_equal(codes, np.unique(ids, return_inverse=True)[1].reshape(-1))
    times = np.array(data.draw(st.lists(st.sampled_from([0.0, 1.5, -2.0, 7.25]), min_size=len(ids), max_size=len(ids))))
    n_codes = int(codes.max()) + 1
    np.testing.assert_array_equal(mod._by_code_time(codes, n_codes, times), np.lexsort((times, codes)))
    np.testing.assert_array_equal(mod._by_code(codes, n_codes), np.argsort(codes, kind="stable"))


def test_camera_codes_of_string_ids():
    np.testing.assert_array_equal(mod._codes(np.array(["b", "a", "b"])), [1, 0, 1])


def _tbb_installed():
    try:
        version("tbb")
    except PackageNotFoundError:
        return False
    return True


# In a fresh process: hide TBB (numba's version check fails as for a missing library), import qaconv.tlift,
# start numba's threads and print the layer chosen.
_LAYER_CODE = """
import numba.np.ufunc.parallel as par
def _missing():
    raise ImportError("tbb hidden by the test")
if HIDE_TBB:
    par._check_tbb_version_compatible = _missing
import numba, qaconv.tlift
numba.get_num_threads()
print(numba.threading_layer())
"""


@pytest.mark.parametrize("hide_tbb", [False, True])
def test_threading_layer_is_tbb_where_installed_and_never_openmp(hide_tbb):
    """Importing qaconv.tlift in a fresh process (no NUMBA_THREADING_* variables) selects TBB when the tbb
    package is installed (a dependency on Linux x86-64), else workqueue; never OpenMP (it spins and is not
    fork-safe), which numba's own order would pick before workqueue."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING")}
    code = f"HIDE_TBB = {hide_tbb}\n" + _LAYER_CODE
    layer = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    layer = layer.stdout.strip()
    assert layer == ("tbb" if _tbb_installed() and not hide_tbb else "workqueue")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_tlift_after_the_parent():
    """A child forked after the parent ran the parallel passes (as DataLoader workers or multiprocessing
    pools are) runs them too and gets the same result."""
    rng = np.random.default_rng(3)
    score = rng.random((40, 90))
    args = (score, rng.integers(0, 3, 40), rng.random(40) * 500, rng.integers(0, 4, 90), rng.random(90) * 500)
    ref = tlift(*args)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            code = 0 if np.array_equal(tlift(*args), ref) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 300  # a child stuck in the thread pool fails the test instead of hanging it
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish TLift within 300 s")
    assert os.waitstatus_to_exitcode(done[1]) == 0
