"""Training and test transforms (torchvision.transforms.v2), as in the official QAConv-GS code."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

from ..choices import AUGMENTS


class RandomOcclusion(torch.nn.Module):
    """Paste one white square of side s ~ U[max(1, S*min_size), S*max_size), S = min(H, W).

    Works on float image tensors [C, H, W] in [0, 1]; always applied when max_size > 0 (official rule).
    """

    def __init__(self, min_size: float = 0.0, max_size: float = 0.8):
        super().__init__()
        if not 0.0 <= min_size <= max_size < 1.0:
            raise ValueError(f"occlusion sizes need 0 <= min_size <= max_size < 1, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.max_size <= 0:
            return img
        h, w = img.shape[-2:]
        side = min(h, w)
        lo, hi = max(1, int(side * self.min_size)), int(side * self.max_size)
        if hi <= lo:
            return img
        s = int(torch.randint(lo, hi, ()).item())
        x0 = int(torch.randint(0, max(1, w - s), ()).item())
        y0 = int(torch.randint(0, max(1, h - s), ()).item())
        img = img.clone()
        img[..., y0 : y0 + s, x0 : x0 + s] = 1.0
        return img


def _to_float() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def eval_transform(height: int, width: int) -> v2.Compose:
    """Bicubic resize and conversion to float RGB in [0, 1]."""
    return v2.Compose([v2.Resize((height, width), InterpolationMode.BICUBIC, antialias=True), *_to_float()])


def train_transform(
    height: int,
    width: int,
    pad: int | None = None,
    flip: bool = True,
    rotation: float = 5.0,
    jitter: bool = True,
    occlusion: tuple[float, float] = (0.0, 0.8),
) -> v2.Compose:
    """Resize, pad + random crop, flip, ±rotation, colour jitter, white-square occlusion.

    ``pad`` defaults to 10 px at the official 384-pixel height, scaled with ``height``.
    """
    pad = max(1, round(10 * height / 384)) if pad is None else pad
    steps: list = [v2.Resize((height, width), InterpolationMode.BICUBIC, antialias=True)]
    if pad > 0:
        steps += [v2.Pad(pad, fill=0), v2.RandomCrop((height, width))]
    if flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation))
    if jitter:
        steps.append(v2.ColorJitter(brightness=(0.5, 2.0), contrast=(0.5, 2.0), saturation=(0.5, 2.0), hue=0.1))
    steps += _to_float()
    if occlusion[1] > 0:
        steps.append(RandomOcclusion(*occlusion))
    return v2.Compose(steps)


def make_transform(augment: str, height: int, width: int):
    """``full``: the v1.2-v2.x list (pad + crop, flip, rotation, colour jitter, occlusion); ``flip-occlusion``:
    v1.0/v1.1 (flip, resize, white-square occlusion); ``none``: the test transform."""
    if augment == "full":
        return train_transform(height, width)
    if augment == "flip-occlusion":  # the official flip comes before the resize; the two commute
        return train_transform(height, width, pad=0, rotation=0, jitter=False)
    if augment == "none":
        return eval_transform(height, width)
    raise ValueError(f"unknown augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
