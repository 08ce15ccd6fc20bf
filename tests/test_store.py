"""The gallery store (qaconv.Gallery on LanceDB): rankings against brute force written here (exhaustive and
two-stage), filters against brute-force filtering, append / remove equal to a store built from scratch, a
SIGKILL during an append, corrupted / foreign stores, another model, NaN, every field checked at open,
conversion of the old .npz index, concurrent writers."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qaconv
from qaconv import Gallery
from qaconv.cli import main
from qaconv.errors import QAConvError

C, H, W = 16, 4, 2  # the maps of the tiny model below (neck 16, 64x32 input)
CAMS = ["a", "b", "c"]


def _save_model(path, seed):
    from qaconv.engine.checkpoint import save_checkpoint
    from qaconv.engine.runner import DEFAULTS, build_model

    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16}
    torch.manual_seed(seed)
    model, matcher = build_model(cfg)
    with torch.no_grad():  # non-trivial head statistics, as training would leave
        matcher.bn.running_mean.fill_(0.3), matcher.bn.running_var.fill_(0.02)
        matcher.logit_bn.running_mean.fill_(20.0), matcher.logit_bn.running_var.fill_(4.0)
        matcher.fc.weight.add_(0.05 * torch.randn(matcher.fc.weight.shape))
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("store_models")
    return _save_model(d / "a.pt", 0), _save_model(d / "b.pt", 1)


@pytest.fixture(scope="module")
def head(ckpts):
    from qaconv.extractor import FeatureExtractor

    return FeatureExtractor(ckpts[0], device="cpu").matcher.eval()


def _maps(n, seed, ids=5, noise=0.7):
    """Identity-structured unit-per-location maps [n, C, H, W] (float32): base of identity i % ids plus noise."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(ids, C, H, W, generator=torch.Generator().manual_seed(99))
    return F.normalize(bases[torch.arange(n) % ids] + noise * torch.randn(n, C, H, W, generator=g), dim=1)


def _meta(n, start=0):
    return [{"path": f"e{i:03d}.jpg", "pid": i % 5, "cam": CAMS[i % 3], "time": 10.0 * i}
            for i in range(start, start + n)]


@pytest.fixture()
def store(tmp_path, ckpts):
    g = Gallery.create(tmp_path / "g.store", ckpts[0], device="cpu")
    maps = _maps(40, 1)
    g.add(maps, _meta(40))
    return g, maps


def _brute(head, q, maps):
    """QAConv logits [Q, N] by the head's own forward, against the fp16-rounded stored maps."""
    with torch.no_grad():
        return head(q.float(), maps.half().float()).numpy()


def _pooled_cos(q, maps):
    pq = F.normalize(q.mean(dim=(2, 3)), dim=1)
    pg = F.normalize(maps.half().float().mean(dim=(2, 3)), dim=1)
    return (pq @ pg.t()).numpy()


def _assert_hits(hits, truth, allowed, top, paths=None, atol=1e-4):
    """Per query: as many hits as allowed rows (at most top), distinct allowed rows, scores equal to truth at
    those rows and to the best truth values among the allowed rows, in order."""
    paths = paths if paths is not None else [f"e{i:03d}.jpg" for i in range(truth.shape[1])]
    for r, row_hits in enumerate(hits):
        cols = np.asarray(allowed[r], dtype=np.int64)
        want = np.sort(truth[r, cols])[::-1][:top]
        assert len(row_hits) == len(want) and [h["rank"] for h in row_hits] == list(range(1, len(want) + 1))
        got = [paths.index(h["path"]) for h in row_hits]
        assert len(set(got)) == len(got) and set(got) <= set(cols.tolist())
        np.testing.assert_allclose([h["score"] for h in row_hits], truth[r, got], atol=atol)
        np.testing.assert_allclose([h["score"] for h in row_hits], want, atol=atol)


# -- rankings ------------------------------------------------------------------------------------------------------
def test_exhaustive_and_two_stage_with_m_covering_equal_brute_force(store, head):
    g, maps = store
    q = _maps(6, 7)
    truth = _brute(head, q, maps)
    every = [range(40)] * len(q)
    _assert_hits(g.search(q, top=7, exhaustive=True), truth, every, 7)
    _assert_hits(g.search(q, top=7, candidates=40), truth, every, 7)  # M >= N: exhaustive path
    _assert_hits(g.search(q, top=7, candidates=40, exhaustive=False), truth, every, 7)  # two stages, M = N
    _assert_hits(g.search(q, top=7, candidates=500, exhaustive=False), truth, every, 7)
    hits = g.search(q, top=100, exhaustive=True)
    assert [len(h) for h in hits] == [40] * 6  # top capped at the store size


def test_two_stage_ranks_the_brute_force_shortlist(store, head):
    g, maps = store
    q = _maps(5, 8)
    m = 9
    cos = _pooled_cos(q, maps)
    shortlist = [np.argsort(-cos[r], kind="stable")[:m] for r in range(len(q))]
    _assert_hits(g.search(q, top=4, candidates=m), _brute(head, q, maps), shortlist, 4)


