"""TLift: model-free temporal lifting of re-ID scores (spec §8).

``tlift`` re-weights a [Q, G] similarity matrix with a per-probe Gaussian kernel density of *when* the
probe's group (probes of the same camera seen within ``tau`` seconds) appears in each gallery camera.

Score convention: ``score`` must be a similarity, larger = more alike, roughly in [0, 1] with a mean
around 0.01-0.1 for the default ``alpha`` to be sensible: ``sigmoid(logit / 10)`` of QAConv, or a
re-ranked ``1 - dist``. Raw QAConv logits (unbounded, possibly negative) should not be fed directly.

The result equals the official per-probe loop (to rounding). Compiled (numba) steps: each row's k
largest scores per gallery camera; per probe and gallery camera the threshold (the k-th largest of its
co-occurring group, merged from those lists) and its pivots; the Gaussian kernel of each gallery camera,
computed once, in parallel, with an exp of its own that vectorises (banded: values under alpha * 2^-60
cannot change an output and are left out); and
``w = counts @ kernel / #pivots`` fused with ``(w + alpha) * score``, written straight into the output.
When the banded kernels of all cameras fit one chunk (``_KERNEL_ELEMS``), all steps run in one parallel
pass over spans of probes sorted by (camera, time), each span ranking its window rows just ahead of the
probes that need them, so that a probe's score row is still in cache for its output row. Otherwise they
run in turn over column chunks and probe groups. Extra memory is O(Q x cameras x k) plus one kernel chunk
plus the pivot lists of one probe group (``_PIVOT_ELEMS``), whatever the size of ``score``. The first call
per score dtype compiles the kernels (about 15 s; cached on disk for later processes).
"""

from __future__ import annotations

import math
import os
import threading

import numba
import numpy as np
from numba import njit, prange

from .errors import QAConvError

__all__ = ["tlift"]

# Elements (float64) of one kernel chunk: the kernels of all gallery cameras against a chunk of columns.
_KERNEL_ELEMS = 1 << 24
# Pivot entries (column, count) held at once; probes are processed in groups under this bound.
_PIVOT_ELEMS = 1 << 24
# Threading layer, unless the user chose one: TBB where the ``tbb`` package is installed (a dependency on
# Linux x86-64), else numba's own thread pool (workqueue); both are fork-safe and their workers sleep between
# parallel regions. TBB made a 600 x 3,000 call faster than workqueue on 2 cores (median 9.5-11.0 against
# 11.0-14.8 ms, six alternating runs each) and was no slower with two busy processes beside it. OpenMP comes
# last: its spinning workers made calls 3-6x slower whenever other processes shared the cores, and numba's GNU
# OpenMP layer terminates any forked child that runs a parallel region. Calls are serialised by a lock
# (workqueue must not be entered from two threads at once).
if numba.config.THREADING_LAYER == "default" and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]
_LOCK = threading.Lock()


