"""Feature maps of image files for a gallery: listing a folder, decoding in threads, refusing non-finite maps.

:func:`iter_extract` yields chunks (float16 maps, pooled unit vectors of those fp16 maps, kept paths, skipped
unreadable files) so that a store can commit a large folder chunk by chunk in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..data.filetypes import list_image_files
from ..data.images import read_rgb
from ..errors import QAConvError
from ..progress import progress_bar


def list_images(folder: str | Path, skipped: list | None = None, what: str = "gallery folder") -> list[str]:
    """Image files (:data:`~qaconv.data.filetypes.IMAGE_SUFFIXES`) under ``folder``, recursively, as sorted
    '/'-relative paths; the other files' relative paths are appended to ``skipped`` when it is a list.
    ``what`` names the folder in the error for a missing one."""
    folder = Path(folder)
    if not folder.exists():
        raise QAConvError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise QAConvError(f"{what} {folder} is not a folder")
    images, others = list_image_files(folder, recursive=True)
    if skipped is not None:
        skipped += sorted(p.relative_to(folder).as_posix() for p in others)
    return sorted(p.relative_to(folder).as_posix() for p in images)


def check_finite_rows(ok: np.ndarray, paths, what: str, advice: str) -> None:
    """Raise naming the count and a few paths of the rows where ``ok`` is False."""
    bad = np.flatnonzero(~np.asarray(ok, dtype=bool))
    if len(bad):
        eg = ", ".join(str(paths[i]) for i in bad[:3])
        raise QAConvError(f"{what} {len(bad)} of {len(ok)} images (e.g. {eg}); {advice}")


def check_query_maps(query_maps: torch.Tensor, names=None) -> None:
    """Refuse query feature maps with NaN/inf (they would score NaN against every gallery image), naming the
    queries (``names``, default their row numbers)."""
    ok = torch.isfinite(query_maps.detach().reshape(len(query_maps), -1)).all(dim=1).cpu().numpy()
    names = [f"query {i}" for i in range(len(ok))] if names is None else list(names)
    check_finite_rows(ok, names, "non-finite (NaN/inf) query feature maps for", "check the checkpoint and the images")


def half_maps(maps: torch.Tensor, names,
              what: str = "the model gave non-finite features (NaN/inf, or float16 overflow) for",
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(float16 maps, float32 unit pooled vectors of those fp16 maps)`` as numpy; non-finite rows refused
    (NaN/inf, or float16 overflow), naming them (``what`` starts the message)."""
    half = maps.detach().cpu().half().numpy()
    back = half.astype(np.float32)  # numpy: several times faster than torch's fp16 / small-axis ops on CPU
    check_finite_rows(np.isfinite(back.reshape(len(back), -1)).all(axis=1), list(names), what,
                      "check the checkpoint")
    pooled = back.reshape(back.shape[0], back.shape[1], -1).mean(axis=2)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)  # as F.normalize
    return half, pooled


def _try_read(path: Path):
    try:
        return read_rgb(str(path))
    except QAConvError as exc:
        return str(exc).split(": ", 1)[-1] or "unreadable"


def iter_extract(extractor, root: Path, rel: list[str], workers: int = 2, progress: bool = True,
                 chunk: int | None = None) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, list[str], list]]:
    """Feature maps of the images ``root / p`` for ``p`` in ``rel``, about ``chunk`` images at a time (default:
    all in one chunk): yields ``(fp16 maps [n, C, h, w], pooled [n, C], kept paths, [(path, reason)] unreadable)``
    (maps and pooled are None when a chunk has no readable image). ``workers``: image-decoding threads."""
    step = extractor.batch_size
    chunk = len(rel) if chunk is None else max(step, int(chunk) // step * step)
    bar = progress_bar(total=len(rel), desc="indexing", unit="img", disable=not progress)
    with ThreadPoolExecutor(max(1, workers)) as pool, bar:
        for c0 in range(0, len(rel), max(1, chunk)):
            maps, pooled, kept, bad = [], [], [], []
            for start in range(c0, min(c0 + chunk, len(rel)), step):
                names = rel[start : min(start + step, c0 + chunk, len(rel))]
                images = list(pool.map(_try_read, [root / p for p in names]))
                good = [(p, im) for p, im in zip(names, images, strict=True) if not isinstance(im, str)]
                bad += [(p, im) for p, im in zip(names, images, strict=True) if isinstance(im, str)]
                bar.update(len(names))
                if good:
                    m, v = half_maps(extractor([im for _, im in good]), [p for p, _ in good])
                    maps.append(m)
                    pooled.append(v)
                    kept += [p for p, _ in good]
            yield (np.concatenate(maps) if maps else None, np.concatenate(pooled) if pooled else None, kept, bad)
