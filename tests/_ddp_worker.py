"""One rank of the 2-process gloo run used by tests/test_distributed.py (started like torchrun would).

``python _ddp_worker.py DATA_ROOT OUT_DIR`` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set.
It (1) takes three training steps on its slices of fixed global batches and saves gradients and weights, (2) trains one
epoch and is interrupted, (3) resumes from rank 0's checkpoint, trains the 2nd epoch and evaluates with
re-ranking and saved scores, then saves its final weights. The test compares all of it with one process.
"""

import json
import sys
from pathlib import Path

import torch

from qaconv.data.market import load_market_layout
from qaconv.engine.runner import DEFAULTS, build_criterion, build_model, train
from qaconv.engine.trainer import Trainer


def make_cfg(root: Path, out_dir: Path, **kw) -> dict:
    cfg = {
        **DEFAULTS,
        "dataset": str(root),
        "testsets": "",
        "data_dir": str(root.parent),
        "out_dir": str(out_dir),
        "arch": "resnet18",
        "ibn": None,
        "pretrained": None,
        "freeze_backbone_bn": True,  # no batch statistics in the backbone: DDP == one process, mathematically
        "height": 64,
        "width": 32,
        "neck": 16,
        "batch_size": 8,
        "num_instance": 2,
        "workers": 0,
        "device": "cpu",
        "max_epochs": 2,
        "step_factor": 10,
        "lr": 0.02,
        "margin": 2.0,
        "augment": False,
        "fea_batch": 16,
        "match_memory": 1,
    }
    cfg.update(kw)
    return cfg


def fixed_steps(root: Path, out_dir: Path, indices_of, steps: int = 2, loss: str = "triplet") -> dict:
    """``steps`` un-clipped training steps, step i on ``indices_of(global batch i)`` (8 images: 2 of each of 4
    identities); returns the gradients of the last step, the final parameters and the criterion's buffers.

    Two steps, not more: in this random-init ResNet with frozen (identity) BN many activations are exactly 0,
    so units whose input is all zeros sit at pre-activation = their BN bias, which is ~0 after a few steps;
    from the 3rd step on, rounding-level differences flip such ReLUs and the early-layer gradients of one
    process and of two differ by ~1 % (measured), with the loss equal to 1e-7."""
    cfg = make_cfg(root, out_dir, loss=loss)
    data = load_market_layout(cfg["dataset"])
    torch.manual_seed(0)
    model, matcher = build_model(cfg, load_weights=False)
    criterion = build_criterion(cfg, model, matcher, data.num_train_pids)
    trainer = Trainer(
        model, matcher, criterion, data.train, out_dir, height=64, width=32, batch_size=8, clip=0.0, lr=1e-3,
        augment=False, device="cpu", progress=False,
    )
    pids = [r.pid for r in data.train]
    ids = sorted(set(pids))
    for chosen in ([0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6])[:steps]:
        batch = [i for c in chosen for i in [j for j, q in enumerate(pids) if q == ids[c]][:2]]
        items = [trainer.dataset[i] for i in indices_of(batch)]
        images = torch.stack([it[0] for it in items]).contiguous(memory_format=torch.channels_last)
        trainer._set_train_mode()
        trainer._step(images, torch.tensor([it[1] for it in items]))
    named = [*model.named_parameters(), *(("criterion." + n, p) for n, p in criterion.named_parameters())]
    return {
        "grads": {n: p.grad.clone() for n, p in named},
        "params": {n: p.detach().clone() for n, p in named},
        "buffers": {n: b.clone() for n, b in criterion.named_buffers()},
    }


class Interrupt(Exception):
    pass


def main(root: Path, out: Path) -> None:
    from qaconv.engine import distributed as ddp

    torch.set_num_threads(1)
    assert ddp.init_from_env("cpu") and ddp.world_size() == 2
    rank = ddp.rank()
    for loss in ("triplet", "memory"):
        steps = fixed_steps(root, out / "steps", lambda b: ddp.split_batch(b, rank, 2, group=2), loss=loss)
        torch.save(steps, out / f"steps_{loss}_rank{rank}.pt")

    cfg = make_cfg(root, out / "run")

    def stop_after_first(epoch):
        if epoch == 1:
            raise Interrupt

    try:
        train(cfg, progress=False, on_epoch_end=stop_after_first)
    except Interrupt:
        pass
    evaluate_opts = {"testsets": root.name, "rerank": True, "save_scores": True}  # synth_A under data_dir
    run = train({**cfg, **evaluate_opts}, resume=True, progress=True)
    state = {"model": run["model"].state_dict(), "matcher": run["matcher"].state_dict()}
    torch.save(state, out / f"final_rank{rank}.pt")
    results = {k: v.to_dict() for k, v in run["results"].items()}
    (out / f"results_rank{rank}.json").write_text(json.dumps(results))
    # the same two epochs without the interruption: resuming under torchrun must give the very same weights
    straight = train(make_cfg(root, out / "straight"), progress=False)
    torch.save({"model": straight["model"].state_dict(), "matcher": straight["matcher"].state_dict()},
               out / f"straight_rank{rank}.pt")

    # two-stage evaluation: each rank re-scores its share of the queries, the rows are gathered
    from qaconv.data.registry import load_dataset
    from qaconv.engine.evaluator import evaluate_dataset
    from qaconv.engine.runner import load_trained

    model, matcher, ts_cfg = load_trained(out / "run" / "checkpoint.pt", device="cpu")
    ts_cfg.update(two_stage=3, save_scores=True, rerank=False, tlift=False)
    data = load_dataset(root.name, root.parent, progress=False)
    rows, _ = evaluate_dataset(model, matcher, data, ts_cfg, progress=False, out_dir=out / "two_stage")
    (out / f"two_stage_rank{rank}.json").write_text(json.dumps({k: v.to_dict() for k, v in rows.items()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
