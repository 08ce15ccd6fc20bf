"""Searching a store's rows: filters, the pooled-cosine first stage, exact QAConv re-scoring, TLift.

Everything here works on a :class:`~qaconv.gallery.store.Rows` view (the in-memory columns) and a ``take``
function that reads the float16 maps of given row positions, so only the rows that are re-scored are read.

* Filters (:func:`allowed_rows`): cameras (labels) and a time window ``(start, end)`` in seconds, both ends
  inclusive (rows without a time are left out when a window is given); ``exclude_same_camera`` drops, per
  query, the rows of the query's own camera (rows of unknown camera stay).
* Exhaustive (every allowed row scored by :class:`~qaconv.matching.Matcher`, in blocks of
  :data:`EXHAUSTIVE_BLOCK` rows) when asked, or when no more than ``candidates`` rows are allowed; else two
  stages: the ``candidates`` (M) allowed rows of best pooled cosine (a matrix product over the in-memory
  pooled vectors, blocks of :data:`FIRST_STAGE_BLOCK`), then exact QAConv logits of those M by
  :func:`qaconv.gallery.search._rescore` (the folded head), for :data:`RESCORE_QUERIES` queries at a time.
* Tracklets (:func:`search_groups`): a query may be a group of crops and the results groups of entries (one
  camera, one track label); a group pair's score is the max or mean of the exact logits of its crop pairs.
  Two stages here: each query crop's M best by pooled cosine, the union per query, widened to whole gallery
  tracklets when results are tracklets, then every crop pair of that union scored exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ..errors import QAConvError
from ..matching import DEFAULT_MEMORY, Matcher, pick_device
from ..models.pooled import PooledCosine
from .meta import TIME_NAME, assign_cam_ids, market_times, parse_name
from .search import _rescore

FIRST_STAGE_BLOCK = 65536  # pooled vectors per matrix product of the first stage
EXHAUSTIVE_BLOCK = 4096  # gallery maps read and scored at a time by the exhaustive search
RESCORE_QUERIES = 16  # queries whose candidates are read and re-scored together

Take = Callable[[object, np.ndarray], np.ndarray]


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing the memory of ``a`` (read-only Arrow memory is never written here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def allowed_rows(rows, cameras=None, time_window=None) -> np.ndarray:
    """Boolean mask ``[n]`` of the rows passing the camera and time-window filters (all True without filters).

    ``cameras``: camera labels (e.g. ``["c1", "front"]``; integers are read as their text); ``time_window``:
    ``(start, end)`` seconds, either None for open, both inclusive."""
    ok = np.ones(rows.n, dtype=bool)
    if cameras is not None:
        if isinstance(cameras, (str, int)):
            cameras = [cameras]
        ids = [rows.label_ids[str(c)] for c in cameras if str(c) in rows.label_ids]
        ok &= np.isin(rows.cams, np.asarray(ids, dtype=np.int64))
    if time_window is not None:
        start, end = _window(time_window)
        t = rows.times
        ok &= np.isfinite(t) & (t >= start) & (t <= end)
    return ok


def _window(time_window) -> tuple[float, float]:
    try:
        start, end = time_window
        start = -math.inf if start is None else float(start)
        end = math.inf if end is None else float(end)
    except (TypeError, ValueError):
        raise QAConvError(f"time_window must be (start, end) in seconds (None for open), got {time_window!r}") from None
    if math.isnan(start) or math.isnan(end) or start > end:
        raise QAConvError(f"time_window must be (start, end) with start <= end, got {time_window!r}")
    return start, end


def query_cams(rows, labels) -> np.ndarray:
    """Integer camera ids of query camera ``labels`` in the store's numbering ('' = unknown = -1; labels the
    store does not have get ids of their own)."""
    ids, _ = assign_cam_ids([str(x) if x is not None else "" for x in labels], rows.label_ids)
    return ids


def query_metadata(rows, names, cam_labels=None, times=None):
    """``(pids, cam ids, cam labels, times, gallery times)`` of queries, for display and TLift.

    Cameras and times come from Market-style names unless given (``cam_labels``: one label per query;
    ``times``: seconds per query). Name times are chained over the session frames of the store's and the
    queries' Market names together (official convention: over all splits), so the returned gallery times
    re-chain the store's Market-name rows over the same frames; other times stay as stored.
    """
    metas = [parse_name(str(n)) for n in names]
    labels = [str(c) for c in cam_labels] if cam_labels is not None else [m.cam_label for m in metas]
    q_cams = query_cams(rows, labels)
    pids = np.array([m.pid for m in metas], dtype=np.int64)
    if times is not None:
        return pids, q_cams, labels, np.asarray(times, dtype=np.float64), rows.times
    n = rows.n
    g_labels = np.array([rows.label(c) for c in rows.cams], dtype=object) if n else np.zeros(0, dtype=object)
    t = market_times(np.concatenate((g_labels, [m.cam_label for m in metas])),
                     np.concatenate((rows.sessions, [m.session for m in metas])),
                     np.concatenate((rows.frames, [m.frame for m in metas])),
                     np.concatenate((rows.sources, [m.time_source for m in metas])))
    g_times = np.where(rows.sources == TIME_NAME, t[:n], rows.times)
    return pids, q_cams, labels, t[n:], g_times


def first_stage(rows, query_maps: torch.Tensor, m: int, allowed: np.ndarray, q_cams=None):
    """``(positions [Q, m] int64, valid [Q, m] bool)``: per query the ``m`` allowed rows of best pooled cosine,
    best first (``valid`` is False past a query's allowed rows, e.g. with ``q_cams`` = exclude those cameras)."""
    q = PooledCosine.embed(query_maps.float().cpu())  # [Q, C]
    num_q = len(q)
    pooled = _tensor(rows.pooled)
    blocked = None if allowed.all() else torch.from_numpy(~allowed)
    cams = _tensor(np.ascontiguousarray(rows.cams))
    qc = None if q_cams is None else torch.as_tensor(np.asarray(q_cams, dtype=np.int64)).unsqueeze(1)
    top_s = torch.full((num_q, 0), -math.inf)
    top_i = torch.zeros((num_q, 0), dtype=torch.int64)
    for g0 in range(0, rows.n, FIRST_STAGE_BLOCK):
        g1 = min(g0 + FIRST_STAGE_BLOCK, rows.n)
        s = q @ pooled[g0:g1].t()  # [Q, b]
        if blocked is not None:
            s.masked_fill_(blocked[g0:g1], -math.inf)
        if qc is not None:
            s.masked_fill_(cams[g0:g1] == qc, -math.inf)
        bs, bi = s.topk(min(m, g1 - g0), dim=1)  # the block's best, then merged with the best so far (small)
        top_s, pos = torch.cat((top_s, bs), dim=1).topk(min(m, top_s.shape[1] + bs.shape[1]), dim=1)
        top_i = torch.cat((top_i, bi + g0), dim=1).gather(1, pos)
    return top_i.numpy(), torch.isfinite(top_s).numpy()


def _merge_top(best_s, best_i, s, i, k):
    s, i = torch.cat((best_s, s), 1), torch.cat((best_i, i), 1)
    best_s, pos = s.topk(min(k, s.shape[1]), dim=1)
    return best_s, i.gather(1, pos)


def _camera_mask(rows, positions: np.ndarray, q_cams) -> torch.Tensor | None:
    if q_cams is None:
        return None
    return torch.from_numpy(rows.cams[positions][None, :] == np.asarray(q_cams, dtype=np.int64)[:, None])


def _exhaustive(rows, take: Take, head, q, k, positions, q_cams, dev, memory):
    engine = Matcher(head, dev, memory=memory)
    best_s = torch.full((len(q), 0), -math.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.int64)
    for b0 in range(0, len(positions), EXHAUSTIVE_BLOCK):
        pos = positions[b0 : b0 + EXHAUSTIVE_BLOCK]
        s = engine.scores(q, torch.from_numpy(take(rows, pos)).float()).float().cpu()
        mask = _camera_mask(rows, pos, q_cams)
        if mask is not None:
            s.masked_fill_(mask, -math.inf)
        best_s, best_i = _merge_top(best_s, best_i, s, torch.from_numpy(pos).expand(len(q), -1), k)
    return best_s.numpy(), best_i.numpy()


def _two_stage(rows, take: Take, head, q, k, m, allowed, q_cams, dev, memory):
    cand, valid = first_stage(rows, q, m, allowed, q_cams)
    cand = np.where(valid, cand, cand[:, :1])  # slots past a query's allowed rows: re-read nothing new
    out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    for q0 in range(0, len(q), RESCORE_QUERIES):
        c, v = cand[q0 : q0 + RESCORE_QUERIES], valid[q0 : q0 + RESCORE_QUERIES]
        uniq, local = np.unique(c, return_inverse=True)
        gal = torch.from_numpy(take(rows, uniq)).float()
        s = _rescore(head, q[q0 : q0 + len(c)], gal, torch.from_numpy(local.reshape(c.shape)), dev, memory)
        s.masked_fill_(torch.from_numpy(~v), -math.inf)
        top_s, pos = s.topk(min(k, s.shape[1]), dim=1)
        out_s[q0 : q0 + len(c), : top_s.shape[1]] = top_s.numpy()
        out_i[q0 : q0 + len(c), : top_s.shape[1]] = np.take_along_axis(c, pos.numpy(), axis=1)
    return out_s, out_i


@torch.inference_mode()
def search_rows(rows, take: Take, head, query_maps: torch.Tensor, k: int = 10, candidates: int = 100,
                allowed: np.ndarray | None = None, q_cams=None, exhaustive: bool | None = None,
                device=None, memory: int | None = None):
    """Top-``k`` allowed rows per query: ``(logits [Q, k] float32, positions [Q, k] int64)``, best first.

    Rows past a query's allowed ones are padded with ``-inf`` / ``-1``. ``q_cams``: per query, a camera id whose
    rows are left out (exclude same camera). ``exhaustive``: None = when at most ``candidates`` rows are
    allowed, True = always, False = always two stages (M capped at the allowed rows). Logits are exact
    eval-mode QAConv logits (the head must be in eval mode).
    """
    if k < 1 or candidates < 1:
        raise QAConvError(f"top and candidates must be >= 1, got {k} and {candidates}")
    allowed = np.ones(rows.n, dtype=bool) if allowed is None else allowed
    positions = np.flatnonzero(allowed)
    q = query_maps.float()
    dev = pick_device(device)
    memory = int(DEFAULT_MEMORY if memory is None else memory)
    if len(positions) == 0 or len(q) == 0:
        return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    kk = min(k, len(positions))
    if exhaustive or (exhaustive is None and len(positions) <= candidates):
        s, i = _exhaustive(rows, take, head, q, kk, positions, q_cams, dev, memory)
    else:
        s, i = _two_stage(rows, take, head, q, kk, min(max(candidates, kk), len(positions)), allowed, q_cams, dev,
                          memory)
    i = np.where(np.isfinite(s), i, -1)
    pad = k - kk
    return np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf), np.pad(i, ((0, 0), (0, pad)), constant_values=-1)


