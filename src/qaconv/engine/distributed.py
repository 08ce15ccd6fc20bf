"""Multi-process training and evaluation with ``torch.distributed`` (launched with ``torchrun``).

Nothing here starts a process group unless the launcher set ``WORLD_SIZE`` > 1; without one every helper
is the identity (or the plain single-process function), so single-process runs are unchanged.

* :func:`init_from_env` joins the group (NCCL on CUDA, one GPU per ``LOCAL_RANK``; gloo on CPU) and
  registers :func:`cleanup` at exit. :func:`rank`, :func:`world_size`, :func:`is_main`, :func:`barrier`.
* Training: every rank builds the same global batches (same sampler seed and epoch);
  :class:`ShardedBatchSampler` hands each rank a contiguous slice (:func:`split_batch` keeps the
  ``num_instance`` images of an identity together). :func:`gather_rows_with_grad` puts the global batch
  back together so the in-batch losses see exactly the single-process batch.
* Evaluation: :func:`extract_features_sharded` (whole batches per rank) and :func:`pairwise_scores_sharded`
  (every ``world``-th matching tile per rank, summed) return exactly the single-process tensors on every rank.

Example (inside a script started by ``torchrun --nproc_per_node 2 script.py``)::

    init_from_env("cpu")
    scores = pairwise_scores_sharded(matcher, q, g)  # the same [Q, G] tensor on every rank
    if is_main():
        print(scores.shape)
"""

from __future__ import annotations

import atexit
import inspect
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..errors import QAConvError
from ..matching import pairwise_scores, pick_device
from .features import extract_features


# -- process group -----------------------------------------------------------------------------------
def env_world_size() -> int:
    """``WORLD_SIZE`` set by the launcher (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise QAConvError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group described by torchrun's environment; True when running distributed.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1; idempotent. The backend is NCCL when
    ``device`` resolves to CUDA (each process then uses GPU ``LOCAL_RANK``), gloo otherwise.
    """
    if is_distributed():
        return True
    if env_world_size() <= 1:
        return False
    dev = pick_device(device)
    backend = "gloo"
    if dev.type == "cuda":
        if dev.index is not None:
            raise QAConvError(f"under torchrun pass --device cuda, not {dev} (each process uses GPU LOCAL_RANK)")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend)
    atexit.register(cleanup)
    return True


def cleanup() -> None:
    """Leave the process group (safe to call twice or when none was started)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generating a synthetic data set on first use), the others after it."""
    if is_distributed() and not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_distributed() and is_main():
            dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives run: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# -- splitting ---------------------------------------------------------------------------------------
