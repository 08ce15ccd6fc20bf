"""ONNX export of the feature extractor (backbone + neck + input normalisation + per-location L2 norm).

The graph takes ``images``: float32 RGB in [0, 1], ``[N, 3, height, width]`` (N is dynamic) and returns
``feature_maps`` ``[N, C, h, w]``, exactly what the PyTorch backbone returns. It uses the TorchScript-based
exporter (``torch.onnx.export(..., dynamo=False)``), which needs the ``onnx`` package; the optional parity
check runs the file with ``onnxruntime`` when that is installed (``pip install 'qaconv[onnx]'``).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import QAConvError

DEFAULT_OPSET = 17
MIN_OPSET = 11  # IBN-a's channel split does not export below 11


def _require(module: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise QAConvError(f"{purpose} needs the '{module}' package: pip install 'qaconv[onnx]' (or {module})")


def export_onnx(
    checkpoint_or_model,
    path: str | os.PathLike,
    *,
    height: int | None = None,
    width: int | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> dict:
    """Export a backbone to ONNX at ``path``; return a summary dict.

    ``checkpoint_or_model``: a checkpoint (or run folder) from ``qaconv train`` / ``qaconv convert``,
    whose height and width are used unless given, or a backbone module (then ``height``/``width`` are
    required). With ``check`` and onnxruntime installed, the file is run on a random batch of 2 and the
    largest absolute difference from PyTorch is returned as ``max_abs_diff`` (None when not checked).

    Example::

        info = export_onnx("runs/r18", "r18.onnx")
        # onnxruntime.InferenceSession("r18.onnx").run(None, {"images": batch})[0] -> feature maps
    """
    _require("onnx", "ONNX export")
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        from .engine.runner import load_trained

        model, _, cfg = load_trained(checkpoint_or_model, device="cpu")
        height = cfg["height"] if height is None else height
        width = cfg["width"] if width is None else width
    elif isinstance(checkpoint_or_model, torch.nn.Module):
        model = copy.deepcopy(checkpoint_or_model)  # the caller's model keeps its device and mode
    else:
        raise QAConvError(f"export_onnx needs a checkpoint path or a model, got {type(checkpoint_or_model).__name__}")
    if height is None or width is None or int(height) < 1 or int(width) < 1:
        raise QAConvError(f"export_onnx needs a positive input height and width, got {height}x{width}")
    height, width = int(height), int(width)
    max_opset = _max_opset()
    if not MIN_OPSET <= int(opset) <= max_opset:
        raise QAConvError(f"ONNX opset must be between {MIN_OPSET} and {max_opset} for this exporter, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    dummy = torch.rand(1, 3, height, width)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with warnings.catch_warnings():
            # Known and harmless here: the legacy exporter's deprecation notice; InstanceNorm (IBN) without
            # running statistics normalises per instance in eval mode too, which is what 'train=True' exports.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=int(opset),
                input_names=["images"],
                output_names=["feature_maps"],
                dynamic_axes={"images": {0: "batch"}, "feature_maps": {0: "batch"}},
            )
        os.replace(tmp, path)
    except QAConvError:
        raise
    except Exception as exc:  # the exporter raises many types; report one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QAConvError(f"ONNX export (opset {opset}) to {path} failed: {first}") from None
    finally:
        tmp.unlink(missing_ok=True)
    with torch.no_grad():
        out_shape = list(model(dummy).shape)
    info = {
        "path": str(path),
        "opset": int(opset),
        "input_shape": ["N", 3, height, width],
        "output_shape": ["N", *out_shape[1:]],
        "max_abs_diff": None,
    }
    if check and importlib.util.find_spec("onnxruntime") is not None:
        info["max_abs_diff"] = onnx_parity(model, path, height, width, batch=2)
    return info


def _max_opset() -> int:
    """Highest opset of torch's TorchScript-based exporter (20 in torch 2.x)."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


def run_onnx(path: str | os.PathLike, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Feature maps from an exported file with onnxruntime (CPU): ``images`` [N, 3, H, W] RGB in [0, 1]."""
    _require("onnxruntime", "running an ONNX model")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return session.run(None, {"images": array.astype(np.float32)})[0]


def onnx_parity(model: torch.nn.Module, path, height: int, width: int, batch: int = 2, seed: int = 0) -> float:
    """Largest absolute difference between onnxruntime and PyTorch on a random batch."""
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    model = copy.deepcopy(model).to("cpu").eval()
    with torch.no_grad():
        ref = model(images).numpy()
    return float(np.abs(run_onnx(path, images) - ref).max())
