"""``qaconv serve``: a long-running HTTP search service over a :class:`~qaconv.gallery.api.Gallery` (FastAPI).

The model and the store are opened once. JSON in and out; every error is a 4xx/5xx answer ``{"error": "..."}``.

* ``GET /health``: ``{"status": "ok", "entries", "feature_shape", "model"}``.
* ``POST /search``: ``{"paths": [...], "top": 10, "candidates": 100, "cameras": null, "time_window": null,
  "exclude_same_camera": false, "query_cameras": null, "query_tracks": null, "aggregate": "mean",
  "group_by_track": false}``; images read from the image root. ``exclude_same_camera``: false, true or null
  (for each query whose camera is known); ``query_tracks``: one label per path (null: alone), equal labels
  forming one tracklet query; ``group_by_track``: results are gallery tracklets (see :meth:`Gallery.search`).
* ``POST /search/upload``: multipart ``files`` (images) and the same options as form fields (``cameras``,
  ``query_cameras`` and ``query_tracks`` comma-separated, ``time_window`` as ``start,end``).
* ``POST /add``: ``{"entries": [{"path", "pid", "cam", "time", "track"}]}``, images read from the image root;
  the entry's name is its path relative to the root.
* ``POST /add/upload``: multipart ``files`` and ``metadata`` (a JSON list of ``{"path", "pid", "cam", "time",
  "track"}``, one per file; ``path`` is the entry's unique name, default the upload's file name).

Search answers ``{"score_kind": "QAConv logit" (or "mean|max of the QAConv logits of crop pairs"), "results":
[{"query": name, "crops": [names], "hits": [{"rank", "score", "path", "pid", "cam", "row", "time", "track"}]}]}``,
one result per query or tracklet query (``query``: its first crop's name); numbers are numbers, unknown values
null, as in ``qaconv search --json``. Safety: images "by path" only under the ``image_root`` the operator
names (resolved, so neither ``..`` nor a symlink leads out; without a root, by-path requests are refused);
uploads over ``max_upload_bytes`` get 413, non-images 415, unknown fields 422, a path already in the store 409;
adds are serialised by a lock (searches run concurrently with them and see the store before or after an add).
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..data.filetypes import IMAGE_TYPES, is_image_name
from ..errors import QAConvError
from .api import Gallery

MAX_UPLOAD_BYTES = 10 * 2**20  # per image
MAX_IMAGES = 256  # per request


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Strict):
    paths: list[str] = Field(min_length=1, max_length=MAX_IMAGES)
    top: int = Field(10, ge=1, le=10_000)
    candidates: int = Field(100, ge=1, le=1_000_000)
    cameras: list[str] | None = None
    time_window: tuple[float | None, float | None] | None = None
    exclude_same_camera: bool | None = False
    query_cameras: list[str] | None = None
    query_tracks: list[str | None] | None = None
    aggregate: Literal["mean", "max"] = "mean"
    group_by_track: bool = False


class Entry(_Strict):
    path: str = Field(min_length=1)
    pid: int | None = None
    cam: str | None = None
    time: float | None = None
    track: str | None = None


class AddRequest(_Strict):
    entries: list[Entry] = Field(min_length=1, max_length=MAX_IMAGES)


class ServiceError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _status_of(exc: QAConvError) -> int:
    return 409 if "already in the store" in str(exc) else 400


def resolve_under(root: Path | None, path: str) -> Path:
    """The image ``path`` (relative to ``root``, or absolute inside it) resolved; refused outside ``root``."""
    if root is None:
        raise ServiceError(403, "images by path are disabled: start the service with --image-root FOLDER")
    if "\0" in path:
        raise ServiceError(400, "a path may not contain NUL")
    target = (root / path).resolve()  # follows symlinks: a link out of the root resolves outside it
    if not target.is_relative_to(root):
        raise ServiceError(403, f"{path!r} is outside the image root")
    if not target.is_file():
        raise ServiceError(404, f"{path!r} does not exist under the image root")
    if not is_image_name(target):
        raise ServiceError(415, f"{path!r} is not an image file (expected {IMAGE_TYPES})")
    return target


def _read_image(data: bytes, name: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception:  # PIL raises many types for non-images and broken files
        raise ServiceError(415, f"{name!r} is not a readable image ({IMAGE_TYPES})") from None


def _read_file(path: Path, limit: int):
    if path.stat().st_size > limit:
        raise ServiceError(413, f"{path.name!r} is larger than {limit} bytes")
    return _read_image(path.read_bytes(), path.name)


async def _read_uploads(files: list[UploadFile], limit: int) -> list:
    if not files or len(files) > MAX_IMAGES:
        raise ServiceError(422, f"send 1 to {MAX_IMAGES} files, got {len(files or [])}")
    images = []
    for f in files:
        data = await f.read(limit + 1)
        if len(data) > limit:
            raise ServiceError(413, f"{f.filename!r} is larger than {limit} bytes")
        images.append(_read_image(data, f.filename or "upload"))
    return images


def _csv(value: str | None) -> list[str] | None:
    return None if value in (None, "") else [v.strip() for v in value.split(",")]


def _window(value: str | None):
    if value in (None, ""):
        return None
    parts = value.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return tuple(None if p.strip() == "" else float(p) for p in parts)
    except ValueError:
        raise ServiceError(422, f"time_window must be 'start,end' in seconds, got {value!r}") from None


def create_app(gallery: Gallery, image_root: str | Path | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The FastAPI application serving ``gallery``; ``image_root``: the only folder images may be read from by
    path (None: by-path requests refused); ``max_upload_bytes``: per image (default 10 MiB)."""
    root = None if image_root is None else Path(image_root).resolve()
    write_lock = threading.Lock()
    app = FastAPI(title="qaconv search", version="1")

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(QAConvError)
    async def _qaconv_error(request: Request, exc: QAConvError):
        return JSONResponse({"error": str(exc)}, status_code=_status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"{where or 'request'}: {first.get('msg', 'invalid request')}"},
                            status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    def search(images, names, top, candidates, cameras, window, exclude, query_cameras, tracks=None,
               aggregate="mean", by_track=False) -> dict:
        from .api import query_groups
        from .results import LOGIT_KIND

        if tracks is not None and len(tracks) != len(names):
            raise ServiceError(422, f"query_tracks needs one label per query ({len(names)}), got {len(tracks)}")
        tracks = None if tracks is None else [t or None for t in tracks]
        grouped = tracks is not None or by_track
        extra = dict(query_tracks=tracks, aggregate=aggregate, group_by_track=by_track) if grouped else {}
        hits = gallery.search(images, top=top, candidates=candidates, cameras=cameras, time_window=window,
                              exclude_same_camera=exclude, query_cameras=query_cameras, query_names=names, **extra)
        gid, firsts = query_groups(tracks, len(names))
        results = []
        for g, (first, h) in enumerate(zip(firsts, hits, strict=True)):
            for hit in h:
                if "query_crop" in hit:
                    hit["query_crop"] = names[hit["query_crop"]]
            results.append({"query": names[first], "crops": [names[i] for i in range(len(names)) if gid[i] == g],
                            "hits": h})
        kind = f"{aggregate} of the QAConv logits of crop pairs" if grouped else LOGIT_KIND
        return {"score_kind": kind, "results": results}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "entries": len(gallery), "feature_shape": list(gallery.feature_shape),
                "model": gallery.model}

    @app.post("/search")
    def search_paths(req: SearchRequest) -> dict:
        images = [_read_file(resolve_under(root, p), max_upload_bytes) for p in req.paths]
        return search(images, req.paths, req.top, req.candidates, req.cameras, req.time_window,
                      req.exclude_same_camera, req.query_cameras, req.query_tracks, req.aggregate, req.group_by_track)

    @app.post("/search/upload")
    async def search_upload(files: Annotated[list[UploadFile], File()], top: Annotated[int, Form(ge=1)] = 10,
                            candidates: Annotated[int, Form(ge=1)] = 100, cameras: Annotated[str, Form()] = "",
                            time_window: Annotated[str, Form()] = "",
                            exclude_same_camera: Annotated[bool, Form()] = False,
                            query_cameras: Annotated[str, Form()] = "", query_tracks: Annotated[str, Form()] = "",
                            aggregate: Annotated[Literal["mean", "max"], Form()] = "mean",
                            group_by_track: Annotated[bool, Form()] = False) -> dict:
        images = await _read_uploads(files, max_upload_bytes)
        names = [f.filename or f"upload{i}" for i, f in enumerate(files)]
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(search, images, names, top, candidates, _csv(cameras), _window(time_window),
                                       exclude_same_camera, _csv(query_cameras), _csv(query_tracks), aggregate,
                                       group_by_track)

    def add(images, entries: list[dict]) -> dict:
        with write_lock:
            ids = gallery.add(images, entries)
            return {"added": len(ids), "ids": [int(i) for i in ids], "entries": len(gallery)}

    @app.post("/add")
    def add_paths(req: AddRequest) -> dict:
        images = [_read_file(resolve_under(root, e.path), max_upload_bytes) for e in req.entries]
        return add(images, [_entry_dict(e.model_dump()) for e in req.entries])

    @app.post("/add/upload")
    async def add_upload(files: Annotated[list[UploadFile], File()], metadata: Annotated[str, Form()] = "") -> dict:
        images = await _read_uploads(files, max_upload_bytes)
        entries = _upload_entries(metadata, [f.filename or "" for f in files])
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(add, images, entries)

    return app


