"""Text in plots is drawn literally (a `$` in a test-set name is not mathtext), and a failing report never loses
the metrics table or the metrics.jsonl rows."""

import json

import matplotlib.figure
import matplotlib.text
import numpy as np
import pytest
import torch

import qaconv.report
from qaconv.cli import main
from qaconv.data.registry import load_dataset
from qaconv.engine.checkpoint import save_checkpoint
from qaconv.engine.evaluator import evaluate
from qaconv.engine.runner import DEFAULTS, build_model
from qaconv.viz.curves import plot_cmc
from qaconv.viz.match import draw_match

TINY = {"arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16}
NAME = "x$^$"


@pytest.fixture
def run_and_manifest(tiny_domain, tmp_path):
    """A random-init checkpoint and the tiny domain's query/gallery as a manifest named ``x$^$.csv``."""
    torch.manual_seed(0)
    cfg = {**DEFAULTS, **TINY}
    model, matcher = build_model(cfg, load_weights=False)
    run = tmp_path / "run"
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()},
                    run / "checkpoint.pt")
    data = load_dataset("synth_A", str(tiny_domain.parent), progress=False)
    lines = ["path,pid,camid,split"]
    for split, recs in (("query", data.query), ("gallery", data.gallery)):
        lines += [f"{r.path},{r.pid},{r.camid},{split}" for r in recs]
    csv = tmp_path / f"{NAME}.csv"
    csv.write_text("\n".join(lines) + "\n")
    return run, csv


@pytest.fixture
def saved_texts(monkeypatch):
    """Every Text object of each figure at the moment it is saved: (figure number, text, parse_math)."""
    seen = []
    real = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        out = real(fig, *args, **kwargs)  # drawn first, so tick labels exist
        seen.extend((id(fig), t.get_text(), t.get_parse_math()) for t in fig.findobj(matplotlib.text.Text))
        return out

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return seen


def _argv(run, csv, rep):
    return ["evaluate", "--checkpoint", str(run), "--testsets", str(csv), "--report", str(rep),
            "--report-queries", "2", "--workers", "0", "--device", "cpu"]


def test_dollar_in_testset_name_is_drawn_literally(run_and_manifest, tmp_path, capsys, saved_texts):
    run, csv = run_and_manifest
    rep = tmp_path / "rep"
    code = main(_argv(run, csv, rep))
    out = capsys.readouterr().out
    assert code == 0
    assert (rep / "index.html").is_file() and len(list(rep.glob("*/cmc.png"))) == 1
    assert "rank-1" in out and any(line.startswith(f"{NAME} ") for line in out.splitlines())  # the short name
    assert any(text == f"CMC on {NAME}" for _, text, _ in saved_texts)
    drawn = [(text, math) for _, text, math in saved_texts if text]
    assert len({f for f, _, _ in saved_texts}) > 1  # the CMC plot and match pictures
    assert drawn and not any(math for _, math in drawn)


def test_plot_functions_never_parse_mathtext(tmp_path, saved_texts):
    """Titles, legend entries, axis and colourbar labels and tick labels alike."""
    plot_cmc({"$a$, b": np.linspace(0.5, 1, 20), "$^$": np.linspace(0.2, 1, 20)}, tmp_path / "c.png",
             title="$^$ and $x$")
    rng = np.random.default_rng(0)
    corr = {"probe_to_gallery_sim": rng.random(8), "gallery_to_probe_sim": rng.random(8),
            "probe_weight": rng.random(8), "probe_to_gallery": rng.integers(0, 8, 8)}
    img = np.zeros((16, 8, 3), dtype=np.uint8)
    draw_match(img, img, corr, 1.0, tmp_path / "m.png", feature_size=(4, 2), labels=("$^$", "g$"))
    texts = [t for _, t, _ in saved_texts]
    assert {"$^$ and $x$", "$a$, b (R1 50.0)", "$^$ (R1 20.0)", "$^$: best match per location"} <= set(texts)
    assert not any(math for _, t, math in saved_texts if t)


@pytest.mark.parametrize("stage", ["report_from_evaluation", "write_report"])
def test_failing_report_keeps_metrics(run_and_manifest, tiny_domain, tmp_path, capsys, monkeypatch, stage):
    """Building a section or writing the page raises: the table is printed and metrics.jsonl written first."""
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(qaconv.report, stage, broken)
    run, csv = run_and_manifest
    cfg = {**DEFAULTS, **TINY, "data_dir": str(tmp_path), "workers": 0, "device": "cpu", "fea_batch": 16,
           "report": str(tmp_path / "rep"), "report_queries": 2}
    model, matcher = build_model(cfg, load_weights=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="disk full"):
        evaluate(model.eval(), matcher.eval(), cfg, [csv.name, str(tiny_domain)], out_dir=tmp_path / "out")
    out = capsys.readouterr().out
    assert "rank-1" in out and any(line.startswith(f"{NAME} ") for line in out.splitlines())
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("type") == "eval"]
    assert [r["testset"] for r in evals] == [NAME, tiny_domain.name] and all("mAP" in r for r in evals)
    assert [r["testset_source"] for r in evals] == [csv.name, str(tiny_domain)]
    assert not (tmp_path / "rep" / "index.html").exists()


def test_html_in_a_test_set_name_is_escaped_in_the_report(run_and_manifest, tmp_path, capsys):
    """A test-set name with markup shows as text on the page, never as markup."""
    run, csv = run_and_manifest
    evil = csv.with_name("<img src=x onerror=alert(1)><b>x.csv")
    csv.rename(evil)
    rep = tmp_path / "rep"
    assert main(_argv(run, evil, rep)) == 0
    page = (rep / "index.html").read_text()
    assert "<img src=x onerror" not in page and "<b>x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;&lt;b&gt;x" in page
