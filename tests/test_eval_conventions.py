"""Evaluation conventions of the official code: which post-processing rows exist, what re-ranking and TLift are
fed (tags: 1 - sigmoid(logit/10); latest commit: -logit), and the layout of the saved score files."""

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.io import loadmat

from qaconv.data.records import Record
from qaconv.engine.evaluator import (
    RR,
    RR_TLIFT,
    TLIFT_DIRECT,
    check_post_options,
    postprocess,
    save_scores,
)
from qaconv.errors import QAConvError
from qaconv.report import render_html
from qaconv.rerank import k_reciprocal
from qaconv.tlift import tlift

Q, G = 8, 24
RR_KW = {"k1": 5, "k2": 2, "lambda_value": 0.3}
TL_KW = {"tau": 100.0, "sigma": 200.0, "k": 10, "alpha": 0.2}


def _world(seed=0, has_time=True, offset=0.0):
    """A symmetric logit matrix over query+gallery and a matching fake test set (3 cameras, times in s)."""
    rng = np.random.default_rng(seed)
    pids = rng.integers(0, 6, Q + G)
    centres = rng.normal(size=(6, 8))
    x = centres[pids] + 0.8 * rng.normal(size=(Q + G, 8))
    logits = (3.0 * x @ x.T / 8 + offset).astype(np.float32)
    cams = rng.integers(0, 3, Q + G)
    times = rng.uniform(0, 400, Q + G)
    recs = [Record(f"/data/set/{'query' if i < Q else 'bounding_box_test'}/img{i:03d}.jpg", int(pids[i]),
                   int(cams[i]), float(times[i]) if has_time else None) for i in range(Q + G)]
    data = SimpleNamespace(name="toy", query=recs[:Q], gallery=recs[Q:], has_time=has_time)

    def score_fn(rows, cols):
        idx = np.arange(Q + G)
        return logits[idx[rows]][:, idx[cols]]

    return logits, data, score_fn


def _lift_args(data):
    q_cams = np.array([r.camid for r in data.query])
    g_cams = np.array([r.camid for r in data.gallery])
    return q_cams, np.array([r.time for r in data.query]), g_cams, np.array([r.time for r in data.gallery])


def _run(cfg, seed=0, has_time=True, offset=0.0):
    logits, data, score_fn = _world(seed, has_time, offset)
    rows = postprocess(logits[:Q, Q:], data, {**RR_KW, **cfg}, score_fn, progress=False)
    return rows, logits, data


