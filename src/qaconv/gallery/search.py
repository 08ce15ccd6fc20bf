"""Two-stage retrieval: a cheap pooled-cosine shortlist, then exact QAConv re-scoring of the shortlist.

Stage 1 ranks the whole gallery for every probe by the cosine similarity of global-average-pooled,
L2-normalised maps (:meth:`PooledCosine.embed`) and keeps the ``candidates`` (M) best gallery items per
probe. It uses faiss-cpu's exact ``IndexFlatIP`` when faiss is installed (imported lazily), otherwise a
torch matrix product in gallery blocks with a running top-M per probe (memory O(P*M) beyond one block).

Stage 2 re-scores each probe's M candidates with the QAConv head in eval mode (the folded head of
:func:`qaconv.matching.fold_head`): for a tile of probes x candidates the candidate gallery maps are
gathered and one batched product ``[p, HW, C] x [p, C, m*HW]`` gives all their local similarities, followed
by the two max-reductions and the folded weighted sum. The tile comes from the ``memory`` budget, capped
at 8 MB: larger tiles measured slower on the CPU here (gather and reductions fall out of cache). The top
``k`` by QAConv score are returned; scores are exact QAConv logits (equal to :class:`Matcher`'s up to
float rounding). With ``candidates >= G`` the search is exhaustive and simply runs :meth:`Matcher.topk`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..matching import DEFAULT_MEMORY, Matcher, fold_head, pick_device
from ..models.pooled import PooledCosine
from ..models.qaconv import QAConv

FIRST_STAGE_BLOCK = 4096  # gallery items per block of the torch first stage
RESCORE_TILE_BYTES = 8 * 2**20  # cap on one re-scoring tile (larger tiles measured slower on CPU)


def _import_faiss(use_faiss: bool | None):
    """The faiss module, or None (use_faiss False, or None and faiss missing); ImportError when required."""
    if use_faiss is False:
        return None
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:
        if use_faiss:
            raise ImportError("use_faiss=True needs faiss-cpu (pip install faiss-cpu); it is not installed") from exc
        return None
    return faiss


@torch.inference_mode()
def pooled_candidates(
    prob_maps: Tensor,
    gal_maps: Tensor,
    m: int,
    device: str | torch.device | None = None,
    use_faiss: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """First stage: ``(cosines [P, m], indices [P, m] int64)`` of the ``m`` best gallery items by pooled cosine.

    Descending per probe. faiss ``IndexFlatIP`` when available and ``use_faiss`` is not False, else torch.
    """
    num_g = len(gal_maps)
    if not 1 <= m <= num_g:
        raise ValueError(f"m must be in [1, {num_g}] (the gallery size), got {m}")
    faiss = _import_faiss(use_faiss)
    dev = pick_device(device)
    ep = PooledCosine.embed(prob_maps.to(dev, torch.float32))
    eg = PooledCosine.embed(gal_maps.to(dev, torch.float32))
    if faiss is not None:
        index = faiss.IndexFlatIP(eg.shape[1])
        index.add(eg.cpu().numpy())
        d, i = index.search(ep.cpu().numpy(), m)
        return torch.from_numpy(d).float(), torch.from_numpy(i).long()
    num_p = len(ep)
    top_s = torch.full((num_p, m), -math.inf, dtype=torch.float32, device=dev)
    top_i = torch.zeros((num_p, m), dtype=torch.int64, device=dev)
    step = max(FIRST_STAGE_BLOCK, m)
    for g0 in range(0, num_g, step):
        block = ep @ eg[g0 : g0 + step].t()  # [P, gb]
        idx = torch.arange(g0, g0 + block.shape[1], device=dev).expand(num_p, -1)
        cand_s, cand_i = torch.cat((top_s, block), dim=1), torch.cat((top_i, idx), dim=1)
        top_s, pos = cand_s.topk(m, dim=1)
        top_i = cand_i.gather(1, pos)
    return top_s.cpu(), top_i.cpu()


def _rescore_folded(head: QAConv, fold: dict, prob: Tensor, gal: Tensor, cand: Tensor, dev, memory: int) -> Tensor:
    """Exact folded QAConv logits ``[P, M]`` of each probe against its own candidates ``cand [P, M]``."""
    hw, c = head.hw, head.num_features
    num_p, m = cand.shape
    pf = head._flatten(prob, "probe")  # [P, C, HW]
    gf = head._flatten(gal, "gallery")  # [G, C, HW]
    w_probe = fold["w_probe"].to(dev, torch.float32)
    w_gallery = fold["w_gallery"].to(dev, torch.float32)
    # gathered candidates (gather + transposed copy) + similarities + the two pooled maxima, per pair (fp32)
    per_pair = 4 * (2 * c * hw + hw * hw + 2 * hw)
    pairs = max(1, int(min(memory, RESCORE_TILE_BYTES) // per_pair))  # small tiles stay in cache: faster
    pb = max(1, min(num_p, pairs // m))  # probes per block ...
    mc = max(1, min(m, pairs // pb))  # ... and candidates per block
    out = torch.empty(num_p, m, dtype=torch.float32)
    for p0 in range(0, num_p, pb):
        a = pf[p0 : p0 + pb].to(dev, torch.float32).transpose(1, 2)  # [n, HW, C]
        n = len(a)
        for c0 in range(0, m, mc):
            idx = cand[p0 : p0 + n, c0 : c0 + mc]
            mb = idx.shape[1]
            b = gf[idx.reshape(-1)].to(dev, torch.float32).view(n, mb, c, hw)
            b = b.permute(0, 2, 1, 3).reshape(n, c, mb * hw)  # [n, C, mb*HW]
            sim = torch.bmm(a, b).view(n, hw, mb, hw)
            best_gal = sim.amax(dim=3)  # [n, HW probe, mb]
            best_prob = sim.amax(dim=1)  # [n, mb, HW gallery]
            score = torch.matmul(w_probe, best_gal) + torch.matmul(best_prob, w_gallery)
            out[p0 : p0 + n, c0 : c0 + mb] = (score * fold["alpha"] + fold["beta"]).cpu()
    return out


def _rescore(head: nn.Module, prob: Tensor, gal: Tensor, cand: Tensor, dev, memory: int) -> Tensor:
    """Exact eval-mode logits ``[P, M]`` of each probe against its candidates."""
    fold = fold_head(head)
    if fold is not None and fold["kind"] == "qaconv":
        return _rescore_folded(head, fold, prob, gal, cand, dev, memory)
    if fold is not None:  # PooledCosine: alpha * cosine + beta
        ep = PooledCosine.embed(prob.to(dev, torch.float32))
        eg = PooledCosine.embed(gal.to(dev, torch.float32))
        cos = (ep.unsqueeze(1) * eg[cand.to(dev)]).sum(dim=2)
        return (cos * fold["alpha"] + fold["beta"]).float().cpu()
    # unfoldable (BatchNorm without running statistics): the head's own forward, one probe at a time
    out = torch.empty(cand.shape, dtype=torch.float32)
    for i in range(len(prob)):
        out[i] = head(prob[i : i + 1].to(dev), gal[cand[i]].to(dev)).float().cpu()[0]
    return out


@torch.inference_mode()
def two_stage_topk(
    head: nn.Module,
    prob_maps: Tensor,
    gal_maps: Tensor,
    k: int = 10,
    candidates: int = 100,
    device: str | torch.device | None = None,
    memory: int | None = None,
    use_faiss: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` gallery items per probe: ``(scores [P, k] float32, indices [P, k] int64)``, descending.

    ``head``: a :class:`QAConv` (or :class:`PooledCosine`), run in eval mode (its mode is restored).
    ``candidates`` (M >= k): shortlist size of the pooled-cosine first stage; ``M >= G`` is exhaustive and
    equals :meth:`Matcher.topk` exactly. ``memory``: bytes for one re-scoring block (default 256 MB).
    ``use_faiss``: None = faiss when installed else torch; True = faiss (ImportError if missing); False =
    torch. Scores are exact eval-mode QAConv logits of the returned pairs.
    """
    if not isinstance(head, (QAConv, PooledCosine)):
        raise ValueError(f"two_stage_topk needs a QAConv or PooledCosine head, got {type(head).__name__}")
    for name, maps in (("prob_maps", prob_maps), ("gal_maps", gal_maps)):
        if not isinstance(maps, Tensor) or maps.dim() != 4:
            raise ValueError(f"{name} must be a [N, C, H, W] tensor, got {getattr(maps, 'shape', type(maps))}")
    if prob_maps.shape[1:] != gal_maps.shape[1:]:
        raise ValueError(f"probe and gallery maps differ: {list(prob_maps.shape)} vs {list(gal_maps.shape)}")
    num_g = len(gal_maps)
    if num_g == 0:
        raise ValueError("the gallery is empty")
    if not isinstance(k, int) or not 1 <= k <= num_g:
        raise ValueError(f"k must be an int in [1, {num_g}] (the gallery size), got {k!r}")
    if not isinstance(candidates, int) or candidates < k:
        raise ValueError(f"candidates must be an int >= k ({k}), got {candidates!r}")
    memory = int(DEFAULT_MEMORY if memory is None else memory)
    if memory < 1:
        raise ValueError(f"memory budget must be positive, got {memory}")
    if use_faiss not in (None, True, False):
        raise ValueError(f"use_faiss must be None, True or False, got {use_faiss!r}")
    if use_faiss:
        _import_faiss(True)  # fail early and clearly, even on the exhaustive path
    dev = pick_device(device)
    was_training = head.training
    head.eval()
    try:
        if candidates >= num_g:
            return Matcher(head, dev, memory=memory).topk(prob_maps, gal_maps, k)
        if len(prob_maps) == 0:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
        _, cand = pooled_candidates(prob_maps, gal_maps, candidates, device=dev, use_faiss=use_faiss)
        scores = _rescore(head, prob_maps, gal_maps, cand, dev, memory)
        top_s, pos = scores.topk(k, dim=1)
        return top_s, cand.gather(1, pos)
    finally:
        head.train(was_training)


