import numpy as np
import pytest
import torch
from PIL import Image

from qaconv.data.images import ImageDataset, collate_skip_bad, read_rgb, scan_images
from qaconv.data.records import Record
from qaconv.errors import QAConvError


def _px(path):
    img = read_rgb(str(path))
    assert img.mode == "RGB"
    return np.asarray(img).tolist()


def test_grayscale(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), mode="L").save(p)
    assert _px(p) == [[[0, 0, 0], [100, 100, 100], [255, 255, 255]]]


def test_palette(tmp_path):
    p = tmp_path / "p.png"
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.save(p)
    assert Image.open(p).mode == "P"
    assert _px(p) == [[[10, 20, 30], [200, 100, 50]]]


def test_rgba_drops_alpha(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(np.array([[[1, 2, 3, 0], [4, 5, 6, 255]]], dtype=np.uint8), mode="RGBA").save(p)
    assert _px(p) == [[[1, 2, 3], [4, 5, 6]]]


def test_16bit_png(tmp_path):
    p = tmp_path / "i16.png"
    Image.fromarray(np.array([[0, 256, 1000, 65535]], dtype=np.uint16)).save(p)
    assert Image.open(p).mode == "I;16"
    # scaled by 1/256: 0, 1, 3 (1000/256 = 3.9 truncated), 255
    assert _px(p) == [[[v] * 3 for v in (0, 1, 3, 255)]]


def test_32bit_int_image(tmp_path):
    p = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 512, 65535]], dtype=np.int32), mode="I").save(p)
    assert _px(p) == [[[v] * 3 for v in (0, 2, 255)]]


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "c.jpg"
    img = Image.new("CMYK", (2, 1))
    img.putpixel((0, 0), (0, 0, 0, 0))  # white
    img.putpixel((1, 0), (255, 0, 0, 0))  # full cyan
    img.save(p, quality=100)
    assert Image.open(p).mode == "CMYK"
    white, cyan = _px(p)[0]
    assert all(v >= 250 for v in white)
    assert cyan[0] <= 5 and cyan[1] >= 250 and cyan[2] >= 250


def _bad_files(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (8, 16), (10, 20, 30)).save(good)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "big.jpg")
    data = (tmp_path / "big.jpg").read_bytes()
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    return good, [empty, trunc, text]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_bad_file_strict_names_file(tmp_path, which):
    _, bad = _bad_files(tmp_path)
    with pytest.raises(QAConvError, match=f"cannot read image .*{bad[which].name}"):
        read_rgb(str(bad[which]))
    ds = ImageDataset([Record(str(bad[which]), 0, 0)], lambda im: im)
    with pytest.raises(QAConvError, match=bad[which].name):
        ds[0]


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_bad_through_dataloader(tmp_path, workers):
    good, bad = _bad_files(tmp_path)
    # batches: [g, e, g, t] [x, g, g, g] [e, t]  -> 2 + 1 + 2 bad
    paths = [good, bad[0], good, bad[1], bad[2], good, good, good, bad[0], bad[1]]
    records = [Record(str(p), pid=i, camid=i % 2) for i, p in enumerate(paths)]
    ds = ImageDataset(records, _to_tensor, skip_bad=True)
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate_skip_bad)
    out = list(loader)
    assert [b[4] for b in out] == [2, 1, 2]
    images, pids, camids, indices, _ = out[0]
    assert images.shape == (2, 3, 16, 8)
    assert pids.tolist() == [0, 2] and indices.tolist() == [0, 2] and camids.tolist() == [0, 0]
    assert out[1][3].tolist() == [5, 6, 7]
    assert len(out[2][0]) == 0 and out[2][3].numel() == 0
    # the dataset's own record of bad paths is only filled in this process without workers
    expected = {str(p) for p in bad} if workers == 0 else set()
    assert ds.bad_paths == expected
    # the trainer's unpacking still works
    for imgs, targets, *_ in loader:
        assert len(imgs) == len(targets)


def test_skip_bad_false_is_default(tmp_path):
    good, _ = _bad_files(tmp_path)
    ds = ImageDataset([Record(str(good), 3, 1)], _to_tensor)
    img, pid, cam, idx = ds[0]
    assert img.shape == (3, 16, 8) and (pid, cam, idx) == (3, 1, 0)


def test_scan_images(tmp_path):
    good, bad = _bad_files(tmp_path)
    missing = tmp_path / "missing.jpg"
    records = [Record(str(p), 0, 0) for p in [good, *bad, good, bad[0], missing]]
    expected = [str(p) for p in [*bad, missing]]
    assert scan_images(records, progress=False) == expected
    assert scan_images(records, progress=False, threads=1) == expected
    assert scan_images([Record(str(good), 0, 0)], progress=True) == []


def test_scan_images_decodes_fully(tmp_path):
    """A noisy JPEG cut at 80 % keeps its header, so PIL's verify() passes it; the scan decodes and flags it."""
    trunc = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 128, 3), dtype=np.uint8)).save(trunc, quality=95)
    data = trunc.read_bytes()
    trunc.write_bytes(data[: int(0.8 * len(data))])
    with Image.open(trunc) as img:
        img.verify()
    good = tmp_path / "good.jpg"
    Image.new("RGB", (8, 16), (10, 20, 30)).save(good)
    assert scan_images([Record(str(good), 0, 0), Record(str(trunc), 1, 0)], progress=False) == [str(trunc)]
