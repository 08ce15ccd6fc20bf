"""SIGKILL at several points of a training run, then ``--resume``: the result equals the uninterrupted run of
the same seed, bitwise (weights, every epoch's metrics row, nothing left behind), for one process and for
2 gloo processes under torchrun. The kills come from tests/_faulty_qaconv.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qaconv

FAULTY = str(Path(__file__).with_name("_faulty_qaconv.py"))
# defaults otherwise: train-mode backbone BN from random init, augmentation, 3 epochs with a decay at 2
ARGS = ["--arch", "resnet18", "--ibn", "none", "--pretrained", "none", "--height", "64", "--width", "32", "--neck",
        "16", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--max-epochs", "3", "--step-factor", "2",
        "--lr", "0.02", "--margin", "2", "--testsets", ""]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(qaconv.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def _start(tiny_domain, out: Path, world: int, fault: str = "none", *extra, fault_rank: int = 0):
    launcher = TORCHRUN if world > 1 else [sys.executable]
    argv = [*launcher, FAULTY, fault, "train", "-o", str(out), "--dataset", str(tiny_domain), "--data-dir",
            str(tiny_domain.parent), *ARGS, *extra]  # fmt: skip
    log = open(out.parent / f"{out.name}.{fault.replace(':', '_')}{'.resume' if extra else ''}.log", "w")
    return subprocess.Popen(argv, env=_env(QACONV_FAULT_RANK=str(fault_rank)), stdout=log, stderr=log)


def _run(tiny_domain, out, world, fault="none", *extra, fault_rank=0) -> int:
    return _start(tiny_domain, out, world, fault, *extra, fault_rank=fault_rank).wait(timeout=600)


def _epoch_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    keep = ("epoch", "loss", "acc", "lr", "batches", "skipped_batches", "lr_decayed", "final_epochs")
    return [{k: r.get(k) for k in keep} for r in rows if r["type"] == "epoch"]


def _assert_same_run(a: Path, b: Path) -> None:
    sa = torch.load(a / "checkpoint.pt", weights_only=True)
    sb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert sa["epoch"] == sb["epoch"] == 3
    for part in ("model", "matcher", "criterion"):
        assert sa[part].keys() == sb[part].keys()
        for name, value in sa[part].items():
            assert torch.equal(value, sb[part][name]), (part, name)
    assert _epoch_rows(a) == _epoch_rows(b)  # every epoch once, with the uninterrupted run's numbers
    assert not list(b.glob("*.tmp"))


@pytest.fixture(scope="module")
def straight(tiny_domain, tmp_path_factory):
    """The uninterrupted runs, one process and two."""
    root = tmp_path_factory.mktemp("straight")
    runs = {}
    for world in (1, 2):
        runs[world] = root / f"world{world}"
        assert _run(tiny_domain, runs[world], world) == 0, (root / f"world{world}.none.log").read_text()[-3000:]
    return runs


FAULTS = [
    pytest.param("step:2:1", id="inside-an-epoch"),
    pytest.param("ckpt:2", id="during-the-checkpoint-write"),
    pytest.param("metrics:2", id="between-checkpoint-and-metrics"),
]


@pytest.mark.parametrize("world", [1, 2], ids=["1-process", "2-process"])
@pytest.mark.parametrize("fault", FAULTS)
def test_sigkill_then_resume_equals_the_uninterrupted_run(straight, tiny_domain, tmp_path, fault, world):
    out = tmp_path / "run"
    fault_rank = 1 if world == 2 and fault.startswith("step") else 0  # rank 0 alone writes files
    assert _run(tiny_domain, out, world, fault, fault_rank=fault_rank) != 0  # it was killed
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert saved == (2 if fault.startswith("metrics") else 1)
    if fault.startswith("ckpt"):
        assert list(out.glob("checkpoint.pt.*.tmp"))  # the half-written file is there
    assert _run(tiny_domain, out, world, "none", "--resume") == 0, (tmp_path / "run.none.resume.log").read_text()
    _assert_same_run(straight[world], out)


def test_sigkill_of_rank1_from_outside_after_epoch_1_then_resume_is_exact(straight, tiny_domain, tmp_path):
    """The hostile test's case: 2 processes under torchrun, rank 1 killed by another process once epoch 1's
    metrics row is written, then --resume."""
    out = tmp_path / "killed"
    killed = _start(tiny_domain, out, 2)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and '"epoch": 1' in metrics.read_text()):
        assert killed.poll() is None and time.time() < deadline
        time.sleep(0.1)
    rank1 = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"LOCAL_RANK=1" in environ and str(out).encode() in cmdline:
            rank1.append(int(pid))
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    assert killed.wait(timeout=300) != 0
    assert _run(tiny_domain, out, 2, "none", "--resume") == 0
    _assert_same_run(straight[2], out)
