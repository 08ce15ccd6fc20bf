"""The synthetic domain generator: layout, protocol, determinism, time model, domain differences, errors."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qaconv.data.records import MARKET_FPS, MARKET_NAME
from qaconv.data.synth import DOMAINS, generate_domain, is_generated, render_identity_preview

SPLITS = ("bounding_box_train", "query", "bounding_box_test")
TINY = dict(num_train_ids=6, num_test_ids=5, height=64, width=32, progress=False)


def parse(folder: Path) -> list[tuple[str, int, int, int, int]]:
    """(name, pid, 1-based cam, session, frame) of every file in a split folder."""
    out = []
    for p in sorted(folder.iterdir()):
        m = MARKET_NAME.match(p.name)
        assert m is not None, p.name
        out.append((p.name, int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))))
    return out


def file_bytes(root: Path) -> dict[str, bytes]:
    return {f"{s}/{p.name}": p.read_bytes() for s in SPLITS for p in sorted((root / s).iterdir())}


@pytest.fixture(scope="module")
def tiny_a(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "A"
    return root, generate_domain("A", root, workers=0, **TINY)


@pytest.fixture(scope="module")
def crowd(tmp_path_factory) -> Path:
    """More people (small images) for the statistics of the time model."""
    root = tmp_path_factory.mktemp("synth") / "crowd"
    generate_domain("B", root, seed=3, num_train_ids=60, num_test_ids=20, height=16, width=8, progress=False)
    return root


def test_layout_names_and_summary(tiny_a):
    root, summary = tiny_a
    meta = json.loads((root / "synth.json").read_text())
    assert meta["domain"] == "A" and meta["seed"] == 0 and meta["num_cameras"] == DOMAINS["A"].num_cameras
    total = 0
    for split, folder in zip(("train", "query", "gallery"), SPLITS, strict=True):
        rows = parse(root / folder)
        total += len(rows)
        assert summary["splits"][split]["images"] == len(rows) == meta["splits"][split]["images"]
        assert summary["splits"][split]["identities"] == len({r[1] for r in rows if r[1] > 0})
        for name, _pid, cam, session, frame in rows:
            assert 1 <= cam <= meta["num_cameras"] and session == 1 and 0 <= frame <= 999_999
            assert name.endswith(".jpg")
        with Image.open(root / folder / rows[0][0]) as im:
            assert im.size == (32, 64) and im.mode == "RGB"
    assert summary["images"] == total and summary["images_per_s"] > 0
    assert summary["splits"]["train"]["identities"] == 6 and summary["splits"]["query"]["identities"] == 5
    assert is_generated(root, "A", num_train_ids=6, num_test_ids=5, height=64, width=32)
    assert not is_generated(root, "A", seed=1, num_train_ids=6, num_test_ids=5, height=64, width=32)


def test_protocol(tiny_a):
    root = tiny_a[0]
    train, query, gallery = (parse(root / s) for s in SPLITS)
    train_ids = {r[1] for r in train}
    test_ids = {r[1] for r in query} | {r[1] for r in gallery if r[1] > 0}
    assert train_ids.isdisjoint(test_ids) and 0 not in train_ids
    assert {r[1] for r in query} == test_ids  # every test identity has queries
    assert any(r[1] == 0 for r in gallery)  # distractors, gallery only
    per_cam = defaultdict(int)
    for _, pid, cam, _, _ in query:
        per_cam[(pid, cam)] += 1
        assert any(g[1] == pid and g[2] != cam for g in gallery), f"query {pid} c{cam}: no cross-camera match"
    assert max(per_cam.values()) == 1  # at most one query per identity and camera
    for pid in train_ids:  # every training identity is seen by two or more cameras
        assert len({r[2] for r in train if r[1] == pid}) >= 2


def test_deterministic_across_workers_and_seeds(tmp_path, tiny_a):
    root = tiny_a[0]
    again = tmp_path / "again"
    generate_domain("A", again, workers=2, **TINY)
    assert file_bytes(again) == file_bytes(root)
    other = tmp_path / "other"
    generate_domain("A", other, seed=1, workers=0, **TINY)
    assert file_bytes(other) != file_bytes(root)
    generate_domain("A", again, seed=1, workers=0, **TINY)  # regenerating in place replaces the old run
    assert file_bytes(again) == file_bytes(other)


def test_time_follows_camera_graph(crowd):
    meta = json.loads((crowd / "synth.json").read_text())
    edges = {frozenset(e[:2]) for e in meta["camera_graph"]}
    rows = [r for s in SPLITS for r in parse(crowd / s) if r[1] > 0]
    tracks = defaultdict(list)
    for _, pid, cam, _, frame in rows:
        tracks[pid].append((frame / MARKET_FPS, cam))
    gaps = []
    for seen in tracks.values():
        seen.sort()
        for (t0, c0), (t1, c1) in zip(seen[:-1], seen[1:], strict=True):
            if c0 != c1:
                assert frozenset((c0, c1)) in edges, "a person jumped between cameras that are not connected"
                gaps.append(t1 - t0)
            else:
                assert t1 - t0 < 7.0 or t1 - t0 > 10.0  # frames of one pass, or a later pass
    assert 10.0 < np.median(gaps) < 600.0  # walking times: tens of seconds to minutes


def test_groups_reappear_together(crowd):
    """TLift's premise: two people passing one camera together tend to pass another camera together."""
    rows = [r for s in SPLITS for r in parse(crowd / s) if r[1] > 0]
    first = defaultdict(dict)  # pid -> cam -> first time seen there
    for _, pid, cam, _, frame in rows:
        first[pid][cam] = min(first[pid].get(cam, frame / MARKET_FPS), frame / MARKET_FPS)
    counts = np.zeros((2, 2))  # [close at camera 1, close at camera 2]
    for p, q in itertools.combinations(sorted(first), 2):
        close = {c: abs(first[p][c] - first[q][c]) < 5.0 for c in first[p].keys() & first[q].keys()}
        for c1, c2 in itertools.permutations(close, 2):
            counts[int(close[c1]), int(close[c2])] += 1
    together_again = counts[1, 1] / counts[1].sum()
    by_chance = counts[0, 1] / counts[0].sum()
    assert counts[1].sum() >= 20, "too few people walking together"
    assert together_again > 0.4 and together_again > 10 * by_chance, (together_again, by_chance)


