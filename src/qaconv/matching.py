"""All-pairs matching in chunks: memory is bounded by the chunk sizes, not by the set sizes."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, or CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def pairwise_scores(
    matcher: torch.nn.Module,
    prob: torch.Tensor,
    gal: torch.Tensor,
    prob_batch: int = 128,
    gal_batch: int = 128,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Logits [P, G] (float32, CPU) of ``matcher`` over all probe x gallery pairs, chunk by chunk.

    The matcher runs in eval mode and its mode is restored afterwards. On CUDA the chunks are
    matched in fp16 autocast; on CPU in fp32.
    """
    if prob_batch < 1 or gal_batch < 1:
        raise ValueError(f"chunk sizes must be positive, got {prob_batch}, {gal_batch}")
    dev = pick_device(device)
    was_training = matcher.training
    matcher.eval()
    out = torch.empty(len(prob), len(gal), dtype=torch.float32)
    steps = [(p, g) for p in range(0, len(prob), prob_batch) for g in range(0, len(gal), gal_batch)]
    try:
        for p, g in tqdm(steps, desc="matching", disable=not progress, leave=False):
            pc = prob[p : p + prob_batch].to(dev, non_blocking=True)
            gc = gal[g : g + gal_batch].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                out[p : p + prob_batch, g : g + gal_batch] = matcher(pc, gc).float().cpu()
    finally:
        matcher.train(was_training)
    return out
