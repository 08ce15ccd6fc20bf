"""The CMC plot is a readable PNG of the requested size."""

import numpy as np
from PIL import Image

from qaconv.viz.curves import plot_cmc


def test_plot_cmc_writes_png(tmp_path):
    cmc = np.linspace(0.2, 1.0, 50)
    path = plot_cmc({"QAConv, A->B": cmc, "QAConv, A->A": cmc ** 0.5}, tmp_path / "sub" / "cmc.png",
                    dashed=("QAConv, A->A",))
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (720, 504)
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # something was drawn
