"""All-pairs matching engine: tiled, memory-bounded QAConv / PooledCosine scoring with a folded eval head.

:class:`Matcher` computes the ``[P, G]`` logits of a QAConv (versions "2.1" and "1") or PooledCosine head
without ever materialising the ``[P, G, HW, HW]`` similarity tensor. The probe and gallery sets are cut into
blocks of ``p`` probe and ``g`` gallery images; one tile is a single matrix product
``[p*HW, C] x [C, g*HW]`` written into a reused buffer, followed by the two max-reductions (over the gallery
locations and over the probe locations) on that tile. Only the pooled ``[p, HW, g]`` / ``[p, g, HW]`` maxima
leave the tile. ``p`` and ``g`` are chosen from the ``memory`` budget (bytes, default 256 MB): the largest
roughly square tile whose similarity buffer plus pooled maxima fit in it (at 24x8 maps and fp32, one pair
costs 147 KB, so the default tile is about 41x41 images). Larger tiles run faster on the CPU here (the
matrix product dominates and the reductions amortise better), so the default uses the whole budget. The
budget bounds the working set beyond the inputs; the engine also keeps one transposed copy of each input
(``[P*HW, C]`` and ``[C, G*HW]``), the output ``[P, G]`` (``scores``) or ``[P, k]`` (``topk``). All cores
are used through torch's intra-op thread pool (matrix products and reductions); the engine does not
change the thread count.

Eval-mode fold (exact up to float rounding). With a BatchNorm1d(1) in eval mode being the scalar affine
map ``bn(x) = a*x + b`` (``a = gamma / sqrt(running_var + eps)``, ``b = beta - a*running_mean``), and
``A_l`` / ``B_l`` the pooled maxima indexed by probe / gallery location ``l``:

* v2.1: ``fc`` (weight ``w``, bias ``c``) is applied to each direction and the two are summed, so
  ``s = sum_l w_l (a A_l + b) + c + sum_l w_l (a B_l + b) + c = a * sum_l w_l (A_l + B_l) + 2 (b sum(w) + c)``
  and ``logit = a2 * s + b2``, i.e. ``logit = alpha * sum_l w_l (A_l + B_l) + beta`` with
  ``alpha = a2 * a`` and ``beta = a2 * 2 (b sum(w) + c) + b2``.
* v1: ``fc`` sees ``[bn(B), bn(A)]`` with weights ``[wB, wA]``: ``logit = alpha * (wA.A + wB.B) + beta`` with
  ``alpha = a2 * a`` and ``beta = a2 * (b sum(w) + c) + b2``.
* PooledCosine: ``logit = a2 * cos(GAP(prob), GAP(gal)) + b2``.

In the original head ``bn`` is applied to the already max-pooled values, so the fold needs no condition on
the sign of ``a``: max-pooling is done on raw similarities in both formulations (tested with ``a < 0``).

If the head is in training mode (or a BatchNorm has no running statistics, so it would use batch
statistics even in eval mode) nothing can be folded: the engine falls back to the head's own ``forward``
on blocks of ``p x g`` images. Batch statistics are then those of each block, not of the whole call, and
training-mode BatchNorms update their running statistics once per block, as the head's forward does.

Self-matching: for the symmetric v2.1 head ``scores(x, x)`` (same tensor object) and ``self_scores(x)``
compute each block pair once (upper-triangular square blocks) and mirror the result, about half the work.

Precision: fp32 on the CPU (reduced precision matmul is very slow on CPUs without AVX-512 BF16/FP16).
On CUDA the input copies are cast to fp16 once (what ``torch.autocast`` would do to every tile product) and
the folded weighted sums run in fp32. The CUDA path has not been run in this repository's tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .models.pooled import PooledCosine
from .models.qaconv import QAConv
from .progress import progress_bar

DEFAULT_MEMORY = 256 * 2**20  # bytes for one tile's working set


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, or CUDA when available, else CPU. A device that is not there (a bad name, CUDA
    on a machine without it, a GPU index past the last) is refused in one line naming what is available."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    there = "cpu" + (f", cuda:0 .. cuda:{count - 1}" if count else " (no CUDA device on this machine)")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; available: {there}") from None
    if dev.type == "cuda" and (count == 0 or (dev.index or 0) >= count):
        raise ValueError(f"device {device!r} is not available; available: {there}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; available: {there}")
    return dev


def _scalar(t: Tensor) -> float:
    return float(t.detach().double().reshape(-1)[0])


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[float, float] | None:
    """``(a, b)`` with ``bn(x) == a*x + b`` in eval mode, or None when ``bn`` would use batch statistics."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    inv = 1.0 / math.sqrt(_scalar(bn.running_var) + bn.eps)
    gamma = _scalar(bn.weight) if bn.weight is not None else 1.0
    beta = _scalar(bn.bias) if bn.bias is not None else 0.0
    a = gamma * inv
    return a, beta - a * _scalar(bn.running_mean)


