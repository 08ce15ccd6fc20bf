"""Progress output (qaconv.progress): tqdm bars on a terminal only; in a log, plain lines at most every few
seconds plus a final one; nothing with --quiet or TQDM_DISABLE=1; indexing counted in images."""

import io
import os
import re
import subprocess
import sys

import pytest

from qaconv import progress
from qaconv.progress import Lines, progress_bar


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("QACONV_PROGRESS_INTERVAL", raising=False)
    yield
    progress.set_quiet(False)


def test_plain_lines_at_most_every_interval_and_a_final_line():
    out, clock = io.StringIO(), Clock()
    bar = Lines(total=4000, desc="indexing", unit="img", stream=out, interval=5.0, clock=clock)
    for _ in range(40):  # 100 images every 0.25 s: 10 s in all
        clock.now += 0.25
        bar.update(100)
    clock.now = 10.0
    bar.close()
    bar.close()  # twice: one final line
    lines = out.getvalue().splitlines()
    # 100 images every 0.25 s: a line at t = 5 s and at t = 10 s, then the final one
    assert lines == [
        "indexing: 2000/4000 images (50.0%), 400 images/s, 5.0 s left",
        "indexing: 4000/4000 images (100.0%), 400 images/s",
        "indexing: 4000/4000 images, 400 images/s, done in 10 s",
    ]
    assert "\r" not in out.getvalue()


def test_line_format_hand_computed():
    clock = Clock()
    bar = Lines(total=6088, desc="index", unit="img", stream=None, clock=clock)
    bar.n, clock.now = 1200, 7.5
    assert bar.line(7.5) == "index: 1200/6088 images (19.7%), 160 images/s, 31 s left"  # 4888 / 160
    bar.n = 3
    assert bar.line(2.0) == "index: 3/6088 images (0.0%), 1.5 images/s, 1 h 07 min left"
    bar.total = None
    bar.set_postfix(loss="0.123", acc="0.50")
    assert bar.line(4.0, final=True) == "index: 3 images, 0.75 images/s, done in 4.0 s, loss=0.123, acc=0.50"


def test_iteration_counts_and_closes():
    out, clock = io.StringIO(), Clock()
    seen = []
    for x in Lines(range(7), total=7, desc="matching", unit="blocks", stream=out, interval=5.0, clock=clock):
        seen.append(x)
        clock.now += 1.0
    assert seen == list(range(7))
    assert out.getvalue().splitlines() == [
        "matching: 5/7 blocks (71.4%), 1.0 blocks/s, 2.0 s left",
        "matching: 7/7 blocks, 1.0 blocks/s, done in 7.0 s",
    ]


def test_transient_bar_is_silent_unless_it_printed():
    out, clock = io.StringIO(), Clock()
    with Lines(total=3, desc="features", stream=out, leave=False, clock=clock) as bar:
        bar.update(3)
    assert out.getvalue() == ""  # a short inner step leaves nothing in the log
    bar = Lines(total=3, desc="features", stream=out, leave=False, clock=clock, interval=1.0)
    clock.now = 2.0
    bar.update(1)
    bar.close()
    assert len(out.getvalue().splitlines()) == 2  # it ran long enough to report: its end is reported too


