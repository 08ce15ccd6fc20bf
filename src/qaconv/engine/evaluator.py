"""Evaluation of a trained model on test sets: scores, optional re-ranking and TLift, metrics, tables
and saved score files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data.registry import load_dataset
from ..data.validate import check_evaluable
from ..errors import QAConvError
from ..matching import pick_device
from ..metrics import RankResult, evaluate_rank
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
    "rerank": False,
    "tlift": False,
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


def logit_to_similarity(logits: np.ndarray) -> np.ndarray:
    """QAConv logits to [0, 1] similarities by sigma(logit / 10), the paper version's convention; used
    before re-ranking (distance = 1 - similarity) and TLift."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64) / 10.0))


def rerank_distances(s_qg: np.ndarray, score_fn, num_query: int, opts: dict) -> np.ndarray:
    """k-reciprocal re-ranked [Q, G] distances, with distance = 1 - sigma(logit / 10).

    ``score_fn(rows, cols)`` returns the logits between two index ranges/arrays of the stacked
    query+gallery set. Up to ``rerank_dense_max`` images the dense form is used; beyond, neighbour lists
    are streamed column block by column block, so memory stays O(N * k1) plus the [Q, G] output."""
    from ..rerank import k_reciprocal, k_reciprocal_knn, knn_lists

    def dist(logits):
        return 1.0 - logit_to_similarity(logits)

    q, n = num_query, num_query + s_qg.shape[1]
    kw = dict(k1=opts["k1"], k2=opts["k2"], lambda_value=opts["lambda_value"])
    if n <= opts["rerank_dense_max"]:
        d_qq, d_gg = dist(score_fn(slice(0, q), slice(0, q))), dist(score_fn(slice(q, n), slice(q, n)))
        return k_reciprocal(dist(s_qg), d_qq, d_gg, **kw)
    every = slice(0, n)
    lists = knn_lists(lambda a, b: dist(score_fn(every, slice(a, b))), n, max(opts["k1"] + 1, opts["k2"]))

    def pair_dist(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float64)
        for r in np.unique(rows):
            sel = np.flatnonzero(rows == r)
            out[sel] = dist(score_fn(np.array([r]), cols[sel]))[0]
        return out

    nn_index, nn_dist, col_max = lists
    return k_reciprocal_knn(nn_index, nn_dist, dist(s_qg), col_max, pair_dist=pair_dist, **kw)


def postprocess(s_qg, data, cfg: dict, score_fn=None, progress: bool = True) -> dict[str, np.ndarray]:
    """Distance matrices [Q, G] to evaluate: '' (QAConv: -logit), and when asked and possible '+TLift',
    '+RR', '+RR+TLift'. ``score_fn(rows, cols)`` gives logits within the stacked query+gallery set
    (needed for re-ranking)."""
    opts = {**POST_DEFAULTS, **cfg}
    rows = {"": -s_qg}
    use_tlift = opts["tlift"] and data.has_time
    if opts["tlift"] and not data.has_time and progress:
        print(f"{data.name}: no time stamps, TLift skipped")
    if not (use_tlift or opts["rerank"]):
        return rows
    q_cams = np.array([r.camid for r in data.query])
    g_cams = np.array([r.camid for r in data.gallery])

    def lift(score: np.ndarray) -> np.ndarray:
        from ..tlift import tlift

        q_times = np.array([r.time for r in data.query], dtype=np.float64)
        g_times = np.array([r.time for r in data.gallery], dtype=np.float64)
        return tlift(
            score,
            q_cams,
            q_times,
            g_cams,
            g_times,
            tau=opts["tau"],
            sigma=opts["sigma"],
            k=opts["tlift_k"],
            alpha=opts["alpha"],
        )

    sim_qg = logit_to_similarity(s_qg)
    if use_tlift:
        rows["+TLift"] = 1.0 - lift(sim_qg)
    if opts["rerank"]:
        d_rr = rerank_distances(s_qg, score_fn, len(data.query), opts)
        rows["+RR"] = d_rr
        if use_tlift:
            rows["+RR+TLift"] = 1.0 - lift(1.0 - d_rr)
    return rows


