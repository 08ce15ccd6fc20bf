"""Scores that mean something: ROC, TAR@FAR, verdict bands and a calibrated probability for QAConv logits.

A calibration is measured on a labelled test set (identities known) with the re-ID convention: every
query x gallery pair from **different cameras**; a pair is *positive* when both images show one identity,
*negative* otherwise. Same-camera pairs are left out (same identity and camera is the evaluation's junk;
different-identity same-camera pairs are left out too, so both classes are cross-camera). Junk images
(pid -1) are dropped by the loaders and ignored here; distractors (Market pid 0) are plain negatives, as in
CMC/mAP.

* ROC: a pair is accepted when its logit is ``>= threshold``; TAR(t) / FAR(t) are the fractions of positive /
  negative pairs accepted. Tied scores are accepted together (no interpolation).
* TAR@FAR f: the largest TAR(t) over thresholds with FAR(t) <= f; its threshold is the highest one reaching
  that TAR (a positive pair's score), ``far_achieved`` its FAR. With N negative pairs a FAR below 1/N cannot be
  estimated: TAR and threshold are then ``None`` with the reason.
* Probability: Platt scaling P(same | logit) = sigmoid(a * logit + b), fitted by Newton's method on the
  weighted cross-entropy with class-balanced weights (each class weighs one half: a prior of 50 % same) and
  Platt's targets (P+1)/(P+2) and 1/(N+2), which keep the fit finite when the classes separate.
  :func:`probability` converts to another prior.
* Verdict bands (:func:`verdict`): **same person** when logit >= the threshold at FAR 1e-3 (or the smallest
  FAR the negatives can estimate, 1/N, when there are fewer than 1,000); **different** when logit < the score
  that keeps 99 % of true matches (99 % of positive pairs score at or above it); **uncertain** between. When
  the two thresholds cross (well separated scores) "same person" wins above its threshold.

``calibration.json`` lives beside the checkpoint (:func:`calibration_path`) and records the model's identity
(:func:`qaconv.gallery.index.model_identity`); :func:`load_calibration` refuses one made for another model.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import QAConvError

FORMAT, VERSION = "qaconv-calibration", 1
FILE_NAME = "calibration.json"
FARS = (1e-2, 1e-3, 1e-4)
SAME_FAR, DIFFERENT_TAR = 1e-3, 0.99
PLATT_MAX_PAIRS = 2_000_000  # per class; more pairs are subsampled (seeded) for the fit only
VERDICTS = ("same person", "different", "uncertain")
HOW_TO = "run 'qaconv calibrate --checkpoint RUN --testsets NAME' on a labelled set of your cameras"
BANDS_HELP = (
    "Verdict bands: 'same person' when the logit is >= the threshold at FAR 1e-3 (calibrate --same-far; the "
    "smallest FAR the calibration's N negative pairs can estimate, 1/N, when N < 1/FAR); 'different' when it is "
    "below the score that keeps 99% of true cross-camera matches (calibrate --different-tar); 'uncertain' "
    "between. P(same) is Platt scaling fitted with class-balanced weights (a 50% prior of 'same')."
)  # for argparse descriptions and epilogs (not %-formatted)


# -- pairs --------------------------------------------------------------------------------------------------
def cross_camera_pairs(logits, q_pids, g_pids, q_cams, g_cams) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) scores (float64, 1-D) of the cross-camera query x gallery pairs of a [Q, G]
    logit matrix: positive = same identity, negative = different identity; pairs with a junk image (pid < 0)
    and same-camera pairs are left out.

    >>> pos, neg = cross_camera_pairs([[3.0, 2.0, 1.0]], [7], [7, 7, 8], [0], [1, 0, 1])
    >>> pos.tolist(), neg.tolist()
    ([3.0], [1.0])
    """
    s = np.asarray(logits, dtype=np.float64)
    q_pids, g_pids, q_cams, g_cams = (np.asarray(a).reshape(-1) for a in (q_pids, g_pids, q_cams, g_cams))
    if s.ndim != 2 or s.shape != (len(q_pids), len(g_pids)) or len(q_cams) != len(q_pids) or len(g_cams) != len(
            g_pids):
        raise QAConvError(f"calibration: logits {s.shape} must be [Q, G] = ({len(q_pids)}, {len(g_pids)}), with "
                          f"{len(q_cams)} query and {len(g_cams)} gallery cameras")
    if not np.isfinite(s).all():
        raise QAConvError("calibration: the logits contain NaN or infinite values")
    usable = (q_cams[:, None] != g_cams[None, :]) & (q_pids[:, None] >= 0) & (g_pids[None, :] >= 0)
    same = q_pids[:, None] == g_pids[None, :]
    return s[usable & same], s[usable & ~same]


