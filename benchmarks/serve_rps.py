"""Requests per second and latency of `qaconv serve` against the same search in process.

A random-init ResNet-18 (128x64 input, 8x4 maps, 128-ch neck) and a store of N synthetic entries (structured
feature maps: identities with noise); the server is started by its one command on 127.0.0.1 and searched with
one uploaded 128x64 JPEG per request, sequentially and from several client threads at once (httpx).

    python benchmarks/serve_rps.py [--entries 20000] [--requests 50] [--clients 4] [--candidates 100]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from qaconv import Gallery
from qaconv.engine.checkpoint import save_checkpoint
from qaconv.engine.runner import DEFAULTS, build_model

MODEL = {"arch": "resnet18", "ibn": None, "pretrained": None, "height": 128, "width": 64, "neck": 128}


def structured_maps(n: int, shape, ids: int, seed: int = 0) -> torch.Tensor:
    """Unit-norm-per-location maps: one random prototype per identity plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((ids, *shape)).astype(np.float32)
    maps = protos[rng.integers(0, ids, n)] + 0.8 * rng.standard_normal((n, *shape)).astype(np.float32)
    maps /= np.linalg.norm(maps, axis=1, keepdims=True)
    return torch.from_numpy(maps)


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (128, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_requests(url: str, count: int, clients: int, candidates: int) -> list[float]:
    latencies, lock = [], threading.Lock()

    def worker(k: int):
        with httpx.Client(timeout=120) as client:
            for i in range(k, count, clients):
                files = [("files", (f"q{i}.jpg", jpeg(i), "image/jpeg"))]
                t = time.perf_counter()
                res = client.post(f"{url}/search/upload", files=files, data={"top": "10",
                                                                                 "candidates": str(candidates)})
                dt = time.perf_counter() - t
                assert res.status_code == 200, res.text
                with lock:
                    latencies.append(dt)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=20000, help="gallery entries (default 20000)")
    ap.add_argument("--requests", type=int, default=50, help="search requests per measurement (default 50)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads (default 4)")
    ap.add_argument("--candidates", type=int, default=100, help="M, the shortlist re-scored (default 100)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve_rps_"))
    cfg = {**DEFAULTS, **MODEL}
    torch.manual_seed(0)
    model, matcher = build_model(cfg, load_weights=False)
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()},
                    tmp / "run" / "checkpoint.pt")
    gallery = Gallery.create(tmp / "store", tmp / "run", device="cpu")
    shape = gallery.feature_shape
    t = time.perf_counter()
    for s in range(0, args.entries, 10000):
        n = min(10000, args.entries - s)
        gallery.add(structured_maps(n, shape, 500, seed=s), [{"path": f"e{s + i:07d}.jpg", "cam": f"c{(s + i) % 6}"}
                                                             for i in range(n)])
    print(f"store: {len(gallery)} entries, maps {shape}, built in {time.perf_counter() - t:.1f} s")

    # in process: the same search, one query image at a time
    image = Image.open(io.BytesIO(jpeg(0))).convert("RGB")
    gallery.search([image], top=10, candidates=args.candidates)  # warm-up
    local = []
    for i in range(min(args.requests, 20)):
        image = Image.open(io.BytesIO(jpeg(i))).convert("RGB")
        t = time.perf_counter()
        gallery.search([image], top=10, candidates=args.candidates)
        local.append(time.perf_counter() - t)

    port = free_port()
    env = {**os.environ}
    server = subprocess.Popen([sys.executable, "-m", "qaconv", "serve", "--gallery", str(tmp / "store"),
                               "--checkpoint", str(tmp / "run"), "--port", str(port), "--device", "cpu"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
            if server.poll() is not None or time.perf_counter() - t0 > 300:
                raise SystemExit("the server did not start")
        print(f"server ready in {time.perf_counter() - t0:.1f} s (model and store opened once)")
        timed_requests(url, 3, 1, args.candidates)  # warm-up
        rows = [("in process (Gallery.search)", local, None)]
        for clients in (1, args.clients):
            t = time.perf_counter()
            lat = timed_requests(url, args.requests, clients, args.candidates)
            rows.append((f"HTTP, {clients} client(s)", lat, len(lat) / (time.perf_counter() - t)))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\nsearch, 1 uploaded 128x64 JPEG per request, top 10, M = {args.candidates}, {len(gallery)} entries, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'':32s} {'requests':>8s} {'req/s':>7s} {'p50 ms':>7s} {'p95 ms':>7s}")
    for name, lat, rps in rows:
        lat = sorted(lat)
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        rate = f"{rps:7.1f}" if rps else f"{1 / statistics.mean(lat):7.1f}"
        print(f"{name:32s} {len(lat):8d} {rate} {1000 * statistics.median(lat):7.1f} {1000 * p95:7.1f}")
    seq = statistics.median(rows[1][1])
    print(f"HTTP overhead per request (1 client, p50): {1000 * (seq - statistics.median(local)):.1f} ms")


if __name__ == "__main__":
    main()
