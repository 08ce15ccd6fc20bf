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


# Where each value comes from in the official code (main.py is main_gs.py for v2.0)
SOURCES = {
    "arch": "main.py `--arch`",
    "ibn": "main.py `--ibn`",
    "final_layer": "main.py `--final_layer`",
    "neck": "main.py `--neck`",
    "neck_bn": "reid/models/resmap.py (neck_conv [+ neck_bn])",
    "input_norm": "main.py transforms (Resize + ToTensor)",
    "pretrained": "reid/models/resmap.py (ImageNet / IBN-Net weights)",
    "height": "main.py `--height`",
    "width": "main.py `--width`",
    "matcher": "reid/models/qaconv.py",
    "qaconv_version": "reid/models/qaconv.py (fc over 2HW, or shared over HW)",
    "loss": "main.py criterion (reid/loss/*.py)",
    "margin": "main.py `--margin`",
    "mem_batch_size": "main.py `--mem_batch_size`",
    "mem_mask_invalid": "class memory loss (`valid_class`, v1.1+)",
    "mem_joint_bn": "reid/loss/qaconv_loss.py (v1.0: one head call over all chunks)",
    "sampler": "main.py DataLoader / GraphSampler",
    "batch_size": "main.py `-b`",
    "num_instance": "main.py `--num_instance`",
    "gs_pre_epochs": "main_gs.py `--gs_pre_epochs`",
    "gs_rerank": "main_gs.py `--gs_rerank_off`, graph_sampler.py",
    "lr": "main.py `--lr`",
    "weight_decay": "main.py SGD",
    "backbone_lr_mult": "main.py param_groups",
    "clip": "main.py `--clip_value`",
    "amp": "reid/trainers.py (autocast + GradScaler)",
    "step_factor": "main.py `--step_size` (StepLR) / `--step_factor` (adaptive)",
    "max_epochs": "main.py `--epochs` / `--max_epochs`",
    "freeze_backbone_bn": "reid/trainers.py (model.train() / model.eval())",
    "augment": "main.py train_transformer",
    "augment_after_acc": "main.py `--acc_thr`",
    "pretrain_trials": "main.py `--num_trials` (reid/pretrainer.py)",
    "pretrain_steps": "main.py `--max_steps`",
    "rerank_input": "reid/evaluators.py (distance fed to reranking)",
}


def markdown_table() -> str:
    """The README's table: every recipe key, its value per recipe, and the official file it comes from."""

    def show(v) -> str:
        return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    recipes = {name: load_recipe(name) for name in RECIPES}
    lines = ["| option | " + " | ".join(RECIPES) + " | official source |", "|---" * (len(RECIPES) + 2) + "|"]
    for key in RECIPE_KEYS:
        values = " | ".join(show(recipes[r][key]) for r in RECIPES)
        lines.append(f"| `{key}` | {values} | {SOURCES[key]} |")
    return "\n".join(lines)