@torch.inference_mode()
def two_stage_scores(
    head: nn.Module,
    prob_maps: Tensor,
    gal_maps: Tensor,
    candidates: int,
    device: str | torch.device | None = None,
    memory: int | None = None,
) -> tuple[Tensor, Tensor]:
    """A dense ``[P, G]`` score matrix for evaluation from two-stage search, and the candidate mask.

    Each probe's ``candidates`` (M) best gallery items by pooled cosine hold their exact QAConv logits;
    every other item is ranked below all of that probe's candidates, in pooled-cosine order:
    ``min(candidate logits) - 1 - (1 - cosine)``. So the top M of each row is QAConv's ranking of the
    shortlist and the tail is the first stage's ranking, and metrics over the whole gallery stay defined.
    ``M >= G`` gives exactly :meth:`Matcher.scores`. Returns ``(scores float32 [P, G], mask bool [P, G])``.

    Example::

        scores, shortlisted = two_stage_scores(head, query_maps, gallery_maps, candidates=400)
    """
    num_p, num_g = len(prob_maps), len(gal_maps)
    if not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be a positive int, got {candidates!r}")
    memory = int(DEFAULT_MEMORY if memory is None else memory)
    dev = pick_device(device)
    was_training = head.training
    head.eval()
    try:
        if candidates >= num_g or num_p == 0:
            scores = Matcher(head, dev, memory=memory).scores(prob_maps, gal_maps)
            return scores, torch.ones(num_p, num_g, dtype=torch.bool)
        ep = PooledCosine.embed(prob_maps.to(dev, torch.float32))
        eg = PooledCosine.embed(gal_maps.to(dev, torch.float32))
        scores = torch.empty(num_p, num_g, dtype=torch.float32)
        cand = torch.empty(num_p, candidates, dtype=torch.int64)
        for p0 in range(0, num_p, FIRST_STAGE_BLOCK):
            cos = (ep[p0 : p0 + FIRST_STAGE_BLOCK] @ eg.t()).float()
            cand[p0 : p0 + len(cos)] = cos.topk(candidates, dim=1).indices.cpu()
            scores[p0 : p0 + len(cos)] = (cos - 2.0).cpu()  # -1 - (1 - cos); the row's minimum logit is added below
        exact = _rescore(head, prob_maps, gal_maps, cand, dev, memory)
        scores += exact.amin(dim=1, keepdim=True)
        scores.scatter_(1, cand, exact)
        mask = torch.zeros(num_p, num_g, dtype=torch.bool)
        mask.scatter_(1, cand, True)
        return scores, mask
    finally:
        head.train(was_training)
