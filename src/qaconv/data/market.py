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
    """(path, pid, cam 1-based, session 1-based, frame) for every image; bad names raise one error."""
    parsed, bad = [], []
    for path in _list_images(folder):
        m = MARKET_NAME.match(path.name)
        if m is None:
            bad.append(path.name)
            continue
        parsed.append((path, int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))))
    if bad:
        raise QAConvError(
            f"{len(bad)} file name(s) in {folder} do not follow the Market-1501 rule "
            f"'PID_cCsS_FRAME_NN.jpg' (e.g. 0001_c1s1_000151_00.jpg): {', '.join(bad[:3])}"
        )
    return parsed


def market_session_offsets(frames_by_cam_session: dict[tuple[int, int], list[int]]) -> dict[tuple[int, int], int]:
    """Frame offsets chaining the sessions of each camera, exactly as the official QAConv code.

    offset[c][1] = 0 and offset[c][s] = max(shifted frames of session s-1) + offset[c][s-1], where the
    maximum is taken over frames that already carry offset[c][s-1]: the previous offset counts twice
    (raw session maxima 100, 200 give offsets 0, 100, 400). The official numbers depend on this quirk,
    so it is kept; it preserves order within a camera.
    """
    offsets: dict[tuple[int, int], int] = {}
    for cam in sorted({c for c, _ in frames_by_cam_session}):
        prev = 0
        for session in range(1, 10):
            if session == 1:
                offsets[(cam, 1)] = 0
                continue
            prev_frames = frames_by_cam_session.get((cam, session - 1), [])
            prev_max_shifted = max(prev_frames) + prev if prev_frames else 0
            prev = prev_max_shifted + prev
            offsets[(cam, session)] = prev
    return offsets


def load_market_layout(root: str | Path, name: str | None = None) -> ReidDataset:
    """Read a folder in Market-1501 layout; time = chained frame number / 25 fps."""
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
    frames: dict[tuple[int, int], list[int]] = defaultdict(list)
    for items in parsed.values():
        for _, _, cam, session, frame in items:
            frames[(cam, session)].append(frame)
    offsets = market_session_offsets(frames)

    junk: dict[str, int] = {}
    records: dict[str, list[Record]] = {}
    for split, items in parsed.items():
        kept = [it for it in items if it[1] != -1]
        junk[split] = len(items) - len(kept)
        records[split] = [
            Record(str(path), pid, cam - 1, (frame + offsets[(cam, session)]) / MARKET_FPS)
            for path, pid, cam, session, frame in kept
        ]
    return ReidDataset(
        name=name or root.name,
        root=str(root),
        train=relabel_pids(records["train"]),
        query=records["query"],
        gallery=records["gallery"],
        has_time=True,
        junk_dropped=junk,
    )
