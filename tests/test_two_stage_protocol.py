"""The official protocol (QAConv, +RR, +RR+TLift) on pooled-cosine shortlists (``--two-stage M --rerank --tlift``):
equal to the exhaustive protocol when M covers everything, equal to a brute-force loop over the restricted matrix
when it does not, and never a dense [Q+G]^2 matrix."""

import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qaconv.data.records import Record
from qaconv.engine import evaluator as ev
from qaconv.engine.evaluator import RR, RR_TLIFT, logit_distance, postprocess, shortlist_protocol
from qaconv.errors import QAConvError
from qaconv.matching import Matcher
from qaconv.models.qaconv import QAConv
from qaconv.tlift import tlift

C, H, W = 6, 3, 2
Q, G = 9, 31
N = Q + G
OPTS = {"k1": 5, "k2": 3, "lambda_value": 0.3}
TL_KW = {"tau": 100.0, "sigma": 200.0, "k": 10, "alpha": 0.2}
MATCH = {"device": "cpu", "memory": 1 << 26}


def _head(version: str, seed: int = 0, shift: float = 0.0) -> QAConv:
    """A QAConv head with non-trivial eval-mode BatchNorms and fc (version 1 is not symmetric)."""
    torch.manual_seed(seed)
    head = QAConv(C, H, W, version=version)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for bn in (head.bn, head.logit_bn):
            bn.running_mean.fill_(float(torch.randn(1, generator=gen)) * 0.3)
            bn.running_var.fill_(0.5 + float(torch.rand(1, generator=gen)))
            bn.weight.fill_(2.0 + float(torch.rand(1, generator=gen)))
            bn.bias.fill_(float(torch.randn(1, generator=gen)))
        head.logit_bn.bias.add_(shift)
        head.fc.weight.add_(0.2 * torch.randn(head.fc.weight.shape, generator=gen))
        head.fc.bias.fill_(0.2)
    return head.eval()


def _world(seed: int = 0, q: int = Q, g: int = G):
    """Feature maps with identity structure and a matching fake test set (3 cameras, times in s)."""
    gen = torch.Generator().manual_seed(seed)
    pids = torch.randint(0, 6, (q + g,), generator=gen)
    base = torch.randn(6, C, H, W, generator=gen)
    maps = F.normalize(base[pids] + 0.8 * torch.randn(q + g, C, H, W, generator=gen), dim=1)
    rng = np.random.default_rng(seed)
    cams, times = rng.integers(0, 3, q + g), rng.uniform(0, 400, q + g)
    recs = [Record(f"/d/{'q' if i < q else 'g'}/{i:03d}.jpg", int(pids[i]), int(cams[i]), float(times[i]))
            for i in range(q + g)]  # fmt: skip
    data = SimpleNamespace(name="toy", query=recs[:q], gallery=recs[q:], has_time=True)
    return maps[:q].clone(), maps[q:].clone(), data


def _lift(score, data):
    q_cams, g_cams = (np.array([r.camid for r in s]) for s in (data.query, data.gallery))
    q_times, g_times = (np.array([r.time for r in s]) for s in (data.query, data.gallery))
    return tlift(score, q_cams, q_times, g_cams, g_times, **TL_KW)


def _exhaustive(head, q, g, data, cfg):
    full = Matcher(head, "cpu").scores(torch.cat([q, g]), torch.cat([q, g])).numpy()

    def score_fn(rows, cols):
        idx = np.arange(len(full))
        return full[idx[rows]][:, idx[cols]]

    return postprocess(full[: len(q), len(q) :], data, cfg, score_fn, progress=False), full


def _shortlisted(head, q, g, data, cfg):
    s_qg, d_rr = shortlist_protocol(head, q, g, cfg, MATCH)
    return postprocess(s_qg, data, cfg, None, progress=False, reranked=d_rr)


# ------------------------------------------------------------------------------------ brute-force reference

