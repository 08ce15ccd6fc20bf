import json

import pytest

from qaconv.data.market import ReidDataset
from qaconv.data.records import Record
from qaconv.data.validate import check_evaluable, format_info, protocol_report
from qaconv.errors import QAConvError


def _recs(rows, t0=None):
    return [Record(f"{pid}_{i}.jpg", pid, cam, None if t0 is None else t0 + i) for i, (pid, cam) in enumerate(rows)]


def _dataset(with_time=True):
    t = (lambda x: x) if with_time else (lambda x: None)
    train = _recs([(0, 0), (0, 1), (0, 1), (1, 0), (2, 3)], t(1.0))
    query = _recs([(10, 0), (10, 1), (11, 0), (12, 2), (11, 1)], t(10.0))
    gallery = _recs([(10, 1), (12, 2), (12, 2), (13, 0)], t(20.0))
    return ReidDataset("toy", "/toy", train, query, gallery, with_time, {"train": 0, "query": 1, "gallery": 2})


def test_protocol_report_numbers():
    rep = protocol_report(_dataset())
    assert rep["splits"]["train"] == {
        "ids": 3,
        "images": 5,
        "cameras": 3,
        "camera_ids": [0, 1, 3],
        "camera_labels": ["c1", "c2", "c4"],
        "time_range": [1.0, 5.0],
    }
    assert rep["splits"]["query"] == {
        "ids": 3,
        "images": 5,
        "cameras": 3,
        "camera_ids": [0, 1, 2],
        "camera_labels": ["c1", "c2", "c3"],
        "time_range": [10.0, 14.0],
    }
    assert rep["splits"]["gallery"]["ids"] == 3 and rep["splits"]["gallery"]["images"] == 4
    assert rep["splits"]["gallery"]["cameras"] == 3 and rep["splits"]["gallery"]["time_range"] == [20.0, 23.0]
    # only query (10, cam 0) is evaluable; 11 has no gallery image; 10 (cam 1) and 12 only same camera
    assert rep["queries_not_evaluable"] == 4
    assert rep["not_evaluable_ids_absent"] == 1
    assert rep["not_evaluable_ids_same_camera"] == 2
    assert rep["train_single_image_ids"] == 2
    assert rep["empty_splits"] == []
    assert rep["junk_dropped"] == {"train": 0, "query": 1, "gallery": 2}
    assert len(rep["warnings"]) == 2
    assert rep["warnings"][0].startswith("4 of 5 queries have no gallery image")
    assert "1 identities have no gallery image at all, 2 only from the query's own camera" in rep["warnings"][0]
    assert rep["warnings"][1].startswith("2 of 3 train identities have a single image")
    json.dumps(rep)


def test_format_info():
    ds = _dataset()
    text = format_info(ds, protocol_report(ds))
    lines = text.splitlines()
    assert lines[0] == "dataset toy (/toy): training and evaluation"
    assert "train" in lines[1] and "3 ids" in lines[1] and "5 images" in lines[1] and "time 1.0-5.0 s" in lines[1]
    assert "(1 junk dropped)" in lines[2] and "(2 junk dropped)" in lines[3]
    assert sum(line.startswith("warning: ") for line in lines) == 2

    ds = _dataset(with_time=False)
    text = format_info(ds, protocol_report(ds))
    assert text.count("no time stamps") == 3


def test_empty_splits_and_clean_dataset():
    train = _recs([(0, 0), (0, 1)])
    ds = ReidDataset("t", "/t", train, [], [], False)
    rep = protocol_report(ds)
    assert rep["empty_splits"] == ["query", "gallery"] and rep["use"] == "training only"
    assert rep["warnings"] == []  # a training set needs no query or gallery
    assert rep["queries_not_evaluable"] == 0 and rep["splits"]["query"]["time_range"] is None

    rep = protocol_report(ReidDataset("t", "/t", train, _recs([(5, 0)]), [], False))
    assert rep["warnings"] == ["empty split: gallery (the query images cannot be evaluated without it)"]
    rep = protocol_report(ReidDataset("t", "/t", [], _recs([(5, 0)]), [], False))
    assert rep["warnings"] == ["empty split(s): train, gallery: nothing to train on or to evaluate"]
    assert rep["use"] == "neither training nor evaluation"

    clean = ReidDataset("c", "/c", train, _recs([(5, 0)]), _recs([(5, 1)]), False)
    rep = protocol_report(clean)
    assert rep["warnings"] == []
    assert "no problems found" in format_info(clean, rep)


def test_check_evaluable_counts():
    ds = _dataset()
    assert check_evaluable(ds.query, ds.gallery) == 4
    assert check_evaluable(_recs([(1, 0)]), _recs([(1, 1)])) == 0


def test_check_evaluable_raises_with_explanation():
    query = _recs([(1, 0), (2, 0), (3, 0)])
    gallery = _recs([(1, 0), (1, 0), (2, 0)])  # all cameras equal: nothing evaluable
    with pytest.raises(QAConvError) as info:
        check_evaluable(query, gallery)
    msg = str(info.value)
    assert msg.startswith("none of the 3 queries can be evaluated")
    assert "another camera" in msg and "1 query identities have no gallery image at all" in msg
    assert "2 have gallery images only from the query's own camera" in msg and "\n" not in msg
    with pytest.raises(QAConvError, match="query split is empty"):
        check_evaluable([], gallery)
    with pytest.raises(QAConvError, match="gallery split is empty"):
        check_evaluable(query, [])


def test_report_flags_all_non_evaluable():
    ds = ReidDataset("x", "/x", _recs([(0, 0), (0, 1)]), _recs([(1, 0)]), _recs([(1, 0)]), False)
    assert "(no query can be evaluated)" in protocol_report(ds)["warnings"][0]


def test_evaluation_only_set_has_no_empty_train_warning():
    """Only query and gallery (an evaluation manifest): no warning about the empty train split."""
    ds = ReidDataset("e", "/e", [], _recs([(5, 0), (6, 0)]), _recs([(5, 1), (6, 2)]), False, cam_labels={
        0: "door", 1: "street", 2: "yard"})
    rep = protocol_report(ds)
    assert rep["warnings"] == [] and rep["empty_splits"] == ["train"] and rep["use"] == "evaluation only"
    assert rep["splits"]["gallery"]["camera_labels"] == ["street", "yard"]
    text = format_info(ds, rep)
    assert "evaluation only" in text and "no problems found" in text and "warning" not in text
    assert "cameras: street, yard" in text
