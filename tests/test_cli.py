"""The command line: help states defaults, bad arguments give one line and a non-zero exit."""

import json
import subprocess
import sys

import numpy as np
import pytest

from qaconv.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "qaconv", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["train", "evaluate", "synth", "demo", "match"])
def test_help_states_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "default" in out


def test_train_help_shows_official_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("(2.1 recipe: 0.005)", "(2.1 recipe: 16.0)", "(2.1 recipe: layer3)", "(2.1 recipe: 0.7)",
                 "(2.1 recipe: graph)", "(default: 2.1)", "(default: runs/qaconv)"):  # fmt: skip
        assert text in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--arch", "resnet7"], "invalid choice"),
        (["train", "--lr", "-1"], "must be > 0"),
        (["search", "q.jpg", "--index", "i", "--checkpoint", "c", "--tau", "nan"], "must be > 0 and finite"),
        (["search", "q.jpg", "--index", "i", "--checkpoint", "c", "--alpha=-1e9"], "must be >= 0 and finite"),
        (["train", "--sigma", "inf"], "must be > 0 and finite"),
        (["train", "--batch-size", "many"], "expected a int"),
        (["train", "--ibn", "c"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["evaluate"], "--checkpoint"),
    ],
)
def test_bad_arguments_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_library_errors_are_one_line_without_traceback(tmp_path, capsys):
    code = main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--testsets", "synth_B"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.splitlines() == [
        f"qaconv evaluate: error: checkpoint {tmp_path / 'missing.pt'} does not exist"
    ]


def test_unknown_dataset_and_batch_rule(tmp_path, capsys):
    code = main(
        [
            "train",
            "--dataset",
            str(tmp_path / "nowhere"),
            "--pretrained",
            "none",
            "--ibn",
            "none",
            "--data-dir",
            str(tmp_path),
            "-o",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "not found" in err


def test_module_entry_point_bad_args():
    res = _run("train", "--max-epochs", "0")
    assert res.returncode == 2 and "must be > 0" in res.stderr and "Traceback" not in res.stderr


def _common(tiny_domain):
    return ["--data-dir", str(tiny_domain.parent), "--workers", "0", "--device", "cpu"]


def _train_tiny(tiny_domain, run, testsets=""):
    """One epoch of a tiny random-init ResNet-18 QAConv on the tiny synthetic domain; returns the exit code."""
    return main(["train", "--dataset", "synth_A", "--testsets", testsets, "-o", str(run), "--arch", "resnet18",
                 "--ibn", "none", "--pretrained", "none", "--height", "64", "--width", "32", "--neck", "16",
                 "--batch-size", "8", "--num-instance", "2", "--max-epochs", "1", *_common(tiny_domain)])


def test_train_then_evaluate_end_to_end(tiny_domain, tmp_path, capsys):
    run = tmp_path / "run"
    common = _common(tiny_domain)
    code = _train_tiny(tiny_domain, run, testsets="synth_A")
    out = capsys.readouterr().out
    assert code == 0
    assert "rank-1" in out and "synth_A" in out
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.pt"}
    code = main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", *common])
    again = capsys.readouterr().out
    assert code == 0
    # the same model on the same test set gives the same table row
    row = [line for line in out.splitlines() if line.startswith("synth_A ")][-1]
    assert row in again.splitlines()


def test_data_info_prints_splits_and_warnings(tiny_domain, capsys):
    code = main(["data", "info", "synth_A", "--data-dir", str(tiny_domain.parent)])
    out = capsys.readouterr().out
    assert code == 0
    for split in ("train", "query", "gallery"):
        assert split in out
    assert "time" in out and "unreadable images: 0" in out
    code = main(["data", "info", "synth_A", "--data-dir", str(tiny_domain.parent), "--json", "--no-scan"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["splits"]["train"]["ids"] == 8 and report["has_time"] is True


def test_evaluate_with_rerank_tlift_and_saved_scores(tiny_domain, tmp_path, capsys):
    from scipy.io import loadmat

    run = tmp_path / "run"
    common = _common(tiny_domain)
    assert _train_tiny(tiny_domain, run) == 0
    capsys.readouterr()
    code = main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", "--rerank", "--tlift",
                 "--save-scores", "--k1", "5", "--k2", "2", *common])
    out = capsys.readouterr().out
    assert code == 0
    for label in ("synth_A ", "synth_A +RR ", "synth_A +RR+TLift"):
        assert label in out
    assert "synth_A +TLift" not in out  # TLift only after re-ranking, as in the official evaluators
    mat = loadmat(run / "synth_A_score.mat")  # the official --save_score file name and layout
    saved = np.load(run / "synth_A_scores.npz")
    assert set(saved.files) >= {"logit", "score", "score_rerank", "score_tlift", "prob_ids", "gal_paths"}
    q, g = len(saved["prob_ids"]), len(saved["gal_ids"])
    assert saved["score"].shape == mat["score_tlift"].shape == (q, g) and mat["gal_ids"].shape == (g, 1)
    np.testing.assert_allclose(mat["score"], 1 / (1 + np.exp(-saved["logit"].astype(np.float64) / 10)), atol=1e-6)
    np.testing.assert_array_equal(mat["score_tlift"], saved["score_tlift"])
    # the plain row of the table equals the table of an evaluation without post-processing
    assert main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", *common]) == 0
    plain = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("synth_A ")]
    assert plain[0] in [line.split() for line in out.splitlines()]


def test_rerank_from_knn_lists_equals_dense_in_evaluation(tiny_domain, tmp_path):
    """The memory-bounded re-ranking path (forced by a tiny threshold) gives the dense path's metrics."""
    from qaconv.engine.evaluator import evaluate
    from qaconv.engine.runner import DEFAULTS, build_model

    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16,
           "data_dir": str(tiny_domain.parent), "workers": 0, "device": "cpu", "rerank": True, "k1": 5, "k2": 2,
           "fea_batch": 16, "match_memory": 0.05}
    model, matcher = build_model(cfg)
    model.eval(), matcher.eval()
    dense = evaluate(model, matcher, cfg, "synth_A", progress=False)
    knn = evaluate(model, matcher, {**cfg, "rerank_dense_max": 0}, "synth_A", progress=False)
    np.testing.assert_allclose(knn["synth_A +RR"].cmc, dense["synth_A +RR"].cmc)
    assert abs(knn["synth_A +RR"].mAP - dense["synth_A +RR"].mAP) < 1e-6


