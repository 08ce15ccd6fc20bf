"""Glue between options (CLI, demo, config.yaml) and the library: build, train, evaluate."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from ..data.registry import load_dataset
from ..errors import QAConvError
from ..losses import ClassMemoryLoss, PairwiseMatchingLoss, TripletLoss
from ..matching import pick_device
from ..models import build_backbone, build_matcher
from .checkpoint import load_checkpoint
from .config import TrainConfig, from_dict
from .distributed import barrier, init_from_env, is_main, main_first
from .evaluator import POST_DEFAULTS, evaluate
from .trainer import CHECKPOINT, Trainer, append_jsonl

# The 2.1 recipe (official QAConv-GS) with the embedded synthetic data, as a plain dict.
DEFAULTS: dict = TrainConfig().to_dict()

MODEL_KEYS = (
    "arch", "final_layer", "ibn", "neck", "neck_bn", "input_norm", "height", "width", "matcher", "qaconv_version",
)  # fmt: skip
RUNTIME_KEYS = ("workers", "device", "testsets", "data_dir", "strict", *POST_DEFAULTS)  # not part of the training state


class InBatchLoss(torch.nn.Module):
    """Scores a batch against itself with ``matcher`` and applies a pair loss to the [B, B] logits."""

    def __init__(self, matcher: torch.nn.Module, loss: torch.nn.Module):
        super().__init__()
        self.matcher, self.loss = matcher, loss

    def forward(self, feats: torch.Tensor, targets: torch.Tensor):
        return self.loss(self.matcher(feats, feats), targets)


def build_model(cfg: dict, load_weights: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Backbone+neck and matcher from a config; ImageNet/local backbone weights when asked."""
    ibn = None if cfg["ibn"] in (None, "none", "") else cfg["ibn"]
    weights = cfg.get("backbone_weights") or None
    pretrained = None if weights or cfg.get("pretrained") in (None, "none", "") else cfg["pretrained"]
    if load_weights and pretrained and ibn:
        raise QAConvError(
            f"torchvision has no ImageNet weights for IBN-Net-{ibn}: pass --backbone-weights PATH "
            f"(the official {cfg['arch']}_ibn_{ibn} file), --ibn none, or --pretrained none"
        )
    model = build_backbone(
        arch=cfg["arch"],
        final_layer=cfg["final_layer"],
        ibn=ibn,
        neck=cfg["neck"],
        pretrained=pretrained if load_weights else None,
        weights_path=weights if load_weights else None,
        input_norm=cfg["input_norm"],
        neck_bn=bool(cfg.get("neck_bn", False)),
    )
    h, w = model.feature_size(cfg["height"], cfg["width"])
    matcher = build_matcher(cfg["matcher"], model.out_channels, h, w, version=cfg["qaconv_version"])
    return model, matcher


def build_criterion(cfg: dict, model, matcher, num_classes: int) -> torch.nn.Module:
    if cfg["loss"] == "triplet":
        return InBatchLoss(matcher, TripletLoss(cfg["margin"]))
    if cfg["loss"] == "pairwise":
        return InBatchLoss(matcher, PairwiseMatchingLoss())
    if cfg["loss"] == "memory":
        h, w = model.feature_size(cfg["height"], cfg["width"])
        return ClassMemoryLoss(
            matcher,
            num_classes,
            model.out_channels,
            h,
            w,
            cfg["mem_batch_size"],
            mask_invalid=cfg.get("mem_mask_invalid", True),
            joint_bn=cfg.get("mem_joint_bn", False),
        )
    raise QAConvError(f"unknown loss '{cfg['loss']}': choose triplet, pairwise or memory")


def _freeze_bn(cfg: dict) -> bool:
    value = cfg["freeze_backbone_bn"]
    if value == "auto":  # frozen ImageNet statistics help generalisation; from random init they are meaningless
        return bool(cfg.get("pretrained") not in (None, "none", "") or cfg.get("backbone_weights"))
    return bool(value)


