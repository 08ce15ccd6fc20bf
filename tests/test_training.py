"""Training: the loss goes down, and an interrupted run resumes to the very same state."""

import copy
import json

import pytest
import torch

from qaconv.data.images import ImageDataset
from qaconv.data.market import load_market_layout
from qaconv.data.transforms import eval_transform
from qaconv.engine.runner import DEFAULTS, build_criterion, build_model, train


def _cfg(tiny_domain, out_dir, **kw):
    cfg = {
        **DEFAULTS,
        "dataset": str(tiny_domain),
        "testsets": "",
        "data_dir": str(tiny_domain.parent),
        "out_dir": str(out_dir),
        "arch": "resnet18",
        "ibn": None,
        "pretrained": None,
        "height": 64,
        "width": 32,
        "neck": 32,
        "batch_size": 8,
        "num_instance": 2,
        "workers": 0,
        "device": "cpu",
        "max_epochs": 2,
        "step_factor": 0.7,
        "lr": 0.02,
        "margin": 2.0,
        "fea_batch": 16,
        "match_memory": 1,
    }
    cfg.update(kw)
    return cfg


def _fixed_batch_loss(cfg, model, matcher):
    """The training criterion on all training images at once, in training mode (batch statistics) on
    copies, so running BN statistics neither confound the comparison nor change."""
    model, matcher = copy.deepcopy(model).train(), copy.deepcopy(matcher).train()
    data = load_market_layout(cfg["dataset"])
    ds = ImageDataset(data.train, eval_transform(cfg["height"], cfg["width"]))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    targets = torch.tensor([r.pid for r in data.train])
    criterion = build_criterion(cfg, model, matcher, data.num_train_pids)
    with torch.no_grad():
        loss, _ = criterion(model(images), targets)
    return loss[torch.isfinite(loss)].mean().item()


@pytest.mark.parametrize(
    "loss,sampler,matcher",
    [("triplet", "graph", "qaconv"), ("pairwise", "pk", "qaconv"), ("triplet", "graph", "pooled")],
)
def test_training_reduces_loss(tiny_domain, tmp_path, loss, sampler, matcher):
    cfg = _cfg(
        tiny_domain,
        tmp_path / "run",
        loss=loss,
        sampler=sampler,
        matcher=matcher,
        max_epochs=3,
        step_factor=10,
        augment=False,
    )
    torch.manual_seed(0)
    model, head = build_model(cfg)
    before = _fixed_batch_loss(cfg, model, head)
    run = train(cfg, progress=False)
    after = _fixed_batch_loss(cfg, run["model"], run["matcher"])
    assert after < before
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows if r["type"] == "epoch"] == [1, 2, 3]


def test_class_memory_training_runs_and_logs(tiny_domain, tmp_path):
    cfg = _cfg(tiny_domain, tmp_path / "run", loss="memory", sampler="pk", max_epochs=4, step_factor=10, augment=False)
    run = train(cfg, progress=False)
    losses = [r["loss"] for r in run["epochs"]]
    # epoch 1 starts from an empty memory (few valid classes, so a low loss): compare from epoch 2 on
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[1]


class _Interrupt(Exception):
    pass


def test_resume_after_interrupt_equals_uninterrupted(tiny_domain, tmp_path):
    straight = train(_cfg(tiny_domain, tmp_path / "a", max_epochs=3, step_factor=2), progress=False)

    def stop_after_first(epoch):
        if epoch == 1:
            raise _Interrupt

    cfg = _cfg(tiny_domain, tmp_path / "b", max_epochs=3, step_factor=2)
    with pytest.raises(_Interrupt):
        train(cfg, progress=False, on_epoch_end=stop_after_first)
    resumed = train(cfg, resume=True, progress=False)
    for a, b in zip(straight["model"].state_dict().values(), resumed["model"].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(straight["matcher"].state_dict().values(), resumed["matcher"].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the LR decay after epoch 2 is applied once, also across the resume
    lrs = [r["lr"] for r in resumed["epochs"]]
    assert lrs[-1][-1] == pytest.approx(cfg["lr"] * 0.1)
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows if r["type"] == "epoch"] == [1, 2, 3]


def _copy_with_broken_image(tiny_domain, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tiny_domain, root)
    victim = sorted((root / "bounding_box_train").iterdir())[3]
    victim.write_bytes(b"")  # a zero-byte file
    return root, victim


def test_unreadable_training_images_are_skipped_and_logged(tiny_domain, tmp_path):
    root, victim = _copy_with_broken_image(tiny_domain, tmp_path)
    cfg = _cfg(tiny_domain, tmp_path / "run", dataset=str(root), max_epochs=1, augment=False)
    run = train(cfg, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    data_row = next(r for r in rows if r["type"] == "data")
    assert data_row["unreadable_images"] == 1 and data_row["unreadable_examples"] == [str(victim)]
    assert data_row["train_images"] == len(list((root / "bounding_box_train").iterdir())) - 1
    assert len(run["epochs"]) == 1


def test_strict_stops_at_unreadable_training_images(tiny_domain, tmp_path):
    from qaconv.errors import QAConvError

    root, victim = _copy_with_broken_image(tiny_domain, tmp_path)
    cfg = _cfg(tiny_domain, tmp_path / "run", dataset=str(root), max_epochs=1, strict=True)
    with pytest.raises(QAConvError, match=f"1 unreadable training image.*{victim.name}.*--strict"):
        train(cfg, progress=False)


def test_kill_between_checkpoint_and_metrics_row_loses_no_row(tiny_domain, tmp_path, monkeypatch):
    from qaconv.engine import trainer as trainer_module

    cfg = _cfg(tiny_domain, tmp_path / "run", max_epochs=2, step_factor=10)
    real = trainer_module.append_jsonl

    def killed_after_checkpoint(path, row):
        if row.get("type") == "epoch" and row["epoch"] == 1:
            raise _Interrupt  # the checkpoint of epoch 1 is on disk, its metrics row is not
        real(path, row)

    monkeypatch.setattr(trainer_module, "append_jsonl", killed_after_checkpoint)
    with pytest.raises(_Interrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(trainer_module, "append_jsonl", real)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    (tmp_path / "run" / "checkpoint.pt.k1ll3d.tmp").write_bytes(b"x" * 1000)  # a kill during a checkpoint write
    train(cfg, resume=True, progress=False)
    assert not list((tmp_path / "run").glob("*.tmp"))  # cleaned up at the start
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[0].get("restored_from_checkpoint")


def test_non_finite_parameters_stop_the_run_and_keep_the_last_good_checkpoint(tiny_domain, tmp_path, monkeypatch):
    from qaconv.engine.trainer import Trainer
    from qaconv.errors import QAConvError

    real = Trainer.train_epoch

    def diverging(self, epoch):
        row = real(self, epoch)
        if epoch == 2:
            with torch.no_grad():
                self.model.neck.weight.fill_(float("nan"))
            row["loss"] = float("nan")
        return row

    monkeypatch.setattr(Trainer, "train_epoch", diverging)
    cfg = _cfg(tiny_domain, tmp_path / "run", max_epochs=3, step_factor=10)
    with pytest.raises(QAConvError, match=r"epoch 2: parameters became non-finite \(neck.weight\).*--lr.*epoch 1"):
        train(cfg, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    floats = [v for v in state["model"].values() if v.is_floating_point()]
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in floats)
    for line in open(tmp_path / "run" / "metrics.jsonl"):
        json.loads(line)  # every line valid JSON