def test_every_option_has_help_stating_its_default():
    import argparse

    from qaconv.cli import FORMATTER, build_parser

    def options(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from options(sub)
            elif action.option_strings and action.help != argparse.SUPPRESS:
                yield action

    for action in options(build_parser()):
        assert action.help, f"{action.option_strings} has no help text"
        if action.default not in (None, False) and action.default != argparse.SUPPRESS:
            text = FORMATTER("qaconv")._get_help_string(action)
            assert "%(default)s" in text or "default" in text, action.option_strings


def test_match_command_draws_picture(tiny_domain, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train_tiny(tiny_domain, run) == 0
    images = sorted((tiny_domain / "query").iterdir())[:2]
    out = tmp_path / "m.png"
    capsys.readouterr()
    assert main(["match", str(images[0]), str(images[1]), "--checkpoint", str(run), "-o", str(out), "--top", "5"]) == 0
    assert "QAConv logit" in capsys.readouterr().out and out.stat().st_size > 10_000
    official = tmp_path / "o.png"
    argv = ["match", str(images[0]), str(images[1]), "--checkpoint", str(run), "-o", str(official), "--semantics",
            "official", "--threshold", "0.0025"]  # fmt: skip
    assert main(argv) == 0
    assert "QAConv sigmoid(logit/10) 0." in capsys.readouterr().out and official.stat().st_size > 10_000


def test_evaluate_two_stage(tiny_domain, tmp_path, capsys):
    """--two-stage with M >= gallery size gives the exhaustive table, and with --rerank and M >= query+gallery
    size the exhaustive +RR rows; a small M with --rerank re-ranks from shortlists."""
    run = tmp_path / "run"
    common = _common(tiny_domain)
    assert _train_tiny(tiny_domain, run) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", *common]) == 0
    plain = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("synth_A ")]
    assert main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", "--two-stage", "100000", *common]) == 0
    out = capsys.readouterr().out
    assert "two-stage" in out and plain[0] in out.splitlines()
    assert main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", "--two-stage", "3", *common]) == 0
    assert "re-scores the 3 best" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", "--rerank", *common]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("synth_A ")]
    assert main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", "--two-stage", "100000", "--rerank",
                 *common]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 and all(row in out for row in rows)
    assert main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", "--two-stage", "3", "--rerank",
                 *common]) == 0
    out = capsys.readouterr().out
    assert "each image's 3 nearest" in out and "synth_A +RR" in out


