"""HTML report: query choice, ranked lists against brute force, border colours, self-contained files, and
that the page's images load in headless Chromium."""

import doctest
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from PIL import Image

import qaconv.report
from qaconv.cli import main
from qaconv.data.registry import load_dataset
from qaconv.engine.evaluator import evaluate
from qaconv.engine.runner import DEFAULTS, build_model
from qaconv.report import build_rows, choose_queries, render_html, report_testset, write_report

CHROMIUM = Path("/usr/bin/chromium")
TINY = {"arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16}
TRAIN_TINY = ["--dataset", "synth_A", "--arch", "resnet18", "--ibn", "none", "--pretrained", "none", "--height", "64",
              "--width", "32", "--neck", "16", "--batch-size", "8", "--num-instance", "2", "--max-epochs", "1"]


# ---------------------------------------------------------------- brute-force references

def brute_list(dist_row, q_pid, q_cam, g_pids, g_cams):
    """Gallery indices by (distance, index) with junk (same id and camera) removed."""
    order = sorted(range(len(dist_row)), key=lambda j: (dist_row[j], j))
    return [j for j in order if not (g_pids[j] == q_pid and g_cams[j] == q_cam)]


def brute_ap(dist_row, q_pid, q_cam, g_pids, g_cams):
    """AP as sklearn defines it (tied distances form one threshold); None when no true match is left."""
    kept = brute_list(dist_row, q_pid, q_cam, g_pids, g_cams)
    pos = [j for j in kept if g_pids[j] == q_pid]
    if not pos:
        return None
    precisions = []
    for p in pos:
        within = [j for j in kept if dist_row[j] <= dist_row[p]]
        precisions.append(sum(g_pids[j] == q_pid for j in within) / len(within))
    return sum(precisions) / len(pos)


def brute_worst(dist, q_pids, q_cams, g_pids, g_cams, n):
    aps = [brute_ap(dist[i], q_pids[i], q_cams[i], g_pids, g_cams) for i in range(len(dist))]
    valid = [i for i, a in enumerate(aps) if a is not None]
    return sorted(valid, key=lambda i: (round(aps[i], 9), i))[:n], aps


# ---------------------------------------------------------------- page parsing

class Page(HTMLParser):
    """Images (with their table group and row), link targets, style text and external references."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.hrefs, self.rows, self.scripts, self.style = [], [], [], [], ""
        self._group, self._in_style = None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("class") == "ranks":
            self._group = a["data-group"]
        elif tag == "tr" and self._group:
            self.rows.append({"group": self._group, "imgs": []})
        elif tag == "img":
            self.imgs.append(a)
            if self._group and self.rows:
                self.rows[-1]["imgs"].append(a)
        elif tag == "a":
            self.hrefs.append(a["href"])
        elif tag in ("script", "link", "iframe"):
            self.scripts.append(a)
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "table":
            self._group = None
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data

    def group(self, name):
        return [r for r in self.rows if r["group"] == name]


def css_colour(style: str, selector: str) -> str:
    return re.search(re.escape(selector) + r"\{border-color:(#[0-9a-f]{6})\}", style).group(1)


# ---------------------------------------------------------------- unit tests

def test_doctests():
    assert doctest.testmod(qaconv.report).failed == 0


def test_choose_queries_by_hand():
    ap = np.array([0.9, 0.1, 0.5, 0.1, 0.0, 0.3])
    valid = np.array([True, True, True, True, False, True])  # query 4 has no true match: never shown
    worst, sample = choose_queries(ap, valid, num_worst=3, num_random=2, seed=5)
    assert worst.tolist() == [1, 3, 5]  # ties at 0.1 keep the lower index first
    expected = np.sort(np.random.default_rng(5).choice([0, 1, 2, 3, 5], size=2, replace=False))
    assert sample.tolist() == expected.tolist()
    worst, sample = choose_queries(ap, valid, num_worst=10, num_random=10)
    assert worst.tolist() == [1, 3, 5, 2, 0] and sample.tolist() == [0, 1, 2, 3, 5]


def test_build_rows_against_brute_force():
    rng = np.random.default_rng(0)
    q, g, top = 12, 30, 3
    dist = rng.integers(0, 6, size=(q, g)).astype(float)  # many ties
    q_pids, g_pids = rng.integers(0, 4, q), rng.integers(0, 4, g)
    q_cams, g_cams = rng.integers(0, 2, q), rng.integers(0, 2, g)
    rows = build_rows(dist, -dist, q_pids, g_pids, q_cams, g_cams, range(q), top=top)
    for i, row in enumerate(rows):
        ranked = brute_list(dist[i], q_pids[i], q_cams[i], g_pids, g_cams)
        assert [s.gallery for s in row.shown] == ranked[:top]
        assert [s.rank for s in row.shown] == list(range(1, top + 1))
        assert all(s.same_pid == (g_pids[s.gallery] == q_pids[i]) for s in row.all_shown())
        assert all(s.score == -dist[i, s.gallery] for s in row.all_shown())
        hits = [r for r, j in enumerate(ranked) if g_pids[j] == q_pids[i]]
        if hits and hits[0] >= top:
            assert (row.first_true.gallery, row.first_true.rank) == (ranked[hits[0]], hits[0] + 1)
        else:
            assert row.first_true is None
        assert row.first_rank == (hits[0] + 1 if hits else 0)
        expected_ap = brute_ap(dist[i], q_pids[i], q_cams[i], g_pids, g_cams)
        assert row.ap == pytest.approx(expected_ap if expected_ap is not None else 0.0)
        # junk skipped: items of the query's id and camera ranked no lower than the last shown one
        full = sorted(range(g), key=lambda j: (dist[i, j], j))
        upto = full[: full.index(row.shown[-1].gallery) + 1]
        assert row.junk == sum(g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i] for j in upto)


def test_per_query_against_brute_force():
    from qaconv.metrics import evaluate_rank, per_query

    rng = np.random.default_rng(3)
    dist = rng.integers(0, 5, size=(15, 25)).astype(float)
    ids = (rng.integers(0, 4, 15), rng.integers(0, 4, 25), rng.integers(0, 2, 15), rng.integers(0, 2, 25))
    got = per_query(dist, *ids)
    q_pids, g_pids, q_cams, g_cams = ids
    for i in range(15):
        ap = brute_ap(dist[i], q_pids[i], q_cams[i], g_pids, g_cams)
        assert got["valid"][i] == (ap is not None)
        assert got["ap"][i] == pytest.approx(ap or 0.0)
        ranked = brute_list(dist[i], q_pids[i], q_cams[i], g_pids, g_cams)
        first = next((r for r, j in enumerate(ranked) if g_pids[j] == q_pids[i]), -1)
        assert got["first_rank"][i] == first
    assert got["ap"][got["valid"]].mean() == pytest.approx(evaluate_rank(dist, *ids).mAP)


def test_report_dir_must_be_a_folder(tmp_path):
    from qaconv.errors import QAConvError

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(QAConvError, match="is a file"):
        write_report(f, [], {})


# ---------------------------------------------------------------- end to end on the tiny domain

@pytest.fixture(scope="module")
def report(tiny_domain, tmp_path_factory):
    """A report of a random-init ResNet-18 QAConv with TLift (lists ranked by +RR+TLift) and the saved scores."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("report")
    cfg = {**DEFAULTS, **TINY, "data_dir": str(tiny_domain.parent), "workers": 0, "device": "cpu", "fea_batch": 16,
           "tlift": True, "save_scores": True, "report": str(out / "rep"), "report_queries": 4}
    model, matcher = build_model(cfg, load_weights=False)
    evaluate(model.eval(), matcher.eval(), cfg, "synth_A", out_dir=out, progress=False)
    saved = np.load(out / "synth_A_scores.npz")
    data = load_dataset("synth_A", cfg["data_dir"], progress=False)
    index = out / "rep" / "index.html"
    return SimpleNamespace(dir=out / "rep", index=index, page=Page(index.read_text()), data=data,
                           dist=1.0 - saved["score_tlift"], logits=saved["logit"])


def _ids(data):
    return (np.array([r.pid for r in data.query]), np.array([r.camid for r in data.query]),
            np.array([r.pid for r in data.gallery]), np.array([r.camid for r in data.gallery]))


def test_worst_and_random_queries(report):
    q_pids, q_cams, g_pids, g_cams = _ids(report.data)
    worst, aps = brute_worst(report.dist, q_pids, q_cams, g_pids, g_cams, 4)
    shown_worst = [int(r["imgs"][0]["data-q"]) for r in report.page.group("worst")]
    assert shown_worst == worst
    valid = [i for i, a in enumerate(aps) if a is not None]
    assert len(valid) > 4  # the choice matters
    sample = np.sort(np.random.default_rng(0).choice(valid, size=4, replace=False)).tolist()
    assert [int(r["imgs"][0]["data-q"]) for r in report.page.group("random")] == sample
    # the page states each query's AP
    text = report.index.read_text()
    for q in worst:
        assert f"AP {100 * aps[q]:.1f}%" in text


def test_ranked_lists_and_border_colours(report):
    q_pids, q_cams, g_pids, g_cams = _ids(report.data)
    page = report.page
    assert css_colour(page.style, "img.pos") == "#1a9641" and css_colour(page.style, "img.neg") == "#d7191c"
    checked = 0
    for row in page.rows:
        query, *gallery = row["imgs"]
        q = int(query["data-q"])
        ranked = brute_list(report.dist[q], q_pids[q], q_cams[q], g_pids, g_cams)
        top = [img for img in gallery if int(img["data-rank"]) <= 10]
        assert [int(img["data-g"]) for img in top] == ranked[:10]  # junk never shown
        for img in gallery:
            g = int(img["data-g"])
            assert int(img["data-q"]) == q and ranked[int(img["data-rank"]) - 1] == g
            assert img["class"] == ("pos" if g_pids[g] == q_pids[q] else "neg")
            checked += 1
        # beyond the top 10 only the first true match is added
        extra = [img for img in gallery if int(img["data-rank"]) > 10]
        first = next(r for r, j in enumerate(ranked) if g_pids[j] == q_pids[q])
        assert [int(img["data-g"]) for img in extra] == ([ranked[first]] if first >= 10 else [])
    assert checked >= 8 * 10


def test_files_are_self_contained(report):
    page, root = report.page, report.dir.resolve()
    assert not page.scripts  # no external scripts, stylesheets or frames
    targets = [img["src"] for img in page.imgs] + page.hrefs
    assert len(page.imgs) > 80 and page.hrefs
    for target in targets:
        parsed = urlparse(target)
        assert not parsed.scheme and not parsed.netloc and not target.startswith("/"), target
        path = (report.index.parent / unquote(parsed.path)).resolve()
        assert path.is_file() and root in path.parents, target
        with Image.open(path) as im:
            im.verify()
    # match pictures: one per rank-1 image and per first true match, linked from their thumbnails
    assert all(h.endswith(".png") and "/match/" in h for h in page.hrefs)
    for row in page.rows:
        q = int(row["imgs"][0]["data-q"])
        assert any(f"q{q:05d}_" in h for h in page.hrefs)
    assert "<b>QAConv+RR+TLift</b>" in report.index.read_text()  # lists ranked by the last post-processing row


def _chromium_dom(url: str, profile: Path) -> str:
    if not CHROMIUM.exists():
        if os.environ.get("QACONV_REQUIRE_CHROMIUM"):  # set by .ci/run, which installs it
            pytest.fail("QACONV_REQUIRE_CHROMIUM is set but /usr/bin/chromium is missing")
        pytest.skip("headless rendering check needs /usr/bin/chromium (apt-get install chromium)")
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1200,2000", "--virtual-time-budget=5000", "--dump-dom", url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_images_load_in_headless_chromium(report, tmp_path):
    """Every <img> of the page reports a successful load (its onload/onerror handlers mark data-state);
    the same check on a copy with one thumbnail removed finds exactly that image broken."""
    dom = Page(_chromium_dom(report.index.as_uri(), tmp_path / "profile"))
    assert len(dom.imgs) == len(report.page.imgs)
    assert [img.get("data-state") for img in dom.imgs] == ["ok"] * len(dom.imgs)

    copy = tmp_path / "copy"
    shutil.copytree(report.dir, copy)
    missing = report.page.rows[0]["imgs"][3]["src"]
    (copy / unquote(missing)).unlink()
    dom = Page(_chromium_dom((copy / "index.html").as_uri(), tmp_path / "profile2"))
    broken = [img["src"] for img in dom.imgs if img.get("data-state") != "ok"]
    assert set(broken) == {missing}


def test_without_qaconv_matcher_no_match_pictures(tiny_domain, tmp_path):
    data = load_dataset("synth_A", str(tiny_domain.parent), progress=False)
    rng = np.random.default_rng(1)
    dists = {"": rng.random((len(data.query), len(data.gallery)))}
    section = report_testset(tmp_path, data, dists, matcher=None, num_worst=2, num_random=2, top=5,
                             progress=False)
    path = write_report(tmp_path, [section], {})
    page = Page(path.read_text())
    assert not page.hrefs and not (tmp_path / "synth_A" / "match").exists()
    assert "No match pictures" in path.read_text()
    assert len(page.rows) == 4 and all(len(r["imgs"]) >= 6 for r in page.rows)
    for img in page.imgs:
        assert (tmp_path / unquote(img["src"])).is_file()
    assert render_html([section], {}).count("<section>") == 1


def test_cli_evaluate_writes_report_and_train_passes_it_on(tiny_domain, tmp_path, capsys):
    from qaconv.cli import build_parser
    from qaconv.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = {**DEFAULTS, **TINY}
    model, matcher = build_model(cfg, load_weights=False)
    run = tmp_path / "run"
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()},
                    run / "checkpoint.pt")
    common = ["--data-dir", str(tiny_domain.parent), "--workers", "0", "--device", "cpu"]
    rep = tmp_path / "rep"
    code = main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", "--report", str(rep),
                 "--report-queries", "2", *common])
    assert code == 0 and f"wrote report {rep / 'index.html'}" in capsys.readouterr().out
    page = Page((rep / "index.html").read_text())
    assert len(page.group("worst")) == 2 and len(page.group("random")) == 2
    # train takes the same options into the configuration of its final evaluation ...
    args = build_parser().parse_args(["train", "--report", "r", "--report-queries", "3"])
    assert vars(args).items() >= {"report": "r", "report_queries": 3}.items()
    # ... and rejects an unusable report folder before training
    bad = tmp_path / "file"
    bad.write_text("x")
    for argv in (["evaluate", "--checkpoint", str(run)], ["train", "-o", str(tmp_path / "run2"), *TRAIN_TINY]):
        code = main([*argv, "--testsets", "synth_A", "--report", str(bad), *common])
        err = capsys.readouterr().err
        assert code == 1 and "is a file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run2" / "checkpoint.pt").exists()


