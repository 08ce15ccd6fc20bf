"""Where and when people are seen: the camera graph, groups walking it, and the passes cameras record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .records import MARKET_FPS
from .synth_style import VIEWS, CameraStyle, DomainSpec

WALK_SPEED = 1.3  # m/s
MAX_FRAME = 999_999  # six digits in Market names
GROUP_SIZES = {1: 0.42, 2: 0.3, 3: 0.17, 4: 0.11}
PATH_LENGTHS = {2: 0.25, 3: 0.35, 4: 0.25, 5: 0.15}


@dataclass(frozen=True)
class CameraGraph:
    """Cameras on a site map; edges carry a mean transit time (s) and a log-normal spread."""

    positions: np.ndarray  # (C, 2) metres
    neighbours: tuple[tuple[int, ...], ...]
    transit: np.ndarray  # (C, C) mean seconds, inf where not adjacent
    spread: np.ndarray  # (C, C) log-std
    entry_view: np.ndarray  # (C, C+1) usual view index at camera c when arriving from c' (last: entered)


@dataclass(frozen=True)
class Sighting:
    """One image to draw: who (population index), where, when, from which side, and crop position."""

    person: int
    cam: int
    frame: int
    view: str
    window: float


def make_graph(rng: np.random.Generator, spec: DomainSpec, cams: list[CameraStyle]) -> CameraGraph:
    """Random camera positions joined by a spanning tree plus each camera's nearest neighbours."""
    n = len(cams)
    pos = rng.uniform(0, 1, (n, 2)) * np.array(spec.area)
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    adj = np.zeros((n, n), bool)
    inside, rest = [0], set(range(1, n))
    while rest:  # Prim's minimum spanning tree keeps the network connected
        i, j = min(((i, j) for i in inside for j in rest), key=lambda e: dist[e])
        adj[i, j] = adj[j, i] = True
        inside.append(j)
        rest.remove(j)
    for i in range(n):
        for j in np.argsort(dist[i])[1:3]:
            adj[i, j] = adj[j, i] = True
    tortuosity = rng.uniform(1.15, 1.5, (n, n))
    tortuosity = (tortuosity + tortuosity.T) / 2
    transit = np.where(adj, np.clip(dist * tortuosity / WALK_SPEED, 15.0, 400.0), np.inf)
    spread = rng.uniform(0.12, 0.3, (n, n))
    spread = (spread + spread.T) / 2
    views = np.array([[rng.choice(4, p=c.views) for _ in range(n + 1)] for c in cams])
    return CameraGraph(pos, tuple(tuple(int(j) for j in np.flatnonzero(adj[i])) for i in range(n)),
                       transit, spread, views)


def _draw(rng: np.random.Generator, table: dict[int, float]) -> int:
    keys = list(table)
    p = np.array([table[k] for k in keys])
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _walk(rng: np.random.Generator, graph: CameraGraph, start: int, prev: int, steps: int) -> list[int]:
    """``steps`` further cameras along the graph, avoiding immediate back-tracking where possible."""
    path, cur = [], start
    for _ in range(steps):
        options = [j for j in graph.neighbours[cur] if j != prev] or list(graph.neighbours[cur])
        prev, cur = cur, options[int(rng.integers(len(options)))]
        path.append(cur)
    return path


def _transit(rng: np.random.Generator, graph: CameraGraph, a: int, b: int, speed: float) -> float:
    """Walking time from camera a to b: per-edge log-normal spread, personal pace, sometimes a stop."""
    t = graph.transit[a, b] * speed * np.exp(rng.normal(0.0, graph.spread[a, b]))
    if rng.random() < 0.1:
        t += rng.uniform(20.0, 150.0)
    return float(t)


def simulate(rng: np.random.Generator, graph: CameraGraph, cams: list[CameraStyle], people: list[int],
             window_s: float) -> list[tuple[int, int, float, int]]:
    """Visits (person, camera, arrival seconds, previous camera or -1) of ``people`` walking in groups.

    Groups enter at random times (uniform, or in bursts that make crowd flows), share a path and
    a pace, arrive a couple of seconds apart; some members split off and continue on their own.
    """
    n_cam = len(cams)
    order = [people[i] for i in rng.permutation(len(people))]
    bursts = rng.uniform(0, window_s, max(1, int(window_s / 600)))
    visits = []
    i = 0
    while i < len(order):
        size = _draw(rng, GROUP_SIZES)
        group, i = order[i:i + size], i + size
        if rng.random() < 0.6:
            t0 = rng.uniform(0, window_s)
        else:
            t0 = float(np.clip(rng.choice(bursts) + rng.normal(0, 45.0), 0, window_s))
        start = int(rng.integers(n_cam))
        path = [start] + _walk(rng, graph, start, -1, _draw(rng, PATH_LENGTHS) - 1)
        pace = float(np.exp(rng.normal(0.0, 0.1)))
        times = [t0]
        for a, b in zip(path[:-1], path[1:], strict=True):
            times.append(times[-1] + _transit(rng, graph, a, b, pace))
        for m, person in enumerate(group):
            lag = 0.0 if m == 0 else float(rng.uniform(0.3, 2.0))
            leave = len(path)
            if len(group) > 1 and rng.random() < 0.2:
                leave = int(rng.integers(1, len(path)))
            prev = -1
            for k in range(leave):
                visits.append((person, path[k], times[k] + lag + float(rng.normal(0, 0.6)) * (k > 0), prev))
                prev = path[k]
            if leave < len(path):  # went its own way from path[leave - 1]
                own_pace = float(np.exp(rng.normal(0.0, 0.1)))
                t, cur, before = times[leave - 1] + lag, path[leave - 1], path[leave - 2] if leave > 1 else -1
                for nxt in _walk(rng, graph, cur, before, len(path) - leave):
                    t += _transit(rng, graph, cur, nxt, own_pace)
                    visits.append((person, nxt, t, cur))
                    cur = nxt
    return visits


def passes_to_sightings(rng: np.random.Generator, graph: CameraGraph, cams: list[CameraStyle],
                        visits: list[tuple[int, int, float, int]]) -> list[Sighting]:
    """A camera captures a few frames of each pass; the view mostly follows the walking direction."""
    out: dict[tuple[int, int, int], Sighting] = {}
    for person, cam, t, prev in visits:
        dur = rng.uniform(1.5, 6.0)
        n = 1 + int(rng.binomial(5, 0.5))
        span = max(n, int(dur * MARKET_FPS))
        start = int(round(t * MARKET_FPS)) + 25
        frames = np.sort(rng.choice(span, size=n, replace=False)) + start
        if rng.random() < 0.7:
            view = VIEWS[int(graph.entry_view[cam, prev])]
        else:
            view = VIEWS[int(rng.choice(4, p=cams[cam].views))]
        w0, drift = rng.uniform(0.0, 1.0), rng.normal(0.0, 0.05)
        for f in frames:
            f = int(min(f, MAX_FRAME))
            v = view if rng.random() > 0.12 else VIEWS[int(rng.choice(4, p=cams[cam].views))]
            w = float(np.clip(w0 + drift * (f - start) / MARKET_FPS, 0.0, 1.0))
            out.setdefault((person, cam, f), Sighting(person, cam, f, v, w))
    return sorted(out.values(), key=lambda s: (s.cam, s.frame, s.person))
