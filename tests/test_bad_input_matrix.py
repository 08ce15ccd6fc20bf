"""The bad-input matrix of the hostile test (issue 11), as one table: each row is a command line that must fail
with exit status 1 or 2 and one clear line on stderr naming what was expected, before any work and without
a traceback. Cases that need a trained model or special files live beside the code they test (test_cli,
test_gallery, test_manifest, test_training, test_eval_bad_images, test_mathtext, test_engine_parts)."""

import os
import pickle

import pytest
import torch

from qaconv.cli import main


@pytest.fixture()
def files(tmp_path, tiny_domain):
    """Paths of hostile files, and the tiny synthetic domain for commands that need a data set."""
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    with open(tmp_path / "pickle.idx", "wb") as f:
        pickle.dump({"format": "qaconv-gallery-1"}, f)
    (tmp_path / "random.idx").write_bytes(os.urandom(4096))
    (tmp_path / "q.jpg").write_bytes(os.urandom(512))
    (tmp_path / "out").mkdir()
    return {"tmp": str(tmp_path), "data": str(tiny_domain.parent), "domain": str(tiny_domain)}


TRAIN = ["train", "--dataset", "{domain}", "--data-dir", "{data}", "-o", "{tmp}/run", "--device", "cpu",
         "--testsets", ""]  # fmt: skip
MATRIX = [
    # numbers: finite and in range, checked before any work
    ([*TRAIN, "--lr", "nan"], 2, "--lr: must be > 0 and finite"),
    ([*TRAIN, "--lr", "inf"], 2, "--lr: must be > 0 and finite"),
    ([*TRAIN, "--lr", "1e6"], 1, "lr must be > 0 and <= 10"),
    ([*TRAIN, "--lr", "-1"], 2, "must be > 0"),
    ([*TRAIN, "--neck", "-5"], 2, "must be >= 0"),
    ([*TRAIN, "--lambda-value", "7"], 1, "lambda_value must be >= 0 and <= 1"),
    ([*TRAIN, "--alpha=-1e9"], 2, "must be >= 0 and finite"),
    ([*TRAIN, "--tau", "nan"], 2, "must be > 0 and finite"),
    ([*TRAIN, "--workers", "-3"], 1, "workers must be >= 0"),
    ([*TRAIN, "--batch-size", "10", "--num-instance", "4"], 1, "must be a multiple of num_instance"),
    ([*TRAIN, "--recipe", "3.0"], 2, "invalid choice"),
    ([*TRAIN, "--augment", "sometimes"], 2, "expected full, flip-occlusion or none"),
    # data sets resolved before training starts
    ([*TRAIN[:-2], "--testsets", "synth_B,no_such_set"], 1, "no_such_set"),
    ([*TRAIN[:-2], "--testsets", "synth_Q"], 1, "unknown synthetic domain 'Q'"),
    (["train", "--dataset", "{tmp}/missing", "-o", "{tmp}/run", "--device", "cpu"], 1, "not found"),
    # devices
    ([*TRAIN, "--device", "tpu"], 1, "available: cpu"),
    # files that are not what they claim
    (["evaluate", "--checkpoint", "{tmp}/random.pt", "--testsets", "synth_A"], 1, "corrupt or not a qaconv checkpoint"),
    (["evaluate", "--checkpoint", "{tmp}/nothing.pt", "--testsets", "synth_A"], 1, "does not exist"),
    (["evaluate", "--checkpoint", "{tmp}/random.pt", "--testsets", ",,"], 1, "no test sets given"),
    (["search", "{tmp}/q.jpg", "--index", "{tmp}/pickle.idx", "--checkpoint", "x"], 1, "corrupt or not a qaconv"),
    (["search", "{tmp}/q.jpg", "--index", "{tmp}/random.idx", "--checkpoint", "x"], 1, "corrupt or not a qaconv"),
    (["index", "{domain}/query", "--checkpoint", "x", "-o", "{tmp}/out"], 1, "is a folder"),
    (["index", "{tmp}/no_folder", "--checkpoint", "x", "-o", "{tmp}/g.idx"], 1, "does not exist"),
    # commands and options
    (["frobnicate"], 2, "invalid choice"),
    (["train", "--arch", "resnet7"], 2, "invalid choice"),
]


@pytest.mark.parametrize("argv,code,needle", MATRIX, ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in MATRIX])
def test_bad_input_gets_one_clear_line(argv, code, needle, files, capsys):
    argv = [a.format(**files) for a in argv]
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    else:
        assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not os.path.exists(os.path.join(files["tmp"], "run", "checkpoint.pt"))  # no work was done


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(files, capsys):
    assert main([a.format(**files) for a in TRAIN[:-4]] + ["--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err


class _Evil:
    """Unpickling this would create the file ``marker``: every loader must refuse it unread."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_files(tmp_path):
    import numpy as np

    marker = tmp_path / "UNPICKLED"
    evil = _Evil(marker)
    (tmp_path / "run").mkdir()
    torch.save({"format": "qaconv-checkpoint-1", "config": {}, "model": evil}, tmp_path / "run" / "checkpoint.pt")
    torch.save({"state_dict": {"x": evil}}, tmp_path / "official.pth.tar")
    torch.save({"conv1.weight": evil}, tmp_path / "backbone.pth")
    with open(tmp_path / "raw.idx", "wb") as f:
        pickle.dump(evil, f)
    np.savez(tmp_path / "objects.npz", format=np.array("qaconv-gallery-1"), paths=np.array([evil], dtype=object))
    return marker


def test_malicious_pickles_are_refused_by_every_command(tmp_path, tiny_domain, capsys):
    """A pickle that would run code, given as a checkpoint, an official checkpoint, backbone weights and an
    index, to every command that loads one: refused with one line, and never unpickled."""
    marker = _evil_files(tmp_path)
    q = str(sorted((tiny_domain / "query").iterdir())[0])
    run, common = str(tmp_path / "run"), ["--device", "cpu"]
    data = ["--data-dir", str(tiny_domain.parent), "--workers", "0"]
    commands = [
        ["evaluate", "--checkpoint", run, "--testsets", "synth_A", *data, *common],
        ["match", q, q, "--checkpoint", run, "-o", str(tmp_path / "m.png"), *common],
        ["index", str(tiny_domain / "query"), "--checkpoint", run, "-o", str(tmp_path / "g.npz"), *common],
        ["search", q, "--index", str(tmp_path / "raw.idx"), "--checkpoint", run, *common],
        ["search", q, "--index", str(tmp_path / "objects.npz"), "--checkpoint", run, *common],
        ["export", "--checkpoint", run, "--onnx", str(tmp_path / "m.onnx")],
        ["convert", str(tmp_path / "official.pth.tar"), "-o", str(tmp_path / "converted")],
        ["train", "--dataset", "synth_A", "-o", run, "--resume", *data, *common],
        ["train", "--dataset", "synth_A", "-o", str(tmp_path / "new"), "--backbone-weights",
         str(tmp_path / "backbone.pth"), "--testsets", "", *data, *common],  # fmt: skip
    ]
    for argv in commands:
        capsys.readouterr()
        code = main(argv)
        err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error" in line]
        assert code == 1 and len(err) == 1, (argv, err)
        assert "corrupt or not a qaconv" in err[0] or "not a " in err[0] or "objects other than" in err[0], err[0]
        assert "weights_only" not in err[0] and "allow_pickle" not in err[0] and "trust" not in err[0], err[0]
        assert not marker.exists(), argv  # never unpickled
