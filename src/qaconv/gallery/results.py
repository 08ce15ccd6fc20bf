"""``qaconv search`` end to end: a :class:`~qaconv.gallery.queries.QuerySet` searched in a
:class:`~qaconv.gallery.api.Gallery`, answered as JSON-ready dicts and as a text table.

One dict per query (a crop or a tracklet): ``query`` (its name), ``crops`` (its image paths), ``pid``, ``cam``,
``time`` (earliest crop), ``track``, ``score_kind`` (what the scores are, in words), ``aggregate`` (``mean`` /
``max`` over crop pairs, or None), ``same_camera_excluded`` (bool), ``calibrated`` (bool), ``verdict_note``
(why the hits carry no verdict, or None) and ``results`` (the hits of :meth:`Gallery.search`; ``query_crop`` as
the crop's path; with a calibration each hit also has ``verdict`` and ``p_same``, see
:func:`qaconv.calibrate.verdict`). Every numeric field is a number, every unknown value None.

Verdicts need one pair's QAConv logit, which is what ``qaconv calibrate`` measured: they are given for crop
queries ranked by QAConv logits, not for tracklet aggregates (a mean or max over many crop pairs is distributed
otherwise) nor for TLift-lifted similarities.
"""

from __future__ import annotations

import math

import numpy as np

from ..calibrate import HOW_TO, verdict
from ..errors import QAConvError
from .queries import QuerySet, expand

TLIFT_KIND = "TLift-lifted similarity"
LOGIT_KIND = "QAConv logit"


def _per_query(text: str, qs: QuerySet, kind, name: str) -> list:
    """``--name`` values: one, or one per query (comma-separated), repeated for each crop of a query."""
    values = [v.strip() for v in text.split(",")]
    if len(values) not in (1, len(qs)):
        raise QAConvError(f"--{name} needs one value or {len(qs)} (one per query), got {len(values)}")
    try:
        values = [kind(v) for v in values]
    except ValueError:
        raise QAConvError(f"--{name} values must be {kind.__name__}s, got '{text}'") from None
    return expand(values * len(qs) if len(values) == 1 else values, qs)


def _common(values):
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def search_queries(gallery, qs: QuerySet, maps, *, top: int = 10, candidates: int = 100, exhaustive=None,
                   cameras=None, time_window=None, exclude_same_camera=None, query_cam: str | None = None,
                   query_time: str | None = None, tlift: dict | None = None, aggregate: str = "mean",
                   group_tracks: bool = False, calibration: dict | None = None) -> list[dict]:
    """Search ``gallery`` with the queries ``qs`` (their feature maps ``maps``, one per crop) and answer one dict
    per query (module docstring). ``query_cam`` / ``query_time``: comma-separated, one or one per query (not
    with cameras or times the query set already has). ``exclude_same_camera``: None = for each query whose
    camera is known. ``tlift``: TLift's parameters (tau, sigma, tlift_k, alpha), or None for QAConv logits.
    ``calibration``: a :func:`qaconv.calibrate.load_calibration` result for verdicts (module docstring).
    Camera labels no entry has (filters or queries) are refused, listing the store's."""
    if query_cam is not None and qs.cams is not None:
        raise QAConvError("--query-cam does not combine with --cam-from-folder or --query-manifest (they give the "
                          "cameras)")
    if query_time is not None and qs.times is not None:
        raise QAConvError("--query-time does not combine with a query manifest's 'time' column")
    labels = qs.cams if qs.cams is not None else _per_query(query_cam, qs, str, "query-cam") if query_cam else None
    times = qs.times if qs.times is not None else \
        _per_query(query_time, qs, float, "query-time") if query_time else None
    pids, _, labels, q_times, _ = gallery.query_metadata([p.name for p in qs.paths], labels, times)
    if qs.pids is not None:
        pids = np.asarray(qs.pids, dtype=np.int64)
    gallery.check_cameras(labels, "query camera")
    if cameras is not None:
        gallery.check_cameras(cameras, "--cameras label")
    grouped = qs.groups is not None or group_tracks
    kw = dict(top=top, candidates=candidates, exhaustive=exhaustive, cameras=cameras, time_window=time_window,
              query_cameras=labels, exclude_same_camera=exclude_same_camera)
    if tlift is not None:
        if grouped:
            raise QAConvError("--tlift ranks single crops: it does not combine with tracklet queries or "
                              "--group-tracks")
        if not np.isfinite(q_times).all() or any(not lab for lab in labels):
            raise QAConvError("--tlift needs each query's camera and time: Market-style names, --query-cam/-time, "
                              "or a query manifest with camid and time")
        ranked = gallery.tlift_search(maps, query_times=times, query_names=[p.name for p in qs.paths], **tlift, **kw)
        kind = TLIFT_KIND
    elif grouped:
        ranked = gallery.search(maps, query_tracks=qs.groups, aggregate=aggregate, group_by_track=group_tracks, **kw)
        kind = f"{aggregate} of the QAConv logits of crop pairs"
    else:
        ranked = gallery.search(maps, **kw)
        kind = LOGIT_KIND
    note = _verdict_note(kind, calibration)
    out = []
    for qi, crops in enumerate(qs.crops_of()):
        cam = _common(labels[i] for i in crops) or None
        pid = _common(int(pids[i]) for i in crops)
        t = [float(q_times[i]) for i in crops if math.isfinite(q_times[i])]
        hits = ranked[qi]
        for h in hits:
            if "query_crop" in h:
                h["query_crop"] = str(qs.paths[h["query_crop"]])
            if calibration is not None:
                v = verdict(h["score"], calibration) if note is None else None
                h["verdict"], h["p_same"] = (v["verdict"], v["probability"]) if v else (None, None)
        out.append({"query": qs.names[qi], "crops": [str(qs.paths[i]) for i in crops],
                    "pid": pid if pid is not None and pid >= 0 else None, "cam": cam, "time": min(t) if t else None,
                    "track": qs.tracks[qi], "score_kind": kind, "aggregate": aggregate if grouped else None,
                    "same_camera_excluded": bool(cam) and exclude_same_camera is not False,
                    "calibrated": calibration is not None, "verdict_note": note, "results": hits})
    return out


