"""The command line as a terminal user meets it: --version, --help without importing torch (fast), "did you mean"
for a mistyped command, choice or option, and --quiet before or after the command."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qaconv
from qaconv.cli import build_parser, main

HEAVY = ("torch", "torchvision", "lancedb", "matplotlib", "scipy", "pyarrow", "PIL", "numba", "pandas", "fastapi",
         "uvicorn", "sklearn", "onnx", "onnxruntime", "faiss")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_version():
    proc = subprocess.run([sys.executable, "-m", "qaconv", "--version"], capture_output=True, text=True, timeout=120)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)[1]
    assert proc.returncode == 0 and proc.stdout == f"qaconv {version}\n" and proc.stderr == ""
    assert qaconv.__version__ == version


def test_help_imports_nothing_heavy():
    """Building the parser and answering --help (top level, every command, data info) and argument errors
    import none of torch, lancedb, matplotlib, ...: what makes 'qaconv --help' take seconds."""
    code = f"""
import json, sys
from qaconv.cli import build_parser, main
commands = list(build_parser()._subparsers._group_actions[0].choices)
runs = [["--help"], ["--version"], *[[c, "--help"] for c in commands], ["data", "info", "--help"], ["serach"],
        ["search", "--topp", "3"], ["train", "--lr", "-1"]]
codes = []
for argv in runs:
    try:
        main(argv)
    except SystemExit as exc:
        codes.append(exc.code)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(json.dumps({{"commands": commands, "codes": codes, "heavy": heavy}}))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"train", "evaluate", "index", "search", "demo", "data"} <= set(out["commands"])
    assert out["codes"] == [0] * (len(out["commands"]) + 3) + [2, 2, 2]
    assert out["heavy"] == []


def test_importing_the_package_is_light_and_names_still_resolve():
    proc = _python(f"""
import sys, qaconv
light = not any(m.split(".")[0] in {HEAVY!r} for m in sys.modules)
from qaconv import FeatureExtractor, Gallery, QAConvError, evaluate_rank
print(light, FeatureExtractor.__module__, Gallery.__module__, QAConvError.__module__, "torch" in sys.modules,
      sorted(qaconv.__all__) == sorted(n for n in qaconv.__all__ if hasattr(qaconv, n)))
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "qaconv.extractor", "qaconv.gallery.api", "qaconv.errors", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        qaconv.nonsense  # noqa: B018


@pytest.mark.parametrize(
    "argv,line",
    [
        (["serach"], "qaconv: error: argument command: invalid choice: 'serach'; did you mean 'search'?"),
        (["serach", "--topp", "3"], "did you mean 'search'?"),
        (["search", "--topp", "3"], "qaconv search: error: unrecognized option --topp; did you mean --top?"),
        (["search", "q.jpg", "--index", "i", "--checkpoint", "c", "--topp", "3"],
         "qaconv search: error: unrecognized option --topp; did you mean --top?"),
        (["search", "q.jpg", "--index", "i", "--checkpoint", "c", "--topp=3"], "did you mean --top?"),
        (["search", "q.jpg", "--index", "i", "--checkpoint", "c", "-top", "3"], "option -top; did you mean --top?"),
        (["index", "g", "--checkpont", "c"], "qaconv index: error: unrecognized option --checkpont; did you mean "
                                             "--checkpoint?"),
        (["--quite", "search"], "qaconv: error: unrecognized option --quite; did you mean --quiet?"),
        (["--quite", "search", "q.jpg", "--index", "i", "--checkpoint", "c"], "did you mean --quiet?"),
        (["train", "--arch", "resnet5"], "argument -a/--arch: invalid choice: 'resnet5'; did you mean 'resnet50'?"),
        (["data", "inof", "x"], "qaconv data: error: argument data_command: invalid choice: 'inof'; did you mean "
                                "'info'?"),
        (["data", "info", "x", "--jsn"], "qaconv data info: error: unrecognized option --jsn; did you mean --json?"),
    ],
)
def test_did_you_mean(argv, line, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and line in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["frobnicate"], "invalid choice: 'frobnicate' (choose from "),  # nothing close: the list
        (["train", "--arch", "resnet7"], "invalid choice: 'resnet7' (choose from"),  # resnet18/34/50 tie: no guess
        (["search", "q.jpg", "--index", "i", "--checkpoint", "c", "--zzzzzz"], "unrecognized arguments: --zzzzzz"),
        (["search", "q.jpg", "--index", "i", "--checkpoint", "c", "--alpha", "-1"], "--alpha: must be >= 0"),
        (["search", "q.jpg", "--index", "i", "--checkpoint", "c", "--tau", "-1e9"], "--tau: expected one argument"),
        (["search", "q.jpg"], "the following arguments are required: --index, --checkpoint"),
    ],
)
def test_no_guess_when_nothing_is_close(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err and "did you mean" not in err, err


def test_abbreviations_still_work():
    args = build_parser().parse_args(["search", "q.jpg", "--index", "i", "--checkpoint", "c", "--to", "3",
                                      "--exclude-same"])
    assert args.top == 3 and args.exclude_same_camera


@pytest.mark.parametrize(
    "argv,quiet",
    [
        (["synth", "--out", "x"], False),
        (["--quiet", "synth", "--out", "x"], True),
        (["-q", "synth", "--out", "x"], True),
        (["synth", "--out", "x", "--quiet"], True),
        (["synth", "-q", "--out", "x"], True),
        (["data", "info", "x", "-q"], True),
        (["data", "info", "x"], False),
    ],
)
def test_quiet_before_or_after_the_command(argv, quiet):
    assert build_parser().parse_args(argv).quiet is quiet


def test_help_lists_version_and_quiet(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--version" in out and "-q, --quiet" in out
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    assert "-q, --quiet" in capsys.readouterr().out
