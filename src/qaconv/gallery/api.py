"""``qaconv.Gallery``: a gallery of person images that grows, searched with QAConv.

A gallery is a store folder (:mod:`qaconv.gallery.store`: LanceDB table + JSON naming the model) opened with
the model that made it. It appends without rewriting, removes by path, camera or time (retention), filters
by camera and time window at search time and reads only the feature maps it re-scores.

Example::

    g = Gallery.create("shop.gallery", "runs/r50")              # a new, empty store for this checkpoint
    g.add(["cam1/0001.jpg", "cam2/0007.jpg"], [{"cam": "1", "time": 12.0}, {"cam": "2", "time": 15.5}])
    g.add_folder("more_images")                                 # every image not in the store yet
    hits = g.search(["probe.jpg"], top=10, cameras=["2"], time_window=(0, 3600))
    hits = g.search(crops, query_tracks=[7] * len(crops), group_by_track=True)  # a tracklet against tracklets
    g.export("vectors/")                                        # pooled.npy + metadata.csv for a vector DB
    g.remove(before=time.time() - 30 * 86400)                   # keep 30 days
    len(g)

Thread-safety: one writer and many readers in one process (a search uses the rows as they were when it
started; an add or remove is seen by searches that start after it returns). Writers of several processes
are serialised by a file lock; a process sees another's writes after :meth:`Gallery.refresh`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import QAConvError
from .extract import check_query_maps, half_maps, iter_extract, list_images
from .identity import check_identity, model_identity
from .meta import (
    TIME_MANIFEST,
    TIME_NAME,
    TIME_NONE,
    UNKNOWN,
    ImageMeta,
    folder_meta,
    parse_name,
    read_gallery_manifest,
)
from .query import (
    AGGREGATES,
    allowed_rows,
    entry,
    hits,
    query_cams,
    query_metadata,
    search_groups,
    search_rows,
    tlift_rows,
)
from .store import Store, is_store

ADD_CHUNK = 4096  # images extracted and committed at a time by add_folder
META_KEYS = {"path", "pid", "cam", "time", "track"}
EXPORT_FORMATS = ("csv", "parquet")


def _is_maps(items, shape) -> bool:
    return isinstance(items, (torch.Tensor, np.ndarray)) and items.ndim == 4 and tuple(items.shape[1:]) == \
        tuple(shape) and (items.dtype.kind == "f" if isinstance(items, np.ndarray) else items.is_floating_point())


def _entry_meta(i: int, md: dict, default_path) -> tuple[str, ImageMeta]:
    """``(path, ImageMeta)`` of one metadata dict; a dict with pid, cam or time says all that is known (like a
    manifest row), else the Market-style file name does. ``track``: the tracklet label (default none)."""
    if not isinstance(md, dict):
        raise QAConvError(f"metadata {i} must be a dict with keys from {sorted(META_KEYS)}, got {type(md).__name__}")
    unknown = set(md) - META_KEYS
    if unknown:
        raise QAConvError(f"metadata {i} has unknown key(s) {sorted(unknown)}; expected {sorted(META_KEYS)}")
    path = md.get("path", default_path)
    if not isinstance(path, (str, Path)) or not str(path):
        raise QAConvError(f"metadata {i} needs a 'path' (a non-empty string naming the entry)")
    path = str(path)
    track = md.get("track")
    if track is not None and (isinstance(track, bool) or not isinstance(track, (str, int, np.integer))):
        raise QAConvError(f"metadata {i} ({path}): 'track' must be a tracklet label (text or integer), got {track!r}")
    track = "" if track is None else str(track)
    if not ({"pid", "cam", "time"} & set(md)):
        return path, replace(parse_name(path), track=track)
    pid, cam, t = md.get("pid", UNKNOWN), md.get("cam", ""), md.get("time")
    if isinstance(pid, bool) or not isinstance(pid, (int, np.integer)) or pid < UNKNOWN:
        raise QAConvError(f"metadata {i} ({path}): 'pid' must be an integer >= -1 (-1 = unknown), got {pid!r}")
    if cam is None or isinstance(cam, bool) or not isinstance(cam, (str, int, np.integer)):
        raise QAConvError(f"metadata {i} ({path}): 'cam' must be a camera label (text or integer), got {cam!r}")
    if t is not None:
        try:
            t = float(t)
        except (TypeError, ValueError):
            t = math.nan
        if not math.isfinite(t):
            raise QAConvError(f"metadata {i} ({path}): 'time' must be a finite number of seconds, got {md['time']!r}")
    return path, ImageMeta(int(pid), str(cam), UNKNOWN, UNKNOWN, math.nan if t is None else t,
                           TIME_NONE if t is None else TIME_MANIFEST, track)


def _columns(paths: list[str], metas: list[ImageMeta]) -> dict:
    return {"path": paths, "pid": [m.pid for m in metas], "cam_label": [m.cam_label for m in metas],
            "time": [m.time if m.time_source == TIME_MANIFEST else math.nan for m in metas],
            "session": [m.session if m.time_source == TIME_NAME else UNKNOWN for m in metas],
            "frame": [m.frame if m.time_source == TIME_NAME else UNKNOWN for m in metas],
            "time_source": [m.time_source for m in metas], "track": [m.track for m in metas]}


class Gallery:
    """A growing gallery of person images searched with QAConv (see the module docstring).

    Make one with :meth:`create` or :meth:`open`. ``len(gallery)`` is the number of entries.
    """

    def __init__(self, store: Store, checkpoint=None, device=None, batch_size: int = 64):
        self._store = store
        self._checkpoint = checkpoint
        self._device, self._batch_size = device, int(batch_size)
        self._extractor = None
        self._model_lock = threading.Lock()

    # -- making and opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, checkpoint: str | Path, *, device=None, batch_size: int = 64,
               root: str | Path | None = None) -> Gallery:
        """A new, empty gallery store at ``path`` (must not exist) for the model of ``checkpoint`` (a
        ``checkpoint.pt`` or its run folder). ``device``: where the model runs (default: CUDA if available);
        ``batch_size``: images per forward pass (default 64); ``root``: the folder relative paths refer to
        (default: none)."""
        from ..extractor import FeatureExtractor

        extractor = FeatureExtractor(checkpoint, device=device, batch_size=batch_size)
        identity = model_identity(extractor)
        store = Store.create(path, identity, None if root is None else str(Path(root).resolve()))
        g = cls(store, checkpoint, device, batch_size)
        g._extractor = extractor
        return g

    @classmethod
    def open(cls, path: str | Path, checkpoint: str | Path | None = None, *, device=None,
             batch_size: int = 64) -> Gallery:
        """Open the gallery store at ``path`` (validated; one line when it is not a store). The model is loaded
        when first needed, from ``checkpoint`` (default: the one the store records) and must be the store's.
        ``device`` and ``batch_size`` as for :meth:`create`. An old ``.npz`` index is refused naming the command
        that converts it."""
        return cls(Store.open(path), checkpoint, device, batch_size)

    @classmethod
    def convert(cls, index_path: str | Path, path: str | Path) -> Gallery:
        """A store at ``path`` holding every entry of an old single-file ``.npz`` index (maps, metadata and model
        identity as they are; no model needed)."""
        from .index import load_index

        index = load_index(index_path)
        identity = {"checkpoint": index.model_checkpoint, "hash": index.model_hash,
                    "feature_shape": index.feature_shape}
        store = Store.create(path, identity, index.root)
        named = index.time_sources == TIME_NAME
        for s in range(0, len(index), ADD_CHUNK):
            sl = slice(s, s + ADD_CHUNK)
            meta = {"path": index.paths[sl].tolist(), "pid": index.pids[sl], "cam": index.cams[sl],
                    "cam_label": index.cam_labels[sl].tolist(),
                    "time": np.where(index.time_sources[sl] == TIME_MANIFEST, index.times[sl], np.nan),
                    "session": np.where(named[sl], index.sessions[sl], UNKNOWN),
                    "frame": np.where(named[sl], index.frames[sl], UNKNOWN), "time_source": index.time_sources[sl]}
            store.append(meta, index.features[sl], index.pooled[sl])
        return cls(store)

    # -- what it holds ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._store.rows.n

    def __contains__(self, path) -> bool:
        return str(path) in self._store.positions()

    def __repr__(self) -> str:
        c, h, w = self.feature_shape
        return f"Gallery({str(self.path)!r}, {len(self)} entries, maps {c}x{h}x{w})"

    @property
    def path(self) -> Path:
        """The store folder."""
        return self._store.path

    @property
    def root(self) -> str | None:
        """The folder that relative entry paths refer to (set by :meth:`add_folder`), or None."""
        return self._store.root

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the stored maps."""
        return tuple(self._store.model["feature_shape"])

    @property
    def model(self) -> dict:
        """The model identity recorded in the store: ``{"checkpoint", "hash", "feature_shape"}``."""
        return dict(self._store.model)

    @property
    def paths(self) -> list[str]:
        """Entry paths, in row order."""
        rows = self._store.rows
        return list(rows.paths[: rows.n])

    @property
    def times(self) -> np.ndarray:
        """Seconds per entry, in row order (NaN unknown; Market-name times chained over the store's names)."""
        return self._store.rows.times.copy()

    def refresh(self) -> bool:
        """See the writes of other processes (re-reads the columns when the table changed); True when it did."""
        return self._store.refresh()

    @property
    def extractor(self):
        """The :class:`~qaconv.extractor.FeatureExtractor` of the store's model (loaded on first use; another
        model than the store's is refused)."""
        with self._model_lock:
            if self._extractor is None:
                from ..extractor import FeatureExtractor

                ckpt = self._checkpoint if self._checkpoint is not None else self._store.model["checkpoint"]
                if self._checkpoint is None and not Path(ckpt).exists():
                    raise QAConvError(f"the checkpoint this store was built with, {ckpt}, does not exist: open it "
                                      "with the checkpoint (Gallery.open(path, checkpoint) / --checkpoint)")
                extractor = FeatureExtractor(ckpt, device=self._device, batch_size=self._batch_size)
                check_identity(self._store.model, model_identity(extractor), f"the gallery store {self.path}",
                               "rebuild the store")
                self._extractor = extractor
            return self._extractor

    # -- writing ----------------------------------------------------------------------------------------------
    def add(self, items, metadata: Sequence[dict] | None = None) -> np.ndarray:
        """Add entries in one commit; returns their ids (int64, stable: never changed nor reused).

        ``items``: images (file paths, PIL images, arrays or tensors, as :class:`~qaconv.extractor.FeatureExtractor`
        takes them) or their feature maps (a float ``[N, C, h, w]`` tensor / array of the store's shape).
        ``metadata``: one dict per item with keys ``path`` (the entry's unique name; default: the item when
        it is a file path), ``pid`` (int, default -1 = unknown), ``cam`` (camera label, default unknown) and
        ``time`` (seconds, default none); a dict without pid, cam or time takes them from a Market-style
        ``path`` (``0002_c1s1_000451_03.jpg``). Paths already in the store, non-finite maps and bad
        metadata are refused in one line before anything is written.
        """
        if _is_maps(items, self.feature_shape):
            n = len(items)
            maps = torch.as_tensor(items).float()
            defaults = [None] * n
        else:
            items = list(items) if isinstance(items, (list, tuple)) else [items]
            n = len(items)
            defaults = [str(x) if isinstance(x, (str, Path)) else None for x in items]
            maps = None
        metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
        if len(metadata) != n:
            raise QAConvError(f"add got {n} items but {len(metadata)} metadata dicts")
        entries = [_entry_meta(i, md, d) for i, (md, d) in enumerate(zip(metadata, defaults, strict=True))]
        paths = [p for p, _ in entries]
        if len(set(paths)) != len(paths):
            twice = sorted({p for p in paths if paths.count(p) > 1})
            raise QAConvError(f"add got the path(s) {', '.join(twice[:3])} more than once")
        known = self._store.positions()
        dup = [p for p in paths if p in known]
        if dup:
            raise QAConvError(f"{len(dup)} of {n} entries are already in the store (e.g. {', '.join(dup[:3])}): "
                              "remove them first or add other paths")
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        what = "the model gave" if maps is None else "got"
        if maps is None:
            maps = self.extractor(items)
        feats, pooled = half_maps(maps, paths, f"{what} non-finite feature maps (NaN/inf, or float16 overflow) for")
        ids = self._store.append(_columns(paths, [m for _, m in entries]), feats, pooled)
        return ids.astype(np.int64)

    def add_folder(self, folder: str | Path, manifest: str | Path | None = None, workers: int = 2,
                   progress: bool = True, chunk: int = ADD_CHUNK, cam_from_folder: bool = False) -> dict:
        """Add every image under ``folder`` whose path relative to it is not in the store yet (O(new images)).

        ``manifest``: optional ``path,pid,camid[,time][,track]`` CSV overriding Market-style names (and
        ``cam_from_folder``); ``cam_from_folder``: the camera label of an image is the name of the folder it
        lies in (``camA/img_001.jpg`` -> ``camA``; an image directly in ``folder`` is refused); ``workers``:
        image-decoding threads (default 2); ``chunk``: images extracted and committed at a time (default
        4096; a kill keeps the chunks committed before it). Sets :attr:`root` to ``folder``. Returns a report:
        ``added``, ``skipped`` (already in the store), ``unreadable`` ([(path, reason)]), ``manifest_unmatched``,
        ``not_images`` (relative paths of the files that are not images, see
        :data:`~qaconv.data.filetypes.IMAGE_SUFFIXES`).
        """
        from ..data.filetypes import IMAGE_TYPES, describe_skipped

        root = Path(folder).resolve()
        others: list[str] = []
        rel = list_images(folder, others)
        if not rel:
            raise QAConvError(f"no images ({IMAGE_TYPES}) in gallery folder {folder}"
                              + (f"; {describe_skipped(others)}" if others else ""))
        man = read_gallery_manifest(manifest) if manifest else None
        unmatched = len(set(man) - {str((root / p).resolve()) for p in rel}) if man else 0
        named = folder_meta if cam_from_folder else (lambda p, _root: parse_name(p))
        if cam_from_folder:  # refuse an image outside camera folders before any work
            for p in rel:
                if man is None or str((root / p).resolve()) not in man:
                    named(p, folder)
        known = self._store.positions()
        todo = [p for p in rel if p not in known]
        report = {"added": 0, "skipped": len(rel) - len(todo), "unreadable": [], "manifest_unmatched": unmatched,
                  "not_images": others}
        if todo:
            extractor = self.extractor
            self._store.set_root(str(root))
            for feats, pooled, kept, bad in iter_extract(extractor, root, todo, workers, progress, chunk):
                report["unreadable"] += bad
                if kept:
                    metas = [(man or {}).get(str((root / p).resolve())) or named(p, folder) for p in kept]
                    self._store.append(_columns(kept, metas), feats, pooled)
                    report["added"] += len(kept)
        return report

    def remove(self, paths=None, cameras=None, before: float | None = None, after: float | None = None) -> int:
        """Remove the entries matching every criterion given, in one commit; returns how many were removed.

        ``paths``: entry paths; ``cameras``: camera labels; ``before`` / ``after``: seconds: entries whose time
        is < ``before`` / > ``after`` (entries without a time never match a time criterion). E.g. retention:
        ``remove(before=now - 30 * 86400)``; one camera's old entries: ``remove(cameras=["c3"], before=t)``.
        At least one criterion is required."""
        if paths is None and cameras is None and before is None and after is None:
            raise QAConvError("remove needs at least one of paths, cameras, before or after")
        bounds = {}
        for name, bound in (("before", before), ("after", after)):
            if bound is not None:
                try:
                    bounds[name] = float(bound)
                except (TypeError, ValueError):
                    raise QAConvError(f"{name} must be a number of seconds, got {bound!r}") from None
                if math.isnan(bounds[name]):
                    raise QAConvError(f"{name} must be a number of seconds, got NaN")
        wanted = None if paths is None else {str(paths)} if isinstance(paths, (str, Path)) else {str(p) for p in paths}

        def select(rows):
            mask = np.ones(rows.n, dtype=bool)
            if wanted is not None:
                mask &= np.fromiter((p in wanted for p in rows.paths[: rows.n]), dtype=bool, count=rows.n)
            if cameras is not None:
                mask &= allowed_rows(rows, cameras=cameras)
            t = rows.times
            if "before" in bounds:
                mask &= np.isfinite(t) & (t < bounds["before"])
            if "after" in bounds:
                mask &= np.isfinite(t) & (t > bounds["after"])
            return mask

        return self._store.delete(select)

    def compact(self, cleanup_older_than=None) -> None:
        """Merge the small fragments that appends leave and drop removed rows from disk (Lance ``optimize``).
        ``cleanup_older_than``: a ``datetime.timedelta``; table versions older than it are deleted from disk
        (default 7 days; a reader of another process still on such a version would fail)."""
        from datetime import timedelta

        self._store.compact(timedelta(days=7) if cleanup_older_than is None else cleanup_older_than)

    def verify(self) -> int:
        """Read every stored map: non-finite maps, or pooled vectors that do not match their maps, raise one
        line naming entries. Returns the number checked. (Opening checks every other column.)"""
        return self._store.verify()

    # -- searching --------------------------------------------------------------------------------------------
    def _queries(self, queries, query_cameras=None, query_names=None):
        """``(float32 maps [Q, C, h, w], names or None, camera labels or None)`` of the queries."""
        if _is_maps(queries, self.feature_shape):
            maps, names = torch.as_tensor(queries).float(), None
        else:
            items = list(queries) if isinstance(queries, (list, tuple)) else [queries]
            names = [Path(x).name if isinstance(x, (str, Path)) else "" for x in items]
            maps = self.extractor(items) if items else torch.zeros(0, *self.feature_shape)
        if tuple(maps.shape[1:]) != self.feature_shape:
            raise QAConvError(f"query maps {tuple(maps.shape[1:])} differ from the store's {self.feature_shape}")
        check_query_maps(maps)
        if query_names is not None:
            names = [Path(str(x)).name for x in query_names]
            if len(names) != len(maps):
                raise QAConvError(f"query_names needs {len(maps)} names (one per query), got {len(names)}")
        if query_cameras is not None:
            labels = [str(query_cameras)] * len(maps) if isinstance(query_cameras, (str, int)) else \
                [str(c) for c in query_cameras]
            if len(labels) != len(maps):
                raise QAConvError(f"query_cameras needs one label or {len(maps)} (one per query), got {len(labels)}")
        else:
            labels = None if names is None else [parse_name(n).cam_label for n in names]
        return maps, names, labels

    @property
    def cameras(self) -> list[str]:
        """The camera labels of the entries, sorted."""
        return sorted(self._store.rows.label_ids)

    def check_cameras(self, labels, what: str = "camera") -> None:
        """Refuse camera ``labels`` (empty ones skipped) that no entry has, in one line listing the known ones."""
        known = self._store.rows.label_ids
        unknown = sorted({str(lab) for lab in labels if lab not in (None, "") and str(lab) not in known})
        if unknown:
            listed = ", ".join(sorted(known)[:20]) + (" ..." if len(known) > 20 else "") if known else "none"
            raise QAConvError(f"{what} {', '.join(unknown[:5])} {'is' if len(unknown) == 1 else 'are'} not in the "
                              f"store {self.path} (its cameras: {listed})")

    def _exclusion(self, rows, labels, exclude, count: int):
        """Per query a camera id whose entries are left out (-2: none), or None: ``exclude`` True needs every
        query's camera, None (auto) leaves out the camera of each query whose camera is known."""
        if exclude is False:
            return None
        known = labels is not None and all(labels)
        if exclude and not known:
            raise QAConvError("exclude_same_camera needs each query's camera: query_cameras= or Market-style "
                              "query file names")
        if labels is None or not any(labels):
            return None
        ids = query_cams(rows, labels)
        return np.where([bool(lab) for lab in labels], ids, -2)[:count]

    def search(self, queries, top: int = 10, candidates: int = 100, *, cameras=None, time_window=None,
               exclude_same_camera: bool | None = False, query_cameras=None, query_names=None,
               query_tracks=None, aggregate: str = "mean", group_by_track: bool = False,
               exhaustive: bool | None = None, memory: int | None = None) -> list[list[dict]]:
        """Rank the gallery for each query by QAConv: per query a list of up to ``top`` hits, best first, each
        ``{"rank", "score" (QAConv logit), "path", "pid", "cam", "row" (entry id), "time", "track"}`` (None
        where unknown).

        ``queries``: images (paths, PIL, arrays, tensors) or float feature maps ``[Q, C, h, w]``. ``top``: hits
        per query (default 10). ``candidates``: M, the pooled-cosine shortlist re-scored exactly (default 100).
        ``cameras``: only entries of these camera labels (labels no entry has match nothing); ``time_window``:
        ``(start, end)`` seconds, inclusive (None = open end; entries without time are left out);
        ``exclude_same_camera``: leave out the entries of each query's own camera (from ``query_cameras``, one
        label or one per query, else Market-style query names; ``query_names``: file names standing for
        feature-map queries): False (default) = never, True = always (every query's camera needed), None = for
        each query whose camera is known. ``exhaustive``: None (default) = exhaustive when at most M entries
        pass the filters, True = always, False = always two stages. ``memory``: bytes per matching block
        (default 256 MB).

        Tracklets: ``query_tracks``: one label per query (None: the query alone); queries with the same label
        form one tracklet query (its crops must share a camera) and the result holds one list per tracklet
        query, in order of first appearance. ``group_by_track``: results are gallery tracklets (the entries of
        one camera with one ``track`` label; an entry without track stands alone), not crops. A pair's score
        is the ``aggregate`` (``"mean"``, default, or ``"max"``) of the logits of its crop pairs; with either
        option each hit adds ``"crops"`` (gallery crops aggregated), ``"query_crop"`` (index in ``queries``
        of the crop of the best pair) and ``"pair_score"`` (that pair's logit); ``path``, ``row`` ... name the
        gallery crop of the best pair. With tracklets, two stages score every crop pair of the union of the
        query crops' shortlists (widened to whole gallery tracklets).
        """
        rows = self._store.rows
        maps, _, labels = self._queries(queries, query_cameras, query_names)
        top, candidates = _check_top(top), _check_top(candidates, "candidates")
        allowed = allowed_rows(rows, cameras, time_window)
        if query_tracks is None and not group_by_track:
            q_cams = self._exclusion(rows, labels, exclude_same_camera, len(maps))
            scores, pos = search_rows(rows, self._store.take, self.extractor.matcher, maps, top, candidates, allowed,
                                      q_cams, exhaustive, self._device, memory)
            return hits(rows, scores, pos)
        if aggregate not in AGGREGATES:
            raise QAConvError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        gid, firsts = query_groups(query_tracks, len(maps))
        group_labels = None if labels is None else _group_cameras(labels, gid, len(firsts), query_tracks)
        q_cams = self._exclusion(rows, group_labels, exclude_same_camera, len(firsts))
        ranked = search_groups(rows, self._store.take, self.extractor.matcher, maps, gid, q_cams, top, candidates,
                               allowed, bool(group_by_track), aggregate, exhaustive, self._device, memory)
        times = rows.times
        return [[{"rank": r + 1, "score": sc, **entry(rows, g, times), "crops": n, "query_crop": qc,
                  "pair_score": ps} for r, (sc, g, qc, ps, n) in enumerate(found)] for found in ranked]

    def query_metadata(self, names, cam_labels=None, times=None):
        """``(pids, cam ids, cam labels, times, gallery times)`` of queries named ``names`` (see
        :func:`qaconv.gallery.query.query_metadata`)."""
        return query_metadata(self._store.rows, names, cam_labels, times)

    def tlift_search(self, queries, top: int = 10, candidates: int = 100, *, query_cameras=None,
                     query_times=None, query_names=None, tau: float = 100.0, sigma: float = 200.0, tlift_k: int = 10,
                     alpha: float = 0.2, cameras=None, time_window=None, exhaustive: bool | None = None,
                     memory: int | None = None, exclude_same_camera: bool | None = False) -> list[list[dict]]:
        """Rank by TLift-lifted similarity (QAConv logits -> sigma(logit), lifted by camera / time co-occurrence,
        :func:`qaconv.tlift.tlift`); hits as :meth:`search` with ``score`` the lifted similarity.

        Query cameras and times come from Market-style names (of the query files, or ``query_names`` for
        feature-map queries) unless given (``query_cameras``, ``query_times``: one value or one per query);
        Market-name times are chained over the store's and the queries' names.
        Every entry passing the filters needs a camera and a time. TLift parameters (defaults as the
        official code): ``tau`` co-occurrence window (100 s), ``sigma`` Gaussian width (200 s), ``tlift_k``
        (10), ``alpha`` regulariser (0.2). Over every entry passing the filters when ``exhaustive`` (None =
        when at most ``candidates`` pass), else over the union of the queries' pooled-cosine shortlists.
        ``exclude_same_camera`` (as :meth:`search`): same-camera entries are dropped from a query's ranking
        after lifting (as re-ID evaluation does); they still count as TLift's pivots.
        """
        rows = self._store.rows
        maps, names, labels = self._queries(queries, query_cameras, query_names)
        n = len(maps)
        if query_times is not None:
            query_times = [float(query_times)] * n if np.ndim(query_times) == 0 else list(query_times)
            if len(query_times) != n:
                raise QAConvError(f"query_times needs one value or {n} (one per query), got {len(query_times)}")
        names = names if names is not None else [""] * n
        _, q_cams, labels, q_times, g_times = query_metadata(rows, names, labels, query_times)
        excluded = self._exclusion(rows, labels, exclude_same_camera, n)
        allowed = allowed_rows(rows, cameras, time_window)
        scores, pos = tlift_rows(rows, self._store.take, self.extractor.matcher, maps, q_cams, q_times, g_times,
                                 _check_top(top), _check_top(candidates, "candidates"), allowed, exhaustive,
                                 self._device, memory, tau, sigma, tlift_k, alpha, excluded)
        return hits(rows, scores, pos)

    # -- export -----------------------------------------------------------------------------------------------
    def export(self, folder: str | Path, format: str = "csv") -> dict:
        """Write the pooled vectors and the metadata for a vector database of one's own: ``folder/pooled.npy``
        (float32 ``[N, C]``, unit L2 norm: the first search stage's vectors, cosine = dot product) and
        ``folder/metadata.csv`` (``format="parquet"``: ``metadata.parquet``), row i describing vector i:
        ``row`` (the entry's stable id), ``path``, ``pid``, ``camera``, ``time`` (seconds), ``track``; unknown
        values are empty cells (Parquet: nulls). Each file is written atomically. Returns ``{"pooled",
        "metadata", "entries"}``."""
        import csv
        import io

        from ..atomic import atomic_write

        if format not in EXPORT_FORMATS:
            raise QAConvError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise QAConvError(f"{folder} exists and is not a folder: name a folder for pooled.npy and the metadata")
        rows = self._store.rows
        times = rows.times
        cols = {"row": rows.ids.astype(np.int64).tolist(), "path": list(rows.paths[: rows.n]),
                "pid": [int(p) if p >= 0 else None for p in rows.pids],
                "camera": [rows.label(c) or None for c in rows.cams],
                "time": [float(t) if np.isfinite(t) else None for t in times],
                "track": [t or None for t in rows.tracks[: rows.n]]}
        pooled = atomic_write(folder / "pooled.npy", lambda f: np.save(f, np.ascontiguousarray(rows.pooled,
                                                                                                np.float32)))
        if format == "csv":
            text = io.StringIO()
            w = csv.writer(text, lineterminator="\n")
            w.writerow(list(cols))
            w.writerows([["" if v is None else repr(v) if isinstance(v, float) else v for v in r]
                         for r in zip(*cols.values(), strict=True)])
            meta = atomic_write(folder / "metadata.csv", lambda f: f.write(text.getvalue().encode("utf-8")))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            types = {"row": pa.int64(), "path": pa.string(), "pid": pa.int64(), "camera": pa.string(),
                     "time": pa.float64(), "track": pa.string()}
            table = pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})
            meta = atomic_write(folder / "metadata.parquet", lambda f: pq.write_table(table, f))
        return {"pooled": pooled, "metadata": meta, "entries": rows.n}


