"""``qaconv.load``: a trained (or converted) model back from its checkpoint, ready to use."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from torch import nn

from .errors import QAConvError


class TrainedModel(NamedTuple):
    """What :func:`load` returns; unpacks as ``backbone, matcher, config``.

    ``backbone`` maps RGB images in [0, 1] ``[B, 3, height, width]`` to unit-norm feature maps (input
    normalisation is inside it), ``matcher(prob_maps, gal_maps)`` gives ``[P, G]`` logits (higher = more
    alike), ``config`` is the training configuration (``arch``, ``height``, ``width``, ...).
    """

    backbone: nn.Module
    matcher: nn.Module
    config: dict

    @property
    def height(self) -> int:
        """Input height in pixels."""
        return int(self.config["height"])

    @property
    def width(self) -> int:
        """Input width in pixels."""
        return int(self.config["width"])


def load(path: str | Path, device=None) -> TrainedModel:
    """Load a model saved by ``qaconv train`` or ``qaconv convert`` (eval mode, on ``device``).

    ``path`` is ``checkpoint.pt`` or the run folder holding it; ``device`` defaults to CUDA when available.

    Example::

        import qaconv

        m = qaconv.load("runs/r18")                        # or: backbone, matcher, cfg = qaconv.load(...)
        images = torch.rand(4, 3, m.height, m.width)       # RGB in [0, 1]
        with torch.no_grad():
            maps = m.backbone(images.to(next(m.backbone.parameters()).device))
            logits = m.matcher(maps[:1], maps)             # [1, 4]
    """
    from .engine.runner import load_trained

    try:
        model, matcher, cfg = load_trained(path, device=device)
    except QAConvError:
        _raise_if_official(path)
        raise
    return TrainedModel(model, matcher, cfg)


def _raise_if_official(path: str | Path) -> None:
    """A clearer message when ``path`` is a checkpoint of the official QAConv code."""
    from .models.official import read_official_checkpoint

    path = Path(path)
    if not path.is_file():
        return
    try:
        read_official_checkpoint(path)
    except QAConvError:
        return
    raise QAConvError(
        f"{path} is a checkpoint of the official QAConv code: convert it with 'qaconv convert {path} -o DIR' "
        "or load it with qaconv.load_official_checkpoint"
    )
