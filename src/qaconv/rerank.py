"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) as used by QAConv (spec §7.3).

Two front ends share one core:

* ``k_reciprocal(dist_qg, dist_qq, dist_gg)``: the dense form. It assembles the (Q+G)^2 matrix, so it
  needs about 2 * 4 * (Q+G)^2 bytes (Market: ~3 GB).
* ``k_reciprocal_knn(nn_index, nn_dist, dist_qg, col_max)``: the memory-bounded form working from
  k-nearest-neighbour lists and a sparse V (MSMT17 size fits in 16 GB). ``knn_lists`` builds the lists
  and column maxima in one streaming pass over column blocks of the assembled matrix;
  ``candidate_lists`` builds them from per-row candidate sets (shortlists) without any dense matrix.

Conventions shared by both (the official ``reranking()``):

* D is the assembled matrix ``[[dist_qq, dist_qg], [dist_qg.T, dist_gg]]``. Each column is divided by its
  maximum and the result transposed: ``O[i, j] = D[j, i] / col_max[i]``. Distances are not squared. The
  column maxima must be positive (true for ``1 - sigmoid(logit / 10)`` or any non-negative distance).
* Neighbour order is ascending distance with ties broken by the smaller index (a stable sort; the official
  ``np.argsort`` leaves tie order unspecified).
* V is kept in float32 (the official code stores V in float16); the Jaccard sums are accumulated in
  float64 and the result is float32. Differences to the official numbers are therefore at float16
  rounding level of V (~1e-3 relative), not algorithmic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

__all__ = ["candidate_lists", "k_reciprocal", "k_reciprocal_knn", "knn_lists", "top_m"]

_CHUNK_ELEMS = 1 << 24  # bound on temporary array sizes (elements)


