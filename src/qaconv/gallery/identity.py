"""Model identity of a gallery: which checkpoint's model made its feature maps (and may search or extend it).

The identity is ``{"checkpoint", "hash", "feature_shape"}``: the resolved checkpoint path (for messages), a
SHA-256 over the model-defining config, the input size and every weight of model and matcher, and the
feature-map shape ``(C, h, w)``. A gallery refuses another model (:func:`check_identity`).
"""

from __future__ import annotations

import hashlib
import json
import re

import torch

from ..errors import QAConvError

HASH_PATTERN = re.compile(r"[0-9a-f]{64}")


def model_identity(extractor) -> dict:
    """``{"checkpoint", "hash", "feature_shape"}`` of a :class:`~qaconv.extractor.FeatureExtractor`.

    The hash covers the model-defining config (or the input size) and every weight of model and matcher;
    ``checkpoint`` is the extractor's own (its resolved path; ``"(in-memory model)"`` for one built from a
    model), used in messages only.
    """
    from ..engine.runner import MODEL_KEYS

    h = hashlib.sha256()
    cfg = {k: extractor.cfg.get(k) for k in MODEL_KEYS} if extractor.cfg else {}
    cfg.update(height=extractor.height, width=extractor.width)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, module in (("model", extractor.model), ("matcher", extractor.matcher)):
        for key, t in sorted((module.state_dict() if module is not None else {}).items()):
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if hasattr(extractor.model, "out_channels") and hasattr(extractor.model, "feature_size"):
        shape = (int(extractor.model.out_channels), *(int(s) for s in extractor.feature_size))
    else:
        shape = tuple(int(s) for s in extractor(torch.zeros(3, extractor.height, extractor.width)).shape[1:])
    checkpoint = getattr(extractor, "checkpoint", None)
    return {"checkpoint": str(checkpoint) if checkpoint is not None else "(in-memory model)",
            "hash": h.hexdigest(), "feature_shape": shape}


def check_identity(recorded: dict, identity: dict, what: str = "the index", fix: str = "rebuild the index") -> None:
    """Raise :class:`QAConvError` unless ``identity`` (from :func:`model_identity`) is the ``recorded`` one.

    ``recorded``: ``{"checkpoint", "hash", "feature_shape"}`` as stored with a gallery; ``what`` names the
    gallery in the message, ``fix`` says what to do.
    """
    if identity["hash"] != recorded["hash"] or tuple(identity["feature_shape"]) != tuple(recorded["feature_shape"]):
        raise QAConvError(
            f"{what} was built with another model (checkpoint {recorded['checkpoint']}, hash "
            f"{recorded['hash'][:12]}, maps {tuple(recorded['feature_shape'])}); {identity['checkpoint']} has hash "
            f"{identity['hash'][:12]}, maps {tuple(identity['feature_shape'])}: {fix} with this checkpoint"
        )
