"""Tests for qaconv.models: backbones, IBN layout, weight loading, QAConv and the pooled baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from qaconv.models import (
    PooledCosine,
    QAConv,
    WeightsNotFoundError,
    build_backbone,
    build_matcher,
)
from qaconv.models.ibn import IBN


def unit_maps(n, c, h, w, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, c, h, w, generator=gen, dtype=dtype), dim=1)


def randomise(module, seed):
    """Give every BN/fc parameter and running statistic a random, non-default value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point():
                if "running_var" in name:
                    tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
    return module


# ----------------------------------------------------------------------------------------------- QAConv


def brute_pool(prob, gal):
    """Max-pooled similarities by loops: A[p,g,s] = max over gallery r, B[p,g,r] = max over probe s."""
    P, C, H, W = prob.shape
    G = gal.shape[0]
    hw = H * W
    pr = prob.reshape(P, C, hw).tolist()
    ga = gal.reshape(G, C, hw).tolist()
    A = np.zeros((P, G, hw))
    B = np.zeros((P, G, hw))
    for p in range(P):
        for g in range(G):

            def dot(s, r, p=p, g=g):
                return sum(pr[p][c][s] * ga[g][c][r] for c in range(C))

            for s in range(hw):
                A[p, g, s] = max(dot(s, r) for r in range(hw))
            for r in range(hw):
                B[p, g, r] = max(dot(s, r) for s in range(hw))
    return A, B


def bn_scalar(x, bn, training):
    if training:
        mean, var = x.mean(), x.var()  # biased variance, as BatchNorm normalises with
    else:
        mean, var = bn.running_mean.item(), bn.running_var.item()
    return (x - mean) / math.sqrt(var + bn.eps) * bn.weight.item() + bn.bias.item()


def brute_qaconv(m, prob, gal, training):
    A, B = brute_pool(prob, gal)
    both = bn_scalar(np.stack([A, B]), m.bn, training)
    A, B = both[0], both[1]
    w = m.fc.weight.detach().numpy().reshape(-1)
    b = m.fc.bias.item()
    P, G, hw = A.shape
    scores = np.zeros((P, G))
    for p in range(P):
        for g in range(G):
            if m.version == "2.1":
                scores[p, g] = (A[p, g] @ w + b) + (B[p, g] @ w + b)
            else:  # v1: [gallery-indexed half, probe-indexed half]
                scores[p, g] = np.concatenate([B[p, g], A[p, g]]) @ w + b
    return bn_scalar(scores, m.logit_bn, training)


@pytest.mark.parametrize("version", ["2.1", "1"])
@pytest.mark.parametrize("training", [True, False])
def test_qaconv_matches_brute_force(version, training):
    prob, gal = unit_maps(3, 5, 3, 2, seed=1), unit_maps(4, 5, 3, 2, seed=2)
    m = randomise(QAConv(5, 3, 2, version=version), seed=3).double().train(training)
    expected = brute_qaconv(m, prob, gal, training)
    got = m(prob, gal)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-9, atol=1e-9)


def test_pool_layout_matches_brute_force():
    prob, gal = unit_maps(2, 4, 2, 3, seed=4), unit_maps(3, 4, 2, 3, seed=5)
    pooled = QAConv(4, 2, 3).double().pool(prob, gal)
    A, B = brute_pool(prob, gal)
    assert pooled.shape == (2, 3, 2, 6)
    np.testing.assert_allclose(pooled[:, :, 0].numpy(), A, atol=1e-12)
    np.testing.assert_allclose(pooled[:, :, 1].numpy(), B, atol=1e-12)


@pytest.mark.parametrize("version", ["2.1", "1"])
@pytest.mark.parametrize("training", [True, False])
def test_head_of_pool_equals_forward(version, training):
    prob, gal = unit_maps(3, 6, 4, 2, seed=6), unit_maps(2, 6, 4, 2, seed=7)
    m = randomise(QAConv(6, 4, 2, version=version), seed=8).double().train(training)
    torch.testing.assert_close(m.head(m.pool(prob, gal)), m(prob, gal), rtol=0, atol=1e-12)


def test_qaconv_v21_init():
    m = QAConv(8, 6, 2)
    assert m.fc.weight.shape == (1, 12)
    torch.testing.assert_close(m.fc.weight, torch.full((1, 12), 1 / 12))
    assert QAConv(8, 6, 2, version="1").fc.weight.shape == (1, 24)


