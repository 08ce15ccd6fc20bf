"""Self-contained HTML report of an evaluation: metrics table, CMC curves, score histograms with the ROC and
TAR@FAR, ranked lists and match pictures.

The report folder holds ``index.html`` and every picture it shows (thumbnails, CMC curves, QAConv match
drawings), linked by relative paths, so it opens from disk without a server and without network access.
Ranked lists follow the metric's protocol: gallery images of the query's identity *and* camera (junk) are
left out and ranks count the remaining images, as in CMC/mAP; a green border marks the query's identity,
a red one another identity.

Typical use, after :func:`qaconv.engine.evaluator.evaluate_dataset` kept its data (``keep={}``)::

    section = report_testset("report", data, dists, q_maps, g_maps, matcher, results, image_size=(384, 128))
    write_report("report", [section], results)  # -> report/index.html
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch

from .atomic import atomic_write
from .errors import QAConvError, writing
from .metrics import per_query
from .names import safe_stem
from .progress import progress_bar

THUMB_HEIGHT = 96


@dataclass
class Shown:
    """One gallery image in a ranked list: gallery index, 1-based rank among non-junk images, score."""

    gallery: int
    rank: int
    score: float
    same_pid: bool
    match_png: str | None = None  # relative path of its match picture, when one was drawn


@dataclass
class QueryRow:
    """A query's ranked list: the ``top`` best non-junk gallery images, plus its first true match when
    that lies below them (``first_true``)."""

    query: int
    ap: float
    first_rank: int  # 1-based rank of the first true match
    shown: list[Shown]
    first_true: Shown | None = None
    junk: int = 0  # junk images the list skipped above its last shown image

    def all_shown(self) -> list[Shown]:
        return self.shown + ([self.first_true] if self.first_true is not None else [])


@dataclass
class Section:
    """One test set of the report: rendered HTML and the files it refers to (relative to the report)."""

    name: str
    html: str
    files: list[str] = field(default_factory=list)


def choose_queries(ap, valid, num_worst: int = 10, num_random: int = 10, seed: int = 0):
    """Query indices to show: the ``num_worst`` valid queries of lowest AP (ties: lower index first), and
    ``num_random`` valid queries drawn without replacement by ``numpy.random.default_rng(seed)``, sorted.

    >>> worst, rand = choose_queries([0.5, 0.2, 1.0, 0.2], [True, True, True, False], 2, 1)
    >>> worst.tolist()
    [1, 0]
    """
    ap, valid = np.asarray(ap, dtype=np.float64), np.asarray(valid, dtype=bool)
    if ap.shape != valid.shape or ap.ndim != 1:
        raise ValueError(f"ap and valid must be 1-D arrays of one length, got {ap.shape} and {valid.shape}")
    idx = np.flatnonzero(valid)
    worst = idx[np.argsort(ap[idx], kind="stable")[: max(0, num_worst)]]
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(idx, size=min(max(0, num_random), len(idx)), replace=False))
    return worst, sample


def build_rows(dist, scores, q_pids, g_pids, q_cams, g_cams, queries, top: int = 10) -> list[QueryRow]:
    """Ranked lists of ``queries``: gallery by stable ascending ``dist`` (as the metrics sort), junk (same
    identity and camera) removed; ``scores`` [Q, G] is what each thumbnail shows (larger = more similar).

    >>> rows = build_rows([[0.1, 0.3, 0.2]], [[0.9, 0.7, 0.8]], [1], [1, 1, 2], [0], [0, 1, 1], [0], top=1)
    >>> [(s.gallery, s.rank, s.same_pid) for s in rows[0].all_shown()], rows[0].junk
    ([(2, 1, False), (1, 2, True)], 1)
    """
    dist, scores = np.asarray(dist), np.asarray(scores)
    q_pids, g_pids, q_cams, g_cams = (np.asarray(a) for a in (q_pids, g_pids, q_cams, g_cams))
    if dist.shape != scores.shape or dist.shape != (len(q_pids), len(g_pids)):
        raise ValueError(f"dist {dist.shape} and scores {scores.shape} must be [Q, G] = {(len(q_pids), len(g_pids))}")
    out = []
    for q in map(int, queries):
        order = np.argsort(dist[q], kind="stable")
        same = g_pids[order] == q_pids[q]
        junk = same & (g_cams[order] == q_cams[q])
        kept, kept_same = order[~junk], same[~junk]
        ap = float(per_query(dist[q : q + 1], q_pids[q : q + 1], g_pids, q_cams[q : q + 1], g_cams)["ap"][0])
        hits = np.flatnonzero(kept_same)
        first = int(hits[0]) if len(hits) else -1
        def shown(pos: int, q=q, kept=kept, kept_same=kept_same) -> Shown:
            g = int(kept[pos])
            return Shown(g, pos + 1, float(scores[q, g]), bool(kept_same[pos]))

        row = QueryRow(q, ap, first + 1, [shown(p) for p in range(min(top, len(kept)))])
        if first >= top:
            row.first_true = shown(first)
        last = row.shown[-1].gallery if row.shown else None
        row.junk = int(junk[: int(np.flatnonzero(order == last)[0]) + 1].sum()) if last is not None else 0
        out.append(row)
    return out


def check_report_dir(out_dir) -> Path:
    """Create the report folder ``out_dir`` (parents too) or raise QAConvError when that is impossible."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise QAConvError(f"report folder {out_dir} is a file; expected a folder (it is created if missing)") from None
    return out_dir


