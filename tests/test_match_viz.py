"""Match drawing: the selection of lines, the cell geometry, and a readable PNG of the expected layout."""

import numpy as np
import pytest
import torch
from PIL import Image

from qaconv.engine.runner import DEFAULTS, build_model
from qaconv.extractor import FeatureExtractor
from qaconv.viz.match import _cell_centres, draw_match, match_images, select_matches

H, W = 64, 32


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": H, "width": W, "neck": 16}
    model, _ = build_model(cfg, load_weights=False)
    return FeatureExtractor(model, device="cpu", height=H, width=W)  # no matcher


def _corr():
    # 2x2 feature map; contributions sim * weight = [0.45, 0.8, 0.1, 0.6]
    return dict(
        probe_to_gallery=np.array([3, 2, 1, 0]),
        probe_to_gallery_sim=np.array([0.9, 0.4, 0.5, 0.6], dtype=np.float32),
        probe_weight=np.array([0.5, 2.0, 0.2, 1.0], dtype=np.float32),
        gallery_to_probe=np.array([3, 2, 1, 0]),
        gallery_to_probe_sim=np.array([0.6, 0.5, 0.4, 0.9], dtype=np.float32),
        gallery_weight=np.array([0.5, 2.0, 0.2, 1.0], dtype=np.float32),
    )


def test_select_matches_by_hand():
    corr = _corr()
    assert select_matches(corr, top=2).tolist() == [1, 3]
    assert select_matches(corr, top=10).tolist() == [1, 3, 0, 2]
    assert select_matches(corr, top=0).tolist() == []
    # threshold on the similarity, still ordered by contribution
    assert select_matches(corr, threshold=0.45).tolist() == [3, 0, 2]
    assert select_matches(corr, threshold=0.95).tolist() == []


def test_cell_centres():
    # feature map 2 rows x 2 cols over a 64x32 image: cells are 32 high and 16 wide
    got = _cell_centres(np.array([0, 1, 2, 3]), (2, 2), (64, 32))
    assert got.tolist() == [[8, 16], [24, 16], [8, 48], [24, 48]]


def test_drawn_lines_are_the_top_matches(tmp_path, monkeypatch):
    captured = []
    import matplotlib.collections

    original = matplotlib.collections.LineCollection

    class Spy(original):
        def __init__(self, segments, *args, **kwargs):
            captured.append([np.asarray(seg).tolist() for seg in segments])
            super().__init__(segments, *args, **kwargs)

    monkeypatch.setattr(matplotlib.collections, "LineCollection", Spy)
    img = Image.new("RGB", (W, H), (120, 80, 40))
    draw_match(img, img, _corr(), 1.5, tmp_path / "m.png", top=2, feature_size=(2, 2))
    gap = max(4, W // 8)
    drawn = [{tuple(map(tuple, seg)) for seg in call} for call in captured]
    # probe 1 (24, 16) -> gallery 2 (8, 48); probe 3 (24, 48) -> gallery 0 (8, 16); gallery x shifted right
    assert {((24, 16), (8 + W + gap, 48)), ((24, 48), (8 + W + gap, 16))} in drawn


def test_draw_match_png(tmp_path):
    a = Image.new("RGB", (W, H), (200, 30, 30))
    b = Image.new("RGB", (2 * W, 2 * H), (30, 30, 200))  # resized to a's size
    path = draw_match(a, b, _corr(), -0.25, tmp_path / "sub" / "m.png", feature_size=(2, 2))
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (768, 912)
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 10
    with pytest.raises(ValueError):
        draw_match(a, b, _corr(), 0.0, tmp_path / "x.png", feature_size=(3, 3))
    with pytest.raises(ValueError):
        draw_match(a, b, _corr(), 0.0, tmp_path / "x.png")


def test_match_images(extractor, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (80, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    with pytest.raises(ValueError, match="QAConv"):
        match_images(extractor, *paths, tmp_path / "no.png")
    torch.manual_seed(0)
    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": H, "width": W, "neck": 16}
    ext = FeatureExtractor(build_model(cfg, load_weights=False), device="cpu", height=H, width=W)
    score, path = match_images(ext, *paths, tmp_path / "match.png", top=5)
    maps = ext(paths)
    with torch.no_grad():
        assert score == pytest.approx(float(ext.matcher(maps[:1], maps[1:])), abs=1e-5)
    with Image.open(path) as png:
        assert png.format == "PNG" and np.asarray(png.convert("L")).std() > 10
