"""Matching engine benchmark: throughput, GFLOP/s and peak memory at 24x8 maps (prints figures, never asserts).

Usage: ``python benchmarks/matching.py`` (about 3-4 minutes on 2 cores; ``--rounds``, ``--no-memory``).

For C in {64, 128, 1024} and N x N pairs it times, interleaved round by round (best of ``--rounds``):

* ``engine``   -- :class:`qaconv.matching.Matcher` ``.scores`` (folded eval head, default 256 MB tile budget);
* ``einsum``   -- the straightforward formulation: ``QAConv.forward`` (einsum + two max-reductions + head)
  on 32 x 32 image chunks, the old ``pairwise_scores`` loop;
* ``matmul``   -- the bare fp32 product ``[p*HW, C] x [C, g*HW]`` over the same tile grid as the engine
  (same shapes, same total flops, no reductions, no head): the machine's matmul rate at this shape.

Flops are counted as 2*HW^2*C per pair (the similarity products only). Self-matching: ``self_scores(x)``
(upper-triangular blocks, mirrored) versus the full ``scores(x, x.clone())``.

Peak memory: torch's CPU allocations are invisible to tracemalloc and torch has no CPU allocator statistics,
so each method runs once in a fresh subprocess that builds its inputs, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs`` "5"), reads the current RSS, runs the method and reads the peak RSS (``VmHWM``);
the delta is the peak extra resident memory of the call (inputs, torch import and thread pools excluded;
it includes the engine's transposed input copies and the output matrix). ``ru_maxrss`` alone is not used
by default: on Linux a child started with fork+exec starts from its parent's peak, which hides the delta.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _memory import reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script

from qaconv.matching import DEFAULT_MEMORY, Matcher, block_sizes
from qaconv.models.qaconv import QAConv

H, W = 24, 8
HW = H * W
SIZES = {64: 128, 128: 96, 1024: 48}  # channels -> N (N x N pairs), about 2-4 s per method and round
CHUNK = 32  # the einsum baseline's chunk (32 x 32 images: 151 MB of similarities)


def _inputs(c: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prob = F.normalize(torch.randn(n, c, H, W, generator=g), dim=1)
    gal = F.normalize(torch.randn(n, c, H, W, generator=g), dim=1)
    return prob, gal


def _head(c: int) -> QAConv:
    return QAConv(c, H, W).eval()


@torch.inference_mode()
def run_engine(head, prob, gal, memory=None):
    return Matcher(head, device="cpu", memory=memory).scores(prob, gal)


@torch.inference_mode()
def run_einsum(head, prob, gal):
    out = torch.empty(len(prob), len(gal))
    for i in range(0, len(prob), CHUNK):
        for j in range(0, len(gal), CHUNK):
            out[i : i + CHUNK, j : j + CHUNK] = head(prob[i : i + CHUNK], gal[j : j + CHUNK])
    return out


@torch.inference_mode()
def run_matmul(head, prob, gal, memory=None):
    n_p, n_g, c = len(prob), len(gal), prob.shape[1]
    pt = prob.reshape(n_p, c, HW).transpose(1, 2).reshape(n_p * HW, c).contiguous()
    gt = gal.reshape(n_g, c, HW).permute(1, 0, 2).reshape(c, n_g * HW).contiguous()
    p, g = block_sizes(HW * HW * 4 + 2 * HW * 4, n_p, n_g, DEFAULT_MEMORY if memory is None else memory)
    buf = torch.empty(p * HW * g * HW)
    for i in range(0, n_p, p):
        for j in range(0, n_g, g):
            a, b = pt[i * HW : (i + p) * HW], gt[:, j * HW : (j + g) * HW]
            torch.mm(a, b, out=buf[: a.shape[0] * b.shape[1]].view(a.shape[0], b.shape[1]))
    return buf


METHODS = {"engine": run_engine, "einsum": run_einsum, "matmul": run_matmul}


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def mem_child(method: str, c: int, n: int) -> None:
    """Subprocess body: print the peak-RSS rise (bytes) of one call."""
    head = _head(c)
    prob, gal = _inputs(c, n)
    if reset_peak() and status_kib("VmHWM") is not None:
        before, peak = status_kib("VmRSS"), lambda: status_kib("VmHWM")
    else:  # ru_maxrss (KiB on Linux); note it can be inherited from the parent's peak across fork
        before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, None
    if method == "engine64":
        run_engine(head, prob, gal, 64 * 2**20)
    else:
        METHODS[method](head, prob, gal)
    after = peak() if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta": (after - before) * 1024}))


def peak_memory(method: str, c: int, n: int) -> float:
    cmd = [sys.executable, __file__, "--mem-child", method, str(c), str(n)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(res.stdout.strip().splitlines()[-1])["delta"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--self-n", type=int, nargs="+", default=[96], help="set sizes for the self-matching ratio")
    parser.add_argument("--self-only", action="store_true", help="only the self-matching ratio")
    parser.add_argument("--mem-child", nargs=3, metavar=("METHOD", "C", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mem_child:
        mem_child(args.mem_child[0], int(args.mem_child[1]), int(args.mem_child[2]))
        return
    print(f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, maps {H}x{W} (HW={HW}), fp32 CPU")
    print(f"best of {args.rounds} interleaved rounds; flops = 2*HW^2*C per pair; engine budget 256 MB\n")
    if not args.self_only:
        print(f"{'C':>5} {'N':>4} {'method':>7} {'pairs/s':>9} {'GFLOP/s':>8} {'vs einsum':>9} {'vs matmul':>9}")
    for c, n in {} if args.self_only else SIZES.items():
        head = _head(c)
        prob, gal = _inputs(c, n)
        torch.testing.assert_close(run_engine(head, prob, gal), run_einsum(head, prob, gal), atol=1e-5, rtol=0)
        best = {m: float("inf") for m in METHODS}
        for _ in range(args.rounds):
            for name, fn in METHODS.items():
                best[name] = min(best[name], _timed(fn, head, prob, gal))
        for name in METHODS:
            rate = n * n / best[name]
            print(
                f"{c:>5} {n:>4} {name:>7} {rate:>9.0f} {rate * 2 * HW * HW * c / 1e9:>8.1f} "
                f"{best['einsum'] / best[name]:>8.2f}x {best['matmul'] / best[name]:>8.2f}x"
            )
    c = 128
    head = _head(c)
    m = Matcher(head, device="cpu")
    for n in args.self_n:
        x, _ = _inputs(c, n)
        t_full = t_self = float("inf")
        for _ in range(args.rounds):
            t_full = min(t_full, _timed(m.scores, x, x.clone()))
            t_self = min(t_self, _timed(m.self_scores, x))
        print(
            f"\nself-matching C={c}, N={n}: full {t_full:.2f} s, self_scores {t_self:.2f} s, "
            f"ratio {t_self / t_full:.2f}"
        )
    if args.no_memory or args.self_only:
        return
    print("\npeak extra RSS of one call (MB; fresh subprocess each, VmHWM - VmRSS before the call):")
    print(f"{'C':>5} {'N':>4} " + " ".join(f"{name:>12}" for name in ("engine", "engine64", "einsum", "matmul")))
    for c, n in SIZES.items():
        row = [peak_memory(name, c, n) / 2**20 for name in ("engine", "engine64", "einsum", "matmul")]
        print(f"{c:>5} {n:>4} " + " ".join(f"{v:>12.0f}" for v in row))
    print("(engine64: the engine with a 64 MB tile budget; einsum: 32x32-image chunks)")


if __name__ == "__main__":
    main()
