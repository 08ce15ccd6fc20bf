"""CMC curves, and score histograms with the ROC, as PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import writing


def _save(fig, path: str | Path) -> Path:
    """Lay out, write (one line naming ``path`` on a full or read-only disk) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with writing(path):
            fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def plot_cmc(
    curves: dict[str, np.ndarray], path: str | Path, title: str = "CMC", max_rank: int = 20, dashed: tuple = ()
) -> Path:
    """Plot each named CMC curve (fractions, cmc[0] = rank-1) up to ``max_rank`` into ``path``; the
    curves named in ``dashed`` are drawn dashed. Curves share a colour when their labels agree up to
    the first comma (one colour per method). All text is drawn literally (no mathtext)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context({"text.parse_math": False}):  # a `$` in a name is not mathtext
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
        colors: dict[str, str] = {}
        for label, cmc in curves.items():
            n = min(max_rank, len(cmc))
            ranks = np.arange(1, n + 1)
            style = "--" if label in dashed else "-"
            color = colors.setdefault(label.split(",")[0], f"C{len(colors)}")
            ax.plot(ranks, 100 * np.asarray(cmc[:n]), style, color=color, marker="o", markersize=3,
                    label=f"{label} (R1 {100 * cmc[0]:.1f})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("rank")
        ax.set_ylabel("matching rate (%)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        return _save(fig, path)


def plot_score_distributions(histogram: dict, roc: dict, points: list[dict], path: str | Path,
                             num_negative: int | None = None, title: str = "QAConv scores",
                             lines: dict[str, float] | None = None) -> Path:
    """Two panels into ``path``: the score histograms of same- and different-identity pairs (``histogram``:
    shared ``edges`` and ``positive``/``negative`` counts, each drawn as a density) with vertical ``lines``
    (label -> score), and the ROC (``roc``: ``far``/``tar`` lists) on a log-FAR axis with the TAR@FAR
    ``points`` ({"far", "tar", ...}; those without a TAR are left out). With ``num_negative`` N the axis starts
    at 1/N, the smallest FAR N negatives can estimate. All text is drawn literally (no mathtext)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    edges = np.asarray(histogram["edges"], dtype=np.float64)
    widths = np.diff(edges)
    with matplotlib.rc_context({"text.parse_math": False}):
        fig, (ax_h, ax_r) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
        for key, color, label in (("positive", "C2", "same identity"), ("negative", "C3", "different identity")):
            counts = np.asarray(histogram[key], dtype=np.float64)
            density = counts / max(counts.sum(), 1) / np.where(widths > 0, widths, 1)
            ax_h.stairs(density, edges, fill=True, alpha=0.45, color=color,
                        label=f"{label} ({int(counts.sum()):,} pairs)")
        for i, (label, x) in enumerate((lines or {}).items()):
            ax_h.axvline(x, color="k", linestyle=("--", ":")[i % 2], linewidth=1, label=label)
        ax_h.set_xlabel("score (QAConv logit)")
        ax_h.set_ylabel("density")
        ax_h.set_title(f"{title}: cross-camera pairs", fontsize=10)
        ax_h.legend(fontsize=8)
        ax_h.grid(alpha=0.3)

        far, tar = np.asarray(roc["far"], dtype=np.float64), np.asarray(roc["tar"], dtype=np.float64)
        floor = 1.0 / num_negative if num_negative else (far[far > 0].min() if (far > 0).any() else 1e-6)
        shown = far > 0
        ax_r.step(far[shown], 100 * tar[shown], where="post", color="C0", label="ROC")
        for p in points:
            if p.get("tar") is not None and p.get("threshold") is not None:
                ax_r.plot([p["far"]], [100 * p["tar"]], "o", color="C1", markersize=5)
                ax_r.annotate(f"TAR@{p['far']:g} {100 * p['tar']:.1f}%", (p["far"], 100 * p["tar"]), fontsize=7,
                              xytext=(4, 6 if p["tar"] < 0.2 else -10), textcoords="offset points")
        if num_negative:
            ax_r.axvline(floor, color="grey", linestyle=":", linewidth=1, label=f"1/N (N = {num_negative:,})")
        ax_r.set_xscale("log")
        ax_r.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # not mathtext, drawn literally
        ax_r.xaxis.set_minor_formatter(NullFormatter())
        ax_r.set_xlim(min(floor, 1e-4) / 2, 1.0)
        ax_r.set_ylim(0, 100)
        ax_r.set_xlabel("false-accept rate (log)")
        ax_r.set_ylabel("true-accept rate (%)")
        ax_r.set_title("ROC (accept when score >= threshold)", fontsize=10)
        ax_r.legend(fontsize=8, loc="best")
        ax_r.grid(alpha=0.3, which="both")
        return _save(fig, path)