def query_groups(query_tracks, n: int) -> tuple[np.ndarray, list[int]]:
    """``(group per query [n] int64, first query of each group)``: queries with the same ``query_tracks`` label
    form a group, a None label a group of its own; groups are numbered by first appearance."""
    if query_tracks is None:
        return np.arange(n, dtype=np.int64), list(range(n))
    tracks = list(query_tracks) if not isinstance(query_tracks, (str, bytes)) else None
    if tracks is None or len(tracks) != n:
        raise QAConvError(f"query_tracks needs one label per query ({n}), got "
                          f"{'a string' if tracks is None else len(tracks)}")
    seen: dict = {}
    gid = np.empty(n, dtype=np.int64)
    firsts = []
    for i, t in enumerate(tracks):
        key = ("#alone", i) if t is None else ("track", t)
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(i)
        gid[i] = seen[key]
    return gid, firsts


def _group_cameras(labels, gid, count: int, tracks) -> list[str]:
    """The camera label of each query group: its crops' (one, or unknown ''); a group of several cameras is
    refused."""
    out = []
    for g in range(count):
        cams = {labels[i] for i in np.flatnonzero(gid == g)} - {""}
        if len(cams) > 1:
            first = int(np.flatnonzero(gid == g)[0])
            raise QAConvError(f"query tracklet {tracks[first]!r} mixes cameras {', '.join(sorted(cams))}: "
                              "a tracklet is one camera's")
        out.append(cams.pop() if cams else "")
    return out


def _check_top(value, name: str = "top") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise QAConvError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


__all__ = ["Gallery", "is_store"]