@njit(cache=True)
def _topk_row(src, gstab, tloc, goff, kk, tv, ti, bmax, cv, ci):  # pragma: no cover - compiled
    """One score row: per gallery camera c, its kk[c] largest scores (descending, float64) into tv[c] and
    their positions in camera c's time order (``tloc``) into ti[c]; returns the number of NaN scores.

    Each camera's scores are read through ``gstab`` (columns by camera, else as given) in 2 kk blocks; the
    kk-th largest block maximum is a lower bound of the kk-th largest score, so only the scores at or above
    it, in the blocks whose maximum reaches it, are ranked."""
    n_c = len(kk)
    bad = 0
    for l in range(len(src)):
        bad += src[l] != src[l]
    for c in range(n_c):
        m = kk[c]
        g0 = goff[c]
        n = goff[c + 1] - g0
        idx = gstab[g0 : g0 + n]
        nb = 2 * m if n > 4 * m else 1  # blocks of n // nb, the last one takes the remainder
        size = n // nb
        for b in range(nb):
            blk = idx[b * size : n if b == nb - 1 else (b + 1) * size]
            m0 = m1 = m2 = m3 = np.float64(src[blk[0]])  # four running maxima (NaN is counted above)
            n4 = len(blk) // 4 * 4
            for t in range(0, n4, 4):
                m0 = max(m0, np.float64(src[blk[t]]))
                m1 = max(m1, np.float64(src[blk[t + 1]]))
                m2 = max(m2, np.float64(src[blk[t + 2]]))
                m3 = max(m3, np.float64(src[blk[t + 3]]))
            for t in range(n4, len(blk)):
                m0 = max(m0, np.float64(src[blk[t]]))
            bmax[b] = max(max(m0, m1), max(m2, m3))
        bar = -np.inf
        if nb > 1:  # the m-th largest block maximum: the smallest one with fewer than m greater (branch-free)
            bar = np.inf
            for b in range(nb):
                v = bmax[b]
                r = 0
                for b2 in range(nb):
                    r += bmax[b2] > v
                if r < m and v < bar:
                    bar = v
        nv = 0
        for b in range(nb):
            if nb > 1 and not bmax[b] >= bar:
                continue
            t0 = b * size
            blk = idx[t0 : n if b == nb - 1 else t0 + size]
            for t in range(len(blk)):  # branch-free: every score written, kept when >= bar
                v = np.float64(src[blk[t]])
                cv[nv] = v
                ci[nv] = t0 + t
                nv += v >= bar
        got = 0
        for e in range(nv):  # the m largest candidates, descending (equal values: the first seen first)
            v = cv[e]
            if got == m and v <= tv[c, m - 1]:
                continue
            q = got if got < m else m - 1
            while q > 0 and tv[c, q - 1] < v:
                tv[c, q] = tv[c, q - 1]
                ti[c, q] = ti[c, q - 1]
                q -= 1
            tv[c, q] = v
            ti[c, q] = tloc[g0 + ci[e]]
            if got < m:
                got += 1
    return bad


@njit(cache=True)
def _threshold(topv, w0, w1, c, nk, m, buf):  # pragma: no cover - compiled
    """The m-th largest of the lists topv[w0:w1, c, :nk] (m <= the number of values they stand for)."""
    nb = 0
    for w in range(w0, w1):
        for e in range(nk):
            v = topv[w, c, e]
            if nb == m and v <= buf[m - 1]:
                break  # the rest of this list is smaller still
            q = nb if nb < m else m - 1
            while q > 0 and buf[q - 1] < v:
                buf[q] = buf[q - 1]
                q -= 1
            buf[q] = v
            if nb < m:
                nb += 1
    return buf[m - 1]


@njit(cache=True)
def _collect(score, topv, topi, rows, w0, w1, c, nk, gs, gcols, t, mark, slot, stamp, pcol, pcnt):  # pragma: no cover
    """Pivots of one probe in camera c: every entry >= t of the window rows ``rows[w0:w1]`` (lists
    topv/topi at the same positions), as distinct columns (position in the camera's time order) with
    counts in pcol/pcnt; returns (#distinct, #entries). A row whose whole list reaches t may hold more
    entries equal to t beyond it: it is scanned in full (``gcols``: camera c's columns in time order)."""
    nu = 0
    total = 0
    for w in range(w0, w1):
        rescan = nk < gs and topv[w, c, nk - 1] >= t
        n_e = gs if rescan else nk
        for e in range(n_e):
            if rescan:
                if score[rows[w], gcols[e]] < t:
                    continue
                col = e
            else:
                if topv[w, c, e] < t:
                    break
                col = topi[w, c, e]
            total += 1
            if mark[col] != stamp:
                mark[col] = stamp
                slot[col] = nu
                pcol[nu] = col
                pcnt[nu] = 1.0
                nu += 1
            else:
                pcnt[slot[col]] += 1.0
    return nu, total


