"""Market-layout loader: parsing, relabelling, junk, session chaining with the official quirk."""

from pathlib import Path

import pytest
from PIL import Image

from qaconv.data.market import load_market_layout, market_session_offsets
from qaconv.errors import QAConvError


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