def _amp(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


RUN_FILES = (CHECKPOINT, "config.yaml", "metrics.jsonl")


def _check_new_run(out: Path, overwrite: bool) -> None:
    """A new run never mixes with an old one in ``out``: refuse, or with ``overwrite`` remove the old run's files."""
    old = [name for name in RUN_FILES if (out / name).exists()]
    if old and not overwrite:
        raise QAConvError(
            f"{out} already holds a run ({', '.join(old)}): pass --resume to continue it or --overwrite to replace it"
        )
    if is_main():
        for name in old:
            (out / name).unlink()


def train(
    cfg: TrainConfig | dict,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end=None,
    overwrite: bool = False,
    given: set[str] | None = None,
) -> dict:
    """Train per ``cfg`` (a :class:`TrainConfig`, or a dict of its fields) into its ``out_dir`` and evaluate on
    its test sets; returns a summary. The configuration is validated as a whole (test sets included) first.

    With ``resume`` the saved configuration holds; of the run-time options (workers, device, test sets, data
    folder, post-processing) those in ``given`` (the options the command line named; default: all) replace
    the saved ones. A new run (no ``resume``) into a folder that holds a run is refused unless ``overwrite``,
    which removes the old run's checkpoint, config and metrics first. Under torchrun (``WORLD_SIZE`` > 1) every process
    joins the group and trains its share (DDP)."""
    config = cfg if isinstance(cfg, TrainConfig) else from_dict(cfg)
    cfg = config.validate(check_datasets=not resume).to_dict()  # a resumed run's data: checked once merged
    init_from_env(cfg.get("device"))
    progress = progress and is_main()
    out = Path(cfg["out_dir"])
    if resume:
        state = load_checkpoint(out / CHECKPOINT)
        if "optimizer" not in state or "config" not in state:
            how = "converted from an official checkpoint" if "converted_from" in state else "not written by training"
            raise QAConvError(
                f"{out / CHECKPOINT} holds no training state ({how}): --resume continues a 'qaconv train' run"
            )
        saved = from_dict(state["config"], strict=False).to_dict()  # the saved recipe and every resolved value
        fixed = [k for k in cfg if k not in RUNTIME_KEYS and k != "out_dir" and (given is None or k in given)]
        changed = sorted(k for k in fixed if saved.get(k) != cfg[k])
        if changed and progress:
            print(
                f"resuming with the saved configuration; ignoring changed options {changed} "
                "(a run continues as it was set up: start a new run with -o to change them)"
            )
        runtime = [k for k in RUNTIME_KEYS if given is None or k in given]
        cfg = from_dict({**saved, **{k: cfg[k] for k in runtime}}).validate(check_datasets=True).to_dict()
    else:
        _check_new_run(out, overwrite)  # every rank looks at the same files, rank 0 removes them
        barrier()  # ... and none writes before every rank has looked (or a rank would see rank 0's new config)
    out.mkdir(parents=True, exist_ok=True)
    if is_main():
        (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(cfg["seed"])
    model, matcher = build_model(cfg, load_weights=not resume)  # before the data: weight errors come first
    with main_first():  # a synthetic data set is generated once, by rank 0
        data = load_dataset(cfg["dataset"], cfg["data_dir"], combine_all=cfg["combine_all"], progress=progress,
                            require=("train",))
    if progress:
        if getattr(data, "found", ""):
            print(data.found)
        print(data.summary())
    criterion = build_criterion(cfg, model, matcher, data.num_train_pids)
    trainer = Trainer(
        model,
        matcher,
        criterion,
        data.train,
        out,
        height=cfg["height"],
        width=cfg["width"],
        batch_size=cfg["batch_size"],
        num_instance=cfg["num_instance"],
        sampler=cfg["sampler"],
        gs_pre_epochs=cfg["gs_pre_epochs"],
        gs_rerank=cfg["gs_rerank"],
        gs_save_dir=out / "graph_sampler" if cfg["gs_save"] else None,
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        backbone_lr_mult=cfg["backbone_lr_mult"],
        clip=cfg["clip"],
        step_factor=cfg["step_factor"],
        max_epochs=cfg["max_epochs"],
        freeze_backbone_bn=_freeze_bn(cfg),
        augment=cfg["augment"],
        augment_after_acc=cfg["augment_after_acc"],
        pretrain_trials=cfg["pretrain_trials"],
        pretrain_steps=cfg["pretrain_steps"],
        amp=_amp(cfg["amp"]),
        strict=cfg["strict"],
        workers=cfg["workers"],
        device=cfg["device"],
        seed=cfg["seed"],
        eval_batch=cfg["fea_batch"],
        progress=progress,
        extra_state={"config": cfg},
    )
    start = time.perf_counter()
    epochs = trainer.fit(resume=resume, on_epoch_end=on_epoch_end)
    train_s = time.perf_counter() - start
    if is_main():
        append_jsonl(out / "metrics.jsonl", {"type": "train_done", "epochs": trainer.epoch, "time_s": train_s})
    results = {}
    if cfg.get("testsets"):
        results = evaluate(model, matcher, cfg, cfg["testsets"], out_dir=out, progress=progress)
    elif progress:
        print(f"no test set named (--testsets): evaluate with 'qaconv evaluate --checkpoint {out} --testsets NAME'")
    return {
        "config": cfg,
        "epochs": epochs,
        "train_time_s": train_s,
        "results": results,
        "model": model.eval(),
        "matcher": matcher.eval(),
    }


def load_trained(path: str | Path, device=None) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Model, matcher and config from a checkpoint written by ``qaconv train`` (eval mode).

    Under torchrun it first joins the process group, so that ``device=None`` means this process's GPU."""
    init_from_env(device)
    state = load_checkpoint(path)
    if any(k not in state for k in ("config", "model", "matcher")):
        raise QAConvError(f"{path} holds no trained model (expected a checkpoint from 'qaconv train')")
    if not isinstance(state["config"], dict):
        raise QAConvError(f"{path}: its config is a {type(state['config']).__name__}, expected a mapping of options")
    try:
        cfg = from_dict(state["config"], strict=False).validate(only=MODEL_KEYS).to_dict()
    except (QAConvError, TypeError, ValueError) as exc:
        raise QAConvError(f"{path}: invalid model configuration: {exc}") from None
    model, matcher = build_model(cfg, load_weights=False)
    try:
        model.load_state_dict(state["model"])
        matcher.load_state_dict(state["matcher"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise QAConvError(f"checkpoint {path} does not fit its own config: {str(exc).splitlines()[0]}") from None
    tensors = [*model.state_dict().items(), *matcher.state_dict().items()]
    bad = [n for n, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise QAConvError(f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])}); it cannot be used")
    dev = pick_device(device)
    return model.to(dev).eval(), matcher.to(dev).eval(), cfg