@settings(max_examples=25, deadline=None)
@given(
    p=st.integers(1, 4),
    g=st.integers(1, 4),
    c=st.integers(1, 6),
    h=st.integers(1, 4),
    w=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    training=st.booleans(),
)
def test_qaconv_v21_is_symmetric(p, g, c, h, w, seed, training):
    if training and p * g < 2:
        training = False  # BatchNorm cannot take training statistics over a single pair score
    prob, gal = unit_maps(p, c, h, w, seed), unit_maps(g, c, h, w, seed + 1)
    m = randomise(QAConv(c, h, w), seed + 2).double().train(training)
    torch.testing.assert_close(m(prob, gal), m(gal, prob).t(), rtol=1e-9, atol=1e-9)


def test_qaconv_v1_is_not_symmetric():
    prob, gal = unit_maps(3, 4, 3, 2, seed=9), unit_maps(3, 4, 3, 2, seed=10)
    m = randomise(QAConv(4, 3, 2, version="1"), seed=11).double().eval()
    assert (m(prob, gal) - m(gal, prob).t()).abs().max() > 1e-3


def test_qaconv_rejects_bad_shapes_and_versions():
    m = QAConv(4, 3, 2)
    with pytest.raises(ValueError, match=r"\[N, 4, 3, 2\]"):
        m(torch.randn(1, 4, 2, 3), torch.randn(1, 4, 3, 2))
    with pytest.raises(ValueError, match="2.1"):
        QAConv(4, 3, 2, version="3")


@pytest.mark.parametrize("version", ["2.1", "1"])
def test_correspondences(version):
    prob, gal = unit_maps(1, 5, 3, 2, seed=12), unit_maps(1, 5, 3, 2, seed=13)
    m = randomise(QAConv(5, 3, 2, version=version), seed=14).double()
    out = m.correspondences(prob[0], gal[0])
    A, B = brute_pool(prob, gal)
    np.testing.assert_allclose(out["probe_to_gallery_sim"], A[0, 0], atol=1e-12)
    np.testing.assert_allclose(out["gallery_to_probe_sim"], B[0, 0], atol=1e-12)
    sim = out["similarity"]
    assert sim.shape == (6, 6)
    np.testing.assert_allclose(sim[np.arange(6), out["probe_to_gallery"]], A[0, 0], atol=1e-12)
    np.testing.assert_allclose(sim[out["gallery_to_probe"], np.arange(6)], B[0, 0], atol=1e-12)
    w = m.fc.weight.detach().numpy().reshape(-1)
    if version == "2.1":
        np.testing.assert_array_equal(out["probe_weight"], w)
        np.testing.assert_array_equal(out["gallery_weight"], w)
    else:
        np.testing.assert_array_equal(out["gallery_weight"], w[:6])
        np.testing.assert_array_equal(out["probe_weight"], w[6:])
    assert all(isinstance(v, np.ndarray) for v in out.values())


# ---------------------------------------------------------------------------------------- PooledCosine


def test_pooled_cosine_eval_matches_hand_computation():
    prob, gal = unit_maps(3, 5, 4, 2, seed=15), unit_maps(2, 5, 4, 2, seed=16)
    m = randomise(PooledCosine(), seed=17).double().eval()
    got = m(prob, gal).detach().numpy()
    bn = m.logit_bn
    for p in range(3):
        for g in range(2):
            u = prob[p].mean(dim=(1, 2)).numpy()
            v = gal[g].mean(dim=(1, 2)).numpy()
            cos = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
            expected = bn_scalar(np.array(cos), bn, training=False)
            assert got[p, g] == pytest.approx(float(expected), abs=1e-10)


def test_pooled_cosine_training_normalises_scores():
    m = PooledCosine().double().train()
    out = m(unit_maps(4, 8, 3, 2, seed=18), unit_maps(5, 8, 3, 2, seed=19))
    assert out.shape == (4, 5)
    assert abs(out.mean().item()) < 1e-9
    assert out.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_build_matcher():
    assert isinstance(build_matcher("pooled"), PooledCosine)
    m = build_matcher("qaconv", num_features=16, height=4, width=2, version="1")
    assert isinstance(m, QAConv) and m.version == "1" and m.hw == 8
    assert build_matcher(num_features=16, height=4, width=2).version == "2.1"
    with pytest.raises(ValueError, match="qaconv.*pooled"):
        build_matcher("transmatcher")
    with pytest.raises(ValueError, match="num_features"):
        build_matcher("qaconv")


