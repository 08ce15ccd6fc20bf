"""qaconv.load, 'qaconv convert' (official -> package checkpoint) and 'qaconv export' (ONNX)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from test_official import fake_official, official_logits

import qaconv
from qaconv.cli import main
from qaconv.engine.checkpoint import save_checkpoint
from qaconv.engine.runner import DEFAULTS, build_model

SMALL = ["--arch", "resnet18", "--neck", "16", "--height", "32", "--width", "16"]


def _tiny_checkpoint(path, **over):
    """A package checkpoint of a random tiny model (what 'qaconv train' saves, minus the training state)."""
    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": "a", "neck": 8, "pretrained": None, "height": 32, "width": 16}
    cfg.update(over)
    torch.manual_seed(0)
    model, matcher = build_model(cfg, load_weights=False)
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()}, path)
    return model.eval(), matcher.eval()


def test_load_restores_model_matcher_and_config(tmp_path):
    model, matcher = _tiny_checkpoint(tmp_path / "run" / "checkpoint.pt", qaconv_version="1")
    m = qaconv.load(tmp_path / "run", device="cpu")
    backbone, match, cfg = m  # unpacks like load_trained
    assert (m.height, m.width, cfg["arch"], match.version) == (32, 16, "resnet18", "1")
    assert not backbone.training and not match.training
    x = torch.rand(2, 3, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model(x))
        maps = model(x)
        torch.testing.assert_close(match(maps, maps), matcher(maps, maps))


def _err(fn):
    with pytest.raises(qaconv.QAConvError) as exc:
        fn()
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_load_errors_are_one_line(tmp_path):
    assert "does not exist" in _err(lambda: qaconv.load(tmp_path / "missing.pt"))
    official = tmp_path / "checkpoint.pth.tar"
    fake_official(official)
    assert "qaconv convert" in _err(lambda: qaconv.load(official))
    bad = tmp_path / "bad.pt"
    _tiny_checkpoint(bad)
    state = torch.load(bad, weights_only=True)
    state["config"]["neck"] = 12  # the weights no longer fit the architecture the config describes
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, bad)
    assert "does not fit its own config" in _err(lambda: qaconv.load(bad))
    del state["matcher"]
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, bad)
    assert "holds no trained model" in _err(lambda: qaconv.load(bad))


@pytest.mark.parametrize("version", ["2.1", "1"])
def test_convert_then_load_gives_the_official_logits(tmp_path, version, capsys):
    official = tmp_path / "checkpoint.pth.tar"
    _, head = fake_official(official, version=version)
    out = tmp_path / "converted"
    assert main(["convert", str(official), "-o", str(out), *SMALL]) == 0
    assert "wrote" in capsys.readouterr().out
    m = qaconv.load(out, device="cpu")
    assert m.config["input_norm"] == "none" and m.config["qaconv_version"] == version
    ref_backbone, _ = qaconv.load_official_checkpoint(official, arch="resnet18", neck=16, height=32, width=16)
    x = torch.rand(3, 3, 32, 16)
    with torch.no_grad():
        maps = m.backbone(x)
        torch.testing.assert_close(maps, ref_backbone(x), rtol=1e-5, atol=1e-5)
        prob, gal = F.normalize(torch.randn(2, 16, 2, 1), dim=1), F.normalize(torch.randn(3, 16, 2, 1), dim=1)
        got = m.matcher(prob, gal).double()
    torch.testing.assert_close(got, official_logits(prob, gal, head, version), rtol=1e-4, atol=1e-4)


def test_convert_cli_then_evaluate(tmp_path, tiny_domain, capsys):
    official = tmp_path / "checkpoint.pth.tar"
    fake_official(official)
    out = tmp_path / "converted"
    assert main(["convert", str(official), "-o", str(out), *SMALL]) == 0
    common = ["--data-dir", str(tiny_domain.parent), "--workers", "0", "--device", "cpu"]
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--testsets", "synth_A", *common]) == 0
    assert any(line.startswith("synth_A ") for line in capsys.readouterr().out.splitlines())
    # no silent overwrite, and a wrong layout is one line naming what the file looks like
    assert main(["convert", str(official), "-o", str(out), *SMALL]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(official), "-o", str(tmp_path / "x"), *SMALL, "--ibn", "none"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ibn=b" in err
    # a converted checkpoint has no training state: --resume says so in one line
    code = main(["train", "-o", str(out), "--resume", "--dataset", "synth_A", "--testsets", "", *common])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "converted from an official checkpoint" in err


@pytest.mark.parametrize("command", ["convert", "export"])
def test_help_states_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "(default: " in capsys.readouterr().out


def test_export_onnx_matches_pytorch(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, _ = _tiny_checkpoint(tmp_path / "run" / "checkpoint.pt", ibn="b", input_norm="imagenet")
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--onnx", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert "images [N, 3, 32, 16]" in out and "maps [N, 8, 2, 1]" in out and "onnxruntime vs PyTorch" in out
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (1, 3):
        x = torch.rand(batch, 3, 32, 16)
        with torch.no_grad():
            ref = model(x).numpy()  # includes the ImageNet mean/std normalisation
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == ref.shape
        assert abs(got - ref).max() < 1e-4
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--onnx", str(onnx_path), "--opset", "99"]) == 1
    assert "opset must be between 11 and" in capsys.readouterr().err


def test_export_without_onnx_says_so(tmp_path, monkeypatch, capsys):
    _tiny_checkpoint(tmp_path / "run" / "checkpoint.pt")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--onnx", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the 'onnx' package" in err[0] and "qaconv[onnx]" in err[0]


def test_convert_of_a_qaconv_checkpoint_says_so(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoint.pt"
    _tiny_checkpoint(ckpt)
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already a qaconv checkpoint" in err and "neck" not in err
