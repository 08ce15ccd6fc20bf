import io
from collections import Counter

import numpy as np
import pytest
import torch

from qaconv.data.samplers import (
    GraphSampler,
    RandomIdentitySampler,
    ShuffledBatchSampler,
    rerank_class_distances,
    sigmoid_distance,
)
from qaconv.rerank import k_reciprocal

# Six classes with non-contiguous labels (class order = sorted labels) and uneven sizes.
CLASS_LABELS = [10, 20, 30, 40, 50, 60]
CLASS_SIZES = [5, 1, 3, 4, 2, 7]
# Classes sit on a line at these positions, so distances are |x_i - x_j| with no ties.
POSITIONS = np.array([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])
# Two nearest classes of each class, worked out by hand from POSITIONS.
NEAREST_TWO = [[1, 2], [0, 2], [1, 0], [2, 4], [3, 5], [4, 3]]


def make_labels(seed=0):
    labels = [lab for lab, n in zip(CLASS_LABELS, CLASS_SIZES, strict=True) for _ in range(n)]
    return list(np.random.default_rng(seed).permutation(labels))


def line_distances(reps):
    return np.abs(POSITIONS[:, None] - POSITIONS[None, :])


def class_of(labels):
    lookup = {lab: i for i, lab in enumerate(CLASS_LABELS)}
    return lambda idx: lookup[int(labels[idx])]


def epoch_batches(sampler, epoch=None):
    if epoch is not None:
        sampler.set_epoch(epoch)
    return list(iter(sampler))


def test_batch_composition_follows_the_class_graph():
    labels = make_labels()
    seen_reps = []

    def dist(reps):
        seen_reps.append(reps)
        return line_distances(reps)

    sampler = GraphSampler(labels, batch_size=6, num_instance=2, distance_fn=dist, seed=1)
    assert len(sampler) == 6
    batches = epoch_batches(sampler, 0)
    cls = class_of(labels)

    # the distance function got one representative image per class, in class order
    assert [cls(i) for i in seen_reps[0]] == list(range(6))
    np.testing.assert_array_equal(sampler.last_neighbours, NEAREST_TWO)

    assert len(batches) == 6
    anchors = []
    for batch in batches:
        assert len(batch) == 6 and all(isinstance(i, int) for i in batch)
        classes = [cls(i) for i in batch]
        counts = Counter(classes)
        assert set(counts.values()) == {2}  # exactly num_instance images per class
        anchor = classes[-1]  # the group is [neighbours..., anchor]
        anchors.append(anchor)
        assert classes == [c for c in NEAREST_TWO[anchor] for _ in range(2)] + [anchor, anchor]
    assert sorted(anchors) == list(range(6))  # one batch per class


def test_neighbour_ties_and_self_exclusion():
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    # all distances equal (and the diagonal is smallest): neighbours are the lowest other class indices
    sampler = GraphSampler(labels, batch_size=6, num_instance=2, distance_fn=lambda r: -np.eye(4))
    epoch_batches(sampler)
    np.testing.assert_array_equal(sampler.last_neighbours, [[1, 2], [0, 2], [0, 1], [0, 1]])


def test_torch_distances_are_accepted():
    sampler = GraphSampler(make_labels(), 6, 2, lambda r: torch.from_numpy(line_distances(r)).half())
    epoch_batches(sampler)
    np.testing.assert_array_equal(sampler.last_neighbours, NEAREST_TWO)


def test_small_class_repeats_and_images_cycle_before_repeating():
    labels = make_labels(3)
    cls = class_of(labels)
    sampler = GraphSampler(labels, batch_size=8, num_instance=4, distance_fn=line_distances, seed=5)
    takes = Counter()
    per_class_total = Counter()
    for epoch in range(4):
        for batch in epoch_batches(sampler, epoch):
            assert set(Counter(cls(i) for i in batch).values()) == {4}
            singles = [i for i in batch if CLASS_SIZES[cls(i)] == 1]
            assert len(singles) in (0, 4) and len(set(singles)) <= 1  # the 1-image class repeats its image
            takes.update(batch)
            per_class_total.update(cls(i) for i in batch)
        # every image of a class is used before any image of it repeats: counts differ by at most one
        for c, n in enumerate(CLASS_SIZES):
            members = [i for i in range(len(labels)) if cls(i) == c]
            counts = [takes[i] for i in members]
            assert sum(counts) == per_class_total[c]
            assert max(counts) - min(counts) <= 1
            assert min(counts) == per_class_total[c] // n
        state = sampler.state_dict()
        assert state["pointers"] == [per_class_total[c] % n for c, n in enumerate(CLASS_SIZES)]