# --------------------------------------------------------------------------------------------- Backbone


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("final_layer", ["layer2", "layer3", "layer4"])
@pytest.mark.parametrize("neck", [0, 16])
def test_backbone_shapes_and_unit_norm(arch, final_layer, neck):
    net = build_backbone(arch, final_layer=final_layer, neck=neck).eval()
    stride = {"layer2": 8, "layer3": 16, "layer4": 32}[final_layer]
    raw = {"layer2": 128, "layer3": 256, "layer4": 512}[final_layer] * (4 if arch == "resnet50" else 1)
    channels = neck if neck > 0 else raw
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 32))
    assert out.shape == (2, channels, 64 // stride, 32 // stride)
    assert net.out_channels == channels and net.stride == stride
    assert net.feature_size(64, 32) == (64 // stride, 32 // stride)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 64 // stride, 32 // stride))
    assert isinstance(net.neck, torch.nn.Conv2d) == (neck > 0)
    if neck > 0:
        assert net.neck.kernel_size == (3, 3) and net.neck.bias is not None
    names = [name for name, _ in net.base.named_children()]
    order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert names == order[: order.index(final_layer) + 1]
    assert names[-1] == final_layer


@pytest.mark.parametrize("size", [(70, 30), (65, 33), (96, 40)])
def test_feature_size_matches_forward_for_any_input(size):
    net = build_backbone("resnet18", final_layer="layer3", neck=8).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, *size))
    assert tuple(out.shape[2:]) == net.feature_size(*size)


def test_other_depths_build():
    net = build_backbone("resnet34", final_layer="layer2", neck=0)
    assert net.out_channels == 128 and len(net.base.layer2) == 4


def test_input_norm_inside_model():
    plain = build_backbone("resnet18", final_layer="layer2", neck=8, input_norm="none").eval()
    normed = build_backbone("resnet18", final_layer="layer2", neck=8, input_norm="imagenet").eval()
    normed.load_state_dict(plain.state_dict())  # mean/std are not part of the state dict
    x = torch.rand(2, 3, 64, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain((x - mean) / std))


def test_config_rebuilds_same_architecture():
    net = build_backbone("resnet18", final_layer="layer3", ibn="a", neck=32, input_norm="none")
    assert net.config == dict(arch="resnet18", final_layer="layer3", ibn="a", neck=32, input_norm="none")
    again = build_backbone(**net.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in net.state_dict().items()
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(arch="resnet20"), "resnet18, resnet34"),
        (dict(final_layer="layer5"), "layer2, layer3, layer4"),
        (dict(ibn="c"), "a, b"),
        (dict(input_norm="zscore"), "imagenet, none"),
        (dict(pretrained="coco"), "imagenet"),
        (dict(arch="resnet152", ibn="a"), "resnet152"),
        (dict(arch="resnet18", ibn="b", pretrained="imagenet"), "weights_path"),
        (dict(arch="resnet18", pretrained="imagenet", weights_path="x.pth"), "either"),
    ],
)
def test_backbone_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(**kwargs)


# ------------------------------------------------------------------------------------------------ IBN


def tv_keys(arch, drop_layer4=True):
    """State-dict keys of torchvision's ResNet without fc (and layer4), as the base holds them."""
    keys = getattr(torchvision.models, arch)(weights=None).state_dict().keys()
    skip = ("fc.", "layer4.") if drop_layer4 else ("fc.",)
    return {k for k in keys if not k.startswith(skip)}


def test_ibn_a_official_key_layout():
    net = build_backbone("resnet50", final_layer="layer4", ibn="a", neck=0)
    sd = net.base.state_dict()
    # Official IBN-Net-a: every bn1 in layer1..layer3 -> bn1.IN (affine, no running stats) + bn1.BN.
    expected = set()
    for k in tv_keys("resnet50", drop_layer4=False):
        parts = k.split(".")
        if parts[0] in ("layer1", "layer2", "layer3") and parts[2] == "bn1":
            stem = ".".join(parts[:3])
            expected |= {f"{stem}.IN.weight", f"{stem}.IN.bias", f"{stem}.BN.{parts[3]}"}
        else:
            expected.add(k)
    assert set(sd) == expected
    hand = {
        "bn1.running_mean": (64,),
        "layer1.0.bn1.IN.weight": (32,),
        "layer1.0.bn1.IN.bias": (32,),
        "layer1.0.bn1.BN.weight": (32,),
        "layer1.0.bn1.BN.running_mean": (32,),
        "layer1.0.bn1.BN.running_var": (32,),
        "layer2.3.bn1.IN.weight": (64,),
        "layer2.3.bn1.BN.bias": (64,),
        "layer3.5.bn1.IN.weight": (128,),
        "layer3.5.bn1.BN.running_var": (128,),
        "layer3.5.bn2.weight": (256,),
        "layer4.0.bn1.weight": (512,),
        "layer4.2.bn1.running_mean": (512,),
    }
    for key, shape in hand.items():
        assert tuple(sd[key].shape) == shape, key
    for absent in ("layer1.0.bn1.weight", "layer3.5.bn1.running_mean", "layer4.0.bn1.IN.weight"):
        assert absent not in sd


