"""Benchmark loaders on tiny generated trees with hand-computed pids, cameras and time stamps."""

from pathlib import Path

import pytest
from PIL import Image

from qaconv.data.benchmarks import BENCHMARKS, combine, find_root, load_benchmark
from qaconv.errors import QAConvError


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (2, 4), (10, 20, 30)).save(folder / name)


def _by_name(records):
    return {Path(r.path).name: (r.pid, r.camid, r.time) for r in records}


def _market_tree(data_dir: Path, folder: str = "Market-1501-v15.09.15") -> Path:
    root = data_dir / folder
    _touch(root / "bounding_box_train", "0002_c1s1_000100_00.jpg", "0002_c1s2_000050_00.jpg", "0005_c2s1_000300_00.jpg")
    _touch(root / "query", "0005_c1s3_000020_00.jpg")
    _touch(root / "bounding_box_test", "0000_c1s1_000200_00.jpg", "-1_c2s1_000400_00.jpg")
    return root


def _cuhk_tree(data_dir: Path, folder: str = "cuhk03-np/detected") -> Path:
    root = data_dir / folder
    _touch(root / "bounding_box_train", "0003_c1_1.png", "0009_c2_4.png")
    _touch(root / "query", "0010_c1_1.png")
    _touch(root / "bounding_box_test", "0010_c2_2.png", "-1_c2_3.png")
    return root


MSMT_LISTS = {
    "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0001/0001_003_05_0303noon_0100_1.jpg 1"],
    "list_val.txt": ["0002/0002_010_15_0304afternoon_0200_0.jpg 2"],
    "list_query.txt": ["0000/0000_000_03_0303morning_0001_0.jpg 0", "0001/0001_000_07_0303noon_0002_0.jpg 1"],
    "list_gallery.txt": [
        "0000/0000_001_10_0304morning_0003_0.jpg 0",
        "0001/0001_002_12_0304noon_0004_0.jpg 1",
        "0009/0009_000_02_0304noon_0005_0.jpg -1",
    ],
}


def _msmt_tree(data_dir: Path, folder: str = "MSMT17_V1", dirs=("train", "test")) -> Path:
    root = data_dir / folder
    for list_name, lines in MSMT_LISTS.items():
        image_dir = root / (dirs[0] if list_name in ("list_train.txt", "list_val.txt") else dirs[1])
        for line in lines:
            rel = line.split()[0]
            _touch((image_dir / rel).parent, Path(rel).name)
        (root / list_name).write_text("\n".join(lines) + "\n")
    return root


def test_market(tmp_path):
    _market_tree(tmp_path)
    data = load_benchmark("market1501", tmp_path)
    assert data.root.endswith("Market-1501-v15.09.15") and "Market-1501" in data.found
    # pids 2 -> 0, 5 -> 1; camera 1: session maxima s1 = 200 (gallery), s2 = 50, so offsets 0, 200, 50+200+200=450
    assert _by_name(data.train) == {
        "0002_c1s1_000100_00.jpg": (0, 0, 4.0),
        "0002_c1s2_000050_00.jpg": (0, 0, 10.0),
        "0005_c2s1_000300_00.jpg": (1, 1, 12.0),
    }
    assert _by_name(data.query) == {"0005_c1s3_000020_00.jpg": (5, 0, pytest.approx(18.8))}
    # the 0000 distractor stays in the gallery, the -1 junk is dropped and counted
    assert _by_name(data.gallery) == {"0000_c1s1_000200_00.jpg": (0, 0, 8.0)}
    assert data.junk_dropped == {"train": 0, "query": 0, "gallery": 1}
    assert data.has_time


def test_duke(tmp_path):
    root = tmp_path / "DukeMTMC-reID"
    _touch(root / "bounding_box_train", "0001_c2_f0046182.jpg", "0007_c8_f0000100.jpg")
    _touch(root / "query", "0001_c5_f0000600.jpg")
    _touch(root / "bounding_box_test", "0000_c3_f0000010.jpg", "-1_c1_f0000001.jpg")
    data = load_benchmark("duke", tmp_path)
    # time = (frame + offset[camid]) / 59.94 with offsets [5542, 3606, 27243, 31181, 0, 22401, 18967, 46765]
    assert _by_name(data.train) == {
        "0001_c2_f0046182.jpg": (0, 1, pytest.approx(830.6306306306307)),  # (46182 + 3606) / 59.94
        "0007_c8_f0000100.jpg": (1, 7, pytest.approx(781.8651985318652)),  # (100 + 46765) / 59.94
    }
    assert _by_name(data.query) == {"0001_c5_f0000600.jpg": (1, 4, pytest.approx(10.01001001001001))}
    assert _by_name(data.gallery) == {"0000_c3_f0000010.jpg": (0, 2, pytest.approx(454.6713380046713))}
    assert data.junk_dropped["gallery"] == 1 and data.has_time


