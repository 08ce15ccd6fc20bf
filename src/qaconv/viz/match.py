"""Drawings of QAConv matches: which local regions of two images match, and how well.

:func:`draw_match` puts two images side by side with lines between their strongest corresponding
feature-map cells and, in a second row, each image overlaid with a value per location. :func:`match_images`
does the whole thing for two files. Two semantics (see :meth:`qaconv.models.QAConv.correspondences`):

* ``"default"``: probe = kernel side (as the official evaluation); lines ranked by cosine x fc weight,
  ``threshold`` on the cosine, colours and heat maps show the best cosine per location, the title shows
  the logit.
* ``"official"``: as the official ``matching/qaconv_match.py`` + ``demo.m``: gallery = kernel side; lines
  ranked by fc weight x bn(cosine), ``threshold`` on that contribution (demo.m's 0.5 on 200x the
  contribution is ``threshold=0.0025``), colours and heat maps show the contribution per location, the
  title shows sigmoid(logit / 10).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import writing


def _semantics(corr: dict) -> str:
    return str(corr.get("semantics", "default"))


def select_matches(corr: dict, top: int | None = 20, threshold: float | None = None) -> np.ndarray:
    """Probe locations (flat indices) to draw, strongest first.

    Locations are ranked by their contribution to the score: ``probe_contribution`` where given, else
    ``probe_to_gallery_sim * probe_weight``. With ``threshold`` every location above it is kept (``top``
    is ignored), compared with the best similarity ``probe_to_gallery_sim`` under the default semantics
    and with the contribution under ``corr["semantics"] == "official"``; otherwise the ``top`` best.
    Ties keep the lower index first.
    """
    sim = np.asarray(corr["probe_to_gallery_sim"], dtype=np.float64).reshape(-1)
    if "probe_contribution" in corr:
        contrib = np.asarray(corr["probe_contribution"], dtype=np.float64).reshape(-1)
        name = "probe_contribution"
    else:
        contrib = sim * np.asarray(corr["probe_weight"], dtype=np.float64).reshape(-1)
        name = "probe_weight"
    if contrib.shape != sim.shape:
        raise ValueError(f"{name} has {contrib.size} entries but there are {sim.size} probe locations")
    order = np.argsort(-contrib, kind="stable")
    if threshold is not None:
        value = contrib if _semantics(corr) == "official" else sim
        return order[value[order] > threshold]
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


_SHOWN = {  # semantics -> (value per location, its label, the score's name in the title)
    "default": ("sim", "cosine similarity", "QAConv logit"),
    "official": ("contribution", "fc weight x bn(cosine)", "QAConv sigmoid(logit/10)"),
}


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
    ``(h, w)``; its ``semantics`` (default: ``"default"``) decides what is shown (module docstring). Top
    row: both images side by side (resized to ``image_size`` ``(height, width)``, by default image_a's
    size) with lines from the cell centres of the selected probe locations (see :func:`select_matches`)
    to their best gallery locations. Bottom row: the value of every probe / gallery location over its
    image. The title names the semantics and shows ``score``, which the caller computes: the logit under
    the default semantics, sigmoid(logit / 10) of the gallery-as-kernel logit under the official ones.
    All text is drawn literally (no mathtext).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    if feature_size is None:
        raise ValueError("feature_size (h, w) of the feature maps is required")
    semantics = _semantics(corr)
    if semantics not in _SHOWN:
        raise ValueError(f"unknown correspondence semantics {semantics!r}; choose one of: {', '.join(_SHOWN)}")
    shown, value_label, score_name = _SHOWN[semantics]
    fh, fw = (int(v) for v in feature_size)
    if shown == "sim":
        p_val, g_val = corr["probe_to_gallery_sim"], corr["gallery_to_probe_sim"]
    else:
        p_val, g_val = corr["probe_contribution"], corr["gallery_contribution"]
    p_val = np.asarray(p_val, dtype=np.float64).reshape(-1)
    g_val = np.asarray(g_val, dtype=np.float64).reshape(-1)
    p2g = np.asarray(corr["probe_to_gallery"], dtype=np.int64).reshape(-1)
    if p_val.size != fh * fw or g_val.size != fh * fw or p2g.size != fh * fw:
        raise ValueError(f"correspondences do not fit a {fh}x{fw} feature map ({p_val.size} probe locations)")

    img_a = _as_rgb(image_a, image_size)
    size = img_a.shape[:2]
    img_b = _as_rgb(image_b, size)
    ih, iw = size
    gap = max(4, iw // 8)

    chosen = select_matches(corr, top=top, threshold=threshold)
    start = _cell_centres(chosen, (fh, fw), size)
    end = _cell_centres(p2g[chosen], (fh, fw), size) + np.array([iw + gap, 0.0])
    line_val = p_val[chosen]

    lo, hi = float(min(p_val.min(), g_val.min())), float(max(p_val.max(), g_val.max()))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    norm = matplotlib.colors.Normalize(vmin=lo, vmax=hi)
    cmap = matplotlib.colormaps["turbo"]

    canvas = np.full((ih, 2 * iw + gap, 3), 255, dtype=np.uint8)
    canvas[:, :iw] = img_a
    canvas[:, iw + gap :] = img_b

    with matplotlib.rc_context({"text.parse_math": False}):  # labels with `$` are not mathtext
        fig = plt.figure(figsize=(6.4, 7.6), dpi=120, layout="constrained")
        grid = fig.add_gridspec(2, 2)
        ax_top = fig.add_subplot(grid[0, :2])
        ax_top.imshow(canvas)
        if len(chosen):
            segments = np.stack((start, end), axis=1)
            order = np.argsort(line_val)  # strongest drawn last, on top
            lines = LineCollection(segments[order], colors=cmap(norm(line_val[order])), linewidths=1.6, alpha=0.9)
            ax_top.add_collection(lines)
            ax_top.scatter(*np.concatenate((start, end)).T, s=10, c=cmap(norm(np.concatenate((line_val, line_val)))),
                           edgecolors="white", linewidths=0.4, zorder=3)
        if threshold is None:
            rule = f"top {len(chosen)}"
        else:
            rule = f"{'cosine' if shown == 'sim' else 'contribution'} > {threshold:g}"
        ranking = "cosine x fc weight" if shown == "sim" else value_label
        ax_top.set_title(f"{len(chosen)} matches ({rule}, ranked by {ranking})", fontsize=8)
        ax_top.set_xlim(-0.5, canvas.shape[1] - 0.5)
        ax_top.set_ylim(ih - 0.5, -0.5)
        ax_top.axis("off")

        axes = [ax_top]
        cell = "best match" if shown == "sim" else "contribution"
        for col, (img, val_map, label) in enumerate(((img_a, p_val, labels[0]), (img_b, g_val, labels[1]))):
            ax = fig.add_subplot(grid[1, col])
            ax.imshow(img)
            ax.imshow(val_map.reshape(fh, fw), cmap=cmap, norm=norm, alpha=0.6, interpolation="nearest",
                      extent=(-0.5, iw - 0.5, ih - 0.5, -0.5))
            ax.set_title(f"{label}: {cell} per location", fontsize=8)
            ax.axis("off")
            axes.append(ax)

        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8, label=value_label)
        kernel = "probe" if semantics == "default" else "gallery"
        fig.suptitle(f"{score_name} {score:.3f}\n{semantics} semantics ({kernel} = kernel side)", fontsize=10)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with writing(path):
            fig.savefig(path, format="png")
        plt.close(fig)
    return path


def match_images(extractor, path_a, path_b, out_png: str | Path, top: int | None = 20,
                 threshold: float | None = None, semantics: str = "default") -> tuple[float, Path]:
    """Score ``path_a`` (probe) against ``path_b`` (gallery) with ``extractor.matcher`` and draw the match.

    ``extractor`` is a :class:`qaconv.extractor.FeatureExtractor` whose matcher is QAConv. The images may
    also be anything the extractor accepts for a single image. Returns ``(score, png_path)``: under the
    default semantics the eval-mode logit ``matcher(probe, gallery)``; under ``semantics="official"``
    sigmoid(logit / 10) of ``matcher(gallery, probe)`` (the gallery as kernel side, as the official
    ``matching/qaconv_match.py``; the same logit in version 2.1, which is symmetric).
    """
    from ..models.qaconv import SEMANTICS

    if semantics not in SEMANTICS:
        raise ValueError(f"unknown correspondence semantics {semantics!r}; choose one of: {', '.join(SEMANTICS)}")
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
            if semantics == "official":
                score = float(torch.sigmoid(matcher(maps[1:], maps[:1]).reshape(-1)[0] / 10))
            else:
                score = float(matcher(maps[:1], maps[1:]).reshape(-1)[0])
            corr = matcher.correspondences(maps[0], maps[1], semantics=semantics)
    finally:
        matcher.train(was_training)
    path = draw_match(inputs[0], inputs[1], corr, score, out_png, top=top, threshold=threshold,
                      feature_size=tuple(maps.shape[-2:]))
    return score, path