def test_ibn_b_official_key_layout():
    net = build_backbone("resnet50", final_layer="layer3", ibn="b", neck=0)
    sd = net.base.state_dict()
    stem_stats = {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    ins = {"layer1.2.IN.weight", "layer1.2.IN.bias", "layer2.3.IN.weight", "layer2.3.IN.bias"}
    assert set(sd) == (tv_keys("resnet50") - stem_stats) | ins
    assert tuple(sd["bn1.weight"].shape) == (64,)
    assert tuple(sd["layer1.2.IN.weight"].shape) == (256,)
    assert tuple(sd["layer2.3.IN.bias"].shape) == (512,)
    for absent in ("layer1.0.IN.weight", "layer3.5.IN.weight", "bn1.running_mean"):
        assert absent not in sd


def test_ibn_basic_block_layouts():
    sd_a = build_backbone("resnet18", final_layer="layer4", ibn="a", neck=0).base.state_dict()
    assert tuple(sd_a["layer1.1.bn1.IN.weight"].shape) == (32,)
    assert tuple(sd_a["layer3.1.bn1.BN.running_mean"].shape) == (128,)
    assert "layer4.1.bn1.weight" in sd_a
    sd_b = build_backbone("resnet18", final_layer="layer3", ibn="b", neck=0).base.state_dict()
    stem_stats = {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    ins = {"layer1.1.IN.weight", "layer1.1.IN.bias", "layer2.1.IN.weight", "layer2.1.IN.bias"}
    assert set(sd_b) == (tv_keys("resnet18") - stem_stats) | ins
    assert tuple(sd_b["layer2.1.IN.weight"].shape) == (128,)


def test_ibn_module_splits_channels():
    ibn = randomise(IBN(6), seed=20).double().eval()
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    out = ibn(x)
    first = x[:, :3]
    inorm = (first - first.mean(dim=(2, 3), keepdim=True)) / torch.sqrt(
        first.var(dim=(2, 3), unbiased=False, keepdim=True) + ibn.IN.eps
    )
    inorm = inorm * ibn.IN.weight.view(1, 3, 1, 1) + ibn.IN.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(out[:, :3], inorm)
    torch.testing.assert_close(out[:, 3:], ibn.BN(x[:, 3:]))


@pytest.mark.parametrize("arch, last", [("resnet18", "layer1.1"), ("resnet50", "layer1.2")])
def test_ibn_b_instance_norm_after_residual_before_relu(arch, last):
    net = build_backbone(arch, final_layer="layer2", ibn="b", neck=0).eval()
    block = net.base.get_submodule(last)
    randomise(block.IN, seed=21)
    x = torch.rand(2, block.conv1.in_channels, 8, 4)
    with torch.no_grad():
        if hasattr(block, "conv3"):
            body = block.bn3(block.conv3(F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))))))
        else:
            body = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        expected = F.relu(block.IN(body + x))
        torch.testing.assert_close(block(x), expected)


# ---------------------------------------------------------------------------------------- Weight files


@pytest.mark.parametrize("ibn", [None, "a", "b"])
def test_weights_path_round_trip(tmp_path, ibn):
    src = build_backbone("resnet18", final_layer="layer4", ibn=ibn, neck=0)
    randomise(src.base, seed=22)
    state = {f"module.{k}": v for k, v in src.base.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(1000, 512)
    state["module.fc.bias"] = torch.zeros(1000)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    dst = build_backbone("resnet18", final_layer="layer3", ibn=ibn, neck=8, weights_path=path)
    src_sd = src.base.state_dict()
    for key, value in dst.base.state_dict().items():
        torch.testing.assert_close(value, src_sd[key], msg=key)


def test_weights_path_without_num_batches_tracked(tmp_path):
    src = build_backbone("resnet18", final_layer="layer2", neck=0)
    state = {k: v for k, v in src.base.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state}, tmp_path / "old.pth")
    build_backbone("resnet18", final_layer="layer2", neck=0, weights_path=tmp_path / "old.pth")


