"""Evaluation of a trained model on test sets: scores, optional re-ranking and TLift, metrics, tables
and saved score files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..data.registry import load_dataset
from ..data.validate import check_evaluable
from ..matching import pairwise_scores, pick_device
from ..metrics import RankResult, evaluate_rank
from .features import extract_features
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
}


def logit_to_similarity(logits: np.ndarray) -> np.ndarray:
    """QAConv logits to [0, 1] similarities by sigma(logit / 10), the paper version's convention; used
    before re-ranking (distance = 1 - similarity) and TLift."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64) / 10.0))


def postprocess(s_qg, data, cfg: dict, self_scores=None, progress: bool = True) -> dict[str, np.ndarray]:
    """Distance matrices [Q, G] to evaluate: '' (QAConv: -logit), and when asked and possible '+TLift',
    '+RR', '+RR+TLift'. ``self_scores()`` returns the (query-query, gallery-gallery) logits for re-ranking."""
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
        from ..rerank import k_reciprocal

        s_qq, s_gg = self_scores()
        d_rr = k_reciprocal(
            1.0 - sim_qg,
            1.0 - logit_to_similarity(s_qq),
            1.0 - logit_to_similarity(s_gg),
            k1=opts["k1"],
            k2=opts["k2"],
            lambda_value=opts["lambda_value"],
        )
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


def evaluate_dataset(model, matcher, data, cfg: dict, progress: bool = True, out_dir=None):
    """Metrics per post-processing row ('' = plain QAConv) on one test set, and the seconds taken."""
    start = time.perf_counter()
    not_evaluable = check_evaluable(data.query, data.gallery)
    if not_evaluable and progress:
        print(
            f"{data.name}: {not_evaluable} of {len(data.query)} queries have no gallery image of their identity "
            "from another camera; they are left out of CMC/mAP/mINP"
        )
    dev = pick_device(cfg.get("device"))
    kw = dict(batch_size=cfg["fea_batch"], workers=cfg.get("workers", 0), device=dev, progress=progress)
    q = extract_features(model, data.query, cfg["height"], cfg["width"], desc=f"{data.name} query", **kw)
    g = extract_features(model, data.gallery, cfg["height"], cfg["width"], desc=f"{data.name} gallery", **kw)
    chunk = cfg["match_batch"]
    s_qg = pairwise_scores(matcher, q, g, chunk, chunk, dev, progress=progress).numpy()

    def self_scores():
        return (
            pairwise_scores(matcher, q, q, chunk, chunk, dev, progress=progress).numpy(),
            pairwise_scores(matcher, g, g, chunk, chunk, dev, progress=progress).numpy(),
        )

    rows = postprocess(s_qg, data, cfg, self_scores, progress=progress)
    ids = (
        [r.pid for r in data.query],
        [r.pid for r in data.gallery],
        [r.camid for r in data.query],
        [r.camid for r in data.gallery],
    )
    results = {label: evaluate_rank(dist, *ids) for label, dist in rows.items()}
    if cfg.get("save_scores") and out_dir is not None:
        written = save_scores(Path(out_dir) / f"{data.name}_scores", rows, data)
        if progress:
            print("wrote " + ", ".join(map(str, written)))
    return results, time.perf_counter() - start


def evaluate(model, matcher, cfg: dict, testsets, out_dir=None, progress=True) -> dict[str, RankResult]:
    """Evaluate on each named test set; prints a table and logs one metrics.jsonl row per set and row.

    Keys of the result: the test-set name, and ``NAME +TLift``, ``NAME +RR``, ``NAME +RR+TLift`` when
    asked for (``cfg['rerank']``, ``cfg['tlift']``)."""
    names = [t.strip() for t in testsets.split(",")] if isinstance(testsets, str) else list(testsets)
    results: dict[str, RankResult] = {}
    for name in filter(None, names):
        data = load_dataset(name, cfg["data_dir"], progress=progress)
        rows, seconds = evaluate_dataset(model, matcher, data, cfg, progress=progress, out_dir=out_dir)
        for label, result in rows.items():
            results[f"{name} {label}".strip()] = result
            if out_dir is not None:
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