def test_all_classes_when_k_exceeds_available_neighbours():
    labels = [0, 0, 1, 2, 2, 2]
    sampler = GraphSampler(labels, batch_size=64, num_instance=2)  # k = 31 > P - 1 = 2
    batches = epoch_batches(sampler)
    assert len(batches) == 3
    assert sampler.last_neighbours.shape == (3, 2)
    for batch in batches:
        assert len(batch) == 6
        assert Counter(labels[i] for i in batch) == {0: 2, 1: 2, 2: 2}


def test_random_distances_without_distance_fn():
    labels = [c for c in range(20) for _ in range(3)]
    sampler = GraphSampler(labels, batch_size=8, num_instance=2, seed=4)
    first = epoch_batches(sampler, 0)
    neigh0 = sampler.last_neighbours.copy()
    epoch_batches(sampler, 1)
    assert len(first) == 20 and all(len(b) == 8 for b in first)
    assert not np.array_equal(neigh0, sampler.last_neighbours)
    assert all((sampler.last_neighbours[i] != i).all() for i in range(20))


def test_determinism_per_seed_and_epoch():
    labels = make_labels()

    def rep_distances(reps):  # depends on the representatives drawn
        r = np.asarray(reps, dtype=float)
        return np.abs(r[:, None] - r[None, :]) + line_distances(reps)

    a = GraphSampler(labels, 6, 2, rep_distances, seed=7)
    b = GraphSampler(labels, 6, 2, rep_distances, seed=7)
    c = GraphSampler(labels, 6, 2, rep_distances, seed=8)
    run_a = [epoch_batches(a, e) for e in range(3)]
    run_b = [epoch_batches(b, e) for e in range(3)]
    run_c = [epoch_batches(c, e) for e in range(3)]
    assert run_a == run_b
    assert run_a != run_c
    assert run_a[1] != run_a[2]
    # without set_epoch each iter() moves on to the next epoch
    d = GraphSampler(labels, 6, 2, rep_distances, seed=7)
    assert [list(d) for _ in range(3)] == run_a


def test_state_dict_resume_is_exact():
    labels = make_labels(1)

    def rep_distances(reps):
        r = np.asarray(reps, dtype=float)
        return (r[:, None] * 7 + r[None, :] * 3) % 11

    full = GraphSampler(labels, 6, 2, rep_distances, seed=3)
    for epoch in range(1, 3):
        epoch_batches(full, epoch)
    buffer = io.BytesIO()
    torch.save({"sampler": full.state_dict()}, buffer)
    expected = [epoch_batches(full, e) for e in (3, 4)]

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["sampler"]
    resumed = GraphSampler(labels, 6, 2, rep_distances, seed=3)
    resumed.load_state_dict(state)
    assert [epoch_batches(resumed, e) for e in (3, 4)] == expected

    again = GraphSampler(labels, 6, 2, rep_distances, seed=3)
    again.load_state_dict(state)
    assert [list(again), list(again)] == expected  # the state carries the next epoch


def test_works_as_dataloader_batch_sampler():
    labels = make_labels()
    dataset = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.tensor(labels))
    sampler = GraphSampler(labels, 6, 2, line_distances)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    out = list(loader)
    assert len(out) == len(loader) == 6
    assert all(len(idx) == 6 for idx, _ in out)


