"""Identity, camera and time of gallery / query images: Market-style names, a CSV manifest, or unknown (-1).

A Market-style name (``0002_c1s1_000451_03.jpg``) gives pid 2, camera label ``c1``, session 1 and frame
451; its time stamp is the frame number, shifted by the chained session offsets of its camera
(:func:`qaconv.data.market.market_session_offsets`, official convention), over 25 fps. A gallery manifest
is a CSV with columns ``path,pid,camid[,time][,track]`` (``path`` relative to the CSV's folder or absolute;
other columns ignored); its rows override what the names say. With ``cam_from_folder`` the camera label is
the name of the folder an image lies in (``camA/img_001.jpg`` -> ``camA``, :func:`folder_meta`). Camera
labels map to integer ids with :func:`assign_cam_ids`.

Example::

    meta = parse_name("0002_c1s1_000451_03.jpg")      # ImageMeta(pid=2, cam_label='c1', session=1, frame=451, ...)
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.manifest import REQUIRED
from ..data.market import market_session_offsets
from ..data.records import MARKET_FPS, MARKET_NAME
from ..errors import QAConvError

UNKNOWN = -1
TIME_NONE, TIME_NAME, TIME_MANIFEST = 0, 1, 2  # where an image's time stamp comes from


@dataclass(frozen=True)
class ImageMeta:
    """What is known of one image; -1 / '' / NaN when unknown. ``time`` is only set from a manifest; ``track``:
    the tracklet label ('' none)."""

    pid: int = UNKNOWN
    cam_label: str = ""
    session: int = UNKNOWN
    frame: int = UNKNOWN
    time: float = math.nan
    time_source: int = TIME_NONE
    track: str = ""


def parse_name(name: str) -> ImageMeta:
    """Metadata from a Market-1501 style file name (any folder part is ignored), else all unknown."""
    m = MARKET_NAME.match(Path(name).name)
    if m is None:
        return ImageMeta()
    return ImageMeta(int(m.group(1)), f"c{m.group(2)}", int(m.group(3)), int(m.group(4)), math.nan, TIME_NAME)


def folder_camera(rel: str, root="the gallery folder") -> str:
    """The camera label of an image from its folder: the immediate parent folder of the '/'-relative path
    ``rel`` (``camA/img_001.jpg`` -> ``camA``); an image directly in ``root`` is refused."""
    parts = rel.split("/")
    if len(parts) < 2:
        raise QAConvError(f"--cam-from-folder: {rel} lies directly in {root}, not in a camera folder "
                          "(expected ROOT/CAMERA/image.jpg)")
    return parts[-2]


def folder_meta(rel: str, root="the gallery folder") -> ImageMeta:
    """Metadata of an image whose camera is its folder (:func:`folder_camera`): the pid of a Market-style name
    is kept, its name time is not (that needs the name's camera)."""
    return ImageMeta(parse_name(rel).pid, folder_camera(rel, root))


def market_times(cam_labels, sessions, frames, sources) -> np.ndarray:
    """Seconds for the entries whose time comes from their Market name (NaN elsewhere).

    Session offsets are chained per camera over the frames of exactly these entries, so the same set of
    names always gives the same times (the official code chains over train + query + gallery).
    """
    sources = np.asarray(sources)
    sel = np.flatnonzero(sources == TIME_NAME)
    numbers = np.full(len(sources), UNKNOWN, dtype=np.int64)
    numbers[sel] = [int(cam_labels[i][1:]) for i in sel]
    return market_times_by_number(numbers, sessions, frames, sources)


def market_times_by_number(cam_numbers, sessions, frames, sources) -> np.ndarray:
    """:func:`market_times` with the camera given as the number N of its label ``cN`` (vectorised: the
    store recomputes the times of a million entries at once)."""
    sources = np.asarray(sources)
    sel = np.flatnonzero(sources == TIME_NAME)
    out = np.full(len(sources), np.nan, dtype=np.float64)
    if not len(sel):
        return out
    cam = np.asarray(cam_numbers, dtype=np.int64)[sel]
    ses = np.asarray(sessions, dtype=np.int64)[sel]
    frm = np.asarray(frames, dtype=np.int64)[sel]
    keys, inverse = np.unique(np.stack((cam, ses), axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    top = np.full(len(keys), np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(top, inverse, frm)  # only each group's largest frame matters to the offsets
    offsets = market_session_offsets({(int(c), int(s)): [int(f)] for (c, s), f in zip(keys, top, strict=True)})
    group_offset = np.array([offsets[(int(c), int(s))] for c, s in keys], dtype=np.int64)
    out[sel] = (frm + group_offset[inverse]) / MARKET_FPS
    return out


def manifest_cells(csv_path: Path, required: tuple, optional: tuple, expected: str):
    """Each non-blank row of a CSV manifest as ``(where, cell)``: ``where`` is ``file:line`` for messages, ``cell``
    the stripped text of the ``required`` columns and of the ``optional`` ones the header has (names
    case-insensitive, order free, other columns ignored; a short row gives ''). A missing required column, a file
    that is not UTF-8 and malformed CSV raise one line naming the file (``expected``: the header to show)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise QAConvError(f"{csv_path}:1: missing column(s) {', '.join(missing)}; expected a header "
                                  f"'{expected}'")
            idx = {c: header.index(c) for c in (*required, *optional) if c in header}
            for fields in reader:
                if any(f.strip() for f in fields):
                    yield f"{csv_path}:{reader.line_num}", {c: (fields[i].strip() if i < len(fields) else "")
                                                            for c, i in idx.items()}
    except UnicodeDecodeError as exc:
        raise QAConvError(f"{csv_path}: not a UTF-8 text file ({exc.reason})") from None
    except csv.Error as exc:
        raise QAConvError(f"{csv_path}: malformed CSV ({exc})") from None


def manifest_time(text: str, where: str) -> float:
    """Seconds from a manifest's ``time`` cell (NaN when empty); anything but a finite number raises naming
    ``where``."""
    if not text:
        return math.nan
    try:
        t = float(text)
    except ValueError:
        t = math.nan
    if not math.isfinite(t):
        raise QAConvError(f"{where}: column 'time' must be a number of seconds, got {text!r}")
    return t


def manifest_path(text: str, csv_path: Path) -> Path:
    """The image a manifest's ``path`` cell names: relative to the CSV's folder, or absolute (``~`` expanded)."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else csv_path.parent / path


def read_gallery_manifest(csv_path: str | Path) -> dict[str, ImageMeta]:
    """Rows of a ``path,pid,camid[,time][,track]`` CSV keyed by the image's resolved absolute path.

    pid ``-1`` means unknown; an empty ``time`` cell means no time, an empty ``track`` cell no tracklet.
    Problems raise :class:`QAConvError` naming ``file:line`` and the column.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise QAConvError(f"manifest {csv_path} does not exist")
    out: dict[str, ImageMeta] = {}
    for where, cell in manifest_cells(csv_path, REQUIRED, ("time", "track"), "path,pid,camid[,time][,track]"):
        for col in REQUIRED:
            if not cell[col]:
                raise QAConvError(f"{where}: column '{col}' is empty")
        try:
            pid = int(cell["pid"])
        except ValueError:
            raise QAConvError(f"{where}: column 'pid' must be an integer, got {cell['pid']!r}") from None
        time = manifest_time(cell.get("time", ""), where)
        key = str(manifest_path(cell["path"], csv_path).resolve())
        if key in out:
            raise QAConvError(f"{where}: image {cell['path']} is listed twice")
        out[key] = ImageMeta(pid, cell["camid"], UNKNOWN, UNKNOWN, time,
                             TIME_MANIFEST if cell.get("time") else TIME_NONE, cell.get("track", ""))
    return out


def _label_order(label: str):
    try:
        return (0, int(label), "")
    except ValueError:
        return (1, 0, label)


def _preferred_id(label: str) -> int:
    """Integer labels keep their value, Market labels cN become N-1 (as in the dataset loaders)."""
    try:
        return int(label)
    except ValueError:
        m = re.fullmatch(r"c(\d)", label)
        return int(m.group(1)) - 1 if m else UNKNOWN


def assign_cam_ids(labels, known: dict[str, int] | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Integer camera ids for ``labels`` ('' = unknown = -1) and the updated ``label -> id`` map.

    Known labels keep their id. New labels, in natural order, take their preferred id (an integer label
    its value, ``cN`` N-1) when it is free, else the smallest free id: stable under appending.
    """
    mapping = dict(known or {})
    used = set(mapping.values())
    for label in sorted({x for x in labels if x and x not in mapping}, key=_label_order):
        cid = _preferred_id(label)
        if cid < 0 or cid in used:
            cid = next(i for i in range(len(used) + 1) if i not in used)
        mapping[label] = cid
        used.add(cid)
    ids = np.array([mapping[x] if x else UNKNOWN for x in labels], dtype=np.int64)
    return ids, mapping
