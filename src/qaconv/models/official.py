"""Checkpoints of the official QAConv code (``checkpoint.pth.tar``) -> this package's backbone and QAConv.

An official checkpoint is a dict with ``model`` (state of ``reid/models/resmap.py``'s ``ResNet``: the full
torchvision / IBN-Net ResNet under ``base.``, the neck as ``neck_conv`` (+ ``neck_bn`` before v2.1)) and
``criterion`` (the loss module: the QAConv head under ``matcher.`` from v1.2 on, at the top level with the
class memory in v1.0/v1.1), plus training extras (``optim``, ``epoch``, ...), which are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np
import torch

from ..engine.checkpoint import safe_torch_load
from ..errors import QAConvError
from .backbone import ARCHS, FINAL_LAYERS, FeatureMapNet, build_backbone
from .qaconv import QAConv
from .weights import RESNET_CHILDREN

_SHOW = 4
_BN_EPS = 1e-5  # nn.BatchNorm2d default, used by the official v1 neck_bn
_MEMORY_BUFFERS = ("class_memory", "valid_class")  # v1 class-memory loss state, not part of the matcher
_LAYER3_BLOCKS = {
    (False, 2): "resnet18",
    (False, 6): "resnet34",
    (True, 6): "resnet50",
    (True, 23): "resnet101",
    (True, 36): "resnet152",
}


def _numpy_safe_globals() -> list:
    """numpy scalars/dtypes an official checkpoint may hold in its extras (e.g. ``base_loss``)."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def read_official_checkpoint(path: str | os.PathLike) -> dict:
    """Load an official ``checkpoint.pth.tar`` with ``weights_only=True`` (numpy scalars allowed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QAConvError(f"official checkpoint {path} does not exist")
    obj = safe_torch_load(path, "an official QAConv checkpoint", safe_globals=_numpy_safe_globals())
    if isinstance(obj, Mapping) and str(obj.get("format", "")).startswith("qaconv-checkpoint"):
        raise QAConvError(
            f"{path} is already a qaconv checkpoint (written by 'qaconv train' or 'convert'): use it as it is, "
            "e.g. qaconv evaluate --checkpoint PATH"
        )
    if not isinstance(obj, Mapping) or not all(isinstance(obj.get(k), Mapping) for k in ("model", "criterion")):
        found = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
        raise QAConvError(
            f"{path} is not an official QAConv checkpoint: expected top-level 'model' and 'criterion' state "
            f"dicts, found {found or 'nothing'}"
        )
    return dict(obj)


def _strip_module(state: Mapping) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith("module."):  # nn.DataParallel
            key = key[len("module.") :]
        if isinstance(value, torch.Tensor):
            out[key] = value
    return out


def guess_layout(model_state: Mapping[str, torch.Tensor]) -> dict:
    """Best guess of ``arch``, ``ibn`` and ``neck`` from an official ``model`` state dict (for hints)."""
    keys = list(model_state)
    ibn = None
    if any(re.match(r"base\.layer\d\.\d+\.bn1\.IN\.", k) for k in keys):
        ibn = "a"
    elif any(re.match(r"base\.layer\d\.\d+\.IN\.weight$", k) for k in keys):
        ibn = "b"
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"base\.layer3\.(\d+)\.", k))}
    bottleneck = any(re.match(r"base\.layer1\.\d+\.conv3\.", k) for k in keys)
    arch = _LAYER3_BLOCKS.get((bottleneck, len(blocks)), "unknown")
    neck = model_state["neck_conv.weight"].shape[0] if "neck_conv.weight" in model_state else 0
    return {"arch": arch, "ibn": ibn, "neck": int(neck)}


def _mismatch(own: Mapping, given: Mapping, what: str, hint: str = "") -> None:
    """Raise a one-line QAConvError for missing / unexpected / wrongly shaped keys."""
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:_SHOW])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:_SHOW])})")
    if not parts:
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in given.items() if v.shape != own[k].shape]
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (checkpoint vs model, e.g. {', '.join(wrong[:_SHOW])})")
    if parts:
        raise QAConvError(f"{what}: {'; '.join(parts)}{hint}")


def _fold_neck_bn(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """v1 neck conv (no bias) + BatchNorm2d in eval mode as one conv with bias (exact up to rounding)."""
    w = state["neck_conv.weight"].double()
    b = state["neck_conv.bias"].double() if "neck_conv.bias" in state else torch.zeros(w.shape[0], dtype=w.dtype)
    if "neck_bn.weight" not in state:
        return w.float(), b.float()
    scale = state["neck_bn.weight"].double() / torch.sqrt(state["neck_bn.running_var"].double() + _BN_EPS)
    bias = state["neck_bn.bias"].double() + (b - state["neck_bn.running_mean"].double()) * scale
    return (w * scale.view(-1, 1, 1, 1)).float(), bias.float()


def _backbone_state(model_state: dict, backbone: FeatureMapNet, final_layer: str, what: str, hint: str) -> dict:
    dropped = set(RESNET_CHILDREN[RESNET_CHILDREN.index(final_layer) + 1 :])  # the official base keeps them all
    mapped, other = {}, {}
    for key, value in model_state.items():
        if key.startswith("base."):
            if key.split(".")[1] not in dropped:
                mapped[key] = value
        elif key.startswith(("neck_conv.", "neck_bn.")):
            other[key] = value
        else:
            mapped[key] = value  # reported as unexpected below
    if "neck_conv.weight" in other:
        mapped["neck.weight"], mapped["neck.bias"] = _fold_neck_bn(other)
        known = {"neck_conv.weight", "neck_conv.bias"} | {
            f"neck_bn.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        }
        mapped.update({k: v for k, v in other.items() if k not in known})
    else:
        mapped.update(other)
    own = backbone.state_dict()
    _mismatch(own, mapped, what, hint)
    return {k: mapped.get(k, v) for k, v in own.items()}  # old files may lack num_batches_tracked


def _matcher_state(criterion_state: dict, path: str) -> dict[str, torch.Tensor]:
    if any(k.startswith("matcher.") for k in criterion_state):  # v1.2+: loss(matcher, ...)
        head = {k[len("matcher.") :]: v for k, v in criterion_state.items() if k.startswith("matcher.")}
        rest = [k for k in criterion_state if not k.startswith("matcher.") and k not in _MEMORY_BUFFERS]
    else:  # v1.0 / v1.1: the QAConv layers sit in the class-memory loss itself
        head = {k: v for k, v in criterion_state.items() if k not in _MEMORY_BUFFERS}
        rest = []
    if rest:
        raise QAConvError(
            f"official checkpoint {path}: 'criterion' has {len(rest)} unexpected keys (e.g. {', '.join(rest[:_SHOW])})"
        )
    fc = head.get("fc.weight")
    if fc is None or fc.dim() != 2 or fc.shape[0] != 1:
        raise QAConvError(
            f"official checkpoint {path}: 'criterion' holds no QAConv head (expected fc.weight of shape [1, HW] or "
            f"[1, 2*HW], found keys {', '.join(list(criterion_state)[:_SHOW]) or 'none'})"
        )
    return head


def load_official_checkpoint(
    path: str | os.PathLike,
    *,
    arch: str = "resnet50",
    ibn: str | None = "b",
    final_layer: str = "layer3",
    neck: int = 128,
    height: int = 384,
    width: int = 128,
) -> tuple[FeatureMapNet, QAConv]:
    """Backbone and QAConv matcher (CPU, eval mode) from an official QAConv ``checkpoint.pth.tar``.

    The architecture arguments are those the official model was trained with (``--arch``, ``--ibn``,
    ``--final_layer``, ``--neck``, ``--height``, ``--width`` of its ``main.py``; the defaults are its
    QAConv-GS defaults). The QAConv head version is read from the file: v2.1 (Linear(HW -> 1), shared)
    or v1.x (Linear(2*HW -> 1)). A v1.x neck (conv without bias + BatchNorm2d) is folded into one conv
    with bias, which equals the official conv+BN in eval mode.

    Input: the official code feeds its model RGB in [0, 1] (bicubic resize + ``ToTensor``) with **no**
    mean/std normalisation (spec section 2), so the returned backbone has ``input_norm="none"`` and takes
    exactly that tensor ``[B, 3, height, width]``; it returns the official unit-norm feature maps, and
    ``matcher(prob, gal)`` the official QAConv logits ``[P, G]``.

    Example::

        backbone, matcher = load_official_checkpoint("logs/Market/qaconv/checkpoint.pth.tar")
        maps = backbone(images)            # images: float RGB in [0, 1], [B, 3, 384, 128]
        logits = matcher(maps[:1], maps)   # [1, B]
    """
    path = os.fspath(path)
    if arch not in ARCHS or final_layer not in FINAL_LAYERS or ibn not in (None, "a", "b"):
        raise QAConvError(
            f"unsupported official layout arch={arch!r} ibn={ibn!r} final_layer={final_layer!r}: arch is one of "
            f"{', '.join(ARCHS)}, ibn a/b/None, final_layer one of {', '.join(FINAL_LAYERS)}"
        )
    ckpt = read_official_checkpoint(path)
    model_state = _strip_module(ckpt["model"])
    criterion_state = _strip_module(ckpt["criterion"])
    guess = guess_layout(model_state)
    hint = f" (its keys look like arch={guess['arch']}, ibn={guess['ibn']}, neck={guess['neck']})"
    neck = max(int(neck), 0)
    if guess["neck"] != neck:
        raise QAConvError(
            f"official checkpoint {path} has neck={guess['neck']} (neck_conv output channels), but neck={neck} "
            f"was given: pass neck={guess['neck']}"
        )
    try:
        backbone = build_backbone(arch=arch, final_layer=final_layer, ibn=ibn, neck=neck, input_norm="none")
    except ValueError as exc:
        raise QAConvError(str(exc)) from None
    what = f"official checkpoint {path} does not fit arch={arch} ibn={ibn} final_layer={final_layer} neck={neck}"
    backbone.load_state_dict(_backbone_state(model_state, backbone, final_layer, what, hint))

    head = _matcher_state(criterion_state, path)
    h, w = backbone.feature_size(height, width)
    length = head["fc.weight"].shape[1]
    if length not in (h * w, 2 * h * w):
        raise QAConvError(
            f"official checkpoint {path}: its QAConv fc takes {length} values, but height={height} width={width} "
            f"give {h}x{w}={h * w} locations (v2.1 needs HW, v1 2*HW): pass the official --height/--width"
        )
    matcher = QAConv(backbone.out_channels, h, w, version="2.1" if length == h * w else "1")
    own = matcher.state_dict()
    _mismatch(own, head, f"official checkpoint {path}: the QAConv head in 'criterion' does not fit")
    matcher.load_state_dict({k: head.get(k, v) for k, v in own.items()})
    return backbone.eval(), matcher.eval()