@pytest.mark.parametrize(
    "name,folder", [("cuhk03_np_detected", "cuhk03-np/detected"), ("cuhk03_np_labeled", "cuhk03-np/labeled")]
)
def test_cuhk03_np(tmp_path, name, folder):
    _cuhk_tree(tmp_path, folder)
    data = load_benchmark(name, tmp_path)
    assert data.name == name and data.root.endswith(folder)
    assert _by_name(data.train) == {"0003_c1_1.png": (0, 0, None), "0009_c2_4.png": (1, 1, None)}
    assert _by_name(data.query) == {"0010_c1_1.png": (10, 0, None)}
    assert _by_name(data.gallery) == {"0010_c2_2.png": (10, 1, None)}
    assert data.junk_dropped["gallery"] == 1 and not data.has_time


@pytest.mark.parametrize(
    "folder,dirs,version",
    [("MSMT17_V1", ("train", "test"), "V1"), ("MSMT17_V2", ("mask_train_v2", "mask_test_v2"), "V2")],
)
def test_msmt17(tmp_path, folder, dirs, version):
    _msmt_tree(tmp_path, folder, dirs)
    data = load_benchmark("msmt", tmp_path)
    assert f"MSMT17_{version}" in data.found
    # train = train + val; camid = 3rd '_' field - 1
    assert [(r.pid, r.camid) for r in data.train] == [(0, 0), (1, 4), (2, 14)]
    assert data.train[0].path == str(tmp_path / folder / dirs[0] / "0000/0000_000_01_0303morning_0015_0.jpg")
    assert [(r.pid, r.camid) for r in data.query] == [(0, 2), (1, 6)]
    assert [(r.pid, r.camid) for r in data.gallery] == [(0, 9), (1, 11)]
    assert data.junk_dropped == {"train": 0, "query": 0, "gallery": 1}
    assert not data.has_time and data.train[0].time is None


def test_msmt17_combine_all_shifts_test_pids(tmp_path):
    _msmt_tree(tmp_path)
    data = load_benchmark("msmt17", tmp_path, combine_all=True)
    # 3 training ids, so query/gallery pids 0, 1 become 3, 4
    assert [(r.pid, r.camid) for r in data.train] == [(0, 0), (1, 4), (2, 14), (3, 2), (4, 6), (3, 9), (4, 11)]
    assert data.num_train_pids == 5
    assert [r.pid for r in data.query] == [0, 1] and [r.pid for r in data.gallery] == [0, 1]
    assert "combine_all" in data.found


def test_randperson(tmp_path):
    folder = tmp_path / "RandPerson" / "randperson_subset"
    _touch(
        folder,
        "00000000_s00_c00_f000055.jpg",
        "00000000_s03_c01_f0012345.jpg",
        "00000007_s10_c02_f000240.jpg",
        "-1_s01_c00_f000001.jpg",
    )
    data = load_benchmark("randperson", tmp_path)
    # camid = [0,2,4,6,8,9,10,12,13,14,15][scene] + cam; time = (frame_offset[scene] + first 6 frame digits) / 24
    assert _by_name(data.train) == {
        "00000000_s00_c00_f000055.jpg": (0, 0, pytest.approx(2.2916666666666665)),
        "00000000_s03_c01_f0012345.jpg": (0, 7, pytest.approx(20468.083333333332)),  # (490000 + 1234) / 24
        "00000007_s10_c02_f000240.jpg": (1, 17, pytest.approx(145426.66666666666)),  # (3490000 + 240) / 24
    }
    assert data.query == [] and data.gallery == []
    assert data.junk_dropped["train"] == 1 and data.has_time


def test_clonedperson_scene_forced_to_2(tmp_path):
    root = tmp_path / "ClonedPerson"
    _touch(root / "train", "000001_s05_c03_f000240.jpg", "000004_s00_c03_f000048.jpg")
    _touch(root / "test" / "query", "000100_s01_c00_f000024.jpg")
    _touch(root / "test" / "gallery", "000100_s01_c05_f000072.jpg", "-1_s01_c01_f000001.jpg")
    data = load_benchmark("clonedperson", tmp_path)
    # the scene is ignored (forced to 2, offset 0): both scenes' c03 become camid 3; time = frame / 24
    assert _by_name(data.train) == {
        "000001_s05_c03_f000240.jpg": (0, 3, 10.0),
        "000004_s00_c03_f000048.jpg": (1, 3, 2.0),
    }
    assert _by_name(data.query) == {"000100_s01_c00_f000024.jpg": (100, 0, 1.0)}
    assert _by_name(data.gallery) == {"000100_s01_c05_f000072.jpg": (100, 5, 3.0)}
    assert data.junk_dropped["gallery"] == 1
    with pytest.raises(QAConvError, match="combine_all"):
        load_benchmark("clonedperson", tmp_path, combine_all=True)


