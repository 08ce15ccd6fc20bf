"""CMC curves as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_cmc(curves: dict[str, np.ndarray], path: str | Path, title: str = "CMC", max_rank: int = 20) -> Path:
    """Plot each named CMC curve (fractions, cmc[0] = rank-1) up to ``max_rank`` into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for label, cmc in curves.items():
        n = min(max_rank, len(cmc))
        ranks = np.arange(1, n + 1)
        ax.plot(ranks, 100 * np.asarray(cmc[:n]), marker="o", markersize=3, label=f"{label} (R1 {100 * cmc[0]:.1f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
