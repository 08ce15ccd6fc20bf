"""A searchable gallery index: feature maps of a folder of images, saved as a plain ``.npz``, and search.

The index holds, per image, its path relative to the gallery folder, pid, camera and time
(:mod:`qaconv.gallery.meta`; -1 / NaN when unknown), the feature map in **float16** (half the disk and
memory of float32; maps are unit-norm per location, so fp16 loses ~1e-3 relative) and the L2-normalised
pooled vector (float32) of that fp16 map for the first search stage. It also records the model identity
(checkpoint path, a SHA-256 of its config and weights, feature shape): searching or appending with
another model is refused. The file is an uncompressed npz of plain arrays (no object arrays; it loads
with ``allow_pickle=False``) written atomically.

Search: exhaustive :meth:`qaconv.matching.Matcher.topk` over gallery blocks when the index has at most
``candidates`` images (or when asked), else two stages as :func:`qaconv.gallery.search.two_stage_topk`: the
``candidates`` best by pooled cosine (the stored vectors; faiss when installed), then exact QAConv
scores of those only, gathered from the fp16 maps (the whole gallery is never cast to float32).

Example::

    ex = FeatureExtractor("runs/r18/checkpoint.pt")
    index, report = build_index("my_gallery", ex)           # the extractor names its checkpoint
    save_index(index, "gallery.idx")
    scores, idx = search_index(load_index("gallery.idx"), ex(["probe.jpg"]), ex.matcher, k=10)
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..data.filetypes import IMAGE_TYPES, describe_skipped
from ..errors import QAConvError
from ..matching import Matcher
from ..models.pooled import PooledCosine
from .extract import check_finite_rows, check_query_maps, iter_extract, list_images
from .identity import check_identity, model_identity
from .meta import (
    TIME_MANIFEST,
    TIME_NAME,
    TIME_NONE,
    UNKNOWN,
    ImageMeta,
    assign_cam_ids,
    market_times,
    parse_name,
    read_gallery_manifest,
)
from .search import pooled_candidates

FORMAT = "qaconv-gallery-1"
GALLERY_BLOCK = 4096  # gallery maps cast to float32 at a time by the exhaustive search


@dataclass
class GalleryIndex:
    """Arrays of one gallery index (all numpy, ``N`` images); see the module docstring."""

    root: str  # the gallery folder (absolute) it was last built / appended from
    paths: np.ndarray  # [N] str, relative to root, '/'-separated
    pids: np.ndarray  # [N] int64, -1 unknown
    cams: np.ndarray  # [N] int64 camera ids, -1 unknown
    cam_labels: np.ndarray  # [N] str, '' unknown ('c3' for Market names, the manifest's camid otherwise)
    times: np.ndarray  # [N] float64 seconds, NaN unknown
    sessions: np.ndarray  # [N] int64, Market session or -1
    frames: np.ndarray  # [N] int64, Market frame or -1
    time_sources: np.ndarray  # [N] int8, meta.TIME_*
    features: np.ndarray  # [N, C, h, w] float16
    pooled: np.ndarray  # [N, C] float32, unit norm
    model_checkpoint: str
    model_hash: str
    feature_shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_time(self) -> bool:
        """True when every image has a camera and a time stamp (what TLift needs)."""
        return len(self) > 0 and bool(np.isfinite(self.times).all() and (self.cams >= 0).all())

    def cam_map(self) -> dict[str, int]:
        """Camera label -> id of the images in the index."""
        return {str(lab): int(c) for lab, c in zip(self.cam_labels, self.cams, strict=True) if lab}


# -- model identity ---------------------------------------------------------------------------------------
def check_model(index: GalleryIndex, identity: dict) -> None:
    """Raise :class:`QAConvError` unless ``identity`` (from :func:`model_identity`) made ``index``."""
    recorded = {"checkpoint": index.model_checkpoint, "hash": index.model_hash, "feature_shape": index.feature_shape}
    check_identity(recorded, identity)


# -- building -----------------------------------------------------------------------------------------------
_check_finite_rows = check_finite_rows


def _extract(extractor, root: Path, rel: list[str], workers: int, progress: bool):
    """(fp16 maps [n_ok, C, h, w], pooled [n_ok, C], kept relative paths, [(path, reason)] unreadable)."""
    return next(iter_extract(extractor, root, rel, workers, progress))


def _metadata(root: Path, rel: list[str], manifest: dict[str, ImageMeta] | None) -> list[ImageMeta]:
    manifest = manifest or {}
    return [manifest.get(str((root / p).resolve())) or parse_name(p) for p in rel]


def _new_images(index: GalleryIndex | None, folder, extractor, manifest, workers, progress):
    root = Path(folder).resolve()
    others: list[str] = []
    rel = list_images(folder, others)
    if not rel:
        raise QAConvError(f"no images ({IMAGE_TYPES}) in gallery folder {folder}"
                          + (f"; {describe_skipped(others)}" if others else ""))
    known = set(index.paths.tolist()) if index is not None else set()
    todo = [p for p in rel if p not in known]
    man = read_gallery_manifest(manifest) if manifest else None
    unmatched = len(set(man) - {str((root / p).resolve()) for p in rel}) if man else 0
    feats, pooled, kept, bad = _extract(extractor, root, todo, workers, progress) if todo else (None, None, [], [])
    report = {"added": len(kept), "skipped": len(rel) - len(todo), "unreadable": bad, "manifest_unmatched": unmatched,
              "not_images": others}
    return root, feats, pooled, kept, _metadata(root, kept, man), report


def _assemble(root, paths, metas, feats, pooled, identity, index: GalleryIndex | None) -> GalleryIndex:
    cams, _ = assign_cam_ids([m.cam_label for m in metas], index.cam_map() if index is not None else None)
    new = GalleryIndex(
        root=str(root),
        paths=np.array(paths, dtype=str),
        pids=np.array([m.pid for m in metas], dtype=np.int64),
        cams=cams,
        cam_labels=np.array([m.cam_label for m in metas], dtype=str),
        times=np.array([m.time for m in metas], dtype=np.float64),
        sessions=np.array([m.session for m in metas], dtype=np.int64),
        frames=np.array([m.frame for m in metas], dtype=np.int64),
        time_sources=np.array([m.time_source for m in metas], dtype=np.int8),
        features=feats,
        pooled=pooled,
        model_checkpoint=identity["checkpoint"],
        model_hash=identity["hash"],
        feature_shape=tuple(identity["feature_shape"]),
    )
    if index is not None:
        arrays = {f.name: np.concatenate((getattr(index, f.name), getattr(new, f.name)))
                  for f in fields(GalleryIndex) if isinstance(getattr(new, f.name), np.ndarray)}
        new = replace(index, root=str(root), **arrays)
    from_name = new.time_sources == TIME_NAME
    if from_name.any():  # session offsets are chained over all Market names of the index
        new.times[from_name] = market_times(new.cam_labels, new.sessions, new.frames, new.time_sources)[from_name]
    return new


def build_index(folder, extractor, *, manifest=None, workers: int = 2, progress: bool = True):
    """Index every image under ``folder``: ``(GalleryIndex, report)``.

    ``extractor``: a :class:`~qaconv.extractor.FeatureExtractor` (it carries its checkpoint and model
    identity). ``manifest``: optional ``path,pid,camid[,time]`` CSV. ``workers``: image-decoding threads.
    ``report``: ``added``, ``skipped`` (already indexed), ``unreadable`` ([(relative path, reason)], skipped
    images), ``manifest_unmatched`` (rows naming no image), ``not_images`` (relative paths of the other files).
    """
    identity = model_identity(extractor)
    root, feats, pooled, kept, metas, report = _new_images(None, folder, extractor, manifest, workers, progress)
    if not kept:
        raise QAConvError(f"no readable images in {folder}: all {len(report['unreadable'])} failed to decode, e.g. "
                          f"{report['unreadable'][0][0]}")
    return _assemble(root, kept, metas, feats, pooled, identity, None), report


def append_index(index: GalleryIndex, folder, extractor, *, manifest=None, workers: int = 2,
                 progress: bool = True):
    """Add the images of ``folder`` whose relative path is not in ``index`` yet: ``(GalleryIndex, report)``.

    Refused (:class:`QAConvError`) when ``extractor``'s model differs from the index's. Existing entries keep
    their metadata; Market-name times are re-chained over the enlarged index.
    """
    identity = model_identity(extractor)
    check_model(index, identity)
    root, feats, pooled, kept, metas, report = _new_images(index, folder, extractor, manifest, workers, progress)
    if not kept:
        return index, report
    return _assemble(root, kept, metas, feats, pooled, identity, index), report


# -- saving and loading ---------------------------------------------------------------------------------------
def save_index(index: GalleryIndex, path: str | Path) -> Path:
    """Write ``index`` as an npz of plain arrays, atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    arrays = {f.name: getattr(index, f.name) for f in fields(GalleryIndex)}
    arrays.update(format=np.array(FORMAT), root=np.array(index.root), model_checkpoint=np.array(index.model_checkpoint),
                  model_hash=np.array(index.model_hash), feature_shape=np.array(index.feature_shape, dtype=np.int64))
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_index(path: str | Path) -> GalleryIndex:
    """Read an index written by :func:`save_index` (``allow_pickle=False``); clear errors for other files."""
    path = Path(path)
    if not path.is_file():
        raise QAConvError(f"index {path} does not exist (build it with 'qaconv index GALLERY_DIR -o {path}')")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != FORMAT:
                raise QAConvError(f"{path} is not a qaconv gallery index (expected format '{FORMAT}')")
            data = {f.name: z[f.name] for f in fields(GalleryIndex)}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        if "pickle" in str(exc).lower():  # numpy's text would suggest unsafe loading: never
            raise QAConvError(f"{path} is corrupt or not a qaconv gallery index (it is no .npz of arrays)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QAConvError(f"{path} is corrupt or not a qaconv gallery index ({first})") from None
    return _validated(data, path)


def _validated(data: dict, path) -> GalleryIndex:
    """The :class:`GalleryIndex` of loaded arrays, each field checked; one-line error naming the bad field."""

    def bad(name, expected, got=None):
        got = got if got is not None else f"{data[name].dtype} array of shape {data[name].shape}"
        raise QAConvError(f"index {path} is invalid: field '{name}' must be {expected}, got {got}; rebuild it")

    for key in ("root", "model_checkpoint", "model_hash"):
        if data[key].ndim != 0 or data[key].dtype.kind != "U":
            bad(key, "a string")
        data[key] = str(data[key])
    if not re.fullmatch(r"[0-9a-f]{64}", data["model_hash"]):
        bad("model_hash", "a SHA-256 hex digest", repr(data["model_hash"][:80]))
    shape = data["feature_shape"]
    if shape.shape != (3,) or shape.dtype.kind not in "iu" or (shape < 1).any():
        bad("feature_shape", "3 positive integers (C, h, w)", f"{shape.dtype} {shape.tolist()}")
    data["feature_shape"] = tuple(int(s) for s in shape)
    paths = data["paths"]
    if paths.ndim != 1 or paths.dtype.kind != "U" or len(paths) == 0:
        bad("paths", "a non-empty [N] array of relative paths")
    if (paths == "").any() or len(np.unique(paths)) != len(paths):
        bad("paths", "distinct non-empty paths", "an empty or repeated path")
    n = len(paths)
    kinds = {"pids": "iu", "cams": "iu", "sessions": "iu", "frames": "iu", "time_sources": "iu",
             "cam_labels": "U", "times": "f"}
    for name, kind in kinds.items():
        if data[name].shape != (n,) or data[name].dtype.kind not in kind:
            bad(name, f"[{n}] {'strings' if kind == 'U' else 'integers' if kind == 'iu' else 'floats'}")
    for name in ("cams", "sessions", "frames"):
        if (data[name] < UNKNOWN).any():
            bad(name, f">= {UNKNOWN} ({UNKNOWN} = unknown)", f"{int(data[name].min())}")
    if ((data["cams"] == UNKNOWN) != (data["cam_labels"] == "")).any():
        bad("cams", f"{UNKNOWN} exactly where 'cam_labels' is empty", "a mismatch")
    pairs = {(lab, c) for lab, c in zip(data["cam_labels"].tolist(), data["cams"].tolist(), strict=True) if lab}
    if len({lab for lab, _ in pairs}) != len(pairs) or len({c for _, c in pairs}) != len(pairs):
        bad("cams", "one id per camera label", "a label with several ids or an id with several labels")
    src, times = data["time_sources"], data["times"]
    if not np.isin(src, (TIME_NONE, TIME_NAME, TIME_MANIFEST)).all():
        bad("time_sources", f"{TIME_NONE} (none), {TIME_NAME} (name) or {TIME_MANIFEST} (manifest)",
            f"{sorted(set(src.tolist()) - {TIME_NONE, TIME_NAME, TIME_MANIFEST})}")
    if not np.isfinite(times[src != TIME_NONE]).all() or not np.isnan(times[src == TIME_NONE]).all():
        bad("times", "finite seconds where 'time_sources' says there is a time, NaN elsewhere",
            f"{int((~np.isfinite(times[src != TIME_NONE])).sum() + (~np.isnan(times[src == TIME_NONE])).sum())}"
            " rows that break this")
    named = src == TIME_NAME
    for name in ("sessions", "frames"):
        if (data[name][named] < 0).any():
            bad(name, "numbers >= 0 where the time comes from a Market name", "a negative one")
    if not all(re.fullmatch(r"c\d+", lab) for lab in data["cam_labels"][named].tolist()):
        bad("cam_labels", "'cN' for Market-name times", "another label")
    feats, pooled, (c, h, w) = data["features"], data["pooled"], data["feature_shape"]
    if feats.dtype != np.float16 or feats.shape != (n, c, h, w):
        bad("features", f"float16 [{n}, {c}, {h}, {w}] maps")
    if pooled.dtype != np.float32 or pooled.shape != (n, c):
        bad("pooled", f"float32 [{n}, {c}] vectors")
    ok = np.concatenate([np.isfinite(feats[g : g + GALLERY_BLOCK]).reshape(-1, c * h * w).all(1)
                         for g in range(0, n, GALLERY_BLOCK)])
    _check_finite_rows(ok, paths, f"index {path} is invalid: field 'features' holds NaN/inf for", "rebuild it")
    _check_finite_rows(np.isfinite(pooled).all(1), paths, f"index {path} is invalid: field 'pooled' holds NaN/inf for",
                       "rebuild it")
    norms = np.linalg.norm(pooled, axis=1)
    if not ((np.abs(norms - 1) < 1e-3) | (norms == 0)).all():
        bad("pooled", "unit-norm vectors", f"norms from {norms.min():.4g} to {norms.max():.4g}")
    return GalleryIndex(**data)


# -- search ---------------------------------------------------------------------------------------------------
def _maps(index: GalleryIndex, rows) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(index.features[rows])).float()


