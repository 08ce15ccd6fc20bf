"""The training loop: SGD-Nesterov, frozen backbone BN, AMP on CUDA, clipping, adaptive or step schedule,
accuracy-triggered augmentation and pre-training trials (v1.1/v1.2), per-epoch atomic checkpoints, exact
resume and a metrics.jsonl log."""

from __future__ import annotations

import copy
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.images import ImageDataset, collate_skip_bad, scan_images
from ..data.records import Record
from ..data.samplers import GraphSampler, RandomIdentitySampler, ShuffledBatchSampler, sigmoid_distance
from ..data.transforms import eval_transform, make_transform
from ..errors import QAConvError, writing
from ..losses import finite_mean
from ..matching import pick_device
from ..models.qaconv import QAConv
from ..progress import progress_bar
from . import distributed as ddp
from .checkpoint import load_checkpoint, remove_stale_temp, save_checkpoint
from .schedule import EpochSchedule

CHECKPOINT = "checkpoint.pt"
def reset_criterion(criterion: torch.nn.Module) -> None:
    """Fresh parameters and statistics of the matcher head, and an empty class memory (pre-training trials)."""
    heads = [m for m in criterion.modules() if isinstance(m, QAConv)]
    inside = {id(c) for h in heads for c in h.modules()}
    for m in criterion.modules():
        if isinstance(m, QAConv):
            m.reset_parameters()
        elif id(m) not in inside and m is not criterion and hasattr(m, "reset_parameters"):
            m.reset_parameters()
        for name in ("class_memory", "valid_class"):
            if isinstance(getattr(m, name, None), torch.Tensor):
                getattr(m, name).zero_()


def _json_safe(value):
    """Non-finite floats become None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line to ``path`` (valid JSON: non-finite numbers are written as null)."""
    line = json.dumps(_json_safe(row), allow_nan=False) + "\n"
    with writing(path), open(path, "a") as f:
        f.write(line)


def _logged_epochs(path: Path) -> set[int]:
    """Epochs that have a row in a metrics.jsonl (a torn last line, from a kill mid-write, is ignored)."""
    epochs = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("type") == "epoch":
                epochs.add(int(row["epoch"]))
    return epochs