def split_range(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous part of ``range(n)``; parts differ in length by at most one.

    >>> [split_range(5, r, 2) for r in range(2)]
    [slice(0, 2, None), slice(2, 5, None)]
    """
    return slice(n * rank // world, n * (rank + 1) // world)


def split_batch(batch: Sequence[int], rank: int, world: int, group: int = 1) -> list[int]:
    """This rank's contiguous slice of a global batch, cut between runs of ``group`` items where possible.

    The samplers put the ``num_instance`` images of one identity next to each other; with ``group`` =
    ``num_instance`` those runs stay on one rank as long as the batch holds at least ``world`` of them,
    otherwise the images are split evenly. Concatenating the slices of ranks 0..world-1 gives ``batch``.

    >>> split_batch([10, 11, 20, 21, 30, 31], 1, 2, group=2)
    [20, 21, 30, 31]
    """
    batch = list(batch)
    if group > 1 and len(batch) % group == 0 and len(batch) // group >= world:
        part = split_range(len(batch) // group, rank, world)
        return batch[part.start * group : part.stop * group]
    return batch[split_range(len(batch), rank, world)]


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Wraps a batch sampler that yields the same global batches on every rank; yields this rank's slices.

    ``set_epoch`` / ``state_dict`` stay on the wrapped sampler (it is the one checkpointed).
    """

    def __init__(self, sampler, rank: int, world: int, group: int = 1):
        self.sampler, self.rank, self.world, self.group = sampler, rank, world, group

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            yield split_batch(batch, self.rank, self.world, self.group)


# -- collectives ---------------------------------------------------------------------------------------
def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order (rows may differ per rank; no gradient).

    Ranks with no rows may pass any empty tensor; shape and dtype come from the ranks that have rows.
    """
    return _gather(x)[0] if is_distributed() else x


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    meta = [None] * world_size()
    dist.all_gather_object(meta, (len(x), tuple(x.shape[1:]), x.dtype) if len(x) else (0, None, None))
    sizes = [m[0] for m in meta]
    full = [m for m in meta if m[0]]
    if not full:
        return x, sizes
    _, tail, dtype = full[0]
    dev = _comm_device()
    pad = torch.zeros((max(sizes), *tail), dtype=dtype, device=dev)
    if len(x):
        pad[: len(x)] = x.to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    out_dev = x.device if len(x) else torch.device("cpu")
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(out_dev), sizes


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, sizes = _gather(x.detach())
        ctx.start, ctx.stop = sum(sizes[: rank()]), sum(sizes[: rank() + 1])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().to(_comm_device(), copy=True)
        dist.all_reduce(total)
        return total[ctx.start : ctx.stop].to(grad.device)


def gather_rows_with_grad(x: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_rows` that keeps the graph to this rank's rows.

    If every rank computes the same loss L of the gathered rows, this rank's rows receive world x dL/drows
    (the sum over ranks); DDP then averages parameter gradients over the ranks, which gives exactly the
    single-process gradient of L.
    """
    return _GatherRows.apply(x) if is_distributed() else x


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """Element-wise mean of ``values`` over the ranks: identical numbers on every rank."""
    return [v / world_size() for v in all_reduce_sum(values)]


def broadcast_buffers(*modules: torch.nn.Module) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics) to every rank."""
    if not is_distributed():
        return
    dev = _comm_device()
    for module in modules:
        for buf in module.buffers():
            t = buf.detach().to(dev, copy=True)
            dist.broadcast(t, src=0)
            buf.copy_(t.to(buf.device))


def wrap_ddp(module: torch.nn.Module, device: torch.device, broadcast_buffers: bool = True) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` when distributed and ``module`` has trainable parameters.

    ``broadcast_buffers=False``: buffers are not re-sent from rank 0 before every forward (for the class
    memory, which every rank updates identically anyway)."""
    if not is_distributed() or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    ddp_class = torch.nn.parallel.DistributedDataParallel
    # newer torch renamed the per-forward buffer broadcast (the old name warns); both sync once at init
    key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp_class).parameters else None
    return ddp_class(module, device_ids=ids, **{key or "broadcast_buffers": broadcast_buffers})


# -- sharded evaluation --------------------------------------------------------------------------------
def extract_features_sharded(model, records, height: int, width: int, batch_size: int = 64, **kw) -> torch.Tensor:
    """:func:`~qaconv.engine.features.extract_features` with the batches split over the ranks.

    Each rank extracts whole batches (the same batches a single process would), so the gathered
    result is bitwise the single-process one (on deterministic kernels); returned on every rank.
    """
    if not is_distributed():
        return extract_features(model, records, height, width, batch_size=batch_size, **kw)
    num_batches = -(-len(records) // batch_size)
    part = split_range(num_batches, rank(), world_size())
    mine = list(records)[part.start * batch_size : part.stop * batch_size]
    local = extract_features(model, mine, height, width, batch_size=batch_size, **kw) if mine else torch.empty(0)
    return all_gather_rows(local)


def pairwise_scores_sharded(matcher, prob: torch.Tensor, gal: torch.Tensor, *args, **kw) -> torch.Tensor:
    """:func:`~qaconv.matching.pairwise_scores` with the tiles split over the ranks.

    Each rank computes every ``world``-th tile (zeros elsewhere) and the partial matrices are summed,
    so every rank gets exactly the single-process scores. All ranks must call it with the same inputs.
    """
    if not is_distributed():
        return pairwise_scores(matcher, prob, gal, *args, **kw)
    out = pairwise_scores(matcher, prob, gal, *args, shard=(rank(), world_size()), **kw)
    total = out.to(_comm_device())
    dist.all_reduce(total)
    return total.to(out.device)