@torch.inference_mode()
def tlift_rows(rows, take: Take, head, query_maps: torch.Tensor, q_cams, q_times, g_times, k: int = 10,
               candidates: int = 100, allowed: np.ndarray | None = None, exhaustive: bool | None = None,
               device=None, memory: int | None = None, tau: float = 100.0, sigma: float = 200.0,
               tlift_k: int = 10, alpha: float = 0.2, exclude_cams=None):
    """Top-``k`` allowed rows by TLift-lifted similarity: ``(lifted [Q, k] float64, positions [Q, k] int64)``.

    QAConv logits are mapped to sigma(logit), as the official TLift docstring prescribes for raw QAConv
    scores, and lifted with :func:`qaconv.tlift.tlift` using the query cameras / times and the rows' cameras
    and ``g_times``. Over all allowed rows when ``exhaustive`` (or None and at most ``candidates`` are allowed),
    else over the union of the queries' pooled-cosine shortlists (exact when pivots and ranks fall inside it).
    ``exclude_cams``: per query a camera id whose rows are left out of its ranking after lifting (as re-ID
    evaluation drops same-camera entries; -2: none); positions past a query's remaining rows are -1.
    """
    from ..engine.evaluator import logit_to_similarity
    from ..tlift import tlift

    allowed = np.ones(rows.n, dtype=bool) if allowed is None else allowed
    positions = np.flatnonzero(allowed)
    g_times = np.asarray(g_times, dtype=np.float64)
    untimed = ~np.isfinite(g_times[positions]) | (rows.cams[positions] < 0)
    if len(positions) == 0 or untimed.any():
        raise QAConvError(f"TLift needs a camera and time stamp for every gallery image; {int(untimed.sum())} of "
                          f"{len(positions)} in this store have none (use Market-style names or a manifest with a "
                          "'time' column)")
    q_cams, q_times = np.asarray(q_cams, dtype=np.int64), np.asarray(q_times, dtype=np.float64)
    if len(q_cams) != len(query_maps) or len(q_times) != len(query_maps) or not np.isfinite(q_times).all() \
            or (q_cams < 0).any():
        raise QAConvError("TLift needs a camera and a time stamp for every query")
    q = query_maps.float()
    dev = pick_device(device)
    if not (exhaustive or (exhaustive is None and len(positions) <= candidates)):
        cand, valid = first_stage(rows, q, min(candidates, len(positions)), allowed)
        positions = np.unique(cand[valid])
    engine = Matcher(head, dev, memory=memory)
    logits = np.concatenate([engine.scores(q, torch.from_numpy(take(rows, positions[c : c + EXHAUSTIVE_BLOCK]))
                                           .float()).float().cpu().numpy()
                             for c in range(0, len(positions), EXHAUSTIVE_BLOCK)], axis=1)
    lifted = tlift(logit_to_similarity(logits, scale=1.0), q_cams, q_times, rows.cams[positions],
                   g_times[positions], tau=tau, sigma=sigma, k=tlift_k, alpha=alpha)
    if exclude_cams is not None:
        same = rows.cams[positions][None, :] == np.asarray(exclude_cams, dtype=np.int64)[:, None]
        lifted = np.where(same, -np.inf, lifted)
    order = np.argsort(-lifted, axis=1, kind="stable")[:, : min(int(k), len(positions))]
    top = np.take_along_axis(lifted, order, axis=1)
    return top, np.where(np.isfinite(top), positions[order], -1)


