"""Which files are images: one set of extensions for every command and loader (no heavy imports).

Dataset folders, manifests, ``qaconv index``/``search``/``match``/``serve`` and ``qaconv data info`` all accept
exactly :data:`IMAGE_SUFFIXES` (case-insensitive). Folder listings return the other files they met
(:func:`list_image_files`), so that callers count and name them instead of dropping them silently; a single
path is refused with "does not exist" or "is not an image file", never one for the other
(:func:`check_image_file`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import QAConvError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGE_TYPES = ", ".join(IMAGE_SUFFIXES)  # for messages and help texts


def is_image_name(path: str | Path) -> bool:
    """True when the file name ends with one of :data:`IMAGE_SUFFIXES` (any case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_image_files(folder: str | Path, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """``(images, skipped)``: the image files in ``folder`` (recursively with ``recursive``) and the other
    files met there, both sorted. Hidden files (``.name``) and folders are in neither list."""
    folder = Path(folder)
    images, skipped = [], []
    for p in folder.rglob("*") if recursive else folder.iterdir():
        if not p.name.startswith(".") and p.is_file():
            (images if is_image_name(p) else skipped).append(p)
    return sorted(images), sorted(skipped)


def describe_skipped(skipped, where: str = "", shown: int = 3) -> str:
    """One sentence naming how many non-image files were skipped and the first ``shown`` of them; '' if none.

    >>> describe_skipped(["a.txt", "b.csv", "c.gif", "d.db"], "in gal")
    'skipped 4 non-image file(s) in gal (not .jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff): a.txt, b.csv, c.gif, ...'
    """
    skipped = [str(s) for s in skipped]
    if not skipped:
        return ""
    names = ", ".join(skipped[:shown]) + (", ..." if len(skipped) > shown else "")
    return f"skipped {len(skipped)} non-image file(s){' ' + where if where else ''} (not {IMAGE_TYPES}): {names}"


def check_image_file(path: str | Path, what: str = "image") -> Path:
    """``path`` as a Path when it is an existing file with an image extension; else a one-line
    :class:`QAConvError`: ``WHAT PATH does not exist``, ``... is a folder, not an image file`` or
    ``... is not an image file (expected .jpg, ...)``."""
    path = Path(path)
    if not path.exists():
        raise QAConvError(f"{what} {path} does not exist")
    if path.is_dir():
        raise QAConvError(f"{what} {path} is a folder, not an image file")
    if not is_image_name(path):
        raise QAConvError(f"{what} {path} is not an image file (expected {IMAGE_TYPES})")
    return path
