"""Evaluation of a trained model on test sets: scores, optional re-ranking and TLift, metrics, tables
and saved score files."""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from ..atomic import atomic_write
from ..choices import RERANK_INPUTS
from ..data.images import scan_images
from ..data.registry import load_dataset
from ..data.validate import check_evaluable
from ..errors import QAConvError
from ..matching import fold_head, pick_device
from ..metrics import RankResult, evaluate_rank
from ..models.pooled import PooledCosine
from ..names import safe_stem, short_names
from ..progress import progress_bar
from ..rerank import candidate_lists, k_reciprocal_knn
from .distributed import (
    all_gather_rows,
    extract_features_sharded,
    init_from_env,
    is_main,
    main_first,
    pairwise_scores_sharded,
    rank,
    split_range,
    world_size,
)
from .trainer import append_jsonl

# Post-processing defaults: the official ECCV protocol (k-reciprocal 20/6/0.3, TLift tau 100 s,
# sigma 200 s, K 10, alpha 0.2).
POST_DEFAULTS: dict = {
    "rerank": False,  # +RR row
    "tlift": False,  # +RR and +RR+TLift rows (the official --do_tlift: TLift only ever lifts the re-ranked score)
    "tlift_direct": False,  # extra row TLIFT_DIRECT: TLift on sigma(logit) without re-ranking (not official)
    "rerank_input": "sigmoid",  # distances re-ranked: "sigmoid" 1 - sigma(logit/10) (tags v1.0-v2.1), "logit" -logit
    "save_scores": False,
    "k1": 20,
    "k2": 6,
    "lambda_value": 0.3,
    "tau": 100.0,
    "sigma": 200.0,
    "tlift_k": 10,
    "alpha": 0.2,
    "rerank_dense_max": 30000,  # above this many query+gallery images, re-rank from kNN lists (bounded memory)
    "two_stage": 0,  # > 0: pooled-cosine shortlist of this many gallery items per query, QAConv re-scores it
    "report": None,  # folder for the HTML report (qaconv.report)
    "report_queries": 10,  # worst and random queries shown per test set
}

# Post-processing row labels ('' = plain QAConv). TLIFT_DIRECT is not part of the official protocol.
RR, RR_TLIFT, TLIFT_DIRECT = "+RR", "+RR+TLift", "+TLift(unofficial)"


def logit_to_similarity(logits: np.ndarray, scale: float = 10.0) -> np.ndarray:
    """QAConv logits to [0, 1] similarities sigma(logit / scale): scale 10 is the official evaluators' convention
    (tags v1.0-v2.1), scale 1 what the TLift docstring prescribes for lifting raw QAConv scores."""
    return expit(np.asarray(logits, dtype=np.float64) / scale)


def logit_distance(logits: np.ndarray, convention: str = "sigmoid") -> np.ndarray:
    """The official evaluator's distance for a ``rerank_input`` convention: 1 - sigma(logit / 10) ("sigmoid",
    tags v1.0-v2.1, float64) or -logit ("logit", latest commit; may be negative)."""
    if convention == "sigmoid":
        return 1.0 - logit_to_similarity(logits)
    if convention == "logit":
        return -np.asarray(logits)
    raise QAConvError(f"rerank_input must be one of {', '.join(RERANK_INPUTS)}, got {convention!r}")