@pytest.mark.parametrize(
    "name,folder",
    [
        ("market", "Market-1501"),
        ("market", "market1501"),
        ("market", "market"),
        ("market", "MARKET-1501"),
        ("duke", "dukemtmc-reid"),
        ("duke", "duke"),
        ("msmt17", "MSMT17"),
        ("msmt", "msmt"),
        ("cuhk03_np_detected", "cuhk03_np_detected"),
        ("cuhk03_np_labeled", "CUHK03-NP/labeled"),
        ("randperson", "randperson"),
        ("clonedperson", "clonedperson"),
    ],
)
def test_find_root_variants(tmp_path, name, folder):
    (tmp_path / folder).mkdir(parents=True)
    assert find_root(name, tmp_path) == tmp_path / folder


def test_market_variant_loads(tmp_path):
    _market_tree(tmp_path, "market")
    assert load_benchmark("market", tmp_path).root == str(tmp_path / "market")


def test_aliases():
    assert BENCHMARKS["msmt"] is BENCHMARKS["msmt17"] and BENCHMARKS["market1501"] is BENCHMARKS["market"]


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(QAConvError, match="unknown benchmark 'marketx'.*valid names.*market.*msmt17"):
        load_benchmark("marketx", tmp_path)


def test_missing_folder_names_candidates_and_contents(tmp_path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(QAConvError) as err:
        load_benchmark("market", tmp_path)
    msg = str(err.value)
    assert "Market-1501-v15.09.15" in msg and "market1501" in msg and "something_else/" in msg
    with pytest.raises(QAConvError, match="does not exist"):
        load_benchmark("market", tmp_path / "nope")


def test_misnamed_inner_folder(tmp_path):
    root = tmp_path / "Market-1501"
    for sub in ("bounding_box_train", "query", "gallery"):
        (root / sub).mkdir(parents=True)
    with pytest.raises(QAConvError) as err:
        load_benchmark("market", tmp_path)
    msg = str(err.value)
    assert "missing bounding_box_test" in msg and "gallery/" in msg and "\n" not in msg
    with pytest.raises(
        QAConvError, match="expected train/ \\+ test/ or mask_train_v2/ \\+ mask_test_v2/.*found images/"
    ):
        (tmp_path / "MSMT17" / "images").mkdir(parents=True)
        load_benchmark("msmt17", tmp_path)
    with pytest.raises(QAConvError, match="expected randperson_subset/.*found images/"):
        (tmp_path / "randperson" / "images").mkdir(parents=True)
        load_benchmark("randperson", tmp_path)


def test_bad_file_names_quote_first_three(tmp_path):
    root = tmp_path / "DukeMTMC-reID"
    _touch(root / "bounding_box_train", "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    (root / "query").mkdir()
    (root / "bounding_box_test").mkdir()
    with pytest.raises(QAConvError) as err:
        load_benchmark("duke", tmp_path)
    msg = str(err.value)
    assert "4 file name(s)" in msg and "PID_cC_fFRAME" in msg and "a.jpg, b.jpg, c.jpg" in msg and "d.jpg" not in msg


def test_bad_list_line_gives_file_and_line(tmp_path):
    root = _msmt_tree(tmp_path)
    (root / "list_val.txt").write_text("0002/0002_010_15_0304afternoon_0200_0.jpg 2\nbroken_line\n")
    with pytest.raises(QAConvError, match=r"list_val\.txt:2: expected 'relative/path\.jpg PID'.*broken_line"):
        load_benchmark("msmt17", tmp_path)


def test_combine_all_refused_outside_msmt(tmp_path):
    _market_tree(tmp_path)
    with pytest.raises(QAConvError, match="combine_all is not supported for 'market'"):
        load_benchmark("market", tmp_path, combine_all=True)


def test_combine_disjoint_pids_and_cameras(tmp_path):
    _market_tree(tmp_path)
    _cuhk_tree(tmp_path)
    (tmp_path / "RandPerson" / "randperson_subset").mkdir(parents=True)
    _touch(tmp_path / "RandPerson" / "randperson_subset", "00000003_s01_c01_f000024.jpg")
    market = load_benchmark("market", tmp_path)
    cuhk = load_benchmark("cuhk03_np_detected", tmp_path)
    rand = load_benchmark("randperson", tmp_path)
    pooled = combine([market, cuhk, rand])
    # market: pids 0,1 cams 0,1; cuhk: pids 0,1 -> 2,3 cams 0,1 -> 2,3; randperson: pid 0 -> 4, cam 3 -> 4 + 3 = 7
    assert [(r.pid, r.camid) for r in pooled.train] == [(0, 0), (0, 0), (1, 1), (2, 2), (3, 3), (4, 7)]
    assert pooled.query == [] and pooled.gallery == []
    assert not pooled.has_time
    assert combine([market, rand]).has_time
    with pytest.raises(QAConvError):
        combine([])
