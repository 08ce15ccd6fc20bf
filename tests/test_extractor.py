"""FeatureExtractor: every input kind gives the same features; batching is invisible; bad inputs fail clearly."""

import numpy as np
import pytest
import torch
from PIL import Image

from qaconv.engine.runner import DEFAULTS, build_model
from qaconv.extractor import FeatureExtractor

H, W = 64, 32


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": H, "width": W, "neck": 16}
    return build_model(cfg, load_weights=False)


def _image(seed: int, size=(W, H)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_all_input_kinds_agree(tiny, tmp_path):
    model, matcher = tiny
    ext = FeatureExtractor((model, matcher), device="cpu", height=H, width=W)
    assert ext.matcher is matcher
    img = _image(1)
    png = tmp_path / "a.png"
    img.save(png)
    arr = np.array(img)
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    reference = ext(str(png))
    assert reference.dtype == torch.float32 and reference.device.type == "cpu"
    assert reference.shape[0] == 1 and reference.shape[1] == model.out_channels
    assert tuple(reference.shape[-2:]) == ext.feature_size
    uint8 = torch.from_numpy(arr).permute(2, 0, 1)
    for same in (png, img, arr, tensor, tensor.unsqueeze(0), [img], [arr, tensor], uint8):
        out = ext(same)
        for row in out:
            torch.testing.assert_close(row, reference[0], rtol=1e-5, atol=1e-5)


def test_resizes_other_sizes(tiny):
    model, _ = tiny
    ext = FeatureExtractor(model, device="cpu", height=H, width=W)
    assert ext.matcher is None
    out = ext([_image(2, size=(50, 100)), torch.rand(3, 40, 20)])
    assert out.shape[0] == 2 and tuple(out.shape[-2:]) == ext.feature_size


def test_batches_do_not_change_results(tiny):
    model, matcher = tiny
    images = [_image(i) for i in range(5)]
    whole = FeatureExtractor((model, matcher), device="cpu", batch_size=64, height=H, width=W)(images)
    split = FeatureExtractor((model, matcher), device="cpu", batch_size=2, height=H, width=W)(images)
    assert whole.shape[0] == 5
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_eval_mode_restored(tiny):
    model, _ = tiny
    ext = FeatureExtractor(model, device="cpu", height=H, width=W)
    model.train()
    ext(_image(3))
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    "bad",
    [
        42,
        [1, 2],
        [],
        np.zeros((H, W, 3), dtype=np.float32),
        np.zeros((H, W, 5), dtype=np.uint8),
        np.zeros((2, H, W, 3), dtype=np.uint8),
        torch.rand(1, H, W),
        torch.rand(2, 2, 3, H, W),
        torch.rand(3, H, W) * 255,
        torch.zeros(3, H, W, dtype=torch.int64),
        [torch.rand(2, 3, H, W)],
    ],
)
def test_bad_inputs_raise(tiny, bad):
    model, _ = tiny
    ext = FeatureExtractor(model, device="cpu", height=H, width=W)
    with pytest.raises(ValueError):
        ext(bad)


def test_bad_construction(tiny):
    model, matcher = tiny
    with pytest.raises(ValueError, match="height and width"):
        FeatureExtractor(model)
    with pytest.raises(ValueError):
        FeatureExtractor(3.5, height=H, width=W)
    with pytest.raises(ValueError):
        FeatureExtractor(model, batch_size=0, height=H, width=W)


def test_from_checkpoint(tiny, tmp_path):
    from qaconv.engine.checkpoint import save_checkpoint

    model, matcher = tiny
    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": H, "width": W, "neck": 16}
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()},
                    tmp_path / "checkpoint.pt")
    ext = FeatureExtractor(tmp_path / "checkpoint.pt", device="cpu")
    assert (ext.height, ext.width) == (H, W) and ext.matcher is not None and not ext.matcher.training
    img = _image(4)
    torch.testing.assert_close(ext(img), FeatureExtractor(model, height=H, width=W, device="cpu")(img))