def shortlist(index: GalleryIndex, query_maps: torch.Tensor, candidates: int, device=None, use_faiss=None):
    """First stage: ``[Q, M]`` gallery rows with the best pooled cosine (stored vectors), best first."""
    eq = PooledCosine.embed(query_maps.float())[:, :, None, None]
    eg = torch.from_numpy(index.pooled)[:, :, None, None]
    return pooled_candidates(eq, eg, candidates, device=device, use_faiss=use_faiss)[1].numpy()


def search_index(index: GalleryIndex, query_maps: torch.Tensor, matcher, k: int = 10, candidates: int = 100,
                 exhaustive: bool = False, device=None, memory: int | None = None, use_faiss=None):
    """Top-``k`` gallery rows per query: ``(logits [Q, k] float32, rows [Q, k] int64)`` numpy, best first.

    ``k`` is capped at the index size. Exhaustive when ``exhaustive`` or the index has at most
    ``candidates`` images; else the pooled-cosine shortlist of ``candidates`` per query is re-scored exactly.
    """
    num_g = len(index)
    k = min(int(k), num_g)
    if k < 1 or candidates < 1:
        raise QAConvError(f"top and candidates must be >= 1, got {k} and {candidates}")
    if tuple(query_maps.shape[1:]) != index.feature_shape:
        raise QAConvError(f"query maps {tuple(query_maps.shape[1:])} differ from the index's {index.feature_shape}")
    check_query_maps(query_maps)
    engine = Matcher(matcher.eval(), device, memory=memory)
    q = query_maps.float()
    if exhaustive or candidates >= num_g:
        best_s = torch.full((len(q), 0), -torch.inf)
        best_i = torch.zeros((len(q), 0), dtype=torch.int64)
        for g0 in range(0, num_g, GALLERY_BLOCK):
            gal = _maps(index, slice(g0, g0 + GALLERY_BLOCK))
            s, i = engine.topk(q, gal, min(k, len(gal)))
            s, i = torch.cat((best_s, s), 1), torch.cat((best_i, i + g0), 1)
            best_s, pos = s.topk(min(k, s.shape[1]), dim=1)
            best_i = i.gather(1, pos)
        return best_s.numpy(), best_i.numpy()
    cand = shortlist(index, q, max(candidates, k), device=device, use_faiss=use_faiss)
    out_s = np.empty((len(q), k), dtype=np.float32)
    out_i = np.empty((len(q), k), dtype=np.int64)
    for r in range(len(q)):
        s, i = engine.topk(q[r : r + 1], _maps(index, cand[r]), k)
        out_s[r], out_i[r] = s[0].numpy(), cand[r][i[0].numpy()]
    return out_s, out_i


