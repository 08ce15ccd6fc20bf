import io
from collections import Counter

import numpy as np
import pytest
import torch

from qaconv.data.samplers import GraphSampler, RandomIdentitySampler

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
