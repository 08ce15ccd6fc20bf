"""The gallery store at scale (qaconv.Gallery on LanceDB): build rate, the cost of appending 1,000 entries as
the store grows, query latency (first stage + re-scoring) at M = 100 and 400, recall of the exhaustive QAConv
top-10, resident memory, and the alternatives measured side by side (prints figures, never asserts).

Usage: ``python benchmarks/gallery_scale.py --size 100000`` (the 1 M store takes about 8.5 GB of disk under
``--dir``: ``python benchmarks/gallery_scale.py --size 1000000 --dir /path/with/10GB/free``).

* Entries: ``--size`` synthetic 128x8x4 float16 maps with identity structure (the generator of
  ``benchmarks/eval_scale.py``: shared body-part vectors, per-location detail, vertical misalignment, noise
  ``--noise``), ``--per-id`` images per identity, 6 cameras, one entry per ``--interval`` seconds. The model is a
  random ResNet-18 checkpoint with a 128-channel neck at 128x64 input (maps 128x8x4) and the default QAConv
  head; only its head scores here (the maps are given, not extracted).
* Build: entries added in chunks of ``--chunk`` (one commit each); the rate excludes generating them.
* Append: at 10 k, 100 k and 1 M entries (those <= ``--size``), the median of 5 appends of 1,000 new entries to
  the open store (one commit each), after ``os.sync()`` has written the build's pending data to disk (gigabytes
  at 1 M: left in the page cache they stall the first commits that sync), and the time to open the store (the
  columns but the maps are read).
* Queries (a fresh process, so its memory is the searcher's alone; the build writes the query maps, so the
  identity bases of the generator, 0.8 GB at 1 M entries, are never in it): ``--queries`` single-query searches at
  M = 100 and 400, top 10: the first stage (matrix product over the in-memory pooled vectors) and the whole
  search (first stage, reading the M maps from the table, exact QAConv re-scoring); median and 90th
  percentile; the same queries as one batch; a filtered search (3 cameras, half the time line).
* Recall: exhaustive QAConv top-10 (every map read and scored) of ``--recall-queries`` queries, against the
  two-stage top-10 at each M.
* Alternatives: LanceDB's own flat vector search as the first stage (instead of the in-memory product; faiss's
  flat index does the same product as the in-memory one), and reading M maps by LanceDB take versus a
  numpy memory-mapped segment file (the faiss + memory-mapped segments design; ``--mmap``, on up to 200 k).
* Memory: resident set (VmRSS) after opening and after the queries; the peak (VmHWM) of the searcher (open,
  queries, exhaustive search), then the peak once the alternatives have run too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _memory import reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script
from eval_scale import make_bases, make_set

C, H, W = 128, 8, 4
CHECKPOINTS = (10_000, 100_000, 1_000_000)
APPENDS = 5  # appends of 1,000 entries timed at each checkpoint
QUERIES = "queries.npy"  # the query maps, written by the build for the query process


def _model(folder: Path) -> str:
    """A random ResNet-18 checkpoint whose maps are 128x8x4, with the default QAConv head."""
    from qaconv.engine.checkpoint import save_checkpoint
    from qaconv.engine.runner import DEFAULTS, build_model

    path = folder / "model" / "checkpoint.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": 128, "width": 64,
               "neck": C}
        torch.manual_seed(0)
        model, matcher = build_model(cfg, load_weights=False)
        save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()}, path)
    return str(path)


def _bases(args) -> torch.Tensor:
    ids = max(1, args.size // args.per_id)
    return make_bases(ids, C, H, W, args.parts, args.palette, args.detail, torch.Generator().manual_seed(args.seed))


def _entries(start: int, n: int, bases, args, seed: int):
    """(maps [n, C, H, W] float32, metadata dicts) of entries start .. start + n - 1."""
    gen = torch.Generator().manual_seed(seed)
    maps, pids, cams = make_set(n, bases, args.noise, args.shift, gen)
    meta = [{"path": f"{start + i:07d}.jpg", "pid": int(p), "cam": f"c{int(c) + 1}",
             "time": (start + i) * args.interval} for i, (p, c) in enumerate(zip(pids, cams, strict=True))]
    return maps, meta


def _mib(field: str) -> str:
    kib = status_kib(field)
    return "n/a" if kib is None else f"{kib / 1024:.0f} MiB"


def _du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30


def build(args) -> None:
    from qaconv import Gallery

    folder = Path(args.dir)
    store = folder / "store"
    if store.exists():
        shutil.rmtree(store)
    mmap_path = folder / "mmap_features.f16"
    ckpt = _model(folder)
    bases = _bases(args)
    g = Gallery.create(store, ckpt, device="cpu")
    mm = open(mmap_path, "wb") if args.mmap else None  # noqa: SIM115 - the memory-mapped alternative's segment
    n, gen_s, add_s, extra = 0, 0.0, 0.0, 0
    marks = [m for m in CHECKPOINTS if m <= args.size]
    print(f"building {args.size:,} entries of {C}x{H}x{W} float16 maps in {store} (chunks of {args.chunk:,})")
    while n < args.size:
        nxt = min([m for m in marks if m > n] + [args.size])
        step = min(args.chunk, nxt - n)
        t0 = time.perf_counter()
        maps, meta = _entries(n, step, bases, args, seed=1000 + n)
        t1 = time.perf_counter()
        g.add(maps, meta)
        t2 = time.perf_counter()
        if mm is not None:
            mm.write(maps.half().numpy().tobytes())
        gen_s, add_s, n = gen_s + t1 - t0, add_s + t2 - t1, n + step
        if n in marks:
            t0 = time.perf_counter()
            os.sync()  # the build's pending writes reach the disk first: they would stall the commits timed here
            sync_s = time.perf_counter() - t0
            times = []
            for _ in range(APPENDS):
                maps, meta = _entries(10**8 + extra, 1000, bases, args, seed=77 + extra)
                t0 = time.perf_counter()
                g.add(maps, meta)
                times.append(time.perf_counter() - t0)
                extra += 1000
            t0 = time.perf_counter()
            opened = Gallery.open(store)
            open_s = time.perf_counter() - t0
            print(f"  at {n:>9,} entries: append 1,000 = {1e3 * np.median(times):7.1f} ms (median of {APPENDS}: "
                  f"{', '.join(f'{1e3 * t:.0f}' for t in times)} ms; after os.sync() of the build's writes, "
                  f"{sync_s:.1f} s), open the store = {open_s:6.2f} s ({len(opened):,} entries)")
            del opened
    if mm is not None:
        mm.close()
    np.save(folder / QUERIES, _entries(0, args.queries, bases, args, seed=424242)[0].numpy())
    print(f"build: {n:,} entries in {add_s:.1f} s = {n / add_s:,.0f} entries/s "
          f"({n * C * H * W * 2 / 2**20 / add_s:.0f} MB/s of maps); generating them took {gen_s:.1f} s (not counted)")
    print(f"store on disk: {_du(store):.2f} GiB for {len(g):,} entries ({extra:,} of them from the append probes); "
          f"build process peak RSS {_mib('VmHWM')}")
    if args.mmap:
        t0 = time.perf_counter()
        with open(mmap_path, "ab") as f:
            f.write(_entries(10**9, 1000, bases, args, seed=5)[0].half().numpy().tobytes())
            f.flush()
        print(f"memory-mapped alternative: append 1,000 maps to a segment file = "
              f"{1e3 * (time.perf_counter() - t0):.1f} ms (incl. generating them; no metadata, no delete, no "
              "atomic commit)")


def _pct(values, q):
    return 1e3 * float(np.percentile(values, q))


def query(args) -> None:
    from qaconv import Gallery
    from qaconv.gallery.query import allowed_rows, first_stage

    folder = Path(args.dir)
    store = folder / "store"
    reset_peak()
    t0 = time.perf_counter()
    g = Gallery.open(store, device="cpu")
    print(f"query process: opened {len(g):,} entries in {time.perf_counter() - t0:.2f} s; RSS {_mib('VmRSS')}")
    head = g.extractor.matcher  # loads the model
    rows = g._store.rows
    q_maps = torch.from_numpy(np.load(folder / QUERIES))  # made by the build: no identity bases in this process
    g.search(q_maps[:1], top=10, candidates=100)  # warm-up
    allowed = np.ones(rows.n, dtype=bool)
    per_m = {}
    for m in (100, 400):
        first, whole = [], []
        for i in range(args.queries):
            q = q_maps[i : i + 1]
            t0 = time.perf_counter()
            first_stage(rows, q, m, allowed)
            t1 = time.perf_counter()
            g.search(q, top=10, candidates=m)
            t2 = time.perf_counter()
            first.append(t1 - t0)
            whole.append(t2 - t1)
        t0 = time.perf_counter()
        batch = g.search(q_maps, top=10, candidates=m)
        batch_s = (time.perf_counter() - t0) / args.queries
        per_m[m] = batch
        print(f"M = {m}: one query: first stage median {_pct(first, 50):6.1f} ms (p90 {_pct(first, 90):6.1f}), "
              f"whole search median {_pct(whole, 50):6.1f} ms (p90 {_pct(whole, 90):6.1f}; re-scoring and reading "
              f"{m} maps {_pct(whole, 50) - _pct(first, 50):5.1f} ms); {args.queries} queries as one batch "
              f"{1e3 * batch_s:6.1f} ms per query")
    cams = ["c1", "c2", "c3"]
    window = (0.0, rows.n * args.interval / 2)
    filt = []
    for i in range(args.queries):
        t0 = time.perf_counter()
        g.search(q_maps[i : i + 1], top=10, candidates=100, cameras=cams, time_window=window)
        filt.append(time.perf_counter() - t0)
    kept = int(allowed_rows(rows, cams, window).sum())
    print(f"filtered (cameras c1-c3, first half of the time line: {kept:,} entries pass), M = 100: median "
          f"{_pct(filt, 50):.1f} ms")
    print(f"RSS after the queries {_mib('VmRSS')}, peak of this process {_mib('VmHWM')}")
    # recall of the exhaustive top-10
    r = min(args.recall_queries, args.queries)
    t0 = time.perf_counter()
    exact = g.search(q_maps[:r], top=10, exhaustive=True)
    ex_s = time.perf_counter() - t0
    print(f"exhaustive QAConv top-10 of {r} queries over {rows.n:,} entries: {ex_s:.1f} s "
          f"({r * rows.n / ex_s:,.0f} pairs/s, every map read); peak of the process now {_mib('VmHWM')}")
    for m, batch in per_m.items():
        hit = sum(len({h['row'] for h in a} & {h['row'] for h in b}) for a, b in zip(batch[:r], exact, strict=True))
        print(f"M = {m}: recall of the exhaustive top-10 = {hit / (10 * r):.3f}")
    searcher_peak = (status_kib("VmHWM") or 0) / 1024
    print(f"peak of the searcher (open, queries, exhaustive search): {searcher_peak:.0f} MiB")
    # alternatives, side by side
    from qaconv.models.pooled import PooledCosine

    vecs = PooledCosine.embed(q_maps).numpy()
    for m in (100, 400):
        lance = []
        for i in range(args.queries):
            t0 = time.perf_counter()
            rows.table.search(vecs[i], vector_column_name="pooled").metric("dot").select(["pid"]).limit(m).to_arrow()
            lance.append(time.perf_counter() - t0)
        rng = np.random.default_rng(m)
        take, mmap = [], []
        mm = np.memmap(folder / "mmap_features.f16", dtype=np.float16, mode="r").reshape(-1, C, H, W) \
            if (folder / "mmap_features.f16").exists() else None
        for _ in range(args.queries):
            pos = np.sort(rng.choice(rows.n, m, replace=False))
            t0 = time.perf_counter()
            g._store.take(rows, pos)
            t1 = time.perf_counter()
            if mm is not None:
                np.ascontiguousarray(mm[pos[pos < len(mm)]])
            mmap.append(time.perf_counter() - t1)
            take.append(t1 - t0)
        mm_text = f", numpy memmap gather {_pct(mmap, 50):.1f} ms" if mm is not None else ""
        print(f"M = {m}: LanceDB flat vector search as first stage median {_pct(lance, 50):.1f} ms; reading {m} "
              f"random maps: LanceDB take {_pct(take, 50):.1f} ms{mm_text} (warm page cache); peak so far "
              f"{_mib('VmHWM')}")
    del head
    print(f"peak once the alternatives have run too: {_mib('VmHWM')}")
    print(json.dumps({"entries": rows.n, "searcher_peak_rss_mib": searcher_peak,
                      "peak_rss_mib": (status_kib("VmHWM") or 0) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=100_000, help="entries in the store (default 100,000)")
    ap.add_argument("--dir", default="/tmp/qaconv_gallery_scale", help="working folder (store, model, mmap file)")
    ap.add_argument("--chunk", type=int, default=10_000, help="entries per add (one commit) while building")
    ap.add_argument("--queries", type=int, default=20, help="queries timed one by one and as one batch")
    ap.add_argument("--recall-queries", type=int, default=10, help="queries for the exhaustive top-10 recall")
    ap.add_argument("--per-id", type=int, default=20, help="images per identity")
    ap.add_argument("--noise", type=float, default=3.0, help="noise times the base's scale (eval_scale's default)")
    ap.add_argument("--shift", type=int, default=1, help="largest vertical misalignment (rows)")
    ap.add_argument("--parts", type=int, default=4, help="body-part bands per identity")
    ap.add_argument("--palette", type=int, default=4, help="shared part vectors to choose from per part")
    ap.add_argument("--detail", type=float, default=1.0, help="scale of per-location identity detail")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between entries' time stamps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=None,
                    help="also write the maps to a memory-mapped segment file (default: up to 200,000 entries)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the working folder afterwards (default: removed; at 1 M entries it holds ~9 GB)")
    ap.add_argument("--phase", choices=["all", "build", "query"], default="all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.mmap = args.size <= 200_000 if args.mmap is None else args.mmap
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    if args.phase in ("all", "build"):
        build(args)
    if args.phase == "query":
        query(args)
    elif args.phase == "all":  # the searcher in a fresh process: its memory is its own
        argv = [a for a in sys.argv[1:] if not a.startswith("--phase")]
        try:
            subprocess.run([sys.executable, __file__, *argv, "--phase", "query"], check=True)
        finally:
            if not args.keep:
                shutil.rmtree(args.dir, ignore_errors=True)
                print(f"removed {args.dir} (--keep keeps it)")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
