"""Image loading: a torch Dataset over records with robust decoding to RGB."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import QAConvError
from .records import Record


def read_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB (grayscale, palette, RGBA, 16-bit and CMYK converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.point(lambda v: v / 256).convert("L")
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise QAConvError(f"cannot read image {path}: {exc}") from None


class ImageDataset(torch.utils.data.Dataset):
    """Yields (image tensor, label, camid, index) for each record; label is the record's pid."""

    def __init__(self, records: Sequence[Record], transform: Callable):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        return self.transform(read_rgb(rec.path)), rec.pid, rec.camid, index
