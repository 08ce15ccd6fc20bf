"""Gallery storage, search and serving.

* :mod:`qaconv.gallery.meta`: per-image metadata (pid, camera, time) from file names or a manifest.
* :mod:`qaconv.gallery.search`: pooled-cosine shortlists and exact QAConv re-scoring (two-stage search).
* :mod:`qaconv.gallery.index`: the ``.npz`` gallery index (build, append, load, search); its public names are
  re-exported here, so ``from qaconv.gallery import build_index`` works.
"""

from .index import (
    FORMAT,
    GALLERY_BLOCK,
    GalleryIndex,
    append_index,
    build_index,
    check_model,
    check_query_maps,
    list_images,
    load_index,
    model_identity,
    query_metadata,
    result_rows,
    save_index,
    search_index,
    shortlist,
    tlift_search,
)

__all__ = [
    "FORMAT",
    "GALLERY_BLOCK",
    "GalleryIndex",
    "append_index",
    "build_index",
    "check_model",
    "check_query_maps",
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
