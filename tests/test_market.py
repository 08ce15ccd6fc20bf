"""Market-layout loader: parsing, relabelling, junk, session chaining with the official quirk."""

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qaconv.cli import main
from qaconv.data.market import SPLITS, load_market_layout, market_session_offsets
from qaconv.errors import QAConvError
from qaconv.gallery.meta import TIME_NAME, market_times


def _touch(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (10, 20, 30)).save(folder / name)


def test_session_offsets_double_count_previous_offset():
    # raw session maxima 100, 200, 300 for camera 1: offsets 0, 100, 100+200+100=400, 300+400+400=1100
    frames = {(1, 1): [5, 100], (1, 2): [7, 200], (1, 3): [300], (1, 4): [1]}
    off = market_session_offsets(frames)
    assert [off[(1, s)] for s in (1, 2, 3, 4)] == [0, 100, 400, 1100]


def test_load_market_layout(tmp_path):
    _touch(tmp_path / "bounding_box_train", "0007_c1s1_000100_00.jpg")
    _touch(tmp_path / "bounding_box_train", "0003_c2s2_000050_01.jpg")
    _touch(tmp_path / "bounding_box_train", "0003_c2s1_000400_00.jpg")
    _touch(tmp_path / "query", "0011_c1s1_000025_00.jpg")
    _touch(tmp_path / "bounding_box_test", "0011_c3s1_000050_00.jpg")
    _touch(tmp_path / "bounding_box_test", "-1_c3s1_000075_00.jpg")
    _touch(tmp_path / "bounding_box_test", "0000_c1s1_000010_00.jpg")
    data = load_market_layout(tmp_path)
    train = {Path(r.path).name: r for r in data.train}
    # train pids relabelled in sorted order of raw pids: 3 -> 0, 7 -> 1; cameras 0-based
    assert train["0003_c2s2_000050_01.jpg"].pid == 0 and train["0007_c1s1_000100_00.jpg"].pid == 1
    assert train["0003_c2s2_000050_01.jpg"].camid == 1
    # camera 2, session 2 is offset by the max frame of camera 2 session 1 (400): (50 + 400) / 25
    assert train["0003_c2s2_000050_01.jpg"].time == pytest.approx(18.0)
    assert train["0007_c1s1_000100_00.jpg"].time == pytest.approx(4.0)
    assert [r.pid for r in data.query] == [11]
    assert sorted(r.pid for r in data.gallery) == [0, 11]  # junk -1 dropped, distractor 0000 kept
    assert data.junk_dropped == {"train": 0, "query": 0, "gallery": 1}


def test_missing_folder_message(tmp_path):
    (tmp_path / "query").mkdir()
    with pytest.raises(QAConvError, match="missing bounding_box_train, bounding_box_test"):
        load_market_layout(tmp_path)


def test_bad_file_names_quoted(tmp_path):
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / sub).mkdir()
    _touch(tmp_path / "query", "person1.jpg")
    with pytest.raises(QAConvError, match=r"person1\.jpg"):
        load_market_layout(tmp_path)


def _empty(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"")


def _times(data) -> dict[str, float]:
    return {Path(r.path).name: r.time for split in ("train", "query", "gallery") for r in getattr(data, split)}


def test_junk_at_last_frame_does_not_shift_later_sessions(tmp_path):
    # c1s1 kept frames 50, 70 and junk at 9000; c1s2 kept frame 100 and junk at 5000; c1s3 frame 10.
    # Official (junk skipped first): offset s2 = 70, offset s3 = (100 + 70) + 70 = 240.
    _empty(tmp_path / "bounding_box_train", "0001_c1s1_000050_00.jpg")
    _empty(tmp_path / "bounding_box_test", "0002_c1s1_000070_00.jpg")
    _empty(tmp_path / "bounding_box_test", "-1_c1s1_009000_00.jpg")
    _empty(tmp_path / "bounding_box_test", "-1_c1s2_005000_00.jpg")
    _empty(tmp_path / "query", "0002_c1s2_000100_00.jpg")
    _empty(tmp_path / "bounding_box_test", "0003_c1s3_000010_00.jpg")
    t = _times(load_market_layout(tmp_path))
    assert t["0002_c1s2_000100_00.jpg"] == pytest.approx(170 / 25)  # 6.8 s, not (100 + 9000) / 25
    assert t["0003_c1s3_000010_00.jpg"] == pytest.approx(250 / 25)
    assert t["0001_c1s1_000050_00.jpg"] == pytest.approx(2.0)


