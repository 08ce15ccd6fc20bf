"""Datasets in Market-1501 folder layout (Market itself, the synthetic domains, users' own folders)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QAConvError
from .records import MARKET_FPS, MARKET_NAME, Record, relabel_pids

SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    def summary(self) -> str:
        """A few lines: identities, images and cameras per split."""
        lines = [f"dataset {self.name} ({self.root})"]
        for split in ("train", "query", "gallery"):
            recs = getattr(self, split)
            lines.append(
                f"  {split:8s} {len({r.pid for r in recs}):6d} ids {len(recs):7d} images "
                f"{len({r.camid for r in recs}):3d} cameras"
            )
        return "\n".join(lines)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _parse_split(folder: Path) -> list[tuple[Path, int, int, int, int]]:
    """(path, pid, cam 1-based, session, frame) for every image; bad names or camera c0 raise one error."""
    parsed, bad, cam0 = [], [], []
    for path in _list_images(folder):
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


def load_market_layout(root: str | Path, name: str | None = None) -> ReidDataset:
    """Read a folder in Market-1501 layout; junk (pid -1) dropped; time = chained frame number / 25 fps.

    Session offsets are chained over the kept images of all three splits (:func:`market_session_offsets`).
    """
    root = Path(root)
    if not root.is_dir():
        raise QAConvError(f"dataset folder {root} does not exist")
    missing = [sub for sub in SPLITS.values() if not (root / sub).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())[:8]
        raise QAConvError(
            f"{root} is not in Market-1501 layout: expected folders {', '.join(SPLITS.values())}; "
            f"missing {', '.join(missing)}; found {', '.join(found) or 'no folders'}"
        )
    parsed = {split: _parse_split(root / sub) for split, sub in SPLITS.items()}
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
    )