def official_rerank(dist, q, k1, k2, lam):
    """The official reranking() from the spec (§7.3), transcribed with float64 V and a stable argsort."""
    n = len(dist)
    o = (dist / dist.max(axis=0)).T
    rank = np.argsort(o, axis=1, kind="stable")
    kh = int(np.around(k1 / 2))

    def recip(i, k):
        return [c for c in rank[i, : k + 1] if i in rank[c, : k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        ext = list(r)
        for c in r:
            rc = recip(c, kh)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                ext += rc
        ext = np.unique(np.array(ext, dtype=int))
        w = np.exp(-o[i, ext])
        v[i, ext] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    smin = np.minimum(v[:q, None, :], v[None, :, :]).sum(axis=2)  # [q, n]
    jac = 1 - smin / (2 - smin)
    return ((1 - lam) * jac + lam * o[:q])[:, q:]


# ------------------------------------------------------------------------------------------ rows

@pytest.mark.parametrize(
    "cfg,has_time,labels",
    [
        ({}, True, [""]),
        ({"rerank": True}, True, ["", RR]),
        ({"tlift": True}, True, ["", RR, RR_TLIFT]),
        ({"rerank": True, "tlift": True}, True, ["", RR, RR_TLIFT]),
        ({"tlift_direct": True}, True, ["", TLIFT_DIRECT]),
        ({"tlift": True, "tlift_direct": True}, True, ["", TLIFT_DIRECT, RR, RR_TLIFT]),
        ({"tlift": True}, False, ["", RR]),  # no time stamps: TLift skipped, re-ranking still done (as v1.0)
        ({"tlift_direct": True}, False, [""]),
    ],
)
def test_rows_per_option_combination(cfg, has_time, labels):
    rows, _, _ = _run(cfg, has_time=has_time)
    assert list(rows) == labels
    assert TLIFT_DIRECT == "+TLift(unofficial)"


def test_no_time_stamps_are_reported(capsys):
    logits, data, score_fn = _world(has_time=False)
    postprocess(logits[:Q, Q:], data, {**RR_KW, "tlift": True}, score_fn)
    assert "no time stamps, TLift skipped" in capsys.readouterr().out


# ------------------------------------------------------------------------------ re-ranking input

@pytest.mark.parametrize("dense_max", [30000, 0])  # dense path, kNN-list path
def test_rerank_input_conventions(dense_max):
    cfg = {"rerank": True, "rerank_dense_max": dense_max}
    got = {}
    for conv in ("sigmoid", "logit"):
        rows, logits, _ = _run({**cfg, "rerank_input": conv})
        dist = 1 - 1 / (1 + np.exp(-logits.astype(np.float64) / 10)) if conv == "sigmoid" else -logits
        want = k_reciprocal(dist[:Q, Q:], dist[:Q, :Q], dist[Q:, Q:], **RR_KW)
        np.testing.assert_allclose(rows[RR], want, rtol=1e-5, atol=1e-6)
        got[conv] = rows[RR]
    assert not np.allclose(got["sigmoid"], got["logit"], atol=1e-3)  # the conventions really differ
    rows, _, _ = _run(cfg)
    np.testing.assert_array_equal(rows[RR], got["sigmoid"])  # the default is the tags' convention


@pytest.mark.parametrize("dense_max", [30000, 0])
def test_logit_input_matches_official_loop_with_negative_column_maxima(dense_max):
    """-logit as the latest commit feeds it, with logits shifted so that some columns have only positive logits
    (negative column maximum of -logit: the division reverses that column's order)."""
    rows, logits, _ = _run({"rerank": True, "rerank_input": "logit", "rerank_dense_max": dense_max}, offset=2.0)
    col_max = (-logits).max(axis=0)
    assert (col_max < 0).any() and (col_max > 0).any()
    want = official_rerank(-logits.astype(np.float64), Q, 5, 2, 0.3)
    np.testing.assert_allclose(rows[RR], want, rtol=1e-4, atol=1e-5)
    rows_sig, logits, _ = _run({"rerank": True, "rerank_dense_max": dense_max}, offset=2.0)
    want = official_rerank(1 - 1 / (1 + np.exp(-logits.astype(np.float64) / 10)), Q, 5, 2, 0.3)
    np.testing.assert_allclose(rows_sig[RR], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv", ["sigmoid", "logit"])
def test_tlift_lifts_the_reranked_score(conv):
    rows, _, data = _run({"tlift": True, "rerank_input": conv})
    want = 1 - tlift(1 - rows[RR], *_lift_args(data), **TL_KW)
    np.testing.assert_allclose(rows[RR_TLIFT], want, rtol=0, atol=1e-6)
    assert not np.allclose(rows[RR_TLIFT], rows[RR])


def test_direct_tlift_uses_sigmoid_of_the_logit():
    rows, logits, data = _run({"tlift_direct": True})
    s = logits[:Q, Q:].astype(np.float64)
    want = 1 - tlift(1 / (1 + np.exp(-s)), *_lift_args(data), **TL_KW)
    np.testing.assert_allclose(rows[TLIFT_DIRECT], want, rtol=0, atol=1e-12)
    scaled = 1 - tlift(1 / (1 + np.exp(-s / 10)), *_lift_args(data), **TL_KW)
    assert np.abs(rows[TLIFT_DIRECT] - scaled).max() > 1e-3
    np.testing.assert_array_equal(rows[""], -logits[:Q, Q:])  # the plain row: -logit in every convention


def test_logit_input_with_a_zero_column_maximum_is_refused():
    _, data, _ = _world()
    zeros = np.zeros((Q + G, Q + G), dtype=np.float32)  # -logit = 0 everywhere: every column maximum is 0

    def score_fn(rows, cols):
        return zeros[rows][:, cols] if isinstance(rows, slice) else zeros[np.asarray(rows)][:, np.asarray(cols)]

    cfg = {**RR_KW, "rerank": True, "rerank_input": "logit"}
    for dense_max in (30000, 0):
        with pytest.raises(QAConvError, match="column maximum"):
            postprocess(zeros[:Q, Q:], data, {**cfg, "rerank_dense_max": dense_max}, score_fn, progress=False)
    assert np.isfinite(postprocess(zeros[:Q, Q:], data, {**cfg, "rerank_input": "sigmoid"}, score_fn)[RR]).all()


def test_bad_options_give_one_line():
    with pytest.raises(QAConvError, match="rerank_input must be one of sigmoid, logit"):
        check_post_options({"rerank_input": "cosine"})
    with pytest.raises(QAConvError, match="--two-stage"):
        check_post_options({"two_stage": -1})
    check_post_options({"two_stage": 5, "tlift": True})  # re-ranking on shortlists (tests/test_two_stage_protocol.py)


# ------------------------------------------------------------------------------------ score files

def test_mat_layout_of_the_official_save_score(tmp_path):
    rows, logits, data = _run({"tlift": True})
    mat_path, npz_path = save_scores(tmp_path, data, rows, logits[:Q, Q:])
    assert (mat_path.name, npz_path.name) == ("toy_score.mat", "toy_scores.npz")
    m = loadmat(mat_path)
    official = {"score", "score_rerank", "score_tlift", "gal_time", "prob_time", "gal_list", "prob_list", "gal_ids",
                "prob_ids", "gal_cams", "prob_cams"}
    assert {k for k in m if not k.startswith("__")} == official
    for key in ("score", "score_rerank", "score_tlift"):
        assert m[key].shape == (Q, G) and m[key].dtype == np.float32, key
    for short, n, recs in (("prob", Q, data.query), ("gal", G, data.gallery)):
        assert m[f"{short}_ids"].shape == m[f"{short}_cams"].shape == (n, 1)
        assert m[f"{short}_ids"].dtype == np.int64
        np.testing.assert_array_equal(m[f"{short}_ids"][:, 0], [r.pid for r in recs])
        np.testing.assert_array_equal(m[f"{short}_cams"][:, 0], [r.camid for r in recs])
        np.testing.assert_array_equal(m[f"{short}_time"], np.array([[r.time] for r in recs]))
        assert m[f"{short}_list"].shape == (n, 1) and m[f"{short}_list"].dtype == object  # a cell array
        assert [c[0] for c in m[f"{short}_list"][:, 0]] == [r.path.rsplit("/", 1)[1] for r in recs]
    s = logits[:Q, Q:].astype(np.float64)
    np.testing.assert_allclose(m["score"], 1 / (1 + np.exp(-s / 10)), rtol=0, atol=1e-6)  # 1 - (1 - sigma(l/10))
    np.testing.assert_allclose(m["score_rerank"], 1 - rows[RR], rtol=0, atol=1e-6)
    lifted = tlift(m["score_rerank"], *_lift_args(data), **TL_KW)
    np.testing.assert_allclose(m["score_tlift"], lifted, rtol=0, atol=1e-6)
    z = np.load(npz_path)
    assert set(z.files) == (official | {"logit", "gal_paths", "prob_paths", "rerank_input"})
    np.testing.assert_array_equal(z["logit"], logits[:Q, Q:])
    for key in ("score", "score_rerank", "score_tlift"):
        np.testing.assert_array_equal(z[key], m[key])
    assert z["gal_ids"].shape == (G,) and z["prob_paths"][0] == data.query[0].path


def test_mat_placeholders_without_tlift_and_logit_convention(tmp_path):
    rows, logits, data = _run({"rerank": True, "rerank_input": "logit", "tlift_direct": True})
    mat_path, npz_path = save_scores(tmp_path, data, rows, logits[:Q, Q:], "logit")
    m = loadmat(mat_path)
    np.testing.assert_allclose(m["score"], 1 + logits[:Q, Q:], rtol=0, atol=1e-5)  # 1 - (-logit)
    np.testing.assert_allclose(m["score_rerank"], 1 - rows[RR], rtol=0, atol=1e-6)
    # as the official code: a matrix not computed is 1 - 0, the times 0 unless TLift ran
    assert m["score_tlift"].tolist() == [[1.0]] and m["gal_time"].tolist() == [[0]] and m["prob_time"].tolist() == [[0]]
    assert "score_tlift_direct" not in m  # not an official key
    z = np.load(npz_path)
    assert "score_tlift" not in z.files and str(z["rerank_input"]) == "logit"
    np.testing.assert_allclose(z["score_tlift_direct"], 1 - rows[TLIFT_DIRECT], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(z["gal_time"], [r.time for r in data.gallery])


def test_report_explains_the_rows_present():
    r = SimpleNamespace(cmc=np.linspace(0.5, 1, 10), mAP=0.4, mINP=0.2)
    page = render_html([], {"toy": r, "toy +RR": r, "toy +RR+TLift": r})
    assert "QAConv+RR: k-reciprocal re-ranking" in page and "(the official protocol)" in page
    assert "unofficial" not in page
    page = render_html([], {"toy": r, f"toy {TLIFT_DIRECT}": r})
    assert "not part of the official protocol" in page and "QAConv+RR:" not in page


def test_score_files_of_path_named_test_sets_stay_in_out_dir_and_never_collide(tmp_path):
    from types import SimpleNamespace

    from qaconv.data.records import Record
    from qaconv.engine.evaluator import save_scores

    recs = [Record(str(tmp_path / "img.jpg"), 1, 0, None)]
    out = tmp_path / "out"
    written = []
    for name in (str(tmp_path / "a" / "set.csv"), str(tmp_path / "b" / "set.csv"), "../../escape"):
        data = SimpleNamespace(name=name, query=recs, gallery=recs)
        written += save_scores(out, data, {"": np.zeros((1, 1))}, np.zeros((1, 1)))
    assert len({p.name for p in written}) == 6  # three test sets, two files each, no name shared
    assert all(p.resolve().parent == out.resolve() for p in written)  # nothing outside out_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and nothing next to the data
