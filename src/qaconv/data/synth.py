"""Procedural synthetic person re-ID domains written in Market-1501 layout (the embedded default data).

Identities share clothing colours and patterns (confusers differ in one local detail), cameras have
their own light, colour, scene, optics, viewpoints, crops and occluders, and domains ("A", "B", "C")
differ in those camera styles and partly in clothing palettes. People walk a camera graph in
groups, so time stamps carry the signal temporal methods (TLift) exploit. See
``shared/reference/synthetic-data.md`` for the rules this generator follows.

Modules: ``synth_style`` (what things look like), ``synth_draw`` (drawing), ``synth_world``
(camera graph and time), this one (splits, files, public API).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import QAConvError
from ..progress import progress_bar
from .filetypes import list_image_files
from .records import MARKET_FPS, market_name
from .synth_draw import make_panorama, render_image
from .synth_style import DOMAINS, VIEWS, CameraStyle, DomainSpec, Identity, sample_camera, sample_population
from .synth_world import MAX_FRAME, Sighting, make_graph, passes_to_sightings, simulate

__all__ = ["DOMAINS", "SYNTH_VERSION", "SynthArgumentError", "generate_domain", "render_identity_preview",
           "is_generated"]

SYNTH_VERSION = 1
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
META_FILE = "synth.json"
PARTIAL_FILE = ".synth_partial"
_CHUNK = 24


class SynthArgumentError(QAConvError, ValueError):
    """A bad argument to the generator (a ValueError the CLI prints as one line)."""


def _spec(domain: str) -> DomainSpec:
    if not isinstance(domain, str) or domain.upper() not in DOMAINS:
        raise SynthArgumentError(f"unknown synthetic domain {domain!r}: choose from {', '.join(DOMAINS)}")
    return DOMAINS[domain.upper()]


def _key(domain: str) -> int:
    return ord(domain.upper())


def _cameras(spec: DomainSpec, seed: int, n: int) -> list[CameraStyle]:
    return [sample_camera(np.random.default_rng([seed, _key(spec.name), 2, i]), spec, i) for i in range(n)]


def _populations(spec: DomainSpec, seed: int, n_train: int, n_test: int, n_distract: int) -> list[Identity]:
    """Train, test and distractor people; confusers stay within their split (distractors copy test people)."""
    k = _key(spec.name)
    train = sample_population(np.random.default_rng([seed, k, 1, 0]), spec, n_train)
    test = sample_population(np.random.default_rng([seed, k, 1, 1]), spec, n_test)
    distract = sample_population(np.random.default_rng([seed, k, 1, 2]), spec, n_distract, parents=test)
    return train + test + distract


def _check_args(num_train_ids, num_test_ids, num_cameras, height, width, seed, workers, spec) -> int:
    for name, value, low in (("num_train_ids", num_train_ids, 1), ("num_test_ids", num_test_ids, 1),
                             ("height", height, 16), ("width", width, 8), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise SynthArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
    cams = spec.num_cameras if num_cameras is None else num_cameras
    if isinstance(cams, bool) or not isinstance(cams, (int, np.integer)) or not 2 <= cams <= 9:
        raise SynthArgumentError(f"num_cameras must be an integer in 2..9 (Market names hold one digit), got "
                                 f"{num_cameras!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise SynthArgumentError(f"workers must be None or an integer >= 0, got {workers!r}")
    return int(cams)


def _plan(spec: DomainSpec, seed: int, n_train: int, n_test: int, n_cam: int):
    """Everything but the pixels: people, pids, sightings, splits and file names."""
    k = _key(spec.name)
    n_distract = max(1, n_test // 2)
    people = _populations(spec, seed, n_train, n_test, n_distract)
    cams = _cameras(spec, seed, n_cam)
    rng = np.random.default_rng([seed, k, 3])
    graph = make_graph(rng, spec, cams)
    n_real = n_train + n_test
    window_s = float(np.clip(n_real * 7.0, 1200.0, 30000.0))
    visits = simulate(rng, graph, cams, list(range(n_real)), window_s)
    for d in range(n_real, n_real + n_distract):  # distractors pass one camera once
        visits.append((d, int(rng.integers(n_cam)), float(rng.uniform(0, window_s)), -1))
    sightings = passes_to_sightings(rng, graph, cams, visits)
    if max(s.frame for s in sightings) > MAX_FRAME:
        raise SynthArgumentError("too many identities for six-digit frame numbers; lower num_train_ids")

    pid_of = np.zeros(len(people), int)
    pid_of[:n_real] = np.random.default_rng([seed, k, 4]).permutation(n_real) + 1
    by_person: dict[int, list[int]] = {}
    for i, s in enumerate(sightings):
        by_person.setdefault(s.person, []).append(i)
    split = ["gallery"] * len(sightings)
    for p in range(n_train):
        for i in by_person.get(p, []):
            split[i] = "train"
    for p in range(n_train, n_real):
        for i in _pick_queries(np.random.default_rng([seed, k, 5, p]), [sightings[i] for i in by_person[p]]):
            split[by_person[p][i]] = "query"

    index: dict[tuple[int, int], int] = {}
    jobs = []
    for i, s in enumerate(sightings):  # sorted by (cam, frame, person): NN counts boxes in the frame
        nn = index.get((s.cam, s.frame), 0)
        index[(s.cam, s.frame)] = nn + 1
        name = market_name(int(pid_of[s.person]), s.cam + 1, 1, s.frame, nn)
        jobs.append((SPLIT_DIRS[split[i]], name, s))
    return people, jobs, pid_of, graph


def _pick_queries(rng: np.random.Generator, seen: list[Sighting]) -> list[int]:
    """About one query per camera, keeping for every query a gallery image from another camera."""
    cams = sorted({s.cam for s in seen})
    chosen: list[int] = []
    for c in rng.permutation(cams):
        here = [i for i, s in enumerate(seen) if s.cam == c]
        cand = here[int(rng.integers(len(here)))]
        trial = chosen + [cand]
        gallery_cams = {s.cam for i, s in enumerate(seen) if i not in trial}
        if all(gallery_cams - {seen[q].cam} for q in trial):
            chosen = trial
    return chosen


_WORKER: dict = {}


def _init_worker(domain: str, seed: int, n_cam: int, height: int, width: int, people: list[Identity],
                 out_dir: str) -> None:
    spec = DOMAINS[domain]
    _WORKER.clear()
    _WORKER.update(spec=spec, seed=seed, cams=_cameras(spec, seed, n_cam), h=height, w=width, people=people,
                   out=Path(out_dir), pans={})


def _render_job(job) -> bytes:
    folder, name, s = job
    w = _WORKER
    pans = w["pans"]
    if s.cam not in pans:
        pans[s.cam] = make_panorama(w["cams"][s.cam], w["h"], w["w"])
    rng = np.random.default_rng([w["seed"], _key(w["spec"].name), 7, s.person, s.cam, s.frame])
    who, cam = w["people"][s.person], w["cams"][s.cam]
    return render_image(who, s.view, cam, w["spec"], pans[s.cam], s.window, rng)


def _render_chunk(jobs) -> int:
    for job in jobs:
        (_WORKER["out"] / job[0] / job[1]).write_bytes(_render_job(job))
    return len(jobs)


def _prepare_folder(out: Path) -> None:
    """Create the layout; clear images of an earlier synthetic run, refuse to mix with foreign data."""
    ours = (out / META_FILE).is_file() or (out / PARTIAL_FILE).is_file()
    for sub in SPLIT_DIRS.values():
        folder = out / sub
        if not folder.is_dir():
            continue
        images = list_image_files(folder)[0]
        if images and not ours:
            raise SynthArgumentError(f"{folder} already holds {len(images)} images not written by the "
                                     "synthetic generator; choose an empty or new output folder")
        if ours:
            shutil.rmtree(folder)
    (out / META_FILE).unlink(missing_ok=True)
    for sub in SPLIT_DIRS.values():
        (out / sub).mkdir(parents=True, exist_ok=True)


def generate_domain(domain: str, out_dir: str | Path, *, seed: int = 0, num_train_ids: int = 150,
                    num_test_ids: int = 100, num_cameras: int | None = None, height: int = 128,
                    width: int = 64, workers: int | None = None, progress: bool = True) -> dict:
    """Write synthetic domain ``domain`` to ``out_dir`` in Market-1501 layout and return a summary.

    Output is byte-identical for the same arguments whatever ``workers`` is (None: one per CPU, at
    most 8; 0 or 1: in this process). ``OUT/synth.json`` records the parameters and counts and is
    written last, so its presence means the folder is complete.
    """
    spec = _spec(domain)
    n_cam = _check_args(num_train_ids, num_test_ids, num_cameras, height, width, seed, workers, spec)
    seed, height, width = int(seed), int(height), int(width)
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_folder(out)
    (out / PARTIAL_FILE).write_text("generation in progress\n")
    people, jobs, pid_of, graph = _plan(spec, seed, int(num_train_ids), int(num_test_ids), n_cam)

    n_workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    chunks = [jobs[i:i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    init = (spec.name, seed, n_cam, height, width, people, str(out))
    bar = progress_bar(total=len(jobs), desc=f"synth {spec.name}", unit="img", disable=not progress, leave=False)
    try:
        if n_workers <= 1 or len(jobs) < 4 * _CHUNK:
            _init_worker(*init)
            for chunk in chunks:
                bar.update(_render_chunk(chunk))
        else:
            with ProcessPoolExecutor(n_workers, initializer=_init_worker, initargs=init) as pool:
                for done in pool.map(_render_chunk, chunks):
                    bar.update(done)
    finally:
        bar.close()
        _WORKER.clear()
    elapsed = time.perf_counter() - t_start

    counts = {}
    for split, folder in SPLIT_DIRS.items():
        part = [(int(pid_of[s.person]), s) for f, _, s in jobs if f == folder]
        counts[split] = {
            "images": len(part),
            "identities": len({p for p, _ in part if p > 0}),
            "cameras": len({s.cam for _, s in part}),
        }
    counts["gallery"]["distractor_images"] = sum(1 for f, n, _ in jobs if f == SPLIT_DIRS["gallery"]
                                                 and n.startswith("0000_"))
    frames = [s.frame for _, _, s in jobs]
    meta = {
        "generator": "qaconv.data.synth", "version": SYNTH_VERSION, "domain": spec.name, "seed": seed,
        "num_train_ids": int(num_train_ids), "num_test_ids": int(num_test_ids), "num_cameras": n_cam,
        "height": height, "width": width, "fps": MARKET_FPS, "description": spec.description,
        "splits": counts, "time_range_s": [min(frames) / MARKET_FPS, max(frames) / MARKET_FPS],
        "camera_graph": [[a + 1, b + 1, round(float(graph.transit[a, b]), 1)]
                         for a in range(n_cam) for b in graph.neighbours[a] if a < b],
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out / META_FILE)
    (out / PARTIAL_FILE).unlink(missing_ok=True)
    return {**meta, "out_dir": str(out), "images": len(jobs), "elapsed_s": round(elapsed, 3),
            "images_per_s": round(len(jobs) / max(elapsed, 1e-9), 1)}


def is_generated(out_dir: str | Path, domain: str, *, seed: int = 0, num_train_ids: int = 150,
                 num_test_ids: int = 100, num_cameras: int | None = None, height: int = 128,
                 width: int = 64) -> bool:
    """True when ``out_dir`` holds a complete generation with exactly these parameters and this version."""
    spec = _spec(domain)
    try:
        meta = json.loads((Path(out_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    want = {"version": SYNTH_VERSION, "domain": spec.name, "seed": seed, "num_train_ids": num_train_ids,
            "num_test_ids": num_test_ids, "num_cameras": num_cameras or spec.num_cameras, "height": height,
            "width": width}
    return all(meta.get(k) == v for k, v in want.items()) and not (Path(out_dir) / PARTIAL_FILE).exists()


def render_identity_preview(domain: str, n: int = 6, seed: int = 0, *, num_cameras: int | None = None,
                            height: int = 128, width: int = 64, per_camera: int = 2) -> Image.Image:
    """A grid of ``n`` training identities (rows) seen by every camera (``per_camera`` columns each)."""
    spec = _spec(domain)
    n_cam = _check_args(1, 1, num_cameras, height, width, seed, None, spec)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or per_camera < 1:
        raise SynthArgumentError(f"n and per_camera must be integers >= 1, got {n!r} and {per_camera!r}")
    people = sample_population(np.random.default_rng([seed, _key(spec.name), 1, 0]), spec, n)
    cams = _cameras(spec, seed, n_cam)
    grid = Image.new("RGB", (width * n_cam * per_camera + 2 * (n_cam - 1), height * n), (255, 255, 255))
    for c, cam in enumerate(cams):
        pano = make_panorama(cam, height, width)
        for p, who in enumerate(people):
            for j in range(per_camera):
                rng = np.random.default_rng([seed, _key(spec.name), 8, p, c, j])
                view = VIEWS[int(rng.choice(4, p=cam.views))]
                data = render_image(who, view, cam, spec, pano, float(rng.uniform()), rng)
                with Image.open(io.BytesIO(data)) as im:
                    grid.paste(im.convert("RGB"), ((c * per_camera + j) * width + 2 * c, p * height))
    return grid
