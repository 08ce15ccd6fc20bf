"""Feature-map extraction in batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.images import ImageDataset
from ..data.records import Record
from ..data.transforms import eval_transform
from ..matching import pick_device
from ..progress import progress_bar


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    records: Sequence[Record],
    height: int,
    width: int,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """Feature maps [N, C, h, w] (float32, CPU) of ``records`` in order, model in eval mode."""
    dev = pick_device(device)
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        ImageDataset(records, eval_transform(height, width)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
    )
    chunks = []
    bar = progress_bar(total=len(records), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for images, *_ in loader:
            images = images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                chunks.append(model(images).float().cpu().contiguous())
            bar.update(len(images))
    finally:
        bar.close()
        model.train(was_training)
    if not chunks:
        raise ValueError("no images to extract features from")
    return torch.cat(chunks)
