import pytest
from PIL import Image

from qaconv.data.manifest import load_manifest
from qaconv.errors import QAConvError


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8)).save(path)
    return path


def _write(tmp_path, text, name="m.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_full_manifest(tmp_path):
    for n in "abcdef":
        _img(tmp_path / "imgs" / f"{n}.jpg")
    absolute = _img(tmp_path / "elsewhere" / "z.png")
    csv = _write(
        tmp_path,
        "Path, PID ,camid,time,split,extra\n"
        "imgs/a.jpg,10,cam_b,1.5,train,x\n"
        "imgs/b.jpg,10,cam_a,2,TRAIN,x\n"
        "\n"
        "imgs/c.jpg,3,cam_c,0,train,x\n"
        f"{absolute},7,cam_a,4,query,x\n"
        "imgs/d.jpg,7,cam_b,5.25,gallery,x\n"
        "imgs/e.jpg,-1,cam_b,6,gallery,x\n"
        "imgs/f.jpg,0,cam_c,7,gallery,x\n",
    )
    ds = load_manifest(csv)
    assert ds.name == "m" and ds.root == str(tmp_path)
    assert [(r.pid, r.camid, r.time) for r in ds.train] == [(1, 1, 1.5), (1, 0, 2.0), (0, 2, 0.0)]
    assert ds.train[0].path == str(tmp_path / "imgs" / "a.jpg")
    assert [(r.path, r.pid, r.camid) for r in ds.query] == [(str(absolute), 7, 0)]
    assert [(r.pid, r.camid, r.time) for r in ds.gallery] == [(7, 1, 5.25), (0, 2, 7.0)]
    assert ds.has_time
    assert ds.junk_dropped == {"train": 0, "query": 0, "gallery": 1}
    assert load_manifest(csv, name="mine").name == "mine"


def test_no_split_all_train_and_numeric_camids(tmp_path):
    for n in "abc":
        _img(tmp_path / f"{n}.jpg")
    # integer camids sort numerically: 2 < 10
    ds = load_manifest(_write(tmp_path, "camid,pid,path\n10,5,a.jpg\n2,5,b.jpg\n2,9,c.jpg\n"))
    assert [(r.pid, r.camid, r.time) for r in ds.train] == [(0, 1, None), (0, 0, None), (1, 0, None)]
    assert ds.query == [] and ds.gallery == [] and not ds.has_time


def test_zero_based_camids_unchanged(tmp_path):
    for n in "abc":
        _img(tmp_path / f"{n}.jpg")
    ds = load_manifest(_write(tmp_path, "path,pid,camid\na.jpg,1,0\nb.jpg,1,2\nc.jpg,1,1\n"))
    assert [r.camid for r in ds.train] == [0, 2, 1]


def test_has_time_false_when_one_time_missing(tmp_path):
    for n in "ab":
        _img(tmp_path / f"{n}.jpg")
    ds = load_manifest(_write(tmp_path, "path,pid,camid,time\na.jpg,1,0,3\nb.jpg,1,1,\n"))
    assert not ds.has_time and ds.train[1].time is None and ds.train[0].time == 3.0


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("path,pid\na.jpg,1\n", r"m\.csv:1: missing required column\(s\) 'camid'"),
        ("path,camid,time\na.jpg,1,2\n", r"m\.csv:1: missing required column\(s\) 'pid'"),
        ("path,pid,camid\na.jpg,1,0\na.jpg,x7,0\n", r"m\.csv:3: column 'pid' must be an integer.*, got 'x7'"),
        ("path,pid,camid\na.jpg,100000000000000000000000,0\n", r"m\.csv:2: column 'pid' must be an integer from -1"),
        ("path,pid,camid\na.jpg,1e23,0\n", r"m\.csv:2: column 'pid' must be an integer from -1.*'1e23'"),
        ("path,pid,camid\na.jpg,-5,0\n", r"m\.csv:2: column 'pid' must be an integer from -1"),
        ('path,pid,camid\na.jpg,1,0\n"b.jpg,2,0\nc.jpg,3,0\n', r"m\.csv:3: unbalanced quote \(a quoted field runs"),
        ("path,pid,camid\na.jpg,1,0\nb.jpg,2,1\na.jpg,1,0\n", r"m\.csv:4: image .*a\.jpg is listed twice \(first"),
        ("path,pid,camid\na.jpg,1.5,0\n", r"m\.csv:2: column 'pid' must be an integer"),
        ("path,pid,camid,time\na.jpg,1,0,noon\n", r"m\.csv:2: column 'time' must be a number of seconds.*'noon'"),
        ("path,pid,camid,time\na.jpg,1,0,nan\n", r"m\.csv:2: column 'time'"),
        ("path,pid,camid,split\na.jpg,1,0,test\n", r"m\.csv:2: column 'split' must be one of train, query, gallery"),
        ("path,pid,camid\na.jpg,1,\n", r"m\.csv:2: column 'camid' is empty"),
        ("", r"m\.csv:1: manifest is empty"),
        ("path,pid,camid\n", r"header but no rows"),
    ],
)
def test_errors(tmp_path, text, pattern):
    _img(tmp_path / "a.jpg")
    with pytest.raises(QAConvError, match=pattern) as info:
        load_manifest(_write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_files_lists_first_three(tmp_path):
    _img(tmp_path / "a.jpg")
    rows = "".join(f"gone{i}.jpg,1,0\n" for i in range(5))
    csv = _write(tmp_path, "path,pid,camid\na.jpg,1,0\n" + rows)
    with pytest.raises(QAConvError) as info:
        load_manifest(csv)
    msg = str(info.value)
    assert msg.startswith("5 image file(s) in column 'path' do not exist")
    assert f"{csv}:3: {tmp_path / 'gone0.jpg'}" in msg and f"{csv}:5: " in msg
    assert "gone3" not in msg and msg.endswith("and 2 more")
    assert "\n" not in msg


def test_missing_manifest(tmp_path):
    with pytest.raises(QAConvError, match="manifest .*nope.csv does not exist"):
        load_manifest(tmp_path / "nope.csv")