def test_filters_equal_brute_force_filtering(store, head):
    g, maps = store
    q = _maps(6, 9)
    truth = _brute(head, q, maps)
    cams = np.array([CAMS[i % 3] for i in range(40)])
    times = 10.0 * np.arange(40)
    q_cams = ["a", "b", "c", "a", "zz", "b"]  # "zz": a camera the store has not seen
    cases = [
        (dict(cameras=["a", "c"]), lambda r: np.isin(cams, ["a", "c"])),
        (dict(cameras="b"), lambda r: cams == "b"),
        (dict(cameras=["nowhere"]), lambda r: np.zeros(40, bool)),
        (dict(time_window=(55.0, 200.0)), lambda r: (times >= 55) & (times <= 200)),
        (dict(time_window=(None, 30.0)), lambda r: times <= 30),
        (dict(time_window=(300.0, None), cameras=["a"]), lambda r: (times >= 300) & (cams == "a")),
        (dict(exclude_same_camera=True, query_cameras=q_cams), lambda r: cams != q_cams[r]),
        (dict(exclude_same_camera=True, query_cameras=q_cams, time_window=(0, 150)),
         lambda r: (cams != q_cams[r]) & (times <= 150)),
    ]
    for kw, rule in cases:
        allowed = [np.flatnonzero(rule(r)) for r in range(len(q))]
        for extra in (dict(exhaustive=True), dict(candidates=40, exhaustive=False), dict(candidates=6)):
            hits = g.search(q, top=5, **kw, **extra)
            if extra.get("candidates") == 6:  # two stages over the allowed rows: the 6 best allowed by cosine
                cos = _pooled_cos(q, maps)
                short = [a[np.argsort(-cos[r, a], kind="stable")[:6]] if len(a) > 6 else a
                         for r, a in enumerate(allowed)]
                _assert_hits(hits, truth, short, 5)
            else:
                _assert_hits(hits, truth, allowed, 5)
    with pytest.raises(QAConvError, match="exclude_same_camera needs"):
        g.search(q, exclude_same_camera=True)
    with pytest.raises(QAConvError, match="time_window"):
        g.search(q, time_window=(5, 1))


def test_append_and_remove_equal_a_store_built_from_scratch(tmp_path, ckpts, head):
    maps = _maps(60, 2)
    meta = _meta(60)
    g = Gallery.create(tmp_path / "grown", ckpts[0], device="cpu")
    ids = [*g.add(maps[:25], meta[:25]), *g.add(maps[25:50], meta[25:50])]
    assert g.remove(paths=["e003.jpg", "e010.jpg", "missing.jpg"]) == 2
    assert g.remove(cameras=["b"], before=200.0) == 6  # b at 10, 40, ..., 190 s but e010 (gone already)
    assert g.remove(after=455.0) == 4  # 460 ... 490 s
    ids += list(g.add(maps[50:], meta[50:]))
    assert len(set(ids)) == 60 and ids == sorted(ids)  # ids are stable and never reused
    keep = [i for i in range(60) if not (i in (3, 10) or (i % 3 == 1 and 10 * i < 200) or 455 < 10 * i < 500)]
    assert sorted(g.paths) == sorted(meta[i]["path"] for i in keep) and len(g) == len(keep)
    fresh = Gallery.create(tmp_path / "fresh", ckpts[0], device="cpu")
    fresh.add(maps[keep], [meta[i] for i in keep])
    q = _maps(5, 3)
    paths = [m["path"] for m in meta]
    truth = _brute(head, q, maps)
    reopened = Gallery.open(tmp_path / "grown", device="cpu")
    for kw in (dict(exhaustive=True), dict(candidates=12), dict(candidates=12, cameras=["a", "c"]),
               dict(time_window=(100, 400), exhaustive=True)):
        results = [x.search(q, top=6, **kw) for x in (g, fresh, reopened)]
        for res in results[1:]:
            assert [[h["path"] for h in r] for r in res] == [[h["path"] for h in r] for r in results[0]]
            np.testing.assert_allclose([[h["score"] for h in r] for r in res],
                                       [[h["score"] for h in r] for r in results[0]], atol=1e-5)
    _assert_hits(g.search(q, top=6, exhaustive=True), truth, [keep] * 5, 6, paths)
    assert [h["row"] for h in reopened.search(q[:1], top=3)[0]] == [h["row"] for h in g.search(q[:1], top=3)[0]]
    g.compact()  # fragments merged, deleted rows dropped: same entries, same ids
    assert sorted(g.paths) == sorted(reopened.paths)
    assert g.search(q, top=6, candidates=12) == reopened.search(q, top=6, candidates=12)
    with pytest.raises(QAConvError, match="at least one of"):
        g.remove()


def test_add_refuses_duplicates_bad_metadata_and_nan_writing_nothing(store):
    g, maps = store
    before = (len(g), g._store.rows.version)
    with pytest.raises(QAConvError, match=r"1 of 2 entries are already in the store \(e.g. e001.jpg\)"):
        g.add(_maps(2, 5), [{"path": "new.jpg"}, {"path": "e001.jpg"}])
    with pytest.raises(QAConvError, match="more than once"):
        g.add(_maps(2, 5), [{"path": "x.jpg"}, {"path": "x.jpg"}])
    with pytest.raises(QAConvError, match="unknown key"):
        g.add(_maps(1, 5), [{"path": "x.jpg", "camera": "a"}])
    with pytest.raises(QAConvError, match="'time' must be a finite"):
        g.add(_maps(1, 5), [{"path": "x.jpg", "time": float("nan")}])
    with pytest.raises(QAConvError, match="'pid' must be an integer"):
        g.add(_maps(1, 5), [{"path": "x.jpg", "pid": 1.5}])
    with pytest.raises(QAConvError, match="2 items but 1 metadata"):
        g.add(_maps(2, 5), [{"path": "x.jpg"}])
    bad = _maps(4, 6)
    bad[1, 0, 0, 0] = float("nan")
    bad[3, 2, 1, 1] = float("inf")
    with pytest.raises(QAConvError) as info:
        g.add(bad, _meta(4, start=100))
    msg = str(info.value)
    assert "\n" not in msg and "non-finite" in msg and "2 of 4 images" in msg and "e101.jpg" in msg
    assert "e103.jpg" in msg and "e100.jpg" not in msg
    big = _maps(1, 6) * 1e6  # overflows float16
    with pytest.raises(QAConvError, match="float16 overflow"):
        g.add(big, _meta(1, start=200))
    assert (len(g), g._store.rows.version) == before and len(Gallery.open(g.path)) == 40