def fold_head(head: nn.Module) -> dict | None:
    """Folded eval-mode parameters of a QAConv or PooledCosine head, or None when it cannot be folded.

    QAConv: ``{"kind": "qaconv", "w_probe": [HW], "w_gallery": [HW], "alpha", "beta", "symmetric"}`` with
    ``logit = alpha * (w_probe . A + w_gallery . B) + beta``; PooledCosine: ``{"kind": "pooled", "alpha",
    "beta"}`` with ``logit = alpha * cosine + beta``. Weights are float64 CPU tensors.
    """
    if head.training:
        return None
    if isinstance(head, PooledCosine):
        ab = _bn_affine(head.logit_bn)
        return None if ab is None else {"kind": "pooled", "alpha": ab[0], "beta": ab[1], "symmetric": True}
    if isinstance(head, QAConv):
        ab, ab2 = _bn_affine(head.bn), _bn_affine(head.logit_bn)
        if ab is None or ab2 is None:
            return None
        (a, b), (a2, b2) = ab, ab2
        w = head.fc.weight.detach().double().reshape(-1).cpu()
        c = _scalar(head.fc.bias) if head.fc.bias is not None else 0.0
        if head.version == "2.1":
            w_probe = w_gallery = w
            beta = a2 * 2.0 * (b * float(w.sum()) + c) + b2
        else:  # fc input is [bn(B) (gallery-indexed), bn(A) (probe-indexed)]
            w_gallery, w_probe = w[: head.hw], w[head.hw :]
            beta = a2 * (b * float(w.sum()) + c) + b2
        return {
            "kind": "qaconv",
            "w_probe": w_probe,
            "w_gallery": w_gallery,
            "alpha": a2 * a,
            "beta": beta,
            "symmetric": head.version == "2.1",
        }
    return None