def _official_times(files: dict[str, list[str]]) -> dict[str, float]:
    """Reference: the official loader's rule, step by step (junk out, session index s-1, 6 x 6 offsets)."""
    recs = []  # [name, cam index, session index, frame], frames shifted in place like the official arrays
    for names in files.values():
        for n in sorted(names):
            pid, cs, frame = int(n.split("_")[0]), n.split("_")[1], int(n.split("_")[2])
            if pid != -1:
                recs.append([n, int(cs[1]) - 1, int(cs[3]) - 1, frame])
    offset = [[0] * 6 for _ in range(6)]
    for c in range(6):
        for s in range(1, 6):
            prev = [r[3] for r in recs if r[1] == c and r[2] == s - 1]
            offset[c][s] = (max(prev) if prev else 0) + offset[c][s - 1]
            for r in recs:
                if r[1] == c and r[2] == s:
                    r[3] += offset[c][s]
    return {r[0]: r[3] / 25 for r in recs}


@pytest.mark.parametrize("seed", range(5))
def test_times_match_official_rule_on_random_folders(tmp_path, seed):
    rng = random.Random(seed)
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    for i in range(60):
        split = rng.choice(list(SPLITS))
        pid = rng.choice([-1, 0, 1, 2, 3])
        name = f"{pid:04d}_c{rng.randint(1, 6)}s{rng.randint(0, 6)}_{rng.randint(0, 3000):06d}_{i:02d}.jpg"
        name = name.replace("-001", "-1")
        files[split].append(name)
        _empty(tmp_path / SPLITS[split], name)
    for sub in SPLITS.values():
        (tmp_path / sub).mkdir(exist_ok=True)
    got = _times(load_market_layout(tmp_path))
    want = _official_times(files)
    assert got.keys() == want.keys()
    for n in want:
        assert got[n] == pytest.approx(want[n]), n


def test_session_zero_is_not_chained(tmp_path):
    # official rule: session 0 has index -1, never shifted and never a "previous session" of another
    _empty(tmp_path / "query", "0002_c4s0_000500_00.jpg")
    _empty(tmp_path / "bounding_box_train", "0002_c4s1_000030_00.jpg")
    _empty(tmp_path / "bounding_box_test", "0002_c4s2_000005_00.jpg")
    _empty(tmp_path / "bounding_box_test", "0002_c1s1_000005_00.jpg")
    t = _times(load_market_layout(tmp_path))
    assert t["0002_c4s0_000500_00.jpg"] == pytest.approx(500 / 25)
    assert t["0002_c4s2_000005_00.jpg"] == pytest.approx(35 / 25)
    assert market_session_offsets({(4, 0): [500], (4, 1): [30]})[(4, 0)] == 0


def test_session_zero_through_data_info(tmp_path, capsys):
    _touch(tmp_path / "bounding_box_train", "0001_c1s1_000010_00.jpg")
    _touch(tmp_path / "bounding_box_train", "0001_c2s1_000010_00.jpg")
    _touch(tmp_path / "query", "0002_c4s0_000001_00.jpg")
    _touch(tmp_path / "bounding_box_test", "0002_c1s1_000001_00.jpg")
    assert main(["data", "info", str(tmp_path), "--no-scan"]) == 0
    assert "query" in capsys.readouterr().out


def test_session_zero_in_gallery_names():
    labels = np.array(["c1", "c1", "c1"])
    t = market_times(labels, [0, 1, 2], [400, 30, 5], [TIME_NAME] * 3)
    assert t.tolist() == pytest.approx([400 / 25, 30 / 25, 35 / 25])


def test_camera_zero_refused_with_file_name(tmp_path, capsys):
    _empty(tmp_path / "bounding_box_train", "0001_c1s1_000010_00.jpg")
    _empty(tmp_path / "bounding_box_test", "0002_c1s1_000001_00.jpg")
    _empty(tmp_path / "bounding_box_test", "-1_c0s1_000001_00.jpg")  # junk is dropped unread: no error
    (tmp_path / "query").mkdir()
    assert load_market_layout(tmp_path).junk_dropped["gallery"] == 1
    _empty(tmp_path / "query", "0002_c0s1_000001_00.jpg")
    with pytest.raises(QAConvError, match=r"camera c0.*from c1.*: 0002_c0s1_000001_00\.jpg$"):
        load_market_layout(tmp_path)
    assert main(["data", "info", str(tmp_path), "--no-scan"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0002_c0s1_000001_00.jpg" in err
