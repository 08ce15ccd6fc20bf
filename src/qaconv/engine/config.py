"""One typed training configuration: a published recipe plus explicit options, resolved once and validated
as a whole before any work starts. The CLI, the demo and ``config.yaml`` go through it; the engine passes
plain arguments from it to the library."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..choices import ARCHS, AUGMENTS, FINAL_LAYERS, IBN_TYPES, INPUT_NORMS, MATCHERS, RERANK_INPUTS, VERSIONS
from ..errors import QAConvError
from ..recipes import DEFAULT_RECIPE, RECIPE_KEYS, RECIPES, load_recipe

CHOICES: dict[str, tuple] = {
    "recipe": RECIPES,
    "arch": ARCHS,
    "final_layer": tuple(FINAL_LAYERS),
    "ibn": (None, *IBN_TYPES),
    "input_norm": INPUT_NORMS,
    "pretrained": (None, "imagenet"),
    "matcher": MATCHERS,
    "qaconv_version": VERSIONS,
    "loss": ("triplet", "pairwise", "memory"),
    "sampler": ("graph", "pk", "shuffle"),
    "amp": ("auto", "on", "off"),
    "augment": AUGMENTS,
    "freeze_backbone_bn": ("auto", True, False),
    "rerank_input": RERANK_INPUTS,
}

# (lowest, highest, lowest allowed too) for numbers; every float must also be finite
RANGES: dict[str, tuple] = {
    "neck": (0, None, True),
    "height": (0, None, False),
    "width": (0, None, False),
    "margin": (0, None, False),
    "mem_batch_size": (0, None, False),
    "batch_size": (0, None, False),
    "num_instance": (0, None, False),
    "gs_pre_epochs": (0, None, True),
    "lr": (0, 10, False),
    "weight_decay": (0, 1, True),
    "backbone_lr_mult": (0, None, True),
    "clip": (0, None, True),
    "step_factor": (0, None, False),
    "max_epochs": (0, None, False),
    "augment_after_acc": (0, 1, True),
    "pretrain_trials": (0, None, True),
    "pretrain_steps": (0, None, False),
    "workers": (0, None, True),
    "seed": (0, None, True),
    "fea_batch": (0, None, False),
    "match_memory": (0, None, False),
    "k1": (0, None, False),
    "k2": (0, None, False),
    "lambda_value": (0, 1, True),
    "tau": (0, None, False),
    "sigma": (0, None, False),
    "tlift_k": (0, None, False),
    "alpha": (0, None, True),
    "rerank_dense_max": (0, None, False),
    "two_stage": (0, None, True),
    "report_queries": (0, None, False),
}


@dataclass
class TrainConfig:
    """Everything a training run is made of. Field defaults are the 2.1 recipe's values (QAConv-GS); the
    training set has no default (nothing is generated unless named) and no test set is evaluated unless named.
    ``data_dir`` None: benchmarks and folders under ``./data``, synthetic domains in the cache folder
    (:func:`qaconv.data.registry.cache_dir`). :func:`resolve_config` applies a recipe and explicit options."""

    recipe: str = DEFAULT_RECIPE
    # data and output
    dataset: str = ""
    combine_all: bool = False
    testsets: str = ""
    data_dir: str | None = None
    out_dir: str = "runs/qaconv"
    # model
    arch: str = "resnet50"
    final_layer: str = "layer3"
    ibn: str | None = "b"
    neck: int = 128
    neck_bn: bool = False
    input_norm: str = "none"
    pretrained: str | None = "imagenet"
    backbone_weights: str | None = None
    height: int = 384
    width: int = 128
    matcher: str = "qaconv"
    qaconv_version: str = "2.1"
    # loss
    loss: str = "triplet"
    margin: float = 16.0
    mem_batch_size: int = 16
    mem_mask_invalid: bool = True
    mem_joint_bn: bool = False
    # sampler
    sampler: str = "graph"
    batch_size: int = 64
    num_instance: int = 2
    gs_pre_epochs: int = 0
    gs_rerank: bool = False
    gs_save: bool = False
    # optimisation and schedule
    lr: float = 0.005
    weight_decay: float = 5e-4
    backbone_lr_mult: float = 0.1
    clip: float = 8.0
    amp: str = "auto"
    step_factor: float = 0.7
    max_epochs: int = 60
    freeze_backbone_bn: str | bool = "auto"
    augment: str = "full"
    augment_after_acc: float = 0.0
    pretrain_trials: int = 0
    pretrain_steps: int = 2000
    # run
    strict: bool = False
    workers: int = 2
    seed: int = 0
    device: str | None = None
    fea_batch: int = 128
    match_memory: float = 256.0
    # evaluation and post-processing (see qaconv.engine.evaluator.POST_DEFAULTS)
    rerank: bool = False
    tlift: bool = False
    tlift_direct: bool = False
    rerank_input: str = "sigmoid"
    save_scores: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    tau: float = 100.0
    sigma: float = 200.0
    tlift_k: int = 10
    alpha: float = 0.2
    rerank_dense_max: int = 30000
    two_stage: int = 0
    report: str | None = None
    report_queries: int = 10

    def __post_init__(self):
        _normalise(self)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, check_datasets: bool = False, only: tuple[str, ...] | None = None) -> TrainConfig:
        """Raise one :class:`QAConvError` naming the first bad field (choices, ranges, finiteness, option
        combinations; with ``check_datasets`` also that the training and test sets can be found). ``only``:
        check just these fields' choices, types and ranges (e.g. a checkpoint's model fields)."""
        for name in only or ():
            value, default = getattr(self, name), getattr(TrainConfig(), name)
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise QAConvError(f"{name} must be a number, got {value!r}")
        for name, choices in CHOICES.items():
            if only is not None and name not in only:
                continue
            if getattr(self, name) not in choices:
                shown = ", ".join("none" if c is None else str(c).lower() for c in choices)
                raise QAConvError(f"{name} = {getattr(self, name)!r} is not one of: {shown}")
        for name, (low, high, inclusive) in RANGES.items():
            if only is not None and name not in only:
                continue
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise QAConvError(f"{name} must be a finite number, got {value}")
            if value < low or (value == low and not inclusive) or (high is not None and value > high):
                bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
                raise QAConvError(f"{name} must be {bound}, got {value}")
        if only is not None:
            return self
        if self.sampler in ("graph", "pk"):
            if self.batch_size % self.num_instance or self.batch_size < 2 * self.num_instance:
                raise QAConvError(
                    f"batch_size ({self.batch_size}) must be a multiple of num_instance ({self.num_instance}) and "
                    f"at least twice it, so that a batch holds two identities or more"
                )
        if self.sampler == "shuffle" and self.batch_size < 2:
            raise QAConvError("batch_size must be >= 2")
        if self.gs_pre_epochs or self.gs_rerank or self.gs_save:
            if self.sampler != "graph":
                raise QAConvError("gs_pre_epochs, gs_rerank and gs_save need sampler = graph")
        if self.loss == "memory" and self.matcher != "qaconv" and self.mem_joint_bn:
            raise QAConvError("mem_joint_bn needs matcher = qaconv")
        if self.device is not None:
            from ..matching import pick_device

            try:
                pick_device(self.device)
            except ValueError as exc:
                raise QAConvError(str(exc)) from None
        if check_datasets:
            from ..data.registry import HOW_TO_NAME, check_dataset

            if not split_names(self.dataset):
                raise QAConvError(f"no training set given: pass --dataset NAME, where NAME is {HOW_TO_NAME}")
            check_dataset(self.dataset, self.data_dir, combine_all=self.combine_all)
            for name in split_names(self.testsets):
                check_dataset(name, self.data_dir)
        return self


def split_names(testsets: str | None) -> list[str]:
    """Comma-separated test-set names, blanks dropped."""
    return [t.strip() for t in (testsets or "").split(",") if t.strip()]


def _none(value):
    return None if value in (None, "", "none", "None") else value


def _normalise(cfg: TrainConfig) -> None:
    """Coerce values that arrive as YAML / CLI text or older configs to their canonical form."""
    cfg.ibn, cfg.pretrained, cfg.backbone_weights = _none(cfg.ibn), _none(cfg.pretrained), _none(cfg.backbone_weights)
    cfg.data_dir = _none(cfg.data_dir)
    cfg.dataset, cfg.testsets = cfg.dataset or "", cfg.testsets or ""
    cfg.qaconv_version = str(cfg.qaconv_version)
    if cfg.augment is True or cfg.augment is False:  # configs before recipes: augment on/off
        cfg.augment = "full" if cfg.augment else "none"
    if isinstance(cfg.amp, bool):  # YAML 1.1 reads on/off as booleans
        cfg.amp = "on" if cfg.amp else "off"
    if cfg.amp is None:
        cfg.amp = "auto"
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


def from_dict(values: dict, *, strict: bool = True) -> TrainConfig:
    """A config from a dict (e.g. a run's ``config.yaml``); unknown keys are refused (``strict``) or dropped."""
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown and strict:
        raise QAConvError(f"unknown configuration key(s): {', '.join(unknown)}")
    return TrainConfig(**{k: v for k, v in values.items() if k in FIELD_NAMES})


def resolve_config(recipe: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """``recipe`` (default 2.1) sets every value that version's official ``main.py`` sets; ``overrides``
    (explicit options) win over it. Not validated: call :meth:`TrainConfig.validate`."""
    overrides = dict(overrides or {})
    recipe = str(recipe or overrides.pop("recipe", None) or DEFAULT_RECIPE)
    overrides.pop("recipe", None)
    values = {**TrainConfig().to_dict(), **load_recipe(recipe), **overrides, "recipe": recipe}
    return from_dict(values)


__all__ = ["RECIPE_KEYS", "RECIPES", "TrainConfig", "from_dict", "resolve_config", "split_names"]
