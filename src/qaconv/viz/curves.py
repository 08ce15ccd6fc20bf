"""CMC curves as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import writing


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
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with writing(path):
            fig.savefig(path)
        plt.close(fig)
    return path
