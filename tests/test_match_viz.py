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


# ------------------------------------------------------------------ official semantics (matching/qaconv_match.py)


def _tiny_qaconv(version):
    """C=2, 1x2 maps; bn(x) = (x - 0.5) / 0.5 * 2 + 0.1 = 4x - 1.9; logit_bn(y) = (y - 1) / 2 * 3 - 0.5."""
    from qaconv.models import QAConv

    m = QAConv(2, 1, 2, version=version).double()
    for bn, (mean, var, gamma, beta) in ((m.bn, (0.5, 0.25, 2.0, 0.1)), (m.logit_bn, (1.0, 4.0, 3.0, -0.5))):
        bn.eps = 0.0
        bn.running_mean.fill_(mean)
        bn.running_var.fill_(var)
        bn.weight.data.fill_(gamma)
        bn.bias.data.fill_(beta)
    w = [-1.0, 0.5, 2.0, 0.25] if version == "1" else [0.5, -1.0]
    m.fc.weight.data = torch.tensor([w], dtype=torch.float64)
    m.fc.bias.data.fill_(0.3)
    # probe locations (1, 0), (0, 1); gallery locations (0.6, 0.8), (1, 0)
    prob = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    gal = torch.tensor([[[0.6, 1.0]], [[0.8, 0.0]]], dtype=torch.float64)
    return m, prob, gal


# cosines: probe -> best gallery [1.0 (g1), 0.8 (g0)], gallery -> best probe [0.8 (p1), 1.0 (p0)];
# bn of them: [2.1, 1.3] and [1.3, 2.1]
HAND = {
    # version: (default probe/gallery contribution, official probe/gallery contribution, default / official logit)
    # v1 default: probe half w[2:] = [2, .25] x cos, gallery half w[:2] = [-1, .5] x cos;
    # v1 official (gallery = kernel): probe w[:2] x bn, gallery w[2:] x bn
    "1": ([2.0, 0.2], [-0.8, 0.5], [-2.1, 0.65], [2.6, 0.525], (4.575 - 1) * 1.5 - 0.5, (1.975 - 1) * 1.5 - 0.5),
    # v2.1: shared [.5, -1]; official logit = logit_bn(sum + 2 * bias), symmetric
    "2.1": ([0.5, -0.8], [0.4, -1.0], [1.05, -1.3], [0.65, -2.1], (-1.1 - 1) * 1.5 - 0.5, (-1.1 - 1) * 1.5 - 0.5),
}


@pytest.mark.parametrize("version", ["1", "2.1"])
def test_official_contributions_hand_computed(version):
    m, prob, gal = _tiny_qaconv(version)
    d_p, d_g, o_p, o_g, d_logit, o_logit = HAND[version]
    m.train()  # contributions use bn's running statistics whatever the mode
    default = m.correspondences(prob, gal)
    official = m.correspondences(prob, gal, semantics="official")
    assert str(default["semantics"]) == "default" and str(official["semantics"]) == "official"
    for corr in (default, official):
        assert corr["probe_to_gallery"].tolist() == [1, 0] and corr["gallery_to_probe"].tolist() == [1, 0]
        np.testing.assert_allclose(corr["probe_to_gallery_sim"], [1.0, 0.8])
        np.testing.assert_allclose(corr["gallery_to_probe_sim"], [0.8, 1.0])
    np.testing.assert_allclose(default["probe_contribution"], d_p, atol=1e-12)
    np.testing.assert_allclose(default["gallery_contribution"], d_g, atol=1e-12)
    np.testing.assert_allclose(official["probe_contribution"], o_p, atol=1e-12)
    np.testing.assert_allclose(official["gallery_contribution"], o_g, atol=1e-12)
    m.eval()
    with torch.no_grad():
        assert float(m(prob[None], gal[None])) == pytest.approx(d_logit)
        assert float(m(gal[None], prob[None])) == pytest.approx(o_logit)  # the gallery as kernel side
    if version == "1":
        assert select_matches(default, top=2).tolist() == [0, 1]
        assert select_matches(official, top=2).tolist() == [1, 0]
        assert select_matches(default, threshold=0.5).tolist() == [0, 1]  # on the cosine
        assert select_matches(official, threshold=0.5).tolist() == [1]  # on the contribution
    with pytest.raises(ValueError, match="official"):
        m.correspondences(prob, gal, semantics="matlab")


def _official_corr():
    corr = _corr()
    corr.update(semantics=np.array("official"),
                probe_contribution=np.array([0.1, -0.3, 0.7, 0.2]), gallery_contribution=np.array([0.0, 0.1, 0.2, 0.3]))
    return corr


