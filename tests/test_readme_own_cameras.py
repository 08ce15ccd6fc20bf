"""The README's "Your own cameras in five commands", run line by line as written, on generated images laid out
as a user's cameras would be (one folder per camera, no Market-style names), with a random-init tiny model."""

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from qaconv.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
CAMS = {1: "camA", 2: "camB", 3: "camC", 4: "camD", 5: "camE", 6: "camF"}


def _five_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- five-commands -->\n```bash\n(.*?)```\n<!-- /five-commands -->", text, re.S)
    assert block, "README lost its five-commands block"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 5 and all(line.startswith("qaconv ") for line in lines)
    return [shlex.split(line)[1:] for line in lines]


def _market(name: str) -> tuple[int, int]:
    pid, cam = re.match(r"(\d+)_c(\d)s", name).groups()
    return int(pid), int(cam)


@pytest.fixture
def site(tiny_domain, tmp_path, monkeypatch):
    """The user's folders in a fresh working directory: site/<camera>/img_NNN.jpg (the tiny domain's gallery),
    probes/camB/ (its camB queries), tracks/camB/walker7/ (two camB queries of one person), labelled.csv (the
    query and gallery with identities and camera labels) and runs/r18 (a random-init tiny QAConv)."""
    from qaconv.engine.checkpoint import save_checkpoint
    from qaconv.engine.runner import DEFAULTS, build_model

    monkeypatch.chdir(tmp_path)
    truth, rows = {}, []
    for i, src in enumerate(sorted((tiny_domain / "bounding_box_test").glob("*.jpg"))):
        pid, cam = _market(src.name)
        dst = Path("site") / CAMS[cam] / f"img_{i:03d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        truth[dst.as_posix()] = (pid, CAMS[cam])
        rows.append([dst.as_posix(), pid, CAMS[cam], "gallery"])
    queries = sorted((tiny_domain / "query").glob("*.jpg"))
    for i, src in enumerate(queries):
        pid, cam = _market(src.name)
        rows.append([str(src), pid, CAMS[cam], "query"])
        if cam == 2:
            Path("probes/camB").mkdir(parents=True, exist_ok=True)
            shutil.copy(src, Path("probes/camB") / f"probe_{i:03d}.jpg")
    by_pid = {}
    for src in queries:  # a tracker's two crops of one person (its folder, camB, is the camera)
        by_pid.setdefault(_market(src.name)[0], []).append(src)
    walker = Path("tracks/camB/walker7")
    walker.mkdir(parents=True)
    for j, src in enumerate(max(by_pid.values(), key=len)[:2]):
        shutil.copy(src, walker / f"frame_{j}.jpg")
    with open("labelled.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "pid", "camid", "split"], *rows])
    torch.manual_seed(0)
    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16}
    model, matcher = build_model(cfg, load_weights=False)
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()},
                    Path("runs/r18/checkpoint.pt"))
    return truth


def test_five_commands_as_written(site, capsys):
    calibrate, index, tracklet, html, as_json = _five_commands()
    assert main(calibrate) == 0
    cal = json.loads(Path("runs/r18/calibration.json").read_text())
    assert cal["bands"]["different_threshold"] is not None
    assert main(index) == 0
    capsys.readouterr()
    # a tracklet query: one result list for the whole tracklet, from camB's point of view (camB excluded)
    assert main(tracklet) == 0
    out = capsys.readouterr().out
    assert out.count("query ") == 1 and "2 crops" in out and "cam camB" in out
    assert "mean of the QAConv logits of crop pairs" in out and "same-camera entries excluded" in out
    # the HTML page of every camB probe, with links and borders
    assert main(html) == 0
    capsys.readouterr()
    page = Path("results.html").read_text(encoding="utf-8")
    assert page.count('class="q"') == len(list(Path("probes/camB").iterdir()))
    assert "results_files/" in page and ">match</a>" in page and "P(same)" in page
    # JSON: verdicts per result, cameras from the folders, camB never among the results, numbers are numbers
    assert main(as_json) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == len(list(Path("probes/camB").iterdir()))
    for r in res:
        assert r["cam"] == "camB" and r["calibrated"] is True and r["pid"] is None  # folder names carry no pid
        assert 1 <= len(r["results"]) <= 5
        for h in r["results"]:
            assert h["cam"] == site[f"site/{h['path']}"][1] != "camB"
            assert isinstance(h["score"], float) and h["verdict"] in ("same person", "uncertain", "different")
            assert 0.0 <= h["p_same"] <= 1.0
        assert [h["score"] for h in r["results"]] == sorted((h["score"] for h in r["results"]), reverse=True)