def entry(rows, g: int, times=None) -> dict:
    """What is known of the row at position ``g``, JSON-ready: path, pid, cam (label), row (the entry's stable
    id), time (seconds), track; unknown values are None."""
    times = rows.times if times is None else times
    pid = int(rows.pids[g])
    return {"path": str(rows.paths[g]), "pid": pid if pid >= 0 else None, "cam": rows.label(rows.cams[g]) or None,
            "row": int(rows.ids[g]), "time": float(times[g]) if np.isfinite(times[g]) else None,
            "track": rows.tracks[g] or None}


def hits(rows, scores: np.ndarray, positions: np.ndarray) -> list[list[dict]]:
    """Per query, its results as JSON-ready dicts: rank (1-based), score, then :func:`entry` (path, pid, cam,
    row, time, track; None when unknown); padding (-1) left out."""
    times = rows.times
    return [[{"rank": r + 1, "score": float(s), **entry(rows, g, times)}
             for r, (s, g) in enumerate(zip(srow, prow, strict=True)) if g >= 0]
            for srow, prow in zip(scores, positions, strict=True)]


# -- tracklets ------------------------------------------------------------------------------------------------------
AGGREGATES = ("mean", "max")


def _reduce(values: np.ndarray, gid: np.ndarray, how: str) -> np.ndarray:
    """``values`` [A, B] reduced over axis 0 by the group ids ``gid`` [A] (0..G-1, each present): [G, B]."""
    order = np.argsort(gid, kind="stable")
    sgid = gid[order]
    starts = np.flatnonzero(np.r_[True, sgid[1:] != sgid[:-1]])
    v = values[order]
    if how == "max":
        return np.maximum.reduceat(v, starts, axis=0)
    counts = np.diff(np.r_[starts, len(sgid)])
    with np.errstate(invalid="ignore"):
        return np.add.reduceat(v.astype(np.float64), starts, axis=0) / counts[:, None]


