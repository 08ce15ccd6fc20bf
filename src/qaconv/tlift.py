"""TLift: model-free temporal lifting of re-ID scores (spec §8).

``tlift`` re-weights a [Q, G] similarity matrix with a per-probe Gaussian kernel density of *when* the
probe's group (probes of the same camera seen within ``tau`` seconds) appears in each gallery camera.

Score convention: ``score`` must be a similarity, larger = more alike, roughly in [0, 1] with a mean
around 0.01-0.1 for the default ``alpha`` to be sensible: ``sigmoid(logit / 10)`` of QAConv, or a
re-ranked ``1 - dist``. Raw QAConv logits (unbounded, possibly negative) should not be fed directly.

The result equals the official per-probe loop; it is computed per (probe camera, gallery camera)
block with numpy, in probe chunks so that memory stays bounded at Market size and beyond.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["tlift", "co_occurrence_windows"]

# Upper bound on the number of elements of one temporary [probes, window, gallery-in-camera] array.
_CHUNK_ELEMS = 1 << 23


def co_occurrence_windows(times: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """For times sorted ascending, the half-open window [lo_i, hi_i) of indices j that may co-occur with i.

    The window is widened by one on each side so that the exact test ``|t_j - t_i| < tau`` (applied by
    the caller, exactly as the official code does) decides the boundary, not the rounding of ``t_i ± tau``.
    """
    times = np.asarray(times, dtype=np.float64)
    lo = np.searchsorted(times, times - tau, side="right") - 1
    hi = np.searchsorted(times, times + tau, side="left") + 1
    n = len(times)
    return np.clip(lo, 0, n), np.clip(hi, 0, n)


def _block_weights(s: np.ndarray, tp: np.ndarray, tg: np.ndarray, tau: float, sigma: float, k: int) -> np.ndarray:
    """Weights w [P_c, G_c] for the probes of one camera (sorted by time ``tp``) against one gallery camera.

    ``s`` [P_c, G_c] holds the scores of those probes against that camera's gallery (float64).
    Pivots are found from every row's k largest entries (an entry >= the threshold lies there unless it
    ties with the threshold; rows whose whole top-k clears the threshold are re-scanned in full), and the
    weights are ``counts @ kernel`` with a sparse pivot-count matrix, so the cost is ~#pivots x G_c.
    """
    n_p, n_g = s.shape
    lo, hi = co_occurrence_windows(tp, tau)
    wmax = int((hi - lo).max())
    kk = min(k, n_g)
    top_idx = np.argpartition(s, n_g - kk, axis=1)[:, n_g - kk :]  # each row's kk largest (unordered)
    top = np.take_along_axis(s, top_idx, axis=1)
    row_min = s.min(axis=1)
    w = np.empty((n_p, n_g), dtype=np.float64)
    step = max(1, min(_CHUNK_ELEMS // max(1, wmax * kk), _CHUNK_ELEMS // n_g))
    offs = np.arange(wmax)
    for a in range(0, n_p, step):
        b = min(n_p, a + step)
        idx = lo[a:b, None] + offs[None, :]  # [b-a, wmax]
        inside = idx < hi[a:b, None]
        idx = np.minimum(idx, n_p - 1)
        co = inside & (np.abs(tp[idx] - tp[a:b, None]) < tau)  # exact official predicate
        n_co = co.sum(axis=1)  # >= 1: a probe co-occurs with itself
        # Threshold: k-th largest of all co-occurring scores if there are more than k values, else the smallest.
        topv = top[idx]  # [b-a, wmax, kk]
        thr = np.where(co, row_min[idx], np.inf).min(axis=1)
        many = n_co * n_g > k
        if many.any():
            cand = np.where(co[:, :, None], topv, -np.inf)[many].reshape(int(many.sum()), -1)
            thr[many] = np.partition(cand, cand.shape[1] - k, axis=1)[:, cand.shape[1] - k]
        # Pivots: (probe i, gallery g) once per co-occurring probe j with s[j, g] >= thr_i.
        ge = co[:, :, None] & (topv >= thr[:, None, None])
        pi, pw, pk = np.nonzero(ge)
        piv_i, piv_g = [pi], [top_idx[idx[pi, pw], pk]]
        if kk < n_g:  # ties with the threshold may lie outside a row's top-kk
            fi, fw = np.nonzero(ge.all(axis=2))
            fstep = max(1, _CHUNK_ELEMS // n_g)
            for c in range(0, len(fi), fstep):
                ii, jj = fi[c : c + fstep], idx[fi[c : c + fstep], fw[c : c + fstep]]
                extra = s[jj] >= thr[ii, None]
                extra[np.arange(len(ii))[:, None], top_idx[jj]] = False  # already counted
                ei, eg = np.nonzero(extra)
                piv_i.append(ii[ei])
                piv_g.append(eg)
        piv_i, piv_g = np.concatenate(piv_i), np.concatenate(piv_g)
        used, col = np.unique(piv_g, return_inverse=True)
        cnt = sp.csr_matrix((np.ones(len(piv_i)), (piv_i, col)), shape=(b - a, len(used)))
        total = np.asarray(cnt.sum(axis=1))
        ustep = max(1, _CHUNK_ELEMS // n_g)
        acc = np.zeros((b - a, n_g), dtype=np.float64)
        for u in range(0, len(used), ustep):
            kern = np.exp(-np.square(tg[used[u : u + ustep], None] - tg[None, :]) / (sigma * sigma))
            acc += cnt[:, u : u + ustep] @ kern
        w[a:b] = acc / total
    return w


def tlift(
    score: np.ndarray,
    q_cams: np.ndarray,
    q_times: np.ndarray,
    g_cams: np.ndarray,
    g_times: np.ndarray,
    tau: float = 100.0,
    sigma: float = 200.0,
    k: int = 10,
    alpha: float = 0.2,
) -> np.ndarray:
    """Temporal lifting of a probe-gallery similarity matrix (official QAConv/TLift algorithm, spec §8).

    Args:
        score: [Q, G] similarities (see the module docstring for the expected scale).
        q_cams, g_cams: camera ids of probes and gallery; any integers (not necessarily contiguous).
        q_times, g_times: time stamps in seconds. Only differences within one camera are ever used.
        tau: probes j, i of the same camera co-occur when ``|t_j - t_i| < tau`` (i co-occurs with itself).
        sigma: width of the Gaussian kernel ``exp(-dt^2 / sigma^2)``.
        k: per gallery camera, the threshold is the k-th largest of the co-occurring probes' scores in that
            camera (the smallest one when there are at most k values); every entry >= threshold is a pivot.
        alpha: regulariser of the fusion ``(w + alpha) * score``.

    Returns:
        [Q, G] lifted scores ``(w + alpha) * score``. The weights are computed in float64; the result has the
        input's floating dtype (float32 in, float32 out, like the official code), float64 for integer input.

    Differences from the official code, both only where it would fail or silently skip: camera ids are
    mapped rather than required to be 0-based contiguous, a gallery camera with no images is skipped
    (the official code indexes an empty array), and probes of a camera the gallery does not have are
    lifted like any other (the official loop only visits cameras ``< max gallery cam + 1``).
    """
    score = np.asarray(score)
    if score.ndim != 2:
        raise ValueError(f"tlift: score must be 2-D [Q, G], got shape {score.shape}")
    n_q, n_g = score.shape
    q_cams = np.asarray(q_cams).reshape(-1)
    g_cams = np.asarray(g_cams).reshape(-1)
    q_times = np.asarray(q_times, dtype=np.float64).reshape(-1)
    g_times = np.asarray(g_times, dtype=np.float64).reshape(-1)
    for name, arr, n in (("q_cams", q_cams, n_q), ("q_times", q_times, n_q), ("g_cams", g_cams, n_g),
                         ("g_times", g_times, n_g)):
        if len(arr) != n:
            raise ValueError(f"tlift: {name} has {len(arr)} entries, expected {n} to match score {score.shape}")
    if k < 1:
        raise ValueError(f"tlift: k must be >= 1, got {k}")
    out_dtype = score.dtype if np.issubdtype(score.dtype, np.floating) else np.float64
    s64 = score.astype(np.float64, copy=False)
    w = np.zeros((n_q, n_g), dtype=np.float64)
    g_groups = [np.flatnonzero(g_cams == c) for c in np.unique(g_cams)]
    for pc in np.unique(q_cams):
        p_idx = np.flatnonzero(q_cams == pc)
        p_idx = p_idx[np.argsort(q_times[p_idx], kind="stable")]
        tp = q_times[p_idx]
        for g_idx in g_groups:
            block = s64[np.ix_(p_idx, g_idx)]
            w[np.ix_(p_idx, g_idx)] = _block_weights(block, tp, g_times[g_idx], tau, sigma, k)
    return ((w + alpha) * s64).astype(out_dtype, copy=False)