def test_search_refuses_nan_queries_and_stored_nan_rows(store, tmp_path):
    g, maps = store
    q = _maps(3, 4)
    q[1, 0, 0, 0] = float("nan")
    with pytest.raises(QAConvError, match=r"query feature maps for 1 of 3 images \(e.g. query 1\)"):
        g.search(q)
    # a row written past the checks (low-level append): reading it for re-scoring names it, verify() too
    feats = _maps(1, 5).half().numpy()
    feats[0, 0, 0, 0] = np.nan
    pooled = F.normalize(_maps(1, 5).mean(dim=(2, 3)), dim=1).numpy()
    g._store.append({"path": ["bad.jpg"], "pid": [1], "cam_label": ["a"], "time": [np.nan], "session": [-1],
                     "frame": [-1], "time_source": [0]}, feats, pooled)
    for call in (lambda: g.search(_maps(2, 4), exhaustive=True), g.verify):
        with pytest.raises(QAConvError, match=r"field 'features' holds NaN/inf for 1 of .* \(e.g. bad.jpg\)") as e:
            call()
        assert "\n" not in str(e.value)


def test_model_identity_is_checked(store, ckpts, tmp_path, capsys):
    g, _ = store
    with pytest.raises(QAConvError, match="another model") as info:
        Gallery.open(g.path, ckpts[1], device="cpu").extractor  # noqa: B018
    assert "\n" not in str(info.value)
    Gallery.open(g.path, ckpts[0], device="cpu").extractor  # noqa: B018 - the right one loads
    assert Gallery.open(g.path).model["checkpoint"] == str(Path(ckpts[0]).resolve())
    folder = tmp_path / "imgs"
    folder.mkdir()
    assert main(["index", str(folder), "--checkpoint", ckpts[1], "-o", str(g.path), "--append"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another model" in err


# -- a kill during an append ----------------------------------------------------------------------------------------
CHILD = r"""
import sys, time, numpy as np, torch, torch.nn.functional as F
from qaconv import Gallery
path, mode, n, pre = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
g = Gallery.open(path)
if mode == "slow":  # a slow disk: Lance gets the rows batch by batch, and we say when half are in
    import pyarrow as pa
    tbl = g._store._tbl
    add = tbl.add
    def slow_add(table, **kw):
        batches = table.to_batches(max_chunksize=64)
        def gen():
            for i, b in enumerate(batches):
                if i == len(batches) // 2:
                    print("HALF", flush=True)
                    time.sleep(60)
                yield b
        return add(pa.RecordBatchReader.from_batches(table.schema, gen()), **kw)
    tbl.add = slow_add
print("READY", flush=True)
for k in range(1000):
    m = F.normalize(torch.randn(n, 16, 4, 2, generator=torch.Generator().manual_seed(k)), dim=1)
    g.add(m, [{"path": f"{pre}{k}_{i}.jpg", "cam": "a", "time": float(k)} for i in range(n)])
    print("ADDED", k, flush=True)
"""


def _child(path, mode, n, prefix="k"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(qaconv.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), mode, str(n), prefix], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, word):
    for line in proc.stdout:
        if line.startswith(word):
            return
    raise AssertionError(f"child ended before {word}: {proc.stderr.read()}")


def _assert_whole_batches(g, n, head, prefix="k"):
    """The store holds whole batches only (paths k0_*, ..., kj_* complete), reads and searches fine."""
    batches = {}
    for p in g.paths:
        if p.startswith(prefix):
            k = int(p[len(prefix):].split("_")[0])
            batches[k] = batches.get(k, 0) + 1
    assert all(v == n for v in batches.values()) and sorted(batches) == list(range(len(batches)))
    assert g.verify() == len(g)
    hits = g.search(_maps(2, 1), top=3, exhaustive=True)
    assert [len(h) for h in hits] == [min(3, len(g))] * 2
    return len(batches)


def test_sigkill_during_append_leaves_old_or_new_state(store, head):
    g, _ = store
    n = 500
    # 1. killed while Lance is writing the rows (half the batches handed over, no commit yet): the old state
    proc = _child(g.path, "slow", n)
    _wait_for(proc, "HALF")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reopened = Gallery.open(g.path, device="cpu")
    assert len(reopened) == 40 and _assert_whole_batches(reopened, n, head) == 0
    assert g.search(_maps(2, 1), top=3) == reopened.search(_maps(2, 1), top=3)
    # 2. two processes appending at once (serialised by the store's file lock), both killed at an arbitrary
    #    moment of their stream of appends: whole batches of each, distinct ids
    procs = [_child(g.path, "fast", 100, prefix) for prefix in ("x", "y")]
    for p in procs:
        for line in p.stdout:
            if line.startswith("ADDED 2"):
                break
    time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert g.refresh()  # this process sees the other processes' writes once it refreshes
    assert _assert_whole_batches(g, 100, head, "x") >= 3 and _assert_whole_batches(g, 100, head, "y") >= 3
    rows = g._store.rows
    assert len(set(rows.ids.tolist())) == rows.n == len(set(g.paths))
    # 3. the store goes on: an append after the kills works and is seen on reopening
    size = len(g)
    g.add(_maps(3, 3), [{"path": f"after{i}.jpg"} for i in range(3)])
    assert len(Gallery.open(g.path)) == size + 3


def test_one_writer_many_readers_in_one_process(store, head):
    g, maps = store
    q = _maps(2, 11)
    errors, done = [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                hits = g.search(q, top=5, candidates=8)
                assert all(len(h) == 5 and [x["rank"] for x in h] == [1, 2, 3, 4, 5] for h in hits)
                assert all(h[i]["score"] >= h[i + 1]["score"] for h in hits for i in range(4))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for k in range(8):
        g.add(_maps(10, 20 + k), _meta(10, start=100 + 10 * k))
        if k % 3 == 2:
            g.remove(paths=[f"e{100 + 10 * k:03d}.jpg"])
    done.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(g) == 40 + 80 - 2 and len(Gallery.open(g.path)) == len(g)


# -- files that are not what they claim -------------------------------------------------------------------------------
def _one_line_error(call, needle):
    with pytest.raises(QAConvError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and needle in msg, msg
    return msg


def test_corrupted_and_foreign_stores_are_refused_in_one_line(store, tmp_path, capsys):
    import pickle

    import lancedb
    import pyarrow as pa

    g, _ = store
    (tmp_path / "random.bin").write_bytes(os.urandom(3000))
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump({"format": "qaconv-gallery-store-1"}, f)
    (tmp_path / "empty").mkdir()
    for name in ("random.bin", "p.pkl", "empty"):
        _one_line_error(lambda n=name: Gallery.open(tmp_path / n), "corrupt or not a qaconv gallery store")
    _one_line_error(lambda: Gallery.open(tmp_path / "nothing"), "does not exist")

    def broken(change):
        dest = tmp_path / f"broken{len(list(tmp_path.iterdir()))}"
        shutil.copytree(g.path, dest)
        change(dest)
        return dest

    cases = [
        (lambda d: (d / "qaconv-gallery.json").write_text("{not json"), "corrupt or not a qaconv gallery store"),
        (lambda d: (d / "qaconv-gallery.json").write_text(json.dumps({"format": "other"})), "does not say format"),
        (lambda d: (d / "qaconv-gallery.json").write_text(
            (d / "qaconv-gallery.json").read_text().replace('"hash": "', '"hash": "zz')), "model.hash"),
        (lambda d: shutil.rmtree(d / "gallery.lance"), "corrupt or not a qaconv gallery store"),
        (lambda d: [p.write_bytes(os.urandom(p.stat().st_size)) for p in (d / "gallery.lance" / "data").iterdir()],
         "corrupt or not a qaconv gallery store"),
        (lambda d: [p.write_bytes(b"garbage") for p in (d / "gallery.lance" / "_versions").iterdir()],
         "corrupt or not a qaconv gallery store"),
    ]
    for change, needle in cases:
        path = broken(change)
        _one_line_error(lambda p=path: Gallery.open(p).search(_maps(1, 1), top=2), needle)

    def foreign(d):  # somebody else's LanceDB table under the right name
        shutil.rmtree(d / "gallery.lance")
        lancedb.connect(str(d)).create_table("gallery", pa.table({"vector": [[1.0, 2.0]], "x": [1]}))

    _one_line_error(lambda: Gallery.open(broken(foreign)), "columns")
    other = broken(lambda d: None)  # a store whose JSON names another model than its table
    info = json.loads((other / "qaconv-gallery.json").read_text())
    info["model"]["hash"] = "0" * 64
    (other / "qaconv-gallery.json").write_text(json.dumps(info))
    _one_line_error(lambda: Gallery.open(other), "another model")
    capsys.readouterr()
    assert main(["search", str(tmp_path / "random.bin"), "--index", str(tmp_path / "random.bin"), "--checkpoint",
                 "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt or not a qaconv gallery store" in err


def _raw_add(g, row, maps, pooled):
    """Write rows straight into the Lance table (no check on the way in), as a buggy or hostile writer would."""
    import pyarrow as pa

    from qaconv.gallery.store import META_COLUMNS, schema

    sch = schema(g.feature_shape, g.model["hash"])
    feats = np.ascontiguousarray(maps, dtype=np.float16).reshape(len(maps), -1)
    table = pa.table({**{k: pa.array(row[k], type=sch.field(k).type) for k in META_COLUMNS},
                      "pooled": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(pooled, np.float32).ravel()), C),
                      "features": pa.FixedSizeBinaryArray.from_buffers(sch.field("features").type, len(maps),
                                                                       [None, pa.py_buffer(feats)])}, schema=sch)
    g._store._tbl.add(table)


def _bad_row(**change):
    row = {"path": ["z.jpg"], "pid": [1], "cam": [0], "cam_label": ["a"], "time": [np.nan], "session": [-1],
           "frame": [-1], "time_source": [0], "track": [""]}
    row.update(change)
    return row


@pytest.mark.parametrize("change, cam, pooled_scale, needle", [
    (dict(pid=[-3]), None, 1.0, "field 'pid' must be integers >= -1"),
    (dict(cam_label=[""]), [0], 1.0, "field 'cam' must be -1 exactly where 'cam_label' is empty"),
    (dict(cam_label=["zz"]), [0], 1.0, "one id per camera label"),  # id 0 is camera 'a' already
    (dict(cam_label=["a"]), [-5], 1.0, "field 'cam' must be integers >= -1"),
    (dict(time=[5.0]), None, 1.0, "field 'time' must be finite seconds where 'time_source' is 2"),
    (dict(time_source=[2]), None, 1.0, "field 'time' must be finite"),
    (dict(time_source=[7]), None, 1.0, "field 'time_source' must be"),
    (dict(time_source=[1], cam_label=["c1"]), [7], 1.0, "field 'session' must be numbers >= 0"),
    (dict(session=[3]), None, 1.0, "field 'session' must be -1 where"),
    (dict(time_source=[1], session=[1], frame=[5], cam_label=["front"]), [8], 1.0, "'cN' for Market-name times"),
    (dict(), None, 2.0, "field 'pooled' must be unit-norm"),
    (dict(), None, float("nan"), "NaN"),
])
def test_open_names_the_invalid_field(store, change, cam, pooled_scale, needle):
    g, _ = store
    row = _bad_row(**change)
    if cam is not None:
        row["cam"] = cam
    elif row["cam_label"] == [""]:
        row["cam"] = [-1]
    pooled = F.normalize(torch.randn(1, C), dim=1).numpy() * pooled_scale
    if not np.isfinite(pooled).all():  # LanceDB itself refuses NaN vectors on the way in; open checks again
        with pytest.raises(ValueError, match="NaN"):
            _raw_add(g, row, _maps(1, 3).half().numpy(), pooled)
        return
    _raw_add(g, row, _maps(1, 3).half().numpy(), pooled)
    msg = _one_line_error(lambda: Gallery.open(g.path), needle)
    assert "rebuild" in msg


def test_duplicate_paths_in_the_table_are_refused_at_open(store):
    g, _ = store
    _raw_add(g, _bad_row(path=["e001.jpg"]), _maps(1, 3).half().numpy(), F.normalize(torch.randn(1, C), dim=1))
    _one_line_error(lambda: Gallery.open(g.path), "field 'path' must be distinct")


# -- images, Market names, TLift, the old format, the command line ----------------------------------------------------
def _hand_times(names):
    """Market time stamps with session offsets chained per camera, written out from the spec (§8.1)."""
    import re

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


def test_market_name_times_are_chained_over_the_whole_store(tmp_path, ckpts):
    names = ["0001_c1s2_000100_00.jpg", "0002_c2s1_000300_00.jpg", "0003_c1s1_000050_00.jpg",
             "0004_c1s1_000900_00.jpg", "0005_c1s3_000010_00.jpg", "plain.jpg"]
    g = Gallery.create(tmp_path / "m", ckpts[0], device="cpu")
    g.add(_maps(2, 1), [{"path": n} for n in names[:2]])
    early = g.times.copy()
    g.add(_maps(4, 2), [{"path": n} for n in names[2:]])  # session 1 of c1 grows: c1s2's offset moves
    np.testing.assert_allclose(g.times[:5], _hand_times(names[:5]))
    assert math.isnan(g.times[5]) and early[0] != g.times[0]
    np.testing.assert_allclose(Gallery.open(g.path).times[:5], _hand_times(names[:5]))
    assert g.remove(before=_hand_times(names[:5])[3]) == 2  # 36 s: c2s1 frame 300 (12 s), c1s1 frame 50 (2 s)
    assert g.paths == [names[0], names[3], names[4], names[5]]


def test_images_tlift_and_the_old_index(tiny_domain, ckpts, tmp_path, capsys):
    from qaconv import gallery as gal
    from qaconv.tlift import tlift

    folder = tiny_domain / "bounding_box_test"
    g = Gallery.create(tmp_path / "imgs.store", ckpts[0], device="cpu")
    report = g.add_folder(folder, progress=False, chunk=16)  # several committed chunks
    assert report["added"] == len(g) == len(gal.list_images(folder)) and g.root == str(folder.resolve())
    index, _ = gal.build_index(folder, g.extractor, progress=False)  # the legacy in-memory index
    assert sorted(g.paths) == sorted(index.paths.tolist())
    queries = [str(p) for p in sorted((tiny_domain / "query").iterdir())[:5]]
    q = g.extractor(queries)
    truth = _brute(g.extractor.matcher, q, torch.from_numpy(index.features.astype(np.float32)))
    paths = index.paths.tolist()
    _assert_hits(g.search(queries, top=5, exhaustive=True), truth, [range(len(paths))] * 5, 5, paths)
    _, q_cams, _, q_times, g_times = gal.query_metadata(index, queries)
    sim = 1 / (1 + np.exp(-truth.astype(np.float64)))  # sigma(logit): the official TLift advice for raw logits
    lifted = tlift(sim, q_cams, q_times, index.cams, g_times, tau=50.0, sigma=100.0, k=3, alpha=0.2)
    assert not np.allclose(lifted, 0.2 * sim)  # the lifting did something
    hits = g.tlift_search(queries, top=4, exhaustive=True, tau=50.0, sigma=100.0, tlift_k=3, alpha=0.2)
    _assert_hits(hits, lifted, [range(len(paths))] * 5, 4, paths, atol=1e-5)
    # the old .npz: converted (same rows, same ranking), or refused naming the command that converts it
    old = gal.save_index(index, tmp_path / "old.idx")
    conv = Gallery.convert(old, tmp_path / "conv.store")
    assert conv.search(queries, top=5, candidates=8) == Gallery.open(tmp_path / "conv.store").search(
        queries, top=5, candidates=8)
    _assert_hits(conv.search(q, top=5, exhaustive=True), truth, [range(len(paths))] * 5, 5, paths)
    np.testing.assert_allclose(np.sort(conv.times), np.sort(index.times))
    for argv in (["search", queries[0], "--index", str(old), "--checkpoint", ckpts[0]],
                 ["index", str(folder), "--checkpoint", ckpts[0], "-o", str(old), "--append"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"qaconv index --convert {old}" in err, err
    assert main(["index", "--convert", str(old), "-o", str(tmp_path / "cli.store")]) == 0
    assert f"{len(index)} images" in capsys.readouterr().out
    assert len(Gallery.open(tmp_path / "cli.store")) == len(index)


def test_cli_filters_match_the_api(tiny_domain, ckpts, tmp_path, capsys):
    folder = tiny_domain / "bounding_box_test"
    store = tmp_path / "s"
    assert main(["index", str(folder), "--checkpoint", ckpts[0], "-o", str(store), "--device", "cpu"]) == 0
    capsys.readouterr()
    g = Gallery.open(store, device="cpu")
    queries = [str(p) for p in sorted((tiny_domain / "query").iterdir())[:3]]
    t = np.sort(g.times)
    lo, hi = float(t[5]), float(t[-5])
    argv = ["search", *queries, "--index", str(store), "--checkpoint", ckpts[0], "--device", "cpu", "--top", "4",
            "--json", "--candidates", "10", "--cameras", "c1,c3", "--time-window", f"{lo},{hi}",
            "--exclude-same-camera"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    want = g.search(queries, top=4, candidates=10, cameras=["c1", "c3"], time_window=(lo, hi),
                    exclude_same_camera=True)
    assert [r["results"] for r in res] == want
    assert all(h["cam"] in ("c1", "c3") and lo <= h["time"] <= hi and h["cam"] != r["cam"]
               for r in res for h in r["results"])
    for bad, needle in (("--time-window=5,1", "START <= END"), ("--time-window=x", "START,END")):
        assert main([*argv[:-5], bad]) == 1
        assert needle in capsys.readouterr().err
    # rebuild with --overwrite: the old store is replaced only once the new one is complete
    assert main(["index", str(folder), "--checkpoint", ckpts[0], "-o", str(store), "--overwrite"]) == 0
    assert len(Gallery.open(store)) == len(g) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- tracklets, the pre-tracklet store format, export -----------------------------------------------------------------
def _track_meta(n):
    """Entries of cameras a/b/c; track label i % 7 (tracklet = one camera + one label), none for i % 5 == 0."""
    return [{**m, "track": None if i % 5 == 0 else str(i % 7)} for i, m in enumerate(_meta(n))]


def _brute_groups(truth, q_groups, g_groups, how, q_cams=None, g_cams=None, cols=None):
    """Per query group: [(score, gallery group, best query crop, best gallery column, best pair)] sorted, by hand."""
    out = []
    for qi, qg in enumerate(q_groups):
        ranked = []
        for gg in g_groups:
            gg = [c for c in gg if cols is None or c in cols[qi]]
            if not gg or (q_cams is not None and q_cams[qi] is not None and g_cams[gg[0]] == q_cams[qi]):
                continue
            block = truth[np.ix_(qg, gg)]
            r, c = np.unravel_index(np.argmax(block), block.shape)
            ranked.append((block.mean() if how == "mean" else block.max(), gg, qg[r], gg[c], block.max()))
        out.append(sorted(ranked, key=lambda x: -x[0]))
    return out


def _check_groups(hits, want, top, paths):
    assert len(hits) == len(want)
    for h_list, w_list in zip(hits, want, strict=True):
        w_list = w_list[:top]
        assert len(h_list) == len(w_list)
        for h, (score, gg, qc, gc, pair) in zip(h_list, w_list, strict=True):
            assert h["score"] == pytest.approx(score, abs=1e-4) and h["pair_score"] == pytest.approx(pair, abs=1e-4)
            assert h["crops"] == len(gg) and h["path"] == paths[gc] and h["query_crop"] == qc


def test_tracklet_search_equals_brute_force_aggregation(tmp_path, ckpts, head):
    maps = _maps(42, 11)
    meta = _track_meta(42)
    g = Gallery.create(tmp_path / "t.store", ckpts[0], device="cpu")
    g.add(maps, meta)
    paths = [m["path"] for m in meta]
    cams = [m["cam"] for m in meta]
    groups = {}
    for i, m in enumerate(meta):
        groups.setdefault((m["cam"], m["track"]) if m["track"] else i, []).append(i)
    tracklets = list(groups.values())
    assert max(map(len, tracklets)) > 1 and min(map(len, tracklets)) == 1
    singles = [[i] for i in range(42)]
    q = _maps(6, 12)
    q_tracks = ["A", "A", "B", None, "B", "B"]
    q_cams = ["a", "a", "b", "c", "b", "b"]
    q_groups = [[0, 1], [2, 4, 5], [3]]
    truth = _brute(head, q, maps)
    for how in ("mean", "max"):
        for by_track, g_groups in ((False, singles), (True, tracklets)):
            for exclude, excl_cams in ((False, None), (True, ["a", "b", "c"])):
                want = _brute_groups(truth, q_groups, g_groups, how, excl_cams, cams)
                for extra in (dict(exhaustive=True), dict(candidates=42, exhaustive=False)):
                    hits = g.search(q, top=5, query_tracks=q_tracks, query_cameras=q_cams, aggregate=how,
                                    group_by_track=by_track, exclude_same_camera=exclude, **extra)
                    _check_groups(hits, want, 5, paths)
                    if by_track:
                        for h in hits[0]:
                            assert h["track"] is None or (h["cam"], h["track"]) in groups
    # two stages: each query crop's M best allowed rows by pooled cosine, their union per query, whole tracklets
    m = 4
    cos = _pooled_cos(q, maps)
    for by_track, g_groups in ((False, singles), (True, tracklets)):
        cols = []
        for qg in q_groups:
            allowed = [c for c in range(42) if cams[c] != q_cams[qg[0]]]
            union = {c for r in qg for c in sorted(allowed, key=lambda c: -cos[r, c])[:m]}
            if by_track:
                union = {c for gg in g_groups if set(gg) & union for c in gg}
            cols.append(union)
        want = _brute_groups(truth, q_groups, g_groups, "mean", ["a", "b", "c"], cams, cols)
        hits = g.search(q, top=6, candidates=m, query_tracks=q_tracks, query_cameras=q_cams,
                        group_by_track=by_track, exclude_same_camera=True)
        _check_groups(hits, want, 6, paths)
    # one crop per query, one entry per result: the plain search's ranking and logits
    plain = g.search(q, top=7, exhaustive=True)
    single = g.search(q, top=7, exhaustive=True, query_tracks=[None] * 6)
    assert [[h["path"] for h in r] for r in single] == [[h["path"] for h in r] for r in plain]
    np.testing.assert_allclose([[h["score"] for h in r] for r in single], [[h["score"] for h in r] for r in plain],
                               atol=1e-4)
    with pytest.raises(QAConvError, match="mixes cameras a, b"):
        g.search(q, query_tracks=["A"] * 6, query_cameras=q_cams)
    with pytest.raises(QAConvError, match="aggregate must be one of"):
        g.search(q, query_tracks=q_tracks, aggregate="median")
    with pytest.raises(QAConvError, match="one label per query"):
        g.search(q, query_tracks=["A"])


def test_exclusion_by_default_only_where_the_camera_is_known(store, head):
    g, maps = store
    q = _maps(3, 13)
    truth = _brute(head, q, maps)
    cams = np.array([CAMS[i % 3] for i in range(40)])
    hits = g.search(q, top=5, exhaustive=True, query_cameras=["a", "", "c"], exclude_same_camera=None)
    allowed = [np.flatnonzero(cams != "a"), np.arange(40), np.flatnonzero(cams != "c")]
    _assert_hits(hits, truth, allowed, 5)
    assert g.search(q, top=5, exhaustive=True, exclude_same_camera=None) == g.search(q, top=5, exhaustive=True)
    with pytest.raises(QAConvError, match="exclude_same_camera needs"):
        g.search(q, query_cameras=["a", "", "c"], exclude_same_camera=True)
    with pytest.raises(QAConvError, match=r"query camera zz is not in the store .*\(its cameras: a, b, c\)"):
        g.check_cameras(["a", "zz", ""], "query camera")
    assert g.cameras == ["a", "b", "c"]


def test_unknown_values_are_null_in_hits(tmp_path, ckpts):
    g = Gallery.create(tmp_path / "n.store", ckpts[0], device="cpu")
    g.add(_maps(3, 1), [{"path": "x.jpg", "pid": -1, "cam": ""}, {"path": "y.jpg", "pid": 4, "cam": "a",
                                                                     "time": 3.5, "track": 9}, {"path": "z.jpg"}])
    hits = {h["path"]: h for h in g.search(_maps(1, 2), top=3)[0]}
    assert {k: hits["x.jpg"][k] for k in ("pid", "cam", "time", "track")} == dict(pid=None, cam=None, time=None,
                                                                                    track=None)
    assert {k: hits["y.jpg"][k] for k in ("pid", "cam", "time", "track")} == dict(pid=4, cam="a", time=3.5,
                                                                                    track="9")


def _old_format_store(path, ckpt, monkeypatch, maps, meta):
    """A store written as before the track column existed (the old table schema)."""
    from qaconv.gallery import store as store_mod

    real = store_mod.schema
    with monkeypatch.context() as mp:
        mp.setattr(store_mod, "schema", lambda shape, h, tracks=True: real(shape, h, tracks=False))
        g = Gallery.create(path, ckpt, device="cpu")
        g.add(maps, meta)
    return path


def test_a_store_without_the_track_column_opens_searches_and_grows(tmp_path, ckpts, head, monkeypatch, capsys):
    maps = _maps(12, 4)
    path = _old_format_store(tmp_path / "old.store", ckpts[0], monkeypatch, maps[:10], _meta(10))
    g = Gallery.open(path, device="cpu")
    assert "track" not in g._store._tbl.schema.names and len(g) == 10
    q = _maps(2, 5)
    hits = g.search(q, top=4, exhaustive=True)
    _assert_hits(hits, _brute(head, q, maps[:10]), [range(10)] * 2, 4)
    assert all(h["track"] is None for r in hits for h in r)
    g.add(maps[10:11], _meta(1, start=10))  # without tracks: fine
    assert len(Gallery.open(path)) == 11
    msg = _one_line_error(lambda: g.add(maps[11:], [{**_meta(1, start=11)[0], "track": "7"}]),
                          "written before tracklets")
    assert f"qaconv index GALLERY_DIR --checkpoint RUN -o {path} --overwrite" in msg and len(Gallery.open(path)) == 11
    grouped = g.search(q, top=3, group_by_track=True, exhaustive=True)  # every entry its own tracklet
    assert [[h["path"] for h in r] for r in grouped] == [[h["path"] for h in r] for r in g.search(q, top=3)]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_round_trip(tmp_path, ckpts, fmt):
    import csv

    maps = _maps(9, 6)
    meta = _track_meta(9)
    meta[2] = {"path": "sub/unknown.jpg"}  # pid, camera, time, track unknown
    meta[4] = {**meta[4], "time": 1 / 3}  # a time that needs every digit
    g = Gallery.create(tmp_path / "e.store", ckpts[0], device="cpu")
    g.add(maps, meta)
    g.remove(paths=["e005.jpg"])
    done = g.export(tmp_path / "out", fmt)
    keep = [i for i in range(9) if i != 5]
    assert done["entries"] == 8 and sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["pooled.npy", f"metadata.{fmt}"])
    pooled = np.load(tmp_path / "out" / "pooled.npy")
    want = F.normalize(maps.half().float().mean(dim=(2, 3)), dim=1).numpy()[keep]
    assert pooled.dtype == np.float32 and pooled.shape == (8, C)
    np.testing.assert_allclose(pooled, want, atol=1e-5)
    if fmt == "csv":
        with open(tmp_path / "out" / "metadata.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        parse = {"row": int, "pid": int, "time": float}
        got = [{k: (parse.get(k, str)(v) if v != "" else None) for k, v in r.items()} for r in rows]
    else:
        import pyarrow.parquet as pq

        got = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()
    assert [r["row"] for r in got] == g._store.rows.ids.astype(int).tolist()
    for r, i in zip(got, keep, strict=True):
        m = meta[i]
        assert list(r) == ["row", "path", "pid", "camera", "time", "track"]
        assert (r["path"], r["pid"], r["camera"], r["time"], r["track"]) == (
            m["path"], m.get("pid"), m.get("cam"), m.get("time"), m.get("track"))
    with pytest.raises(QAConvError, match="export format must be one of csv, parquet"):
        g.export(tmp_path / "x", "feather")


def test_open_reads_the_table_in_batches_equal_to_one_read(store, monkeypatch):
    """The columns read batch by batch (3 rows per batch, and a capacity too small so the arrays grow) equal the
    table read whole by Arrow, row for row; a label mismatch in a later batch is still found."""
    import qaconv.gallery.store as st

    g, _ = store
    g.remove(paths=["e005.jpg", "e017.jpg"])  # deleted rows: ids with gaps
    whole = g._store.rows.table.to_arrow()
    want = g._store.rows.table.search().select(["path", "pid", "cam", "time", "pooled"]).with_row_id(True) \
        .limit(None).to_arrow().sort_by("_rowid")
    monkeypatch.setattr(st, "LOAD_BATCH", 3)
    real_count = st.Store.open(g.path).rows.n
    table = g._store.rows.table
    reader = table.search().select([*st.META_COLUMNS, "pooled"]).with_row_id(True).limit(None).to_batches(batch_size=3)
    cols, paths, tracks, pairs = st._read_batches(g.path, reader, st.META_COLUMNS, C, capacity=1)
    order = np.argsort(cols["ids"])
    assert real_count == len(paths) == whole.num_rows == 38
    assert cols["ids"][order].tolist() == want["_rowid"].to_pylist()
    assert [paths[i] for i in order] == want["path"].to_pylist()
    assert cols["pids"][order].tolist() == want["pid"].to_pylist()
    assert cols["cams"][order].tolist() == want["cam"].to_pylist()
    np.testing.assert_array_equal(cols["stored_times"][order], want["time"].to_numpy())
    np.testing.assert_array_equal(cols["pooled"][order], np.stack(want["pooled"].to_numpy(zero_copy_only=False)))
    assert tracks == [""] * 38 and pairs == {(0, "a"), (1, "b"), (2, "c")}
    rows = Gallery.open(g.path)._store.rows  # through open, with 3-row batches
    assert rows.paths[: rows.n] == paths and rows.cam_labels == {0: "a", 1: "b", 2: "c"}
    _raw_add(g, _bad_row(path=["late.jpg"], cam_label=[""]), _maps(1, 3).half().numpy(),
             F.normalize(torch.randn(1, C), dim=1).numpy())
    _one_line_error(lambda: Gallery.open(g.path), "field 'cam' must be -1 exactly where 'cam_label' is empty")