def test_graph_sampler_bad_arguments():
    labels = make_labels()
    with pytest.raises(ValueError, match="multiple of num_instance"):
        GraphSampler(labels, batch_size=7, num_instance=2)
    with pytest.raises(ValueError, match="at least 2 \\* num_instance"):
        GraphSampler(labels, batch_size=4, num_instance=4)
    with pytest.raises(ValueError, match="num_instance must be >= 1"):
        GraphSampler(labels, batch_size=4, num_instance=0)
    with pytest.raises(ValueError, match="at least 2 identities"):
        GraphSampler([5, 5, 5], batch_size=4, num_instance=2)
    with pytest.raises(ValueError, match="non-empty"):
        GraphSampler([], batch_size=4, num_instance=2)
    with pytest.raises(ValueError, match="seed"):
        GraphSampler(labels, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        GraphSampler(labels).set_epoch(-2)
    with pytest.raises(ValueError, match=r"\[6, 6\] matrix"):
        list(GraphSampler(labels, 6, 2, lambda r: np.zeros((5, 5))))
    with pytest.raises(ValueError, match="NaN"):
        list(GraphSampler(labels, 6, 2, lambda r: np.full((6, 6), np.nan)))
    state = GraphSampler(labels, 6, 2).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        GraphSampler(labels + [70], 6, 2).load_state_dict(state)


def test_random_identity_sampler_batches():
    labels = [c for c, n in enumerate([1, 2, 5, 4, 3, 6, 2]) for _ in range(n)]
    sampler = RandomIdentitySampler(labels, batch_size=9, num_instance=3, seed=2)
    assert len(sampler) == 2  # 7 identities, 3 per batch: the incomplete last batch is dropped
    batches = epoch_batches(sampler, 0)
    assert len(batches) == 2
    used = []
    for batch in batches:
        counts = Counter(labels[i] for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {3}
        for c in counts:
            mine = [i for i in batch if labels[i] == c]
            if labels.count(c) >= 3:
                assert len(set(mine)) == 3  # without replacement
        used.extend(counts)
    assert len(set(used)) == 6


def test_random_identity_sampler_determinism_and_resume():
    labels = [c for c in range(10) for _ in range(c % 3 + 1)]
    a = RandomIdentitySampler(labels, 8, 2, seed=1)
    b = RandomIdentitySampler(labels, 8, 2, seed=1)
    assert epoch_batches(a, 4) == epoch_batches(b, 4)
    assert epoch_batches(a, 5) != epoch_batches(RandomIdentitySampler(labels, 8, 2, seed=2), 5)
    state = a.state_dict()
    expected = list(a)
    resumed = RandomIdentitySampler(labels, 8, 2, seed=1)
    resumed.load_state_dict(state)
    assert list(resumed) == expected


def test_random_identity_sampler_bad_arguments():
    with pytest.raises(ValueError, match="needs 4 identities"):
        RandomIdentitySampler([0, 1, 2], batch_size=8, num_instance=2)
    with pytest.raises(ValueError, match="multiple of num_instance"):
        RandomIdentitySampler(list(range(10)), batch_size=9, num_instance=2)



# -- v1.x shuffled batches -----------------------------------------------------------------------------
def test_shuffled_batches_are_full_disjoint_and_vary():
    sampler = ShuffledBatchSampler(23, 5, seed=3)
    assert len(sampler) == 4
    seen = set()
    for epoch in range(6):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == 4 and all(len(b) == 5 for b in batches)  # drop_last: every batch full
        flat = [i for b in batches for i in b]
        assert all(isinstance(i, int) for i in flat)
        assert len(set(flat)) == 20 and set(flat) <= set(range(23))  # part of one permutation
        seen.update(flat)
    assert seen == set(range(23))  # the dropped remainder changes from epoch to epoch
    exact = ShuffledBatchSampler(10, 5)
    assert sorted(i for b in epoch_batches(exact) for i in b) == list(range(10))


def test_shuffled_batches_determinism_and_resume():
    a, b, c = ShuffledBatchSampler(40, 8, seed=1), ShuffledBatchSampler(40, 8, seed=1), ShuffledBatchSampler(40, 8, 2)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 3) != epoch_batches(c, 3)
    assert epoch_batches(a, 3) != epoch_batches(a, 4)
    d = ShuffledBatchSampler(40, 8, seed=1)
    run = [list(d) for _ in range(3)]  # iter() advances the epoch
    assert run == [epoch_batches(a, e) for e in range(3)]

    buffer = io.BytesIO()
    torch.save(d.state_dict(), buffer)
    expected = [list(d), list(d)]
    buffer.seek(0)
    resumed = ShuffledBatchSampler(40, 8, seed=1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [list(resumed), list(resumed)] == expected
    with pytest.raises(ValueError, match="41 samples"):
        ShuffledBatchSampler(40, 8).load_state_dict({**d.state_dict(), "num_samples": 41})

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(40)), batch_sampler=a)
    assert len(loader) == 5 and all(len(x) == 8 for (x,) in loader)