@njit(cache=True)
def _weights(acc, pcol, pcnt, nu, total, kern, p0, blo, bhi, boff, alpha):  # pragma: no cover - compiled
    """acc = sum_e pcnt[e] * kernel row (p0 + pcol[e]) / total + alpha, kernel rows banded at blo/bhi/boff."""
    acc[:] = 0.0
    for e in range(nu):
        w = pcnt[e]
        p = p0 + pcol[e]
        lo = blo[p]
        krow = kern[boff[p] : boff[p] + bhi[p] - lo]
        part = acc[lo : lo + len(krow)]
        for l in range(len(krow)):
            part[l] += w * krow[l]
    rt = 1.0 / total  # the mean of the pivots' kernel rows (within an ulp of sum / count)
    for l in range(len(acc)):
        acc[l] = acc[l] * rt + alpha


@njit(parallel=True, cache=True)
def _fused(score, out, gstab, tloc, goff, gorder, kk, k, porder, lo, hi, kern, blo, bhi, boff, inv, alpha,
           n_s):  # pragma: no cover - compiled
    """Everything for a gallery whose kernels fit one chunk: per span of sorted probe positions, probe by
    probe, the top-k lists of the window rows not yet ranked, the thresholds, pivots, weights, output row."""
    n_q, n_g = score.shape
    n_c = len(kk)
    gmax = 1
    for c in range(n_c):
        gmax = max(gmax, goff[c + 1] - goff[c])
    n_nan = np.zeros(n_s, np.int64)
    for s in prange(n_s):
        a, b = s * n_q // n_s, (s + 1) * n_q // n_s
        if a == b:
            continue
        base, end = lo[a], hi[b - 1]  # lo and hi never decrease along the sorted positions
        tv = np.full((end - base, n_c, k), -np.inf)
        ti = np.full((end - base, n_c, k), -1, np.int64)
        cv = np.empty(gmax)
        ci = np.empty(gmax, np.int64)
        bmax, buf = np.empty(2 * k), np.empty(k)
        rows = porder[base:end]
        mark = np.full(gmax, -1, np.int64)
        slot = np.zeros(gmax, np.int64)
        pcol = np.empty(gmax, np.int64)
        pcnt = np.empty(gmax)
        wbuf = np.empty(n_g)
        prev_nu = np.full(n_c, -1, np.int64)  # the pivots behind wbuf's segment of each camera
        prev_col = np.empty((n_c, gmax), np.int64)
        prev_cnt = np.empty((n_c, gmax))
        stamp = 0
        done = 0  # rows ranked so far: just ahead of the probe, so its own row is still in cache for the output
        for pos in range(a, b):
            w0, w1 = lo[pos] - base, hi[pos] - base
            while done < w1:
                n_nan[s] += _topk_row(score[rows[done]], gstab, tloc, goff, kk, tv[done], ti[done], bmax, cv, ci)
                done += 1
            if n_nan[s]:
                break
            for c in range(n_c):
                m = min(k, (w1 - w0) * (goff[c + 1] - goff[c]))
                t = _threshold(tv, w0, w1, c, kk[c], m, buf)
                stamp += 1
                nu, total = _collect(score, tv, ti, rows, w0, w1, c, kk[c], goff[c + 1] - goff[c],
                                     gorder[goff[c] : goff[c + 1]], t, mark, slot, stamp, pcol, pcnt)
                same = nu == prev_nu[c]  # the previous probe's pivots, in the same order: same weights
                for e in range(nu):
                    if not same:
                        break
                    same = pcol[e] == prev_col[c, e] and pcnt[e] == prev_cnt[c, e]
                if same:
                    continue
                prev_nu[c] = nu
                prev_col[c, :nu] = pcol[:nu]
                prev_cnt[c, :nu] = pcnt[:nu]
                _weights(wbuf[goff[c] : goff[c + 1]], pcol, pcnt, nu, total, kern, goff[c], blo, bhi, boff, alpha)
            i = porder[pos]
            srow = score[i]
            orow = out[i]
            for l in range(n_g):
                orow[l] = wbuf[inv[l]] * np.float64(srow[l])
    return n_nan.sum()


