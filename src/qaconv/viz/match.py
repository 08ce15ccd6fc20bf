"""Drawings of QAConv matches: which local regions of two images match, and how well.

:func:`draw_match` puts two images side by side with lines between their strongest corresponding
feature-map cells (coloured by cosine similarity) and, in a second row, each image overlaid with the
best-match similarity of every location. :func:`match_images` does the whole thing for two files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def select_matches(corr: dict, top: int | None = 20, threshold: float | None = None) -> np.ndarray:
    """Probe locations (flat indices) to draw, strongest first.

    Locations are ranked by ``probe_to_gallery_sim * probe_weight`` (their contribution to the score).
    With ``threshold`` the locations whose best similarity ``probe_to_gallery_sim`` exceeds it are kept
    (all of them, ``top`` is ignored); otherwise the ``top`` best. Ties keep the lower index first.
    """
    sim = np.asarray(corr["probe_to_gallery_sim"], dtype=np.float64).reshape(-1)
    weight = np.asarray(corr["probe_weight"], dtype=np.float64).reshape(-1)
    if weight.shape != sim.shape:
        raise ValueError(f"probe_weight has {weight.size} entries but there are {sim.size} probe locations")
    order = np.argsort(-(sim * weight), kind="stable")
    if threshold is not None:
        return order[sim[order] > threshold]
    if top is None:
        return order
    if top < 0:
        raise ValueError(f"top must be non-negative, got {top}")
    return order[:top]


def _cell_centres(index: np.ndarray, feature_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Pixel ``(x, y)`` centres of feature-map cells ``index`` (row-major) in an image ``(height, width)``."""
    fh, fw = feature_size
    ih, iw = image_size
    index = np.asarray(index, dtype=np.int64)
    y, x = np.divmod(index, fw)
    return np.stack(((x + 0.5) * iw / fw, (y + 0.5) * ih / fh), axis=-1)


def _as_rgb(image, size: tuple[int, int] | None) -> np.ndarray:
    """HWC uint8 array of ``image`` (path, PIL, HWC array, or [3, H, W] float tensor), resized to ``size``."""
    if isinstance(image, (str, Path)):
        from ..data.images import read_rgb

        image = read_rgb(str(image))
    elif isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"image tensors must be [3, H, W], got {list(image.shape)}")
        image = Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8, got {arr.dtype}")
        image = Image.fromarray(np.ascontiguousarray(arr))
    if not isinstance(image, Image.Image):
        raise ValueError(f"unsupported image type {type(image).__name__}")
    image = image.convert("RGB")
    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(image)


