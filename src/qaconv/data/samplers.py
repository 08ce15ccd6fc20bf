"""Batch samplers: the QAConv-GS graph sampler (HEAD/v2.1 and v2.0), a plain P×K sampler and the v1.x shuffle.

All are ``torch.utils.data`` batch samplers (pass them as ``batch_sampler=``) that yield lists of
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

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler

from ..atomic import atomic_write
from ..rerank import k_reciprocal_knn, knn_lists

DistanceFn = Callable[[np.ndarray], np.ndarray]

_INIT_STREAM, _EPOCH_STREAM = 0, 1

# k-reciprocal parameters of the v2.0 graph sampler (the defaults of the official ``reranking()``)
GS_RERANK_K1, GS_RERANK_K2, GS_RERANK_LAMBDA = 20, 6, 0.3


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


def _check_epoch(epoch: int) -> int:
    if int(epoch) < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return int(epoch)


def sigmoid_distance(logits) -> np.ndarray:
    """The v2.0 graph-sampler distance ``1 - sigmoid(logit / 10)`` (float64), from QAConv logits."""
    logits = np.asarray(logits.detach().cpu().numpy() if hasattr(logits, "detach") else logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(logits / 10.0))  # == 1 - sigmoid(logits / 10)


def rerank_class_distances(
    dist: np.ndarray, k1: int = GS_RERANK_K1, k2: int = GS_RERANK_K2, lambda_value: float = GS_RERANK_LAMBDA
) -> np.ndarray:
    """v2.0 GS re-ranking: k-reciprocal re-ranking of the 2P×2P tiling ``[[D, D], [D, D]]`` with the first P
    rows as queries; returns the [P, P] query-gallery block (float32).

    ``k_reciprocal(D, D, D)`` assembles ``[[D, D], [D.T, D]]`` instead, so it gives the same result only for
    a symmetric D (the v2.1 head); the v2.0 head is not symmetric. This works from the tiling's columns
    (``knn_lists`` / ``k_reciprocal_knn``), exact for any D, without building the 2P×2P matrix.
    The column maxima of D must be positive, e.g. ``sigmoid_distance(logits)``.
    """
    dist = np.asarray(dist, dtype=np.float32)
    P = len(dist)
    if dist.ndim != 2 or dist.shape != (P, P):
        raise ValueError(f"rerank_class_distances: expected a square [P, P] matrix, got {dist.shape}")
    if not (dist.max(axis=0) > 0).all():
        raise ValueError(
            "GS re-ranking needs distances whose column maxima are positive, e.g. 1 - sigmoid(logit / 10) "
            "(sigmoid_distance); -logit does not qualify"
        )

    def columns(a: int, b: int) -> np.ndarray:  # columns a..b of the tiling
        return np.tile(dist[:, np.arange(a, b) % P], (2, 1))

    def pair(r: np.ndarray, c: np.ndarray) -> np.ndarray:  # tiling[r, c]
        return dist[r % P, c % P]

    nn_index, nn_dist, col_max = knn_lists(columns, 2 * P, max(k1 + 1, k2))
    # the final λ term reads the tiling's lower-left block transposed, i.e. D.T
    return k_reciprocal_knn(nn_index, nn_dist, dist.T, col_max, k1, k2, lambda_value, pair_dist=pair)


class GraphSampler(Sampler[list[int]]):
    """QAConv-GS graph sampler (spec §5.2, §5.3): one batch per class, made of the class and its nearest classes.

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

    v2.0 options (official defaults: ``batch_size=64, num_instance=4`` -> 15 neighbours, ``pre_epochs=1``,
    ``rerank=True``; ``--gs_rerank_off`` is ``rerank=False``, ``--gs_save`` is ``save_dir``):

    * ``first_epoch``: the number ``set_epoch`` gives the first epoch (the trainer counts from 1); epochs
      are counted from it below, so the official 0-based numbering holds whatever the caller's.
    * ``pre_epochs``: epochs ``< pre_epochs`` use the official ``random_index()`` order instead (see
      ``_pre_epoch_batches``); they leave the image lists and pointers untouched and set
      ``last_neighbours`` to None.
    * ``rerank``: the class distances are re-ranked by ``rerank_class_distances`` (k1=20, k2=6, λ=0.3)
      before taking neighbours. The values then matter, not only their order: ``distance_fn`` must
      return the official ``1 - sigmoid(logit / 10)`` (``sigmoid_distance``); -logit is rejected.
      Without ``rerank`` any increasing transform of the distance gives the same neighbours.
    * ``save_dir``: each graph epoch ``e`` (0-based) writes ``gs{e}.npz`` there (atomic, no pickles):
      ``classes`` [P], ``rep_indices`` [P] (dataset indices of the representatives), ``raw_dist`` [P, P]
      (from ``distance_fn``), ``dist`` [P, P] (what neighbours came from: re-ranked or ``raw_dist``;
      diagonal not masked), ``neighbours`` [P, k] and ``epoch``.
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int = 64,
        num_instance: int = 2,
        distance_fn: DistanceFn | None = None,
        seed: int = 0,
        pre_epochs: int = 0,
        rerank: bool = False,
        save_dir: str | Path | None = None,
        first_epoch: int = 0,
    ):
        super().__init__()
        _check_batch(batch_size, num_instance)
        self.classes, self._members = _group_by_class(labels)
        if len(self.classes) < 2:
            raise ValueError(f"the graph sampler needs at least 2 identities, got {len(self.classes)}")
        if int(pre_epochs) < 0:
            raise ValueError(f"pre_epochs must be >= 0, got {pre_epochs}")
        self.batch_size = int(batch_size)
        self.num_instance = int(num_instance)
        self.distance_fn = distance_fn
        self.seed = _check_seed(seed)
        self.pre_epochs = int(pre_epochs)
        self.rerank = bool(rerank)
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.first_epoch = _check_epoch(first_epoch)
        self.epoch = 0
        self.num_neighbours = min(self.batch_size // self.num_instance - 1, len(self.classes) - 1)
        self.last_neighbours: np.ndarray | None = None
        rng = _rng(self.seed, _INIT_STREAM)
        self._lists = [rng.permutation(m) for m in self._members]
        self._pointers = [0] * len(self._lists)

    def __len__(self) -> int:
        """Batches of the epoch the next ``iter()`` builds (a pre-epoch has its own count)."""
        if self._in_pre_epochs():
            chunks = sum(min(max(len(m) // self.num_instance, 1), self.batch_size) for m in self._members)
            return math.ceil(chunks * self.num_instance / self.batch_size)
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Use ``(seed, epoch)`` for the next ``iter()``; ``epoch`` must be >= 0."""
        self.epoch = _check_epoch(epoch)

    def _in_pre_epochs(self) -> bool:
        return self.epoch - self.first_epoch < self.pre_epochs

    def _pre_epoch_batches(self, rng: np.random.Generator) -> list[list[int]]:
        """Official v2.0 ``random_index()`` order, cut into batches as its DataLoader did.

        Per class (in class order): its images (sorted), padded when fewer than K = ``num_instance`` by
        ``rng.choice(images, K - n, replace=True)``; ``rng.permutation`` of them; keep the first
        ``min(max(n // K, 1), batch_size) * K`` (the official cap is ``batch_size`` chunks, not images).
        All K-chunks of all classes are put in ``rng.permutation`` order and flattened; consecutive
        ``batch_size`` images form a batch and the last, shorter batch is kept (``drop_last=False``).
        """
        K = self.num_instance
        chunks = []
        for members in self._members:
            index = members
            if len(members) < K:
                index = np.concatenate([members, rng.choice(members, K - len(members), replace=True)])
            keep = min(max(len(members) // K, 1), self.batch_size) * K
            chunks.append(rng.permutation(index)[:keep].reshape(-1, K))
        chunks = np.concatenate(chunks)
        flat = chunks[rng.permutation(len(chunks))].ravel().tolist()
        return [flat[i : i + self.batch_size] for i in range(0, len(flat), self.batch_size)]

    def _distances(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Representative image per class and the raw [P, P] class distances."""
        P = len(self.classes)
        counts = np.array([len(m) for m in self._members])
        reps = np.array([m[i] for m, i in zip(self._members, rng.integers(0, counts), strict=True)])
        if self.distance_fn is None:
            return reps, rng.random((P, P))
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
        return reps, dist

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

    def _save(self, reps: np.ndarray, raw: np.ndarray, dist: np.ndarray, neighbours: np.ndarray) -> None:
        arrays = {
            "classes": self.classes,
            "rep_indices": reps.astype(np.int64),
            "raw_dist": raw,
            "dist": dist,
            "neighbours": neighbours.astype(np.int64),
            "epoch": np.int64(self.epoch - self.first_epoch),
        }
        name = f"gs{self.epoch - self.first_epoch}.npz"
        atomic_write(self.save_dir / name, lambda f: np.savez_compressed(f, **arrays))

    def __iter__(self) -> Iterator[list[int]]:
        rng = _rng(self.seed, _EPOCH_STREAM, self.epoch)
        if self._in_pre_epochs():
            self.last_neighbours = None
            self.epoch += 1
            return iter(self._pre_epoch_batches(rng))
        reps, raw = self._distances(rng)
        dist = rerank_class_distances(raw) if self.rerank else raw
        neighbours = self._neighbours(np.array(dist, dtype=np.float64))
        if self.save_dir is not None:
            self._save(reps, raw, dist, neighbours)
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
        self.epoch = _check_epoch(epoch)

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


class ShuffledBatchSampler(Sampler[list[int]]):
    """v1.x training order: ``DataLoader(shuffle=True, drop_last=True)`` as a batch sampler.

    Each epoch a random permutation of ``range(num_samples)`` is cut into ``num_samples // batch_size``
    full batches; the remainder is dropped. Official batch sizes: 32 (v1.0), 8 (v1.1, v1.2).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_samples) < int(batch_size):
            raise ValueError(f"num_samples ({num_samples}) must be at least batch_size ({batch_size}): drop_last "
                             "would leave no batch")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = _check_seed(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Use ``(seed, epoch)`` for the next ``iter()``; ``epoch`` must be >= 0."""
        self.epoch = _check_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = _rng(self.seed, _EPOCH_STREAM, self.epoch)
        order = rng.permutation(self.num_samples)[: len(self) * self.batch_size]
        self.epoch += 1
        return iter(order.reshape(-1, self.batch_size).tolist())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("num_samples", self.num_samples)) != self.num_samples:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples, this sampler has {self.num_samples}"
            )
        self.epoch = int(state["epoch"])
        self.seed = int(state.get("seed", self.seed))
