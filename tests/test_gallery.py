"""Gallery index and search: round trip, append, bad images, rankings against brute force, TLift, CLI."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qaconv import gallery as gal
from qaconv.cli import main
from qaconv.errors import QAConvError
from qaconv.gallery.meta import assign_cam_ids, parse_name, read_gallery_manifest

BAD = ("broken/zero.jpg", "text.jpg", "truncated.jpg")


def _save_model(path, seed):
    from qaconv.engine.checkpoint import save_checkpoint
    from qaconv.engine.runner import DEFAULTS, build_model

    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16}
    torch.manual_seed(seed)
    model, matcher = build_model(cfg)
    with torch.no_grad():  # give the head's BatchNorms non-trivial statistics, as training would
        matcher.bn.running_mean.fill_(0.3), matcher.bn.running_var.fill_(0.02)
        matcher.logit_bn.running_mean.fill_(20.0), matcher.logit_bn.running_var.fill_(4.0)
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return _save_model(d / "a.pt", 0), _save_model(d / "b.pt", 1)


@pytest.fixture(scope="module")
def extractor(ckpts):
    from qaconv.extractor import FeatureExtractor

    return FeatureExtractor(ckpts[0], device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def folder(tiny_domain, tmp_path_factory):
    """The tiny gallery plus: a sub-folder, a second-session copy, a grayscale non-Market PNG, 3 bad files."""
    root = tmp_path_factory.mktemp("gallery")
    src = sorted((tiny_domain / "bounding_box_test").iterdir())
    for p in src[:-4]:
        shutil.copy(p, root / p.name)
    (root / "sub").mkdir()
    for p in src[-4:]:
        shutil.copy(p, root / "sub" / p.name)
    shutil.copy(src[0], root / "0099_c2s2_000100_00.jpg")  # session 2 of camera 2: chained time offset
    Image.open(src[1]).convert("L").save(root / "person.png")  # odd but readable, no Market name
    (root / "broken").mkdir()
    (root / BAD[0]).write_bytes(b"")
    (root / BAD[1]).write_text("not an image")
    (root / BAD[2]).write_bytes(src[2].read_bytes()[:200])
    return root


@pytest.fixture(scope="module")
def built(folder, extractor, ckpts):
    return gal.build_index(folder, extractor, progress=False)


def _hand_times(names):
    """Market time stamps with session offsets chained per camera, written out from the spec (§8.1)."""
    parsed = [re.match(r"(-?\d+)_c(\d)s(\d)_(\d+)_", Path(n).name) for n in names]
    frames = {}
    for m in parsed:
        frames.setdefault((int(m[2]), int(m[3])), []).append(int(m[4]))
    offsets = {}
    for cam in {c for c, _ in frames}:
        offsets[(cam, 1)] = prev = 0
        for s in range(2, 10):
            prev_frames = frames.get((cam, s - 1), [])
            prev = (max(prev_frames) + prev if prev_frames else 0) + prev
            offsets[(cam, s)] = prev
    return np.array([(int(m[4]) + offsets[(int(m[2]), int(m[3]))]) / 25.0 for m in parsed])


def test_round_trip_features_and_metadata(built, folder, extractor, ckpts, tmp_path):
    index, report = built
    assert sorted(p for p, _ in report["unreadable"]) == sorted(BAD)
    every = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(index.paths.tolist()) == sorted(set(every) - set(BAD)) and report["added"] == len(index)
    assert "sub/" + sorted((folder / "sub").iterdir())[0].name in index.paths
    path = gal.save_index(index, tmp_path / "g.idx")
    assert [p.name for p in tmp_path.iterdir()] == ["g.idx"]  # no temporary file left behind
    loaded = gal.load_index(path)
    expected = extractor([str(folder / p) for p in loaded.paths]).numpy()
    assert loaded.features.dtype == np.float16 and loaded.features.shape == expected.shape
    np.testing.assert_allclose(loaded.features.astype(np.float32), expected, atol=2e-3, rtol=2e-3)
    pooled = expected.mean(axis=(2, 3))
    np.testing.assert_allclose(loaded.pooled, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=2e-3)
    for i, rel in enumerate(loaded.paths):
        m = re.match(r"^(-?\d+)_c(\d)s(\d)_(\d+)_\d+\.jpg$", Path(rel).name)
        if m is None:
            assert rel == "person.png"
            assert (loaded.pids[i], loaded.cams[i], loaded.cam_labels[i]) == (-1, -1, "")
            assert np.isnan(loaded.times[i])
        else:
            assert loaded.pids[i] == int(m[1]) and loaded.cams[i] == int(m[2]) - 1
            assert loaded.cam_labels[i] == f"c{m[2]}"
    market = np.isfinite(loaded.times)
    assert market.sum() == len(loaded) - 1 and not loaded.has_time
    np.testing.assert_allclose(loaded.times[market], _hand_times(loaded.paths[market]))
    late = list(loaded.paths).index("0099_c2s2_000100_00.jpg")
    c2 = [int(re.match(r"\d+_c2s1_(\d+)", Path(p).name)[1]) for p in loaded.paths if "_c2s1_" in p]
    assert loaded.times[late] == pytest.approx((100 + max(c2)) / 25)
    assert loaded.model_checkpoint == str(Path(ckpts[0]).resolve())
    assert loaded.feature_shape == expected.shape[1:]


def test_index_file_holds_plain_arrays_only(built, tmp_path):
    path = gal.save_index(built[0], tmp_path / "g.idx")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert all(a.dtype != object for a in arrays.values())
    assert str(arrays["format"]) == gal.FORMAT and len(arrays["model_hash"].item()) == 64


def test_corrupt_or_foreign_index_gives_clear_error(tmp_path):
    (tmp_path / "a.idx").write_bytes(b"garbage")
    np.savez(tmp_path / "b.npz", x=np.zeros(3))
    with pytest.raises(QAConvError, match="corrupt or not a qaconv gallery index"):
        gal.load_index(tmp_path / "a.idx")
    import os
    import pickle

    (tmp_path / "r.idx").write_bytes(os.urandom(5000))
    with open(tmp_path / "p.idx", "wb") as f:
        pickle.dump({"format": gal.FORMAT}, f)
    for name in ("r.idx", "p.idx"):  # random bytes and a pickle: never a hint to load unsafely
        with pytest.raises(QAConvError, match="corrupt or not a qaconv gallery index") as info:
            gal.load_index(tmp_path / name)
        assert "allow_pickle" not in str(info.value) and "trust" not in str(info.value)
    with pytest.raises(QAConvError, match="not a qaconv gallery index"):
        gal.load_index(tmp_path / "b.npz")
    with pytest.raises(QAConvError, match="does not exist"):
        gal.load_index(tmp_path / "missing.idx")


def test_append_adds_only_new_images_and_refuses_another_model(folder, extractor, ckpts, built, tmp_path):
    from qaconv.extractor import FeatureExtractor

    part = tmp_path / "part"
    part.mkdir()
    names = sorted(p.name for p in folder.glob("*.jpg") if p.name not in BAD)
    for n in names[:20]:
        shutil.copy(folder / n, part / n)
    first, rep = gal.build_index(part, extractor, progress=False)
    assert rep["added"] == 20
    for n in names[20:25]:
        shutil.copy(folder / n, part / n)
    grown, rep = gal.append_index(first, part, extractor, progress=False)
    assert (rep["added"], rep["skipped"]) == (5, 20)
    assert sorted(grown.paths.tolist()) == names[:25]
    np.testing.assert_array_equal(grown.features[:20], first.features)  # old rows untouched
    full = built[0]
    for i, p in enumerate(grown.paths):
        j = list(full.paths).index(p)
        np.testing.assert_allclose(grown.features[i].astype(np.float32), full.features[j].astype(np.float32),
                                   atol=2e-3)
        assert (grown.pids[i], grown.cams[i]) == (full.pids[j], full.cams[j])
    same, rep = gal.append_index(grown, part, extractor, progress=False)
    assert (rep["added"], rep["skipped"]) == (0, 25) and same is grown
    other = FeatureExtractor(ckpts[1], device="cpu")
    with pytest.raises(QAConvError, match="another model"):
        gal.append_index(grown, part, other, progress=False)


def test_manifest_overrides_names(folder, extractor, ckpts, tmp_path):
    names = sorted(p.name for p in folder.glob("*.jpg") if p.name not in BAD)[:6]
    sub = tmp_path / "m"
    sub.mkdir()
    for n in names:
        shutil.copy(folder / n, sub / n)
    csv = tmp_path / "meta.csv"
    csv.write_text(f"path,pid,camid,time\nm/{names[0]},42,front,12.5\n{sub / names[1]},-1,7,\nm/ghost.jpg,1,2,3\n")
    index, rep = gal.build_index(sub, extractor, manifest=csv, progress=False)
    assert rep["manifest_unmatched"] == 1
    i0, i1, i2 = (list(index.paths).index(n) for n in names[:3])
    assert (index.pids[i0], index.cam_labels[i0], index.times[i0]) == (42, "front", 12.5)
    assert (index.pids[i1], index.cam_labels[i1], index.cams[i1]) == (-1, "7", 7) and np.isnan(index.times[i1])
    assert index.pids[i2] == parse_name(names[2]).pid  # not in the manifest: from its name
    csv.write_text("path,pid,camid\nm/a.jpg,x,1\n")
    with pytest.raises(QAConvError, match=r"meta.csv:2: column 'pid'"):
        read_gallery_manifest(csv)


def test_camera_ids_are_stable_and_natural():
    ids, known = assign_cam_ids(["c3", "c1", "", "c3"])
    assert ids.tolist() == [2, 0, -1, 2]
    ids, known = assign_cam_ids(["front", "0", "c1", "back"], known)  # 0 and c1 want id 0: taken
    assert known["c3"] == 2 and known["c1"] == 0
    assert ids.tolist() == [known["front"], known["0"], 0, known["back"]]
    assert {known["0"], known["back"], known["front"]} == {1, 3, 4} and known["back"] < known["front"]
    assert parse_name("x/0007_c4s2_000123_01.png").pid == 7 and parse_name("x.jpg").pid == -1


def _queries(tiny_domain, n=6):
    return [str(p) for p in sorted((tiny_domain / "query").iterdir())[:n]]


def _brute(extractor, q, index):
    matcher = extractor.matcher.eval()
    with torch.no_grad():
        return matcher(q, torch.from_numpy(index.features.astype(np.float32))).numpy()


def _assert_ranking(scores, rows, truth, allowed=None, atol=1e-4):
    """Returned scores equal truth at the returned rows and the best values of the allowed rows, in order."""
    for r in range(len(scores)):
        cols = np.arange(truth.shape[1]) if allowed is None else np.asarray(allowed[r])
        assert len(set(rows[r])) == len(rows[r]) and set(rows[r]) <= set(cols.tolist())
        np.testing.assert_allclose(scores[r], truth[r, rows[r]], atol=atol)
        np.testing.assert_allclose(scores[r], np.sort(truth[r, cols])[::-1][: len(scores[r])], atol=atol)


def test_exhaustive_search_equals_brute_force(built, extractor, tiny_domain, monkeypatch):
    index = built[0]
    q = extractor(_queries(tiny_domain))
    truth = _brute(extractor, q, index)
    s, rows = gal.search_index(index, q, extractor.matcher, k=7, exhaustive=True, device="cpu")
    _assert_ranking(s, rows, truth)
    s2, rows2 = gal.search_index(index, q, extractor.matcher, k=7, candidates=len(index), device="cpu")
    np.testing.assert_array_equal(rows2, rows)
    monkeypatch.setattr("qaconv.gallery.index.GALLERY_BLOCK", 5)  # several gallery blocks merged
    s3, rows3 = gal.search_index(index, q, extractor.matcher, k=7, exhaustive=True, device="cpu")
    _assert_ranking(s3, rows3, truth)
    s4, _ = gal.search_index(index, q, extractor.matcher, k=10_000, exhaustive=True, device="cpu")
    assert s4.shape == (len(q), len(index))  # k capped at the index size


def test_shortlist_search_equals_brute_force_on_the_shortlist(built, extractor, tiny_domain):
    from qaconv.gallery.search import two_stage_topk

    index = built[0]
    q = extractor(_queries(tiny_domain))
    m = 9
    cand = gal.shortlist(index, q, m, device="cpu")
    pq = q.numpy().mean(axis=(2, 3))
    pg = index.features.astype(np.float32).mean(axis=(2, 3))
    cos = (pq / np.linalg.norm(pq, axis=1, keepdims=True)) @ (pg / np.linalg.norm(pg, axis=1, keepdims=True)).T
    for r in range(len(q)):  # the shortlist is the m best pooled cosines (up to float rounding)
        assert len(set(cand[r])) == m and cos[r, cand[r]].min() >= np.sort(cos[r])[::-1][m - 1] - 1e-5
    truth = _brute(extractor, q, index)
    s, rows = gal.search_index(index, q, extractor.matcher, k=4, candidates=m, device="cpu")
    _assert_ranking(s, rows, truth, allowed=cand)
    ts, _ = two_stage_topk(extractor.matcher, q, torch.from_numpy(index.features).float(), 4, m, device="cpu",
                           use_faiss=False)
    np.testing.assert_allclose(s, ts.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def timed_index(tiny_domain, extractor, ckpts):
    return gal.build_index(tiny_domain / "bounding_box_test", extractor, progress=False)[0]


def test_tlift_search_equals_direct_tlift(timed_index, extractor, tiny_domain):
    from qaconv.tlift import tlift

    index = timed_index
    queries = _queries(tiny_domain, n=12)
    q = extractor(queries)
    pids, q_cams, labels, q_times, g_times = gal.query_metadata(index, queries)
    names = [Path(p).name for p in (*index.paths, *queries)]
    hand = _hand_times(names)
    np.testing.assert_allclose(q_times, hand[len(index):])
    np.testing.assert_allclose(g_times, hand[: len(index)])
    hand_q_cams = [int(re.search(r"_c(\d)", Path(p).name)[1]) - 1 for p in queries]
    assert q_cams.tolist() == hand_q_cams and labels == [f"c{c + 1}" for c in hand_q_cams]
    kw = dict(tau=50.0, sigma=100.0, tlift_k=3, alpha=0.2)
    s, rows = gal.tlift_search(index, q, extractor.matcher, q_cams, q_times, g_times, k=6, exhaustive=True,
                               device="cpu", **kw)
    sim = 1 / (1 + np.exp(-_brute(extractor, q, index).astype(np.float64)))  # sigma(logit): official TLift advice
    truth = tlift(sim, hand_q_cams, hand[len(index):], index.cams, hand[: len(index)], tau=50.0, sigma=100.0, k=3,
                  alpha=0.2)
    _assert_ranking(s, rows, truth, atol=1e-5)
    assert not np.allclose(truth, 0.2 * sim)  # the lifting did something


def test_query_times_chain_sessions_over_index_and_queries(built):
    index = built[0]
    names = ["0001_c2s1_999999_00.jpg", "0001_c2s2_000010_00.jpg", "other.jpg"]
    pids, cams, labels, q_times, g_times = gal.query_metadata(index, names)
    market = np.flatnonzero(np.isfinite(index.times))
    hand = _hand_times([*index.paths[market], *names[:2]])
    np.testing.assert_allclose(g_times[market], hand[:-2])
    np.testing.assert_allclose(q_times[:2], hand[-2:])
    late = list(index.paths).index("0099_c2s2_000100_00.jpg")
    assert g_times[late] == pytest.approx((100 + 999999) / 25) != index.times[late]
    assert pids.tolist() == [1, 1, -1] and labels == ["c2", "c2", ""] and cams.tolist() == [1, 1, -1]
    assert np.isnan(q_times[2])
    _, cams, labels, q_times, g_times = gal.query_metadata(index, names, ["x", "x", "y"], [1.0, 2.0, 3.0])
    assert q_times.tolist() == [1.0, 2.0, 3.0] and g_times is index.times and cams[0] == cams[1] != cams[2]


def test_tlift_refused_without_times(built, extractor, tiny_domain):
    q = extractor(_queries(tiny_domain, n=2))
    with pytest.raises(QAConvError, match="time stamp for every gallery image"):
        gal.tlift_search(built[0], q, extractor.matcher, [0, 0], [1.0, 2.0])


def test_another_model_refused(built, ckpts):
    from qaconv.extractor import FeatureExtractor

    other = FeatureExtractor(ckpts[1], device="cpu")
    with pytest.raises(QAConvError, match="another model") as exc:
        gal.check_model(built[0], gal.model_identity(other))
    assert "\n" not in str(exc.value)
    gal.check_model(built[0], gal.model_identity(FeatureExtractor(ckpts[0], device="cpu")))


@pytest.mark.parametrize("command", ["index", "search"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and "default" in capsys.readouterr().out


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_index_then_search(folder, ckpts, tiny_domain, built, extractor, tmp_path, capsys):
    idx = tmp_path / "g.idx"
    assert main(["index", str(folder), "--checkpoint", ckpts[0], "-o", str(idx), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"added {len(built[0])} images" in out and "3 unreadable skipped" in out and "float16" in out
    assert main(["index", str(folder), "--checkpoint", ckpts[0], "-o", str(idx)]) == 1
    assert "--append" in _error_line(capsys)
    assert main(["index", str(folder), "--checkpoint", ckpts[0], "-o", str(idx), "--append"]) == 0
    assert f"skipped {len(built[0])} already" in capsys.readouterr().out
    queries = _queries(tiny_domain, n=3)
    base = ["search", *queries, "--index", str(idx), "--checkpoint", ckpts[0], "--device", "cpu", "--top", "4",
            "--include-same-camera"]
    assert main([*base, "--json", "--exhaustive"]) == 0
    res = json.loads(capsys.readouterr().out)
    index = built[0]  # the in-memory index of the same folder: the store must rank as it does
    s, rows = gal.search_index(index, extractor(queries), extractor.matcher, k=4, exhaustive=True)
    for r, item in enumerate(res):
        assert item["query"] == queries[r] and [x["rank"] for x in item["results"]] == [1, 2, 3, 4]
        assert [x["path"] for x in item["results"]] == [index.paths[g] for g in rows[r]]
        np.testing.assert_allclose([x["score"] for x in item["results"]], s[r], atol=1e-5)
    assert main(base) == 0
    table = capsys.readouterr().out
    assert table.count("rank     score") == 3 and str(res[0]["results"][0]["path"]) in table
    # errors: one line, exit 1
    assert main([*base, "--tlift"]) == 1
    assert "time stamp" in _error_line(capsys)
    assert main(["search", queries[0], "--index", str(tmp_path / "none.idx"), "--checkpoint", ckpts[0]]) == 1
    assert "does not exist" in _error_line(capsys)
    assert main(["index", str(tmp_path / "nowhere"), "--checkpoint", ckpts[0], "-o", str(tmp_path / "x.idx")]) == 1
    assert "nowhere" in _error_line(capsys)
    assert main(["search", queries[0], "--index", str(idx), "--checkpoint", ckpts[1]]) == 1
    assert "another model" in _error_line(capsys)
    assert main(["search", str(tmp_path / "q.gif"), "--index", str(idx), "--checkpoint", ckpts[0]]) == 1
    assert _error_line(capsys).endswith("q.gif does not exist")  # missing: said so, not "not an image"
    (tmp_path / "q.gif").write_bytes(b"GIF89a")
    assert main(["search", str(tmp_path / "q.gif"), "--index", str(idx), "--checkpoint", ckpts[0]]) == 1
    assert "q.gif is not an image file (expected .jpg" in _error_line(capsys)


def test_cli_tlift_and_html(tiny_domain, ckpts, tmp_path, capsys):
    idx = tmp_path / "t.idx"
    assert main(["index", str(tiny_domain / "bounding_box_test"), "--checkpoint", ckpts[0], "-o", str(idx)]) == 0
    capsys.readouterr()
    queries = _queries(tiny_domain, n=2)
    html_path = tmp_path / "page" / "results.html"
    args = ["search", *queries, "--index", str(idx), "--checkpoint", ckpts[0], "--top", "3", "--tlift",
            "--candidates", "10", "--html", str(html_path), "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["score_kind"] == "TLift-lifted similarity" and res[0]["time"] is not None
    assert all(r["same_camera_excluded"] and h["cam"] != r["cam"] for r in res for h in r["results"])
    page = html_path.read_text()
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    # per image a thumbnail and its full-size picture, per result a match picture
    assert len(links) == 2 * (2 + 2 * 3) + 2 * 3 and "http" not in page
    for link in links:
        assert not link.startswith("/") and (html_path.parent / link).is_file()
    assert main([*args[:-3], "--query-time", "1,2,3"]) == 1
    assert "one value or 2" in _error_line(capsys)
    assert main([*args[:-3], "--query-cam", "c1", "--query-time", "5"]) == 0  # options instead of names
    assert main([*args[:-3], "--query-cam", "a", "--query-time", "5"]) == 1  # a camera the store has not
    assert "query camera a is not in the store" in _error_line(capsys)


def test_html_escapes_text_and_marks_missing_images(tiny_domain, tmp_path):
    from qaconv.viz.search_html import write_search_html

    root = tmp_path / "g"
    root.mkdir()
    shutil.copy(sorted((tiny_domain / "query").iterdir())[0], root / "a&b <x>.jpg")
    results = [{"query": str(root / "a&b <x>.jpg"), "crops": [str(root / "a&b <x>.jpg")], "pid": None,
                "cam": None, "score_kind": "QAConv logit",
                "results": [{"rank": 1, "score": 1.5, "path": "a&b <x>.jpg", "pid": 3, "cam": "c1", "row": 0},
                            {"rank": 2, "score": 1.0, "path": "gone.jpg", "pid": 4, "cam": "c2", "row": 1}]}]
    page = write_search_html(tmp_path / "r.html", results, root).read_text()
    assert "a&amp;b &lt;x&gt;.jpg" in page and "<x>" not in page
    assert page.count("<img ") == 2 and page.count("image missing") == 1
    assert sorted(p.name for p in (tmp_path / "r_files").iterdir()) == ["g0.png", "g0_full.png", "q0_0.png",
                                                                         "q0_0_full.png"]
    assert 'class="same"' not in page.split("</style>")[1] and 'class="different"' not in page  # pid unknown


# -- non-finite features and crafted index fields ---------------------------------------------------------------
class _NaNExtractor:
    """The real extractor, but rows ``bad`` (within each call) of its maps become NaN."""

    def __init__(self, inner, bad):
        self.inner, self.bad = inner, bad

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, images):
        maps = self.inner(images).clone()
        maps[[r for r in self.bad if r < len(maps)]] = torch.nan
        return maps


def _small_folder(tiny_domain, dest, n):
    dest.mkdir()
    for p in sorted((tiny_domain / "bounding_box_test").iterdir())[:n]:
        shutil.copy(p, dest / p.name)
    return sorted(p.name for p in dest.iterdir())


def test_build_and_append_refuse_nan_features(tiny_domain, extractor, ckpts, tmp_path):
    names = _small_folder(tiny_domain, tmp_path / "g", 5)
    stub = _NaNExtractor(extractor, bad=[1, 3])
    with pytest.raises(QAConvError) as info:
        gal.build_index(tmp_path / "g", stub, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "non-finite" in msg and "2 of 5 images" in msg
    assert names[1] in msg and names[3] in msg and names[0] not in msg
    first, _ = gal.build_index(tmp_path / "g", extractor, progress=False)
    (tmp_path / "g" / "extra.png").write_bytes((tmp_path / "g" / names[0]).read_bytes())
    with pytest.raises(QAConvError, match=r"non-finite features .* 1 of 1 images \(e\.g\. extra\.png\)"):
        gal.append_index(first, tmp_path / "g", _NaNExtractor(extractor, bad=[0]), progress=False)
    grown, rep = gal.append_index(first, tmp_path / "g", extractor, progress=False)
    assert rep["added"] == 1 and np.isfinite(grown.features.astype(np.float32)).all()


def _crafted(built, tmp_path, **changes):
    """Save the valid fixture index with some fields replaced, as np.savez writes them."""
    path = gal.save_index(built[0], tmp_path / "ok.idx")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    out = tmp_path / "crafted.npz"
    np.savez(out, **arrays)
    return out


def _load_error(path):
    with pytest.raises(QAConvError) as info:
        gal.load_index(path)
    msg = str(info.value)
    assert "\n" not in msg and "rebuild" in msg
    return msg


def test_load_refuses_non_finite_features_and_pooled(built, tmp_path):
    index = built[0]
    feats, pooled = index.features.copy(), index.pooled.copy()
    feats[[2, 5], 0, 0, 0] = np.nan
    feats[7, 1, 1, 1] = np.inf
    msg = _load_error(_crafted(built, tmp_path, features=feats))
    assert f"field 'features' holds NaN/inf for 3 of {len(index)} images" in msg
    assert all(index.paths[i] in msg for i in (2, 5, 7))
    pooled[4, 0] = -np.inf
    msg = _load_error(_crafted(built, tmp_path, pooled=pooled))
    assert f"field 'pooled' holds NaN/inf for 1 of {len(index)} images (e.g. {index.paths[4]})" in msg
    gal.load_index(_crafted(built, tmp_path))  # unchanged: loads


def _market_row(index):
    return int(np.flatnonzero(index.time_sources == 1)[0])


@pytest.mark.parametrize("field, make, expected", [
    ("feature_shape", lambda ix: np.array(5, dtype=np.int64), '3 positive integers'),  # 0-d
    ("feature_shape", lambda ix: np.array([ix.feature_shape[0], 0, 3], dtype=np.int64), '3 positive integers'),
    ("pids", lambda ix: ix.pids.astype(str), 'integers, got <U'),  # string pids
    ("paths", lambda ix: ix.paths[:0], 'non-empty [N]'),  # empty index
    ("paths", lambda ix: np.concatenate((ix.paths[:-1], ix.paths[:1])), 'distinct'),  # a repeated path
    ("cams", lambda ix: np.where(ix.cams == 0, -3, ix.cams), '(-1 = unknown), got -3'),  # negative camera other than -1
    ("cams", lambda ix: np.where(ix.cams == 0, 1, ix.cams), 'one id per camera label'),  # two labels, one id
    ("times", lambda ix: np.where(np.arange(len(ix)) == _market_row(ix), np.nan, ix.times),
     'there is a time'),  # NaN, yet a source
    ("times", lambda ix: np.where(np.isnan(ix.times), 3.0, ix.times), 'there is a time'),  # time, no source
    ("time_sources", lambda ix: np.full(len(ix), 7, dtype=np.int8), 'got [7]'),
    ("sessions", lambda ix: np.where(np.arange(len(ix)) == _market_row(ix), -1, ix.sessions), 'Market name'),
    ("frames", lambda ix: ix.frames[:-1], 'shape (53,)'),  # wrong length
    ("cam_labels", lambda ix: np.where(ix.cam_labels == "c1", "x9", ix.cam_labels), "'cN'"),  # no cN for a name time
    ("features", lambda ix: ix.features.astype(np.float32), 'float16 ['),
    ("features", lambda ix: ix.features[:, :, :1], 'float16 ['),
    ("pooled", lambda ix: ix.pooled * 2, 'unit-norm'),
    ("pooled", lambda ix: ix.pooled.astype(np.float64), 'float32 ['),
    ("model_hash", lambda ix: np.array("abc"), 'SHA-256'),
    ("root", lambda ix: np.array([1, 2]), 'a string'),
])
def test_load_names_the_invalid_field(built, tmp_path, field, make, expected):
    msg = _load_error(_crafted(built, tmp_path, **{field: make(built[0])}))
    assert f"field '{field}' must be" in msg and expected in msg


def test_search_refuses_non_finite_query_maps(timed_index, extractor, tiny_domain):
    queries = _queries(tiny_domain, n=3)
    q = extractor(queries).clone()
    q[1, 0, 0, 0] = float("nan")
    for search in (
        lambda: gal.search_index(timed_index, q, extractor.matcher, k=3, device="cpu"),
        lambda: gal.tlift_search(timed_index, q, extractor.matcher, [0, 0, 0], [1.0, 2.0, 3.0], k=3, device="cpu"),
    ):
        with pytest.raises(QAConvError, match=r"query feature maps for 1 of 3 images \(e.g. query 1\)"):
            search()