def assert_one_line(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_weights_path_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as exc:
        build_backbone("resnet18", neck=0, weights_path=missing)
    assert_one_line(exc, str(missing))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError) as exc:
        build_backbone("resnet18", neck=0, weights_path=garbage)
    assert_one_line(exc, str(garbage))

    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ValueError) as exc:
        build_backbone("resnet18", neck=0, weights_path=listed)
    assert_one_line(exc, str(listed), "state dict")

    state = build_backbone("resnet18", neck=0).base.state_dict()
    partial = dict(state)
    del partial["layer2.0.conv1.weight"]
    partial["layer2.0.extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError) as exc:
        build_backbone("resnet18", neck=0, weights_path=tmp_path / "partial.pth")
    assert_one_line(exc, "missing", "layer2.0.conv1.weight", "unexpected", "layer2.0.extra.weight")

    reshaped = dict(state)
    reshaped["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError) as exc:
        build_backbone("resnet18", neck=0, weights_path=tmp_path / "reshaped.pth")
    assert_one_line(exc, "conv1.weight", "(64, 3, 3, 3)")

    # plain ResNet weights into an IBN-b model: the stem has no running stats and IN layers are missing
    torch.save(state, tmp_path / "plain.pth")
    with pytest.raises(ValueError) as exc:
        build_backbone("resnet18", ibn="b", neck=0, weights_path=tmp_path / "plain.pth")
    assert_one_line(exc, "layer1.1.IN.weight", "bn1.running_mean")


def test_imagenet_weights_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    with pytest.raises(WeightsNotFoundError) as exc:
        build_backbone("resnet18", neck=0, pretrained="imagenet")
    assert isinstance(exc.value, FileNotFoundError)
    assert_one_line(exc, str(cached), "--backbone-weights")

    full = torchvision.models.resnet18(weights=None)
    randomise(full, seed=23)
    cached.parent.mkdir(parents=True)
    torch.save(full.state_dict(), cached)
    net = build_backbone("resnet18", final_layer="layer3", neck=0, pretrained="imagenet")
    full_sd = full.state_dict()
    for key, value in net.base.state_dict().items():
        torch.testing.assert_close(value, full_sd[key], msg=key)


def test_neck_has_pytorch_default_init_like_the_official_code():
    """kaiming-uniform a=sqrt(5): weight and bias uniform in +-1/sqrt(fan_in) (not kaiming-normal fan_out)."""
    torch.manual_seed(0)
    net = build_backbone("resnet18", final_layer="layer3", neck=128)
    conv = net.neck
    fan_in = 256 * 3 * 3
    bound = 1 / math.sqrt(fan_in)
    w, b = conv.weight.detach(), conv.bias.detach()
    assert w.abs().max() <= bound and b.abs().max() <= bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound  # uniform(-a, a) has std a / sqrt(3)
    assert b.abs().mean() > 0.3 * bound  # not zero-initialised


def test_v1_neck_is_conv_without_bias_then_bn():
    net = build_backbone("resnet18", final_layer="layer3", neck=16, neck_bn=True, input_norm="none")
    conv, bn = net.neck
    assert conv.bias is None and isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 16
    assert build_backbone(**net.config).neck[1].num_features == 16  # config rebuilds it
    with torch.no_grad():
        conv.weight.fill_(1.0)
        bn.weight.fill_(3.0)
    net.reset_neck()
    assert conv.weight.abs().max() <= 1 / math.sqrt(256 * 9) and torch.all(bn.weight == 1)


def test_qaconv_head_init_matches_official():
    from qaconv.models import QAConv

    torch.manual_seed(0)
    m = QAConv(8, 6, 4, version="2.1")
    hw = 24
    assert torch.allclose(m.fc.weight, torch.full((1, hw), 1 / hw))
    assert abs(m.fc.bias.item()) <= 1 / math.sqrt(hw)
    for bn in (m.bn, m.logit_bn):
        assert bn.weight.item() == 1 and bn.bias.item() == 0 and bn.running_var.item() == 1
    v1 = QAConv(8, 6, 4, version="1")
    assert v1.fc.weight.shape == (1, 2 * hw) and v1.fc.weight.abs().max() <= 1 / math.sqrt(2 * hw)
    assert v1.fc.weight.std() > 0.3 / math.sqrt(2 * hw)  # default (uniform) init, not constant
