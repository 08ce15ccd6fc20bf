"""The published QAConv training recipes as YAML presets: every value a version's official ``main.py``
sets (each file names the official files its values come from)."""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml

from ..errors import QAConvError

RECIPES = ("1.0", "1.1", "1.2", "2.0", "2.1", "latest")
DEFAULT_RECIPE = "2.1"
RECIPE_KEYS = (
    "arch", "ibn", "final_layer", "neck", "neck_bn", "input_norm", "pretrained", "height", "width", "matcher",
    "qaconv_version", "loss", "margin", "mem_batch_size", "mem_mask_invalid", "mem_joint_bn", "sampler",
    "batch_size", "num_instance", "gs_pre_epochs", "gs_rerank", "lr", "weight_decay", "backbone_lr_mult", "clip",
    "amp", "step_factor", "max_epochs", "freeze_backbone_bn", "augment", "augment_after_acc", "pretrain_trials",
    "pretrain_steps", "rerank_input",
)  # fmt: skip


def recipe_file(name: str) -> str:
    return "latest.yaml" if name == "latest" else f"v{name}.yaml"


@cache
def _load(name: str) -> tuple:
    text = resources.files(__package__).joinpath(recipe_file(name)).read_text()
    values = yaml.safe_load(text)
    if not isinstance(values, dict) or set(values) != set(RECIPE_KEYS):
        raise QAConvError(f"recipe file {recipe_file(name)} is damaged: it must set exactly {', '.join(RECIPE_KEYS)}")
    return tuple(values.items())


def load_recipe(name: str) -> dict:
    """The values recipe ``name`` (1.0, 1.1, 1.2, 2.0, 2.1 or latest) sets, as a new dict."""
    name = str(name)
    if name not in RECIPES:
        raise QAConvError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return dict(_load(name))
