"""Protocol checks behind ``qaconv data info``: split statistics and why queries cannot be evaluated.

A query is *evaluable* when the gallery holds an image of its identity from another camera (the
Market-1501 protocol discards same-identity same-camera gallery images as junk).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from ..errors import QAConvError
from .market import ReidDataset
from .records import Record

SPLIT_NAMES = ("train", "query", "gallery")


def _non_evaluable(query: Sequence[Record], gallery: Sequence[Record]) -> tuple[list[Record], set[int], set[int]]:
    """Non-evaluable queries, and their identities split into absent from the gallery / same camera only."""
    gallery_cams: dict[int, set[int]] = defaultdict(set)
    for r in gallery:
        gallery_cams[r.pid].add(r.camid)
    bad = [q for q in query if not (gallery_cams.get(q.pid, set()) - {q.camid})]
    absent = {q.pid for q in bad if q.pid not in gallery_cams}
    same_cam = {q.pid for q in bad} - absent
    return bad, absent, same_cam


def check_evaluable(query: Sequence[Record], gallery: Sequence[Record]) -> int:
    """Number of queries that cannot be evaluated; raises :class:`QAConvError` when none can."""
    if not query:
        raise QAConvError("the query split is empty: nothing to evaluate")
    if not gallery:
        raise QAConvError("the gallery split is empty: queries have nothing to be matched against")
    bad, absent, same_cam = _non_evaluable(query, gallery)
    if len(bad) == len(query):
        raise QAConvError(
            f"none of the {len(query)} queries can be evaluated: a query needs a gallery image of the same "
            f"identity from another camera (same-camera matches are ignored, as in Market-1501); "
            f"{len(absent)} query identities have no gallery image at all and {len(same_cam)} have gallery "
            f"images only from the query's own camera; check that query and gallery share identity ids "
            f"and that camid holds camera ids, not e.g. a constant"
        )
    return len(bad)


def _time_range(recs: Sequence[Record]) -> tuple[float, float] | None:
    times = [r.time for r in recs]
    if not times or any(t is None for t in times):
        return None
    return (min(times), max(times))


def protocol_report(dataset: ReidDataset) -> dict:
    """Statistics and warnings of a dataset as plain data (JSON-serialisable).

    Keys: ``splits`` (per split ``ids``, ``images``, ``cameras``, ``camera_ids``, ``camera_labels`` (the user's
    labels of those ids), ``time_range`` as ``[min, max]`` seconds or None when any image lacks a time),
    ``use`` (``training and evaluation``, ``training only`` or ``evaluation only``: which splits hold images),
    ``has_time``, ``junk_dropped``, ``queries_not_evaluable``, ``not_evaluable_ids_absent`` (identities of
    those queries with no gallery image at all), ``not_evaluable_ids_same_camera`` (the others: gallery images
    only from the query's camera), ``train_single_image_ids``, ``empty_splits``, ``skipped_files`` (non-image
    files met in the dataset's folders, with ``skipped_examples``) and ``warnings`` (sentences). An empty train
    split of an evaluation-only set, or empty query and gallery splits of a training-only set, are no warning.
    """
    splits = {}
    for split in SPLIT_NAMES:
        recs = getattr(dataset, split)
        cams = sorted({r.camid for r in recs})
        tr = _time_range(recs)
        splits[split] = {
            "ids": len({r.pid for r in recs}),
            "images": len(recs),
            "cameras": len(cams),
            "camera_ids": cams,
            "camera_labels": [dataset.cam_label(c) for c in cams],
            "time_range": list(tr) if tr is not None else None,
        }
    bad, absent, same_cam = _non_evaluable(dataset.query, dataset.gallery)
    per_id = Counter(r.pid for r in dataset.train)
    single = sum(1 for n in per_id.values() if n == 1)
    empty = [s for s in SPLIT_NAMES if not getattr(dataset, s)]
    train, evaluation = bool(dataset.train), bool(dataset.query and dataset.gallery)
    use = {(True, True): "training and evaluation", (True, False): "training only",
           (False, True): "evaluation only"}.get((train, evaluation), "neither training nor evaluation")

    warnings = []
    if not train and not evaluation:
        warnings.append(f"empty split(s): {', '.join(empty)}: nothing to train on or to evaluate")
    elif not evaluation and (dataset.query or dataset.gallery):
        have, lacking = ("query", "gallery") if dataset.query else ("gallery", "query")
        warnings.append(f"empty split: {lacking} (the {have} images cannot be evaluated without it)")
    if dataset.query and dataset.gallery and bad:
        all_bad = " (no query can be evaluated)" if len(bad) == len(dataset.query) else ""
        warnings.append(
            f"{len(bad)} of {len(dataset.query)} queries have no gallery image of their identity from another "
            f"camera and are skipped in evaluation{all_bad}: {len(absent)} identities have no gallery image "
            f"at all, {len(same_cam)} only from the query's own camera"
        )
    if single:
        warnings.append(
            f"{single} of {len(per_id)} train identities have a single image (no positive pair for pairwise losses)"
        )
    return {
        "name": dataset.name,
        "root": dataset.root,
        "splits": splits,
        "has_time": dataset.has_time,
        "junk_dropped": dict(dataset.junk_dropped),
        "queries_not_evaluable": len(bad),
        "not_evaluable_ids_absent": len(absent),
        "not_evaluable_ids_same_camera": len(same_cam),
        "train_single_image_ids": single,
        "empty_splits": empty,
        "use": use,
        "skipped_files": len(dataset.skipped),
        "skipped_examples": dataset.skipped[:5],
        "warnings": warnings,
    }


def format_info(dataset: ReidDataset, report: dict) -> str:
    """Human-readable text of :func:`protocol_report` for ``qaconv data info``."""
    lines = [f"dataset {dataset.name} ({dataset.root}): {report.get('use', 'training and evaluation')}"]
    for split in SPLIT_NAMES:
        s = report["splits"][split]
        tr = s["time_range"]
        when = f"time {tr[0]:.1f}-{tr[1]:.1f} s" if tr is not None else "no time stamps"
        junk = report["junk_dropped"].get(split, 0)
        lines.append(
            f"  {split:8s} {s['ids']:6d} ids {s['images']:7d} images {s['cameras']:3d} cameras  {when}"
            + (f"  ({junk} junk dropped)" if junk else "")
        )
        if s.get("camera_labels") and s["camera_labels"] != [f"c{c + 1}" for c in s["camera_ids"]]:
            lines.append(f"  {'':8s} cameras: {', '.join(s['camera_labels'])}")
    if dataset.skipped:
        lines.append(dataset.skipped_note())
    if report["warnings"]:
        lines.extend(f"warning: {w}" for w in report["warnings"])
    else:
        lines.append("no problems found")
    return "\n".join(lines)
