"""The gallery store on disk: one LanceDB table of entries plus a JSON file naming the model, in one folder.

Layout of a store folder ``STORE/``:

* ``qaconv-gallery.json``: ``{"format": "qaconv-gallery-store-1", "model": {"checkpoint", "hash",
  "feature_shape"}, "root": folder or null}`` (plain JSON, written atomically).
* ``gallery.lance/``: the LanceDB table ``gallery`` (Lance format: immutable data fragments, deletion files and
  one manifest per version; a version is committed by writing its manifest last, so a reader sees the old or
  the new version, never a partial one, even when a writer is killed). Stable row ids: an entry's id never
  changes (not on deletion, not on compaction) and is never reused. Schema metadata repeats the format, the
  model hash and the feature shape.
* ``.write.lock``: writers of any process hold an exclusive ``flock`` on it (released by the kernel when a
  writer dies), so writes are serialised and ids stay consistent.

Columns, one row per image: ``path`` (string, unique; relative to ``root`` when ``qaconv index`` made it),
``pid`` (int64, -1 unknown), ``cam`` (int64 id, -1 unknown), ``cam_label`` (string, '' unknown; one id per
label), ``time`` (float64 seconds from a manifest or the caller, NaN otherwise), ``session`` and ``frame`` (int64,
Market-style names, -1 otherwise), ``time_source`` (int8, :mod:`qaconv.gallery.meta` ``TIME_*``), ``track``
(string, '' none: the tracklet label; a tracklet is the entries of one camera with one label), ``pooled``
(fixed-size list of C float32: the unit L2-normalised average-pooled fp16 map) and ``features``
(fixed-size binary of 2*C*h*w bytes: the map in float16, little-endian, C-order ``[C, h, w]``). Times of
Market-style names are not stored: they are chained over the store's names when it is read
(:func:`qaconv.gallery.meta.market_times`), so appending never rewrites a row. A store written before the
``track`` column existed opens as it is (no entry has a track) and takes appends without tracks; storing
tracks in it is refused naming the command that rebuilds it.

In memory, :class:`Rows` holds every column but the feature maps (about 0.6 KB per entry at C = 128), for the
first search stage and the filters; :meth:`Store.take` reads the maps of the rows that are re-scored.
Appends grow the in-memory columns in place (amortised O(new rows)); readers keep their :class:`Rows`, a
consistent view pinned to one table version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import threading
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import QAConvError
from .identity import HASH_PATTERN
from .meta import TIME_MANIFEST, TIME_NAME, TIME_NONE, UNKNOWN, assign_cam_ids, market_times_by_number

FORMAT = "qaconv-gallery-store-1"
SIDECAR = "qaconv-gallery.json"
TABLE = "gallery"
LOCK = ".write.lock"
META_COLUMNS = ("path", "pid", "cam", "cam_label", "time", "session", "frame", "time_source", "track")
OLD_META_COLUMNS = META_COLUMNS[:-1]  # stores written before tracklets
TAKE_BLOCK = 4096  # feature maps read per Lance take
LOAD_BATCH = 65536  # rows per Arrow batch while reading a store's columns
OPTIONS = {"new_table_enable_stable_row_ids": "true"}


def _lancedb():
    os.environ.setdefault("LANCEDB_LOG", "error")  # Lance's Rust warnings would garble one-line errors
    import lancedb  # noqa: PLC0415 - heavy import, only when a store is used

    return lancedb


def schema(feature_shape, model_hash: str, tracks: bool = True):
    """The Arrow schema of a store's table for maps ``(C, h, w)`` (see the module docstring); ``tracks``
    False: the schema of stores written before the ``track`` column."""
    import pyarrow as pa

    c, h, w = (int(s) for s in feature_shape)
    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("pid", pa.int64(), nullable=False),
            pa.field("cam", pa.int64(), nullable=False),
            pa.field("cam_label", pa.string(), nullable=False),
            pa.field("time", pa.float64(), nullable=False),
            pa.field("session", pa.int64(), nullable=False),
            pa.field("frame", pa.int64(), nullable=False),
            pa.field("time_source", pa.int8(), nullable=False),
            *([pa.field("track", pa.string(), nullable=False)] if tracks else []),
            pa.field("pooled", pa.list_(pa.float32(), c), nullable=False),
            pa.field("features", pa.binary(2 * c * h * w), nullable=False),
        ],
        metadata={"qaconv_format": FORMAT, "qaconv_model_hash": model_hash, "qaconv_feature_shape": f"{c},{h},{w}"},
    )


def os_reason(exc: BaseException) -> str:
    """The reason of an I/O failure in words: the strerror of an OSError, or of the 'os error N' inside a Lance
    message, else the first line of the message without Lance's source locations."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    m = re.search(r"\(os error (\d+)\)", text)
    if m:
        return os.strerror(int(m.group(1)))
    first = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r",? /\S+\.rs:\d+:\d+", "", first).strip()