def test_shuffled_batches_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ShuffledBatchSampler(10, 0)
    with pytest.raises(ValueError, match="at least batch_size"):
        ShuffledBatchSampler(3, 4)
    with pytest.raises(ValueError, match="seed"):
        ShuffledBatchSampler(10, 2, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        ShuffledBatchSampler(10, 2).set_epoch(-1)


# -- v2.0 pre-epochs ---------------------------------------------------------------------------------
# bs 4, K 2: the cap is 4 chunks per class; sizes cover padding (1), one chunk (3), the cap (11) and 9 -> 4 chunks
PRE_SIZES = [1, 3, 11, 9, 4, 2]
PRE_LABELS = [c for c, n in enumerate(PRE_SIZES) for _ in range(n)]


def official_random_index(labels, batch_size, num_instance, rng):
    """random_index() of the official v2.0 graph sampler, then its DataLoader(batch_size, drop_last=False)."""
    flat = []
    for c in sorted(set(labels)):
        index = [i for i, lab in enumerate(labels) if lab == c]
        chunks = len(index) // num_instance
        if chunks == 0:
            index = index + rng.choice(index, num_instance - len(index), replace=True).tolist()
            chunks = 1
        index = rng.permutation(index).tolist()
        if chunks > batch_size:
            index = index[: batch_size * num_instance]
        else:
            index = index[: chunks * num_instance]
        flat.extend(index)
    rows = [flat[i : i + num_instance] for i in range(0, len(flat), num_instance)]
    flat = [i for r in rng.permutation(len(rows)) for i in rows[r]]
    batches = []
    for i in range(0, len(flat), batch_size):
        batches.append(flat[i : i + batch_size])
    return batches


def epoch_rng(seed, epoch):
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, epoch)))


def test_pre_epochs_follow_the_official_random_index():
    sampler = GraphSampler(PRE_LABELS, 4, 2, line_distances, seed=9, pre_epochs=2)
    state0 = sampler.state_dict()
    runs = []
    for epoch in range(2):
        assert len(sampler) == 7  # (1 + 1 + 4 + 4 + 2 + 1) chunks * 2 = 26 images -> 6 full batches + 2
        batches = epoch_batches(sampler, epoch)
        assert batches == official_random_index(PRE_LABELS, 4, 2, epoch_rng(9, epoch))
        assert sampler.last_neighbours is None
        runs.append(batches)
        # structure, independent of the random stream
        assert [len(b) for b in batches] == [4] * 6 + [2]
        flat = [i for b in batches for i in b]
        chunks = [flat[i : i + 2] for i in range(0, len(flat), 2)]
        assert all(PRE_LABELS[a] == PRE_LABELS[b] for a, b in chunks)  # K images of one class each
        per_class = Counter(PRE_LABELS[a] for a, _ in chunks)
        assert [per_class[c] for c in range(6)] == [1, 1, 4, 4, 2, 1]
        assert chunks[[PRE_LABELS[a] for a, _ in chunks].index(0)] == [0, 0]  # 1 image padded by itself
        for c, n in enumerate(PRE_SIZES):
            mine = [i for i in flat if PRE_LABELS[i] == c]
            if n >= 2:
                assert len(set(mine)) == len(mine)  # without replacement
    assert runs[0] != runs[1]
    assert {**sampler.state_dict(), "epoch": 0} == state0  # pre-epochs leave the image lists and pointers alone
    assert len(sampler) == 6
    graph = epoch_batches(sampler, 2)
    assert len(graph) == 6 and sampler.last_neighbours is not None
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(len(PRE_LABELS))),
                                         batch_sampler=GraphSampler(PRE_LABELS, 4, 2, pre_epochs=1))
    assert len(loader) == 7 == len(list(loader))


