"""Consistency across commands: one set of image types (skipped files counted and named), data generated only
when named and then into the cache folder, the user's camera labels and short test-set names, layout errors
that ask only for the splits needed, and extractors that carry their checkpoint."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qaconv.data.synth
from qaconv import gallery as gal
from qaconv.cli import main
from qaconv.data.filetypes import IMAGE_SUFFIXES, check_image_file, describe_skipped, list_image_files
from qaconv.data.images import read_rgb
from qaconv.data.records import MARKET_NAME
from qaconv.data.registry import cache_dir, load_dataset
from qaconv.errors import QAConvError
from qaconv.extractor import FeatureExtractor
from qaconv.names import short_names

TYPES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # the list, written out


def _image(path, seed=0):
    """A real 32x64 RGB image in the format its extension names (PIL has a writer for every one of TYPES)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(path)
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from qaconv.engine.checkpoint import save_checkpoint
    from qaconv.engine.runner import DEFAULTS, build_model

    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16}
    torch.manual_seed(0)
    model, matcher = build_model(cfg)
    path = tmp_path_factory.mktemp("model") / "checkpoint.pt"
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    """A folder with one image of each type (Market-style names, camera c1..c7), upper-case variants, a
    sub-folder, two non-image files and a hidden file."""
    root = tmp_path_factory.mktemp("types")
    for i, ext in enumerate(TYPES):
        _image(root / f"{i + 1:04d}_c{i + 1}s1_{100 * i:06d}_00{ext}", i)
    _image(root / "sub" / "0008_c1s1_000700_00.JPG", 8)
    _image(root / "sub" / "0009_c2s1_000800_00.WebP", 9)
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / "sub" / "anim.gif")  # an image, but not of an accepted type
    _image(root / ".hidden.jpg")
    return root


# ------------------------------------------------------------------------------------------- image types
def test_one_constant_for_every_image_type():
    from qaconv.data import images, market

    assert IMAGE_SUFFIXES == TYPES
    assert images.IMAGE_SUFFIXES is IMAGE_SUFFIXES and market.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    for ext in TYPES:
        assert MARKET_NAME.match(f"0001_c1s1_000100_00{ext.upper()}")
    assert not MARKET_NAME.match("0001_c1s1_000100_00.gif")


def test_the_index_help_lists_every_type(capsys):
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(ext in help_text for ext in TYPES)


def test_every_type_is_listed_and_decoded_and_the_rest_named(every_type):
    images, skipped = list_image_files(every_type)
    assert sorted(p.suffix for p in images) == sorted(TYPES) and [p.name for p in skipped] == ["notes.txt"]
    images, skipped = list_image_files(every_type, recursive=True)
    assert len(images) == 9 and sorted(p.name for p in skipped) == ["anim.gif", "notes.txt"]
    for p in images:
        img = read_rgb(str(p))
        assert img.mode == "RGB" and img.size == (32, 64)
    rel = gal.list_images(every_type, skipped := [])
    assert len(rel) == 9 and "sub/0009_c2s1_000800_00.WebP" in rel and ".hidden.jpg" not in rel
    assert skipped == ["notes.txt", "sub/anim.gif"]


def test_skipped_files_are_counted_and_the_first_named():
    assert describe_skipped([]) == ""
    text = describe_skipped([f"f{i}.txt" for i in range(5)], "in gal")
    assert text.startswith("skipped 5 non-image file(s) in gal (not .jpg, ")
    assert text.endswith("f0.txt, f1.txt, f2.txt, ...")


def test_missing_path_and_wrong_type_are_told_apart(tmp_path):
    with pytest.raises(QAConvError, match=r"^image .*nothing\.jpg does not exist$"):
        check_image_file(tmp_path / "nothing.jpg")
    with pytest.raises(QAConvError, match="is a folder, not an image file"):
        check_image_file(tmp_path)
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(QAConvError, match=r"a\.gif is not an image file \(expected \.jpg, \.jpeg, .*\.tiff\)$"):
        check_image_file(tmp_path / "a.gif", "query")
    for ext in TYPES:
        assert check_image_file(_image(tmp_path / f"x{ext.upper()}")) == tmp_path / f"x{ext.upper()}"