def test_domains_differ_in_image_statistics(tmp_path, tiny_a):
    stats = {}
    generate_domain("B", tmp_path / "B", workers=0, **TINY)
    for name, root in (("A", tiny_a[0]), ("B", tmp_path / "B")):
        pix = np.stack([np.asarray(Image.open(p), np.float32).reshape(-1, 3).mean(0) / 255
                        for p in sorted((root / "bounding_box_train").iterdir())])
        stats[name] = pix
    a, b = stats["A"], stats["B"]
    assert a.mean() - b.mean() > 0.08  # A is brighter
    warm = lambda x: (x[:, 0] - x[:, 2]).mean()  # noqa: E731
    assert warm(a) - warm(b) > 0.04  # A is warmer (red over blue)
    hist = lambda x: np.histogram(x.mean(1), bins=10, range=(0, 1))[0] / len(x)  # noqa: E731
    assert np.abs(hist(a) - hist(b)).sum() > 0.5


def test_preview_grid():
    img = render_identity_preview("B", n=2, num_cameras=3, height=32, width=16, per_camera=2)
    assert img.size == (16 * 3 * 2 + 2 * 2, 32 * 2)
    assert np.asarray(img).std() > 10


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(domain="Z"), "choose from A, B, C"),
        (dict(num_train_ids=0), "num_train_ids"),
        (dict(num_test_ids=-1), "num_test_ids"),
        (dict(num_cameras=10), "num_cameras"),
        (dict(num_cameras=1), "num_cameras"),
        (dict(height=4), "height"),
        (dict(width=2.5), "width"),
        (dict(seed=-1), "seed"),
        (dict(workers=-2), "workers"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, word):
    args = dict(domain="A", out_dir=tmp_path / "x", num_train_ids=2, num_test_ids=2, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word) as err:
        generate_domain(**args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "query").mkdir()
    (tmp_path / "query" / "0001_c1s1_000001_00.jpg").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="not written by the synthetic generator"):
        generate_domain("A", tmp_path, progress=False, **{k: v for k, v in TINY.items() if k != "progress"})
    assert (tmp_path / "query" / "0001_c1s1_000001_00.jpg").read_bytes() == b"not ours"