def _official_parts(d: np.ndarray, q: int, k1: int, k2: int):
    """The official reranking() on a full matrix d, as loops (float64 V, stable sort): Jaccard [q, n] and O."""
    n = len(d)
    o = (d / d.max(axis=0)).T
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
        v = np.array([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jac = np.array([[1 - (s := np.minimum(v[i], v[j]).sum()) / (2 - s) for j in range(n)] for i in range(q)])
    return jac, o


def reference(full: np.ndarray, emb: np.ndarray, q: int, m: int, conv: str, k1: int, k2: int, lam: float):
    """(s_qg, re-ranked [q, G]) by loops. s_qg: per query, its m best gallery items by cosine keep their logits,
    the rest sit at (cos - 2) + min of them. Re-ranking: row r of O (column r of D) keeps the exact distance of
    its m nearest of all N by cosine and of its farthest, the rest (cos - 2) + min of the m nearest's logits; D
    in the official orientation (gallery x query block = transposed query-gallery logits); the final lambda
    term uses s_qg."""
    n, g = len(full), len(full) - q
    cos = emb @ emb.T
    s_qg = np.empty((q, g))
    for i in range(q):
        order = sorted(range(g), key=lambda j: -cos[i, q + j])
        short = order[:m]
        low = min(full[i, q + j] for j in short)
        for j in range(g):
            s_qg[i, j] = full[i, q + j] if j in short else cos[i, q + j] - 2 + low
    logit = np.array([[full[b, a] if a >= q > b else full[a, b] for b in range(n)] for a in range(n)])  # D[a, b]
    virtual = np.empty((n, n))
    for r in range(n):  # column r of D
        order = sorted(range(n), key=lambda c: -cos[r, c])
        short, exact = order[:m], set(order[:m]) | {order[-1]}
        low = min(logit[c, r] for c in short)
        for c in range(n):
            virtual[c, r] = logit[c, r] if c in exact else cos[r, c] - 2 + low
    d = logit_distance(virtual, conv)
    jac, _ = _official_parts(d, q, k1, k2)
    return s_qg, (1 - lam) * jac[:, q:] + lam * logit_distance(s_qg, conv) / d.max(axis=0)[:q, None]


def _emb(q, g) -> np.ndarray:
    x = torch.cat([q, g]).double().mean(dim=(2, 3))
    return F.normalize(x, dim=1).numpy()


# ------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("version", ["2.1", "1"])
@pytest.mark.parametrize("conv", ["sigmoid", "logit"])
def test_m_covering_everything_equals_the_exhaustive_protocol(version, conv):
    """Every row (QAConv, +RR, +RR+TLift) of --two-stage M >= Q+G equals the exhaustive protocol's."""
    head = _head(version)
    q, g, data = _world(1)
    cfg = {**OPTS, "tlift": True, "rerank_input": conv}
    want, _ = _exhaustive(head, q, g, data, cfg)
    got = _shortlisted(head, q, g, data, {**cfg, "two_stage": N + 3})
    assert set(got) == set(want) == {"", RR, RR_TLIFT}
    for label in want:
        np.testing.assert_allclose(got[label], want[label], rtol=2e-6, atol=2e-6, err_msg=label)


def test_m_covering_the_gallery_only_keeps_the_exact_query_gallery_scores():
    head = _head("2.1")
    q, g, data = _world(2)
    cfg = {**OPTS, "rerank": True}
    want, full = _exhaustive(head, q, g, data, cfg)
    got = _shortlisted(head, q, g, data, {**cfg, "two_stage": G})
    np.testing.assert_allclose(got[""], want[""], rtol=0, atol=2e-6)  # the QAConv row is exhaustive
    _, ref = reference(full, _emb(q, g), Q, G, "sigmoid", **{k: OPTS[k] for k in ("k1", "k2")}, lam=0.3)
    np.testing.assert_allclose(got[RR], ref, rtol=0, atol=2e-5)  # the neighbour lists are not (G < Q+G)
    assert np.abs(got[RR] - want[RR]).max() > 1e-4


@pytest.mark.parametrize("version", ["2.1", "1"])
@pytest.mark.parametrize("m", [2, 4, 7, 15])
@pytest.mark.parametrize("conv", ["sigmoid", "logit"])
def test_shortlists_equal_the_brute_force_restricted_protocol(version, m, conv):
    """M < G: the QAConv row is two_stage_scores', +RR the official re-ranking of the restricted matrix (loops),
    +RR+TLift TLift of 1 - that. m = 2, 4 < k1 + 1: tail images enter the neighbour lists themselves."""
    head = _head(version, seed=3)
    q, g, data = _world(4)
    cfg = {**OPTS, "tlift": True, "rerank_input": conv, "two_stage": m}
    got = _shortlisted(head, q, g, data, cfg)
    full = Matcher(head, "cpu").scores(torch.cat([q, g]), torch.cat([q, g])).numpy().astype(np.float64)
    s_qg, rr = reference(full, _emb(q, g), Q, m, conv, OPTS["k1"], OPTS["k2"], OPTS["lambda_value"])
    np.testing.assert_allclose(got[""], -s_qg, rtol=0, atol=2e-5)
    np.testing.assert_allclose(got[RR], rr, rtol=0, atol=2e-5)
    np.testing.assert_allclose(got[RR_TLIFT], 1 - _lift((1 - rr).astype(np.float32), data), rtol=0, atol=5e-5)


def test_the_query_gallery_row_is_two_stage_scores():
    from qaconv.gallery.search import two_stage_scores

    head = _head("1")
    q, g, data = _world(5)
    got = _shortlisted(head, q, g, data, {**OPTS, "rerank": True, "two_stage": 6})
    want, _ = two_stage_scores(head, q, g, 6, device="cpu")
    np.testing.assert_allclose(got[""], -want.numpy(), rtol=0, atol=1e-5)


def test_each_pair_is_scored_once():
    """(Q+G) x (M + 1) + Q x M requests (the +1: each image's farthest); the symmetric head scores each
    unordered pair once, v1 each ordered pair."""
    q, g, _ = _world(6)
    for version in ("2.1", "1"):
        sl = ev.shortlist_candidates(q, g, 5, lists=6)
        ev.score_shortlists(_head(version), q, g, sl)
        keys = set()
        for r in range(N):
            for c in [*sl.cand[r, :5], sl.far[r]]:
                pair = (r, int(c)) if r < Q <= c else (int(c), r)
                keys.add(tuple(sorted(pair)) if version == "2.1" else pair)
        keys |= {(i, Q + int(j)) for i in range(Q) for j in sl.gal_cand[i]}
        assert sl.pairs == len(keys), version


def test_no_dense_square_matrix_on_the_shortlist_path(monkeypatch):
    """The re-ranking stage holds O((Q+G) * M) entries: its numpy peak stays far below one [Q+G]^2 float32."""
    import qaconv.rerank as rerank

    def refuse(*args, **kwargs):
        raise AssertionError("a dense or streamed full-matrix path was used")

    monkeypatch.setattr(rerank, "k_reciprocal", refuse)
    monkeypatch.setattr(rerank, "knn_lists", refuse)
    q, g, _ = _world(7, q=12, g=3000)
    head = _head("2.1")
    sl = ev.score_shortlists(head, q, g, ev.shortlist_candidates(q, g, 12, lists=6))
    s_qg = ev.two_stage_matrix(sl)
    tracemalloc.start()
    try:
        d_rr = ev.shortlist_rerank(sl, s_qg, {**ev.POST_DEFAULTS, **OPTS})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n = len(q) + len(g)
    assert d_rr.shape == (12, 3000) and np.isfinite(d_rr).all()
    assert peak < n * n * 4 / 8, f"peak {peak} bytes for n = {n}"


def test_logit_input_with_negative_column_maxima_is_refused_on_shortlists():
    """-logit of strongly positive logits: every column maximum is negative, which would make the farthest
    images by cosine (not re-scored) the nearest; one clear error. With M >= Q+G it runs, as exhaustively."""
    head = _head("2.1", shift=1000.0)
    q, g, data = _world(8)
    cfg = {**OPTS, "rerank": True, "rerank_input": "logit"}
    with pytest.raises(QAConvError, match="negative"):
        _shortlisted(head, q, g, data, {**cfg, "two_stage": 10})
    want, _ = _exhaustive(head, q, g, data, cfg)
    got = _shortlisted(head, q, g, data, {**cfg, "two_stage": N})
    np.testing.assert_allclose(got[RR], want[RR], rtol=0, atol=1e-5)


def test_exhaustive_knn_path_assembles_the_official_matrix_for_asymmetric_heads():
    """Beyond rerank_dense_max the kNN path must see D = [[qq, qg], [qg.T, gg]] like the dense path (v1 head)."""
    head = _head("1")
    q, g, data = _world(9)
    full = Matcher(head, "cpu").scores(torch.cat([q, g]), torch.cat([q, g])).numpy()
    assert np.abs(full - full.T).max() > 1e-3

    def score_fn(rows, cols):
        idx = np.arange(N)
        return full[idx[rows]][:, idx[cols]]

    cfg = {**OPTS, "rerank": True}
    dense = postprocess(full[:Q, Q:], data, cfg, score_fn, progress=False)[RR]
    knn = postprocess(full[:Q, Q:], data, {**cfg, "rerank_dense_max": 0}, score_fn, progress=False)[RR]
    np.testing.assert_allclose(knn, dense, rtol=0, atol=1e-6)


_WORKER = """
import sys
import numpy as np
import torch
from qaconv.engine import distributed as ddp
from qaconv.engine.evaluator import shortlist_protocol
from qaconv.models.qaconv import QAConv

torch.set_num_threads(1)
assert ddp.init_from_env("cpu") and ddp.world_size() == 2
saved = torch.load(sys.argv[1])
head = QAConv(*saved["shape"], version=saved["version"])
head.load_state_dict(saved["head"])
s_qg, d_rr = shortlist_protocol(head.eval(), saved["q"], saved["g"], saved["cfg"], {"device": "cpu", "memory": 1 << 26})
np.savez(sys.argv[2] + f"_rank{ddp.rank()}.npz", s_qg=s_qg, d_rr=d_rr)
"""


def _two_ranks(argv, env, attempts=3):
    """Start argv as ranks 0 and 1 of a gloo group (as torchrun does); retried on a port taken meanwhile."""
    import os
    import socket
    import subprocess

    for _ in range(attempts):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = [subprocess.Popen(argv, env={**os.environ, **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                             "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        if all(p.returncode == 0 for p in procs) or not any("EADDRINUSE" in err for _, err in outs):
            return [(p.returncode, err) for p, (_, err) in zip(procs, outs, strict=True)]
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs, strict=True)]


@pytest.mark.parametrize("version", ["2.1", "1"])
def test_two_processes_give_the_single_process_result(version, tmp_path, monkeypatch):
    """Under torchrun the first stage and the re-scoring are shared out; every rank ends with the one-process
    numbers (same blocks, so bitwise)."""
    import os
    import sys
    from pathlib import Path

    import qaconv

    monkeypatch.setattr(ev, "PAIR_BLOCK", 4)  # several re-scoring blocks to share out
    monkeypatch.setattr(ev, "_ELEMS", 200)  # several first-stage row blocks
    head = _head(version, seed=11)
    q, g, _ = _world(12)
    cfg = {**OPTS, "tlift": True, "two_stage": 6}
    torch.set_num_threads(1)
    try:
        want = shortlist_protocol(head, q, g, cfg, MATCH)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    torch.save({"q": q, "g": g, "head": head.state_dict(), "shape": (C, H, W), "version": version, "cfg": cfg},
               tmp_path / "in.pt")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.replace('torch.set_num_threads(1)\n',
                                      'torch.set_num_threads(1)\nimport qaconv.engine.evaluator as ev\n'
                                      'ev.PAIR_BLOCK, ev._ELEMS = 4, 200\n'))
    src = str(Path(qaconv.__file__).parents[1])
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    for r, (code, err) in enumerate(_two_ranks([sys.executable, str(script), str(tmp_path / "in.pt"),
                                                str(tmp_path / "out")], env)):
        assert code == 0, f"rank {r} failed:\n{err[-3000:]}"
    for r in range(2):
        got = np.load(tmp_path / f"out_rank{r}.npz")
        np.testing.assert_array_equal(got["s_qg"], want[0])
        np.testing.assert_array_equal(got["d_rr"], want[1])
