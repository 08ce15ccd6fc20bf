"""Users' own data as a CSV manifest.

Format (README-ready)::

    path,pid,camid,time,split
    images/0001_a.jpg,1,cam_front,12.5,train
    images/0001_b.jpg,1,cam_back,20.0,train
    /data/q/0007.jpg,7,cam_front,3.0,query
    /data/g/0007.jpg,7,cam_back,9.5,gallery

- ``path``: image file (see :data:`qaconv.data.filetypes.IMAGE_SUFFIXES`), relative to the CSV's folder or
  absolute.
- ``pid``: integer identity. Rows with pid ``-1`` are junk and dropped (counted per split).
- ``camid``: camera; integers or any strings. The distinct values of the whole file are mapped to
  ``0..C-1`` in sorted order (numeric order when all are integers), so ``0,1,2`` stay as they are and
  ``1,2,3`` or ``cam_a,cam_b`` become ``0,1,2`` / ``0,1``. The same mapping is used for all splits; reports
  show the labels as written (``ReidDataset.cam_label``).
- ``time`` (optional): time stamp in seconds (any float); an empty cell means no time. Time-based
  features are used only when every row has a time.
- ``split`` (optional): ``train``, ``query`` or ``gallery`` (case-insensitive). Without this column
  every row is training data.

Column order is free, header names are case-insensitive, other columns are ignored. Train pids are
relabelled to ``0..N-1``; query and gallery keep the pids written in the file.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..errors import QAConvError
from .filetypes import IMAGE_TYPES, is_image_name
from .market import ReidDataset
from .records import Record, relabel_pids

REQUIRED = ("path", "pid", "camid")
SPLIT_NAMES = ("train", "query", "gallery")


def _camid_map(values: list[str]) -> dict[str, int]:
    distinct = set(values)
    try:
        ordered = sorted(distinct, key=int)
    except ValueError:
        ordered = sorted(distinct)
    return {v: i for i, v in enumerate(ordered)}


def load_manifest(csv_path: str | Path, name: str | None = None) -> ReidDataset:
    """Read a CSV manifest (see the module docstring) into a :class:`ReidDataset`.

    Raises :class:`QAConvError` with ``file:line`` and the column for every problem a user can fix.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise QAConvError(f"manifest {csv_path} does not exist")
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise QAConvError(f"{csv_path}:1: manifest is empty; expected a header 'path,pid,camid[,time][,split]'")
            cols = [h.strip().lower() for h in header]
            missing = [c for c in REQUIRED if c not in cols]
            if missing:
                raise QAConvError(
                    f"{csv_path}:1: missing required column(s) {', '.join(repr(c) for c in missing)}; "
                    f"header is '{','.join(header)}', expected 'path,pid,camid[,time][,split]'"
                )
            idx = {c: cols.index(c) for c in (*REQUIRED, "time", "split") if c in cols}
            rows = []
            start = reader.line_num + 1
            for fields in reader:
                line = reader.line_num
                if any("\n" in f or "\r" in f for f in fields):  # a quote left open swallows the next lines
                    raise QAConvError(f"{csv_path}:{start}: unbalanced quote (a quoted field runs to line {line})")
                start = line + 1
                if not any(f.strip() for f in fields):
                    continue
                rows.append((line, fields))
    except UnicodeDecodeError as exc:
        raise QAConvError(f"{csv_path}: not a UTF-8 text file ({exc.reason})") from None
    except csv.Error as exc:
        raise QAConvError(f"{csv_path}:{reader.line_num}: malformed CSV ({exc})") from None

    def cell(line: int, fields: list[str], col: str) -> str:
        i = idx[col]
        value = fields[i].strip() if i < len(fields) else ""
        if not value and col in REQUIRED:
            raise QAConvError(f"{csv_path}:{line}: column '{col}' is empty")
        return value

    parsed = []
    for line, fields in rows:
        path = cell(line, fields, "path")
        pid_s = cell(line, fields, "pid")
        try:
            pid = int(pid_s)
        except ValueError:
            pid = None
        if pid is None or not -1 <= pid < 2**31:
            raise QAConvError(
                f"{csv_path}:{line}: column 'pid' must be an integer from -1 (junk) to {2**31 - 1}, got {pid_s!r}"
            )
        camid = cell(line, fields, "camid")
        time = None
        if "time" in idx:
            time_s = cell(line, fields, "time")
            if time_s:
                try:
                    time = float(time_s)
                except ValueError:
                    time = math.nan
                if not math.isfinite(time):
                    raise QAConvError(
                        f"{csv_path}:{line}: column 'time' must be a number of seconds (or empty), got {time_s!r}"
                    )
        split = "train"
        if "split" in idx:
            split = cell(line, fields, "split").lower()
            if split not in SPLIT_NAMES:
                raise QAConvError(
                    f"{csv_path}:{line}: column 'split' must be one of train, query, gallery, got {split!r}"
                )
        full = Path(path).expanduser()
        if not full.is_absolute():
            full = base / full
        parsed.append((line, str(full), pid, camid, time, split))

    if not parsed:
        raise QAConvError(f"{csv_path}: manifest has a header but no rows")
    first_line: dict[str, int] = {}
    for line, p, *_ in parsed:
        if p in first_line:
            raise QAConvError(f"{csv_path}:{line}: image {p} is listed twice (first on line {first_line[p]})")
        first_line[p] = line
    missing_files = [(line, p) for line, p, *_ in parsed if not Path(p).is_file()]
    if missing_files:
        shown = "; ".join(f"{csv_path}:{line}: {p}" for line, p in missing_files[:3])
        more = f" and {len(missing_files) - 3} more" if len(missing_files) > 3 else ""
        raise QAConvError(
            f"{len(missing_files)} image file(s) in column 'path' do not exist (relative paths are "
            f"taken from {base}): {shown}{more}"
        )
    not_images = [(line, p) for line, p, *_ in parsed if not is_image_name(p)]
    if not_images:
        shown = "; ".join(f"{csv_path}:{line}: {p}" for line, p in not_images[:3])
        more = f" and {len(not_images) - 3} more" if len(not_images) > 3 else ""
        raise QAConvError(
            f"{len(not_images)} file(s) in column 'path' are not image files (expected {IMAGE_TYPES}): {shown}{more}"
        )

    cams = _camid_map([camid for *_, camid, _, _ in parsed])
    records: dict[str, list[Record]] = {s: [] for s in SPLIT_NAMES}
    junk = dict.fromkeys(SPLIT_NAMES, 0)
    for _, path, pid, camid, time, split in parsed:
        if pid == -1:
            junk[split] += 1
            continue
        records[split].append(Record(path, pid, cams[camid], time))
    train = relabel_pids(records["train"])
    kept = [r for recs in records.values() for r in recs]
    return ReidDataset(
        name=name or csv_path.stem,
        root=str(base),
        train=train,
        query=records["query"],
        gallery=records["gallery"],
        has_time=bool(kept) and all(r.time is not None for r in kept),
        junk_dropped=junk,
        cam_labels={i: label for label, i in cams.items()},
    )