def test_draw_match_official_lines_and_title(tmp_path, monkeypatch):
    import matplotlib.collections
    import matplotlib.figure

    captured, titles = [], []
    original = matplotlib.collections.LineCollection

    class Spy(original):
        def __init__(self, segments, *args, **kwargs):
            captured.append({tuple(map(tuple, np.asarray(seg).tolist())) for seg in segments})
            super().__init__(segments, *args, **kwargs)

    import matplotlib.axes

    suptitle, imshow, heat = matplotlib.figure.Figure.suptitle, matplotlib.axes.Axes.imshow, []

    def spy_imshow(self, x, *args, **kwargs):
        if np.ndim(x) == 2:
            heat.append(np.asarray(x).tolist())
        return imshow(self, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy_imshow)
    monkeypatch.setattr(matplotlib.collections, "LineCollection", Spy)
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, t, **kw: titles.append(t) or suptitle(self, t, **kw))
    img = Image.new("RGB", (W, H), (120, 80, 40))
    path = draw_match(img, img, _official_corr(), 0.625, tmp_path / "o.png", threshold=0.15, feature_size=(2, 2))
    gap = max(4, W // 8)
    # contributions > 0.15: probe 2 (8, 48) -> gallery 1 (24, 16), probe 3 (24, 48) -> gallery 0 (8, 16)
    assert {((8, 48), (24 + W + gap, 16)), ((24, 48), (8 + W + gap, 16))} in captured
    assert heat == [[[0.1, -0.3], [0.7, 0.2]], [[0.0, 0.1], [0.2, 0.3]]]  # contributions, not cosines
    assert "sigmoid(logit/10) 0.625" in titles[-1] and "official semantics (gallery = kernel side)" in titles[-1]
    with Image.open(path) as png:
        assert png.format == "PNG" and np.asarray(png.convert("L")).std() > 10
    draw_match(img, img, _corr(), 1.5, tmp_path / "d.png", feature_size=(2, 2))
    assert "logit 1.500" in titles[-1] and "default semantics (probe = kernel side)" in titles[-1]


def _bn_np(x, bn):
    return (x - bn.running_mean.item()) / np.sqrt(bn.running_var.item() + bn.eps) * bn.weight.item() + bn.bias.item()


def test_match_images_official_score(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (80, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    torch.manual_seed(1)
    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": H, "width": W, "neck": 16,
           "qaconv_version": "1"}
    ext = FeatureExtractor(build_model(cfg, load_weights=False), device="cpu", height=H, width=W)
    qa = ext.matcher
    with torch.no_grad():
        qa.bn.running_mean.fill_(0.3)
        qa.bn.running_var.fill_(0.04)
        qa.bn.weight.fill_(1.5)
        qa.logit_bn.running_mean.fill_(-0.2)
        qa.logit_bn.running_var.fill_(2.0)
    score, path = match_images(ext, *paths, tmp_path / "official.png", threshold=0.0025, semantics="official")
    # by hand: probe = input side, gallery = kernel; fc's first half on the probe locations (qaconv_match.py)
    maps = ext(paths).double().numpy()
    p, g = maps[0].reshape(maps.shape[1], -1), maps[1].reshape(maps.shape[1], -1)
    sim = p.T @ g
    pooled = np.concatenate((sim.max(axis=1), sim.max(axis=0)))
    w = qa.fc.weight.detach().double().numpy().reshape(-1)
    logit = _bn_np(_bn_np(pooled, qa.bn) @ w + qa.fc.bias.item(), qa.logit_bn)
    assert score == pytest.approx(1 / (1 + np.exp(-logit / 10)), abs=1e-6)
    with Image.open(path) as png:
        assert png.format == "PNG" and np.asarray(png.convert("L")).std() > 10
    with pytest.raises(ValueError, match="semantics"):
        match_images(ext, *paths, tmp_path / "x.png", semantics="matlab")


class StubExtractor:
    """Hands match_images fixed feature maps (the tiny hand-computed case) and plain images."""

    def __init__(self, matcher, maps):
        self.matcher, self.maps = matcher, maps

    def to_tensors(self, images):
        return [torch.full((3, H, W), 0.25 * (i + 1)) for i in range(len(images))]

    def __call__(self, inputs):
        return self.maps


@pytest.mark.parametrize("version", ["1", "2.1"])
def test_match_images_scores_hand_computed(version, tmp_path):
    m, prob, gal = _tiny_qaconv(version)
    *_, d_logit, o_logit = HAND[version]
    ext = StubExtractor(m, torch.stack((prob, gal)))
    score, path = match_images(ext, "a", "b", tmp_path / "o.png", semantics="official")
    assert score == pytest.approx(1 / (1 + np.exp(-o_logit / 10)))
    with Image.open(path) as png:
        assert png.format == "PNG"
    assert match_images(ext, "a", "b", tmp_path / "d.png")[0] == pytest.approx(d_logit)
