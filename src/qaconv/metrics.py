"""Re-ID ranking metrics: CMC, mAP and mINP under the open-reid / Market-1501 protocol.

Protocol (spec §7.2): for each query, gallery items with the same identity *and* the same camera are
junk and removed; everything else stays (distractors such as Market pid 0 are plain negatives). A
query is *valid* when at least one true match remains; CMC, mAP and mINP are averaged over valid
queries only.

* CMC: first-match-break, cumulative, ``cmc[0]`` is rank-1.
* AP: identical to ``sklearn.metrics.average_precision_score(y_true, -dist)`` on the remaining items,
  including its treatment of tied distances (tied items form one threshold of the PR curve).
* INP: ``#positives / rank of the hardest (last) positive`` (Ye et al., AGW).

The gallery of each query is ordered by a stable argsort of its distance row, so ties in the CMC and
INP rank go to the lower gallery index; AP does not depend on the order within ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK_ELEMENTS = 1 << 20  # distance entries processed per query chunk (bounds temporary memory)


class NoValidQueryError(ValueError):
    """No query has a true match left after junk removal, so no metric is defined."""


@dataclass(frozen=True, eq=False)
class RankResult:
    """Ranking metrics; ``cmc`` is a read-only array of length ``max_rank`` (``cmc[0]`` = rank-1)."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    num_invalid: int

    def rank(self, k: int) -> float:
        """Rank-k accuracy (1-based ``k``)."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank k must be in [1, {len(self.cmc)}], got {k}")
        return float(self.cmc[k - 1])

    def to_dict(self) -> dict[str, float]:
        """Rank-1/5/10/20 (those within ``max_rank``), mAP and mINP as plain floats."""
        out = {f"rank-{k}": self.rank(k) for k in (1, 5, 10, 20) if k <= len(self.cmc)}
        out["mAP"] = float(self.mAP)
        out["mINP"] = float(self.mINP)
        return out


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _distances(distmat) -> np.ndarray:
    d = _to_numpy(distmat)
    if d.ndim != 2:
        raise ValueError(f"distmat must be a 2-D [Q, G] array, got shape {d.shape}")
    if d.dtype.kind == "f" and d.dtype.itemsize >= 4:
        pass  # float32 / float64 kept as is (no copy of a large matrix)
    elif d.dtype.kind in "fiub":
        d = d.astype(np.float32 if d.dtype.kind == "f" else np.float64)  # exact conversion
    else:
        raise ValueError(f"distmat must hold real numbers, got dtype {d.dtype}")
    if np.isnan(d).any():
        raise ValueError("distmat contains NaN distances")
    return d


def _ids(x, name: str, expected: int, axis: str, shape: tuple[int, int]) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != 1 or a.shape[0] != expected:
        raise ValueError(
            f"{name} must have shape ({expected},) to match distmat [Q, G] = {tuple(shape)} along {axis}, "
            f"got {tuple(a.shape)}"
        )
    return a


def _no_valid_message(q_pids, g_pids) -> str:
    q_ids = np.unique(q_pids)
    in_gallery = np.isin(q_ids, g_pids)
    absent = int((~in_gallery).sum())
    same_cam_only = int(in_gallery.sum())
    return (
        f"none of the {len(q_pids)} queries has a gallery image of the same identity from another camera "
        f"({absent} query identities have no gallery image at all; {same_cam_only} appear in the gallery "
        f"only under the query's own camera); check the query/gallery split and camera ids"
    )


def _chunk_stats(d, q_pids, q_camids, g_pids, g_camids):
    """Per-query first-match rank, AP, INP and validity for one chunk of query rows."""
    order = np.argsort(d, axis=1, kind="stable")
    d_sorted = np.take_along_axis(d, order, axis=1)
    pid_sorted = g_pids[order]
    same_pid = pid_sorted == q_pids[:, None]
    junk = same_pid & (g_camids[order] == q_camids[:, None])
    valid = ~junk
    match = same_pid & valid  # true matches that survive junk removal

    cum_valid = np.cumsum(valid, axis=1)  # 1-based rank among valid items at each position
    cum_tp = np.cumsum(match, axis=1)
    npos = cum_tp[:, -1] if d.shape[1] else np.zeros(len(d), dtype=np.int64)
    ok = npos > 0
    rows = np.arange(len(d))

    # CMC: rank (0-based, among valid items) of the first true match.
    first_pos = np.argmax(match, axis=1)
    first_rank = cum_valid[rows, first_pos] - 1

    # INP: positives / rank of the last true match.
    last_pos = d.shape[1] - 1 - np.argmax(match[:, ::-1], axis=1) if d.shape[1] else first_pos
    inp = np.where(ok, npos / np.maximum(cum_valid[rows, last_pos], 1), 0.0)

    # AP with sklearn's tie handling: one PR point at the end of each group of equal distances.
    # Equal values are contiguous after sorting, so group ends are found on the full row; junk items
    # add nothing to either count.
    group_end = np.ones_like(valid)
    if d.shape[1] > 1:
        group_end[:, :-1] = d_sorted[:, 1:] != d_sorted[:, :-1]
    tp_end = np.where(group_end, cum_tp, 0).astype(np.float64)
    # true positives gained in each group = tp at this group end minus tp at the previous group end
    prev = np.maximum.accumulate(np.where(group_end, cum_tp, 0), axis=1)
    prev = np.concatenate([np.zeros((len(d), 1), dtype=prev.dtype), prev[:, :-1]], axis=1)
    gained = np.where(group_end, cum_tp - prev, 0)
    precision = np.divide(tp_end, cum_valid, out=np.zeros_like(tp_end), where=group_end & (cum_valid > 0))
    ap_sum = (gained * precision).sum(axis=1)
    ap = np.where(ok, ap_sum / np.maximum(npos, 1), 0.0)
    return ok, first_rank, ap, inp


def _inputs(distmat, q_pids, g_pids, q_camids, g_camids):
    """Checked float distances and int id/camera arrays of consistent shapes."""
    d = _distances(distmat)
    Q, G = d.shape
    return (
        d,
        _ids(q_pids, "q_pids", Q, "rows", d.shape),
        _ids(g_pids, "g_pids", G, "columns", d.shape),
        _ids(q_camids, "q_camids", Q, "rows", d.shape),
        _ids(g_camids, "g_camids", G, "columns", d.shape),
    )


def per_query(distmat, q_pids, g_pids, q_camids, g_camids) -> dict[str, np.ndarray]:
    """Per-query results under the protocol of :func:`evaluate_rank`: ``valid`` (bool, a true match is
    left after junk removal), ``first_rank`` (0-based rank of the first true match among non-junk items,
    -1 when not valid), ``ap`` and ``inp`` (0 when not valid). ``evaluate_rank``'s mAP is
    ``ap[valid].mean()``.

    >>> r = per_query([[0.1, 0.9, 0.5]], [1], [1, 1, 2], [0], [1, 2, 1])  # matches at ranks 1 and 3
    >>> r["first_rank"].tolist(), round(float(r["ap"][0]), 4)  # AP = (1/1 + 2/3) / 2
    ([0], 0.8333)
    """
    d, q_pids, g_pids, q_camids, g_camids = _inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    Q, G = d.shape
    out = {"valid": [], "first_rank": [], "ap": [], "inp": []}
    step = max(1, _CHUNK_ELEMENTS // max(G, 1))
    for s in range(0, Q, step):
        e = min(Q, s + step)
        ok, first_rank, ap, inp = _chunk_stats(d[s:e], q_pids[s:e], q_camids[s:e], g_pids, g_camids)
        for key, value in zip(out, (ok, np.where(ok, first_rank, -1), ap, inp), strict=True):
            out[key].append(value)
    empty = {"valid": bool, "first_rank": np.int64, "ap": np.float64, "inp": np.float64}
    return {k: np.concatenate(v) if v else np.zeros(0, dtype=empty[k]) for k, v in out.items()}


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> RankResult:
    """CMC, mAP and mINP of a [Q, G] distance matrix (smaller = more similar).

    Accepts numpy arrays or torch tensors. NaN distances are rejected; infinite ones are allowed.
    When ``max_rank`` exceeds the gallery size the CMC is padded with its last value (which is 1.0,
    since every valid query finds its first match within the gallery).

    Raises ``NoValidQueryError`` when no query has a true match from another camera, and
    ``ValueError`` for inconsistent shapes.
    """
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    max_rank = int(max_rank)
    d, q_pids, g_pids, q_camids, g_camids = _inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    Q, G = d.shape

    step = max(1, _CHUNK_ELEMENTS // max(G, 1))
    ok_all, rank_all, ap_all, inp_all = [], [], [], []
    for s in range(0, Q, step):
        e = min(Q, s + step)
        ok, first_rank, ap, inp = _chunk_stats(d[s:e], q_pids[s:e], q_camids[s:e], g_pids, g_camids)
        ok_all.append(ok)
        rank_all.append(first_rank[ok])
        ap_all.append(ap[ok])
        inp_all.append(inp[ok])

    ok = np.concatenate(ok_all) if ok_all else np.zeros(0, dtype=bool)
    num_valid = int(ok.sum())
    if num_valid == 0:
        raise NoValidQueryError(_no_valid_message(q_pids, g_pids))

    first_rank = np.concatenate(rank_all)
    hits = np.bincount(first_rank[first_rank < max_rank], minlength=max_rank)
    cmc = np.cumsum(hits) / num_valid
    cmc.setflags(write=False)
    return RankResult(
        cmc=cmc,
        mAP=float(np.concatenate(ap_all).mean()),
        mINP=float(np.concatenate(inp_all).mean()),
        num_valid=num_valid,
        num_invalid=int(Q - num_valid),
    )