def tlift_search(index: GalleryIndex, query_maps: torch.Tensor, matcher, q_cams, q_times, g_times=None,
                 k: int = 10, candidates: int = 100, exhaustive: bool = False, device=None,
                 memory: int | None = None, tau: float = 100.0, sigma: float = 200.0, tlift_k: int = 10,
                 alpha: float = 0.2, use_faiss=None):
    """Top-``k`` rows by TLift-lifted similarity: ``(lifted [Q, k] float64, rows [Q, k] int64)``, best first.

    QAConv logits are mapped to sigma(logit), as the official TLift docstring prescribes for raw QAConv
    scores (there is no re-ranking here), and lifted with :func:`qaconv.tlift.tlift` using the query
    cameras / times and the index's cameras and ``g_times`` (default: the stored times). Exhaustive (all
    images) when ``exhaustive`` or the index has at most ``candidates`` images; otherwise TLift runs on the
    union of the queries' pooled-cosine shortlists (exact when pivots and ranks fall inside it).
    """
    from ..engine.evaluator import logit_to_similarity
    from ..tlift import tlift

    g_times = index.times if g_times is None else np.asarray(g_times, dtype=np.float64)
    if not index.has_time or not np.isfinite(g_times).all():
        missing = int((~np.isfinite(g_times) | (index.cams < 0)).sum())
        raise QAConvError(f"TLift needs a camera and time stamp for every gallery image; {missing} of {len(index)} "
                          "in this index have none (use Market-style names or a manifest with a 'time' column)")
    q_cams, q_times = np.asarray(q_cams, dtype=np.int64), np.asarray(q_times, dtype=np.float64)
    if len(q_cams) != len(query_maps) or len(q_times) != len(query_maps) or not np.isfinite(q_times).all():
        raise QAConvError("TLift needs a camera and a time stamp for every query")
    check_query_maps(query_maps)
    num_g = len(index)
    cols = np.arange(num_g) if exhaustive or candidates >= num_g else \
        np.unique(shortlist(index, query_maps, min(candidates, num_g), device=device, use_faiss=use_faiss))
    engine = Matcher(matcher.eval(), device, memory=memory)
    q = query_maps.float()
    logits = np.concatenate([engine.scores(q, _maps(index, cols[c : c + GALLERY_BLOCK])).numpy()
                             for c in range(0, len(cols), GALLERY_BLOCK)], axis=1)
    lifted = tlift(logit_to_similarity(logits, scale=1.0), q_cams, q_times, index.cams[cols], g_times[cols],
                   tau=tau, sigma=sigma, k=tlift_k, alpha=alpha)
    order = np.argsort(-lifted, axis=1, kind="stable")[:, : min(int(k), len(cols))]
    return np.take_along_axis(lifted, order, axis=1), cols[order]