def _over_queries(s: np.ndarray, q_gid: np.ndarray, nq: int, how: str):
    """Logits ``s`` [A crops, B rows] -> (aggregated [nq, B], best crop logit [nq, B], its crop index [nq, B])."""
    best_i = np.empty((nq, s.shape[1]), dtype=np.int64)
    best = np.empty((nq, s.shape[1]), dtype=np.float32)
    for g in range(nq):
        idx = np.flatnonzero(q_gid == g)
        j = s[idx].argmax(axis=0)
        best_i[g], best[g] = idx[j], s[idx[j], np.arange(s.shape[1])]
    agg = best if how == "max" else _reduce(s, q_gid, how).astype(np.float32)
    return agg, best, best_i


def _rank(agg, best, best_i, positions, g_gid, how, k, excluded):
    """One query group's top-``k`` gallery groups among ``positions``: [(score, best position, best crop,
    best pair logit, crops)]."""
    keep = ~excluded
    if not keep.any():
        return []
    agg, best, best_i, positions = agg[keep], best[keep], best_i[keep], positions[keep]
    local, inverse = np.unique(g_gid[positions], return_inverse=True)
    inverse = inverse.reshape(-1)
    score = _reduce(agg[:, None], inverse, how)[:, 0]
    counts = np.bincount(inverse, minlength=len(local))
    out = []
    for h in np.argsort(-score, kind="stable")[:k]:
        cols = np.flatnonzero(inverse == h)
        c = cols[best[cols].argmax()]
        out.append((float(score[h]), int(positions[c]), int(best_i[c]), float(best[c]), int(counts[h])))
    return out


