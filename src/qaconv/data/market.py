"""Datasets in Market-1501 folder layout (Market itself, the synthetic domains, users' own folders)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QAConvError
from .filetypes import IMAGE_SUFFIXES, describe_skipped, list_image_files
from .records import MARKET_FPS, MARKET_NAME, Record, relabel_pids

SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
__all__ = ["IMAGE_SUFFIXES", "SPLITS", "ReidDataset", "load_market_layout", "market_session_offsets"]


@dataclass
class ReidDataset:
    """Train/query/gallery records of one dataset. Train pids are relabelled to 0..N-1."""

    name: str
    root: str
    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    has_time: bool
    junk_dropped: dict[str, int] = field(default_factory=dict)
    cam_labels: dict[int, str] = field(default_factory=dict)  # camid -> the user's camera label, where known
    skipped: list[str] = field(default_factory=list)  # non-image files met in the split folders

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    def cam_label(self, camid: int) -> str:
        """The camera's label as the user wrote it (a manifest's ``camid`` value, ``c3`` for Market-style names);
        ``c{camid + 1}`` when the loader recorded none."""
        return self.cam_labels.get(int(camid), f"c{int(camid) + 1}")

    def skipped_note(self) -> str:
        """'' or one sentence counting and naming the non-image files left out (see :attr:`skipped`)."""
        return describe_skipped(self.skipped, f"in {self.root}")

    def summary(self) -> str:
        """A few lines: identities, images and cameras per split (and the non-image files skipped)."""
        lines = [f"dataset {self.name} ({self.root})"]
        for split in ("train", "query", "gallery"):
            recs = getattr(self, split)
            lines.append(
                f"  {split:8s} {len({r.pid for r in recs}):6d} ids {len(recs):7d} images "
                f"{len({r.camid for r in recs}):3d} cameras"
            )
        if self.skipped:
            lines.append(f"  {self.skipped_note()}")
        return "\n".join(lines)


def _parse_split(folder: Path, skipped: list[str]) -> list[tuple[Path, int, int, int, int]]:
    """(path, pid, cam 1-based, session, frame) for every image; bad names or camera c0 raise one error.
    Non-image files are appended to ``skipped`` (as 'split folder/name')."""
    parsed, bad, cam0 = [], [], []
    images, others = list_image_files(folder)
    skipped += [f"{folder.name}/{p.name}" for p in others]
    for path in images:
        m = MARKET_NAME.match(path.name)
        if m is None:
            bad.append(path.name)
            continue
        if m.group(2) == "0" and int(m.group(1)) != -1:  # junk is dropped unread, as in the official loader
            cam0.append(path.name)
        parsed.append((path, int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))))
    if bad:
        raise QAConvError(
            f"{len(bad)} file name(s) in {folder} do not follow the Market-1501 rule "
            f"'PID_cCsS_FRAME_NN.jpg' (e.g. 0001_c1s1_000151_00.jpg): {', '.join(bad[:3])}"
        )
    if cam0:
        raise QAConvError(
            f"{len(cam0)} file name(s) in {folder} have camera c0, but Market-1501 names number cameras "
            f"from c1 (camera id = digit - 1; id -1 would mean unknown camera): {', '.join(cam0[:3])}"
        )
    return parsed


def market_session_offsets(frames_by_cam_session: dict[tuple[int, int], list[int]]) -> dict[tuple[int, int], int]:
    """Frame offsets chaining the sessions of each camera, as the official QAConv Market loader.

    ``frames_by_cam_session`` maps (camera, session) as written in the names to the frame numbers that
    count (the official loader leaves junk, pid -1, out). The result has every camera with sessions 0..9.
    offset[c][1] = 0 and offset[c][s] = max(shifted frames of session s-1) + offset[c][s-1], where the
    maximum is taken over frames that already carry offset[c][s-1]: the previous offset counts twice
    (raw session maxima 100, 200 give offsets 0, 100, 400). The official numbers depend on this quirk,
    so it is kept; it preserves order within a camera.

    Session 0: the official code stores session s as index s-1 and walks the indices 0..5 with a loop
    counter (it never indexes its table by s-1, so -1 does not wrap): session 0 is never shifted (offset 0,
    time = frame / 25) and never feeds another session's offset. The official code chains only c1..c6 and
    s1..s6 (Market-1501's); here every camera and sessions up to s9 chain the same way.
    """
    offsets: dict[tuple[int, int], int] = {}
    for cam in sorted({c for c, _ in frames_by_cam_session}):
        offsets[(cam, 0)] = offsets[(cam, 1)] = prev = 0
        for session in range(2, 10):
            prev_frames = frames_by_cam_session.get((cam, session - 1), [])
            prev_max_shifted = max(prev_frames) + prev if prev_frames else 0
            prev = prev_max_shifted + prev
            offsets[(cam, session)] = prev
    return offsets


def load_market_layout(root: str | Path, name: str | None = None, require=None) -> ReidDataset:
    """Read a folder in Market-1501 layout; junk (pid -1) dropped; time = chained frame number / 25 fps.

    ``require``: the splits that must be there (``train``, ``query``, ``gallery``; default all three); a
    split folder that is absent and not required reads as an empty split. ``()`` requires only that one split
    folder exists (e.g. ``qaconv data info`` on an evaluation-only folder). Non-image files in the split folders
    are listed in ``skipped``; camera labels are the names' ``cN``.

    Session offsets are chained over the kept images of all three splits (:func:`market_session_offsets`).
    """
    root = Path(root)
    if not root.is_dir():
        raise QAConvError(f"dataset folder {root} does not exist")
    require = tuple(SPLITS) if require is None else tuple(require)
    present = {split: sub for split, sub in SPLITS.items() if (root / sub).is_dir()}
    missing = [SPLITS[s] for s in SPLITS if s in require and s not in present]
    if missing or not present:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())[:8]
        if require:
            expected = f"expected folder(s) {', '.join(SPLITS[s] for s in SPLITS if s in require)}; missing " + \
                ", ".join(missing)
        else:
            expected = f"expected at least one of the folders {', '.join(SPLITS.values())}"
        raise QAConvError(
            f"{root} is not in Market-1501 layout: {expected}; found {', '.join(found) or 'no folders'}"
        )
    skipped: list[str] = []
    parsed = {split: _parse_split(root / sub, skipped) if split in present else [] for split, sub in SPLITS.items()}
    kept = {split: [it for it in items if it[1] != -1] for split, items in parsed.items()}  # junk out first
    frames: dict[tuple[int, int], list[int]] = defaultdict(list)
    for items in kept.values():
        for _, _, cam, session, frame in items:
            frames[(cam, session)].append(frame)
    offsets = market_session_offsets(frames)
    junk = {split: len(parsed[split]) - len(kept[split]) for split in SPLITS}
    records = {
        split: [
            Record(str(path), pid, cam - 1, (frame + offsets[(cam, session)]) / MARKET_FPS)
            for path, pid, cam, session, frame in items
        ]
        for split, items in kept.items()
    }
    return ReidDataset(
        name=name or root.name,
        root=str(root),
        train=relabel_pids(records["train"]),
        query=records["query"],
        gallery=records["gallery"],
        has_time=True,
        junk_dropped=junk,
        cam_labels={cam - 1: f"c{cam}" for items in kept.values() for _, _, cam, _, _ in items},
        skipped=skipped,
    )
