"""Loaders for the real re-id benchmarks, exact to the official QAConv protocols (spec sections 8.1 and 9).

Every loader returns a :class:`BenchmarkDataset` (a :class:`ReidDataset` with a ``found`` message):

* training pids are relabelled to 0..N-1 in sorted order of the raw pids, query/gallery keep raw pids;
* pid -1 (junk) is dropped and counted per split in ``junk_dropped``; Market's 0000 distractors stay in
  the gallery;
* camids are 0-based, ``time`` is in seconds (or None where the dataset has no time stamps).

Camera numbering on disk (what each loader subtracts):

* Market-1501 ``0002_c1s1_000451_03.jpg``: c1..c6, 1-based (camid = c - 1).
* DukeMTMC-reID ``0001_c2_f0046182.jpg``: c1..c8, 1-based (camid = c - 1).
* CUHK03-NP ``0001_c1_1.png``: c1..c2, 1-based (camid = c - 1).
* MSMT17 ``0000_000_01_0303morning_0015_0.jpg``: 3rd field 01..15, 1-based (camid = field - 1).
* RandPerson ``00000000_s00_c00_f000055.jpg``: scenes and cameras 0-based; camid =
  camera_offset[scene] + c (no subtraction).
* ClonedPerson ``000000_s00_c00_f000000.jpg``: cameras 0-based as on disk (camid = c; see the scene-2 quirk).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import QAConvError
from .filetypes import list_image_files
from .market import ReidDataset, load_market_layout
from .records import Record, relabel_pids

DUKE_FPS = 59.94
DUKE_CAM_OFFSETS = [5542, 3606, 27243, 31181, 0, 22401, 18967, 46765]
SYNTH_FPS = 24.0
RANDPERSON_CAM_OFFSETS = [0, 2, 4, 6, 8, 9, 10, 12, 13, 14, 15]
RANDPERSON_FRAME_OFFSETS = [0, 160000, 340000, 490000, 640000, 1070000, 1330000, 1590000, 1890000, 3190000, 3490000]
CLONEDPERSON_SCENE = 2  # the official loader overrides every scene with 2
CLONEDPERSON_CAM_OFFSET = 0  # its camera_offset[2]

MARKET_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
DUKE_NAME = re.compile(r"^(-?\d+)_c(\d+)_f(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
CUHK_NAME = re.compile(r"^(-?\d+)_c(\d+)(?:_[^.]*)?\.(jpg|jpeg|png)$", re.IGNORECASE)
RANDPERSON_NAME = re.compile(r"^(-?\d+)_s(\d+)_c(\d+)_f(\d+).*\.(jpg|jpeg|png)$", re.IGNORECASE)
CLONEDPERSON_NAME = re.compile(r"^(-?\d+)_s(-?\d+)_c(-?\d+)_f(-?\d+).*\.(jpg|jpeg|png)$", re.IGNORECASE)

MSMT_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
MSMT_LAYOUTS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}

FOLDER_CANDIDATES: dict[str, list[str]] = {
    "market": ["Market-1501-v15.09.15", "Market-1501", "market1501", "market"],
    "duke": ["DukeMTMC-reID", "dukemtmc-reid", "DukeMTMC", "dukemtmcreid", "duke"],
    "cuhk03_np_detected": [
        "cuhk03-np/detected",
        "cuhk03_np/detected",
        "cuhk03np/detected",
        "cuhk03_np_detected",
        "cuhk03-np-detected",
    ],
    "cuhk03_np_labeled": [
        "cuhk03-np/labeled",
        "cuhk03_np/labeled",
        "cuhk03np/labeled",
        "cuhk03_np_labeled",
        "cuhk03-np-labeled",
    ],
    "msmt17": ["MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17", "msmt"],
    "randperson": ["randperson", "RandPerson"],
    "clonedperson": ["ClonedPerson", "clonedperson"],
}

ALIASES = {
    "market1501": "market",
    "market_1501": "market",
    "dukemtmc": "duke",
    "dukemtmc_reid": "duke",
    "dukemtmcreid": "duke",
    "cuhk03_np": "cuhk03_np_detected",
    "cuhk03_detected": "cuhk03_np_detected",
    "cuhk03_labeled": "cuhk03_np_labeled",
    "msmt": "msmt17",
    "msmt17_v1": "msmt17",
    "msmt17_v2": "msmt17",
    "rand_person": "randperson",
    "cloned_person": "clonedperson",
}


@dataclass
class BenchmarkDataset(ReidDataset):
    """A :class:`ReidDataset` plus a one-line ``found`` message (which folder and layout were read)."""

    found: str = ""


# ------------------------------------------------------------------------------------------ helpers


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in FOLDER_CANDIDATES:
        raise QAConvError(f"unknown benchmark '{name}'; valid names: {', '.join(sorted(BENCHMARKS))}")
    return key


def _resolve(base: Path, relative: str) -> Path | None:
    """``base/relative`` matching each path component exactly, else case-insensitively."""
    current = base
    for part in relative.split("/"):
        exact = current / part
        if exact.is_dir():
            current = exact
            continue
        if not current.is_dir():
            return None
        matches = sorted(p for p in current.iterdir() if p.is_dir() and p.name.lower() == part.lower())
        if not matches:
            return None
        current = matches[0]
    return current


def _listing(folder: Path, limit: int = 10) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing (empty folder)"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def find_root(name: str, data_dir: str | Path) -> Path:
    """The dataset folder of benchmark ``name`` under ``data_dir`` (first matching folder-name variant)."""
    key = _canonical(name)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise QAConvError(f"data directory {data_dir} does not exist (looked for benchmark '{key}' in it)")
    for candidate in FOLDER_CANDIDATES[key]:
        found = _resolve(data_dir, candidate)
        if found is not None:
            return found
    raise QAConvError(
        f"benchmark '{key}' not found in {data_dir}: looked for {', '.join(FOLDER_CANDIDATES[key])}; "
        f"{data_dir} holds {_listing(data_dir)}"
    )


def _require_dirs(root: Path, layout: str, subdirs: list[str]) -> None:
    missing = [sub for sub in subdirs if not (root / sub).is_dir()]
    if missing:
        raise QAConvError(
            f"{root} is not in {layout} layout: expected {', '.join(s + '/' for s in subdirs)}; "
            f"missing {', '.join(missing)}; found {_listing(root)}"
        )


def _parse_names(folder: Path, pattern: re.Pattern, rule: str, skipped: list[str]) -> list[tuple[Path, re.Match]]:
    """(path, match) of every image in ``folder``; non-image files are appended to ``skipped``."""
    parsed, bad = [], []
    images, others = list_image_files(folder)
    skipped += [f"{folder.name}/{p.name}" for p in others]
    for path in images:
        m = pattern.match(path.name)
        if m is None:
            bad.append(path.name)
        else:
            parsed.append((path, m))
    if bad:
        raise QAConvError(f"{len(bad)} file name(s) in {folder} do not follow the rule {rule}: {', '.join(bad[:3])}")
    return parsed


def _drop_junk(records: list[Record]) -> tuple[list[Record], int]:
    kept = [r for r in records if r.pid != -1]
    return kept, len(records) - len(kept)


def _build(
    name: str,
    root: Path,
    splits: dict[str, list[Record]],
    has_time: bool,
    found: str,
    junk_extra: dict[str, int] | None = None,
    skipped: list[str] | None = None,
) -> BenchmarkDataset:
    junk = dict(junk_extra or {})
    kept = {}
    for split in ("train", "query", "gallery"):
        kept[split], dropped = _drop_junk(splits.get(split, []))
        junk[split] = junk.get(split, 0) + dropped
    return BenchmarkDataset(
        name=name,
        root=str(root),
        train=relabel_pids(kept["train"]),
        query=kept["query"],
        gallery=kept["gallery"],
        has_time=has_time,
        junk_dropped=junk,
        skipped=list(skipped or []),
        found=found,
    )


def _no_combine_all(name: str, combine_all: bool) -> None:
    if combine_all:
        raise QAConvError(f"combine_all is not supported for '{name}' (only msmt17 has an 'all' training setting)")


# ------------------------------------------------------------------------------------------ readers


def read_market(root: str | Path) -> BenchmarkDataset:
    """Market-1501 (cameras c1..c6 1-based on disk); time = session-chained frame / 25 with the official quirk."""
    root = Path(root)
    _require_dirs(root, "Market-1501", list(MARKET_SPLITS.values()))
    data = load_market_layout(root, name="market")
    values = {f.name: getattr(data, f.name) for f in fields(ReidDataset)}
    return BenchmarkDataset(**values, found=f"market: Market-1501 layout in {root}")


def read_duke(root: str | Path) -> BenchmarkDataset:
    """DukeMTMC-reID (cameras c1..c8 1-based on disk); time = (frame + offset[camid]) / 59.94."""
    root = Path(root)
    _require_dirs(root, "DukeMTMC-reID (Market-style)", list(MARKET_SPLITS.values()))
    rule = "'PID_cC_fFRAME.jpg' (e.g. 0001_c2_f0046182.jpg)"
    splits: dict[str, list[Record]] = {}
    skipped: list[str] = []
    for split, sub in MARKET_SPLITS.items():
        recs = []
        for path, m in _parse_names(root / sub, DUKE_NAME, rule, skipped):
            cam = int(m.group(2))
            if not 1 <= cam <= len(DUKE_CAM_OFFSETS):
                raise QAConvError(f"{path}: DukeMTMC-reID cameras are c1..c8, got c{cam}")
            camid = cam - 1
            time = (int(m.group(3)) + DUKE_CAM_OFFSETS[camid]) / DUKE_FPS
            recs.append(Record(str(path), int(m.group(1)), camid, time))
        splits[split] = recs
    return _build("duke", root, splits, True, f"duke: DukeMTMC-reID layout in {root}", skipped=skipped)


def read_cuhk03_np(root: str | Path, name: str = "cuhk03_np_detected") -> BenchmarkDataset:
    """CUHK03-NP detected or labeled (cameras c1/c2 1-based on disk); no time stamps."""
    root = Path(root)
    _require_dirs(root, "CUHK03-NP (Market-style)", list(MARKET_SPLITS.values()))
    rule = "'PID_cC_N.png' (e.g. 0001_c1_1.png)"
    skipped: list[str] = []
    splits = {
        split: [
            Record(str(path), int(m.group(1)), int(m.group(2)) - 1, None)
            for path, m in _parse_names(root / sub, CUHK_NAME, rule, skipped)
        ]
        for split, sub in MARKET_SPLITS.items()
    }
    return _build(name, root, splits, False, f"{name}: CUHK03-NP layout in {root}", skipped=skipped)


def _msmt_layout(root: Path) -> str:
    for version, (train_dir, test_dir) in MSMT_LAYOUTS.items():
        if (root / train_dir).is_dir() and (root / test_dir).is_dir():
            return version
    expected = " or ".join(f"{a}/ + {b}/" for a, b in MSMT_LAYOUTS.values())
    raise QAConvError(
        f"{root} is not in MSMT17 layout: expected {expected} with {', '.join(MSMT_LISTS)}; found {_listing(root)}"
    )


def _read_msmt_list(list_file: Path, image_dir: Path) -> list[Record]:
    records = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        fields_ = Path(parts[0]).name.split("_") if parts else []
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]) or len(fields_) < 3 or not fields_[2].isdigit():
            raise QAConvError(
                f"{list_file}:{lineno}: expected 'relative/path.jpg PID' with the camera as 3rd '_' field "
                f"(e.g. 0000/0000_000_01_0303morning_0015_0.jpg 0), got '{line.strip()}'"
            )
        records.append(Record(str(image_dir / parts[0]), int(parts[1]), int(fields_[2]) - 1, None))
    if records and not Path(records[0].path).is_file():
        raise QAConvError(f"{list_file}:1 names {records[0].path}, which does not exist")
    return records


def read_msmt17(root: str | Path, combine_all: bool = False) -> BenchmarkDataset:
    """MSMT17 V1 (train/, test/) or V2 (mask_train_v2/, mask_test_v2/) with list_{train,val,query,gallery}.txt.

    Cameras: 3rd '_' field of the file name, 1-based on disk (camid = field - 1); no time stamps.
    Training set = train ∪ val. ``combine_all`` appends query and gallery to the training set with pids
    shifted by the training id count (the "MSMT (all)" setting); query and gallery stay as test splits.
    """
    root = Path(root)
    version = _msmt_layout(root)
    train_dir, test_dir = (root / d for d in MSMT_LAYOUTS[version])
    missing = [f for f in MSMT_LISTS if not (root / f).is_file()]
    if missing:
        raise QAConvError(
            f"{root} is not in MSMT17_{version} layout: missing list file(s) {', '.join(missing)}; "
            f"found {_listing(root)}"
        )
    train = _read_msmt_list(root / "list_train.txt", train_dir) + _read_msmt_list(root / "list_val.txt", train_dir)
    query = _read_msmt_list(root / "list_query.txt", test_dir)
    gallery = _read_msmt_list(root / "list_gallery.txt", test_dir)
    junk = {}
    train, junk["train"] = _drop_junk(train)
    query, junk["query"] = _drop_junk(query)
    gallery, junk["gallery"] = _drop_junk(gallery)
    train = relabel_pids(train)
    found = f"msmt17: MSMT17_{version} list layout in {root}"
    if combine_all:
        shift = len({r.pid for r in train})
        train = train + [Record(r.path, r.pid + shift, r.camid, r.time) for r in query + gallery]
        found += " (combine_all: train + val + query + gallery)"
    return _build("msmt17", root, {"train": train, "query": query, "gallery": gallery}, False, found, junk)


def read_randperson(root: str | Path) -> BenchmarkDataset:
    """RandPerson subset (training only): scenes s00.. and cameras c00.. are 0-based on disk.

    camid = camera_offset[scene] + cam; time = (frame_offset[scene] + first 6 frame digits) / 24.
    """
    root = Path(root)
    _require_dirs(root, "RandPerson", ["randperson_subset"])
    folder = root / "randperson_subset"
    rule = "'PID_sSCENE_cCAM_fFRAME.jpg' (e.g. 00000000_s00_c00_f000055.jpg)"
    recs, skipped = [], []
    for path, m in _parse_names(folder, RANDPERSON_NAME, rule, skipped):
        scene, cam, frame_digits = int(m.group(2)), int(m.group(3)), m.group(4)[:6]
        if scene >= len(RANDPERSON_CAM_OFFSETS):
            raise QAConvError(f"{path}: RandPerson scenes are s00..s{len(RANDPERSON_CAM_OFFSETS) - 1:02d}")
        time = (RANDPERSON_FRAME_OFFSETS[scene] + int(frame_digits)) / SYNTH_FPS
        recs.append(Record(str(path), int(m.group(1)), RANDPERSON_CAM_OFFSETS[scene] + cam, time))
    return _build("randperson", root, {"train": recs}, True, f"randperson: RandPerson subset in {folder}",
                  skipped=skipped)


def read_clonedperson(root: str | Path) -> BenchmarkDataset:
    """ClonedPerson: train/, test/gallery/, test/query/; names PID_sSCENE_cCAM_fFRAME.jpg.

    Quirk kept from the official code: the scene parsed from the name is overridden with 2, whose camera
    offset is 0, so camid = raw camera number as on disk (0-based, no subtraction) and cameras of different
    scenes share ids. Time = frame / 24.
    """
    root = Path(root)
    subdirs = {"train": "train", "gallery": "test/gallery", "query": "test/query"}
    _require_dirs(root, "ClonedPerson", list(subdirs.values()))
    rule = "'PID_sSCENE_cCAM_fFRAME.jpg' (e.g. 000000_s00_c00_f000000.jpg)"
    skipped: list[str] = []
    splits = {
        split: [
            Record(str(path), int(m.group(1)), CLONEDPERSON_CAM_OFFSET + int(m.group(3)), int(m.group(4)) / SYNTH_FPS)
            for path, m in _parse_names(root / sub, CLONEDPERSON_NAME, rule, skipped)
        ]
        for split, sub in subdirs.items()
    }
    return _build("clonedperson", root, splits, True, f"clonedperson: ClonedPerson layout in {root}",
                  skipped=skipped)


# ------------------------------------------------------------------------------------------ public API


def _loader(key: str) -> Callable[..., BenchmarkDataset]:
    def load(data_dir: str | Path, combine_all: bool = False) -> BenchmarkDataset:
        root = find_root(key, data_dir)
        if key == "msmt17":
            return read_msmt17(root, combine_all=combine_all)
        _no_combine_all(key, combine_all)
        if key.startswith("cuhk03_np"):
            return read_cuhk03_np(root, name=key)
        return {
            "market": read_market,
            "duke": read_duke,
            "randperson": read_randperson,
            "clonedperson": read_clonedperson,
        }[key](root)

    load.__name__ = f"load_{key}"
    load.__doc__ = f"Load benchmark '{key}' from its folder under data_dir (see find_root)."
    return load


BENCHMARKS: dict[str, Callable[..., BenchmarkDataset]] = {key: _loader(key) for key in FOLDER_CANDIDATES}
BENCHMARKS.update({alias: BENCHMARKS[key] for alias, key in ALIASES.items()})


def load_benchmark(name: str, data_dir: str | Path, combine_all: bool = False) -> BenchmarkDataset:
    """Load a benchmark by name (aliases allowed) from ``data_dir``; see the module docstring."""
    return BENCHMARKS[_canonical(name)](data_dir, combine_all=combine_all)


def combine(datasets: list[ReidDataset]) -> ReidDataset:
    """Pool the training sets of several sources (multi-source training).

    Pids are offset by the running id count and camids by the running camera count (max camid + 1 of
    the previous sources), so identities and cameras of different sources never collide. Query and
    gallery are empty; ``has_time`` is True only if every source has time stamps.
    """
    if not datasets:
        raise QAConvError("combine needs at least one dataset")
    train: list[Record] = []
    pid_offset = cam_offset = 0
    junk = 0
    labels: dict[int, str] = {}
    for data in datasets:
        relabelled = relabel_pids(data.train)
        train += [Record(r.path, r.pid + pid_offset, r.camid + cam_offset, r.time) for r in relabelled]
        labels.update({c + cam_offset: f"{data.name}:{data.cam_label(c)}" for c in {r.camid for r in relabelled}})
        pid_offset += len({r.pid for r in relabelled})
        cam_offset += max((r.camid for r in relabelled), default=-1) + 1
        junk += data.junk_dropped.get("train", 0)
    return ReidDataset(
        name="+".join(d.name for d in datasets),
        root=";".join(d.root for d in datasets),
        train=train,
        query=[],
        gallery=[],
        has_time=all(d.has_time for d in datasets),
        junk_dropped={"train": junk, "query": 0, "gallery": 0},
        cam_labels=labels,
        skipped=[f"{d.name}: {p}" for d in datasets for p in d.skipped],
    )