def make_optimizer(model, criterion, lr: float, weight_decay: float, backbone_lr_mult: float = 0.1):
    """SGD Nesterov (momentum 0.9) with three groups: backbone at ``backbone_lr_mult`` x lr, neck and
    matcher/criterion at lr."""
    groups = [
        {"params": list(model.base.parameters()), "lr": backbone_lr_mult * lr, "name": "backbone"},
        {"params": [p for n, p in model.named_parameters() if not n.startswith("base.")], "lr": lr, "name": "neck"},
        {"params": list(criterion.parameters()), "lr": lr, "name": "matcher"},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def _drop_unreadable(records: list[Record], strict: bool, progress: bool) -> tuple[list[Record], list[str]]:
    """Check every training image once up front; drop unreadable ones (or, with ``strict``, stop)."""
    bad = scan_images(records, progress=progress)
    if not bad:
        return records, []
    examples = ", ".join(bad[:3])
    if strict:
        raise QAConvError(f"{len(bad)} unreadable training image(s), e.g. {examples}; fix them or drop --strict")
    if progress:
        print(f"skipping {len(bad)} unreadable training image(s), e.g. {examples}")
    bad_set = set(bad)
    kept = [r for r in records if r.path not in bad_set]
    if not kept:
        raise QAConvError("no readable training images")
    return kept, bad


class Trainer:
    """Trains ``model`` (images -> feature maps) with ``criterion`` on ``records``.

    ``criterion(features, targets) -> (loss [B], acc [B])``; ``matcher`` scores feature maps and is used
    by the graph sampler to find neighbouring classes. Everything is written to ``out_dir``.

    Inside a process group (see :mod:`qaconv.engine.distributed`) each rank trains on its slice of the
    same global batches with DDP; the criterion sees the gathered global batch, and only rank 0 prints
    and writes files.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        matcher: torch.nn.Module,
        criterion: torch.nn.Module,
        records: Sequence[Record],
        out_dir: str | Path,
        *,
        height: int,
        width: int,
        batch_size: int = 64,
        num_instance: int = 2,
        sampler: str = "graph",
        gs_pre_epochs: int = 0,
        gs_rerank: bool = False,
        gs_save_dir: str | Path | None = None,
        lr: float = 0.005,
        weight_decay: float = 5e-4,
        backbone_lr_mult: float = 0.1,
        clip: float = 8.0,
        step_factor: float = 0.7,
        max_epochs: int = 60,
        freeze_backbone_bn: bool = True,
        augment: str | bool = "full",
        augment_after_acc: float = 0.0,
        pretrain_trials: int = 0,
        pretrain_steps: int = 2000,
        strict: bool = False,
        amp: bool | None = None,
        workers: int = 0,
        device: str | torch.device | None = None,
        seed: int = 0,
        eval_batch: int = 128,
        progress: bool = True,
        extra_state: dict | None = None,
    ):
        if not records:
            raise QAConvError("the training set is empty")
        self.device = pick_device(device)
        self.rank, self.world = ddp.rank(), ddp.world_size()
        progress = progress and self.rank == 0
        if self.world > 1 and self.device.type == "cuda" and not freeze_backbone_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics of the global batch
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.matcher = matcher.to(self.device)
        self.criterion = criterion.to(self.device)
        self.records, self.unreadable = _drop_unreadable(list(records), strict, progress)
        self.out_dir = Path(out_dir)
        self.height, self.width = height, width
        self.clip, self.seed, self.workers = clip, seed, workers
        self.freeze_backbone_bn = freeze_backbone_bn
        self.eval_batch, self.progress = eval_batch, progress
        self.amp = self.device.type == "cuda" if amp is None else amp
        self.extra_state = extra_state or {}
        labels = [r.pid for r in self.records]
        if sampler == "graph":
            gs = dict(pre_epochs=gs_pre_epochs, rerank=gs_rerank, save_dir=gs_save_dir if self.rank == 0 else None,
                      first_epoch=1)  # fmt: skip
            self.sampler = GraphSampler(labels, batch_size, num_instance, self._class_distances, seed=seed, **gs)
            smallest = min(batch_size, len(self.sampler.classes) * num_instance)
        elif sampler == "pk":
            self.sampler = RandomIdentitySampler(labels, batch_size, num_instance, seed=seed)
            smallest = min(batch_size, len(self.sampler.classes) * num_instance)
        elif sampler == "shuffle":  # v1.x: DataLoader(shuffle=True, drop_last=True)
            self.sampler = ShuffledBatchSampler(len(self.records), batch_size, seed=seed)
            smallest, num_instance = batch_size, 1
        else:
            raise ValueError(f"unknown sampler '{sampler}': choose graph, pk or shuffle")
        if smallest < self.world:
            raise QAConvError(f"a batch of {smallest} images cannot be split over {self.world} processes")
        self.num_instance = num_instance
        self.augment = ("full" if augment else "none") if isinstance(augment, bool) else augment
        self.augment_after_acc = float(augment_after_acc)
        self.augment_on = self.augment != "none" and self.augment_after_acc <= 0
        self.pretrain_trials, self.pretrain_steps = int(pretrain_trials), int(pretrain_steps)
        self.strict = strict
        self.dataset = ImageDataset(self.records, self._transform(), skip_bad=not strict)
        self.optimizer = make_optimizer(model, criterion, lr, weight_decay, backbone_lr_mult)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)  # renewed every epoch, as official
        self.schedule = EpochSchedule(step_factor=step_factor, max_epochs=max_epochs)
        self.epoch = 0
        self._train_model = ddp.wrap_ddp(self.model, self.device)
        # the criterion sees the same gathered batch on every rank, so its memory (v1) stays in sync
        self._train_criterion = ddp.wrap_ddp(self.criterion, self.device, broadcast_buffers=False)

    # -- graph sampler support -------------------------------------------------------------
    def _class_distances(self, rep_indices: np.ndarray) -> np.ndarray:
        """QAConv distances between one representative image per class (-logit; 1 - sigmoid(logit / 10) when
        the graph is re-ranked, as v2.0)."""
        reps = [self.records[i] for i in rep_indices]
        feats = ddp.extract_features_sharded(
            self.model,
            reps,
            self.height,
            self.width,
            batch_size=self.eval_batch,
            workers=self.workers,
            device=self.device,
            progress=False,
        )
        scores = ddp.pairwise_scores_sharded(self.matcher, feats, feats, self.eval_batch, self.eval_batch, self.device)
        if self.sampler.rerank:  # v2.0 re-ranks 1 - sigmoid(logit / 10); v2.1 takes neighbours by -logit
            return sigmoid_distance(scores.numpy())
        return (-scores).numpy()

    def _transform(self):
        return make_transform(self.augment if self.augment_on else "none", self.height, self.width)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "matcher": self.matcher.state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "augment_on": self.augment_on,
            "sampler": self.sampler.state_dict(),
            **self.extra_state,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.matcher.load_state_dict(state["matcher"])
            self.criterion.load_state_dict(state["criterion"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise QAConvError(f"checkpoint does not fit this model and training setup: {first}") from None
        self.schedule.load_state_dict(state["schedule"])
        self.augment_on = bool(state.get("augment_on", self.augment_on))
        self.dataset.transform = self._transform()
        self.sampler.load_state_dict(state["sampler"])
        self.epoch = int(state["epoch"])

    # -- loop ------------------------------------------------------------------------------
    def _set_train_mode(self) -> None:
        self.model.train()
        if self.freeze_backbone_bn:
            self.model.base.eval()
        self.criterion.train()
        self.matcher.train()

    def _step(self, images: torch.Tensor, targets: torch.Tensor):
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            feats = ddp.gather_rows_with_grad(self._train_model(images).float())  # the global batch
            loss_vec, acc_vec = self._train_criterion(feats, ddp.all_gather_rows(targets))
        loss, acc, _ = finite_mean(loss_vec, acc_vec)
        if loss is None:
            return None, None
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            torch.nn.utils.clip_grad_norm_(self.criterion.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach()), float(acc)

    def _run_batches(self, sampler, desc: str, max_steps: int | None = None):
        """Train on the batches of ``sampler`` (at most ``max_steps``): losses, accuracies, skipped batches,
        images seen and unreadable images dropped. A new GradScaler each call, as the official trainer."""
        batches = sampler
        if self.world > 1:  # the same global batches on every rank, each rank loads its slice
            batches = ddp.ShardedBatchSampler(sampler, self.rank, self.world, self.num_instance)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            collate_fn=None if self.strict else collate_skip_bad,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        total = len(sampler) if max_steps is None else min(len(sampler), max_steps)
        losses, accs, skipped, seen, bad = [], [], 0, 0, 0
        bar = progress_bar(total=total, desc=desc, unit="steps", disable=not self.progress, leave=False)
        for step, (images, targets, *rest) in enumerate(loader):
            if step >= total:
                break
            bad += int(rest[2]) if len(rest) == 3 else 0  # unreadable images dropped from this batch
            if images.dim() != 4:  # every image of this slice was unreadable
                images = torch.empty(0, 3, self.height, self.width)
            if (ddp.all_reduce_sum([len(images)])[0] if self.world > 1 else len(images)) < 2:
                skipped += 1
                bar.update(1)
                continue
            self._set_train_mode()
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            loss, acc = self._step(images, targets.to(self.device))
            seen += len(images)
            if loss is None:
                skipped += 1
            else:
                losses.append(loss)
                accs.append(acc)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", acc=f"{np.mean(accs[-20:]):.2f}")
            bar.update(1)
        bar.close()
        return losses, accs, skipped, seen, bad

    def train_epoch(self, epoch: int) -> dict:
        """One epoch (1-based ``epoch``); returns its summary row."""
        torch.manual_seed(self.seed * 100003 + epoch + 7919 * self.rank)  # augmentation differs per rank
        self.sampler.set_epoch(epoch)
        start = time.perf_counter()
        losses, accs, skipped, seen, bad = self._run_batches(self.sampler, f"epoch {epoch}")
        if not losses:
            raise QAConvError(
                f"every batch of epoch {epoch} had a non-finite loss ({skipped} skipped); "
                "try a lower --lr or check the data"
            )
        elapsed = time.perf_counter() - start
        # identical numbers on every rank, so the adaptive schedule decides the same everywhere
        loss, acc = ddp.all_reduce_mean([np.mean(losses), np.mean(accs)])
        seen, bad = (round(v) for v in ddp.all_reduce_sum([seen, bad]))  # images of all ranks
        return {
            "type": "epoch",
            "epoch": epoch,
            "loss": loss,
            "acc": acc,
            "lr": [g["lr"] for g in self.optimizer.param_groups],
            "batches": len(losses) + skipped,
            "skipped_batches": skipped,
            "bad_images": bad,
            "images_per_s": seen / elapsed,
            "time_s": elapsed,
            "augmented": self.augment_on,
        }

    def pretrain(self) -> dict:
        """v1.1/v1.2 pre-training: ``pretrain_trials`` trials of at most ``pretrain_steps`` steps of one epoch
        without augmentation, each from the initial backbone weights with a fresh neck, matcher head, class
        memory and optimizer state; the trial with the best 100 * accuracy - loss is kept."""
        base0 = copy.deepcopy(self.model.base.state_dict())
        transform, self.dataset.transform = self.dataset.transform, eval_transform(self.height, self.width)
        best, rows = None, []
        for trial in range(self.pretrain_trials):
            torch.manual_seed(self.seed * 100003 - 1 - trial + 7919 * self.rank)
            order = ShuffledBatchSampler(len(self.records), self.sampler_batch_size(), seed=self.seed)
            order.set_epoch(10_000 + trial)  # data orders of their own, apart from the epochs'
            losses, accs, *_ = self._run_batches(order, f"pre-training trial {trial + 1}", self.pretrain_steps)
            if not losses:
                raise QAConvError(f"pre-training trial {trial + 1}: every loss was non-finite; try a lower --lr")
            loss, acc = ddp.all_reduce_mean([np.mean(losses), np.mean(accs)])
            metric = 100 * acc - loss
            rows.append({"trial": trial + 1, "loss": loss, "acc": acc, "metric": metric})
            if self.progress:
                print(f"pre-training trial {trial + 1}/{self.pretrain_trials}: loss {loss:.4f} acc {acc:.3f}")
            if best is None or metric > best[0]:
                states = (copy.deepcopy(m.state_dict()) for m in (self.model, self.criterion, self.optimizer))
                best = (metric, trial, *states)
            if trial < self.pretrain_trials - 1:
                self.model.base.load_state_dict(base0)
                self.model.reset_neck()
                reset_criterion(self.criterion)
                self.optimizer.state = defaultdict(dict)
        self.model.load_state_dict(best[2])
        self.criterion.load_state_dict(best[3])
        self.optimizer.load_state_dict(best[4])
        self.dataset.transform = transform
        return {"type": "pretrain", "trials": rows, "best_trial": best[1] + 1}

    def sampler_batch_size(self) -> int:
        return int(getattr(self.sampler, "batch_size", 1))

    def fit(self, resume: bool = False, on_epoch_end: Callable[[int], None] | None = None) -> list[dict]:
        """Train until the schedule stops; with ``resume`` continue from ``out_dir``'s checkpoint."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.out_dir / CHECKPOINT
        if self.rank == 0:  # a kill during an earlier checkpoint write left these
            for p in remove_stale_temp(ckpt_path):
                if self.progress:
                    print(f"removed {p.name}, left by an interrupted checkpoint write")
        metrics = self.out_dir / "metrics.jsonl"
        if resume:  # every rank reads the same checkpoint
            state = load_checkpoint(ckpt_path, map_location=self.device)
            self.load_state_dict(state)
            if self.progress:
                print(f"resumed from {ckpt_path} after epoch {self.epoch}")
                if self.schedule.done(self.epoch):
                    print(f"the run was already complete (its schedule ends at epoch {self.schedule.final_epochs}): "
                          "nothing to train")
            row = state.get("metrics_row")  # a kill after the checkpoint, before its metrics row: write it now
            if self.rank == 0 and row and self.epoch not in _logged_epochs(metrics):
                append_jsonl(metrics, {**row, "restored_from_checkpoint": True})
        if self.rank == 0:
            append_jsonl(
                self.out_dir / "metrics.jsonl",
                {
                    "type": "data",
                    "train_images": len(self.records),
                    "unreadable_images": len(self.unreadable),
                    "unreadable_examples": self.unreadable[:10],
                    "resumed_after_epoch": self.epoch if resume else None,
                    **({"world_size": self.world} if self.world > 1 else {}),
                },
            )
        rows = []
        if self.pretrain_trials > 0 and self.epoch == 0:
            summary = self.pretrain()
            if self.rank == 0:
                append_jsonl(self.out_dir / "metrics.jsonl", summary)
        while not self.schedule.done(self.epoch):
            epoch = self.epoch + 1
            row = self.train_epoch(epoch)
            self._check_finite(epoch, row, ckpt_path)
            if self.schedule.end_epoch(epoch, row["loss"]):
                for group in self.optimizer.param_groups:
                    group["lr"] *= 0.1
                row["lr_decayed"] = True
            row["final_epochs"] = self.schedule.final_epochs
            self.epoch = epoch
            if self._switch_augmentation(row["acc"]):
                row["augmentation_starts"] = True
            ddp.broadcast_buffers(self.model, self.matcher)  # BN statistics of rank 0 everywhere
            if self.rank == 0:  # the checkpoint carries its epoch's row, so a kill in between loses nothing
                save_checkpoint({**self.state_dict(), "metrics_row": row}, ckpt_path)
                append_jsonl(metrics, row)
            ddp.barrier()  # the checkpoint of this epoch exists before any rank goes on
            rows.append(row)
            if self.progress:
                print(
                    f"epoch {epoch}/{self.schedule.final_epochs}: loss {row['loss']:.4f} acc {row['acc']:.3f} "
                    f"lr {row['lr'][0]:.2g} {row['images_per_s']:.0f} img/s"
                    + (" (lr decayed x0.1)" if row.get("lr_decayed") else "")
                )
            if row["bad_images"] and self.progress:
                print(f"epoch {epoch}: skipped {row['bad_images']} unreadable images (use --strict to stop instead)")
            if on_epoch_end is not None:
                on_epoch_end(epoch)
        return rows

    def _check_finite(self, epoch: int, row: dict, ckpt_path: Path) -> None:
        """Stop, naming the likely cause, when the epoch's loss or any parameter is not finite; the checkpoint
        of the last good epoch stays as it is."""
        named = [*self.model.named_parameters(), *self.criterion.named_parameters()]
        bad = [n for n, p in named if not torch.isfinite(p.detach()).all()]
        if math.isfinite(row["loss"]) and not bad:
            return
        what = f"parameters became non-finite ({', '.join(bad[:3])})" if bad else "the average loss is not finite"
        kept = f"{ckpt_path} still holds epoch {self.epoch}" if self.epoch else "no checkpoint was written"
        raise QAConvError(
            f"epoch {epoch}: {what}; the learning rate ({row['lr'][-1]:g}) is likely too high, try a lower --lr; "
            f"{kept}"
        )

    def _switch_augmentation(self, acc: float) -> bool:
        """v1.1/v1.2: augmentation starts after the first epoch whose accuracy exceeds ``augment_after_acc``
        (not after the last epoch)."""
        if self.augment_on or self.augment == "none" or self.augment_after_acc <= 0:
            return False
        if self.schedule.done(self.epoch) or acc <= self.augment_after_acc:
            return False
        self.augment_on = True
        self.dataset.transform = self._transform()
        if self.progress:
            print(f"accuracy {acc:.3f} > {self.augment_after_acc}: augmentation ({self.augment}) from the next epoch")
        return True