def block_sizes(per_pair: float, num_p: int, num_g: int, memory: int) -> tuple[int, int]:
    """Largest roughly square tile ``(p, g)`` with ``p*g*per_pair <= memory`` (at least 1x1), clamped to the sets."""
    pairs = max(1, int(memory // max(per_pair, 1.0)))
    side = max(1, math.isqrt(pairs))
    p = min(max(num_p, 1), side)
    g = min(max(num_g, 1), max(1, pairs // p))  # a short probe side leaves room for more gallery images
    if g == max(num_g, 1) and p < num_p:
        p = min(num_p, max(p, pairs // g))
    return p, g


class Matcher:
    """Tiled all-pairs scoring of a QAConv / PooledCosine head: ``scores``, ``self_scores``, ``topk``.

    ``head``: a :class:`QAConv` or :class:`PooledCosine`. ``device``: where the tiles run (default: CUDA when
    available, else CPU); results are float32 CPU tensors. ``memory``: bytes for one tile's working set
    (default 256 MB); it sets the block sizes (see the module docstring). In eval mode the head is folded
    once per call into a weighted sum of the pooled maxima; in training mode the engine runs the head's
    own forward on blocks (per-block batch statistics). ``shard=(rank, world)`` computes only every
    ``world``-th tile from ``rank`` on and leaves zeros elsewhere (``scores`` / ``self_scores``), so a sum over
    the ranks gives exactly the unsharded result (see :mod:`qaconv.engine.distributed`).
    """

    def __init__(
        self,
        head: nn.Module,
        device: str | torch.device | None = None,
        memory: int | None = None,
        shard: tuple[int, int] | None = None,
    ):
        if not isinstance(head, (QAConv, PooledCosine)):
            raise TypeError(f"Matcher needs a QAConv or PooledCosine head, got {type(head).__name__}")
        self.head = head
        self.device = pick_device(device)
        self.memory = int(DEFAULT_MEMORY if memory is None else memory)
        if self.memory < 1:
            raise ValueError(f"memory budget must be positive, got {self.memory}")
        self.shard = shard

    # -- public API ------------------------------------------------------------------------------------------
    def scores(self, prob_maps: Tensor, gal_maps: Tensor, progress: bool = False) -> Tensor:
        """Logits ``[P, G]`` (float32, CPU) for every probe x gallery pair."""
        if prob_maps is gal_maps:
            return self.self_scores(prob_maps, progress=progress)
        out = self._output(len(prob_maps), len(gal_maps))
        for p0, g0, block in self._blocks(prob_maps, gal_maps, progress=progress):
            out[p0 : p0 + block.shape[0], g0 : g0 + block.shape[1]] = block
        return out

    def self_scores(self, maps: Tensor, progress: bool = False) -> Tensor:
        """Logits ``[N, N]`` of ``maps`` against itself; each block pair once when the head is symmetric."""
        fold = fold_head(self.head)
        if fold is None or not fold["symmetric"]:
            out = self._output(len(maps), len(maps))
            for p0, g0, block in self._blocks(maps, maps, progress=progress):
                out[p0 : p0 + block.shape[0], g0 : g0 + block.shape[1]] = block
            return out
        n = len(maps)
        out = self._output(n, n)
        for p0, g0, block in self._blocks(maps, maps, progress=progress, upper=True, fold=fold):
            out[p0 : p0 + block.shape[0], g0 : g0 + block.shape[1]] = block
            if g0 != p0:
                out[g0 : g0 + block.shape[1], p0 : p0 + block.shape[0]] = block.t()
        return out

    def topk(self, prob_maps: Tensor, gal_maps: Tensor, k: int, progress: bool = False) -> tuple[Tensor, Tensor]:
        """The ``k`` best gallery items per probe: ``(scores [P, k] float32, indices [P, k] int64)``, descending.

        Streams over gallery blocks, keeping a running top-k per probe block: memory O(P*k) beyond the inputs
        and one tile. Scores are exact (the same tile computation as :meth:`scores`).
        """
        if self.shard is not None:
            raise ValueError("topk does not support a sharded Matcher; shard the probes instead")
        num_p, num_g = len(prob_maps), len(gal_maps)
        if not 1 <= k <= num_g:
            raise ValueError(f"k must be in [1, {num_g}] (the gallery size), got {k}")
        top_s = torch.full((num_p, k), -math.inf, dtype=torch.float32)
        top_i = torch.zeros((num_p, k), dtype=torch.int64)
        for p0, g0, block in self._blocks(prob_maps, gal_maps, progress=progress):
            rows = slice(p0, p0 + block.shape[0])
            idx = torch.arange(g0, g0 + block.shape[1], dtype=torch.int64).expand(block.shape[0], -1)
            cand_s = torch.cat((top_s[rows], block), dim=1)
            cand_i = torch.cat((top_i[rows], idx), dim=1)
            best_s, pos = cand_s.topk(k, dim=1)
            top_s[rows], top_i[rows] = best_s, cand_i.gather(1, pos)
        return top_s, top_i

    # -- tiles -----------------------------------------------------------------------------------------------
    def _output(self, rows: int, cols: int) -> Tensor:
        """The float32 [rows, cols] result buffer; zeros when sharded (other ranks' tiles stay 0)."""
        make = torch.empty if self.shard is None else torch.zeros
        return make(rows, cols, dtype=torch.float32)

    def _compute_dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.float32

    @torch.inference_mode()
    def _blocks(self, prob: Tensor, gal: Tensor, progress: bool = False, upper: bool = False, fold=None):
        """Yield ``(p0, g0, scores [p, g] float32 CPU)`` tile by tile (upper: only ``g0 >= p0``, square tiles)."""
        if fold is None:
            fold = fold_head(self.head)
        if fold is None:
            yield from self._blocks_forward(prob, gal, progress, upper)
        elif fold["kind"] == "pooled":
            yield from self._blocks_pooled(prob, gal, fold, progress, upper)
        else:
            yield from self._blocks_qaconv(prob, gal, fold, progress, upper)

    def _steps(self, num_p: int, num_g: int, p: int, g: int, upper: bool, progress: bool):
        if upper:
            p = g = min(p, g)
        steps = [(i, j) for i in range(0, num_p, p) for j in range(0, num_g, g) if not upper or j >= i]
        if self.shard is not None:
            steps = steps[self.shard[0] :: self.shard[1]]
        return p, g, progress_bar(steps, desc="matching", unit="blocks", disable=not progress, leave=False)

    def _blocks_qaconv(self, prob: Tensor, gal: Tensor, fold: dict, progress: bool, upper: bool):
        head: QAConv = self.head
        hw, dev, dtype = head.hw, self.device, self._compute_dtype()
        num_p, num_g = len(prob), len(gal)
        # one transposed copy of each input: probe rows [P*HW, C], gallery columns [C, G*HW]
        pt = head._flatten(prob, "probe").to(dev, dtype).transpose(1, 2).reshape(num_p * hw, -1).contiguous()
        gt = head._flatten(gal, "gallery").to(dev, dtype).permute(1, 0, 2).reshape(-1, num_g * hw).contiguous()
        w_probe = fold["w_probe"].to(dev, torch.float32)
        w_gallery = fold["w_gallery"].to(dev, torch.float32)
        alpha, beta = fold["alpha"], fold["beta"]
        es = torch.empty((), dtype=dtype).element_size()
        per_pair = hw * hw * es + 2 * hw * 4  # similarity tile + the two pooled maxima (fp32)
        p, g, steps = self._steps(num_p, num_g, *block_sizes(per_pair, num_p, num_g, self.memory), upper, progress)
        buf = torch.empty(p * hw * g * hw, dtype=dtype, device=dev) if dev.type == "cpu" else None
        for p0, g0 in steps:
            pb, gb = min(p, num_p - p0), min(g, num_g - g0)
            a_mat = pt[p0 * hw : (p0 + pb) * hw]
            b_mat = gt[:, g0 * hw : (g0 + gb) * hw]
            if buf is not None:
                sim = buf[: pb * hw * gb * hw].view(pb * hw, gb * hw)
                torch.mm(a_mat, b_mat, out=sim)
            else:  # CUDA: the copies are already fp16, so this is what autocast would run
                sim = a_mat @ b_mat
            sim = sim.view(pb, hw, gb, hw)
            best_gal = sim.amax(dim=3).float()  # A: [pb, HW probe, gb], best over gallery locations
            best_prob = sim.amax(dim=1).float()  # B: [pb, gb, HW gallery], best over probe locations
            score = torch.matmul(w_probe, best_gal) + torch.matmul(best_prob, w_gallery)  # [pb, gb]
            yield p0, g0, (score * alpha + beta).cpu()

    def _blocks_pooled(self, prob: Tensor, gal: Tensor, fold: dict, progress: bool, upper: bool):
        dev = self.device
        ep = PooledCosine.embed(prob.to(dev, torch.float32))
        eg = PooledCosine.embed(gal.to(dev, torch.float32))
        num_p, num_g = len(ep), len(eg)
        p, g, steps = self._steps(num_p, num_g, *block_sizes(4.0, num_p, num_g, self.memory), upper, progress)
        for p0, g0 in steps:
            cos = ep[p0 : p0 + p] @ eg[g0 : g0 + g].t()
            yield p0, g0, (cos * fold["alpha"] + fold["beta"]).float().cpu()

    def _blocks_forward(self, prob: Tensor, gal: Tensor, progress: bool, upper: bool):
        """Fallback: the head's own forward on blocks (training mode or unfoldable BatchNorm)."""
        head, dev = self.head, self.device
        if isinstance(head, QAConv):  # forward materialises sim [p,g,HW,HW] plus its pooled maxima
            per_pair = head.hw * head.hw * 4 + 4 * head.hw * 4
        else:
            per_pair = 4.0
        num_p, num_g = len(prob), len(gal)
        p, g, steps = self._steps(num_p, num_g, *block_sizes(per_pair, num_p, num_g, self.memory), upper, progress)
        for p0, g0 in steps:
            pc = prob[p0 : p0 + p].to(dev, non_blocking=True)
            gc = gal[g0 : g0 + g].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                yield p0, g0, head(pc, gc).float().cpu()


@torch.inference_mode()
def pairwise_scores(
    matcher: torch.nn.Module,
    prob: torch.Tensor,
    gal: torch.Tensor,
    prob_batch: int = 128,
    gal_batch: int = 128,
    device: str | torch.device | None = None,
    progress: bool = False,
    memory: int | None = None,
    shard: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits [P, G] (float32, CPU) of ``matcher`` over all probe x gallery pairs, chunk by chunk.

    The matcher runs in eval mode and its mode is restored afterwards. A :class:`QAConv` or
    :class:`PooledCosine` matcher goes through the tiled :class:`Matcher` engine (folded head, tile sizes
    from the ``memory`` budget in bytes, default 256 MB; ``prob_batch`` / ``gal_batch`` are then not
    used, and ``prob is gal`` takes the symmetric self-matching path). Any other module is called on
    ``prob_batch x gal_batch`` chunks. On CUDA the chunks are matched in fp16 autocast; on CPU in fp32.
    ``shard=(rank, world)``: only this rank's share of the tiles / chunks, zeros elsewhere (see :class:`Matcher`).
    """
    if prob_batch < 1 or gal_batch < 1:
        raise ValueError(f"chunk sizes must be positive, got {prob_batch}, {gal_batch}")
    dev = pick_device(device)
    was_training = matcher.training
    matcher.eval()
    try:
        if isinstance(matcher, (QAConv, PooledCosine)):
            return Matcher(matcher, dev, memory=memory, shard=shard).scores(prob, gal, progress=progress)
        out = (torch.empty if shard is None else torch.zeros)(len(prob), len(gal), dtype=torch.float32)
        steps = [(p, g) for p in range(0, len(prob), prob_batch) for g in range(0, len(gal), gal_batch)]
        if shard is not None:
            steps = steps[shard[0] :: shard[1]]
        for p, g in progress_bar(steps, desc="matching", unit="blocks", disable=not progress, leave=False):
            pc = prob[p : p + prob_batch].to(dev, non_blocking=True)
            gc = gal[g : g + gal_batch].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                out[p : p + prob_batch, g : g + gal_batch] = matcher(pc, gc).float().cpu()
    finally:
        matcher.train(was_training)
    return out
