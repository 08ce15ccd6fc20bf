"""Official QAConv checkpoints: key layout, values, logits against the spec's formulas, clear errors.

The official state-dict layout is re-stated here from the spec (sections 2-3) and the official module
names (``reid/models/resmap.py``: ``base`` = full torchvision / IBN-Net ResNet, ``neck_conv``, ``neck_bn``;
the loss holds the QAConv head under ``matcher.``, or at its top level with the class memory in v1.0/1.1),
independently of the package's model code.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qaconv.errors import QAConvError
from qaconv.models.official import load_official_checkpoint

BLOCKS = {"resnet18": (False, [2, 2, 2, 2]), "resnet34": (False, [3, 4, 6, 3]), "resnet50": (True, [3, 4, 6, 3])}


def _bn(keys, prefix, c):
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.{name}"] = (c,)
    keys[f"{prefix}.num_batches_tracked"] = ()


def _inorm(keys, prefix, c):
    keys[f"{prefix}.weight"] = (c,)
    keys[f"{prefix}.bias"] = (c,)


def official_model_layout(arch, ibn, neck, v1_neck):
    """{key: shape} of the official ResNet/IBN-Net feature-map model's ``model`` state dict."""
    bottleneck, counts = BLOCKS[arch]
    keys = {"conv1.weight": (64, 3, 7, 7)}
    (_inorm if ibn == "b" else _bn)(keys, "bn1", 64)
    inplanes = 64
    for li, (planes, n) in enumerate(zip([64, 128, 256, 512], counts, strict=True)):
        out = planes * 4 if bottleneck else planes
        for bi in range(n):
            p = f"layer{li + 1}.{bi}"
            k1 = (planes, inplanes, 1, 1) if bottleneck else (planes, inplanes, 3, 3)
            keys[f"{p}.conv1.weight"] = k1
            if ibn == "a" and li < 3:
                half = planes // 2
                _inorm(keys, f"{p}.bn1.IN", half)
                _bn(keys, f"{p}.bn1.BN", planes - half)
            else:
                _bn(keys, f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            _bn(keys, f"{p}.bn2", planes)
            if bottleneck:
                keys[f"{p}.conv3.weight"] = (out, planes, 1, 1)
                _bn(keys, f"{p}.bn3", out)
            if bi == 0 and (li > 0 or inplanes != out):
                keys[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                _bn(keys, f"{p}.downsample.1", out)
            if ibn == "b" and li < 2 and bi == n - 1:
                _inorm(keys, f"{p}.IN", out)
            inplanes = out
    keys["fc.weight"] = (1000, inplanes)
    keys["fc.bias"] = (1000,)
    keys = {f"base.{k}": v for k, v in keys.items()}
    layer3_channels = 1024 if bottleneck else 256
    if neck > 0:
        keys["neck_conv.weight"] = (neck, layer3_channels, 3, 3)
        if v1_neck:
            _bn(keys, "neck_bn", neck)
        else:
            keys["neck_conv.bias"] = (neck,)
    return keys


def official_criterion_layout(version, hw, num_features, style):
    keys = {}
    _bn(keys, "bn", 1)
    keys["fc.weight"] = (1, hw if version == "2.1" else 2 * hw)
    keys["fc.bias"] = (1,)
    _bn(keys, "logit_bn", 1)
    if style == "matcher":  # v1.2+ (class memory / pairwise / triplet loss with self.matcher)
        keys = {f"matcher.{k}": v for k, v in keys.items()}
    if version == "1":  # class memory buffers (v1.x)
        keys["class_memory"] = (5, num_features, 2, 1)
        keys["valid_class"] = (5,)
    return keys


def _random(layout, gen):
    out = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            out[key] = torch.randn(shape, generator=gen) * (0.1 if key.endswith("weight") and len(shape) == 4 else 1)
    return out


def fake_official(path, arch="resnet18", ibn="b", neck=16, version="2.1", hw=2, style="matcher", prefix=""):
    """Write a random official-format checkpoint (with training extras) and return its content."""
    gen = torch.Generator().manual_seed(0)
    model = _random(official_model_layout(arch, ibn, neck, v1_neck=version == "1"), gen)
    criterion = _random(official_criterion_layout(version, hw, neck, style), gen)
    ckpt = {
        "model": {prefix + k: v for k, v in model.items()},
        "criterion": {prefix + k: v for k, v in criterion.items()},
        "optim": {"state": {}, "param_groups": [{"lr": 0.005, "params": [0, 1]}]},
        "epoch": 7,
        "final_epochs": 9,
        "base_loss": np.float64(3.25),  # numpy scalars do occur in training extras
        "lr_stepped": True,
    }
    torch.save(ckpt, path)
    return model, {k.removeprefix("matcher."): v for k, v in criterion.items()}


def _bn_eval(x, state, prefix):
    return (x - state[f"{prefix}.running_mean"]) / torch.sqrt(state[f"{prefix}.running_var"] + 1e-5) * state[
        f"{prefix}.weight"
    ] + state[f"{prefix}.bias"]


def official_logits(prob, gal, head, version):
    """Spec section 3, one pair at a time in float64 (eval mode: both BNs are scalar affine maps)."""
    head = {k: v.double() for k, v in head.items()}
    num_p, c = prob.shape[:2]
    out = torch.zeros(num_p, gal.shape[0], dtype=torch.float64)
    for i in range(num_p):
        for j in range(gal.shape[0]):
            p, g = prob[i].double().reshape(c, -1), gal[j].double().reshape(c, -1)
            sim = p.t() @ g  # [probe loc s, gallery loc r]
            best_in_gallery = sim.max(dim=1).values  # per probe location
            best_in_probe = sim.max(dim=0).values  # per gallery location
            a, b = _bn_eval(best_in_gallery, head, "bn"), _bn_eval(best_in_probe, head, "bn")
            w, bias = head["fc.weight"][0], head["fc.bias"][0]
            if version == "2.1":
                s = (w @ a + bias) + (w @ b + bias)
            else:  # v1: [gallery-indexed half, probe-indexed half]
                s = w @ torch.cat([b, a]) + bias
            out[i, j] = _bn_eval(s, head, "logit_bn")
    return out


@pytest.mark.parametrize(
    "version,style,prefix,ibn",
    [
        ("2.1", "matcher", "", "b"),
        ("1", "top", "module.", "b"),
        ("1", "matcher", "", "a"),
        ("2.1", "matcher", "", None),
    ],
)
def test_fake_official_checkpoint_loads_exactly(tmp_path, version, style, prefix, ibn):
    path = tmp_path / "checkpoint.pth.tar"
    model, head = fake_official(path, ibn=ibn, version=version, style=style, prefix=prefix)
    backbone, matcher = load_official_checkpoint(path, arch="resnet18", ibn=ibn, neck=16, height=32, width=16)
    assert not backbone.training and not matcher.training and matcher.version == version
    own = backbone.state_dict()
    base_keys = [k for k in model if k.startswith("base.") and not k.startswith(("base.layer4", "base.fc"))]
    assert set(base_keys) == {k for k in own if k.startswith("base.")}
    for key in base_keys:
        torch.testing.assert_close(own[key], model[key], rtol=0, atol=0)
    x = torch.randn(2, 256, 2, 1)
    if version == "2.1":
        torch.testing.assert_close(own["neck.weight"], model["neck_conv.weight"], rtol=0, atol=0)
        torch.testing.assert_close(own["neck.bias"], model["neck_conv.bias"], rtol=0, atol=0)
    else:  # conv without bias, then BatchNorm2d in eval mode
        ref = F.batch_norm(
            F.conv2d(x, model["neck_conv.weight"], padding=1),
            model["neck_bn.running_mean"],
            model["neck_bn.running_var"],
            model["neck_bn.weight"],
            model["neck_bn.bias"],
            False,
            0,
            1e-5,
        )
        torch.testing.assert_close(backbone.neck(x), ref, rtol=1e-4, atol=1e-4)
    # official input: [0, 1] RGB, no mean/std; output unit-norm per location
    img = torch.rand(3, 3, 32, 16)
    with torch.no_grad():
        maps = backbone(img)
        torch.testing.assert_close(maps, F.normalize(backbone.neck(backbone.base(img)), dim=1))
    torch.testing.assert_close(maps.norm(dim=1), torch.ones(3, 2, 1))
    prob, gal = F.normalize(torch.randn(3, 16, 2, 1), dim=1), F.normalize(torch.randn(4, 16, 2, 1), dim=1)
    with torch.no_grad():
        got = matcher(prob, gal).double()
    torch.testing.assert_close(got, official_logits(prob, gal, head, version), rtol=1e-4, atol=1e-4)


def test_resnet50_ibn_b_official_layout_maps_onto_the_backbone(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    model, _ = fake_official(path, arch="resnet50", ibn="b", neck=128, hw=192)
    backbone, matcher = load_official_checkpoint(path)  # defaults: resnet50, IBN-b, layer3, neck 128, 384x128
    own = backbone.state_dict()
    expected = {k for k in model if k.startswith("base.") and not k.startswith(("base.layer4", "base.fc"))}
    assert {k for k in own if k.startswith("base.")} == expected
    for key in ("base.bn1.weight", "base.layer1.2.IN.weight", "base.layer2.3.IN.bias", "base.layer3.5.bn3.running_var"):
        torch.testing.assert_close(own[key], model[key], rtol=0, atol=0)
    assert (matcher.height, matcher.width, matcher.num_features, matcher.version) == (24, 8, 128, "2.1")


def _one_line_error(fn, *needles):
    with pytest.raises(QAConvError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_unexpected_and_wrong_layout_give_one_line(tmp_path):
    path = tmp_path / "c.pth.tar"
    fake_official(path)
    kw = dict(arch="resnet18", ibn="b", neck=16, height=32, width=16)
    ckpt = torch.load(path, weights_only=False)
    del ckpt["model"]["base.layer2.1.IN.weight"]
    ckpt["model"]["base.layer3.0.extra.weight"] = torch.zeros(1)
    torch.save(ckpt, path)
    _one_line_error(
        lambda: load_official_checkpoint(path, **kw),
        "1 missing keys",
        "base.layer2.1.IN.weight",
        "1 unexpected keys",
        "base.layer3.0.extra.weight",
    )

    fake_official(path)
    _one_line_error(
        lambda: load_official_checkpoint(path, **{**kw, "ibn": None}),
        "unexpected keys",
        "look like arch=resnet18, ibn=b, neck=16",
    )
    _one_line_error(
        lambda: load_official_checkpoint(path, **{**kw, "arch": "resnet34"}), "missing keys", "arch=resnet18"
    )
    _one_line_error(lambda: load_official_checkpoint(path, **{**kw, "neck": 128}), "pass neck=16")
    _one_line_error(lambda: load_official_checkpoint(path, **{**kw, "height": 64}), "fc takes 2 values", "4x1=4")

    ckpt = torch.load(path, weights_only=False)
    ckpt["criterion"]["matcher.fc.weight"] = torch.zeros(1, 5)
    torch.save(ckpt, path)
    _one_line_error(lambda: load_official_checkpoint(path, **kw), "fc takes 5 values")
    ckpt["criterion"] = {"matcher.fc.weight": torch.zeros(1, 2)}
    torch.save(ckpt, path)
    _one_line_error(lambda: load_official_checkpoint(path, **kw), "missing keys", "bn.weight")

    torch.save({"state_dict": {}}, path)
    _one_line_error(lambda: load_official_checkpoint(path, **kw), "expected top-level 'model' and 'criterion'")
    path.write_bytes(b"not a checkpoint")
    _one_line_error(lambda: load_official_checkpoint(path, **kw), "corrupt or not an official QAConv checkpoint")
    _one_line_error(lambda: load_official_checkpoint(tmp_path / "nope.pth.tar"), "does not exist")
