"""Gallery storage, search and serving.

* :mod:`qaconv.gallery.api`: :class:`Gallery`, a store that grows (add, remove, filtered search, TLift).
* :mod:`qaconv.gallery.store`: the store on disk (a LanceDB table plus a JSON file naming the model).
* :mod:`qaconv.gallery.query`: filters, the pooled-cosine first stage and exact re-scoring over a store's rows.
* :mod:`qaconv.gallery.search`: pooled-cosine shortlists and exact QAConv re-scoring (two-stage search).
* :mod:`qaconv.gallery.meta`: per-image metadata (pid, camera, time, track) from file names, camera folders
  or a manifest.
* :mod:`qaconv.gallery.queries`, :mod:`qaconv.gallery.results`: the queries of ``qaconv search`` (files,
  folders, tracklets, a query manifest) and its answers (JSON-ready dicts, the text table).
* :mod:`qaconv.gallery.identity`, :mod:`qaconv.gallery.extract`: model identity; feature maps of image files.
* :mod:`qaconv.gallery.index`: the legacy single-file ``.npz`` index, in memory (build, load, search); its
  public names are re-exported here, so ``from qaconv.gallery import build_index`` works. Convert an old file
  with ``qaconv index --convert OLD.npz -o STORE`` (:meth:`Gallery.convert`).
"""

from .api import Gallery
from .extract import check_query_maps, list_images
from .identity import model_identity
from .index import (
    FORMAT,
    GALLERY_BLOCK,
    GalleryIndex,
    append_index,
    build_index,
    check_model,
    load_index,
    query_metadata,
    result_rows,
    save_index,
    search_index,
    shortlist,
    tlift_search,
)
from .store import is_store

__all__ = [
    "FORMAT",
    "GALLERY_BLOCK",
    "Gallery",
    "GalleryIndex",
    "append_index",
    "build_index",
    "check_model",
    "check_query_maps",
    "is_store",
    "list_images",
    "load_index",
    "model_identity",
    "query_metadata",
    "result_rows",
    "save_index",
    "search_index",
    "shortlist",
    "tlift_search",
]