@torch.inference_mode()
def search_groups(rows, take: Take, head, query_maps: torch.Tensor, q_gid: np.ndarray, q_cams, k: int = 10,
                  candidates: int = 100, allowed: np.ndarray | None = None, by_track: bool = False,
                  how: str = "mean", exhaustive: bool | None = None, device=None, memory: int | None = None):
    """Top-``k`` gallery groups per query group: per group of query crops (``q_gid`` [A]: 0..G-1 per crop), a list
    of ``(score, best row position, best query crop, best pair logit, crops aggregated)``, best first.

    Gallery groups are the rows' tracklets (:attr:`Rows.groups`) when ``by_track``, else single rows. A group
    pair's score is the ``how`` (``mean`` or ``max``) of the exact logits of its crop pairs (crops passing the
    filters). ``q_cams``: per query group a camera id whose rows are left out (-2: none). ``exhaustive`` as
    :func:`search_rows`; else the union of the query crops' ``candidates`` best allowed rows by pooled cosine,
    widened to whole tracklets when ``by_track``, is scored exactly.
    """
    if how not in AGGREGATES:
        raise QAConvError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")
    if k < 1 or candidates < 1:
        raise QAConvError(f"top and candidates must be >= 1, got {k} and {candidates}")
    allowed = np.ones(rows.n, dtype=bool) if allowed is None else allowed
    q_gid = np.asarray(q_gid, dtype=np.int64)
    nq = int(q_gid.max()) + 1 if len(q_gid) else 0
    q_cams = np.full(nq, -2, dtype=np.int64) if q_cams is None else np.asarray(q_cams, dtype=np.int64)
    positions = np.flatnonzero(allowed)
    if len(positions) == 0 or nq == 0:
        return [[] for _ in range(nq)]
    q = query_maps.float()
    dev = pick_device(device)
    engine = Matcher(head, dev, memory=int(DEFAULT_MEMORY if memory is None else memory))
    g_gid = rows.groups[0] if by_track else np.arange(rows.n)

    def scored(crops, pos):
        groups, local = np.unique(q_gid[crops], return_inverse=True)  # the crops' groups, numbered 0..n-1
        parts = []
        for b0 in range(0, len(pos), EXHAUSTIVE_BLOCK):
            maps = torch.from_numpy(take(rows, pos[b0 : b0 + EXHAUSTIVE_BLOCK])).float()
            logits = engine.scores(q[crops], maps).float().cpu().numpy()
            parts.append(_over_queries(logits, local.reshape(-1), len(groups), how))
        return [np.concatenate([p[i] for p in parts], axis=1) for i in range(3)]

    out = []
    if exhaustive or (exhaustive is None and len(positions) <= candidates):
        agg, best, best_i = scored(np.arange(len(q)), positions)
        cams = rows.cams[positions]
        for g in range(nq):
            out.append(_rank(agg[g], best[g], best_i[g], positions, g_gid, how, k, cams == q_cams[g]))
        return out
    m = min(candidates, len(positions))
    for g in range(nq):
        crops = np.flatnonzero(q_gid == g)
        cand, valid = first_stage(rows, q[crops], m, allowed, np.full(len(crops), q_cams[g]))
        pos = np.unique(cand[valid])
        if by_track and len(pos):
            pos = positions[np.isin(g_gid[positions], g_gid[pos])]
        if not len(pos):
            out.append([])
            continue
        agg, best, best_i = scored(crops, pos)
        out.append(_rank(agg[0], best[0], crops[best_i[0]], pos, g_gid, how, k, rows.cams[pos] == q_cams[g]))
    return out

