"""The queries of ``qaconv search``: image files, folders, tracklet folders or a query manifest.

A :class:`QuerySet` lists every query crop with what is known of it (camera, time, pid; None = from
Market-style names) and groups the crops into queries: one crop per query, or a tracklet of several crops
of one person (a folder with ``tracklet=True``, or the rows of a manifest with one camera and ``track``).

A query manifest is a CSV with the header ``path,camid[,time][,pid][,track]`` (other columns ignored;
``path`` relative to the CSV's folder or absolute); an empty ``camid``, ``time``, ``pid`` or ``track`` cell
means unknown / none. Bad rows raise one line naming ``file:line``.

Example::

    qs = collect_queries(["camA/track7", "camB/track2"], tracklet=True, cam_from_folder=True)
    qs.names, qs.cams        # ['camA/track7', 'camB/track2'], ['camA', 'camA', ..., 'camB', ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.filetypes import IMAGE_TYPES, check_image_file, is_image_name
from ..errors import QAConvError
from .extract import list_images
from .meta import manifest_cells, manifest_path, manifest_time

MANIFEST_HEADER = "path,camid[,time][,pid][,track]"


@dataclass
class QuerySet:
    """Query crops and how they form queries (see the module docstring). Per crop: ``paths``; ``cams`` (labels,
    '' unknown), ``times`` (seconds, NaN unknown), ``pids`` (-1 unknown), each None when the crops' Market-style
    names say; ``groups``: a hashable per crop, crops with equal values forming one tracklet query (None:
    every crop is a query). Per query, in order of first crop: ``names`` (display) and ``tracks`` (the
    manifest's track label, or None)."""

    paths: list[Path]
    names: list[str]
    tracks: list
    cams: list[str] | None = None
    times: list[float] | None = None
    pids: list[int] | None = None
    groups: list | None = None

    def __len__(self) -> int:
        return len(self.names)

    def crops_of(self) -> list[list[int]]:
        """Per query, the indices of its crops."""
        if self.groups is None:
            return [[i] for i in range(len(self.paths))]
        order: dict = {}
        for i, g in enumerate(self.groups):
            order.setdefault(g, []).append(i)
        return list(order.values())


def collect_queries(args, tracklet: bool = False, cam_from_folder: bool = False,
                    skipped: list | None = None) -> QuerySet:
    """The query crops of the QUERY arguments: image files, and folders (their images, recursively). With
    ``tracklet`` each argument is one query (a folder: a tracklet of all its images). With ``cam_from_folder``
    a crop's camera is the name of the folder it lies in (``camA/img_001.jpg`` -> ``camA``, also when the
    argument is ``camA/`` itself), a tracklet folder's camera the folder that holds it (``camA/track7/`` ->
    ``camA``). Files of other types met in query folders are appended to ``skipped`` (a list) as paths."""
    paths, names, groups, cams = [], [], [], []
    for a, arg in enumerate(map(Path, args)):
        if arg.is_dir():
            others: list[str] = []
            rel = list_images(arg, others, what="query folder")
            if skipped is not None:
                skipped += [str(arg / p) for p in others]
            if not rel:
                raise QAConvError(f"query folder {arg} holds no images ({IMAGE_TYPES})")
            found = [arg / p for p in rel]
            if cam_from_folder:
                cams += [arg.resolve().parent.name] * len(rel) if tracklet else [p.resolve().parent.name for p in found]
        else:
            found = [check_image_file(arg, "query")]  # "does not exist" or "is not an image file"
            if cam_from_folder:
                cams.append(arg.resolve().parent.name)
        paths += found
        if tracklet:
            names.append(str(arg))
            groups += [a] * len(found)
        else:
            names += [str(p) for p in found]
    if not paths:
        raise QAConvError("no query images found")
    return QuerySet(paths, names, [None] * len(names), cams=cams if cam_from_folder else None,
                    groups=groups if tracklet else None)


def read_query_manifest(csv_path: str | Path) -> QuerySet:
    """The queries of a ``path,camid[,time][,pid][,track]`` CSV (module docstring): rows with one camera and one
    ``track`` form a tracklet query, a row without track is a query of its own."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise QAConvError(f"query manifest {csv_path} does not exist")
    paths, cams, times, pids, groups, seen = [], [], [], [], [], set()
    names, tracks, first_of, columns = [], [], {}, set()
    for where, cell in manifest_cells(csv_path, ("path", "camid"), ("time", "pid", "track"), MANIFEST_HEADER):
        columns = set(cell)
        if not cell["path"]:
            raise QAConvError(f"{where}: column 'path' is empty")
        path = manifest_path(cell["path"], csv_path)
        if not path.is_file() or not is_image_name(path):  # the message names the path as written
            what = "does not exist" if not path.exists() else "is a folder, not an image file" if \
                path.is_dir() else f"is not an image file (expected {IMAGE_TYPES})"
            raise QAConvError(f"{where}: image {cell['path']} {what}")
        key = str(path.resolve())
        if key in seen:
            raise QAConvError(f"{where}: image {cell['path']} is listed twice")
        seen.add(key)
        t = manifest_time(cell.get("time", ""), where)
        pid = -1
        if cell.get("pid"):
            try:
                pid = int(cell["pid"])
            except ValueError:
                pid = -2
            if pid < -1:
                raise QAConvError(f"{where}: column 'pid' must be an integer >= -1 (-1 or empty: unknown), "
                                  f"got {cell['pid']!r}")
        track = cell.get("track", "")
        group = ("track", cell["camid"], track) if track else ("row", len(paths))
        if group not in first_of:
            first_of[group] = len(names)
            names.append(f"track {track}" + (f" ({cell['camid']})" if cell["camid"] else "") if track
                         else str(path))
            tracks.append(track or None)
        paths.append(path)
        cams.append(cell["camid"])
        times.append(t)
        pids.append(pid)
        groups.append(group)
    if not paths:
        raise QAConvError(f"query manifest {csv_path} lists no images")
    return QuerySet(paths, names, tracks, cams=cams, times=times if "time" in columns else None,
                    pids=pids if "pid" in columns else None, groups=groups)


def expand(values: list, qs: QuerySet) -> list:
    """Values given one per query, repeated for each crop of that query."""
    out = [None] * len(qs.paths)
    for v, crops in zip(values, qs.crops_of(), strict=True):
        for i in crops:
            out[i] = v
    return out
