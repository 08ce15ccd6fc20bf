"""A self-contained HTML page of search results: each query and its ranked gallery images with scores.

Thumbnails (PNG, at most ``THUMB_HEIGHT`` pixels high) are written to a folder next to the page
(``results.html`` -> ``results_files/``) and linked by relative paths; the page has no external URL and
every text is HTML-escaped. An image that cannot be read any more is shown as text, not as a broken link.

Example::

    write_search_html("out.html", [{"query": "q.jpg", "pid": -1, "cam": "", "score": "QAConv logit",
        "results": [{"rank": 1, "score": 12.3, "path": "a.jpg", "pid": 5, "cam": "c2", "row": 0}]}], "/gallery")
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from ..atomic import atomic_write
from ..data.images import read_rgb
from ..errors import QAConvError, writing

THUMB_HEIGHT = 128

_STYLE = """body{font-family:sans-serif;margin:1em;background:#fafafa}
.q{display:flex;gap:.6em;align-items:flex-start;margin-bottom:1.2em;padding:.5em;background:#fff;border:1px solid #ddd}
figure{margin:0;text-align:center;font-size:12px;max-width:9em;word-break:break-all}
figure.query{border-right:3px solid #333;padding-right:.6em}
.missing{display:inline-block;height:64px;line-height:64px;color:#a00}"""


def _thumb(src: str | Path, dest: Path) -> bool:
    """Write a PNG thumbnail of ``src`` to ``dest``; False when the image cannot be read."""
    try:
        img = read_rgb(str(src))
    except QAConvError:
        return False
    if img.height > THUMB_HEIGHT:
        img = img.resize((max(1, round(img.width * THUMB_HEIGHT / img.height)), THUMB_HEIGHT))
    with writing(dest):
        img.save(dest, format="PNG")
    return True


def _figure(src, key: str, caption: str, assets: Path, written: dict, cls: str = "") -> str:
    name = f"{key}.png"
    if name not in written:  # each thumbnail once per page; older files of the folder are overwritten
        written[name] = _thumb(src, assets / name)
    if written[name]:
        pic = f'<img src="{html.escape(quote(f"{assets.name}/{name}"))}" alt="{html.escape(caption)}">'
    else:
        pic = '<span class="missing">image missing</span>'
    klass = f' class="{cls}"' if cls else ""
    return f"<figure{klass}>{pic}<figcaption>{html.escape(caption)}</figcaption></figure>"


def write_search_html(out: str | Path, results: list[dict], root: str | Path, title: str = "qaconv search") -> Path:
    """Write the page for ``results`` as printed by ``qaconv search --json``: per query ``{"query" (path),
    "pid", "cam", "score" (what the scores are), "results": [{"rank", "score", "path", "pid", "cam", "row"}]}``,
    result paths relative to the gallery folder ``root``."""
    out = Path(out)
    assets = out.with_name(out.stem + "_files")
    with writing(assets):
        assets.mkdir(parents=True, exist_ok=True)
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    written: dict[str, bool] = {}
    for qi, q in enumerate(results):
        caption = f"query {Path(q['query']).name} (pid {q['pid']}, cam {q['cam'] or '-'}); score: {q['score']}"
        row = [_figure(q["query"], f"q{qi}", caption, assets, written, "query")]
        for r in q["results"]:
            caption = f"{r['rank']}. {r['score']:.3f} pid {r['pid']} {r['cam'] or '-'} {r['path']}"
            row.append(_figure(Path(root) / r["path"], f"g{r['row']}", caption, assets, written))
        parts.append(f'<div class="q">{"".join(row)}</div>')
    parts.append("</body></html>")
    with writing(out):
        atomic_write(out, lambda f: f.write("\n".join(parts).encode("utf-8")))
    return out