def test_two_stage_report_says_so_and_match_pictures_show_exact_logits(tiny_domain, tmp_path, monkeypatch):
    """With --two-stage the page explains that tail numbers are not logits; every match picture's title is the
    matcher's own logit for that pair, also for gallery images outside the shortlist."""
    import qaconv.viz.match

    drawn = []
    monkeypatch.setattr(qaconv.viz.match, "draw_match",
                        lambda q, g, corr, logit, dest, **kw: drawn.append((q, g, logit)))
    torch.manual_seed(0)
    cfg = {**DEFAULTS, **TINY, "data_dir": str(tiny_domain.parent), "workers": 0, "device": "cpu", "fea_batch": 16,
           "two_stage": 2, "report": str(tmp_path / "rep"), "report_queries": 3}
    model, matcher = build_model(cfg, load_weights=False)
    model.eval(), matcher.eval()
    evaluate(model, matcher, cfg, "synth_A", progress=False)
    assert "s 2 best gallery images by pooled cosine" in (tmp_path / "rep" / "index.html").read_text()
    data = load_dataset("synth_A", cfg["data_dir"], progress=False)
    paths = [r.path for r in data.query + data.gallery]
    from qaconv.engine.features import extract_features

    maps = extract_features(model, data.query + data.gallery, 64, 32, batch_size=16, device="cpu", progress=False)
    assert drawn
    for q, g, logit in drawn:
        with torch.no_grad():
            exact = float(matcher(maps[paths.index(q)][None], maps[paths.index(g)][None])[0, 0])
        assert logit == pytest.approx(exact, abs=1e-4)
