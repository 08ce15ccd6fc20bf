"""Image loading: a torch Dataset over records with robust decoding to RGB.

Every image goes through :func:`read_rgb`, which converts grayscale, palette, RGBA/LA (alpha dropped),
16/32-bit integer, float and CMYK images to 8-bit RGB. A file that cannot be decoded (zero bytes,
truncated, not an image) raises :class:`QAConvError` naming the file, unless the dataset is built with
``skip_bad=True``: then it yields ``None`` and :func:`collate_skip_bad` drops it from the batch and
reports how many were dropped, which also works with DataLoader worker processes.

Which files count as images (``IMAGE_SUFFIXES``: .jpg .jpeg .png .bmp .webp .tif .tiff, any case) is defined
once in :mod:`qaconv.data.filetypes` and re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import QAConvError
from ..progress import progress_bar
from .filetypes import IMAGE_SUFFIXES, IMAGE_TYPES, check_image_file, describe_skipped, list_image_files  # noqa: F401
from .records import Record

# What PIL raises for unreadable files: OSError (incl. UnidentifiedImageError, truncation, missing file),
# SyntaxError (some plugins on broken headers), ValueError, and decompression bombs.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        img = img.point(lambda v: v / 256).convert("L")  # 0..65535 -> 0..255
    elif img.mode == "I":
        lo, hi = img.getextrema()
        # PNG 16-bit may come as mode I; values above 255 mean a 16-bit range
        img = img.point(lambda v: v / 256).convert("L") if hi > 255 or lo < 0 else img.convert("L")
    elif img.mode == "F":
        img = img.convert("L")
    return img.convert("RGB")


def read_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB (grayscale, palette, RGBA, 16-bit and CMYK converted).

    Raises :class:`QAConvError` naming the file when it cannot be read.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except _DECODE_ERRORS as exc:
        raise QAConvError(f"cannot read image {path}: {exc}") from None


class ImageDataset(torch.utils.data.Dataset):
    """Yields (image tensor, label, camid, index) for each record; label is the record's pid.

    With ``skip_bad=True`` an unreadable image yields ``None`` instead of raising; use
    :func:`collate_skip_bad` as the DataLoader's ``collate_fn`` to drop those items. The failing paths
    are added to ``self.bad_paths``, which is only visible in the main process when ``num_workers=0``
    (workers hold their own copies); the per-batch count from :func:`collate_skip_bad` is correct
    in both cases.
    """

    def __init__(self, records: Sequence[Record], transform: Callable, skip_bad: bool = False):
        self.records = list(records)
        self.transform = transform
        self.skip_bad = skip_bad
        self.bad_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        if not self.skip_bad:
            return self.transform(read_rgb(rec.path)), rec.pid, rec.camid, index
        try:
            img = read_rgb(rec.path)
        except QAConvError:
            self.bad_paths.add(rec.path)
            return None
        return self.transform(img), rec.pid, rec.camid, index


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Collate ``ImageDataset(skip_bad=True)`` items, dropping ``None`` (unreadable) ones.

    Returns ``(images, pids, camids, indices, num_bad)``; ``num_bad`` is how many items of this batch
    were dropped. When every item is bad, ``images`` is an empty tensor of shape ``(0,)`` and the
    other tensors are empty too, so callers should skip batches with ``len(indices) == 0``.
    """
    good = [item for item in batch if item is not None]
    num_bad = len(batch) - len(good)
    if not good:
        empty = torch.empty(0, dtype=torch.long)
        return torch.empty(0), empty, empty.clone(), empty.clone(), num_bad
    images, pids, camids, indices = torch.utils.data.default_collate(good)
    return images, pids, camids, indices, num_bad


def _decodes(path: str) -> bool:
    try:
        read_rgb(path)
        return True
    except QAConvError:
        return False


def scan_images(records: Iterable[Record], progress: bool = True, threads: int | None = None) -> list[str]:
    """Paths of unreadable image files, each once, in record order.

    Each image is fully decoded with :func:`read_rgb` (``PIL.Image.verify`` alone passes truncated JPEGs),
    so exactly the files training or evaluation would fail on are flagged. Files are decoded in ``threads``
    threads (default: up to 8, one per CPU core); PIL releases the GIL while decoding.
    """
    paths = list(dict.fromkeys(rec.path for rec in records))
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        ok = progress_bar(pool.map(_decodes, paths), total=len(paths), desc="checking images", unit="img",
                          disable=not progress, leave=False)
        return [path for path, good in zip(paths, ok, strict=True) if not good]