def rerank_distances(s_qg: np.ndarray, score_fn, num_query: int, opts: dict) -> np.ndarray:
    """k-reciprocal re-ranked [Q, G] distances of :func:`logit_distance` (``opts['rerank_input']``).

    ``score_fn(rows, cols)`` returns the logits between two index ranges/arrays of the stacked
    query+gallery set. Up to ``rerank_dense_max`` images the dense form is used; beyond, neighbour lists
    are streamed column block by column block, so memory stays O(N * k1) plus the [Q, G] output. Both
    assemble D as the official evaluators do, ``[[qq, qg], [qg.T, gg]]`` with ``qg`` = ``s_qg`` (this matters
    for the asymmetric heads of versions 1.x and 2.0). With
    "logit" the column maxima of -logit may be negative (dividing by them reverses a column's order), as in
    the latest official commit."""
    from ..rerank import k_reciprocal, k_reciprocal_knn, knn_lists

    def dist(logits):
        return logit_distance(logits, opts["rerank_input"])

    def checked(col_max: np.ndarray) -> None:
        if not (np.isfinite(col_max).all() and (col_max != 0).all()):
            raise QAConvError(f"re-ranking ({opts['rerank_input']} input): a column maximum of the distance matrix is "
                              "0 or not finite, so the column normalisation is undefined; use rerank_input 'sigmoid'")

    q, n = num_query, num_query + s_qg.shape[1]
    kw = dict(k1=opts["k1"], k2=opts["k2"], lambda_value=opts["lambda_value"])
    if n <= opts["rerank_dense_max"]:
        d_qg = dist(s_qg)
        d_qq, d_gg = dist(score_fn(slice(0, q), slice(0, q))), dist(score_fn(slice(q, n), slice(q, n)))
        checked(np.concatenate([np.maximum(d_qq.max(0), d_qg.max(1)), np.maximum(d_qg.max(0), d_gg.max(0))]))
        return k_reciprocal(d_qg, d_qq, d_gg, **kw)
    def column_block(a: int, b: int) -> np.ndarray:
        """D[:, a:b] as the official code assembles D: [[qq, qg], [qg.T, gg]] (qg = s_qg, whatever the head)."""
        logits = np.empty((n, b - a), dtype=np.float32)
        qa, qb, ga = min(a, q), min(b, q), max(a, q)
        if qb > qa:  # query columns
            logits[:q, : qb - qa] = score_fn(slice(0, q), slice(qa, qb))
            logits[q:, : qb - qa] = s_qg[qa:qb].T
        if b > ga:  # gallery columns
            logits[:q, ga - a :] = s_qg[:, ga - q : b - q]
            logits[q:, ga - a :] = score_fn(slice(q, n), slice(ga, b))
        block = dist(logits)
        checked(block.max(axis=0))
        return block

    lists = knn_lists(column_block, n, max(opts["k1"] + 1, opts["k2"]))

    def pair_dist(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """D[rows, cols] element-wise, in the orientation of column_block."""
        out = np.empty(len(rows), dtype=np.float64)
        mixed = (rows < q) != (cols < q)
        if mixed.any():  # query-gallery pairs: s_qg[query, gallery]
            r, c = rows[mixed], cols[mixed]
            out[mixed] = dist(s_qg[np.minimum(r, c), np.maximum(r, c) - q])
        for r in np.unique(rows[~mixed]):
            sel = np.flatnonzero((rows == r) & ~mixed)
            out[sel] = dist(score_fn(np.array([r]), cols[sel]))[0]
        return out

    nn_index, nn_dist, col_max = lists
    return k_reciprocal_knn(nn_index, nn_dist, dist(s_qg), col_max, pair_dist=pair_dist, **kw)


def postprocess(s_qg, data, cfg: dict, score_fn=None, progress: bool = True, reranked=None) -> dict[str, np.ndarray]:
    """Distance matrices [Q, G] to evaluate, by row label: '' (QAConv: -logit) and, when asked, TLIFT_DIRECT
    (``tlift_direct``: 1 - TLift(sigma(logit))), RR (``rerank`` or ``tlift``) and RR_TLIFT (``tlift``:
    1 - TLift(1 - re-ranked distance), the official evaluators' TLift). TLift rows need time stamps.
    ``score_fn(rows, cols)`` gives logits within the stacked query+gallery set (needed for re-ranking);
    ``reranked``: the RR matrix when it was computed elsewhere (:func:`shortlist_protocol`)."""
    opts = {**POST_DEFAULTS, **cfg}
    check_post_options(opts)
    rows = {"": -s_qg}
    use_time = data.has_time
    if (opts["tlift"] or opts["tlift_direct"]) and not use_time and progress:
        print(f"{data.name}: no time stamps, TLift skipped")
    q_cams = np.array([r.camid for r in data.query])
    g_cams = np.array([r.camid for r in data.gallery])

    def lift(score: np.ndarray) -> np.ndarray:
        from ..tlift import tlift

        q_times = np.array([r.time for r in data.query], dtype=np.float64)
        g_times = np.array([r.time for r in data.gallery], dtype=np.float64)
        kw = dict(tau=opts["tau"], sigma=opts["sigma"], k=opts["tlift_k"], alpha=opts["alpha"])
        return tlift(score, q_cams, q_times, g_cams, g_times, **kw)

    if opts["tlift_direct"] and use_time:
        rows[TLIFT_DIRECT] = 1.0 - lift(logit_to_similarity(s_qg, scale=1.0))
    if opts["rerank"] or opts["tlift"]:
        d_rr = rerank_distances(s_qg, score_fn, len(data.query), opts) if reranked is None else reranked
        rows[RR] = d_rr
        if opts["tlift"] and use_time:
            rows[RR_TLIFT] = 1.0 - lift(1.0 - d_rr)
    return rows


def _relative_names(recs) -> np.ndarray:
    """File names relative to the split's common folder, like the official lists (Market: the file name;
    MSMT17: pid/file as in its list files); an object array, which savemat writes as a cell array."""
    parents = [os.path.dirname(os.path.abspath(r.path)) for r in recs]
    root = os.path.commonpath(parents) if parents else ""
    return np.array([os.path.relpath(os.path.abspath(r.path), root) for r in recs], dtype=object)


def score_arrays(rows: dict[str, np.ndarray], logits: np.ndarray, data, convention: str = "sigmoid"):
    """(mat, npz) dicts of what :func:`save_scores` writes.

    ``mat`` is the official ``--save_score`` layout: ``score`` = 1 - dist (dist = :func:`logit_distance`, float32:
    sigma(logit/10) for "sigmoid", 1 + logit for "logit"), ``score_rerank`` = 1 - re-ranked dist, ``score_tlift``
    = 1 - dist of RR_TLIFT (TLift of score_rerank), ``gal_time``/``prob_time`` (s), ``gal_list``/``prob_list``
    (cell arrays of names), ``gal_ids``/``prob_ids``/``gal_cams``/``prob_cams`` (int64). Like the official code,
    a matrix not computed is the scalar 1.0 and the times are the scalar 0 unless TLift ran.

    ``npz`` holds the same keys where computed, per-image arrays 1-D, times always (NaN where unknown), plus
    ``logit`` [Q, G] (raw QAConv scores), ``score_tlift_direct`` (TLIFT_DIRECT, when computed),
    ``gal_paths``/``prob_paths`` (full paths) and ``rerank_input`` (the convention)."""
    mat = {"score": 1.0 - logit_distance(logits, convention).astype(np.float32)}
    npz = {"logit": np.asarray(logits, dtype=np.float32), "score": mat["score"], "rerank_input": np.array(convention)}
    for key, label in (("score_rerank", RR), ("score_tlift", RR_TLIFT), ("score_tlift_direct", TLIFT_DIRECT)):
        if label in rows:
            npz[key] = 1.0 - rows[label]
        if key != "score_tlift_direct":
            mat[key] = npz.get(key, 1.0)
    for short, split in (("prob", "query"), ("gal", "gallery")):
        recs = getattr(data, split)
        times = np.array([np.nan if r.time is None else r.time for r in recs], dtype=np.float64)
        mat[f"{short}_time"] = times if RR_TLIFT in rows else 0
        npz[f"{short}_time"] = times
        mat[f"{short}_list"] = _relative_names(recs)
        npz[f"{short}_list"] = mat[f"{short}_list"].astype(str)
        npz[f"{short}_paths"] = np.array([r.path for r in recs], dtype=str)
        for key, attr in (("ids", "pid"), ("cams", "camid")):
            mat[f"{short}_{key}"] = npz[f"{short}_{key}"] = np.array([getattr(r, attr) for r in recs], dtype=np.int64)
    return mat, npz


def save_scores(out_dir, data, rows: dict[str, np.ndarray], logits: np.ndarray, convention: str = "sigmoid"):
    """Write ``NAME_score.mat`` (the official layout, per-image arrays as [N, 1] columns) and ``NAME_scores.npz``
    (see :func:`score_arrays`) into ``out_dir``, NAME made safe by :func:`qaconv.names.safe_stem` (a path-named
    test set never writes outside ``out_dir``, two with one base name never collide); returns both paths."""
    from scipy.io import savemat

    mat, npz = score_arrays(rows, logits, data, convention)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = safe_stem(data.name)  # a test set named by a path still writes inside out_dir, under its own name
    mat_path, npz_path = out_dir / f"{stem}_score.mat", out_dir / f"{stem}_scores.npz"
    atomic_write(mat_path, lambda f: savemat(f, mat, oned_as="column", do_compression=True))
    atomic_write(npz_path, lambda f: np.savez_compressed(f, **npz))
    return [mat_path, npz_path]


def _take(q: torch.Tensor, g: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """Rows ``idx`` of the virtual stack [q; g]: a view for a contiguous range inside one part."""
    n_q = len(q)
    if len(idx) and np.all(np.diff(idx) == 1) and (idx[-1] < n_q or idx[0] >= n_q):
        part, start = (q, idx[0]) if idx[-1] < n_q else (g, idx[0] - n_q)
        return part[start : start + len(idx)]
    out = torch.empty((len(idx), *q.shape[1:]), dtype=q.dtype)
    in_q = idx < n_q
    out[torch.from_numpy(in_q)] = q[torch.from_numpy(idx[in_q])]
    out[torch.from_numpy(~in_q)] = g[torch.from_numpy(idx[~in_q] - n_q)]
    return out


def check_post_options(cfg: dict) -> None:
    """Refuse option combinations that cannot work, before any data is loaded."""
    if cfg.get("rerank_input", "sigmoid") not in RERANK_INPUTS:
        raise QAConvError(f"rerank_input must be one of {', '.join(RERANK_INPUTS)}, got {cfg['rerank_input']!r}")
    if cfg.get("two_stage", 0) < 0:
        raise QAConvError(f"--two-stage M must be 0 (exhaustive) or positive, got {cfg['two_stage']}")


def _two_stage(matcher, q, g, cfg: dict, match: dict, name: str, progress: bool) -> np.ndarray:
    """[Q, G] scores from two-stage search (see :func:`qaconv.gallery.search.two_stage_scores`); queries are split
    across the ranks of a process group and the rows gathered."""
    from ..gallery.search import two_stage_scores

    check_post_options(cfg)
    m = int(cfg["two_stage"])
    if progress:
        print(f"{name}: two-stage matching, QAConv re-scores the {min(m, len(g))} best of {len(g)} by pooled cosine")
    part = split_range(len(q), rank(), world_size())  # in a process group each rank scores its queries
    scores, _ = two_stage_scores(matcher, q[part], g, m, device=match["device"], memory=match["memory"])
    return all_gather_rows(scores).numpy()


# -- the protocol on shortlists: --two-stage M with --rerank / --tlift ------------------------------------------
TAIL_OFFSET = 2.0  # a pair not re-scored for a row sits at (cosine - 2) + the row's smallest logit (two_stage_scores)
PAIR_BLOCK = 64  # probes per re-scoring block, each padded to the block's longest candidate list
_ELEMS = 1 << 24  # bound on the elements of one temporary array


@dataclass
class Shortlists:
    """Pooled-cosine shortlists of the two-stage protocol and their exact QAConv logits: O((Q+G) * M) entries.

    Stack indices count the queries first, then the gallery (N = Q + G). ``emb`` [N, C]: pooled, L2-normalised
    maps. ``gal_cand`` [Q, Mg] (gallery indices, best first, Mg = min(M, G)): each query's shortlist, as in
    :func:`~qaconv.gallery.search.two_stage_scores`. ``cand`` [N, K] (stack indices, best first, K = min(N,
    max(M, list length))) and ``cand_cos``: every image's nearest images, of which the first ``m`` = min(M, N)
    are re-scored; ``far`` [N]: each image's farthest image (also re-scored, for the column maxima) and
    ``tail_cos`` [N] the second-smallest cosine (the lowest of the images not re-scored). ``gal_logit`` [Q, Mg],
    ``logit`` [N, m] and ``far_logit`` [N] are the exact logits (:func:`score_shortlists`); ``pairs``: distinct
    pairs re-scored."""

    num_query: int
    emb: torch.Tensor
    gal_cand: np.ndarray
    cand: np.ndarray
    cand_cos: np.ndarray
    far: np.ndarray
    tail_cos: np.ndarray
    m: int
    gal_logit: np.ndarray | None = None
    logit: np.ndarray | None = None
    far_logit: np.ndarray | None = None
    pairs: int = 0


def _row_blocks(n: int, width: int) -> list[tuple[int, int]]:
    step = max(1, _ELEMS // max(width, 1))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _mine(blocks: list) -> list:
    """This rank's contiguous share of a block list (all of it in one process)."""
    return blocks[split_range(len(blocks), rank(), world_size())]


def _gather_cat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Concatenate this rank's parts and gather every rank's, in rank order."""
    return all_gather_rows(torch.cat(parts) if parts else like[:0])


@torch.inference_mode()
def shortlist_candidates(q: torch.Tensor, g: torch.Tensor, m: int, lists: int = 21, device=None) -> Shortlists:
    """First stage of the two-stage protocol: pooled-cosine shortlists (see :class:`Shortlists`), no QAConv yet.

    ``lists``: the re-ranking's list length max(k1 + 1, k2); rows keep at least that many candidates. Row
    blocks are shared out over the ranks of a process group and gathered."""
    if m < 1:
        raise QAConvError(f"--two-stage M must be positive, got {m}")
    dev = pick_device(device)
    nq, n = len(q), len(q) + len(g)
    emb = torch.cat([torch.cat([PooledCosine.embed(x[a:b].to(dev, torch.float32)).cpu()
                                for a, b in _row_blocks(len(x), 1 << 12)]) for x in (q, g) if len(x)])
    on_dev = emb.to(dev)
    mg, k = min(m, len(g)), min(n, max(m, lists))
    gal_cand = []
    for a, b in _mine(_row_blocks(nq, len(g))):
        gal_cand.append((on_dev[a:b] @ on_dev[nq:].t()).topk(mg, dim=1).indices.int().cpu())
    cand, cand_cos, far, tail_cos = [], [], [], []
    for a, b in _mine(_row_blocks(n, n)):
        cos = on_dev[a:b] @ on_dev.t()
        top = cos.topk(k, dim=1)
        cand.append(top.indices.int().cpu())
        cand_cos.append(top.values.cpu())
        low = cos.topk(min(2, n), dim=1, largest=False)
        far.append(low.indices[:, 0].int().cpu())
        tail_cos.append(low.values[:, -1].cpu())
    like_i, like_f = torch.empty(0, dtype=torch.int32), torch.empty(0)
    return Shortlists(
        num_query=nq,
        emb=emb,
        gal_cand=_gather_cat(gal_cand, like_i).numpy().reshape(nq, mg),
        cand=_gather_cat(cand, like_i).numpy().reshape(n, k),
        cand_cos=_gather_cat(cand_cos, like_f).numpy().reshape(n, k),
        far=_gather_cat(far, like_i).numpy(),
        tail_cos=_gather_cat(tail_cos, like_f).numpy(),
        m=min(m, n),
    )


def _pair_key(r: np.ndarray, c: np.ndarray, num_query: int, n: int, symmetric: bool) -> np.ndarray:
    """int64 key of the QAConv pair behind D[c, r] (row r of the re-ranking's O, column c). The official matrix
    holds QAConv(probe c, gallery r), except in its gallery x query block: the transposed query-gallery scores,
    QAConv(probe r, gallery c). A symmetric head keys the unordered pair."""
    r, c = np.broadcast_arrays(np.asarray(r, dtype=np.int64), np.asarray(c, dtype=np.int64))
    if symmetric:
        return np.minimum(r, c) * n + np.maximum(r, c)
    flip = (r < num_query) & (c >= num_query)
    return np.where(flip, r, c) * n + np.where(flip, c, r)


def _score_pairs(matcher, q, g, probe: np.ndarray, gal: np.ndarray, dev, memory: int, progress: bool) -> np.ndarray:
    """Exact logits (float32) of the pairs (probe[i], gal[i]) of stack indices.

    Pairs are grouped by probe and by the gallery image's split; blocks of ``PAIR_BLOCK`` probes with similar
    list lengths go through the two-stage re-scoring kernel, padded to the longest list. On the CPU the blocks
    run side by side in a pool of ``torch.get_num_threads()`` threads, each block single-threaded (on a busy
    2-core machine measured 4.7-5.3 k pairs/s against 0.4-1.3 k with two OpenMP threads per block; the same
    numbers either way). The blocks are shared out over the ranks by work and the scores gathered (every rank
    gets all of them)."""
    from ..gallery.search import _rescore

    nq = len(q)
    blocks = []  # (gallery split is g, probe ids [B], pair positions [B, width], valid [B, width])
    for in_g in (False, True):
        sel = np.flatnonzero((gal >= nq) == in_g)
        if not len(sel):
            continue
        sel = sel[np.argsort(probe[sel], kind="stable")]
        ids, start, count = np.unique(probe[sel], return_index=True, return_counts=True)
        by_len = np.argsort(-count, kind="stable")
        for k in range(0, len(by_len), PAIR_BLOCK):
            pick = by_len[k : k + PAIR_BLOCK]
            cnt = count[pick][:, None]
            cols = np.arange(int(cnt.max()))
            blocks.append((in_g, ids[pick], sel[start[pick][:, None] + np.minimum(cols, cnt - 1)], cols < cnt))
    work = np.array([v.size for *_, v in blocks], dtype=np.int64)
    owner = np.minimum((np.cumsum(work) - work) * world_size() // max(int(work.sum()), 1), world_size() - 1)
    mine = [blk for blk, o in zip(blocks, owner, strict=True) if o == rank()]

    def block_scores(block) -> torch.Tensor:
        in_g, ids, pos, valid = block
        side, offset = (g, nq) if in_g else (q, 0)
        with torch.inference_mode():
            cand = torch.from_numpy(gal[pos] - offset)
            return _rescore(matcher, _take(q, g, ids), side, cand, dev, memory)[torch.from_numpy(valid)]

    threads = torch.get_num_threads()
    bar = dict(total=len(mine), desc="re-scoring shortlists", unit="blocks", disable=not progress, leave=False)
    if dev.type != "cpu" or threads == 1:
        parts = [block_scores(b) for b in progress_bar(mine, **bar)]
    else:  # one block per thread, each single-threaded: small kernels stall when OpenMP threads wait on busy cores
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:
                parts = list(progress_bar(pool.map(block_scores, mine), **bar))
        finally:
            torch.set_num_threads(threads)
    flat = _gather_cat(parts, torch.empty(0)).numpy()
    out = np.empty(len(probe), dtype=np.float32)
    out[np.concatenate([pos[valid] for _, _, pos, valid in blocks])] = flat
    return out


@torch.inference_mode()
def score_shortlists(matcher, q, g, sl: Shortlists, device=None, memory: int | None = None,
                     progress: bool = False) -> Shortlists:
    """Fill ``sl.logit``, ``sl.gal_logit`` and ``sl.far_logit`` with exact QAConv logits, each distinct pair scored
    once (a symmetric head: each unordered pair once). Returns ``sl``. Extra memory O((Q+G) * M)."""
    from ..matching import DEFAULT_MEMORY

    dev = pick_device(device)
    memory = int(DEFAULT_MEMORY if memory is None else memory)
    was_training = matcher.training
    matcher.eval()
    try:
        fold = fold_head(matcher)
        symmetric = bool(fold is not None and fold["symmetric"])
        n, nq, m = len(sl.cand), sl.num_query, sl.m
        keys = np.empty(n * m + sl.gal_cand.size + n, dtype=np.int64)
        for a, b in _row_blocks(n, m):
            keys[a * m : b * m] = _pair_key(np.arange(a, b)[:, None], sl.cand[a:b, :m], nq, n, symmetric).ravel()
        keys[n * m : -n] = _pair_key(np.arange(nq)[:, None], nq + sl.gal_cand, nq, n, symmetric).ravel()
        keys[-n:] = _pair_key(np.arange(n), sl.far, nq, n, symmetric)
        keys.sort()
        uniq = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
        del keys
        probe, gal = np.divmod(uniq, n)
        if symmetric:  # either orientation is right: alternate, so that every image probes about half its pairs
            swap = (probe + gal) % 2 == 1
            probe[swap], gal[swap] = gal[swap], probe[swap].copy()
        logits = _score_pairs(matcher, q, g, probe, gal, dev, memory, progress)
        del probe, gal

        def lookup(r, c):
            return logits[np.searchsorted(uniq, _pair_key(r, c, nq, n, symmetric))]

        sl.logit = np.empty((n, m), dtype=np.float32)
        for a, b in _row_blocks(n, m):
            sl.logit[a:b] = lookup(np.arange(a, b)[:, None], sl.cand[a:b, :m])
        sl.gal_logit = lookup(np.arange(nq)[:, None], nq + sl.gal_cand)
        sl.far_logit = lookup(np.arange(n), sl.far)
        sl.pairs = len(uniq)
        return sl
    finally:
        matcher.train(was_training)


def two_stage_matrix(sl: Shortlists, device=None) -> np.ndarray:
    """The [Q, G] logits of :func:`~qaconv.gallery.search.two_stage_scores` from the shortlists: exact on each
    query's shortlist, every other item below them in pooled-cosine order, ``(cosine - 2) + min(exact)``."""
    dev = pick_device(device)
    nq = sl.num_query
    ep, eg = sl.emb[:nq].to(dev), sl.emb[nq:].to(dev)
    out = np.empty((nq, len(eg)), dtype=np.float32)
    low = sl.gal_logit.min(axis=1)
    for a, b in _row_blocks(nq, len(eg)):
        out[a:b] = (ep[a:b] @ eg.t()).cpu().numpy() - TAIL_OFFSET
        out[a:b] += low[a:b, None]
    np.put_along_axis(out, sl.gal_cand.astype(np.int64), sl.gal_logit, axis=1)
    return out


class _Distances:
    """:func:`logit_distance` of a [Q, G] logit matrix, row block by row block (what k_reciprocal_knn reads)."""

    def __init__(self, logits: np.ndarray, convention: str):
        self.logits, self.convention, self.shape = logits, convention, logits.shape

    def __getitem__(self, rows) -> np.ndarray:
        return logit_distance(self.logits[rows], self.convention)


def _check_col_max(col_max: np.ndarray, convention: str, tail: bool) -> None:
    if not (np.isfinite(col_max).all() and (col_max != 0).all()):
        raise QAConvError(f"re-ranking ({convention} input): a column maximum of the distance matrix is "
                          "0 or not finite, so the column normalisation is undefined; use rerank_input 'sigmoid'")
    if tail and (col_max < 0).any():
        raise QAConvError(f"re-ranking ({convention} input) on shortlists: a column maximum of the distance matrix is "
                          "negative, which would make the images farthest by pooled cosine the nearest; use "
                          "rerank_input 'sigmoid' or a larger --two-stage M")


def shortlist_rerank(sl: Shortlists, s_qg: np.ndarray, opts: dict) -> np.ndarray:
    """k-reciprocal re-ranked [Q, G] distances from the shortlists (``opts``: POST_DEFAULTS keys), through
    :func:`qaconv.rerank.k_reciprocal_knn`; no [Q+G]^2 matrix is ever built.

    The re-ranking sees, for each image r (a row of the official O, a column of D), the matrix
    D~[c, r] = :func:`logit_distance` of: the exact logit (in the official orientation, see :func:`_pair_key`)
    for r's ``m`` shortlisted images c and for r's farthest image by pooled cosine; ``(cosine(r, c) - 2) +``
    the smallest logit of r's shortlist for every other c. So in each row the images not re-scored rank below
    the shortlist, in pooled-cosine order, and the column maximum (the official normalisation) comes from an
    exact distance to a far image (or the tail's lowest cosine, whichever is larger). The final ``lambda`` term
    uses ``s_qg`` (the two-stage query-gallery logits). With M >= Q+G and M >= G this is the exhaustive protocol."""
    conv = opts["rerank_input"]
    n, m = len(sl.cand), sl.m
    lists = min(n, max(opts["k1"] + 1, opts["k2"]))
    tail = m < n
    width = max(m, lists)
    low = sl.logit.min(axis=1)  # each row's smallest shortlisted logit: the tail sits below it
    far_d = logit_distance(sl.far_logit, conv).astype(np.float32)
    raw = np.empty((n, width + 1), dtype=np.float32)  # D~ of each row's first `width` candidates and its farthest
    for a, b in _row_blocks(n, width + 1):
        raw[a:b, :m] = logit_distance(sl.logit[a:b], conv)
        is_far = sl.cand[a:b, m:width] == sl.far[a:b, None]
        tail_d = logit_distance((sl.cand_cos[a:b, m:width] - TAIL_OFFSET) + low[a:b, None], conv)
        raw[a:b, m:width] = np.where(is_far, far_d[a:b, None], tail_d)
        raw[a:b, width] = far_d[a:b]
    col_max = raw.max(axis=1)
    if n - m >= 2:  # some images are neither shortlisted nor the farthest: the tail's lowest
        col_max = np.maximum(col_max, logit_distance((sl.tail_cos - TAIL_OFFSET) + low, conv).astype(np.float32))
    _check_col_max(col_max, conv, tail)
    cand = np.concatenate([sl.cand[:, :width], sl.far[:, None]], axis=1)
    raw[(sl.cand[:, :width] == sl.far[:, None]).any(axis=1), width] = np.nan  # already a column: never selected
    nn_index, nn_dist = candidate_lists(cand, raw, col_max, lists)
    del raw, cand
    # exact D~ of each row (shortlist and farthest), sorted by key r * n + c for the lookups of pair_dist
    exact_c = np.concatenate([sl.cand[:, :m], sl.far[:, None]], axis=1)
    exact_l = np.concatenate([sl.logit, sl.far_logit[:, None]], axis=1)
    order = np.argsort(exact_c, axis=1, kind="stable")
    row_keys = (np.arange(n, dtype=np.int64)[:, None] * n + np.take_along_axis(exact_c, order, 1)).ravel()
    row_logit = np.take_along_axis(exact_l, order, 1).ravel()
    del order, exact_c, exact_l
    emb = sl.emb.numpy()

    def pair_dist(c: np.ndarray, r: np.ndarray) -> np.ndarray:
        """D~[c, r] element-wise: exact on r's shortlist and farthest, else the tail's value."""
        key = r.astype(np.int64) * n + c
        pos = np.minimum(np.searchsorted(row_keys, key), len(row_keys) - 1)
        hit = row_keys[pos] == key
        logit = np.empty(len(key), dtype=np.float32)
        logit[hit] = row_logit[pos[hit]]
        rm, cm = r[~hit], c[~hit]
        logit[~hit] = (np.einsum("ij,ij->i", emb[rm], emb[cm]) - TAIL_OFFSET) + low[rm]
        return logit_distance(logit, conv)

    return k_reciprocal_knn(nn_index, nn_dist, _Distances(s_qg, conv), col_max, k1=opts["k1"], k2=opts["k2"],
                            lambda_value=opts["lambda_value"], pair_dist=pair_dist)


def shortlist_protocol(matcher, q, g, cfg: dict, match: dict, name: str = "", progress: bool = False):
    """``(s_qg, d_rr)`` of ``--two-stage M`` with ``--rerank``/``--tlift``: the two-stage [Q, G] logits and the
    re-ranked [Q, G] distances from pooled-cosine shortlists of M re-scored by QAConv (see
    :func:`shortlist_rerank`). ``match``: device, memory (bytes). Under torchrun the first stage and the
    re-scoring are shared out over the ranks; the results are the same on every rank."""
    opts = {**POST_DEFAULTS, **cfg}
    m, n = int(opts["two_stage"]), len(q) + len(g)
    lists = max(opts["k1"] + 1, opts["k2"])
    sl = shortlist_candidates(q, g, m, lists, device=match["device"])
    if progress:
        print(f"{name}: two-stage protocol, QAConv re-scores each query's {sl.gal_cand.shape[1]} best of {len(g)} "
              f"gallery images and, for re-ranking, each image's {sl.m} nearest of {n} by pooled cosine")
    score_shortlists(matcher, q, g, sl, device=match["device"], memory=match["memory"], progress=progress)
    if progress:
        print(f"{name}: {sl.pairs} distinct pairs re-scored ({sl.pairs / max(n * n, 1):.2%} of all {n}^2)")
    s_qg = two_stage_matrix(sl, device=match["device"])
    return s_qg, shortlist_rerank(sl, s_qg, opts)


def drop_undecodable(data, strict: bool = False, progress: bool = True):
    """``data`` with its undecodable query and gallery images left out (a shallow copy; ``data`` itself when
    every image decodes), each split reported once; with ``strict`` the first one stops the evaluation."""
    kept = {}
    for split in ("query", "gallery"):
        recs = getattr(data, split)
        bad = scan_images(recs, progress=progress)
        if bad and strict:
            raise QAConvError(f"{data.name}: undecodable {split} image {bad[0]} ({len(bad)} in all); "
                              "fix or remove it, or drop --strict to skip it")
        if bad and progress:
            print(f"{data.name}: skipped {len(bad)} undecodable {split} image(s), e.g. {bad[0]}")
        bad_set = set(bad)
        kept[split] = [r for r in recs if r.path not in bad_set]
        if recs and not kept[split]:
            raise QAConvError(f"{data.name}: no decodable {split} images (e.g. {bad[0]} cannot be read)")
    if all(len(kept[s]) == len(getattr(data, s)) for s in kept):
        return data
    data = copy.copy(data)
    data.query, data.gallery = kept["query"], kept["gallery"]
    return data


def evaluate_dataset(model, matcher, data, cfg: dict, progress: bool = True, out_dir=None, keep: dict | None = None):
    """Metrics per post-processing row ('' = plain QAConv) on one test set, and the seconds taken. A ``keep``
    dict receives the distance matrices ('dists'), feature maps ('q', 'g') and the evaluated ``data``, e.g. for the
    HTML report. Undecodable query/gallery images are left out (reported once per split; ``cfg['strict']``
    stops instead, see :func:`drop_undecodable`).

    In a process group the features and scores are computed in shares and gathered (exactly the
    single-process numbers on every rank); only rank 0 prints and writes."""
    progress = progress and is_main()
    start = time.perf_counter()
    data = drop_undecodable(data, cfg.get("strict", False), progress)
    not_evaluable = check_evaluable(data.query, data.gallery)
    if not_evaluable and progress:
        print(
            f"{data.name}: {not_evaluable} of {len(data.query)} queries have no gallery image of their identity "
            "from another camera; they are left out of CMC/mAP/mINP"
        )
    dev = pick_device(cfg.get("device"))
    kw = dict(batch_size=cfg["fea_batch"], workers=cfg.get("workers", 0), device=dev, progress=progress)
    q = extract_features_sharded(model, data.query, cfg["height"], cfg["width"], desc=f"{data.name} query", **kw)
    g = extract_features_sharded(model, data.gallery, cfg["height"], cfg["width"], desc=f"{data.name} gallery", **kw)
    match = dict(device=dev, progress=progress, memory=int(cfg["match_memory"] * 2**20))
    d_rr = None  # the re-ranked distances, when the shortlist protocol computes them
    if cfg.get("two_stage", 0) > 0 and (cfg.get("rerank") or cfg.get("tlift")):
        s_qg, d_rr = shortlist_protocol(matcher, q, g, cfg, match, data.name, progress)
    elif cfg.get("two_stage", 0) > 0:
        s_qg = _two_stage(matcher, q, g, cfg, match, data.name, progress)
    else:
        s_qg = pairwise_scores_sharded(matcher, q, g, **match).numpy()

    def score_fn(rows, cols) -> np.ndarray:
        """Logits between index sets (slices or arrays) of the query+gallery stack, without stacking."""
        r, c = np.arange(len(q) + len(g))[rows], np.arange(len(q) + len(g))[cols]
        out = np.empty((len(r), len(c)), dtype=np.float32)
        gal = _take(q, g, c)
        for mask in (r < len(q), r >= len(q)):
            if mask.any():
                prob = _take(q, g, r[mask])
                out[mask] = pairwise_scores_sharded(matcher, prob, gal, **match).numpy()
        return out

    rows = postprocess(s_qg, data, cfg, score_fn, progress=progress, reranked=d_rr)
    ids = (
        [r.pid for r in data.query],
        [r.pid for r in data.gallery],
        [r.camid for r in data.query],
        [r.camid for r in data.gallery],
    )
    results = {label: evaluate_rank(dist, *ids) for label, dist in rows.items()}
    if keep is not None:
        keep.update(dists=rows, q=q, g=g, data=data)
    if cfg.get("save_scores") and out_dir is not None and is_main():
        try:
            written = save_scores(out_dir, data, rows, s_qg, cfg.get("rerank_input", "sigmoid"))
        except QAConvError as exc:  # e.g. a full disk: the metrics are not lost with the files
            raise ScoresNotSaved(str(exc), results, time.perf_counter() - start) from None
        if progress:
            print("wrote " + ", ".join(map(str, written)))
    return results, time.perf_counter() - start


class ScoresNotSaved(QAConvError):
    """``save_scores`` failed (its message); carries the test set's metrics and time, so that
    :func:`evaluate` still logs and prints them before it reports the failure."""

    def __init__(self, message: str, results: dict, seconds: float):
        super().__init__(message)
        self.results, self.seconds = results, seconds


def evaluate(model, matcher, cfg, testsets, out_dir=None, progress=True) -> dict[str, RankResult]:
    """Evaluate on each named test set; prints a table and logs one metrics.jsonl row per set and row.

    ``cfg``: a :class:`~qaconv.engine.config.TrainConfig` or a dict of its fields (the run's evaluation
    options are read from it). Test sets are shown by short names (:func:`qaconv.names.short_names`: a path's
    base name, unique among ``testsets``; ``metrics.jsonl`` rows add ``testset_source``, the name as given, when
    it differs). Keys of the result: that name, and ``NAME +RR`` (``cfg['rerank']`` or
    ``cfg['tlift']``), ``NAME +RR+TLift`` (``cfg['tlift']``) and ``NAME +TLift(unofficial)``
    (``cfg['tlift_direct']``) when asked for."""
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    check_post_options(cfg)
    init_from_env(cfg.get("device"))  # under torchrun: the scores are computed in shares
    progress = progress and is_main()
    names = [t.strip() for t in testsets.split(",")] if isinstance(testsets, str) else list(testsets)
    results: dict[str, RankResult] = {}
    sections = []  # HTML report sections, with cfg['report']
    first_error = None  # the first failure to write scores or the report: raised after the table
    if cfg.get("report"):
        from ..report import check_report_dir

        check_report_dir(cfg["report"])  # fail before the evaluation
    names = list(filter(None, names))
    shown = short_names(names)  # tables, reports and file names use short, unique test-set names
    for name in names:
        with main_first():  # a synthetic test set is generated once, by rank 0
            data = load_dataset(name, cfg.get("data_dir"), progress=progress, require=("query", "gallery"))
        data.name = shown[name]
        if progress and data.skipped:
            print(f"{data.name}: {data.skipped_note()}")
        kept = {} if cfg.get("report") and is_main() and first_error is None else None
        try:
            rows, seconds = evaluate_dataset(model, matcher, data, cfg, progress=progress, out_dir=out_dir, keep=kept)
        except ScoresNotSaved as exc:  # logged and printed first, reported after the table
            rows, seconds = exc.results, exc.seconds
            first_error = first_error or QAConvError(str(exc))
        for label, result in rows.items():
            results[f"{data.name} {label}".strip()] = result
            if out_dir is not None and is_main():
                row = {
                    "type": "eval",
                    "testset": data.name,
                    **({"testset_source": name} if name != data.name else {}),
                    "post": label or "none",
                    **result.to_dict(),
                    "num_invalid_queries": result.num_invalid,
                    "time_s": seconds,
                }
                try:
                    append_jsonl(Path(out_dir) / "metrics.jsonl", row)
                except QAConvError as exc:  # e.g. a full disk: reported after the table
                    first_error = first_error or exc
        if kept is not None:  # after the metrics rows, so a failing report loses none
            from ..report import report_from_evaluation

            try:
                sections.append(report_from_evaluation(cfg["report"], kept["data"], kept, matcher, rows, cfg, progress))
            except Exception as exc:  # raised after the table is printed; the other test sets are still evaluated
                first_error = first_error or exc
        del kept
    if progress and results:
        print(format_table(results))
    if first_error is not None:
        raise first_error
    if sections:
        from ..report import write_report

        path = write_report(cfg["report"], sections, results)
        if progress:
            print(f"wrote report {path}")
    return results


def format_table(results: dict, title: str = "test set") -> str:
    """Rank-1/5/10, mAP and mINP (in %) per row."""
    width = max(len(title), *(len(k) for k in results))
    lines = [f"{title:<{width}}  rank-1  rank-5  rank-10    mAP    mINP"]
    for name, r in results.items():
        lines.append(
            f"{name:<{width}}  {100 * r.cmc[0]:6.1f}  {100 * r.cmc[4]:6.1f}  {100 * r.cmc[9]:7.1f}  "
            f"{100 * r.mAP:5.1f}  {100 * r.mINP:6.1f}"
        )
    return "\n".join(lines)