# -- ROC and operating points -------------------------------------------------------------------------------
def _check_scores(pos, neg) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = np.asarray(pos, dtype=np.float64).reshape(-1), np.asarray(neg, dtype=np.float64).reshape(-1)
    if not len(pos) or not len(neg):
        raise QAConvError(f"calibration needs positive and negative pairs, got {len(pos)} same-identity and "
                          f"{len(neg)} different-identity cross-camera pairs (are identities and cameras known?)")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise QAConvError("calibration: the scores contain NaN or infinite values")
    return pos, neg


def roc_curve(pos, neg) -> dict:
    """The ROC's corners: for each distinct positive score t (descending) ``threshold`` t, ``tar`` = TAR(t),
    ``far`` = FAR(t) with acceptance ``score >= t``; and ``auc`` (see :func:`auc`). The best TAR at any FAR is
    reached at one of these thresholds (lowering a threshold to the next positive score gains TAR, anything
    between only adds FAR).

    >>> r = roc_curve([3.0, 1.0], [2.0, 1.0])
    >>> r["threshold"].tolist(), r["tar"].tolist(), r["far"].tolist()
    ([3.0, 1.0], [0.5, 1.0], [0.0, 1.0])
    """
    pos, neg = _check_scores(pos, neg)
    t, mult = np.unique(pos, return_counts=True)  # ascending
    less, leq = _negatives_below(t, neg)
    tar = np.cumsum(mult[::-1]) / len(pos)  # positives >= t, for t descending
    far = (len(neg) - less[::-1]) / len(neg)
    area = float(np.sum(mult * (less + 0.5 * (leq - less))) / (len(pos) * len(neg)))
    return {"threshold": t[::-1], "tar": tar, "far": far, "auc": area}


