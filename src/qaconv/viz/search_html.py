"""A self-contained HTML page of search results: each query and its ranked gallery images with scores.

Every image is written to a folder next to the page (``results.html`` -> ``results_files/``) twice, as a PNG
thumbnail (at most ``THUMB_HEIGHT`` pixels high) and full-size, the thumbnail linking to the full-size
picture; with an extractor, a match picture of every result (:func:`qaconv.viz.match.match_images`: the query
crop against the result, or a tracklet pair's best crop pair) is drawn there too and linked. All links are
relative, the page has no external URL and every text is HTML-escaped. When a query's identity and a result's
are both known the result gets a green (same) or red (different) border. Captions never break inside a word
(one field per line, no wrapping). An image that cannot be read any more is shown as text, not as a broken link.

Example::

    write_search_html("out.html", [{"query": "q.jpg", "crops": ["q.jpg"], "pid": None, "cam": "camA",
        "score_kind": "QAConv logit", "results": [{"rank": 1, "score": 12.3, "path": "a.jpg", "pid": 5,
        "cam": "camB", "row": 0}]}], "/gallery")
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from ..atomic import atomic_write
from ..data.images import read_rgb
from ..errors import QAConvError, writing

THUMB_HEIGHT = 128
QUERY_CROPS_SHOWN = 6  # thumbnails of a tracklet query

_STYLE = """body{font-family:sans-serif;margin:1em;background:#fafafa}
.q{margin-bottom:1.2em;padding:.5em;background:#fff;border:1px solid #ddd}
.q h2{font-size:14px;margin:0 0 .4em 0;font-weight:normal}
.row{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
figure{margin:0;text-align:center;font-size:12px;padding:3px;border:3px solid transparent}
figure.query{border-right:3px solid #333;padding-right:.6em}
figure.same{border-color:#1a9e3a}
figure.different{border-color:#d02020}
figcaption span{display:block;white-space:nowrap}
.missing{display:inline-block;height:64px;line-height:64px;color:#a00}
.legend span{padding:0 .4em;margin-right:.6em}"""


def _save(img, dest: Path) -> None:
    with writing(dest):
        img.save(dest, format="PNG")


def _pictures(src: str | Path, key: str, assets: Path, written: dict) -> bool:
    """Write ``key.png`` (thumbnail) and ``key_full.png`` of ``src`` once per page; False when unreadable."""
    if key not in written:
        try:
            img = read_rgb(str(src))
        except QAConvError:
            written[key] = False
            return False
        _save(img, assets / f"{key}_full.png")
        if img.height > THUMB_HEIGHT:
            img = img.resize((max(1, round(img.width * THUMB_HEIGHT / img.height)), THUMB_HEIGHT))
        _save(img, assets / f"{key}.png")
        written[key] = True
    return written[key]


def _link(assets: Path, name: str) -> str:
    return html.escape(quote(f"{assets.name}/{name}"))


def _figure(src, key: str, lines: list[str], assets: Path, written: dict, cls: str = "", extra: str = "") -> str:
    alt = html.escape(" ".join(lines))
    if _pictures(src, key, assets, written):
        pic = (f'<a href="{_link(assets, key + "_full.png")}"><img src="{_link(assets, key + ".png")}" '
               f'alt="{alt}"></a>')
    else:
        pic = '<span class="missing">image missing</span>'
    klass = f' class="{cls}"' if cls else ""
    caption = "".join(f"<span>{html.escape(t)}</span>" for t in lines) + extra
    return f"<figure{klass}>{pic}<figcaption>{caption}</figcaption></figure>"


def _known(pid) -> bool:
    return pid is not None and int(pid) >= 0


def _verdict(qpid, hpid) -> str:
    if not (_known(qpid) and _known(hpid)):
        return ""
    return "same" if int(qpid) == int(hpid) else "different"


def _match(extractor, query, gallery, dest: Path) -> bool:
    from .match import match_images

    try:
        match_images(extractor, str(query), str(gallery), dest)
    except (QAConvError, OSError, ValueError):
        return False
    return True


def write_search_html(out: str | Path, results: list[dict], root: str | Path, title: str = "qaconv search",
                      extractor=None, progress: bool = True) -> Path:
    """Write the page for ``results`` as printed by ``qaconv search --json``: per query ``{"query" (its name),
    "crops" (image paths; default [query]), "pid", "cam", "score_kind", "results": [{"rank", "score", "path",
    "pid", "cam", "row", ...}]}``, result paths relative to the gallery folder ``root``. ``extractor``: a
    :class:`~qaconv.extractor.FeatureExtractor` with a QAConv matcher; when given, a match picture of every
    result is drawn and linked (``progress``: a progress bar over them)."""
    from ..progress import progress_bar

    out = Path(out)
    assets = out.with_name(out.stem + "_files")
    with writing(assets):
        assets.mkdir(parents=True, exist_ok=True)
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if any(_known(q.get("pid")) for q in results):
        parts.append('<p class="legend"><span class="same" style="border:3px solid #1a9e3a">same identity</span>'
                     '<span style="border:3px solid #d02020">different identity</span>(identities known on both '
                     "sides)</p>")
    written: dict[str, bool] = {}
    todo = sum(len(q["results"]) for q in results) if extractor is not None else 0
    bar = progress_bar(total=todo, desc="match pictures", unit="pic", disable=not progress or not todo)
    with bar:
        for qi, q in enumerate(results):
            crops = list(q.get("crops") or [q["query"]])
            cam = q.get("cam") or "-"
            pid = q.get("pid")
            head = [f"query {Path(str(q['query'])).name}", f"folder {Path(str(crops[0])).parent}", f"camera {cam}",
                    f"pid {pid if _known(pid) else '-'}"]
            if len(crops) > 1:
                head.append(f"tracklet of {len(crops)} crops")
            kind = q.get("score_kind") or q.get("score") or ""
            note = "; same-camera entries excluded" if q.get("same_camera_excluded") else ""
            if q.get("verdict_note"):
                note += f" ({q['verdict_note']})"
            parts.append(f'<div class="q"><h2>{html.escape(" · ".join(head))}; score: {html.escape(str(kind))}'
                         f"{html.escape(note)}</h2><div class=\"row\">")
            for ci, crop in enumerate(crops[:QUERY_CROPS_SHOWN]):
                lines = [Path(str(crop)).name, f"camera {cam}"] if ci == 0 else [Path(str(crop)).name]
                parts.append(_figure(crop, f"q{qi}_{ci}", lines, assets, written, "query"))
            if len(crops) > QUERY_CROPS_SHOWN:
                parts.append(f"<span>+{len(crops) - QUERY_CROPS_SHOWN} more crops</span>")
            for r in q["results"]:
                lines = [f"{r['rank']}. {r['score']:.3f}",
                         f"pid {r['pid'] if _known(r.get('pid')) else '-'} · {r.get('cam') or '-'}"]
                if r.get("track") or r.get("crops", 1) > 1:
                    lines.append(f"track {r.get('track') or '-'} ({r.get('crops', 1)} crops)")
                if r.get("verdict"):
                    lines.append(f"{r['verdict']} · P(same) {r['p_same']:.2f}")
                lines.append(str(r["path"]))
                gallery_image = Path(root) / r["path"]
                extra = ""
                if extractor is not None:
                    name = f"m{qi}_{r['rank']}.png"
                    query_crop = r.get("query_crop") or crops[0]
                    if _match(extractor, query_crop, gallery_image, assets / name):
                        extra = f'<span><a href="{_link(assets, name)}">match</a></span>'
                    bar.update(1)
                parts.append(_figure(gallery_image, f"g{r['row']}", lines, assets, written,
                                     _verdict(pid, r.get("pid")), extra))
            parts.append("</div></div>")
    parts.append("</body></html>")
    with writing(out):
        atomic_write(out, lambda f: f.write("\n".join(parts).encode("utf-8")))
    return out
