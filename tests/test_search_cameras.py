"""`qaconv index` / `qaconv search` on one's own cameras: camera folders (--cam-from-folder), a query manifest,
tracklet queries and gallery tracklets, same-camera exclusion by default, unknown cameras refused, JSON types,
the HTML page (borders, full-size images, match pictures) and the export of pooled vectors; checked against the
library (`Gallery.search`, itself checked against brute force in test_store.py) and against the files."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qaconv import Gallery
from qaconv.cli import main


def _save_model(path):
    from qaconv.engine.checkpoint import save_checkpoint
    from qaconv.engine.runner import DEFAULTS, build_model

    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16}
    torch.manual_seed(0)
    model, matcher = build_model(cfg)
    with torch.no_grad():
        matcher.bn.running_mean.fill_(0.3), matcher.bn.running_var.fill_(0.02)
        matcher.logit_bn.running_mean.fill_(20.0), matcher.logit_bn.running_var.fill_(4.0)
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()}, path)
    return str(path)


def _market(name):
    m = re.match(r"(\d+)_c(\d)s\d_\d+_\d+", Path(name).name)
    return int(m[1]), f"cam{m[2]}"


@pytest.fixture(scope="module")
def site(tiny_domain, tmp_path_factory):
    """Camera folders with plain file names (no Market names), a manifest with pids and tracks, a model."""
    root = tmp_path_factory.mktemp("site")
    gallery, truth = root / "gallery", {}
    for k, src in enumerate(sorted((tiny_domain / "bounding_box_test").iterdir())):
        pid, cam = _market(src.name)
        dest = gallery / cam / f"img_{k:03d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
        truth[f"{cam}/{dest.name}"] = (pid, cam)
    with open(root / "gallery.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "pid", "camid", "track"])
        for rel, (pid, cam) in truth.items():
            w.writerow([f"gallery/{rel}", pid, cam, f"p{pid}"])  # a tracklet: one person in one camera
    queries = root / "queries"
    for k, src in enumerate(sorted((tiny_domain / "query").iterdir())[:4]):
        pid, cam = _market(src.name)
        (queries / cam).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, queries / cam / f"q{k}_p{pid}.jpg")
    ckpt = _save_model(root / "model.pt")
    store = root / "site.store"
    assert main(["index", str(gallery), "--checkpoint", ckpt, "-o", str(store), "--manifest",
                 str(root / "gallery.csv"), "--cam-from-folder", "--device", "cpu"]) == 0
    return {"root": root, "gallery": gallery, "truth": truth, "queries": queries, "ckpt": ckpt, "store": store}


def _run(capsys, argv):
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _error_line(capsys, argv):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_index_cameras_from_folders_and_tracks_from_the_manifest(site, tmp_path, capsys):
    g = Gallery.open(site["store"])
    assert g.cameras == sorted({cam for _, cam in site["truth"].values()})
    rows = g._store.rows
    for i, path in enumerate(g.paths):
        pid, cam = site["truth"][path]
        assert (int(rows.pids[i]), rows.label(rows.cams[i]), rows.tracks[i]) == (pid, cam, f"p{pid}")
    # without a manifest: cameras from folders, pids unknown (plain names)
    store = tmp_path / "plain.store"
    assert main(["index", str(site["gallery"]), "--checkpoint", site["ckpt"], "-o", str(store),
                 "--cam-from-folder"]) == 0
    capsys.readouterr()
    rows = Gallery.open(store)._store.rows
    assert [rows.label(c) for c in rows.cams] == [site["truth"][p][1] for p in rows.paths]
    assert (rows.pids == -1).all() and not any(rows.tracks)
    # an image outside every camera folder is refused before any work
    loose = tmp_path / "loose"
    shutil.copytree(site["gallery"], loose)
    shutil.copy(next(site["gallery"].rglob("*.jpg")), loose / "stray.jpg")
    err = _error_line(capsys, ["index", str(loose), "--checkpoint", site["ckpt"], "-o", str(tmp_path / "x.store"),
                               "--cam-from-folder"])
    assert "stray.jpg lies directly in" in err and not (tmp_path / "x.store").exists()


def test_search_leaves_out_the_query_camera_by_default(site, capsys):
    queries = sorted(str(p) for p in site["queries"].rglob("*.jpg"))
    base = ["search", *queries, "--index", str(site["store"]), "--checkpoint", site["ckpt"], "--device", "cpu",
            "--top", "50", "--json", "--cam-from-folder"]
    res = _run(capsys, base)
    g = Gallery.open(site["store"], device="cpu")
    cams = [Path(q).parent.name for q in queries]
    want = g.search(queries, top=50, query_cameras=cams, exclude_same_camera=True)
    assert [r["results"] for r in res] == want
    for r, cam in zip(res, cams, strict=True):
        assert r["cam"] == cam and r["same_camera_excluded"] and r["results"]
        assert all(h["cam"] != cam for h in r["results"])
    kept = _run(capsys, [*base, "--include-same-camera"])
    assert [r["results"] for r in kept] == g.search(queries, top=50, query_cameras=cams)
    assert all(not r["same_camera_excluded"] for r in kept) and any(
        h["cam"] == r["cam"] for r in kept for h in r["results"])
    # without known cameras nothing is left out; --exclude-same-camera then asks for them
    plain = _run(capsys, base[:-1])
    assert all(r["cam"] is None and not r["same_camera_excluded"] for r in plain)
    assert "needs each query's camera" in _error_line(capsys, [*base[:-1], "--exclude-same-camera"])
    # unknown camera labels are refused, naming the store's
    err = _error_line(capsys, [*base[:-1], "--query-cam", "camZ"])
    assert "query camera camZ is not in the store" in err and "cam1, cam2" in err
    assert "--cameras label camZ is not in the store" in _error_line(capsys, [*base, "--cameras", "cam1,camZ"])
    assert "does not combine" in _error_line(capsys, [*base, "--query-cam", "cam1"])


def _numbers_are_numbers(results):
    for r in results:
        assert r["pid"] is None or type(r["pid"]) is int
        assert r["time"] is None or type(r["time"]) is float
        assert isinstance(r["score_kind"], str) and "score" not in r
        for h in r["results"]:
            assert type(h["rank"]) is int and type(h["score"]) is float and type(h["row"]) is int
            assert h["pid"] is None or (type(h["pid"]) is int and h["pid"] >= 0)
            for key in ("time", "pair_score"):
                assert h.get(key) is None or type(h[key]) is float
            assert h["cam"] is None or h["cam"] != ""


def test_query_manifest_tracklets_and_gallery_tracklets(site, tmp_path, capsys):
    crops = sorted(site["gallery"].glob("cam5/*.jpg"))
    pid5 = [p for p in crops if site["truth"][f"cam5/{p.name}"][0] == site["truth"][f"cam5/{crops[0].name}"][0]]
    single = sorted(site["queries"].rglob("*.jpg"))[0]
    manifest = tmp_path / "q.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "camid", "time", "pid", "track"])
        for p in pid5:
            w.writerow([str(p), "cam5", "", site["truth"][f"cam5/{p.name}"][0], "t1"])
        w.writerow([str(single), single.parent.name, "12.5", "", ""])
    base = ["search", "--query-manifest", str(manifest), "--index", str(site["store"]), "--checkpoint", site["ckpt"],
            "--device", "cpu", "--top", "5", "--json"]
    for how in ("mean", "max"):
        res = _run(capsys, [*base, "--aggregate", how, "--group-tracks"])
        assert [r["query"] for r in res] == ["track t1 (cam5)", str(single)]
        assert res[0]["crops"] == [str(p) for p in pid5] and res[0]["track"] == "t1" and res[1]["time"] == 12.5
        assert res[0]["aggregate"] == how and res[0]["score_kind"] == f"{how} of the QAConv logits of crop pairs"
        _numbers_are_numbers(res)
        g = Gallery.open(site["store"], device="cpu")
        paths = [*pid5, single]
        want = g.search(paths, top=5, query_cameras=["cam5"] * len(pid5) + [single.parent.name],
                        query_tracks=["t1"] * len(pid5) + [None], aggregate=how, group_by_track=True,
                        exclude_same_camera=None)
        for r, w in zip(res, want, strict=True):
            for h in w:
                h["query_crop"] = str(paths[h["query_crop"]])
            assert r["results"] == w
            assert all(h["track"] is not None and h["crops"] >= 1 for h in r["results"])
        assert all(h["cam"] != "cam5" for h in res[0]["results"])
    table = main([*base[:-1], "--group-tracks"]) == 0 and capsys.readouterr().out
    assert "query track t1 (cam5) (pid" in table and f"{len(pid5)} crops" in table and "track crops" in table
    # bad manifests: one line naming file and line
    for rows, needle in (
        ([["path", "pid"], [str(single), "3"]], "q.csv:1: missing column(s) camid"),
        ([["path", "camid"], ["nope.jpg", "cam1"]], "q.csv:2: image nope.jpg does not exist"),
        ([["path", "camid", "pid"], [str(single), "cam1", "7"], [str(pid5[0]), "cam1", "x"]], "q.csv:3: column 'pid'"),
        ([["path", "camid", "time"], [str(single), "cam1", "soon"]], "q.csv:2: column 'time'"),
        ([["path", "camid"], [str(single), "cam1"], [str(single), "cam1"]], "q.csv:3: image"),
        ([["path", "camid"], [str(single), "camZ"]], "query camera camZ is not in the store"),
        ([["path", "camid", "track"], [str(single), "cam1", "a"], [str(pid5[0]), "cam2", "a"]], None),
    ):
        with open(manifest, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        if needle is None:  # one track label in two cameras: two tracklets, not a mixed one
            assert len(_run(capsys, base)) == 2
        else:
            assert needle in _error_line(capsys, base)
    assert "takes no QUERY" in _error_line(capsys, [*base, str(single)])


def test_tracklet_folders(site, tmp_path, capsys):
    track = tmp_path / "cam4" / "walker"
    track.mkdir(parents=True)
    crops = sorted(site["gallery"].glob("cam4/*.jpg"))[:3]
    for p in crops:
        shutil.copy(p, track / p.name)
    other = sorted(site["queries"].rglob("*.jpg"))[0]
    res = _run(capsys, ["search", str(track), str(other), "--tracklet", "--cam-from-folder", "--index",
                        str(site["store"]), "--checkpoint", site["ckpt"], "--device", "cpu", "--top", "4", "--json"])
    assert [r["query"] for r in res] == [str(track), str(other)]
    assert res[0]["cam"] == "cam4" and len(res[0]["crops"]) == 3 and res[0]["aggregate"] == "mean"
    assert res[1]["cam"] == other.parent.name and len(res[1]["crops"]) == 1
    assert all(h["cam"] != "cam4" and "crops" in h for h in res[0]["results"])
    g = Gallery.open(site["store"], device="cpu")
    want = g.search([*sorted(track.iterdir()), other], top=4, query_tracks=[0, 0, 0, 1],
                    query_cameras=["cam4"] * 3 + [other.parent.name], exclude_same_camera=None)
    assert [[h["path"] for h in r["results"]] for r in res] == [[h["path"] for h in w] for w in want]
    err = _error_line(capsys, ["search", str(track), "--tracklet", "--tlift", "--index", str(site["store"]),
                               "--checkpoint", site["ckpt"], "--query-cam", "cam4", "--query-time", "1"])
    assert "does not combine with tracklet queries" in err


def test_html_borders_links_and_captions(site, tmp_path, capsys):
    queries = sorted(site["queries"].rglob("*.jpg"))[:2]
    manifest = tmp_path / "q.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "camid", "pid"])
        for q in queries:
            w.writerow([str(q), q.parent.name, int(re.search(r"_p(\d+)", q.name)[1])])
    page = tmp_path / "out" / "r.html"
    res = _run(capsys, ["search", "--query-manifest", str(manifest), "--index", str(site["store"]), "--checkpoint",
                        site["ckpt"], "--device", "cpu", "--top", "6", "--json", "--html", str(page)])
    text = page.read_text()
    figures = re.findall(r"<figure( class=\"([a-z]+)\")?>(.*?)</figure>", text, flags=re.S)
    hits = [h for r in res for h in r["results"]]
    result_figs = [f for f in figures if f[1] != "query"]
    assert len(result_figs) == len(hits) and len(figures) == len(hits) + len(queries)
    for (_, cls, body), h, q in zip(result_figs, hits, [r for r in res for _ in r["results"]], strict=True):
        assert cls == ("same" if h["pid"] == q["pid"] else "different")  # both known here
        links = re.findall(r'(?:src|href)="([^"]*)"', body)
        assert len(links) == 3  # full-size picture, thumbnail, match picture
        for link in links:
            assert not link.startswith("/") and "://" not in link and (page.parent / link).is_file()
        assert re.search(r'href="r_files/m\d+_\d+\.png">match</a>', body)
    assert {cls for _, cls, _ in result_figs} == {"same", "different"}
    assert "break-all" not in text and "figcaption span{display:block;white-space:nowrap}" in text
    assert f"folder {queries[0].parent}" in text and f"camera {queries[0].parent.name}" in text
    assert "http" not in text


def test_export_pooled_from_the_command_line(site, tmp_path, capsys):
    out = tmp_path / "vectors"
    assert main(["index", "-o", str(site["store"]), "--export-pooled", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    g = Gallery.open(site["store"])
    pooled = np.load(out / "pooled.npy")
    np.testing.assert_array_equal(pooled, g._store.rows.pooled)
    with open(out / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == g.paths
    assert all((int(r["pid"]), r["camera"], r["track"]) == (*site["truth"][r["path"]], f"p{r['pid']}")
               for r in rows)
    assert main(["index", "-o", str(site["store"]), "--export-pooled", str(out), "--export-format", "parquet"]) == 0
    assert (out / "metadata.parquet").is_file()
