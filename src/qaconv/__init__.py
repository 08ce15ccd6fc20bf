"""qaconv: generalizable person re-identification by explicit local matching (QAConv, QAConv-GS).

The main pieces, importable from here::

    import qaconv

    fx = qaconv.FeatureExtractor("runs/r18")          # images -> unit-norm feature maps
    scores = qaconv.Matcher(fx.matcher).scores(fx(["a.jpg"]), fx(["b.jpg", "c.jpg"]))   # [1, 2] logits
"""

__version__ = "0.1.0"

# name -> module, imported on first use (PEP 562): ``import qaconv`` and the command line's parser stay light
# (no torch), so ``qaconv --help`` answers at once; ``qaconv.FeatureExtractor`` imports what it needs.
_LAZY = {
    "convert_official": ".convert",
    "load_dataset": ".data.registry",
    "extract_features": ".engine.features",
    "load_trained": ".engine.runner",
    "QAConvError": ".errors",
    "export_onnx": ".export",
    "FeatureExtractor": ".extractor",
    "Gallery": ".gallery",
    "GalleryIndex": ".gallery",
    "build_index": ".gallery",
    "load_index": ".gallery",
    "search_index": ".gallery",
    "two_stage_scores": ".gallery.search",
    "two_stage_topk": ".gallery.search",
    "TrainedModel": ".loading",
    "load": ".loading",
    "Matcher": ".matching",
    "pairwise_scores": ".matching",
    "RankResult": ".metrics",
    "evaluate_rank": ".metrics",
    "PooledCosine": ".models",
    "QAConv": ".models",
    "build_backbone": ".models",
    "build_matcher": ".models",
    "load_official_checkpoint": ".models.official",
    "k_reciprocal": ".rerank",
    "k_reciprocal_knn": ".rerank",
}

__all__ = [
    "FeatureExtractor",
    "Matcher",
    "two_stage_scores",
    "two_stage_topk",
    "Gallery",
    "GalleryIndex",
    "PooledCosine",
    "QAConv",
    "QAConvError",
    "RankResult",
    "TrainedModel",
    "build_backbone",
    "build_index",
    "build_matcher",
    "convert_official",
    "evaluate_rank",
    "export_onnx",
    "extract_features",
    "k_reciprocal",
    "k_reciprocal_knn",
    "load",
    "load_dataset",
    "load_index",
    "load_official_checkpoint",
    "load_trained",
    "pairwise_scores",
    "search_index",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'qaconv' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