def test_train_into_an_existing_run_is_refused_unless_overwrite(tiny_domain, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train_tiny(tiny_domain, run) == 0
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl")}
    capsys.readouterr()
    assert _train_tiny(tiny_domain, run) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--overwrite" in err
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing touched
    argv = ["train", "--dataset", "synth_A", "--testsets", "", "-o", str(run), "--arch", "resnet18", "--ibn", "none",
            "--pretrained", "none", "--height", "64", "--width", "32", "--neck", "16", "--batch-size", "8",
            "--max-epochs", "1", "--overwrite", *_common(tiny_domain)]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows].count("data") == 1  # the old run's rows are gone, not appended to


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(tiny_domain, tmp_path, capsys):
    argv = ["train", "--dataset", "synth_A", "--testsets", "", "-o", str(tmp_path / "r"), "--arch", "resnet18",
            "--ibn", "none", "--pretrained", "none", *_common(tiny_domain)[:-2], "--device", "cuda"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not available" in err and "no CUDA device" in err


def test_bad_targets_fail_before_any_work(tiny_domain, tmp_path, capsys):
    """Only separators as test sets, and an index output that is a folder or in no folder: one line, up front
    (the checkpoint does not even exist, so nothing was loaded or extracted)."""
    missing = str(tmp_path / "no_run")
    cases = [
        (["evaluate", "--checkpoint", missing, "--testsets", ",,"], "no test sets given"),
        (["index", str(tiny_domain / "query"), "--checkpoint", missing, "-o", str(tmp_path)], "is a folder"),
        (["index", str(tiny_domain / "query"), "--checkpoint", missing, "-o", str(tmp_path / "x" / "g.idx")],
         "does not exist: create"),
    ]  # fmt: skip
    for argv, needle in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_search_prints_file_names_with_escape_sequences_safely(tiny_domain, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    assert _train_tiny(tiny_domain, run) == 0
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    sources = sorted((tiny_domain / "bounding_box_test").glob("*.jpg"))[:3]
    evil = "0001_c1s1_000100_00\x1b[2J\x1b]0;pwned\x07.jpg"  # clear screen, retitle the terminal
    for i, src in enumerate(sources):
        shutil.copy(src, gallery / (evil if i == 0 else src.name))
    idx = tmp_path / "g.idx"
    assert main(["index", str(gallery), "--checkpoint", str(run), "-o", str(idx), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["search", str(gallery / evil), "--index", str(idx), "--checkpoint", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J\\x1b]0;pwned\\x07.jpg" in out  # shown, escaped, in the query line and the result rows


def test_evaluate_skips_an_undecodable_gallery_image_or_stops_with_strict(tiny_domain, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    assert _train_tiny(tiny_domain, run) == 0
    data = tmp_path / "data" / "broken"
    shutil.copytree(tiny_domain, data)
    victim = sorted((data / "bounding_box_test").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) * 4 // 5])  # truncated at 80 %
    argv = ["evaluate", "--checkpoint", str(run), "--testsets", "broken", "--data-dir", str(data.parent),
            "--workers", "0", "--device", "cpu"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped 1 undecodable gallery image" in out and victim.name in out and "rank-1" in out
    assert main([*argv, "--strict"]) == 1
    err = capsys.readouterr().err.strip()  # (progress bars of the scan come first on stderr)
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("qaconv evaluate: error:") and victim.name in last


def test_broken_checkpoints_are_refused_at_load(tiny_domain, tmp_path, capsys):
    """An impossible height, a config of the wrong type, NaN weights: one line at load, for every command
    that loads a model (evaluate, export, match ...), never a traceback or a NaN evaluation or export."""
    import torch

    from qaconv.engine.checkpoint import save_checkpoint

    run = tmp_path / "run"
    assert _train_tiny(tiny_domain, run) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state.pop("format")
    nan_model = {k: (v.clone().fill_(float("nan")) if k == "neck.weight" else v) for k, v in state["model"].items()}
    cases = {
        "height0": ({**state, "config": {**state["config"], "height": 0}}, "invalid model configuration: height must"),
        "height_str": ({**state, "config": {**state["config"], "height": "tall"}}, "height must be a number"),
        "config_list": ({**state, "config": ["not", "a", "dict"]}, "expected a mapping"),
        "nan": ({**state, "model": nan_model}, "non-finite weights (neck.weight)"),
    }
    for name, (broken, needle) in cases.items():
        save_checkpoint(broken, tmp_path / name / "checkpoint.pt")
        for argv in (["evaluate", "--checkpoint", str(tmp_path / name), "--testsets", "synth_A", *_common(tiny_domain)],
                     ["export", "--checkpoint", str(tmp_path / name), "--onnx", str(tmp_path / f"{name}.onnx")]):
            capsys.readouterr()
            assert main(argv) == 1, (name, argv[0])
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and needle in err, (name, err)
        assert not (tmp_path / f"{name}.onnx").exists()


def test_resume_says_which_options_it_ignores_and_that_a_finished_run_is_finished(tiny_domain, tmp_path, capsys):
    """Resuming a finished 1-epoch run with --max-epochs 2 used to print only "resumed" and train nothing."""
    run = tmp_path / "run"
    assert _train_tiny(tiny_domain, run) == 0
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    argv = ["train", "--dataset", "synth_A", "-o", str(run), "--resume", "--max-epochs", "2", "--lr", "0.01",
            *_common(tiny_domain)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ignoring changed options ['lr', 'max_epochs']" in out
    assert "already complete (its schedule ends at epoch 1): nothing to train" in out
    assert (run / "checkpoint.pt").read_bytes() == before