def _thumb(src: str, dest: Path, height: int = THUMB_HEIGHT) -> None:
    """A JPEG copy of image ``src`` scaled to ``height`` pixels (aspect kept)."""
    from PIL import Image

    from .data.images import read_rgb

    img = read_rgb(src)
    width = max(1, round(img.width * height / img.height))
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.resize((width, height), Image.Resampling.BICUBIC).save(dest, quality=90)


def _match_png(matcher, q_map, g_map, q_path, g_path, dest: Path, image_size, label: str) -> None:
    """Draw QAConv's correspondences of one query/gallery pair with its exact eval-mode logit in the title
    (see :func:`qaconv.viz.match.draw_match`)."""
    from .viz.match import draw_match

    param = next(matcher.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    was_training = matcher.training
    matcher.eval()
    try:
        with torch.inference_mode():
            q, g = q_map.to(dev).float(), g_map.to(dev).float()
            corr = matcher.correspondences(q, g)
            logit = float(matcher(q[None], g[None])[0, 0])
    finally:
        matcher.train(was_training)
    draw_match(q_path, g_path, corr, logit, dest, feature_size=tuple(q_map.shape[-2:]), image_size=image_size,
               labels=("query", label))


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _img(src: str, cls: str, title: str, extra: str = "") -> str:
    """An <img> whose load state the page records (data-state ok/broken; broken ones are outlined)."""
    return (f'<img src="{quote(src)}" class="{cls}" title="{html.escape(title)}" alt="{html.escape(title)}"{extra} '
            "onload=\"this.dataset.state='ok'\" onerror=\"this.dataset.state='broken'\">")


def _cam(data, camid: int) -> str:
    """The camera label the user gave (a manifest's camid value, ``c3`` for Market names)."""
    label = getattr(data, "cam_label", None)
    return label(camid) if label is not None else f"c{camid + 1}"


def _render_rows(rows: list[QueryRow], data, prefix: str, group: str) -> str:
    q_recs, g_recs = data.query, data.gallery
    parts = []
    for row in rows:
        q = q_recs[row.query]
        q_title = f"{Path(q.path).name}  id {q.pid}  cam {_cam(data, q.camid)}"
        q_attr = f' data-q="{row.query}"'
        match_link = next((s.match_png for s in row.all_shown() if s.match_png and s.rank == 1), None)
        link = f'<a href="{quote(match_link)}">rank-1 match</a>' if match_link else ""
        cells = [
            f'<td class="qcell">{_img(f"{prefix}/thumbs/q{row.query:05d}.jpg", "q", q_title, q_attr)}'
            f'<div class="cap">q{row.query} · id {html.escape(str(q.pid))} · {html.escape(_cam(data, q.camid))}</div>'
            f'<div class="cap">AP {100 * row.ap:.1f}% · 1st hit #{row.first_rank}</div><div class="cap">{link}</div>'
            "</td>"
        ]
        for s in row.all_shown():
            g = g_recs[s.gallery]
            title = f"{Path(g.path).name}  id {g.pid}  cam {_cam(data, g.camid)}  rank {s.rank}  score {s.score:.4f}"
            data_attr = f' data-q="{row.query}" data-g="{s.gallery}" data-rank="{s.rank}"'
            img = _img(f"{prefix}/thumbs/g{s.gallery:05d}.jpg", "pos" if s.same_pid else "neg", title, data_attr)
            if s.match_png:
                img = f'<a href="{quote(s.match_png)}" title="match picture">{img}</a>'
            gap = '<td class="gap">…</td>' if s is row.first_true else ""
            star = " ⤢" if s.match_png else ""
            cells.append(f'{gap}<td><div class="g">{img}</div>'
                         f'<div class="cap"><b>#{s.rank}</b> {_fmt(s.score)}{star}</div></td>')
        junk = f'<td class="gap junk">{row.junk} junk skipped</td>' if row.junk else ""
        parts.append(f"<tr>{''.join(cells)}{junk}</tr>")
    return f'<table class="ranks" data-group="{group}">' + "".join(parts) + "</table>"


def _scores_html(data, logits, folder: Path, prefix: str) -> tuple[str, list[str]]:
    """The test set's score distributions: a PNG of the same/different-identity cross-camera logit histograms
    and the ROC (:func:`qaconv.viz.curves.plot_score_distributions`) and a TAR@FAR table
    (:func:`qaconv.calibrate.score_summary`); ('', []) when a class of pairs is empty."""
    from .calibrate import cross_camera_pairs, score_summary
    from .viz.curves import plot_score_distributions

    pos, neg = cross_camera_pairs(logits, [r.pid for r in data.query], [r.pid for r in data.gallery],
                                  [r.camid for r in data.query], [r.camid for r in data.gallery])
    if not len(pos) or not len(neg):
        return "", []
    s = score_summary(pos, neg)
    title = f"QAConv logits on {data.name}"
    plot_score_distributions(s["histogram"], s["roc"], s["tar_at_far"], folder / "scores.png",
                             num_negative=len(neg), title=title)
    rows = []
    for r in s["tar_at_far"]:
        if r["threshold"] is None:
            tar = "–" if r["tar"] is None else f"{100 * r['tar']:.2f}%"
            cells = [f"{r['far']:g}", tar, "–", html.escape(r["reason"] or "")]
        else:
            cells = [f"{r['far']:g}", f"{100 * r['tar']:.2f}%", f"{r['threshold']:.4f}", f"FAR {r['far_achieved']:.2e}"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = ('<table class="metrics tarfar"><tr><th>FAR</th><th>TAR</th><th>threshold (logit)</th><th></th></tr>'
             + "".join(rows) + "</table>")
    text = (f"<p>{len(pos):,} same-identity and {len(neg):,} different-identity cross-camera query × gallery pairs "
            f"(AUC {s['auc']:.4f}); a pair is accepted when its logit is at or above the threshold. With N "
            "different-identity pairs a FAR below 1/N cannot be estimated.</p>")
    body = f'<div class="top">{_img(f"{prefix}/scores.png", "scores", title)}<div>{text}{table}</div></div>'
    return body, [f"{prefix}/scores.png"]


def report_testset(out_dir, data, dists: dict, q_maps=None, g_maps=None, matcher=None, results: dict | None = None,
                   image_size=None, rank_by: str | None = None, num_worst: int = 10, num_random: int = 10,
                   top: int = 10, seed: int = 0, match_ranks: int = 1, progress: bool = True,
                   note: str = "", score_plots: bool = True) -> Section:
    """Write one test set's pictures under ``out_dir/NAME/`` and return its HTML section.

    ``dists`` maps post-processing labels ('' = QAConv, '+RR', '+RR+TLift', '+TLift(unofficial)') to [Q, G]
    distances, as :func:`qaconv.engine.evaluator.postprocess` returns them; lists are ranked by ``rank_by``
    (default: the last, most post-processed row of the official protocol, i.e. not '+TLift(unofficial)').
    With QAConv ``matcher`` and feature maps, match pictures are drawn for
    ranks up to ``match_ranks`` and for each list's first true match. ``results`` (label -> RankResult)
    gives the CMC curves; ``note`` is added to the section's description. With ``score_plots`` and a QAConv row
    ('' in ``dists``, distance = -logit) the section also shows the histograms of same- and different-identity
    cross-camera logits, the ROC and TAR@FAR 1e-2/1e-3/1e-4 (see :mod:`qaconv.calibrate`).
    """
    out_dir = check_report_dir(out_dir)
    if not dists:
        raise QAConvError("report: no distance matrices to rank by")
    if rank_by is None:
        from .engine.evaluator import TLIFT_DIRECT

        rank_by = ([label for label in dists if label != TLIFT_DIRECT] or list(dists))[-1]
    if rank_by not in dists:
        raise QAConvError(f"report: cannot rank by '{rank_by}'; available: {', '.join(map(repr, dists))}")
    prefix = safe_stem(data.name)
    folder = out_dir / prefix
    dist = np.asarray(dists[rank_by])
    scores = -dist if rank_by == "" else 1.0 - dist
    q_pids = np.array([r.pid for r in data.query])
    g_pids = np.array([r.pid for r in data.gallery])
    q_cams = np.array([r.camid for r in data.query])
    g_cams = np.array([r.camid for r in data.gallery])
    stats = per_query(dist, q_pids, g_pids, q_cams, g_cams)
    worst, sample = choose_queries(stats["ap"], stats["valid"], num_worst, num_random, seed)
    groups = {
        "worst": build_rows(dist, scores, q_pids, g_pids, q_cams, g_cams, worst, top),
        "random": build_rows(dist, scores, q_pids, g_pids, q_cams, g_cams, sample, top),
    }
    files: list[str] = []
    thumbs = {(f"q{r.query:05d}", data.query[r.query].path) for rows in groups.values() for r in rows}
    thumbs |= {(f"g{s.gallery:05d}", data.gallery[s.gallery].path) for rows in groups.values() for r in rows
               for s in r.all_shown()}
    for key, src in sorted(thumbs):
        _thumb(src, folder / "thumbs" / f"{key}.jpg")
        files.append(f"{prefix}/thumbs/{key}.jpg")

    can_match = matcher is not None and hasattr(matcher, "correspondences") and q_maps is not None and "" in dists
    todo = {}
    for rows in groups.values():
        for r in rows:
            for s in r.all_shown():
                if can_match and (s.rank <= match_ranks or (s.same_pid and s.rank == r.first_rank)):
                    s.match_png = f"{prefix}/match/q{r.query:05d}_g{s.gallery:05d}.png"
                    todo[s.match_png] = (r.query, s.gallery, s.rank)
    if can_match:
        for rel, (q, g, rank) in progress_bar(sorted(todo.items()), desc=f"{data.name} match pictures", unit="pictures",
                                              disable=not progress, leave=False):
            _match_png(matcher, q_maps[q], g_maps[g], data.query[q].path, data.gallery[g].path, out_dir / rel,
                       image_size, f"gallery rank {rank}")
            files.append(rel)

    cmc_html = ""
    if results:
        from .viz.curves import plot_cmc

        curves = {"QAConv" + label: r.cmc for label, r in results.items()}
        plot_cmc(curves, folder / "cmc.png", title=f"CMC on {data.name}")
        files.append(f"{prefix}/cmc.png")
        cmc_html = _img(f"{prefix}/cmc.png", "cmc", f"CMC on {data.name}")
    scores_html = ""
    if score_plots and "" in dists:
        scores_html, more = _scores_html(data, -np.asarray(dists[""], dtype=np.float64), folder, prefix)
        files += more
    label = "QAConv" + rank_by
    score_note = "QAConv logit" if rank_by == "" else f"similarity after {rank_by.lstrip('+')} (1 - distance)"
    match_note = (
        "Thumbnails marked ⤢ link to a picture of the QAConv correspondences (rank 1 and the first true match)."
        if can_match
        else "No match pictures: the matcher does not expose correspondences (pooled baseline) or no feature maps."
    )
    valid = int(stats["valid"].sum())
    info = (
        f"<p>{len(data.query)} queries ({valid} with a true match from another camera), {len(data.gallery)} "
        f"gallery images. Lists ranked by <b>{html.escape(label)}</b>; the number under each thumbnail is its rank "
        f"and {html.escape(score_note)}. {html.escape(match_note)} {html.escape(note)}</p>"
    )
    body = (
        f'<section><h2>{html.escape(str(data.name))}</h2><div class="top">{cmc_html}{info}</div>{scores_html}'
        f"<h3>Worst {len(worst)} queries (lowest AP)</h3>{_render_rows(groups['worst'], data, prefix, 'worst')}"
        f"<h3>{len(sample)} random queries (seed {seed})</h3>{_render_rows(groups['random'], data, prefix, 'random')}"
        "</section>"
    )
    return Section(str(data.name), body, files)


CSS = """
body{font:13px/1.35 system-ui,sans-serif;margin:16px;color:#222;max-width:1400px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;border-bottom:1px solid #ccc;margin-top:24px}
h3{font-size:14px;margin:14px 0 4px}p{margin:4px 0}
table.metrics{border-collapse:collapse;margin:6px 0}
table.metrics td,table.metrics th{padding:2px 10px;text-align:right;border-bottom:1px solid #e4e4e4}
table.metrics td:first-child,table.metrics th:first-child{text-align:left}
.top{display:flex;gap:16px;align-items:flex-start}.top p{max-width:520px}img.cmc{width:420px;border:1px solid #ddd}
img.scores{width:700px;border:1px solid #ddd}table.tarfar td:last-child{text-align:left;color:#555}
table.ranks{border-collapse:collapse}table.ranks td{padding:3px 2px;vertical-align:top;text-align:center}
table.ranks tr{border-bottom:1px solid #eee}td.qcell{padding-right:12px!important;border-right:2px solid #bbb}
.cap{font-size:11px;color:#444;white-space:nowrap}td.gap{color:#888;vertical-align:middle!important;font-size:11px}
img.q,img.pos,img.neg{height:96px;border:3px solid;display:block;margin:auto}
img.q{border-color:#2b6cb0}img.pos{border-color:#1a9641}img.neg{border-color:#d7191c}
img[data-state=broken]{outline:3px dashed #c0c;min-width:40px}
.legend span{display:inline-block;width:12px;height:12px;border:3px solid;vertical-align:middle;margin:0 3px 0 10px}
"""


def _metrics_table(results: dict) -> str:
    head = "<tr><th>test set</th><th>rank-1</th><th>rank-5</th><th>rank-10</th><th>mAP</th><th>mINP</th></tr>"
    rows = []
    for name, r in results.items():
        name = name.replace(" +", " QAConv+") if " +" in name else f"{name} QAConv"
        vals = [r.cmc[0], r.cmc[min(4, len(r.cmc) - 1)], r.cmc[min(9, len(r.cmc) - 1)], r.mAP, r.mINP]
        rows.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{100 * v:.1f}</td>" for v in vals) + "</tr>")
    return f'<table class="metrics">{head}{"".join(rows)}</table>'


def _row_notes(results: dict) -> str:
    """One line explaining the post-processing rows present in ``results`` (keys 'NAME LABEL')."""
    from .engine.evaluator import RR, RR_TLIFT, TLIFT_DIRECT

    notes = {
        RR: "k-reciprocal re-ranking",
        RR_TLIFT: "TLift of the re-ranked score (the official protocol)",
        TLIFT_DIRECT: "TLift directly on sigmoid(logit), without re-ranking; not part of the official protocol",
    }
    present = [f"QAConv{lab}: {text}" for lab, text in notes.items() if any(k.endswith(" " + lab) for k in results)]
    return f"<p>{html.escape('; '.join(present))}.</p>" if present else ""


def render_html(sections: list[Section], results: dict, title: str = "QAConv evaluation report") -> str:
    """The whole page: metrics table (rank-k, mAP, mINP in %), legend, then each test set's section."""
    stamp = time.strftime("%Y-%m-%d %H:%M")
    legend = _row_notes(results) + (
        '<p class="legend">Border:<span style="border-color:#2b6cb0"></span>query'
        '<span style="border-color:#1a9641"></span>same identity<span style="border-color:#d7191c"></span>'
        "other identity. Gallery images of the query's identity from the query's own camera (junk) are left out, "
        "as in CMC/mAP, and ranks count the remaining images.</p>"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p>generated {stamp}</p>"
        f"{_metrics_table(results)}{legend}{''.join(s.html for s in sections)}</body></html>\n"
    )


def write_report(out_dir, sections: list[Section], results: dict, title: str = "QAConv evaluation report") -> Path:
    """Write ``out_dir/index.html`` (pictures are already in place from :func:`report_testset`)."""
    out_dir = check_report_dir(out_dir)
    path = out_dir / "index.html"
    with writing(path):
        atomic_write(path, lambda f: f.write(render_html(sections, results, title).encode("utf-8")))
    return path


def report_from_evaluation(out_dir, data, kept: dict, matcher, results: dict, cfg: dict,
                           progress: bool = True) -> Section:
    """:func:`report_testset` on what ``evaluate_dataset(..., keep=kept)`` kept (distances, feature maps), with
    ``cfg['report_queries']`` worst and random queries (random ones drawn with seed 0, so reports of different
    models on one test set show the same queries)."""
    out_dir = check_report_dir(out_dir)
    n = int(cfg.get("report_queries", 10))
    m = int(cfg.get("two_stage", 0) or 0)
    partial = 0 < m < len(data.gallery)  # two-stage: not every number is a QAConv logit
    note = (
        f"Two-stage matching: QAConv scored only each query's {m} best gallery images by pooled cosine; the others "
        "are ranked below them by cosine and their numbers are not QAConv logits (match pictures show exact logits; "
        "no score histograms or ROC)."
        if partial
        else ""
    )
    with writing(out_dir, "the report"):
        return report_testset(out_dir, data, kept["dists"], kept.get("q"), kept.get("g"), matcher, results,
                              image_size=(cfg["height"], cfg["width"]), num_worst=n, num_random=n,
                              progress=progress, note=note, score_plots=not partial)