# -- queries and results ----------------------------------------------------------------------------------------
def query_metadata(index: GalleryIndex, names, cam_labels=None, times=None):
    """``(pids, cam ids, cam labels, times, gallery times)`` of queries, for display and TLift.

    Cameras and times come from Market-style names unless given (``cam_labels``: one label per query;
    ``times``: seconds per query). Name times are chained over the session frames of the index's and the
    queries' Market names together (official convention: over all splits), so the returned gallery times
    re-chain the index's Market-name entries over the same frames; manifest times stay as stored.
    Unknown values are -1 / '' / NaN.
    """
    metas = [parse_name(str(n)) for n in names]
    labels = [str(c) for c in cam_labels] if cam_labels is not None else [m.cam_label for m in metas]
    q_cams, _ = assign_cam_ids(labels, index.cam_map())
    pids = np.array([m.pid for m in metas], dtype=np.int64)
    if times is not None:
        return pids, q_cams, labels, np.asarray(times, dtype=np.float64), index.times
    n = len(index)
    t = market_times(np.concatenate((index.cam_labels, [m.cam_label for m in metas])).astype(str),
                     np.concatenate((index.sessions, [m.session for m in metas])),
                     np.concatenate((index.frames, [m.frame for m in metas])),
                     np.concatenate((index.time_sources, [m.time_source for m in metas])))
    g_times = np.where(index.time_sources == TIME_NAME, t[:n], index.times)
    return pids, q_cams, labels, t[n:], g_times


def result_rows(index: GalleryIndex, scores: np.ndarray, rows: np.ndarray) -> list[list[dict]]:
    """Per query, its results as dicts: rank (1-based), score, path (relative), pid, cam (label), row."""
    return [
        [{"rank": r + 1, "score": float(s), "path": str(index.paths[g]), "pid": int(index.pids[g]),
          "cam": str(index.cam_labels[g]), "row": int(g)} for r, (s, g) in enumerate(zip(srow, grow, strict=True))]
        for srow, grow in zip(scores, rows, strict=True)
    ]
