"""A real full disk (a 4 KiB tmpfs) and a read-only one (skipped where mounting is not permitted): every
command that writes stops with one line naming the path and the reason, prints its metrics first, and keeps
the last good checkpoint. A full disk often raises with no file name (from a flush or close), so the path must come
from qaconv, not from the OSError."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qaconv.cli import main

NO_SPACE = "No space left on device"
TINY = ["--arch", "resnet18", "--ibn", "none", "--pretrained", "none", "--height", "64", "--width", "32", "--neck",
        "16", "--batch-size", "8", "--num-instance", "2"]  # fmt: skip


def _mount(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if res.returncode != 0 or not shutil.which("umount"):
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip() or 'no umount'})")


DISKS = {"full": ("size=4k", NO_SPACE), "read-only": ("ro", "Read-only file system")}


@pytest.fixture(params=list(DISKS))
def full(request, tmp_path):
    """A folder on a 4 KiB file system (nothing bigger than a few bytes fits), or on a read-only one (as
    root, permission bits would not stop a write); returns it and the reason the error must give."""
    folder = tmp_path / "full"
    options, reason = DISKS[request.param]
    _mount(folder, options)
    yield folder, reason
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="module")
def run(tiny_domain, tmp_path_factory):
    """A one-epoch tiny run and an index of the test gallery, written to a normal disk."""
    out = tmp_path_factory.mktemp("full_disk_run")
    common = ["--data-dir", str(tiny_domain.parent), "--workers", "0", "--device", "cpu"]
    assert main(["train", "--dataset", "synth_A", "--testsets", "", "-o", str(out / "run"), *TINY, "--max-epochs",
                 "1", *common]) == 0  # fmt: skip
    assert main(["index", str(tiny_domain / "bounding_box_test"), "--checkpoint", str(out / "run"), "-o",
                 str(out / "gallery.npz"), "--device", "cpu"]) == 0  # fmt: skip
    return out


def _one_line(capsys, code, path: Path, reason: str = NO_SPACE) -> str:
    captured = capsys.readouterr()
    err = [line for line in captured.err.replace("\r", "\n").splitlines() if "error" in line]  # not progress bars
    assert code == 1, captured.err
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    assert str(path) in err[0], err[0]
    assert reason in err[0], err[0]
    return captured.out


def _commands(tiny_domain, run, full):
    query = str(sorted((tiny_domain / "query").iterdir())[0])
    common = ["--data-dir", str(tiny_domain.parent), "--workers", "0", "--device", "cpu"]
    ckpt = ["--checkpoint", str(run / "run")]
    return {
        "train": (["train", "--dataset", "synth_A", "--testsets", "", "-o", str(full / "run"), *TINY,
                   "--max-epochs", "1", *common], full / "run"),  # fmt: skip
        "evaluate --save-scores": (["evaluate", *ckpt, "--testsets", "synth_A", "--save-scores", "-o",
                                    str(full / "out"), *common], full / "out"),  # fmt: skip
        "evaluate --report": (["evaluate", *ckpt, "--testsets", "synth_A", "--report", str(full / "rep"),
                               "--report-queries", "1", *common], full / "rep"),  # fmt: skip
        "index": (["index", str(tiny_domain / "bounding_box_test"), *ckpt, "-o", str(full / "g.npz"), "--device",
                   "cpu"], full / "g.npz"),  # fmt: skip
        "search --html": (["search", query, "--index", str(run / "gallery.npz"), *ckpt, "--html",
                           str(full / "s.html"), "--device", "cpu"], full),  # fmt: skip
        "match": (["match", query, query, *ckpt, "-o", str(full / "m.png"), "--device", "cpu"], full / "m.png"),
        "synth": (["synth", "--domain", "A", "--out", str(full / "syn"), "--train-ids", "4", "--test-ids", "4"],
                  full / "syn"),  # fmt: skip
        "export": (["export", *ckpt, "--onnx", str(full / "m.onnx"), "--no-check"], full / "m.onnx"),
    }


COMMANDS = ["train", "evaluate --save-scores", "evaluate --report", "index", "search --html", "match", "synth",
            "export"]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_or_read_only_disk_gets_one_line_naming_the_path(command, tiny_domain, run, full, capsys):
    full, reason = full
    argv, path = _commands(tiny_domain, run, full)[command]
    capsys.readouterr()
    out = _one_line(capsys, main(argv), path, reason)
    if command.startswith("evaluate") and reason == NO_SPACE:  # a read-only folder is found before any work
        assert "rank-1" in out and "synth_A" in out  # the metrics table came first
    assert not list(full.rglob("*.tmp"))  # no temporary file left behind


def test_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tiny_domain, run, tmp_path, capsys):
    """Room for one checkpoint and a half: epoch 1's is written, epoch 2's (a temporary file beside it) is not."""
    import os

    size = (run / "run" / "checkpoint.pt").stat().st_size
    disk = tmp_path / "disk"
    _mount(disk, f"size={3 * size // 1024 + 1024}k")
    try:
        stat = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - int(1.5 * size)))
        out = disk / "run"
        common = ["--data-dir", str(tiny_domain.parent), "--workers", "0", "--device", "cpu"]
        capsys.readouterr()
        code = main(["train", "--dataset", "synth_A", "--testsets", "", "-o", str(out), *TINY, "--max-epochs", "2",
                     "--step-factor", "10", *common])  # fmt: skip
        _one_line(capsys, code, out / "checkpoint.pt")
        state = torch.load(out / "checkpoint.pt", weights_only=True)  # the last good checkpoint, whole
        assert state["epoch"] == 1
        assert not list(out.glob("*.tmp"))
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]  # never a half-written line
        assert [r["epoch"] for r in rows if r["type"] == "epoch"] == [1]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