def top_m(rows: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the m smallest entries of every row, ascending, ties by smaller index.

    Equal to ``np.argsort(rows, axis=1, kind="stable")[:, :m]`` without sorting whole rows.
    """
    rows = np.asarray(rows)
    b, n = rows.shape
    m = min(m, n)
    thr = np.partition(rows, m - 1, axis=1)[:, m - 1 : m]  # m-th smallest value per row
    lt = rows < thr
    need = m - lt.sum(axis=1, keepdims=True)
    eq = rows == thr
    take = lt | eq
    tied = np.flatnonzero(eq.sum(axis=1) > need[:, 0])  # rows where only the first `need` ties may enter
    if len(tied):
        take[tied] = lt[tied] | (eq[tied] & (np.cumsum(eq[tied], axis=1) <= need[tied]))
    idx = np.nonzero(take)[1].reshape(b, m)  # in index order
    val = np.take_along_axis(rows, idx, axis=1)
    order = np.argsort(val, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(val, order, axis=1)


def knn_lists(
    column_block: Callable[[int, int], np.ndarray], n: int, m: int, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Streaming pass building the inputs of ``k_reciprocal_knn``.

    Args:
        column_block: ``column_block(a, b)`` returns ``D[:, a:b]`` ([n, b - a]) of the assembled matrix.
            For a symmetric D (QAConv distances are symmetric) that is ``D[a:b, :].T``.
        n: Q + G.
        m: list length, at least ``max(k1 + 1, k2)``.
        chunk: columns per block (memory ~ 4 * n * chunk bytes twice).

    Returns:
        ``nn_index`` [n, m] int32, ``nn_dist`` [n, m] float32 (rows of the normalised, transposed
        matrix O, ascending) and ``col_max`` [n] float32.
    """
    nn_index = np.empty((n, min(m, n)), dtype=np.int32)
    nn_dist = np.empty((n, min(m, n)), dtype=np.float32)
    col_max = np.empty(n, dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        block = np.asarray(column_block(a, b), dtype=np.float32)
        if block.shape != (n, b - a):
            raise ValueError(f"knn_lists: column_block({a}, {b}) returned {block.shape}, expected {(n, b - a)}")
        col_max[a:b] = block.max(axis=0)
        rows = np.ascontiguousarray((block / col_max[a:b]).T)  # rows a..b of O
        nn_index[a:b], nn_dist[a:b] = top_m(rows, m)
    return nn_index, nn_dist, col_max


def candidate_lists(
    cand: np.ndarray, raw: np.ndarray, col_max: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour lists for ``k_reciprocal_knn`` from per-row candidates instead of full rows.

    Args:
        cand: [n, K] distinct column indices per row of O (any order).
        raw: [n, K] raw distances ``D[cand[r, j], r]`` (row r of O before the division by ``col_max[r]``);
            NaN marks an entry never to select (e.g. padding).
        col_max: [n] the column maxima of D (of the whole column, not only of the candidates).
        m: list length (at most K).

    Returns ``nn_index`` [n, m] int32 and ``nn_dist`` [n, m] float32: the m smallest ``raw / col_max`` of each
    row, ascending, ties by the smaller column index (the order of ``knn_lists``). They equal ``knn_lists``
    on the full matrix whenever each row's m nearest are among its candidates. Memory O(n * K).
    """
    cand, raw = np.asarray(cand), np.asarray(raw)
    if cand.shape != raw.shape or cand.ndim != 2 or len(col_max) != len(cand) or not 1 <= m <= cand.shape[1]:
        raise ValueError(f"candidate_lists: cand {cand.shape} and raw {raw.shape} must be [n, K] with K >= m = {m} "
                         f"and col_max [{len(cand)}], got col_max {np.shape(col_max)}")
    n = len(cand)
    nn_index = np.empty((n, m), dtype=np.int32)
    nn_dist = np.empty((n, m), dtype=np.float32)
    cm = np.asarray(col_max, dtype=np.float32)
    step = max(1, _CHUNK_ELEMS // cand.shape[1])
    for a in range(0, n, step):
        b = min(n, a + step)
        by_index = np.argsort(cand[a:b], axis=1, kind="stable")  # so that top_m's ties go to the smaller index
        c = np.take_along_axis(cand[a:b], by_index, axis=1)
        o = np.take_along_axis(raw[a:b].astype(np.float32), by_index, axis=1) / cm[a:b, None]
        pos, nn_dist[a:b] = top_m(o, m)
        nn_index[a:b] = np.take_along_axis(c, pos, axis=1)
    return nn_index, nn_dist


def _reciprocal_mask(nbr: np.ndarray) -> np.ndarray:
    """mask[i, a] = i is among the first nbr.shape[1] neighbours of nbr[i, a]."""
    n, k = nbr.shape
    mask = np.empty((n, k), dtype=bool)
    step = max(1, _CHUNK_ELEMS // (k * k))
    for a in range(0, n, step):
        b = min(n, a + step)
        mask[a:b] = (nbr[nbr[a:b]] == np.arange(a, b)[:, None, None]).any(axis=2)
    return mask


def _expanded_sets(nn_index: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) pairs of the expanded k-reciprocal sets R*(i), unique, sorted by row then column."""
    n = nn_index.shape[0]
    kh = int(np.around(k1 / 2.0))
    fwd = nn_index[:, : k1 + 1]
    half = nn_index[:, : kh + 1]
    r1 = _reciprocal_mask(fwd)
    rh = _reciprocal_mask(half)
    keys = []
    step = max(1, _CHUNK_ELEMS // ((k1 + 1) * (kh + 1) * (k1 + 1)))
    for a in range(0, n, step):
        b = min(n, a + step)
        rows = np.arange(a, b)
        rset = np.where(r1[a:b], fwd[a:b], -1)  # R(i), -1 = not a member
        cand = fwd[a:b]  # candidates c (only those in R(i) are used)
        hset = np.where(rh[cand], half[cand], -2)  # R(c, kh) per candidate, [b, k1+1, kh+1]
        size = rh[cand].sum(axis=2)
        inter = (hset[..., None] == rset[:, None, None, :]).any(axis=3).sum(axis=2)
        accept = r1[a:b] & (inter > 2.0 / 3 * size)
        own = np.where(r1[a:b], fwd[a:b], -1)
        extra = np.where(accept[..., None], hset, -2).reshape(b - a, -1)
        allc = np.concatenate([own, extra], axis=1)
        r_idx = np.broadcast_to(rows[:, None], allc.shape)
        ok = allc >= 0
        keys.append(np.unique(r_idx[ok].astype(np.int64) * n + allc[ok]))
    key = np.concatenate(keys)
    return key // n, key % n


def _lookup_dists(nn_index, nn_dist, rows, cols, pair_dist, col_max) -> np.ndarray:
    """O[rows, cols]: from the neighbour lists where present, else from ``pair_dist``."""
    out = np.full(len(rows), np.nan, dtype=np.float64)
    m = nn_index.shape[1]
    step = max(1, _CHUNK_ELEMS // m)
    for a in range(0, len(rows), step):
        b = min(len(rows), a + step)
        hit = nn_index[rows[a:b]] == cols[a:b, None]
        found = hit.any(axis=1)
        pos = hit.argmax(axis=1)
        out[a:b][found] = nn_dist[rows[a:b][found], pos[found]]
    missing = np.flatnonzero(np.isnan(out))
    if len(missing):
        if pair_dist is None:
            raise ValueError(
                f"k_reciprocal_knn: {len(missing)} distances of the expanded sets are not in the neighbour lists; "
                "pass pair_dist or longer lists"
            )
        r, c = rows[missing], cols[missing]
        out[missing] = np.asarray(pair_dist(c, r), dtype=np.float64) / col_max[r]
    return out


def _jaccard_core(nn_index, nn_dist, num_query, k1, k2, lookup) -> np.ndarray:
    """Jaccard distance [Q, G] (float32) from neighbour lists of all N rows of O."""
    n = nn_index.shape[0]
    num_gallery = n - num_query
    rows, cols = _expanded_sets(nn_index, k1)
    d = lookup(rows, cols)
    wgt = np.exp(-d)
    wgt /= np.bincount(rows, weights=wgt, minlength=n)[rows]
    v = sp.csr_matrix((wgt.astype(np.float32), (rows, cols)), shape=(n, n))
    if k2 != 1:
        qe = sp.csr_matrix(
            (np.full(n * k2, 1.0 / k2, dtype=np.float32), (np.repeat(np.arange(n), k2), nn_index[:, :k2].ravel())),
            shape=(n, n),
        )
        v = (qe @ v).tocsr()
    vq = v[:num_query]
    vg = v[num_query:].tocsc()  # column k -> gallery rows holding feature k
    out = np.empty((num_query, num_gallery), dtype=np.float32)
    col_len = np.diff(vg.indptr)
    cum = np.concatenate([[0], np.cumsum(col_len[vq.indices])])
    per_row = cum[vq.indptr[1:]] - cum[vq.indptr[:-1]]  # (query, gallery) pairs each query row expands to
    a = 0
    while a < num_query:
        b = a + 1
        budget = per_row[a]
        while b < num_query and (b - a + 1) * num_gallery <= _CHUNK_ELEMS and budget + per_row[b] <= _CHUNK_ELEMS:
            budget += per_row[b]
            b += 1
        s = np.zeros((b - a) * num_gallery, dtype=np.float64)
        lo, hi = vq.indptr[a], vq.indptr[b]
        if hi > lo:
            feat = vq.indices[lo:hi]
            qval = vq.data[lo:hi]
            qrow = np.repeat(np.arange(b - a), np.diff(vq.indptr[a : b + 1]))
            lens = col_len[feat]
            starts = vg.indptr[feat]
            total = int(lens.sum())
            pos = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(starts, lens)
            mins = np.minimum(np.repeat(qval, lens), vg.data[pos])
            s += np.bincount(np.repeat(qrow, lens) * num_gallery + vg.indices[pos], weights=mins,
                             minlength=len(s))
        s = s.reshape(b - a, num_gallery)
        out[a:b] = 1.0 - s / (2.0 - s)
        a = b
    return out


def k_reciprocal(
    dist_qg: np.ndarray, dist_qq: np.ndarray, dist_gg: np.ndarray, k1: int = 20, k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """Dense k-reciprocal re-ranking; returns the re-ranked [Q, G] distance (float32).

    Algorithm (official ``reranking()``): assemble D, divide each column by its maximum and transpose;
    k-reciprocal sets over the k1+1 nearest; expansion by the round(k1/2)-reciprocal sets of candidates c
    with |R(c) ∩ R(i)| > 2/3 |R(c)|; V[i, R*] = exp(-d) normalised; query expansion over the k2 nearest;
    Jaccard ``1 - Σmin / (2 - Σmin)``; final ``(1 - λ) jaccard + λ original`` (original = normalised).
    Only the k1+1 (or k2) nearest of each row are ever read, so ``initial_rank`` is a partial sort.
    """
    dist_qg = np.asarray(dist_qg, dtype=np.float32)
    q, g = dist_qg.shape
    n = q + g
    d = np.empty((n, n), dtype=np.float32)
    d[:q, :q] = dist_qq
    d[:q, q:] = dist_qg
    d[q:, :q] = dist_qg.T
    d[q:, q:] = dist_gg
    d /= d.max(axis=0)
    o = np.ascontiguousarray(d.T)
    del d
    m = max(k1 + 1, k2)
    nn_index = np.empty((n, min(m, n)), dtype=np.int64)
    nn_dist = np.empty((n, min(m, n)), dtype=np.float32)
    step = max(1, _CHUNK_ELEMS // n)
    for a in range(0, n, step):
        nn_index[a : a + step], nn_dist[a : a + step] = top_m(o[a : a + step], m)
    jac = _jaccard_core(nn_index, nn_dist, q, k1, k2, lambda r, c: o[r, c].astype(np.float64))
    return (1 - lambda_value) * jac + lambda_value * o[:q, q:]


def k_reciprocal_knn(
    nn_index: np.ndarray,
    nn_dist: np.ndarray,
    dist_qg: np.ndarray,
    col_max: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    pair_dist: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Memory-bounded k-reciprocal re-ranking from neighbour lists; returns [Q, G] float32.

    Args:
        nn_index, nn_dist: [Q+G, m] neighbour lists of every row of O (``O[i, j] = D[j, i] / col_max[i]``),
            ascending with ties by smaller index, ``m >= max(k1 + 1, k2)``; ``knn_lists`` builds them.
        dist_qg: [Q, G] raw (un-normalised) query-gallery distances; may be a memmap. Only used for
            the final ``λ * dist_qg / col_max[:Q, None]`` term.
        col_max: [Q+G] column maxima of the assembled raw matrix D.
        pair_dist: ``pair_dist(a, b)`` returns raw ``D[a, b]`` for equal-length index arrays. Needed only
            for members of expanded sets R*(i) that are outside i's list (candidates' half-sets may hold
            them); without it, such a case raises ``ValueError``.

    Equals ``k_reciprocal`` whenever the lists (plus ``pair_dist``) hold every distance the algorithm reads.
    Memory: the lists, a sparse V (~N * 100 non-zeros after query expansion) and the [Q, G] output.
    """
    nn_index = np.asarray(nn_index)
    nn_dist = np.asarray(nn_dist)
    col_max = np.asarray(col_max, dtype=np.float64)
    q, g = dist_qg.shape
    if nn_index.shape != nn_dist.shape or nn_index.shape[0] != q + g or len(col_max) != q + g:
        raise ValueError(
            f"k_reciprocal_knn: expected nn_index/nn_dist [{q + g}, m] and col_max [{q + g}], got "
            f"{nn_index.shape}, {nn_dist.shape}, {col_max.shape}"
        )
    if nn_index.shape[1] < min(max(k1 + 1, k2), q + g):
        raise ValueError(f"k_reciprocal_knn: lists of length {nn_index.shape[1]} < max(k1 + 1, k2)")

    def lookup(r, c):
        return _lookup_dists(nn_index, nn_dist, r, c, pair_dist, col_max)

    out = _jaccard_core(nn_index, nn_dist, q, k1, k2, lookup)
    step = max(1, _CHUNK_ELEMS // max(1, g))
    for a in range(0, q, step):
        b = min(q, a + step)
        out[a:b] *= 1 - lambda_value
        out[a:b] += (lambda_value * (np.asarray(dist_qg[a:b], dtype=np.float64) / col_max[a:b, None])).astype(
            np.float32
        )
    return out
