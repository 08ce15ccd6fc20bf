"""Feature maps for arbitrary images: a small callable wrapper around a trained (or given) backbone.

Example::

    from qaconv.extractor import FeatureExtractor

    extractor = FeatureExtractor("runs/market/checkpoint.pth.tar")   # or FeatureExtractor(model, height=384, width=128)
    maps = extractor(["a.jpg", "b.jpg"])                              # [2, C, h, w] float32 on CPU
    logit = extractor.matcher.eval()(maps[:1], maps[1:])              # QAConv score of a vs b
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from .data.images import read_rgb
from .data.transforms import eval_transform
from .matching import pick_device

_SINGLE = (str, Path, Image.Image, np.ndarray, torch.Tensor)


class FeatureExtractor:
    """Turn images into feature maps ``[N, C, h, w]`` (float32, CPU) with the model in eval mode.

    ``checkpoint_or_model`` is a checkpoint path written by ``qaconv train`` (loaded with
    :func:`qaconv.engine.runner.load_trained`; height and width come from its config unless given), a
    ``(model, matcher)`` pair, or a bare model (``matcher`` is then None). For a model, ``height`` and
    ``width`` (the input size in pixels) are required.

    ``checkpoint`` is the resolved path it was loaded from (None for a given model): APIs that take an
    extractor (:func:`qaconv.gallery.model_identity`, :func:`~qaconv.gallery.build_index`, calibration) read the
    model's identity from it and never ask for the path again.

    Calling it accepts one image or a list of them: file paths, PIL images, numpy arrays (HWC or HW
    uint8), or float tensors in [0, 1] (``[3, H, W]`` or a batch ``[N, 3, H, W]``; uint8 tensors are
    scaled by 1/255). Images are resized (bicubic, antialiased) to the model input size, and the model
    runs in batches of ``batch_size`` under ``torch.inference_mode``.
    """

    def __init__(self, checkpoint_or_model, device=None, batch_size: int = 64, height: int | None = None,
                 width: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = pick_device(device)
        self.batch_size = int(batch_size)
        self.cfg: dict | None = None
        self.checkpoint: str | None = None
        if isinstance(checkpoint_or_model, (str, Path)):
            from .engine.runner import load_trained

            model, matcher, cfg = load_trained(checkpoint_or_model, self.device)
            self.cfg = cfg
            self.checkpoint = str(Path(checkpoint_or_model).resolve())
            height = cfg["height"] if height is None else height
            width = cfg["width"] if width is None else width
        elif isinstance(checkpoint_or_model, (tuple, list)) and len(checkpoint_or_model) == 2:
            model, matcher = checkpoint_or_model
        elif isinstance(checkpoint_or_model, torch.nn.Module):
            model, matcher = checkpoint_or_model, None
        else:
            raise ValueError(
                "FeatureExtractor needs a checkpoint path, a (model, matcher) pair or a model, "
                f"got {type(checkpoint_or_model).__name__}"
            )
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
        if height is None or width is None:
            raise ValueError("height and width (the model input size in pixels) are required with a model")
        if int(height) < 1 or int(width) < 1:
            raise ValueError(f"height and width must be positive, got {height}x{width}")
        self.height, self.width = int(height), int(width)
        self.model = model.to(self.device).eval()
        self.matcher = matcher.to(self.device).eval() if matcher is not None else None
        self._pil = eval_transform(self.height, self.width)
        self._resize = v2.Resize((self.height, self.width), InterpolationMode.BICUBIC, antialias=True)

    @property
    def feature_size(self) -> tuple[int, int]:
        """Spatial size ``(h, w)`` of the feature maps."""
        if hasattr(self.model, "feature_size"):
            return tuple(self.model.feature_size(self.height, self.width))
        with torch.inference_mode():
            return tuple(self(torch.zeros(3, self.height, self.width)).shape[-2:])

    # -- input conversion ----------------------------------------------------------------------------
    def _from_pil(self, img: Image.Image) -> torch.Tensor:
        return self._pil(img.convert("RGB") if img.mode != "RGB" else img)

    def _from_array(self, arr: np.ndarray) -> torch.Tensor:
        if arr.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 (HWC or HW), got dtype {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
            raise ValueError(f"numpy images must be HxW or HxWx{{1,3,4}} uint8, got shape {list(arr.shape)}")
        return self._from_pil(Image.fromarray(np.ascontiguousarray(arr)))

    def _from_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4 or t.shape[1] != 3 or t.shape[2] < 1 or t.shape[3] < 1:
            raise ValueError(f"image tensors must be [3, H, W] or [N, 3, H, W], got {list(t.shape)}")
        if t.dtype == torch.uint8:
            t = t.float() / 255
        elif not t.is_floating_point():
            raise ValueError(f"image tensors must be float in [0, 1] (or uint8), got dtype {t.dtype}")
        t = t.detach().float().cpu()
        if t.numel() and (t.min() < -1e-3 or t.max() > 1 + 1e-3):
            raise ValueError(
                f"float image tensors must lie in [0, 1], got values in [{float(t.min()):.3g}, {float(t.max()):.3g}]"
            )
        if tuple(t.shape[-2:]) != (self.height, self.width):
            t = self._resize(t).clamp_(0, 1)
        return list(t)

    def _convert(self, item) -> list[torch.Tensor]:
        if isinstance(item, (str, Path)):
            return [self._from_pil(read_rgb(str(item)))]
        if isinstance(item, Image.Image):
            return [self._from_pil(item)]
        if isinstance(item, np.ndarray):
            return [self._from_array(item)]
        if isinstance(item, torch.Tensor):
            return self._from_tensor(item)
        raise ValueError(
            f"unsupported image type {type(item).__name__}: use a path, PIL image, uint8 numpy array "
            "or a float tensor in [0, 1]"
        )

    def to_tensors(self, images) -> list[torch.Tensor]:
        """Model inputs ``[3, height, width]`` (float in [0, 1]) for one image or a list of images."""
        if isinstance(images, _SINGLE):
            return self._convert(images)
        items = images
        if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
            raise ValueError(f"unsupported input type {type(images).__name__}: give an image or a list of images")
        out: list[torch.Tensor] = []
        for item in items:
            if isinstance(item, torch.Tensor) and item.dim() == 4:
                raise ValueError("a list may hold single images only; pass an [N, 3, H, W] tensor on its own")
            out.extend(self._convert(item))
        return out

    # -- extraction -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, images) -> torch.Tensor:
        tensors = self.to_tensors(images)
        if not tensors:
            raise ValueError("no images to extract features from")
        dev = self.device
        chunks = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(tensors), self.batch_size):
                batch = torch.stack(tensors[start : start + self.batch_size]).to(dev)
                batch = batch.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                    chunks.append(self.model(batch).float().cpu().contiguous())
        finally:
            self.model.train(was_training)
        return torch.cat(chunks)