def save_scores(path_stem: Path, rows: dict[str, np.ndarray], data) -> list[Path]:
    """Write the raw, re-ranked and lifted scores with ids, cameras, times and file lists as .npz and .mat."""
    from scipy.io import savemat

    arrays = {
        "score" if not k else "score" + k.replace("+", "_").lower(): -v if not k else 1.0 - v for k, v in rows.items()
    }
    for split in ("query", "gallery"):
        recs = getattr(data, split)
        arrays[f"{split}_ids"] = np.array([r.pid for r in recs], dtype=np.int64)
        arrays[f"{split}_cams"] = np.array([r.camid for r in recs], dtype=np.int64)
        arrays[f"{split}_times"] = np.array([np.nan if r.time is None else r.time for r in recs], dtype=np.float64)
        arrays[f"{split}_files"] = np.array([r.path for r in recs], dtype=str)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    npz, mat = path_stem.with_suffix(".npz"), path_stem.with_suffix(".mat")
    np.savez_compressed(npz, **arrays)
    savemat(mat, arrays, do_compression=True)
    return [npz, mat]


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
    if cfg.get("two_stage", 0) > 0 and cfg.get("rerank"):
        raise QAConvError("--rerank needs every query-gallery and gallery-gallery score; use it without --two-stage")


def _two_stage(matcher, q, g, cfg: dict, match: dict, name: str, progress: bool) -> np.ndarray:
    """[Q, G] scores from two-stage search (see :func:`qaconv.search.two_stage_scores`); queries are split
    across the ranks of a process group and the rows gathered."""
    from ..search import two_stage_scores

    check_post_options(cfg)
    m = int(cfg["two_stage"])
    if progress:
        print(f"{name}: two-stage matching, QAConv re-scores the {min(m, len(g))} best of {len(g)} by pooled cosine")
    part = split_range(len(q), rank(), world_size())  # in a process group each rank scores its queries
    scores, _ = two_stage_scores(matcher, q[part], g, m, device=match["device"], memory=match["memory"])
    return all_gather_rows(scores).numpy()


def evaluate_dataset(model, matcher, data, cfg: dict, progress: bool = True, out_dir=None, keep: dict | None = None):
    """Metrics per post-processing row ('' = plain QAConv) on one test set, and the seconds taken. A ``keep``
    dict receives the distance matrices ('dists') and feature maps ('q', 'g'), e.g. for the HTML report.

    In a process group the features and scores are computed in shares and gathered (exactly the
    single-process numbers on every rank); only rank 0 prints and writes."""
    progress = progress and is_main()
    start = time.perf_counter()
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
    if cfg.get("two_stage", 0) > 0:
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

    rows = postprocess(s_qg, data, cfg, score_fn, progress=progress)
    ids = (
        [r.pid for r in data.query],
        [r.pid for r in data.gallery],
        [r.camid for r in data.query],
        [r.camid for r in data.gallery],
    )
    results = {label: evaluate_rank(dist, *ids) for label, dist in rows.items()}
    if keep is not None:
        keep.update(dists=rows, q=q, g=g)
    if cfg.get("save_scores") and out_dir is not None and is_main():
        written = save_scores(Path(out_dir) / f"{data.name}_scores", rows, data)
        if progress:
            print("wrote " + ", ".join(map(str, written)))
    return results, time.perf_counter() - start


def evaluate(model, matcher, cfg: dict, testsets, out_dir=None, progress=True) -> dict[str, RankResult]:
    """Evaluate on each named test set; prints a table and logs one metrics.jsonl row per set and row.

    Keys of the result: the test-set name, and ``NAME +TLift``, ``NAME +RR``, ``NAME +RR+TLift`` when
    asked for (``cfg['rerank']``, ``cfg['tlift']``)."""
    check_post_options(cfg)
    init_from_env(cfg.get("device"))  # under torchrun: the scores are computed in shares
    progress = progress and is_main()
    names = [t.strip() for t in testsets.split(",")] if isinstance(testsets, str) else list(testsets)
    results: dict[str, RankResult] = {}
    sections = []  # HTML report sections, with cfg['report']
    if cfg.get("report"):
        from ..report import check_report_dir

        check_report_dir(cfg["report"])  # fail before the evaluation
    for name in filter(None, names):
        with main_first():  # a synthetic test set is generated once, by rank 0
            data = load_dataset(name, cfg["data_dir"], progress=progress)
        kept = {} if cfg.get("report") and is_main() else None
        rows, seconds = evaluate_dataset(model, matcher, data, cfg, progress=progress, out_dir=out_dir, keep=kept)
        if kept is not None:
            from ..report import report_from_evaluation

            sections.append(report_from_evaluation(cfg["report"], data, kept, matcher, rows, cfg, progress))
            del kept
        for label, result in rows.items():
            results[f"{name} {label}".strip()] = result
            if out_dir is not None and is_main():
                row = {
                    "type": "eval",
                    "testset": name,
                    "post": label or "none",
                    **result.to_dict(),
                    "num_invalid_queries": result.num_invalid,
                    "time_s": seconds,
                }
                append_jsonl(Path(out_dir) / "metrics.jsonl", row)
    if progress and results:
        print(format_table(results))
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