def draw_match(
    image_a,
    image_b,
    corr: dict,
    score: float,
    path: str | Path,
    top: int | None = 20,
    threshold: float | None = None,
    feature_size: tuple[int, int] | None = None,
    image_size: tuple[int, int] | None = None,
    labels: tuple[str, str] = ("probe", "gallery"),
) -> Path:
    """Draw the match of ``image_a`` (probe) and ``image_b`` (gallery) into the PNG ``path``.

    ``corr`` is :meth:`QAConv.correspondences` of the two feature maps, of spatial size ``feature_size``
    ``(h, w)``. Top row: both images side by side (resized to ``image_size`` ``(height, width)``, by default
    image_a's size) with lines between the cell centres of the selected probe locations (see
    :func:`select_matches`) and their best gallery locations, coloured by cosine similarity. Bottom row:
    the best similarity of every probe / gallery location over its image. The title shows ``score``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    if feature_size is None:
        raise ValueError("feature_size (h, w) of the feature maps is required")
    fh, fw = (int(v) for v in feature_size)
    p_sim = np.asarray(corr["probe_to_gallery_sim"], dtype=np.float64).reshape(-1)
    g_sim = np.asarray(corr["gallery_to_probe_sim"], dtype=np.float64).reshape(-1)
    p2g = np.asarray(corr["probe_to_gallery"], dtype=np.int64).reshape(-1)
    if p_sim.size != fh * fw or g_sim.size != fh * fw or p2g.size != fh * fw:
        raise ValueError(f"correspondences do not fit a {fh}x{fw} feature map ({p_sim.size} probe locations)")

    img_a = _as_rgb(image_a, image_size)
    size = img_a.shape[:2]
    img_b = _as_rgb(image_b, size)
    ih, iw = size
    gap = max(4, iw // 8)

    chosen = select_matches(corr, top=top, threshold=threshold)
    start = _cell_centres(chosen, (fh, fw), size)
    end = _cell_centres(p2g[chosen], (fh, fw), size) + np.array([iw + gap, 0.0])
    line_sim = p_sim[chosen]

    lo, hi = float(min(p_sim.min(), g_sim.min())), float(max(p_sim.max(), g_sim.max()))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    norm = matplotlib.colors.Normalize(vmin=lo, vmax=hi)
    cmap = matplotlib.colormaps["turbo"]

    canvas = np.full((ih, 2 * iw + gap, 3), 255, dtype=np.uint8)
    canvas[:, :iw] = img_a
    canvas[:, iw + gap :] = img_b

    fig = plt.figure(figsize=(6.4, 7.6), dpi=120, layout="constrained")
    grid = fig.add_gridspec(2, 2)
    ax_top = fig.add_subplot(grid[0, :2])
    ax_top.imshow(canvas)
    if len(chosen):
        segments = np.stack((start, end), axis=1)
        order = np.argsort(line_sim)  # strongest drawn last, on top
        lines = LineCollection(segments[order], colors=cmap(norm(line_sim[order])), linewidths=1.6, alpha=0.9)
        ax_top.add_collection(lines)
        ax_top.scatter(*np.concatenate((start, end)).T, s=10, c=cmap(norm(np.concatenate((line_sim, line_sim)))),
                       edgecolors="white", linewidths=0.4, zorder=3)
    rule = f"sim > {threshold:g}" if threshold is not None else f"top {len(chosen)}"
    ax_top.set_title(f"{len(chosen)} matches ({rule}, by similarity x weight)", fontsize=8)
    ax_top.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax_top.set_ylim(ih - 0.5, -0.5)
    ax_top.axis("off")

    axes = [ax_top]
    for col, (img, sim_map, label) in enumerate(((img_a, p_sim, labels[0]), (img_b, g_sim, labels[1]))):
        ax = fig.add_subplot(grid[1, col])
        ax.imshow(img)
        ax.imshow(sim_map.reshape(fh, fw), cmap=cmap, norm=norm, alpha=0.6, interpolation="nearest",
                  extent=(-0.5, iw - 0.5, ih - 0.5, -0.5))
        ax.set_title(f"{label}: best match per location", fontsize=8)
        ax.axis("off")
        axes.append(ax)

    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle(f"QAConv score {score:.3f}", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def match_images(extractor, path_a, path_b, out_png: str | Path, top: int | None = 20,
                 threshold: float | None = None) -> tuple[float, Path]:
    """Score ``path_a`` (probe) against ``path_b`` (gallery) with ``extractor.matcher`` and draw the match.

    ``extractor`` is a :class:`qaconv.extractor.FeatureExtractor` whose matcher is QAConv. The images may
    also be anything the extractor accepts for a single image. Returns ``(score, png_path)``, the score
    being the matcher's logit.
    """
    matcher = extractor.matcher
    if matcher is None or not hasattr(matcher, "correspondences"):
        raise ValueError("match_images needs an extractor whose matcher is QAConv (load it from a checkpoint)")
    inputs = extractor.to_tensors([path_a, path_b])
    if len(inputs) != 2:
        raise ValueError(f"expected two images, got {len(inputs)}")
    maps = extractor(inputs)
    param = next(matcher.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    maps = maps.to(dev)
    was_training = matcher.training
    matcher.eval()
    try:
        with torch.inference_mode():
            score = float(matcher(maps[:1], maps[1:]).reshape(-1)[0])
            corr = matcher.correspondences(maps[0], maps[1])
    finally:
        matcher.train(was_training)
    path = draw_match(inputs[0], inputs[1], corr, score, out_png, top=top, threshold=threshold,
                      feature_size=tuple(maps.shape[-2:]))
    return score, path