# -- v2.0 re-ranking -------------------------------------------------------------------------------------
def rerank_full(full, num_query, k1=20, k2=6, lam=0.3):
    """The official reranking(full, num_query) on an explicit matrix: loops, float64 V, stable ties."""
    full = np.asarray(full, dtype=np.float32)
    n = len(full)
    o = (full / full.max(axis=0)).T.astype(np.float64)
    rank = np.argsort(o, axis=1, kind="stable")

    def reciprocal(i, k):
        return [c for c in rank[i, : k + 1] if i in rank[c, : k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, int(np.around(k1 / 2)))
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expanded |= set(rc)
        idx = sorted(expanded)
        w = np.exp(-o[i, idx])
        v[i, idx] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jac = np.zeros((num_query, n))
    for i in range(num_query):
        for j in range(n):
            s = np.minimum(v[i], v[j]).sum()
            jac[i, j] = 1 - s / (2 - s)
    final = (1 - lam) * jac + lam * o[:num_query]
    return final[:, num_query:]


def asym_distances(P, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(P, 3))
    base = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return (base + rng.uniform(0, 1.5, size=(P, P)) + 0.1).astype(np.float32)  # positive, not symmetric


def test_rerank_reference_matches_project_rerank_on_plain_input():
    # the test's reference agrees with qaconv.rerank on an ordinary (untiled) query/gallery problem
    d = asym_distances(20, seed=5)
    d = (d + d.T) / 2
    q = 7
    np.testing.assert_allclose(k_reciprocal(d[:q, q:], d[:q, :q], d[q:, q:]), rerank_full(d, q), atol=1e-5)


@pytest.mark.parametrize("P", [14, 5])
def test_rerank_equals_explicit_2p_tiling(P):
    d = asym_distances(P, seed=P)
    tiled = np.tile(d, (2, 2))  # what the official code built: [[D, D], [D, D]]
    assert tiled.shape == (2 * P, 2 * P)
    expected = rerank_full(tiled, P)
    got = rerank_class_distances(d)
    assert got.shape == (P, P)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(rerank_class_distances(d, 4, 3, 0.5), rerank_full(tiled, P, 4, 3, 0.5), atol=1e-5)
    # k_reciprocal(D, D, D) assembles [[D, D], [D.T, D]]: the same only for a symmetric D
    assert not np.allclose(k_reciprocal(d, d, d), expected, atol=1e-3)
    s = (d + d.T) / 2
    np.testing.assert_allclose(k_reciprocal(s, s, s), rerank_class_distances(s), atol=1e-5)
    np.testing.assert_allclose(rerank_class_distances(s), rerank_full(np.tile(s, (2, 2)), P), atol=1e-5)


def stable_neighbours(dist, k):
    dist = np.array(dist, dtype=np.float64)
    np.fill_diagonal(dist, np.inf)
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


def test_rerank_neighbours_follow_the_reranked_distances():
    P = 14
    d = asym_distances(P, seed=2)
    labels = [c for c in range(P) for _ in range(2)]
    sampler = GraphSampler(labels, 8, 2, lambda reps: d, rerank=True)
    batches = epoch_batches(sampler)
    expected = stable_neighbours(rerank_full(np.tile(d, (2, 2)), P), 3)
    np.testing.assert_array_equal(sampler.last_neighbours, expected)
    assert not np.array_equal(expected, stable_neighbours(d, 3))  # re-ranking changed some neighbours
    for batch in batches:
        classes = [labels[i] for i in batch]
        assert classes[2:6:2] == expected[classes[-1]][1:].tolist()

    plain = GraphSampler(labels, 8, 2, lambda reps: d)
    epoch_batches(plain)
    np.testing.assert_array_equal(plain.last_neighbours, stable_neighbours(d, 3))
    with pytest.raises(ValueError, match="sigmoid"):
        list(GraphSampler(labels, 8, 2, lambda reps: -d, rerank=True))  # -logit style distances


def test_sigmoid_distance():
    logits = np.array([0.0, 10.0, -20.0])
    np.testing.assert_allclose(sigmoid_distance(logits), 1 - 1 / (1 + np.exp(-logits / 10)))
    np.testing.assert_allclose(sigmoid_distance(torch.tensor(logits)), sigmoid_distance(logits))


# -- v2.0 gs save ------------------------------------------------------------------------------------------
def test_gs_save_writes_readable_npz(tmp_path):
    P = 14
    d = asym_distances(P, seed=4)
    labels = [c * 3 + 1 for c in range(P) for _ in range(c % 3 + 1)]
    seen = []

    def dist(reps):
        seen.append(np.array(reps))
        return d

    sampler = GraphSampler(labels, 8, 2, dist, seed=1, pre_epochs=1, rerank=True, save_dir=tmp_path / "gs")
    neighbours = {}
    for epoch in range(3):
        epoch_batches(sampler, epoch)
        neighbours[epoch] = sampler.last_neighbours
    assert sorted(p.name for p in (tmp_path / "gs").iterdir()) == ["gs1.npz", "gs2.npz"]  # no pre-epoch, no temp
    for epoch, reps in zip((1, 2), seen, strict=True):
        with np.load(tmp_path / "gs" / f"gs{epoch}.npz", allow_pickle=False) as f:
            assert set(f.files) == {"classes", "rep_indices", "raw_dist", "dist", "neighbours", "epoch"}
            np.testing.assert_array_equal(f["classes"], sorted(set(labels)))
            np.testing.assert_array_equal(f["rep_indices"], reps)
            assert [labels[i] for i in f["rep_indices"]] == sorted(set(labels))
            np.testing.assert_array_equal(f["raw_dist"], d)
            np.testing.assert_allclose(f["dist"], rerank_full(np.tile(d, (2, 2)), P), atol=1e-5)
            np.testing.assert_array_equal(f["neighbours"], neighbours[epoch])
            assert int(f["epoch"]) == epoch


# -- resume with the v2.0 options ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options", [{"pre_epochs": 2}, {"rerank": True}, {"save_dir": "gs"}, {"pre_epochs": 1, "rerank": True}]
)
def test_resume_is_exact_with_v20_options(options, tmp_path):
    labels = [c for c in range(14) for _ in range(c % 4 + 1)]

    def rep_distances(reps):
        r = np.asarray(reps, dtype=float)
        return ((r[:, None] * 7 + r[None, :] * 3) % 11 + 1) * (1 + 0.01 * r[:, None])

    def make(folder):
        opts = dict(options)
        if "save_dir" in opts:
            opts["save_dir"] = tmp_path / folder
        return GraphSampler(labels, 8, 2, rep_distances, seed=3, **opts)

    full = make("full")
    epoch_batches(full, 0)
    buffer = io.BytesIO()
    torch.save(full.state_dict(), buffer)
    expected = [list(full) for _ in range(3)]  # epochs 1..3 cross the pre-epoch / graph boundary
    buffer.seek(0)
    resumed = make("resumed")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [list(resumed) for _ in range(3)] == expected
    if "save_dir" in options:
        for e in (1, 2, 3):
            with np.load(tmp_path / "full" / f"gs{e}.npz") as a, np.load(tmp_path / "resumed" / f"gs{e}.npz") as b:
                assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_v20_bad_arguments():
    with pytest.raises(ValueError, match="pre_epochs must be >= 0"):
        GraphSampler(make_labels(), 6, 2, pre_epochs=-1)
    with pytest.raises(ValueError, match="square"):
        rerank_class_distances(np.ones((2, 3)))
