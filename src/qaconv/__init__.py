"""qaconv: generalizable person re-identification by explicit local matching (QAConv, QAConv-GS).

The main pieces, importable from here::

    import qaconv

    fx = qaconv.FeatureExtractor("runs/r18")          # images -> unit-norm feature maps
    scores = qaconv.Matcher(fx.matcher).scores(fx(["a.jpg"]), fx(["b.jpg", "c.jpg"]))   # [1, 2] logits
"""

__version__ = "0.1.0"

from .convert import convert_official
from .data.registry import load_dataset
from .engine.features import extract_features
from .engine.runner import load_trained
from .errors import QAConvError
from .export import export_onnx
from .extractor import FeatureExtractor
from .gallery import Gallery, GalleryIndex, build_index, load_index, search_index
from .gallery.search import two_stage_scores, two_stage_topk
from .loading import TrainedModel, load
from .matching import Matcher, pairwise_scores
from .metrics import RankResult, evaluate_rank
from .models import PooledCosine, QAConv, build_backbone, build_matcher
from .models.official import load_official_checkpoint
from .rerank import k_reciprocal, k_reciprocal_knn

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
