"""Evaluation skips an undecodable query/gallery image like training does (or stops with strict)."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qaconv.engine.evaluator import evaluate
from qaconv.engine.runner import DEFAULTS, build_model
from qaconv.errors import QAConvError

TINY = {"arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16}


def truncated_jpeg(path, frac=0.8):
    """A real noisy JPEG cut at ``frac`` of its bytes: its header is intact, its data is not."""
    noise = np.random.default_rng(0).integers(0, 256, (256, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * frac)])
    return path


def test_truncated_jpeg_passes_verify_but_not_decode(tmp_path):
    p = truncated_jpeg(tmp_path / "t.jpg")
    with Image.open(p) as img:
        img.verify()  # the old check passes it: only a full decode finds it
    with pytest.raises(OSError), Image.open(p) as img:
        img.load()


@pytest.fixture(scope="module")
def model_and_matcher():
    torch.manual_seed(0)
    model, matcher = build_model({**DEFAULTS, **TINY}, load_weights=False)
    return model.eval(), matcher.eval()


def _copy(tiny_domain, dest):
    shutil.copytree(tiny_domain, dest / "synth_A")
    return dest


def _cfg(data_dir, **kw):
    return {**DEFAULTS, **TINY, "data_dir": str(data_dir), "workers": 0, "device": "cpu", "fea_batch": 16, **kw}


@pytest.mark.parametrize("split", ["bounding_box_test", "query"])
def test_undecodable_image_is_skipped_like_a_missing_file(tiny_domain, tmp_path, model_and_matcher, capsys, split):
    model, matcher = model_and_matcher
    bad_dir, ref_dir = _copy(tiny_domain, tmp_path / "bad"), _copy(tiny_domain, tmp_path / "ref")
    name = sorted(p.name for p in (tiny_domain / split).glob("*.jpg") if not p.name.startswith(("0000", "-1")))[3]
    bad = truncated_jpeg(bad_dir / "synth_A" / split / name)
    (ref_dir / "synth_A" / split / name).unlink()  # the brute-force reference: the same set without the file
    got = evaluate(model, matcher, _cfg(bad_dir, rerank=True), "synth_A", progress=True)
    out = capsys.readouterr().out
    which = "gallery" if split == "bounding_box_test" else "query"
    assert out.count(f"skipped 1 undecodable {which} image(s), e.g. {bad}") == 1
    assert out.count("skipped") == 1  # once per test set, nothing for the other split
    ref = evaluate(model, matcher, _cfg(ref_dir, rerank=True), "synth_A", progress=False)
    assert got.keys() == ref.keys() == {"synth_A", "synth_A +RR"}
    for key in got:
        assert got[key].cmc == pytest.approx(ref[key].cmc, abs=1e-6)
        assert got[key].mAP == pytest.approx(ref[key].mAP, abs=1e-6)
        assert got[key].mINP == pytest.approx(ref[key].mINP, abs=1e-6)
        assert got[key].num_invalid == ref[key].num_invalid


def test_strict_stops_naming_the_file(tiny_domain, tmp_path, model_and_matcher):
    model, matcher = model_and_matcher
    data_dir = _copy(tiny_domain, tmp_path)
    bad = truncated_jpeg(sorted((data_dir / "synth_A" / "bounding_box_test").glob("*.jpg"))[5])
    with pytest.raises(QAConvError, match=f"undecodable gallery image {bad} ") as info:
        evaluate(model, matcher, _cfg(data_dir, strict=True), "synth_A", progress=False)
    assert "\n" not in str(info.value)