@njit(parallel=True, cache=True)
def _row_topk(score, porder, gstab, tloc, goff, kk, topv, topi, n_s):  # pragma: no cover - compiled
    """Top-k lists (``_topk_row``) of all rows, at their sorted probe positions; returns the NaN count."""
    n_q, n_g = score.shape
    k = topv.shape[2]
    gmax = 1
    for c in range(len(kk)):
        gmax = max(gmax, goff[c + 1] - goff[c])
    n_nan = np.zeros(n_s, np.int64)
    for s in prange(n_s):
        cv = np.empty(gmax)
        ci = np.empty(gmax, np.int64)
        bmax = np.empty(2 * k)
        for w in range(s * n_q // n_s, (s + 1) * n_q // n_s):
            n_nan[s] += _topk_row(score[porder[w]], gstab, tloc, goff, kk, topv[w], topi[w], bmax, cv, ci)
    return n_nan.sum()


@njit(parallel=True, cache=True)
def _pivots(score, topv, topi, kk, k, goff, gorder, porder, lo, hi, p0, p1, thr, nuniq, tot, ptr, pcol, pcnt,
            fill, n_s):  # pragma: no cover - compiled
    """Thresholds and pivots of the probes at sorted positions [p0, p1), for every gallery camera (lists
    topv/topi at the sorted positions). ``fill=False``: sets ``thr``, ``tot`` (pivots counted with
    multiplicity, as the official mean does) and ``nuniq`` (distinct pivot columns), all [Q, C] by sorted
    position. ``fill=True``: writes the distinct pivot columns and counts at ``ptr[(pos - p0) * C + c]``."""
    n_c = len(kk)
    n = p1 - p0
    gmax = 1
    for c in range(n_c):
        gmax = max(gmax, goff[c + 1] - goff[c])
    for s in prange(n_s):
        mark = np.full(gmax, -1, np.int64)
        slot = np.zeros(gmax, np.int64)
        scol, scnt = np.empty(gmax, np.int64), np.empty(gmax)
        buf = np.empty(k)
        stamp = 0
        for pos in range(p0 + s * n // n_s, p0 + (s + 1) * n // n_s):
            w0, w1 = lo[pos], hi[pos]
            for c in range(n_c):
                gs = goff[c + 1] - goff[c]
                if fill:
                    t = thr[pos, c]
                    q = ptr[(pos - p0) * n_c + c]
                    dcol, dcnt = pcol[q:], pcnt[q:]
                else:
                    t = _threshold(topv, w0, w1, c, kk[c], min(k, (w1 - w0) * gs), buf)
                    thr[pos, c] = t
                    dcol, dcnt = scol, scnt
                stamp += 1
                nu, total = _collect(score, topv, topi, porder, w0, w1, c, kk[c], gs, gorder[goff[c] : goff[c + 1]],
                                     t, mark, slot, stamp, dcol, dcnt)
                if not fill:
                    nuniq[pos, c] = nu
                    tot[pos, c] = total


@njit(parallel=True, cache=True)
def _apply(score, out, g0, porder, p0, p1, ptr, pcol, pcnt, tot, kern, goff, blo, bhi, boff, coff, inv, alpha,
           n_s):  # pragma: no cover - compiled
    """out[i, g] = (sum_p count_p * kernel[p, g] / #pivots + alpha) * score[i, g] for the chunk's columns
    g0 + [0, len(inv)); the weights are formed in (camera, time) order and ``inv`` maps each column to its slot."""
    n_c = len(coff) - 1
    n = p1 - p0
    width = len(inv)
    for s in prange(n_s):
        wbuf = np.empty(width)
        prev_q = np.full(n_c, -1, np.int64)  # the pivot list behind wbuf's segment of each camera
        for pos in range(p0 + s * n // n_s, p0 + (s + 1) * n // n_s):
            for c in range(n_c):
                if coff[c + 1] > coff[c]:
                    q = ptr[(pos - p0) * n_c + c]
                    nu = ptr[(pos - p0) * n_c + c + 1] - q
                    r = prev_q[c]
                    same = r >= 0 and ptr[(r - p0) * n_c + c + 1] - ptr[(r - p0) * n_c + c] == nu
                    if same:  # the previous probe's pivots, in the same order: same weights
                        q2 = ptr[(r - p0) * n_c + c]
                        for e in range(nu):
                            if pcol[q + e] != pcol[q2 + e] or pcnt[q + e] != pcnt[q2 + e]:
                                same = False
                                break
                    if same:
                        continue
                    prev_q[c] = pos
                    _weights(wbuf[coff[c] : coff[c + 1]], pcol[q:], pcnt[q:], nu, tot[pos, c], kern, goff[c], blo,
                             bhi, boff, alpha)
            i = porder[pos]
            srow = score[i, g0 : g0 + width]
            orow = out[i, g0 : g0 + width]
            for l in range(width):
                orow[l] = wbuf[inv[l]] * np.float64(srow[l])


@njit(cache=True)
def _windows(tp, pcode, tau):  # pragma: no cover - compiled
    """For probes sorted by (camera, time): the range [lo, hi) of positions j with the same camera and
    ``|t_j - t_i| < tau`` (contiguous because the times are sorted)."""
    n = len(tp)
    lo = np.empty(n, np.int64)
    hi = np.empty(n, np.int64)
    a = 0
    b = 0
    for i in range(n):
        if i == 0 or pcode[i] != pcode[i - 1]:
            a = i
            b = i
        while abs(tp[a] - tp[i]) >= tau:
            a += 1
        if b < i + 1:
            b = i + 1
        while b < n and pcode[b] == pcode[i] and abs(tp[b] - tp[i]) < tau:
            b += 1
        lo[i] = a
        hi[i] = b
    return lo, hi


@njit(cache=True)
def _bands(tg, goff, tcol, coff, sigma2, cut, blo, bhi):  # pragma: no cover - compiled
    """Per gallery image p (rows, times ``tg`` sorted within each camera) the range [blo, bhi) of its camera's
    chunk columns (times ``tcol`` sorted within each camera at ``coff``) where the kernel exponent
    -(t_p - t)^2 / sigma^2 is >= -cut: contiguous, since the exponent rises then falls along sorted times."""
    n_c = len(goff) - 1
    for c in range(n_c):
        tc = tcol[coff[c] : coff[c + 1]]
        n = len(tc)
        a = 0
        b = 0
        for p in range(goff[c], goff[c + 1]):
            t = tg[p]
            while a < n and tc[a] < t and -((t - tc[a]) * (t - tc[a])) / sigma2 < -cut:
                a += 1
            if b < a:
                b = a
            while b < n and (tc[b] <= t or -((t - tc[b]) * (t - tc[b])) / sigma2 >= -cut):
                b += 1
            blo[p] = a
            bhi[p] = b


# exp(x) for x <= 0 as 2^j * p(r), x = j ln 2 + r, |r| <= ln 2 / 2, p the degree-13 Taylor polynomial (error
# under 1e-17 relative): written so that it vectorises (numpy's float64 exp is scalar without AVX-512); within
# about an ulp of np.exp. j is read from the low bits of x / ln 2 + 1.5 * 2^52, and 2^j built from its bits.
_MAGIC = 6755399441055744.0
_MAGIC_BITS = int(np.float64(_MAGIC).view(np.int64))
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693147180369123816490  # ln 2 in 32 bits: j * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_EXP_LOW = -700.0  # below this (subnormal or zero results) the library exp is used


@njit(cache=True, fastmath={"contract"})
def _exp_block(x, tf):  # pragma: no cover - compiled
    """x <- exp(x) in place, for x <= 0 (any, -inf included) and len(x) <= len(tf)."""
    n = len(x)
    tf = tf[:n]
    ti = tf.view(np.int64)
    low = 0
    for i in range(n):
        low += x[i] < _EXP_LOW
        tf[i] = x[i] * _LOG2E + _MAGIC
    if low:
        for i in range(n):
            x[i] = math.exp(x[i])
        return
    for i in range(n):
        j = tf[i] - _MAGIC
        r = (x[i] - j * _LN2_HI) - j * _LN2_LO
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        x[i] = p * r + 1.0
    for i in range(n):
        ti[i] = (ti[i] - _MAGIC_BITS + 1023) << 52
    for i in range(n):
        x[i] *= tf[i]


@njit(parallel=True, cache=True)
def _kernel_fill(tg, goff, tcol, coff, sigma2, blo, bhi, boff, kern, n_s):  # pragma: no cover - compiled
    """The kernel values exp(-(t_p - t)^2 / sigma^2) of each row's band, packed at ``boff[p]``; rows in n_s
    spans of about equal size."""
    n_c = len(goff) - 1
    n = goff[n_c]
    total = boff[n]
    for s in prange(n_s):
        tf = np.empty(512)
        c = 0
        p = np.searchsorted(boff, s * total // n_s)  # the rows whose values start in this span's share
        end = np.searchsorted(boff, (s + 1) * total // n_s)
        while p < end:
            while goff[c + 1] <= p:
                c += 1
            t = tg[p]
            lo = blo[p]
            tc = tcol[coff[c] + lo : coff[c] + bhi[p]]
            row = kern[boff[p] : boff[p] + len(tc)]
            for l in range(len(row)):
                d = t - tc[l]
                row[l] = -(d * d) / sigma2
            for b in range(0, len(row), len(tf)):
                _exp_block(row[b : b + len(tf)], tf)
            p += 1


def _n_spans(n: int) -> int:
    """Contiguous spans of work for ``n`` probes: a few per thread, for balance."""
    return max(1, min(n, 4 * numba.get_num_threads()))


def _kernel_chunk(g0, width, gcode, g_times, tg, goff, sigma2, cut, kern, limit=None, order=None):
    """The banded kernel of every gallery camera against the columns [g0, g0 + width): (kern, blo, bhi, boff,
    coff, inv), kern grown if needed; columns in (camera, time) order, ``inv`` the slot of each column.
    None if the bands hold more than ``limit`` values (then nothing is computed but the bands). ``order``: the
    chunk's columns in (camera, time) order, if the caller has it."""
    n_c = len(goff) - 1
    sub = gcode[g0 : g0 + width]
    if order is None:
        order = _by_code_time(sub, n_c, g_times[g0 : g0 + width])
    inv = np.empty(len(sub), np.uint32)  # unsigned indices: no negative-index wrap-around in the compiled loops
    inv[order] = np.arange(len(sub), dtype=np.uint32)
    coff = np.concatenate([[0], np.cumsum(np.bincount(sub, minlength=n_c))]).astype(np.int64)
    tcol = g_times[g0 + order]
    n_rows = int(goff[-1])
    blo, bhi = np.empty(n_rows, np.int64), np.empty(n_rows, np.int64)
    _bands(tg, goff, tcol, coff, sigma2, cut, blo, bhi)
    boff = np.concatenate([[0], np.cumsum(bhi - blo)]).astype(np.int64)
    size = int(boff[-1])
    if limit is not None and size > limit:
        return None
    if size > len(kern):
        kern = np.empty(size)
    _kernel_fill(tg, goff, tcol, coff, sigma2, blo, bhi, boff, kern, _n_spans(n_rows))
    return kern, blo, bhi, boff, coff, inv


def _codes(ids: np.ndarray) -> np.ndarray:
    """Ids -> codes 0..C-1 in sorted id order (np.unique's inverse), int64; by a table for integer ids that
    span fewer than 2^16 values (no sort)."""
    if np.issubdtype(ids.dtype, np.integer) and len(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if hi - lo < 1 << 16:  # offsets in int64, or in the unsigned type (no overflow either way)
            off = (ids - ids.min()).astype(np.int64) if ids.dtype.kind == "u" else ids.astype(np.int64) - lo
            seen = np.zeros(hi - lo + 1, np.int64)
            seen[off] = 1
            return (np.cumsum(seen) - 1)[off]
    return np.unique(ids, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _by_code(code: np.ndarray, n_codes: int) -> np.ndarray:
    """Stable order of ``code`` (0..n_codes-1): numpy radix-sorts 16-bit keys."""
    return np.argsort(code.astype(np.int16) if n_codes < 1 << 15 else code, kind="stable")


def _by_code_time(code: np.ndarray, n_codes: int, times: np.ndarray) -> np.ndarray:
    """Order by code, then time, ties in the given order: ``np.lexsort((times, code))``, as two stable sorts."""
    order = np.argsort(times, kind="stable")
    return order[_by_code(code[order], n_codes)]


def _check(score, q_cams, q_times, g_cams, g_times, tau, sigma, k):
    score = np.asarray(score)
    if score.ndim != 2:
        raise QAConvError(f"tlift: score must be 2-D [Q, G], got shape {score.shape}")
    if not (np.issubdtype(score.dtype, np.floating) or np.issubdtype(score.dtype, np.integer)):
        raise QAConvError(f"tlift: score must be a real number array, got dtype {score.dtype}")
    n_q, n_g = score.shape
    arrays = []
    for name, arr, n, time in (("q_cams", q_cams, n_q, False), ("q_times", q_times, n_q, True),
                               ("g_cams", g_cams, n_g, False), ("g_times", g_times, n_g, True)):
        arr = np.asarray(arr).reshape(-1)
        if len(arr) != n:
            raise QAConvError(f"tlift: {name} has {len(arr)} entries, expected {n} to match score {score.shape}")
        if time:
            arr = arr.astype(np.float64)
            if not np.isfinite(arr).all():
                raise QAConvError(f"tlift: {name} must be finite time stamps in seconds")
        arrays.append(arr)
    if int(k) != k or k < 1:
        raise QAConvError(f"tlift: k must be an integer >= 1, got {k}")
    if not (tau > 0 and np.isfinite(tau)):
        raise QAConvError(f"tlift: tau must be a positive number of seconds, got {tau}")
    if not (sigma > 0 and np.isfinite(sigma)):
        raise QAConvError(f"tlift: sigma must be a positive number of seconds, got {sigma}")
    return score, *arrays


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
        score: [Q, G] similarities (see the module docstring for the expected scale); no NaN.
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
        With ``alpha > 0`` kernel values under ``alpha * 2^-60`` are left out, which moves no output by more
        than 2^-60 relative; with ``alpha <= 0`` none are.

    Raises:
        QAConvError: a malformed argument (shape, length, NaN score, non-finite time, k < 1, tau or sigma <= 0).

    Differences from the official code, both only where it would fail or silently skip: camera ids are
    mapped rather than required to be 0-based contiguous, a gallery camera with no images is skipped
    (the official code indexes an empty array), and probes of a camera the gallery does not have are
    lifted like any other (the official loop only visits cameras ``< max gallery cam + 1``).
    """
    score, q_cams, q_times, g_cams, g_times = _check(score, q_cams, q_times, g_cams, g_times, tau, sigma, k)
    k = int(k)
    out_dtype = score.dtype if np.issubdtype(score.dtype, np.floating) else np.dtype(np.float64)
    work = score if score.dtype in (np.float32, np.float64) else score.astype(np.float64)
    work = np.ascontiguousarray(work)
    n_q, n_g = work.shape
    out = np.empty((n_q, n_g), dtype=work.dtype)
    if n_q == 0 or n_g == 0:
        return out.astype(out_dtype, copy=False)
    # gallery cameras 0..C-1; columns grouped by camera and sorted by time within it (gorder)
    gcode = _codes(g_cams)
    gsize = np.bincount(gcode).astype(np.int64)
    n_c = len(gsize)
    goff = np.concatenate([[0], np.cumsum(gsize)]).astype(np.int64)
    gorder = _by_code_time(gcode, n_c, g_times).astype(np.int64)  # by camera, then time
    gstab = _by_code(gcode, n_c).astype(np.uint32)  # by camera, else in the given order (unsigned: see inv)
    tpos = np.empty(n_g, np.int64)
    tpos[gorder] = np.arange(n_g) - goff[gcode[gorder]]
    tloc = tpos[gstab]  # position in its camera's time order, in gstab order
    tg = g_times[gorder]
    kk = np.minimum(k, gsize).astype(np.int64)
    # probes sorted by (camera, time); co-occurrence windows in that order
    pcode = _codes(q_cams)
    porder = _by_code_time(pcode, int(pcode.max()) + 1, q_times).astype(np.int64)
    # kernel values below alpha * 2^-60 change no output by more than 2^-60 relative: left out
    cut = 60 * np.log(2.0) - np.log(alpha) if alpha > 0 else np.inf
    sigma2 = float(sigma) ** 2
    nan = QAConvError("tlift: score has NaN entries; expected finite similarities")
    with _LOCK:
        lo, hi = _windows(q_times[porder], pcode[porder].astype(np.int64), float(tau))
        n_s = _n_spans(n_q)
        cuts = np.arange(n_s + 1) * n_q // n_s
        ranked = int((hi[cuts[1:] - 1] - lo[cuts[:-1]]).sum())  # rows ranked by the spans of the one-pass path
        one = None
        if ranked <= 2 * n_q:  # (windows much wider than a span would have each span rank them again)
            one = _kernel_chunk(0, n_g, gcode, g_times, tg, goff, sigma2, cut, np.empty(0), _KERNEL_ELEMS, gorder)
        if one is not None:  # all cameras' banded kernels fit one chunk: everything in one pass
            kern, blo, bhi, boff, _, inv = one
            if _fused(work, out, gstab, tloc, goff, gorder, kk, k, porder, lo, hi, kern, blo, bhi, boff, inv,
                      float(alpha), n_s):
                raise nan
            return out.astype(out_dtype, copy=False)
        width = max(1, _KERNEL_ELEMS // int(gsize.max()))  # columns per kernel chunk (any band)
        topv, topi = np.full((n_q, n_c, k), -np.inf), np.full((n_q, n_c, k), -1, np.int64)
        if _row_topk(work, porder, gstab, tloc, goff, kk, topv, topi, _n_spans(n_q)):
            raise nan
        thr = np.zeros((n_q, n_c))
        tot = np.zeros((n_q, n_c))
        nuniq = np.zeros((n_q, n_c), np.int64)
        none_i, none_f = np.zeros(1, np.int64), np.zeros(1)
        _pivots(work, topv, topi, kk, k, goff, gorder, porder, lo, hi, 0, n_q, thr, nuniq, tot, none_i, none_i,
                none_f, False, _n_spans(n_q))
        per_probe = nuniq.sum(axis=1)
        bounds = [0]
        acc = 0
        for pos, m in enumerate(per_probe):  # probe groups whose pivot lists fit in _PIVOT_ELEMS
            if acc + m > _PIVOT_ELEMS and pos > bounds[-1]:
                bounds.append(pos)
                acc = 0
            acc += m
        bounds.append(n_q)
        kern = np.empty(0)
        for p0, p1 in zip(bounds[:-1], bounds[1:], strict=True):
            ptr = np.concatenate([[0], np.cumsum(nuniq[p0:p1].reshape(-1))]).astype(np.int64)
            pcol = np.empty(ptr[-1], np.int64)
            pcnt = np.empty(ptr[-1])
            _pivots(work, topv, topi, kk, k, goff, gorder, porder, lo, hi, p0, p1, thr, nuniq, tot, ptr, pcol, pcnt,
                    True, _n_spans(p1 - p0))
            for g0 in range(0, n_g, width):
                kern, blo, bhi, boff, coff, inv = _kernel_chunk(g0, width, gcode, g_times, tg, goff, sigma2, cut, kern)
                _apply(work, out, g0, porder, p0, p1, ptr, pcol, pcnt, tot, kern, goff, blo, bhi, boff, coff, inv,
                       float(alpha), _n_spans(p1 - p0))
    return out.astype(out_dtype, copy=False)
