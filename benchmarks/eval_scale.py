"""Exhaustive versus two-stage QAConv evaluation at Market-1501 scale (prints figures, never asserts).

Usage: ``python benchmarks/eval_scale.py --fraction 0.05`` (``--probes``, ``--gallery``, ``--channels``,
``--height``, ``--width``, ``--ids``, ``--noise``, ``--parts``, ``--palette``, ``--detail``, ``--candidates``,
``--exhaustive-probes``, ``--train-*``).

The whole official protocol (QAConv, +RR, +RR+TLift) on shortlists, one command per size::

    python benchmarks/eval_scale.py --size tenth  --m 100,200,400,800   # with the exhaustive protocol beside it
    python benchmarks/eval_scale.py --size market --m 100,200,400,800
    python benchmarks/eval_scale.py --size msmt   --m 100,200,400,800

(``--exhaustive`` / ``--no-exhaustive`` overrides the default, which runs the exhaustive protocol only at the
tenth). See "protocol on shortlists" below.

Synthetic features with identity structure: every identity has a base map ``[C, H, W]`` made of ``--parts``
horizontal bands (body parts), each filled with one of ``--palette`` part vectors shared by all identities
(people dress alike: global pooling confuses identities with the same combination), plus ``--detail`` times
identity-specific per-location vectors; ``--parts 0`` makes every location i.i.d. (no spatial structure, the
hardest case for the pooled first stage). An image of an identity is the base rolled
vertically by a random offset (at most ``--shift`` rows, a misalignment that QAConv's local
matching absorbs and global pooling ignores) plus Gaussian noise (``--noise`` times the base's scale), then
L2-normalised per location. Cameras are random in 0..5. The defaults are Market-1501's test split
(3,368 probes x 15,913 gallery at 24x8, C=128, 750 identities); ``--fraction f`` scales the probe, gallery
and identity counts by ``f``.

Figures:

* exhaustive: :meth:`Matcher.scores` over ``--exhaustive-probes`` probes (default: all) x the gallery; its
  time is extrapolated linearly in pairs to the full (fraction-scaled) probe set and to the unscaled size.
* two-stage: :func:`qaconv.gallery.search.two_stage_scores` for each M, the path of ``qaconv evaluate --two-stage M``
  (first-stage time measured separately): QAConv logits for each probe's M pooled-cosine candidates, the
  rest ranked below them by cosine; recall of the exhaustive top-10 within the two-stage top-10, and mAP /
  rank-1 by :func:`qaconv.metrics.evaluate_rank` over the whole gallery, relative to the exhaustive mAP
  (same probes). Extrapolation to the
  unscaled size: first stage scales with P*G, re-scoring with P*M.
* training throughput: images/s of full training steps (forward, in-batch QAConv triplet loss, backward,
  clipping, SGD) of a random-init backbone on random images, batch ``--train-batch`` of K=2 per identity
  (``--train-arch``/``--train-ibn``/``--train-size``; data loading and augmentation excluded, they overlap with
  the step in worker processes); the first step is a warm-up and not timed. ``--train-steps 0`` skips it.
* protocol on shortlists (``--size tenth|market|msmt``: 337 x 1,591, Market-1501's 3,368 x 15,913 and MSMT17's
  11,659 x 82,161 images, 75 / 750 / 3,060 identities): for each M of ``--m``, the path of ``qaconv evaluate
  --two-stage M --rerank --tlift`` step by step (:mod:`qaconv.engine.evaluator`): pooled-cosine shortlists
  (first stage), exact QAConv of every distinct shortlisted pair, k-reciprocal re-ranking from the shortlists,
  TLift of 1 - the re-ranked distance, and the metrics of the three rows; time of each stage, peak RSS and mAP.
  Time stamps: each identity passes at a random time (uniform over ``ids x --id-interval`` s), each image
  within ``--time-spread`` s of it. The exhaustive protocol (all [Q+G]^2 QAConv logits, dense re-ranking, TLift)
  runs on the same data when asked (default: at the tenth only) and each row's mAP is divided by its
  exhaustive counterpart. For memory, the benchmark frees the feature maps once they are re-scored and
  evaluates the QAConv row before TLift; ``qaconv evaluate`` keeps the maps (4 (Q+G) C H W bytes: 9.2 GB at
  MSMT17 size with C = 128, 24x8) and every row's [Q, G] matrix for its report and score files.
* peak memory: the process's peak resident set (``VmHWM`` in ``/proc/self/status``), reset before each
  method via ``/proc/self/clear_refs`` where the kernel allows it (then it is the peak during that method,
  inputs included, since they are resident).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from _memory import reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script

from qaconv.data.records import Record
from qaconv.engine.evaluator import (
    POST_DEFAULTS,
    RR,
    RR_TLIFT,
    postprocess,
    score_shortlists,
    shortlist_candidates,
    shortlist_rerank,
    two_stage_matrix,
)
from qaconv.gallery.search import pooled_candidates, two_stage_scores
from qaconv.matching import Matcher
from qaconv.metrics import evaluate_rank
from qaconv.models.qaconv import QAConv
from qaconv.tlift import tlift

SIZES = {"tenth": (337, 1591, 75), "market": (3368, 15913, 750), "msmt": (11659, 82161, 3060)}  # probes, gallery, ids


def _peak_mib() -> str:
    kib = status_kib("VmHWM")
    return "n/a" if kib is None else f"{kib / 1024:.0f} MiB"


def make_bases(
    num_ids: int, c: int, h: int, w: int, parts: int, palette: int, detail: float, gen: torch.Generator
) -> torch.Tensor:
    """Identity base maps ``[N, C, H, W]``: ``parts`` horizontal bands, each holding one of ``palette`` shared
    part vectors (many people wear similar clothes: pooled features confuse them), plus ``detail`` times
    i.i.d. per-location vectors (what tells them apart locally); ``parts=0`` gives i.i.d. locations only."""
    if parts <= 0:
        return torch.randn(num_ids, c, h, w, generator=gen)
    band = torch.div(torch.arange(h) * parts, h, rounding_mode="floor")  # row -> part
    shared = torch.randn(parts, palette, c, generator=gen)
    choice = torch.randint(palette, (num_ids, parts), generator=gen)
    part_vec = shared[torch.arange(parts), choice].permute(0, 2, 1)  # [N, C, parts]
    base = part_vec[:, :, band].unsqueeze(3).expand(num_ids, c, h, w)
    return base + detail * torch.randn(num_ids, c, h, w, generator=gen)


def make_set(n: int, bases: torch.Tensor, noise: float, shift: int, gen: torch.Generator, chunk: int = 512):
    """``n`` maps of random identities: rolled base + noise, L2-normalised per location; (maps, pids, camids)."""
    num_ids, c, h, w = bases.shape
    pids = torch.randint(num_ids, (n,), generator=gen)
    cams = torch.randint(6, (n,), generator=gen)
    shifts = torch.randint(-shift, shift + 1, (n,), generator=gen)
    maps = torch.empty(n, c, h, w)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = bases[pids[s:e]].clone()
        for j in range(e - s):
            if shifts[s + j]:
                x[j] = x[j].roll(int(shifts[s + j]), dims=1)
        x += noise * torch.randn(x.shape, generator=gen)
        maps[s:e] = F.normalize(x, dim=1)
    return maps, pids.numpy(), cams.numpy()


def _recall(two_i: torch.Tensor, ex_i: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(two_i, ex_i, strict=True))
    return hits / ex_i.numel()


def train_throughput(arch: str, ibn: str | None, height: int, width: int, batch: int, steps: int) -> float:
    """Images/s of training steps with the package's model, loss and optimiser (first step untimed)."""
    from qaconv.engine.runner import DEFAULTS, build_criterion, build_model
    from qaconv.engine.trainer import make_optimizer
    from qaconv.matching import pick_device

    cfg = {**DEFAULTS, "arch": arch, "ibn": ibn, "pretrained": None, "height": height, "width": width}
    dev = pick_device(None)
    model, matcher = build_model(cfg, load_weights=False)
    criterion = build_criterion(cfg, model, matcher, num_classes=batch // 2)
    model, criterion = model.to(dev).train(), criterion.to(dev).train()
    opt = make_optimizer(model, criterion, cfg["lr"], cfg["weight_decay"], cfg["backbone_lr_mult"])
    images = torch.rand(batch, 3, height, width, device=dev)
    targets = torch.arange(batch, device=dev) // 2
    amp = dev.type == "cuda"
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            loss, _ = criterion(model(images).float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch * steps / sum(times[1:])


# -- the whole protocol on shortlists --------------------------------------------------------------------------
def protocol_world(size: str, args) -> dict:
    """Feature maps, identities, cameras and time stamps of one ``--size`` (structured as above)."""
    num_p, num_g, num_ids = SIZES[size]
    gen = torch.Generator().manual_seed(args.seed)
    bases = make_bases(num_ids, args.channels, args.height, args.width, args.parts, args.palette, args.detail, gen)
    q, q_pids, q_cams = make_set(num_p, bases, args.noise, args.shift, gen)
    g, g_pids, g_cams = make_set(num_g, bases, args.noise, args.shift, gen)
    rng = np.random.default_rng(args.seed + 1)
    passing = rng.uniform(0, num_ids * args.id_interval, num_ids)  # when each identity walks by

    def times(pids):
        return passing[pids] + rng.uniform(-args.time_spread, args.time_spread, len(pids))

    return {"q": q, "g": g, "ids": (q_pids, g_pids, q_cams, g_cams), "times": (times(q_pids), times(g_pids))}


def _lift(score: np.ndarray, world: dict) -> np.ndarray:
    q_pids, g_pids, q_cams, g_cams = world["ids"]
    kw = {k: POST_DEFAULTS[v] for k, v in (("tau", "tau"), ("sigma", "sigma"), ("k", "tlift_k"), ("alpha", "alpha"))}
    return tlift(score, q_cams, world["times"][0], g_cams, world["times"][1], **kw)


def _fake_data(world: dict):
    """What :func:`postprocess` reads of a test set: records with camera and time, has_time."""
    (q_pids, g_pids, q_cams, g_cams), (q_t, g_t) = world["ids"], world["times"]
    recs = [[Record("", int(p), int(c), float(t)) for p, c, t in zip(*a, strict=True)]
            for a in ((q_pids, q_cams, q_t), (g_pids, g_cams, g_t))]  # fmt: skip
    return SimpleNamespace(name="synthetic", query=recs[0], gallery=recs[1], has_time=True)


def run_exhaustive(world: dict, head, opts: dict) -> dict:
    """The exhaustive protocol: every [Q+G]^2 logit (symmetric self-matching), then :func:`postprocess`."""
    reset_peak()
    t0 = time.perf_counter()
    stack = torch.cat([world["q"], world["g"]])
    full = Matcher(head, "cpu").self_scores(stack).numpy()
    del stack
    t_qaconv = time.perf_counter() - t0
    nq = len(world["q"])

    def score_fn(rows, cols):
        idx = np.arange(len(full))
        return full[idx[rows]][:, idx[cols]]

    rows = postprocess(full[:nq, nq:], _fake_data(world), {**opts, "tlift": True}, score_fn, progress=False)
    t_post = time.perf_counter() - t0 - t_qaconv
    maps = {label: evaluate_rank(d, *world["ids"]).mAP for label, d in rows.items()}
    return {"qaconv_s": t_qaconv, "post_s": t_post, "total_s": time.perf_counter() - t0, "peak": _peak_mib(),
            "mAP": maps}


def run_shortlist(world: dict, head, m: int, opts: dict) -> dict:
    """``--two-stage m --rerank --tlift`` step by step; frees the maps in ``world`` once they are re-scored."""
    reset_peak()
    stages = {}
    t0 = time.perf_counter()
    q, g = world.pop("q"), world.pop("g")
    sl = shortlist_candidates(q, g, m, lists=max(opts["k1"] + 1, opts["k2"]), device="cpu")
    stages["first stage"] = time.perf_counter() - t0
    score_shortlists(head, q, g, sl, device="cpu")
    stages["re-scoring"] = time.perf_counter() - t0 - sum(stages.values())
    del q, g
    s_qg = two_stage_matrix(sl, device="cpu")
    d_rr = shortlist_rerank(sl, s_qg, opts)
    stages["re-ranking"] = time.perf_counter() - t0 - sum(stages.values())
    maps = {}
    np.negative(s_qg, out=s_qg)  # the QAConv row's distance, in place
    maps[""] = evaluate_rank(s_qg, *world["ids"]).mAP
    del s_qg
    maps[RR] = evaluate_rank(d_rr, *world["ids"]).mAP
    stages["metrics"] = time.perf_counter() - t0 - sum(stages.values())
    sim = 1.0 - d_rr
    del d_rr
    lifted = _lift(sim, world)
    del sim
    np.subtract(1.0, lifted, out=lifted)
    stages["TLift"] = time.perf_counter() - t0 - sum(stages.values())
    maps[RR_TLIFT] = evaluate_rank(lifted, *world["ids"]).mAP
    stages["metrics"] += time.perf_counter() - t0 - sum(stages.values())
    return {"stages": stages, "total_s": time.perf_counter() - t0, "peak": _peak_mib(), "pairs": sl.pairs,
            "m": sl.m, "mAP": maps}


def protocol_main(args) -> None:
    opts = {**POST_DEFAULTS, "tlift": True}
    num_p, num_g, _ = SIZES[args.size]
    n = num_p + num_g
    torch.manual_seed(args.seed)
    head = QAConv(args.channels, args.height, args.width).eval()
    exhaustive = args.size == "tenth" if args.exhaustive is None else args.exhaustive
    print(f"threads={torch.get_num_threads()}  size={args.size}  probes={num_p}  gallery={num_g}  "
          f"ids={SIZES[args.size][2]}  C={args.channels}  HxW={args.height}x{args.width}  noise={args.noise}  "
          f"k1/k2/lambda={opts['k1']}/{opts['k2']}/{opts['lambda_value']}  rerank_input={opts['rerank_input']}")
    _lift(np.full((2, 2), 0.5, dtype=np.float32), {"ids": (None, None, np.zeros(2), np.zeros(2)),
                                                   "times": (np.zeros(2), np.zeros(2))})  # compile TLift first
    t0 = time.perf_counter()
    world = protocol_world(args.size, args)
    gib = 4 * n * args.channels * args.height * args.width / 2**30
    print(f"synthetic data: {time.perf_counter() - t0:.0f} s, maps {gib:.2f} GiB (data time is not counted below)")
    ex = None
    if exhaustive:
        ex = run_exhaustive(world, head, opts)
        print(f"\nexhaustive protocol: {ex['total_s']:.1f} s ({ex['qaconv_s']:.1f} s QAConv over all {n}^2 pairs, "
              f"{ex['post_s']:.1f} s re-ranking + TLift), peak RSS {ex['peak']}; mAP QAConv {ex['mAP']['']:.4f}  "
              f"+RR {ex['mAP'][RR]:.4f}  +RR+TLift {ex['mAP'][RR_TLIFT]:.4f}")
    labels = ("", RR, RR_TLIFT)
    names = {"": "QAConv", RR: "+RR", RR_TLIFT: "+RR+TLift"}
    head_line = f"{'M':>5} {'pairs':>11} {'total s':>8} {'peak RSS':>10}" + "".join(
        f" {'mAP ' + names[k]:>15}" for k in labels)
    if ex:
        head_line += "".join(f" {'ratio ' + names[k]:>16}" for k in labels)
    print("\n" + head_line)
    results = []
    for m in args.m:
        if "q" not in world:
            world = protocol_world(args.size, args)
        r = run_shortlist(world, head, m, opts)
        results.append(r)
        line = f"{r['m']:>5} {r['pairs']:>11,} {r['total_s']:>8.1f} {r['peak']:>10}" + "".join(
            f" {r['mAP'][k]:>15.4f}" for k in labels)
        if ex:
            line += "".join(f" {r['mAP'][k] / ex['mAP'][k]:>16.4f}" for k in labels)
        print(line, flush=True)
    print("\nstage times (s):")
    stages = list(results[0]["stages"]) if results else []
    print(f"{'M':>5} " + " ".join(f"{s:>12}" for s in stages))
    for r in results:
        print(f"{r['m']:>5} " + " ".join(f"{r['stages'][s]:>12.1f}" for s in stages))
    print(f"\npairs: distinct QAConv pairs re-scored (of {n}^2 = {n * n:,}); ratio: mAP / the exhaustive protocol's "
          "mAP of the same row on the same data; total: first stage to the last metric, data generation excluded.")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probes", type=int, default=3368)
    ap.add_argument("--gallery", type=int, default=15913)
    ap.add_argument("--ids", type=int, default=750)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--height", type=int, default=24)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--fraction", type=float, default=1.0, help="scale probes, gallery and ids by this")
    ap.add_argument("--noise", type=float, default=3.0)
    ap.add_argument("--shift", type=int, default=2)
    ap.add_argument("--parts", type=int, default=6, help="body-part bands per identity (0: i.i.d. locations)")
    ap.add_argument("--palette", type=int, default=2, help="shared part vectors to choose from per part")
    ap.add_argument("--detail", type=float, default=1.0, help="scale of per-location identity detail")
    ap.add_argument("--candidates", type=int, nargs="+", default=[50, 100, 200, 400])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--exhaustive-probes", type=int, default=None, help="probes for the exhaustive run (all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps (0 skips)")
    ap.add_argument("--train-arch", default="resnet50")
    ap.add_argument("--train-ibn", default="b", help="a, b or none")
    ap.add_argument("--train-size", type=int, nargs=2, default=[384, 128], metavar=("H", "W"))
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--size", choices=sorted(SIZES), help="run the whole protocol on shortlists at this size")
    ap.add_argument("--m", type=lambda v: [int(x) for x in v.split(",")], default=[100, 200, 400, 800],
                    help="with --size: comma-separated shortlist sizes M")
    ap.add_argument("--exhaustive", action=argparse.BooleanOptionalAction, default=None,
                    help="with --size: also run the exhaustive protocol (default: at the tenth only)")
    ap.add_argument("--id-interval", type=float, default=20.0, help="with --size: timeline seconds per identity")
    ap.add_argument("--time-spread", type=float, default=60.0, help="with --size: |image - identity time| max")
    args = ap.parse_args(argv)
    if args.size:
        protocol_main(args)
        return
    if not 0 < args.fraction <= 1:
        ap.error("--fraction must be in (0, 1]")

    f = args.fraction
    num_p, num_g = max(1, round(args.probes * f)), max(1, round(args.gallery * f))
    num_ids = max(2, round(args.ids * f))
    c, h, w = args.channels, args.height, args.width
    gen = torch.Generator().manual_seed(args.seed)
    bases = make_bases(num_ids, c, h, w, args.parts, args.palette, args.detail, gen)
    prob, q_pids, q_cams = make_set(num_p, bases, args.noise, args.shift, gen)
    gal, g_pids, g_cams = make_set(num_g, bases, args.noise, args.shift, gen)
    torch.manual_seed(args.seed)
    head = QAConv(c, h, w).eval()  # default eval head: fc weight 1/HW, identity BatchNorms
    print(
        f"threads={torch.get_num_threads()}  fraction={f}  probes={num_p}  gallery={num_g}  ids={num_ids}  "
        f"C={c}  HxW={h}x{w}  noise={args.noise}  shift={args.shift}  parts={args.parts}  palette={args.palette}  "
        f"detail={args.detail}"
    )
    print(f"inputs: {(prob.numel() + gal.numel()) * 4 / 2**20:.0f} MiB; peak RSS after building them {_peak_mib()}")
    full_pairs = args.probes * args.gallery

    # -- exhaustive --------------------------------------------------------------------------------------------
    num_e = num_p if args.exhaustive_probes is None else max(1, min(num_p, args.exhaustive_probes))
    reset_peak()
    t0 = time.perf_counter()
    full = Matcher(head, "cpu").scores(prob[:num_e], gal)
    t_ex = time.perf_counter() - t0
    rate = num_e * num_g / t_ex
    note = "" if num_e == num_p else f" (measured on {num_e} probes, extrapolated)"
    print(
        f"\nexhaustive: {t_ex:.1f} s for {num_e} x {num_g} pairs ({rate / 1e3:.1f} k pairs/s), peak RSS {_peak_mib()}"
    )
    print(
        f"  all {num_p} probes: {num_p * num_g / rate:.1f} s{note}; unscaled {args.probes} x {args.gallery}: "
        f"{full_pairs / rate / 60:.1f} min (extrapolated by pairs)"
    )
    k = min(args.k, num_g)
    ex_s, ex_i = full.topk(k, dim=1)
    qp, qc = q_pids[:num_e], q_cams[:num_e]
    ex_res = evaluate_rank(-full.numpy(), qp, g_pids, qc, g_cams)
    print(f"  exhaustive mAP {ex_res.mAP:.4f}  rank-1 {ex_res.rank(1):.4f}  ({ex_res.num_valid} valid probes)")
    ep = F.normalize(prob[:num_e].mean(dim=(2, 3)), dim=1)
    eg = F.normalize(gal.mean(dim=(2, 3)), dim=1)
    pooled = evaluate_rank(-(ep @ eg.t()).numpy(), qp, g_pids, qc, g_cams)
    print(f"  first stage alone (pooled cosine) mAP {pooled.mAP:.4f}  rank-1 {pooled.rank(1):.4f}")

    # -- two-stage ---------------------------------------------------------------------------------------------
    print(
        f"\n{'M':>5} {'stage1 s':>9} {'total s':>8} {'speedup':>8} {'recall@' + str(k):>10} {'mAP':>7} "
        f"{'mAP rel':>8} {'rank-1':>7} {'peak RSS':>10} {'unscaled est.':>14}"
    )
    for m in args.candidates:
        if m < k:
            print(f"{m:>5} skipped (M < k)")
            continue
        mm = min(m, num_g)
        reset_peak()
        t0 = time.perf_counter()
        pooled_candidates(prob, gal, mm, device="cpu")
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores, _ = two_stage_scores(head, prob, gal, mm, device="cpu")
        t_two = time.perf_counter() - t0
        peak = _peak_mib()
        res = evaluate_rank(-scores[:num_e].numpy(), qp, g_pids, qc, g_cams)
        i = scores.topk(k, dim=1).indices
        rec = _recall(i[:num_e, :k], ex_i)
        t_rescore = max(t_two - t_first, 0.0)
        est = t_first * full_pairs / (num_p * num_g) + t_rescore * args.probes / num_p
        speed = (num_p * num_g / rate) / t_two
        print(
            f"{m:>5} {t_first:>9.2f} {t_two:>8.2f} {speed:>7.1f}x {rec:>10.4f} {res.mAP:>7.4f} "
            f"{res.mAP / ex_res.mAP:>8.4f} {res.rank(1):>7.4f} {peak:>10} {est / 60:>11.1f} min"
        )
    if args.train_steps > 0:
        ibn = None if args.train_ibn == "none" else args.train_ibn
        h, w = args.train_size
        rate = train_throughput(args.train_arch, ibn, h, w, args.train_batch, args.train_steps)
        print(
            f"\ntraining: {rate:.1f} images/s ({args.train_arch}, IBN {ibn}, {h}x{w}, batch {args.train_batch}, "
            f"{args.train_steps} timed steps)"
        )
    print(
        "\nrecall@k: share of the exhaustive top-k found in the two-stage top-k (same probes); mAP rel: "
        "two-stage mAP / exhaustive mAP; speedup vs exhaustive over all probes (extrapolated if subset)."
    )


if __name__ == "__main__":
    main()