def _verdict_note(kind: str, calibration: dict | None) -> str | None:
    """Why the hits carry no verdict (None when they do)."""
    if calibration is None:
        return f"scores are uncalibrated: {HOW_TO}"
    if kind != LOGIT_KIND:
        return f"no verdict on a {kind} (the calibration is of one pair's QAConv logit)"
    return None


def format_results(results: list[dict], printable=str) -> str:
    """The text table of ``qaconv search``: per query a header line and one line per hit."""
    lines = []
    for res in results:
        what = [f"pid {res['pid'] if res['pid'] is not None else '-'}", f"cam {printable(res['cam'] or '-')}"]
        if len(res["crops"]) > 1:
            what.append(f"{len(res['crops'])} crops")
        note = "; same-camera entries excluded" if res["same_camera_excluded"] else ""
        lines.append(f"query {printable(res['query'])} ({', '.join(what)}); score = {res['score_kind']}{note}")
        if res.get("verdict_note"):
            lines.append(f"  ({res['verdict_note']})")
        verdicts = any(h.get("verdict") for h in res["results"])
        tracks = any(h.get("track") for h in res["results"]) or any("crops" in h for h in res["results"])
        head = f"{'rank':>4s} {'score':>9s} {'pid':>6s} {'cam':>6s}" + (f" {'track':>8s} {'crops':>5s}" if tracks
                                                                           else "")
        if verdicts:
            head += f" {'verdict':>11s} {'P(same)':>7s}"
        lines.append(f"{head}  path")
        for h in res["results"]:
            row = f"{h['rank']:4d} {h['score']:9.4f} {h['pid'] if h['pid'] is not None else '-':>6} " \
                  f"{printable(h['cam'] or '-'):>6s}"
            if tracks:
                row += f" {printable(h.get('track') or '-'):>8s} {h.get('crops', 1):5d}"
            if verdicts:
                row += f" {h['verdict']:>11s} {h['p_same']:7.3f}"
            lines.append(f"{row}  {printable(h['path'])}")
        if not res["results"]:
            lines.append("  (no gallery entry passes the filters)")
    return "\n".join(lines)