def _eval_folder(root: Path, extra: bool = True) -> Path:
    """Only query/ and bounding_box_test/ (an evaluation-only Market-layout folder), every image type in both."""
    for i, ext in enumerate(TYPES):
        _image(root / "query" / f"{i + 1:04d}_c1s1_{100 * i:06d}_00{ext}", i)
        _image(root / "bounding_box_test" / f"{i + 1:04d}_c2s1_{100 * i + 50:06d}_00{TYPES[-1 - i]}", 10 + i)
    if extra:
        (root / "query" / "notes.txt").write_text("x")
        (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0")
    return root


def test_market_layout_reads_every_type_names_skipped_files_and_asks_only_for_needed_splits(tmp_path, capsys):
    root = _eval_folder(tmp_path / "cams")
    data = load_dataset(str(root), require=("query", "gallery"))
    assert data.name == "cams" and data.train == []
    assert sorted(Path(r.path).suffix for r in data.query) == sorted(TYPES) and len(data.gallery) == 7
    assert data.skipped == ["query/notes.txt", "bounding_box_test/Thumbs.db"]
    assert "skipped 2 non-image file(s)" in data.summary() and "notes.txt" in data.summary()
    assert [data.cam_label(c) for c in (0, 1)] == ["c1", "c2"]
    # training needs bounding_box_train and says so; evaluation never asks for it
    with pytest.raises(QAConvError, match="missing bounding_box_train"):
        load_dataset(str(root), require=("train",))
    (root / "query").rename(root / "queries")
    with pytest.raises(QAConvError) as info:
        load_dataset(str(root), require=("query", "gallery"))
    assert "missing query" in str(info.value) and "bounding_box_train" not in str(info.value)
    assert "found bounding_box_test, queries" in str(info.value)


def test_evaluation_reports_a_layout_error_without_bounding_box_train(tmp_path, ckpt, capsys):
    root = tmp_path / "cams"
    _image(root / "bounding_box_test" / "0001_c2s1_000100_00.jpg")
    assert main(["evaluate", "--checkpoint", ckpt, "--testsets", str(root), "--device", "cpu", "--workers", "0"]) == 1
    err = _error(capsys)
    assert "missing query" in err and "bounding_box_train" not in err


def test_data_info_on_an_evaluation_only_folder_and_manifest(tmp_path, capsys):
    root = _eval_folder(tmp_path / "cams")
    assert main(["data", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "evaluation only" in out and "warning" not in out and "no problems found" in out
    assert "skipped 2 non-image file(s)" in out and "notes.txt" in out and "unreadable images: 0" in out
    # a manifest with only query and gallery rows, user camera names
    rows = [("path", "pid", "camid", "split")]
    rows += [(f"cams/query/{p.name}", p.name[:4], "street", "query") for p in sorted((root / "query").glob("0*"))]
    rows += [(f"cams/bounding_box_test/{p.name}", p.name[:4], "door", "gallery")
             for p in sorted((root / "bounding_box_test").glob("0*"))]
    with open(tmp_path / "eval.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    assert main(["data", "info", str(tmp_path / "eval.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["warnings"] == [] and report["use"] == "evaluation only" and report["unreadable_images"] == 0
    assert report["splits"]["query"]["camera_labels"] == ["street"]
    assert report["splits"]["gallery"]["camera_labels"] == ["door"]
    assert main(["data", "info", str(tmp_path / "eval.csv"), "--no-scan"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "cameras: street" in out and "cameras: door" in out


def test_manifest_tells_a_missing_file_from_a_non_image(tmp_path):
    for ext in TYPES:
        _image(tmp_path / f"a{ext}")
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    good = "path,pid,camid\n" + "".join(f"a{ext},1,{i % 2}\n" for i, ext in enumerate(TYPES))
    (tmp_path / "m.csv").write_text(good)
    assert sorted(Path(r.path).suffix for r in load_dataset(str(tmp_path / "m.csv")).train) == sorted(TYPES)
    (tmp_path / "m.csv").write_text(good + "clip.gif,2,0\n")
    with pytest.raises(QAConvError, match=r"1 file\(s\) in column 'path' are not image files \(expected \.jpg.*"
                                          r"m\.csv:9: .*clip\.gif"):
        load_dataset(str(tmp_path / "m.csv"))
    (tmp_path / "m.csv").write_text(good + "gone.jpg,2,0\n")
    with pytest.raises(QAConvError, match=r"1 image file\(s\) in column 'path' do not exist"):
        load_dataset(str(tmp_path / "m.csv"))


def test_index_search_and_match_take_every_type(every_type, ckpt, tmp_path, capsys):
    store = tmp_path / "g.store"
    assert main(["index", str(every_type), "--checkpoint", ckpt, "-o", str(store), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "added 9 images" in out
    assert "skipped 2 non-image file(s)" in out and "notes.txt" in out and "sub/anim.gif" in out
    queries = [str(p) for p in sorted(every_type.glob("0*"))]  # .jpg ... .tiff
    assert main(["search", *queries, "--index", str(store), "--checkpoint", ckpt, "--device", "cpu", "--json",
                 "--top", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [Path(r["query"]).suffix for r in res] == [Path(q).suffix for q in queries] and len(queries) == 7
    # a query folder: its images searched, the other files named on stderr
    assert main(["search", str(every_type / "sub"), "--index", str(store), "--checkpoint", ckpt, "--device", "cpu",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 2 and "skipped 1 non-image file(s)" in captured.err
    assert "anim.gif" in captured.err
    for a, b in ((".tif", ".bmp"), (".webp", ".tiff")):
        pa, pb = (next(every_type.glob(f"*{e}")) for e in (a, b))
        assert main(["match", str(pa), str(pb), "--checkpoint", ckpt, "--device", "cpu", "-o",
                     str(tmp_path / "m.png")]) == 0
        assert "QAConv logit" in capsys.readouterr().out
    assert main(["match", str(tmp_path / "gone.jpg"), queries[0], "--checkpoint", ckpt]) == 1
    assert _error(capsys).endswith("gone.jpg does not exist")
    assert main(["match", str(every_type / "sub" / "anim.gif"), queries[0], "--checkpoint", ckpt]) == 1
    assert "anim.gif is not an image file (expected .jpg" in _error(capsys)
    # a folder without any image: the error names what it found instead
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    assert main(["index", str(tmp_path / "docs"), "--checkpoint", ckpt, "-o", str(tmp_path / "d.store")]) == 1
    err = _error(capsys)
    assert "no images (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff)" in err and "a.txt" in err
    assert main(["index", str(tmp_path / "nowhere"), "--checkpoint", ckpt, "-o", str(tmp_path / "n.store")]) == 1
    assert _error(capsys).endswith("nowhere does not exist")


def test_serve_by_path_tells_missing_from_not_an_image(tmp_path):
    pytest.importorskip("fastapi")
    from qaconv.gallery.service import ServiceError, resolve_under

    _image(tmp_path / "p.webp")
    (tmp_path / "n.txt").write_text("x")
    assert resolve_under(tmp_path.resolve(), "p.webp") == (tmp_path / "p.webp").resolve()
    with pytest.raises(ServiceError) as info:
        resolve_under(tmp_path.resolve(), "n.txt")
    assert info.value.status == 415 and "not an image file" in str(info.value)
    with pytest.raises(ServiceError) as info:
        resolve_under(tmp_path.resolve(), "gone.jpg")
    assert info.value.status == 404 and "does not exist" in str(info.value)


# --------------------------------------------------------------------------- data only when named, in the cache
@pytest.fixture()
def tiny_synth(monkeypatch):
    """Synthetic domains generated at a few identities (the real generator, small sizes); records the calls."""
    real = qaconv.data.synth.generate_domain
    calls = []

    def small(domain, out, seed=0, progress=True, **kw):
        calls.append(Path(out))
        return real(domain, out, seed=seed, num_train_ids=4, num_test_ids=4, height=32, width=16, progress=False)

    monkeypatch.setattr(qaconv.data.synth, "generate_domain", small)
    return calls


def test_cache_folder_honours_xdg_cache_home_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "qaconv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "qaconv"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec: relative paths are ignored
    assert cache_dir() == tmp_path / "home" / ".cache" / "qaconv"


def test_evaluate_and_train_name_nothing_and_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 1
    err = _error(capsys)
    assert "no test sets given: pass --testsets NAME" in err
    assert "synth_A/synth_B/synth_C" in err and "CSV manifest" in err and "Market-1501 layout" in err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--testsets", " , "]) == 1
    assert "no test sets given" in _error(capsys)
    assert main(["train", "-o", str(tmp_path / "run"), "--pretrained", "none", "--ibn", "none"]) == 1
    err = _error(capsys)
    assert "no training set given: pass --dataset NAME" in err and "synth_A/synth_B/synth_C" in err
    assert list(tmp_path.iterdir()) == []  # no ./data, no run folder, no cache


def test_a_named_synthetic_domain_goes_to_the_cache_and_says_where(tmp_path, monkeypatch, capsys, tiny_synth):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "xdg" / "qaconv" / "synth_B"
    assert main(["data", "info", "synth_B", "--no-scan"]) == 0
    out = capsys.readouterr().out
    assert f"generating synthetic domain B into {folder}" in out and f"({folder})" in out
    assert tiny_synth == [folder] and list((tmp_path / "work").iterdir()) == []
    data = load_dataset("synth_b")  # found there again: not generated twice
    assert data.root == str(folder) and tiny_synth == [folder]
    # --data-dir, when given, holds synthetic domains too
    data = load_dataset("synth_C", tmp_path / "mine", progress=False)
    assert data.root == str(tmp_path / "mine" / "synth_C") and tiny_synth[-1] == tmp_path / "mine" / "synth_C"
    assert sorted(p.name for p in (tmp_path / "xdg" / "qaconv").iterdir()) == ["synth_B"]


def test_calibrate_and_data_info_default_to_no_data_dir():
    from qaconv.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["calibrate", "--checkpoint", "r", "--testsets", "x"]).data_dir is None
    assert parser.parse_args(["data", "info", "x"]).data_dir is None
    assert parser.parse_args(["evaluate", "--checkpoint", "r"]).data_dir is None
    assert parser.parse_args(["evaluate", "--checkpoint", "r"]).testsets is None


# ------------------------------------------------------------------------ camera labels and test-set names
def test_short_names_by_hand():
    assert short_names(["market", "synth_B"]) == {"market": "market", "synth_B": "synth_B"}
    assert short_names(["/d/x/cams.csv"]) == {"/d/x/cams.csv": "cams"}
    assert short_names(["/d/a/cams.csv", "/d/b/cams.csv"]) == {"/d/a/cams.csv": "a/cams", "/d/b/cams.csv": "b/cams"}
    assert short_names(["cams", "/d/cams"]) == {"cams": "cams", "/d/cams": "d/cams"}
    assert short_names(["a/m", "a//m"]) == {"a/m": "a/m", "a//m": "a/m#2"}
    assert short_names(["./x/", "x.csv"]) == {"./x/": "x", "x.csv": "x#2"}


@pytest.mark.parametrize("seed", range(3))
def test_short_names_are_unique_and_end_with_the_base_name(seed):
    rng = np.random.default_rng(seed)
    parts = ["a", "b", "cams", "cams.csv"]
    names = ["/".join(rng.choice(parts, size=rng.integers(1, 4))) for _ in range(12)]
    shown = short_names(names)
    assert set(shown) == set(names) and len(set(shown.values())) == len(shown)
    for name, s in shown.items():
        base = name.rsplit("/", 1)[-1].removesuffix(".csv")
        assert s.split("#")[0].rsplit("/", 1)[-1] == base


def _eval_manifest(folder: Path, cams=("street", "door")) -> Path:
    rows = [("path", "pid", "camid", "split")]
    for pid in range(1, 5):
        rows.append((_image(folder / f"q{pid}.png", pid).name, pid, cams[0], "query"))
        rows.append((_image(folder / f"g{pid}.webp", 10 + pid).name, pid, cams[1], "gallery"))
    rows.append((_image(folder / "g9.bmp", 99).name, 9, cams[1], "gallery"))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cams.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return folder / "cams.csv"


def test_reports_and_tables_use_camera_labels_and_short_unique_names(tmp_path, ckpt, capsys):
    a, b = _eval_manifest(tmp_path / "site_a"), _eval_manifest(tmp_path / "site_b", ("yard", "gate"))
    rep, out_dir = tmp_path / "rep", tmp_path / "out"
    argv = ["evaluate", "--checkpoint", ckpt, "--testsets", f"{a},{b}", "--report", str(rep), "--report-queries", "2",
            "--save-scores", "-o", str(out_dir), "--device", "cpu", "--workers", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = out[out.index("test set"):].splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["site_a/cams", "site_b/cams"]
    assert str(a) not in "\n".join(table)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["testset"], r["testset_source"]) for r in rows] == [("site_a/cams", str(a)), ("site_b/cams", str(b))]
    assert len(list(out_dir.glob("*_score.mat"))) == 2  # one file each: the short names do not collide
    page = (rep / "index.html").read_text()
    for label in ("street", "door", "yard", "gate"):
        assert f"cam {label}" in page  # image titles
    assert "· street</div>" in page and "· yard</div>" in page  # query captions
    assert not any(f"cam c{n} " in page or f"· c{n}</div>" in page for n in range(1, 9))
    assert "<h2>site_a/cams</h2>" in page and str(tmp_path) not in page.split("<h2>", 1)[1].split("</h2>")[0]
    # one test set: its base name alone
    assert main(["evaluate", "--checkpoint", ckpt, "--testsets", str(a), "--device", "cpu", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("cams ") for line in out.splitlines())


def test_pooled_training_sets_keep_their_camera_labels(tmp_path):
    for site, cams in (("x", ("street", "door")), ("y", ("yard", "gate"))):
        rows = "path,pid,camid\n" + "".join(f"{site}{i}.png,{i // 2},{cams[i % 2]}\n" for i in range(4))
        for i in range(4):
            _image(tmp_path / f"{site}{i}.png", i)
        (tmp_path / f"{site}.csv").write_text(rows)
    data = load_dataset(f"{tmp_path / 'x.csv'},{tmp_path / 'y.csv'}")
    assert sorted(data.cam_label(c) for c in {r.camid for r in data.train}) == ["x:door", "x:street", "y:gate",
                                                                                 "y:yard"]


# ------------------------------------------------------------------------- extractors carry their checkpoint
def test_extractor_carries_its_checkpoint(every_type, ckpt, tmp_path):
    ex = FeatureExtractor(Path(ckpt).parent, device="cpu")  # the run folder
    assert ex.checkpoint == str(Path(ckpt).parent.resolve())
    identity = gal.model_identity(ex)
    from_file = gal.model_identity(FeatureExtractor(ckpt, device="cpu"))
    assert identity["checkpoint"] == ex.checkpoint and from_file["checkpoint"] == str(Path(ckpt).resolve())
    assert {**from_file, "checkpoint": ex.checkpoint} == identity  # the same model, named by its own path
    index, report = gal.build_index(every_type, ex, progress=False)
    assert index.model_checkpoint == ex.checkpoint and report["not_images"] == ["notes.txt", "sub/anim.gif"]
    grown, report = gal.append_index(index, every_type, ex, progress=False)
    assert report["added"] == 0 and report["skipped"] == 9
    with pytest.raises(TypeError):  # the old signature (folder, extractor, checkpoint) fails loudly
        gal.build_index(every_type, ex, ckpt)
    bare = FeatureExtractor((ex.model, ex.matcher), device="cpu", height=64, width=32)
    assert bare.checkpoint is None and gal.model_identity(bare)["checkpoint"] == "(in-memory model)"
    assert gal.model_identity(bare)["hash"] != identity["hash"]  # no config: the input size alone is hashed
    store = gal.Gallery.create(tmp_path / "s.store", ckpt, device="cpu")
    assert store.model["checkpoint"] == str(Path(ckpt).resolve())

