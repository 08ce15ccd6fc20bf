"""Identity-aware batch samplers: the QAConv-GS graph sampler and a plain P×K sampler.

Both are ``torch.utils.data`` batch samplers (pass them as ``batch_sampler=``) that yield lists of
dataset indices. Randomness comes only from ``numpy`` generators derived from ``(seed, epoch)``:

* ``set_epoch(epoch)`` selects the epoch whose batches the next ``iter()`` builds; each ``iter()``
  then advances the epoch by one, so a loop that never calls ``set_epoch`` still varies.
* ``state_dict()`` / ``load_state_dict()`` hold plain Python values (safe for
  ``torch.load(weights_only=True)``); a sampler restored from the state saved after epoch ``e``
  yields exactly the batches of epoch ``e + 1`` that the uninterrupted sampler would.

Batches are planned in full when ``iter()`` is called, so stopping half-way through an epoch leaves
the sampler in the state of a completed epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

DistanceFn = Callable[[np.ndarray], np.ndarray]

_INIT_STREAM, _EPOCH_STREAM = 0, 1


def _check_batch(batch_size: int, num_instance: int) -> None:
    if num_instance < 1:
        raise ValueError(f"num_instance must be >= 1, got {num_instance}")
    if batch_size % num_instance != 0:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of num_instance ({num_instance}): "
            "every identity in a batch contributes num_instance images"
        )
    if batch_size < 2 * num_instance:
        raise ValueError(
            f"batch_size ({batch_size}) must be at least 2 * num_instance ({2 * num_instance}) "
            "so that a batch holds at least two identities"
        )


def _check_seed(seed: int) -> int:
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return int(seed)


def _group_by_class(labels: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted unique labels and, per class, the sorted dataset indices of its images."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
    return classes, np.split(order, bounds)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


class GraphSampler(Sampler[list[int]]):
    """QAConv-GS graph sampler (spec §5.2): one batch per class, made of the class and its nearest classes.

    Each epoch: pick one random image per class (classes = sorted unique labels), ask
    ``distance_fn(rep_indices [P]) -> [P, P]`` for the class distances (smaller = closer, rows and
    columns in class order), and for every class form the group ``[k nearest classes…, class]`` with
    ``k = batch_size // num_instance - 1``. Each class in a group gives ``num_instance`` images taken
    from its shuffled image list at its pointer; a list that runs out is reshuffled and restarted, so
    every image of a class is used before any repeats, and classes with fewer than ``num_instance``
    images repeat images. The P batches are yielded in random order.

    ``distance_fn=None`` uses random distances (random class groups: for a first epoch or tests).
    When ``k >= P - 1`` every batch holds all P classes, i.e. ``P * num_instance`` images, fewer than
    ``batch_size``. Ties in the distances go to the class with the lower index. After each epoch
    ``last_neighbours`` holds the [P, k] neighbour class indices (positions in ``classes``).
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int = 64,
        num_instance: int = 2,
        distance_fn: DistanceFn | None = None,
        seed: int = 0,
    ):
        super().__init__()
        _check_batch(batch_size, num_instance)
        self.classes, self._members = _group_by_class(labels)
        if len(self.classes) < 2:
            raise ValueError(f"the graph sampler needs at least 2 identities, got {len(self.classes)}")
        self.batch_size = int(batch_size)
        self.num_instance = int(num_instance)
        self.distance_fn = distance_fn
        self.seed = _check_seed(seed)
        self.epoch = 0
        self.num_neighbours = min(self.batch_size // self.num_instance - 1, len(self.classes) - 1)
        self.last_neighbours: np.ndarray | None = None
        rng = _rng(self.seed, _INIT_STREAM)
        self._lists = [rng.permutation(m) for m in self._members]
        self._pointers = [0] * len(self._lists)

    def __len__(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Use ``(seed, epoch)`` for the next ``iter()``; ``epoch`` must be >= 0."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _distances(self, rng: np.random.Generator) -> np.ndarray:
        P = len(self.classes)
        counts = np.array([len(m) for m in self._members])
        reps = np.array([m[i] for m, i in zip(self._members, rng.integers(0, counts), strict=True)])
        if self.distance_fn is None:
            return rng.random((P, P))
        dist = self.distance_fn(reps)
        if hasattr(dist, "detach"):
            dist = dist.detach().cpu().numpy()
        dist = np.array(dist, dtype=np.float64)  # a copy: the diagonal is overwritten below
        if dist.shape != (P, P):
            raise ValueError(
                f"distance_fn must return a [{P}, {P}] matrix (one row per class), got {dist.shape}"
            )
        if np.isnan(dist).any():
            raise ValueError("distance_fn returned NaN distances")
        return dist

    def _neighbours(self, dist: np.ndarray) -> np.ndarray:
        P = len(dist)
        np.fill_diagonal(dist, np.inf)
        order = np.argsort(dist, axis=1, kind="stable")
        others = order[order != np.arange(P)[:, None]].reshape(P, P - 1)  # never the class itself
        return others[:, : self.num_neighbours]

    def _take(self, c: int, rng: np.random.Generator) -> list[int]:
        """``num_instance`` images of class ``c`` from its pointer on, reshuffling at the list end."""
        lst, ptr, out = self._lists[c], self._pointers[c], []
        while len(out) < self.num_instance:
            n = min(self.num_instance - len(out), len(lst) - ptr)
            out.extend(lst[ptr : ptr + n].tolist())
            ptr += n
            if ptr == len(lst):
                rng.shuffle(lst)
                ptr = 0
        self._pointers[c] = ptr
        return out

    def __iter__(self) -> Iterator[list[int]]:
        rng = _rng(self.seed, _EPOCH_STREAM, self.epoch)
        neighbours = self._neighbours(self._distances(rng))
        self.last_neighbours = neighbours
        batches = []
        for anchor in range(len(self.classes)):
            batch = []
            for c in [*neighbours[anchor].tolist(), anchor]:
                batch.extend(self._take(c, rng))
            batches.append(batch)
        self.epoch += 1
        return iter([batches[i] for i in rng.permutation(len(batches))])

    def state_dict(self) -> dict:
        """Epoch, per-class shuffled image lists and pointers, as plain Python values."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "lists": [lst.tolist() for lst in self._lists],
            "pointers": list(self._pointers),
        }

    def load_state_dict(self, state: dict) -> None:
        lists = [np.asarray(lst, dtype=np.int64) for lst in state["lists"]]
        same = len(lists) == len(self._members) and all(
            np.array_equal(np.sort(lst), m) for lst, m in zip(lists, self._members, strict=False)
        )
        if not same:
            raise ValueError("sampler state does not match these labels (different classes or images)")
        pointers = [int(p) for p in state["pointers"]]
        if len(pointers) != len(lists) or any(
            not 0 <= p < len(lst) for p, lst in zip(pointers, lists, strict=True)
        ):
            raise ValueError("sampler state has invalid pointers")
        self._lists, self._pointers = lists, pointers
        self.epoch = int(state["epoch"])
        self.seed = int(state.get("seed", self.seed))


class RandomIdentitySampler(Sampler[list[int]]):
    """P×K batches: ``batch_size // num_instance`` identities with ``num_instance`` images each.

    Each epoch takes a random permutation of the identities and draws ``num_instance`` images per
    identity, without replacement when it has enough images and with replacement otherwise.
    Consecutive identities form a batch; an incomplete last batch is dropped.
    """

    def __init__(self, labels: Sequence[int], batch_size: int = 64, num_instance: int = 4, seed: int = 0):
        super().__init__()
        _check_batch(batch_size, num_instance)
        self.classes, self._members = _group_by_class(labels)
        self.batch_size = int(batch_size)
        self.num_instance = int(num_instance)
        self.ids_per_batch = self.batch_size // self.num_instance
        if len(self.classes) < self.ids_per_batch:
            raise ValueError(
                f"a batch needs {self.ids_per_batch} identities (batch_size {batch_size} / num_instance "
                f"{num_instance}) but the labels hold only {len(self.classes)}"
            )
        self.seed = _check_seed(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.classes) // self.ids_per_batch

    def set_epoch(self, epoch: int) -> None:
        """Use ``(seed, epoch)`` for the next ``iter()``; ``epoch`` must be >= 0."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = _rng(self.seed, _EPOCH_STREAM, self.epoch)
        order = rng.permutation(len(self.classes))[: len(self) * self.ids_per_batch]
        batches = []
        for start in range(0, len(order), self.ids_per_batch):
            batch = []
            for c in order[start : start + self.ids_per_batch]:
                members = self._members[c]
                replace = len(members) < self.num_instance
                batch.extend(rng.choice(members, self.num_instance, replace=replace).tolist())
            batches.append(batch)
        self.epoch += 1
        return iter(batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state.get("seed", self.seed))
