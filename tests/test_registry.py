"""load_dataset routes names to the right loader; several names are pooled with disjoint ids and cameras."""

import pytest
from PIL import Image

from qaconv.data.registry import load_dataset
from qaconv.errors import QAConvError


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8)).save(path)


@pytest.fixture()
def data_dir(tmp_path):
    market = tmp_path / "Market-1501-v15.09.15"
    _img(market / "bounding_box_train" / "0002_c1s1_000100_00.jpg")
    _img(market / "bounding_box_train" / "0005_c3s1_000200_00.jpg")
    _img(market / "query" / "0009_c1s1_000300_00.jpg")
    _img(market / "bounding_box_test" / "0009_c2s1_000400_00.jpg")
    duke = tmp_path / "DukeMTMC-reID"
    _img(duke / "bounding_box_train" / "0001_c2_f0000100.jpg")
    _img(duke / "query" / "0003_c1_f0000200.jpg")
    _img(duke / "bounding_box_test" / "0003_c4_f0000300.jpg")
    own = tmp_path / "my_cameras"
    _img(own / "bounding_box_train" / "0001_c1s1_000001_00.jpg")
    _img(own / "query" / "0002_c1s1_000001_00.jpg")
    _img(own / "bounding_box_test" / "0002_c2s1_000001_00.jpg")
    return tmp_path


def test_benchmark_names_and_folders(data_dir):
    market = load_dataset("market", data_dir)
    assert market.root.endswith("Market-1501-v15.09.15") and [r.pid for r in market.train] == [0, 1]
    assert load_dataset("my_cameras", data_dir).num_train_pids == 1  # any folder in Market layout


def test_multi_source_pools_disjoint_ids_and_cameras(data_dir):
    pooled = load_dataset("market,duke", data_dir)
    pids = sorted(r.pid for r in pooled.train)
    cams = sorted(r.camid for r in pooled.train)
    # market: pids 0, 1 on cameras 0, 2 (3 cameras: 0..2); duke pid 0 -> 2, camera 1 -> 1 + 3 = 4
    assert pids == [0, 1, 2] and cams == [0, 2, 4]
    assert pooled.query == [] and pooled.gallery == []


def test_unknown_name_and_combine_all(data_dir):
    with pytest.raises(QAConvError, match="not found.*market, duke"):
        load_dataset("nowhere", data_dir)
    with pytest.raises(QAConvError, match="combine"):
        load_dataset("my_cameras", data_dir, combine_all=True)