def _corrupt(path: Path, detail: str) -> QAConvError:
    return QAConvError(f"{path} is corrupt or not a qaconv gallery store ({detail}); rebuild it with "
                       f"'qaconv index GALLERY_DIR --checkpoint RUN -o {path} --overwrite'")


def _invalid(path: Path, name: str, what: str, got: str = "") -> QAConvError:
    got = f", got {got}" if got else ""
    return QAConvError(f"store {path} is invalid: field '{name}' must be {what}{got}; rebuild it")


def is_store(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a store's JSON file (its content is checked by :meth:`Store.open`)."""
    return (Path(path) / SIDECAR).is_file()


def read_sidecar(path: Path) -> dict:
    """The validated JSON file of the store at ``path`` (every field checked, one line when wrong)."""
    try:
        info = json.loads((path / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(path, f"{SIDECAR} is unreadable: {os_reason(exc)}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _corrupt(path, f"{SIDECAR} does not say format '{FORMAT}'")
    model = info.get("model")
    if not isinstance(model, dict) or set(model) != {"checkpoint", "hash", "feature_shape"}:
        raise _invalid(path, "model", "an object with checkpoint, hash and feature_shape")
    if not isinstance(model["checkpoint"], str):
        raise _invalid(path, "model.checkpoint", "a string")
    if not isinstance(model["hash"], str) or not HASH_PATTERN.fullmatch(model["hash"]):
        raise _invalid(path, "model.hash", "a SHA-256 (64 hex digits)")
    shape = model["feature_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(s) is int and s > 0 for s in shape)):
        raise _invalid(path, "model.feature_shape", "3 positive integers", repr(shape)[:40])
    if info.get("root") is not None and not isinstance(info["root"], str):
        raise _invalid(path, "root", "a string or null")
    return {"model": {**model, "feature_shape": tuple(shape)}, "root": info.get("root")}


def write_sidecar(path: Path, model: dict, root: str | None, atomic: bool = True) -> None:
    """Write the store's JSON file (atomically unless ``atomic`` is False: a folder not yet in place)."""
    body = {"format": FORMAT, "model": {"checkpoint": str(model["checkpoint"]), "hash": model["hash"],
                                        "feature_shape": [int(s) for s in model["feature_shape"]]}, "root": root}
    text = json.dumps(body, indent=2).encode()
    if atomic:
        atomic_write(path / SIDECAR, lambda f: f.write(text))
    else:
        (path / SIDECAR).write_bytes(text)


# -- the in-memory columns -------------------------------------------------------------------------------------
class _Growing:
    """An append-only array: the views of its first n rows that readers hold never change under them."""

    def __init__(self, values: np.ndarray):
        self.buf, self.n = values, len(values)

    @classmethod
    def empty(cls, capacity: int, shape: tuple, dtype) -> _Growing:
        """No rows yet, room for ``capacity`` rows of ``shape``."""
        grown = cls(np.empty((capacity, *shape), dtype=dtype))
        grown.n = 0
        return grown

    def extend(self, new: np.ndarray) -> np.ndarray:
        k = len(new)
        if self.n + k > len(self.buf):
            grown = np.empty((max(self.n + k, int(self.n * 1.5) + 1024), *self.buf.shape[1:]), dtype=self.buf.dtype)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : self.n + k] = new
        self.n += k
        return self.buf[: self.n]


NUMERIC = {"ids": np.uint64, "pids": np.int64, "cams": np.int64, "stored_times": np.float64,
           "sessions": np.int64, "frames": np.int64, "sources": np.int8}


@dataclass(frozen=True, eq=False)
class Rows:
    """A consistent view of a store's entries at one table version (numpy arrays of ``n`` rows, position order).

    ``ids``: stable entry ids (Lance row ids); ``paths``: a list whose first ``n`` items are this view's; ``cams``
    integer ids, ``cam_labels`` id -> label; ``stored_times``: manifest / caller times (NaN else); ``pooled``:
    ``[n, C]`` unit vectors; ``tracks``: a list like ``paths`` of tracklet labels ('' none). :attr:`times`
    adds the chained Market-name times.
    """

    version: int
    n: int
    ids: np.ndarray
    paths: list
    pids: np.ndarray
    cams: np.ndarray
    stored_times: np.ndarray
    sessions: np.ndarray
    frames: np.ndarray
    sources: np.ndarray
    pooled: np.ndarray
    tracks: list = field(default_factory=list)
    cam_labels: dict = field(default_factory=dict)
    _open: object = None  # version -> pinned Lance table

    def __len__(self) -> int:
        return self.n

    @cached_property
    def table(self):
        """The Lance table checked out at this view's version (reads see exactly these rows)."""
        return self._open(self.version)

    @cached_property
    def times(self) -> np.ndarray:
        """Seconds per row: stored times, and Market-name times chained over this view's names (NaN unknown)."""
        numbers = np.full(self.n, UNKNOWN, dtype=np.int64)
        named = self.sources == TIME_NAME
        if named.any():
            lookup = {c: int(lab[1:]) for c, lab in self.cam_labels.items() if re.fullmatch(r"c\d+", lab)}
            numbers[named] = [lookup.get(int(c), UNKNOWN) for c in self.cams[named]]
        chained = market_times_by_number(numbers, self.sessions, self.frames, self.sources)
        return np.where(named, chained, self.stored_times)

    @cached_property
    def label_ids(self) -> dict:
        """Camera label -> id."""
        return {lab: c for c, lab in self.cam_labels.items()}

    def label(self, cam: int) -> str:
        return self.cam_labels.get(int(cam), "")

    def keep(self, mask: np.ndarray, version: int) -> Rows:
        """The rows where ``mask`` holds, as a new view at ``version`` (copies)."""
        idx = np.flatnonzero(mask)
        cols = {k: getattr(self, k)[idx] for k in (*NUMERIC, "pooled")}
        cams = set(cols["cams"].tolist())
        labels = {c: lab for c, lab in self.cam_labels.items() if c in cams}
        return Rows(version, len(idx), paths=[self.paths[i] for i in idx], tracks=[self.tracks[i] for i in idx],
                    cam_labels=labels, _open=self._open, **cols)

    def track(self, position: int) -> str:
        """The tracklet label of the row at ``position`` ('' none)."""
        return self.tracks[position]

    @cached_property
    def groups(self) -> tuple[np.ndarray, int]:
        """``(group index per row [n] int64, number of groups)``: a tracklet (one camera, one track label) is
        one group, every row without a track a group of its own; groups are numbered by first row."""
        out = np.empty(self.n, dtype=np.int64)
        seen: dict = {}
        for i in range(self.n):
            t = self.tracks[i]
            key = (int(self.cams[i]), t) if t else i
            out[i] = seen.setdefault(key, len(seen))
        return out, len(seen)


# -- the store -------------------------------------------------------------------------------------------------
class Store:
    """One store folder: its identity, its table, and the current :class:`Rows` (see the module docstring).

    Thread-safe for one writer and many readers in a process: writes (:meth:`append`, :meth:`delete`,
    :meth:`compact`) are serialised by a lock (and an ``flock`` across processes); readers take :attr:`rows`
    once and use that view throughout.
    """

    def __init__(self, path: Path, info: dict, table, rows: Rows):
        self.path, self.model, self.root = path, info["model"], info["root"]
        self._tbl, self._rows = table, rows
        self.has_tracks = "track" in table.schema.names
        self._lock = threading.RLock()
        self._positions: dict[str, int] | None = None
        self._max_id = int(rows.ids.max()) if rows.n else -1
        self._grow: dict[str, _Growing] | None = None

    # -- opening --------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, model: dict, root: str | None = None) -> Store:
        """A new empty store at ``path`` (which must not exist) for the model identity ``model``; atomic: the
        folder appears complete or not at all."""
        path = Path(path)
        if path.exists() or path.is_symlink():
            raise QAConvError(f"{path} exists: choose another path or remove it first")
        if not path.parent.is_dir():
            raise QAConvError(f"the folder of {path} does not exist: create {path.parent} first")
        tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            write_sidecar(tmp, model, root, atomic=False)
            (tmp / LOCK).touch()
            db = _lancedb().connect(str(tmp), storage_options=OPTIONS)
            db.create_table(TABLE, schema=schema(model["feature_shape"], model["hash"]))
            os.rename(tmp, path)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, (OSError, RuntimeError, ValueError, QAConvError)):
                raise QAConvError(f"cannot write {path}: {os_reason(exc)}") from None
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open and validate the store at ``path`` (every column checked; one line naming what is wrong)."""
        path = Path(path)
        if not path.exists():
            raise QAConvError(f"gallery store {path} does not exist (build it with 'qaconv index GALLERY_DIR "
                              f"--checkpoint RUN -o {path}')")
        from .index import FORMAT as NPZ_FORMAT

        if path.is_file() and _is_old_index(path, NPZ_FORMAT):
            raise QAConvError(f"{path} is a gallery index in the old single-file .npz format, not a store: convert it "
                              f"with 'qaconv index --convert {path} -o NEW_STORE' (or rebuild it with 'qaconv index "
                              "GALLERY_DIR --checkpoint RUN -o NEW_STORE')")
        if not path.is_dir() or not is_store(path):
            raise _corrupt(path, f"expected a folder with {SIDECAR} and {TABLE}.lance, written by 'qaconv index'")
        info = read_sidecar(path)
        try:
            db = _lancedb().connect(str(path), storage_options=OPTIONS)
            table = db.open_table(TABLE)
        except Exception as exc:  # noqa: BLE001 - Lance raises assorted types for a missing or broken table
            raise _corrupt(path, f"table '{TABLE}': {os_reason(exc)}") from None
        _check_schema(path, table.schema, info["model"])
        rows = _load_rows(path, table, db, info["model"]["feature_shape"])
        return cls(path, info, table, rows)

    @property
    def rows(self) -> Rows:
        """The current view (readers: take it once per operation)."""
        return self._rows

    def refresh(self) -> bool:
        """Re-read the table when another process changed it; True when it did."""
        with self._lock:
            return self._sync()

    def _sync(self) -> bool:
        try:
            self._tbl.checkout_latest()
        except Exception as exc:  # noqa: BLE001
            raise _corrupt(self.path, os_reason(exc)) from None
        if self._tbl.version == self._rows.version:
            return False
        db = _lancedb().connect(str(self.path), storage_options=OPTIONS)
        self._set(_load_rows(self.path, self._tbl, db, self.model["feature_shape"]))
        return True

    def _set(self, rows: Rows, grow: dict | None = None) -> None:
        self._rows, self._grow, self._positions = rows, grow, None if grow is None else self._positions
        if rows.n:
            self._max_id = max(self._max_id, int(rows.ids.max()))

    @contextlib.contextmanager
    def _writing(self):
        """Exclusive write access (thread lock + flock), with the view brought up to the table's latest version."""
        with self._lock:
            try:
                lock = open(self.path / LOCK, "a+b")  # noqa: SIM115 - held for the duration of the write
            except OSError as exc:
                raise QAConvError(f"cannot write {self.path}: {os_reason(exc)}") from None
            with lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                self._sync()
                yield

    def positions(self) -> dict[str, int]:
        """path -> position in :attr:`rows` (built on first use, kept up to date by appends)."""
        with self._lock:
            if self._positions is None:
                rows = self._rows
                self._positions = {p: i for i, p in enumerate(rows.paths[: rows.n])}
            return self._positions

    # -- writing --------------------------------------------------------------------------------------------
    def append(self, meta: dict, features: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        """Add rows in one commit; returns their ids (uint64). ``meta``: sequences for the :data:`META_COLUMNS`
        but ``cam`` (camera ids are given to new labels here, :func:`~qaconv.gallery.meta.assign_cam_ids`;
        a ``cam`` sequence, when given, must agree with the store's labels); ``features`` fp16 ``[k, C, h, w]``;
        ``pooled`` float32 ``[k, C]``. Paths already in the store are refused."""
        import pyarrow as pa

        k = len(features)
        if k == 0:
            return np.zeros(0, dtype=np.uint64)
        c, h, w = self.model["feature_shape"]
        feats = np.ascontiguousarray(features, dtype=np.float16).reshape(k, c * h * w)
        vecs = np.ascontiguousarray(pooled, dtype=np.float32).reshape(k, c)
        sch = schema(self.model["feature_shape"], self.model["hash"])
        with self._writing():
            known = self.positions()
            dup = [p for p in meta["path"] if p in known]
            if dup:
                raise QAConvError(f"{len(dup)} of {k} entries are already in the store (e.g. {', '.join(dup[:3])}): "
                                  "remove them first or add other paths")
            meta = dict(meta)
            cams, _ = assign_cam_ids(list(meta["cam_label"]), self._rows.label_ids)
            if "cam" in meta:
                given = {str(lab): int(ci) for lab, ci in zip(meta["cam_label"], meta["cam"], strict=True) if lab}
                taken = {ci: lab for lab, ci in self._rows.label_ids.items()}
                if any(self._rows.label_ids.get(lab, ci) != ci or taken.get(ci, lab) != lab
                       for lab, ci in given.items()):
                    raise QAConvError("camera ids disagree with the store's camera labels")
                cams = np.asarray(meta["cam"], dtype=np.int64)
            meta["cam"] = cams
            meta["track"] = list(meta.get("track") or [""] * k)
            if not self.has_tracks:
                if any(meta["track"]):
                    raise QAConvError(f"store {self.path} was written before tracklets (no 'track' column): rebuild "
                                      f"it with 'qaconv index GALLERY_DIR --checkpoint RUN -o {self.path} "
                                      "--overwrite' to store tracks")
                sch = schema(self.model["feature_shape"], self.model["hash"], tracks=False)
            table = pa.table({
                **{name: pa.array(np.asarray(meta[name]) if name not in ("path", "cam_label", "track") else
                                  list(meta[name]), type=sch.field(name).type) for name in sch.names[:-2]},
                "pooled": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), c),
                "features": pa.FixedSizeBinaryArray.from_buffers(sch.field("features").type, k,
                                                                 [None, pa.py_buffer(feats)]),
            }, schema=sch)
            before = self._max_id
            try:
                self._tbl.add(table)
                new = self._tbl.search().where(f"_rowid >= {before + 1}").select(["path"]).with_row_id(True) \
                    .limit(None).to_arrow()
            except Exception as exc:  # noqa: BLE001 - Lance's I/O errors: one line naming the store
                raise QAConvError(f"cannot write {self.path}: {os_reason(exc)}; the store is unchanged") from None
            ids = new["_rowid"].to_numpy().astype(np.uint64)
            if new["path"].to_pylist() != list(meta["path"]):
                self._sync()  # another writer interleaved (cannot happen under the lock): re-read everything
                pos = self.positions()
                return self._rows.ids[[pos[p] for p in meta["path"]]]
            self._set(self._extended(ids, meta, vecs), self._grow)
            return ids

    def _extended(self, ids: np.ndarray, meta: dict, vecs: np.ndarray) -> Rows:
        old = self._rows
        if self._grow is None:  # first append since loading: wrap the loaded arrays (grown on demand)
            self._grow = {k: _Growing(getattr(old, k)[: old.n]) for k in (*NUMERIC, "pooled")}
        new_cols = {"ids": ids, "pids": meta["pid"], "cams": meta["cam"], "stored_times": meta["time"],
                    "sessions": meta["session"], "frames": meta["frame"], "sources": meta["time_source"],
                    "pooled": vecs}
        cols = {k: self._grow[k].extend(np.asarray(v, dtype=self._grow[k].buf.dtype)) for k, v in new_cols.items()}
        positions = self.positions()
        paths = old.paths if len(old.paths) == old.n else old.paths[: old.n]
        tracks = old.tracks if len(old.tracks) == old.n else old.tracks[: old.n]
        for i, (p, t) in enumerate(zip(meta["path"], meta["track"], strict=True)):
            paths.append(p)
            tracks.append(str(t))
            positions[p] = old.n + i
        labels = dict(old.cam_labels)
        labels.update({int(c): str(lab) for c, lab in zip(meta["cam"], meta["cam_label"], strict=True) if lab})
        self._max_id = max(self._max_id, int(ids.max()))
        return Rows(self._tbl.version, old.n + len(ids), paths=paths, tracks=tracks, cam_labels=labels,
                    _open=old._open, **cols)

    def delete(self, select) -> int:
        """Delete, in one commit, the rows where ``select(rows)`` (a bool mask over a :class:`Rows`) holds; it is
        called with the current rows under the write lock. Returns how many rows were deleted."""
        with self._writing():
            rows = self._rows
            mask = np.asarray(select(rows), dtype=bool)
            if mask.shape != (rows.n,):
                raise ValueError(f"select must give a mask of {rows.n} rows, got shape {mask.shape}")
            if not mask.any():
                return 0
            try:
                result = self._tbl.delete(id_predicate(rows.ids[mask]))
            except Exception as exc:  # noqa: BLE001
                raise QAConvError(f"cannot write {self.path}: {os_reason(exc)}; the store is unchanged") from None
            if result.num_deleted_rows != int(mask.sum()):
                self._sync()
            else:
                self._set(rows.keep(~mask, self._tbl.version))
            return int(result.num_deleted_rows)

    def compact(self, cleanup_older_than: timedelta | None = timedelta(days=7)) -> None:
        """Merge small fragments and drop deleted rows (Lance ``optimize``); versions older than
        ``cleanup_older_than`` (default 7 days, Lance's) are removed from disk. Entry ids stay the same."""
        with self._writing():
            try:
                self._tbl.optimize(cleanup_older_than=cleanup_older_than)
            except Exception as exc:  # noqa: BLE001
                raise QAConvError(f"cannot write {self.path}: {os_reason(exc)}") from None
            rows = self._rows
            self._set(rows.keep(np.ones(rows.n, dtype=bool), self._tbl.version))

    def set_root(self, root: str | None) -> None:
        """Record the folder that relative paths refer to (the JSON file is rewritten atomically)."""
        with self._lock:
            if root != self.root:
                write_sidecar(self.path, self.model, root)
                self.root = root

    # -- reading maps -----------------------------------------------------------------------------------------
    def take(self, rows: Rows, positions: np.ndarray) -> np.ndarray:
        """float16 maps ``[len(positions), C, h, w]`` of ``rows`` at ``positions`` (in that order; repeats
        allowed), read from the table version of ``rows``. Non-finite maps are refused naming their paths."""
        positions = np.asarray(positions, dtype=np.int64)
        c, h, w = self.model["feature_shape"]
        distinct = len(positions) < 2 or bool((np.diff(positions) > 0).all())  # sorted and distinct: the usual case
        uniq, inverse = (positions, None) if distinct else np.unique(positions, return_inverse=True)
        if len(uniq) <= TAKE_BLOCK:
            got = self._take_block(rows, uniq)
        else:
            got = np.empty((len(uniq), c, h, w), dtype=np.float16)
            for b0 in range(0, len(uniq), TAKE_BLOCK):
                block = uniq[b0 : b0 + TAKE_BLOCK]
                got[b0 : b0 + len(block)] = self._take_block(rows, block)
        return got if inverse is None else got[inverse.reshape(-1)]

    def _take_block(self, rows: Rows, positions: np.ndarray) -> np.ndarray:
        c, h, w = self.model["feature_shape"]
        ids = rows.ids[positions]
        try:
            res = rows.table.take_row_ids(ids.tolist()).select(["features"]).with_row_id().to_arrow()
        except Exception as exc:  # noqa: BLE001
            raise _corrupt(self.path, f"reading feature maps: {os_reason(exc)}") from None
        got = res["_rowid"].to_numpy()
        if len(got) != len(ids):
            raise _corrupt(self.path, f"{len(ids) - len(got)} entries' feature maps are missing")
        order = np.argsort(got, kind="stable")[np.searchsorted(np.sort(got), ids)]
        maps = fixed_binary_to_numpy(res["features"], np.float16, c * h * w)[order].reshape(-1, c, h, w)
        ok = np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
        if not ok.all():
            from .extract import check_finite_rows

            check_finite_rows(ok, [rows.paths[i] for i in positions],
                              f"store {self.path} is invalid: field 'features' holds NaN/inf for", "rebuild it")
        return maps

    def verify(self) -> int:
        """Read every feature map: non-finite maps, or pooled vectors that do not match their maps, raise one
        line naming the entries. Returns the number of entries checked."""
        import torch

        from ..models.pooled import PooledCosine

        rows = self._rows
        for b0 in range(0, rows.n, TAKE_BLOCK):
            pos = np.arange(b0, min(b0 + TAKE_BLOCK, rows.n))
            maps = self._take_block(rows, pos)
            want = PooledCosine.embed(torch.from_numpy(maps).float()).numpy()
            bad = np.abs(want - rows.pooled[pos]).max(axis=1) > 1e-3
            if bad.any():
                eg = ", ".join(rows.paths[i] for i in pos[bad][:3])
                raise QAConvError(f"store {self.path} is invalid: field 'pooled' does not match the feature maps of "
                                  f"{int(bad.sum())} entries (e.g. {eg}); rebuild it")
        return rows.n


def _is_old_index(path: Path, npz_format: str) -> bool:
    """True when ``path`` is an npz holding ``format = npz_format`` (read without pickles, nothing else loaded)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return "format" in z.files and str(z["format"]) == npz_format
    except Exception:  # noqa: BLE001 - anything unreadable is simply not an old index
        return False


def fixed_binary_to_numpy(column, dtype, per_row: int) -> np.ndarray:
    """A (chunked) Arrow fixed-size-binary column as a numpy ``[n, per_row]`` array of ``dtype`` (one copy)."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError("null feature maps")
    width = np.dtype(dtype).itemsize * per_row
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width)
    return data.view(dtype).reshape(len(arr), per_row)


def id_predicate(ids: np.ndarray) -> str:
    """A Lance SQL filter selecting the rows with these ids: runs of consecutive ids as ranges, the rest IN (...)."""
    ids = np.unique(np.asarray(ids, dtype=np.uint64)).astype(np.int64)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts, ends = ids[np.r_[0, breaks]], ids[np.r_[breaks - 1, len(ids) - 1]]
    parts, single = [], []
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        if b - a >= 2:
            parts.append(f"(_rowid >= {a} AND _rowid <= {b})")
        else:
            single += list(range(a, b + 1))
    if single:
        parts.append(f"_rowid IN ({', '.join(map(str, single))})")
    return " OR ".join(parts)


def _check_schema(path: Path, actual, model: dict) -> None:
    names = [f.name for f in actual]
    want = schema(model["feature_shape"], model["hash"], tracks="track" in names)
    if names != want.names:
        raise _corrupt(path, f"columns {names}, expected {want.names}")
    for f in want:
        if actual.field(f.name).type != f.type:
            raise _invalid(path, f.name, f"of type {f.type}", str(actual.field(f.name).type))
    meta = {k.decode(): v.decode() for k, v in (actual.metadata or {}).items()}
    if meta.get("qaconv_format") != FORMAT:
        raise _corrupt(path, f"the table does not say format '{FORMAT}'")
    if meta.get("qaconv_model_hash") != model["hash"] or meta.get("qaconv_feature_shape") != \
            want.metadata[b"qaconv_feature_shape"].decode():
        raise _corrupt(path, f"the table was written for another model than {SIDECAR} names")


def _load_rows(path: Path, table, db, feature_shape) -> Rows:
    """Every column but the maps, validated (one line naming the field and what it must be). The table is read in
    batches straight into the final arrays, so the peak is the columns plus one batch."""
    c = int(feature_shape[0])
    columns = META_COLUMNS if "track" in table.schema.names else OLD_META_COLUMNS
    try:
        version = table.version
        capacity = table.count_rows()
        reader = table.search().select([*columns, "pooled"]).with_row_id(True).limit(None) \
            .to_batches(batch_size=LOAD_BATCH)
        cols, paths, tracks, pairs = _read_batches(path, reader, columns, c, capacity)
    except QAConvError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _corrupt(path, f"reading the table: {os_reason(exc)}") from None

    def pinned(v: int):
        t = db.open_table(TABLE)
        t.checkout(v)
        return t

    labels = _validate(path, cols, paths, pairs)
    return Rows(version, len(paths), paths=paths, tracks=tracks if tracks is not None else [""] * len(paths),
                cam_labels=labels, _open=pinned, **cols)


def _read_batches(path: Path, reader, columns, c: int, capacity: int):
    """``(numeric columns and pooled, paths, tracks or None, {(cam, label)} pairs)`` from a batch reader."""
    import pyarrow as pa

    names = {"_rowid": "ids", "pid": "pids", "cam": "cams", "time": "stored_times", "session": "sessions",
             "frame": "frames", "time_source": "sources"}
    grow = {k: _Growing.empty(capacity, (), dt) for k, dt in NUMERIC.items()}
    grow["pooled"] = _Growing.empty(capacity, (c,), np.float32)
    paths, tracks, pairs = [], [] if "track" in columns else None, set()
    for batch in reader:
        for name in batch.schema.names:
            if batch.column(name).null_count:
                raise _invalid(path, name, "set in every row", f"{batch.column(name).null_count} nulls")
        for name, key in names.items():
            grow[key].extend(batch.column(name).to_numpy(zero_copy_only=False).astype(NUMERIC[key], copy=False))
        grow["pooled"].extend(batch.column("pooled").flatten().to_numpy(zero_copy_only=False).reshape(-1, c))
        paths += batch.column("path").to_pylist()
        if tracks is not None:
            tracks += batch.column("track").to_pylist()
        distinct = pa.table({"c": batch.column("cam"), "l": batch.column("cam_label")}).group_by(["c", "l"]) \
            .aggregate([])
        pairs.update(zip(distinct["c"].to_pylist(), distinct["l"].to_pylist(), strict=True))
    return {k: g.buf[: g.n] for k, g in grow.items()}, paths, tracks, pairs


def _validate(path: Path, cols: dict, paths: list, pairs: set) -> dict:
    """Check every loaded column (``pairs``: the distinct (camera id, camera label) of the rows); returns the camera
    id -> label map."""
    from .extract import check_finite_rows

    if len(set(paths)) != len(paths) or any(not p for p in paths):
        raise _invalid(path, "path", "distinct, non-empty strings")
    pids, cams, src = cols["pids"], cols["cams"], cols["sources"]
    if (pids < UNKNOWN).any():
        raise _invalid(path, "pid", f"integers >= {UNKNOWN} ({UNKNOWN} = unknown)", str(int(pids.min())))
    if (cams < UNKNOWN).any():
        raise _invalid(path, "cam", f"integers >= {UNKNOWN} ({UNKNOWN} = unknown)", str(int(cams.min())))
    if any((ci == UNKNOWN) != (lab == "") for ci, lab in pairs):
        raise _invalid(path, "cam", f"{UNKNOWN} exactly where 'cam_label' is empty", "a mismatch")
    known = {(ci, lab) for ci, lab in pairs if ci != UNKNOWN}
    if len({ci for ci, _ in known}) != len(known) or len({lab for _, lab in known}) != len(known):
        raise _invalid(path, "cam", "one id per camera label", "a label with several ids or an id with several labels")
    if not np.isin(src, (TIME_NONE, TIME_NAME, TIME_MANIFEST)).all():
        raise _invalid(path, "time_source", f"{TIME_NONE} (none), {TIME_NAME} (name) or {TIME_MANIFEST} (manifest)",
                       str(sorted(set(src.tolist()) - {TIME_NONE, TIME_NAME, TIME_MANIFEST})))
    times = cols["stored_times"]
    stored = src == TIME_MANIFEST
    if not np.isfinite(times[stored]).all() or not np.isnan(times[~stored]).all():
        raise _invalid(path, "time", "finite seconds where 'time_source' is 2 (manifest), NaN elsewhere",
                       f"{int((~np.isfinite(times[stored])).sum() + (~np.isnan(times[~stored])).sum())} rows")
    named = src == TIME_NAME
    for name, key in (("session", "sessions"), ("frame", "frames")):
        col = cols[key]
        if (col[named] < 0).any() or (col[named] > (9 if name == "session" else sys.maxsize)).any():
            raise _invalid(path, name, "numbers >= 0 (sessions <= 9) where the time comes from a Market name")
        if (col[~named] != UNKNOWN).any():
            raise _invalid(path, name, f"{UNKNOWN} where the time does not come from a Market name")
    label_of = dict(pairs)
    if not all(re.fullmatch(r"c\d", label_of[ci]) for ci in np.unique(cams[named]).tolist()):
        raise _invalid(path, "cam_label", "'cN' for Market-name times")
    pooled = cols["pooled"]
    check_finite_rows(np.isfinite(pooled).all(axis=1), paths,
                      f"store {path} is invalid: field 'pooled' holds NaN/inf for", "rebuild it")
    norms = np.linalg.norm(pooled, axis=1)
    if len(norms) and not ((np.abs(norms - 1) < 1e-3) | (norms == 0)).all():
        raise _invalid(path, "pooled", "unit-norm vectors", f"norms from {norms.min():.4g} to {norms.max():.4g}")
    return {int(ci): str(lab) for ci, lab in known}