def test_terminal_gets_tqdm_log_gets_lines(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress_bar(range(3), desc="x")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress_bar(range(3), desc="x")
    assert isinstance(bar, Lines) and bar.stream is sys.stderr and bar.total == 3
    assert list(bar) == [0, 1, 2]
    lines = sys.stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("x: 3/3 steps, ") and "done in" in lines[0]
    assert "\r" not in sys.stderr.getvalue()


@pytest.mark.parametrize("how", ["quiet", "TQDM_DISABLE", "disable"])
@pytest.mark.parametrize("stream", [Terminal, io.StringIO])
def test_switched_off_prints_nothing(how, stream, monkeypatch):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    if how == "quiet":
        progress.set_quiet(True)
    elif how == "TQDM_DISABLE":
        monkeypatch.setenv("TQDM_DISABLE", "1")
    bar = progress_bar(range(5), desc="x", disable=how == "disable")
    assert list(bar) == list(range(5))
    bar = progress_bar(total=5, desc="y", disable=how == "disable")
    bar.update(5)
    bar.set_postfix(loss=1)
    bar.close()
    assert err.getvalue() == ""


@pytest.mark.parametrize("value,off", [("1", True), ("true", True), ("0", False), ("", False), ("no", False)])
def test_tqdm_disable_values(value, off, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", value)
    assert progress.disabled() is off


@pytest.mark.parametrize("value,seconds", [("0.5", 0.5), ("0", 0.0), ("x", 5.0), ("-1", 5.0), ("inf", 5.0)])
def test_interval_from_environment(value, seconds, monkeypatch):
    monkeypatch.setenv("QACONV_PROGRESS_INTERVAL", value)
    assert progress.interval() == seconds


def test_quiet_resets_after_main():
    from qaconv.cli import main

    with pytest.raises(SystemExit):
        main(["--quiet", "synth", "--help"])
    assert not progress.disabled()
    assert main(["--quiet", "data", "info", "/nonexistent/x.csv"]) == 1
    assert not progress.disabled()


# ---------------------------------------------------------------- the command line, stderr to a pipe

PROGRESS = re.compile(r"^indexing: (\d+)/(\d+) images")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import torch

    from qaconv.engine.checkpoint import save_checkpoint
    from qaconv.engine.runner import DEFAULTS, build_model

    run = tmp_path_factory.mktemp("progress") / "run"
    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": 32, "width": 16, "neck": 8}
    torch.manual_seed(0)
    model, matcher = build_model(cfg, load_weights=False)
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()},
                    run / "checkpoint.pt")
    return run


def _index(tmp_path, tiny_domain, tiny_run, *extra, env=None):
    gallery = tiny_domain / "bounding_box_test"
    argv = [sys.executable, "-m", "qaconv", *extra[:1], "index", str(gallery), "--checkpoint", str(tiny_run),
            "-o", str(tmp_path / "g.store"), "--overwrite", "--device", "cpu", "-b", "8", "-j", "1", *extra[1:]]
    env = {**{k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "QACONV_PROGRESS_INTERVAL")},
           **(env or {})}
    proc = subprocess.run([a for a in argv if a], capture_output=True, timeout=300, env=env)  # bytes: text=True
    err = proc.stderr.decode()  # would turn every carriage return into a newline
    assert proc.returncode == 0, err
    return err, len(list(gallery.iterdir()))


def test_index_to_a_pipe_writes_plain_lines_counted_in_images(tmp_path, tiny_domain, tiny_run):
    err, n = _index(tmp_path, tiny_domain, tiny_run)
    lines = [s for s in err.splitlines() if PROGRESS.match(s)]
    assert "\r" not in err
    assert 1 <= len(lines) <= 3  # a short run: the final line (5 s apart at most otherwise)
    assert lines[-1].startswith(f"indexing: {n}/{n} images, ") and "done in" in lines[-1]
    # every update reported (interval 0): counts in images, per batch of 8, never batches
    err, n = _index(tmp_path, tiny_domain, tiny_run, env={"QACONV_PROGRESS_INTERVAL": "0"})
    counts = [int(PROGRESS.match(s)[1]) for s in err.splitlines() if PROGRESS.match(s)]
    assert "\r" not in err
    assert counts == [*range(8, n, 8), n, n], counts


@pytest.mark.parametrize("how", [("--quiet",), ("", "-q"), ("TQDM_DISABLE",)])
def test_index_quiet_or_tqdm_disable_prints_no_progress(how, tmp_path, tiny_domain, tiny_run):
    env = {"QACONV_PROGRESS_INTERVAL": "0"}
    if how == ("TQDM_DISABLE",):
        how, env = (), {**env, "TQDM_DISABLE": "1"}
    err, _ = _index(tmp_path, tiny_domain, tiny_run, *how, env=env)
    assert "indexing" not in err and "\r" not in err