def _negatives_below(t: np.ndarray, neg: np.ndarray, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """(#neg < t_k, #neg <= t_k) for ascending thresholds ``t``, by locating each negative among the thresholds
    (O(N log K), chunked, no sort of the N negatives)."""
    less, leq = np.zeros(len(t) + 1, dtype=np.int64), np.zeros(len(t) + 1, dtype=np.int64)
    for start in range(0, len(neg), chunk):
        part = neg[start : start + chunk]
        # a negative n is < t_k for every k >= #(t <= n), and <= t_k for every k >= #(t < n)
        less += np.bincount(np.searchsorted(t, part, side="right"), minlength=len(t) + 1)
        leq += np.bincount(np.searchsorted(t, part, side="left"), minlength=len(t) + 1)
    return np.cumsum(less)[:-1], np.cumsum(leq)[:-1]


def estimable(far: float, num_negative: int) -> bool:
    """Whether FAR ``far`` can be estimated from ``num_negative`` negative pairs (far >= 1/N)."""
    return far * num_negative >= 1 - 1e-9


def tar_at_far(pos, neg, fars=FARS, roc: dict | None = None) -> list[dict]:
    """For each FAR ``f``: ``{"far", "tar", "threshold", "far_achieved", "reason"}``, where ``tar`` is the
    largest TAR(t) with FAR(t) <= f, ``threshold`` the highest threshold reaching it and ``far_achieved``
    FAR(threshold). ``tar``/``threshold``/``far_achieved`` are None with a ``reason`` when f < 1/N (too few
    negatives) or when no positive pair scores above the negatives that FAR allows (then ``tar`` is 0.0)."""
    pos, neg = _check_scores(pos, neg)
    roc = roc_curve(pos, neg) if roc is None else roc
    out = []
    for f in fars:
        f = float(f)
        row = {"far": f, "tar": None, "threshold": None, "far_achieved": None, "reason": None}
        if not estimable(f, len(neg)):
            row["reason"] = (f"FAR {f:g} needs at least {math.ceil(1 / f - 1e-9):,} different-identity pairs, "
                             f"there are {len(neg):,} (a FAR below 1/{len(neg):,} cannot be estimated)")
        else:
            allowed = math.floor(f * len(neg) * (1 + 1e-9))  # false accepts FAR f allows
            ok = np.flatnonzero(np.round(roc["far"] * len(neg)) <= allowed)  # far rises as thresholds fall
            if not len(ok):
                row["tar"] = 0.0
                row["reason"] = f"no same-identity pair scores above the different-identity pairs FAR {f:g} allows"
            else:
                k = int(ok[-1])
                row.update(tar=float(roc["tar"][k]), threshold=float(roc["threshold"][k]),
                           far_achieved=float(roc["far"][k]))
        out.append(row)
    return out


def threshold_keeping(pos, tar: float = DIFFERENT_TAR) -> float:
    """The highest threshold t with TAR(t) >= ``tar``: the ceil(tar * P)-th highest positive score.

    >>> threshold_keeping([5.0, 4.0, 3.0, 2.0], 0.75)
    3.0
    """
    pos = np.sort(np.asarray(pos, dtype=np.float64).reshape(-1))[::-1]
    if not len(pos):
        raise QAConvError("calibration needs same-identity cross-camera pairs to place the 'different' band")
    if not 0 < tar <= 1:
        raise QAConvError(f"the kept fraction of true matches must be in (0, 1], got {tar}")
    k = min(len(pos), max(1, math.ceil(tar * len(pos) - 1e-9)))
    return float(pos[k - 1])


def auc(pos, neg) -> float:
    """Area under the ROC: P(positive > negative) + P(tie) / 2 over all pairs of a positive and a negative."""
    return roc_curve(pos, neg)["auc"]


# -- Platt scaling ------------------------------------------------------------------------------------------
def platt_loss(params, scores, targets, weights) -> float:
    """Weighted cross-entropy of sigmoid(a * score + b) against soft ``targets`` (``params`` = (a, b))."""
    z = params[0] * np.asarray(scores, dtype=np.float64) + params[1]
    # -t log s(z) - (1 - t) log(1 - s(z)) = log(1 + e^z) - t z, computed stably
    return float(np.sum(weights * (np.logaddexp(0.0, z) - targets * z)))


def fit_platt(scores, targets, weights, max_iter: int = 100, tol: float = 1e-12) -> tuple[float, float]:
    """(a, b) minimising :func:`platt_loss` by Newton's method with backtracking (Lin, Lin and Weng's
    safeguarded Platt scaling); the scores are standardised for the iteration and the result mapped back."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t, w = np.asarray(targets, dtype=np.float64).reshape(-1), np.asarray(weights, dtype=np.float64).reshape(-1)
    if not (len(s) == len(t) == len(w)) or not len(s):
        raise QAConvError(f"Platt fit: {len(s)} scores, {len(t)} targets and {len(w)} weights must agree (and > 0)")
    w = w / w.sum()
    mu = float(np.sum(w * s))
    sd = float(np.sqrt(np.sum(w * (s - mu) ** 2))) or 1.0
    x = (s - mu) / sd
    p = np.array([0.0, math.log((np.sum(w * t) + 1e-12) / (np.sum(w * (1 - t)) + 1e-12))])
    loss = platt_loss(p, x, t, w)
    for _ in range(max_iter):
        q = 1.0 / (1.0 + np.exp(-np.clip(p[0] * x + p[1], -700, 700)))
        r, h = w * (q - t), w * q * (1 - q)
        grad = np.array([np.sum(r * x), np.sum(r)])
        hess = np.array([[np.sum(h * x * x), np.sum(h * x)], [np.sum(h * x), np.sum(h)]]) + 1e-12 * np.eye(2)
        if np.max(np.abs(grad)) < tol:
            break
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-10:
            new = p - scale * step
            new_loss = platt_loss(new, x, t, w)
            if new_loss <= loss + 1e-4 * scale * float(grad @ -step):
                break
            scale /= 2
        else:
            break  # no decrease possible: at the minimum up to rounding
        p, loss = new, new_loss
    a, b = p[0] / sd, p[1] - p[0] * mu / sd
    return float(a), float(b)


def fit_calibration_model(pos, neg, max_pairs: int = PLATT_MAX_PAIRS, seed: int = 0) -> dict:
    """Platt scaling on positive and negative scores with class-balanced weights and Platt's targets; at most
    ``max_pairs`` of each class are used (a seeded subsample beyond). Returns the model's parameters and terms."""
    pos, neg = _check_scores(pos, neg)
    n_pos, n_neg = len(pos), len(neg)
    rng = np.random.default_rng(seed)
    fit_pos = pos if n_pos <= max_pairs else rng.choice(pos, max_pairs, replace=False)
    fit_neg = neg if n_neg <= max_pairs else rng.choice(neg, max_pairs, replace=False)
    scores = np.concatenate([fit_pos, fit_neg])
    targets = np.concatenate([np.full(len(fit_pos), (n_pos + 1) / (n_pos + 2)), np.full(len(fit_neg), 1 / (n_neg + 2))])
    weights = np.concatenate([np.full(len(fit_pos), 0.5 / len(fit_pos)), np.full(len(fit_neg), 0.5 / len(fit_neg))])
    a, b = fit_platt(scores, targets, weights)
    return {"method": "platt", "a": a, "b": b, "prior": 0.5, "weights": "class-balanced (each class one half)",
            "targets": [(n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2)],
            "fit_pairs": {"positive": len(fit_pos), "negative": len(fit_neg)}}


# -- a whole calibration --------------------------------------------------------------------------------------
def _stats(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


def thin_roc(roc: dict, max_points: int = 1000) -> dict[str, list[float]]:
    """At most ``max_points`` ROC corners (evenly along the TAR axis, first and last kept), as lists."""
    n = len(roc["threshold"])
    idx = np.unique(np.round(np.linspace(0, n - 1, min(n, max_points))).astype(int)) if n else np.zeros(0, int)
    return {k: [float(v) for v in np.asarray(roc[k])[idx]] for k in ("far", "tar", "threshold")}


def score_summary(pos, neg, fars=FARS, bins: int = 50, roc: dict | None = None) -> dict:
    """Counts, per-class statistics, AUC, TAR@FAR (:func:`tar_at_far`), a thinned ROC and histograms over
    shared bin edges, as JSON-ready values (``roc``: :func:`roc_curve` of the scores, when computed already)."""
    pos, neg = _check_scores(pos, neg)
    roc = roc_curve(pos, neg) if roc is None else roc
    lo, hi = float(min(pos.min(), neg.min())), float(max(pos.max(), neg.max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return {
        "pairs": {"positive": len(pos), "negative": len(neg)},
        "positive": _stats(pos),
        "negative": _stats(neg),
        "auc": roc["auc"],
        "tar_at_far": tar_at_far(pos, neg, fars, roc),
        "roc": thin_roc(roc),
        "histogram": {"edges": edges.tolist(), "positive": np.histogram(pos, edges)[0].tolist(),
                      "negative": np.histogram(neg, edges)[0].tolist()},
    }


def verdict_bands(pos, neg, same_far: float = SAME_FAR, different_tar: float = DIFFERENT_TAR,
                  roc: dict | None = None) -> dict:
    """Thresholds of the verdict bands: ``same_threshold`` at FAR ``same_far`` (raised to 1/N when the N negatives
    cannot estimate it; None when no positive pair scores above the negatives that FAR allows) and
    ``different_threshold`` keeping ``different_tar`` of the positive pairs (:func:`threshold_keeping`)."""
    pos, neg = _check_scores(pos, neg)
    used = same_far if estimable(same_far, len(neg)) else 1.0 / len(neg)
    point = tar_at_far(pos, neg, [used], roc)[0]
    note = "" if used == same_far else (f"FAR {same_far:g} needs {math.ceil(1 / same_far - 1e-9):,} different-"
                                        f"identity pairs, the calibration set has {len(neg):,}: the band uses FAR "
                                        f"1/{len(neg):,}")
    return {"same_threshold": point["threshold"], "same_far": used, "same_far_requested": same_far,
            "same_tar": point["tar"], "different_threshold": threshold_keeping(pos, different_tar),
            "different_tar": different_tar, "note": note}


def calibrate_scores(pos, neg, fars=FARS, same_far: float = SAME_FAR, different_tar: float = DIFFERENT_TAR) -> dict:
    """The calibration content of positive/negative pair scores: :func:`score_summary`, ``bands``
    (:func:`verdict_bands`) and ``platt`` (:func:`fit_calibration_model`)."""
    roc = roc_curve(pos, neg)
    out = score_summary(pos, neg, fars, roc=roc)
    out["bands"] = verdict_bands(pos, neg, same_far, different_tar, roc)
    out["platt"] = fit_calibration_model(pos, neg)
    return out


def probability(logit, calibration: dict, prior: float = 0.5):
    """P(same identity | logit) of the calibration's Platt model, for pairs whose prior probability of being
    the same identity is ``prior`` (the fit's class-balanced weights correspond to 0.5)."""
    if not 0 < prior < 1:
        raise QAConvError(f"the prior probability of 'same person' must be in (0, 1), got {prior}")
    m = calibration["platt"]
    shift = math.log(prior / (1 - prior)) - math.log(m["prior"] / (1 - m["prior"]))
    z = m["a"] * np.asarray(logit, dtype=np.float64) + m["b"] + shift
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
    return float(p) if np.ndim(p) == 0 else p


def verdict(logit: float, calibration: dict | None, prior: float = 0.5) -> dict:
    """The verdict on one pair's QAConv logit (probe x gallery, as evaluated and calibrated).

    Returns ``{"logit", "calibrated", "verdict", "probability", "prior", "bands", "message"}``: ``verdict`` is
    "same person" (logit >= ``bands.same_threshold``), "different" (logit < ``bands.different_threshold``) or
    "uncertain" (between; see the module docstring), ``probability`` P(same | logit) at ``prior``
    (:func:`probability`), ``message`` one printable line. Without a calibration (None) ``verdict``,
    ``probability``, ``prior`` and ``bands`` are None and the message says that the score is uncalibrated.
    For many pairs call it per pair, e.g. on each search result's ``score`` (only plain QAConv logits: not on
    TLift-lifted similarities)."""
    logit = float(logit)
    if calibration is None:
        return {"logit": logit, "calibrated": False, "verdict": None, "probability": None, "prior": None,
                "bands": None, "message": f"none, the score is uncalibrated (logit {logit:.3f} alone says little); "
                                          f"{HOW_TO}"}
    bands = calibration["bands"]
    same, diff = bands["same_threshold"], bands["different_threshold"]
    if same is not None and logit >= same:
        word = "same person"
    elif logit < diff:
        word = "different"
    else:
        word = "uncertain"
    p = probability(logit, calibration, prior)
    same_text = f"same if >= {same:.3f} (FAR {bands['same_far']:.2g})" if same is not None else "no 'same' band"
    message = (f"{word}: P(same) = {p:.3f} at a {100 * prior:g}% prior (logit {logit:.3f}; {same_text}, "
               f"different if < {diff:.3f} (keeps {100 * bands['different_tar']:g}% of true matches))")
    return {"logit": logit, "calibrated": True, "verdict": word, "probability": p, "prior": prior,
            "bands": {"same_at_or_above": same, "different_below": diff}, "message": message}


# -- files --------------------------------------------------------------------------------------------------
def calibration_path(checkpoint) -> Path:
    """``calibration.json`` beside a checkpoint (in its folder, or in the folder given)."""
    ckpt = Path(checkpoint)
    return (ckpt if ckpt.is_dir() else ckpt.parent) / FILE_NAME


def save_calibration(calibration: dict, path) -> Path:
    """Write ``calibration`` as JSON, atomically (readers see the old file or the new one)."""
    text = json.dumps(calibration, indent=1, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_calibration(path, identity: dict | None = None) -> dict:
    """A calibration written by :func:`save_calibration`; with ``identity`` (:func:`model_identity` of the model
    to use it with) one made for another model is refused in one line."""
    path = Path(path)
    try:
        cal = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QAConvError(f"calibration {path} does not exist: {HOW_TO}") from None
    except (OSError, ValueError) as exc:
        raise QAConvError(f"calibration {path} cannot be read: {str(exc).splitlines()[0]}") from None
    need = {"bands": ("same_threshold", "different_threshold", "same_far", "different_tar"),
            "platt": ("a", "b", "prior"), "model": ("hash",)}
    if not isinstance(cal, dict) or cal.get("format") != FORMAT or not all(
            isinstance(cal.get(k), dict) and all(f in cal[k] for f in fields) for k, fields in need.items()):
        raise QAConvError(f"{path} is not a qaconv calibration (expected format '{FORMAT}' from 'qaconv calibrate')")
    if identity is not None and (cal["model"]["hash"] != identity["hash"]
                                 or list(cal["model"].get("feature_shape", [])) != list(identity["feature_shape"])):
        raise QAConvError(
            f"{path} calibrates another model (checkpoint {cal['model'].get('checkpoint')}, hash "
            f"{str(cal['model']['hash'])[:12]}), not {identity['checkpoint']} (hash {identity['hash'][:12]}): "
            "recalibrate with 'qaconv calibrate' or delete it"
        )
    return cal


def find_calibration(checkpoint, identity: dict | None = None, path=None) -> dict | None:
    """The calibration at ``path`` (default: :func:`calibration_path` of ``checkpoint``) checked against
    ``identity``; None when no file is there (an explicitly given ``path`` must exist)."""
    if path is None:
        path = calibration_path(checkpoint)
        if not path.exists():
            return None
    return load_calibration(path, identity)


def calibrate_checkpoint(checkpoint, testsets, data_dir=None, device=None, workers: int = 0,
                         fea_batch: int = 64, match_memory: float = 512.0, strict: bool = False, fars=FARS,
                         same_far: float = SAME_FAR, different_tar: float = DIFFERENT_TAR,
                         progress: bool = True) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Calibrate ``checkpoint`` on the labelled test sets ``testsets`` (comma-separated or a list; their pairs
    are pooled): features and exhaustive QAConv scores as ``qaconv evaluate`` computes them
    (:func:`qaconv.engine.evaluator.evaluate_dataset`, no post-processing), then :func:`cross_camera_pairs` and
    :func:`calibrate_scores`. Returns the calibration (with the model identity, ready for
    :func:`save_calibration`) and each test set's (positive, negative) scores, keyed by short test-set names
    (:func:`qaconv.names.short_names`). ``data_dir`` as for :func:`qaconv.data.load_dataset` (None: ``./data``
    for benchmarks, the cache folder for synthetic domains)."""
    from .data.registry import load_dataset
    from .engine.evaluator import evaluate_dataset
    from .extractor import FeatureExtractor
    from .gallery.index import model_identity
    from .names import short_names

    names = [t.strip() for t in testsets.split(",")] if isinstance(testsets, str) else [str(t) for t in testsets]
    names = [n for n in names if n]
    if not names:
        raise QAConvError("no test sets given: pass --testsets NAME[,NAME...] (a labelled set: identities known)")
    extractor = FeatureExtractor(checkpoint, device=device)
    identity = model_identity(extractor)
    cfg = {**extractor.cfg, "data_dir": data_dir, "device": device, "workers": workers, "fea_batch": fea_batch,
           "match_memory": match_memory, "strict": strict, "rerank": False, "tlift": False, "tlift_direct": False,
           "two_stage": 0, "save_scores": False, "report": None}
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shown = short_names(names)
    for name in names:
        data = load_dataset(name, data_dir, progress=progress, require=("query", "gallery"))
        data.name = shown[name]
        kept: dict = {}
        evaluate_dataset(extractor.model, extractor.matcher, data, cfg, progress=progress, keep=kept)
        data = kept["data"]
        pairs[data.name] = cross_camera_pairs(-kept["dists"][""], [r.pid for r in data.query],
                                         [r.pid for r in data.gallery], [r.camid for r in data.query],
                                         [r.camid for r in data.gallery])
    pos = np.concatenate([p for p, _ in pairs.values()])
    neg = np.concatenate([n for _, n in pairs.values()])
    cal = {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "model": {**identity, "feature_shape": list(identity["feature_shape"])},
           "score": "QAConv logit" if cfg.get("matcher", "qaconv") == "qaconv" else f"{cfg.get('matcher')} score",
           "testsets": list(pairs),
           "pairs_definition": "query x gallery pairs from different cameras; positive = same identity; junk "
                               "(pid -1) excluded, distractors are negatives",
           **calibrate_scores(pos, neg, fars, same_far, different_tar)}
    if len(pairs) > 1:
        cal["per_testset"] = {n: {k: v for k, v in score_summary(p, q, fars).items() if k in ("pairs", "auc",
                                                                                             "tar_at_far")}
                              for n, (p, q) in pairs.items()}
    return cal, pairs


def format_table(calibration: dict) -> str:
    """A short text table: pair counts, AUC, TAR@FAR with thresholds (or why not), the bands and the model."""
    pairs, bands, platt = calibration["pairs"], calibration["bands"], calibration["platt"]
    lines = [f"{pairs['positive']:,} same-identity and {pairs['negative']:,} different-identity cross-camera pairs; "
             f"AUC {calibration['auc']:.4f}",
             f"{'FAR':>8s}  {'TAR':>7s}  {'threshold':>10s}  {'FAR there':>9s}"]
    for row in calibration["tar_at_far"]:
        if row["threshold"] is None:
            tar = "-" if row["tar"] is None else f"{100 * row['tar']:6.2f}%"
            lines.append(f"{row['far']:8.0e}  {tar:>7s}  {'-':>10s}  {'-':>9s}  {row['reason']}")
        else:
            lines.append(f"{row['far']:8.0e}  {100 * row['tar']:6.2f}%  {row['threshold']:10.4f}  "
                         f"{row['far_achieved']:9.2e}")
    same = bands["same_threshold"]
    same_text = (f"same person if logit >= {same:.4f} (FAR {bands['same_far']:.2g})" if same is not None else
                 f"never 'same person' (no same-identity pair scores above the negatives FAR {bands['same_far']:.2g} "
                 "allows)")
    lines.append(f"verdict: {same_text}; different if logit < {bands['different_threshold']:.4f} "
                 f"(keeps {100 * bands['different_tar']:g}% of true matches); uncertain between")
    if bands.get("note"):
        lines.append(f"  note: {bands['note']}")
    sign = "+" if platt["b"] >= 0 else "-"
    lines.append(f"P(same) = sigmoid({platt['a']:.4f} * logit {sign} {abs(platt['b']):.4f}) (Platt, class-balanced: "
                 f"{100 * platt['prior']:g}% prior)")
    return "\n".join(lines)


def plot_calibration(calibration: dict, path, title: str = "QAConv scores") -> Path:
    """The calibration's histograms and ROC (:func:`qaconv.viz.curves.plot_score_distributions`) into ``path``."""
    from .viz.curves import plot_score_distributions

    b = calibration["bands"]
    lines = {f"{word} {op} {b[key]:.3g}": b[key] for word, op, key in (
        ("same", ">=", "same_threshold"), ("different", "<", "different_threshold")) if b[key] is not None}
    return plot_score_distributions(calibration["histogram"], calibration["roc"], calibration["tar_at_far"], path,
                                    num_negative=calibration["pairs"]["negative"], title=title, lines=lines)