def _entry_dict(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if v is not None}


def _upload_entries(metadata: str, filenames: list[str]) -> list[dict]:
    """One metadata dict per uploaded file, from the ``metadata`` JSON list (default: path = file name)."""
    if metadata.strip() == "":
        raw = [{} for _ in filenames]
    else:
        try:
            raw = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise ServiceError(422, f"metadata is not valid JSON ({exc.msg})") from None
        if not isinstance(raw, list) or len(raw) != len(filenames):
            raise ServiceError(422, f"metadata must be a JSON list of {len(filenames)} objects (one per file)")
    out = []
    for md, name in zip(raw, filenames, strict=True):
        if not isinstance(md, dict):
            raise ServiceError(422, "each metadata item must be an object {path, pid, cam, time, track}")
        try:
            entry = Entry(**{"path": name, **md})
        except Exception as exc:
            first = str(exc).splitlines()
            raise ServiceError(422, f"metadata: {first[1] if len(first) > 1 else first[0]}") from None
        out.append(_entry_dict(entry.model_dump()))
    return out


def serve(gallery_path: str | Path, checkpoint: str | Path | None = None, host: str = "127.0.0.1",
          port: int = 8000, image_root: str | Path | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
          device=None, log_level: str = "info") -> None:
    """Open the gallery (and its model) once and serve it with uvicorn until interrupted."""
    import uvicorn

    gallery = Gallery.open(gallery_path, checkpoint, device=device)
    _ = gallery.extractor  # load the model before the first request (and fail now if it is the wrong one)
    if image_root is not None and not Path(image_root).is_dir():
        raise QAConvError(f"--image-root {image_root} is not a folder")
    app = create_app(gallery, image_root, max_upload_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
