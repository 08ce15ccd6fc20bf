"""GPU check: training steps of the default recipe, fp16 versus fp32 matching, exhaustive and two-stage matching
time at Market size, measured in one run on one device (prints figures, never asserts).

Usage: ``python benchmarks/gpu_check.py`` (one CUDA GPU when there is one, under 5 minutes), or
``python benchmarks/gpu_check.py --device cpu --small`` (every check at a tiny size, seconds). Options:
``--device auto|cpu|cuda|cuda:N``, ``--json PATH`` (the JSON line also written there), ``--checks`` (a subset of
train fp16 exhaustive two_stage), ``--steps``, ``--workers``, ``--seed``.

Checks (full size; ``--small`` shrinks every count, map and image size, see ``SMALL``):

1. ``train``: the default recipe (2.1: graph sampler, batch-hard triplet, ResNet-50 IBN-b to layer3 with a
   128-channel neck, 384x128, batch 64 of ``num_instance`` images per identity, AMP where the recipe's
   ``amp: auto`` turns it on, i.e. on CUDA), random init (``pretrained: none``). A :class:`Trainer` is built on a
   small generated synthetic domain (:func:`qaconv.data.synth.generate_domain`); its graph sampler builds one
   epoch's batches (class distances through the model: timed as ``graph_s``); the first ``steps + 1`` batches
   are loaded (augmented) before timing; then the trainer's own step (forward, in-batch QAConv triplet loss,
   GradScaler backward, clipping, SGD) runs on each, the first as warm-up. Figures: images/s of the timed
   steps (loading excluded), peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS), whether
   every loss was finite, first and last loss.
2. ``fp16``: QAConv logits (the default eval head, :class:`qaconv.matching.Matcher`) of ``fp16_probes x
   fp16_gallery`` pairs in fp16 versus fp32 on the same device, for random unit-norm maps and for the
   structured maps of ``benchmarks/eval_scale.py``: max abs difference (and relative to the fp32 logit
   range), the fraction of queries whose top-10 sets are equal and the mean top-10 overlap. On CUDA the fp16
   side is the package's own path (the engine casts its input copies to fp16); on CPU, where the package
   always matches in fp32, fp16 is forced (it is slow there: small sizes only).
3. ``exhaustive``: :meth:`Matcher.scores` over Market-size ``3,368 x 15,913`` pairs (C=128, 24x8, the
   structured synthetic features of ``benchmarks/eval_scale.py``), after a small warm-up call: time, pairs/s,
   peak memory.
4. ``two_stage``: :func:`two_stage_scores` (``qaconv.gallery.search``, else ``qaconv.search``) on the same
   features for each M in ``candidates`` (100, 400): time, re-scored pairs/s, speed-up over the exhaustive time
   of check 3, recall of the exhaustive top-10 in the two-stage top-10.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _memory import reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script
from eval_scale import make_bases, make_set

from qaconv.matching import Matcher, pick_device
from qaconv.models.qaconv import QAConv

try:  # the search functions may move into the gallery package
    from qaconv.gallery.search import two_stage_scores
except ImportError:
    from qaconv.search import two_stage_scores

CHECKS = ("train", "fp16", "exhaustive", "two_stage")
# eval_scale.py's defaults for the structured features (its argparse defaults)
NOISE, SHIFT, PARTS, PALETTE, DETAIL = 3.0, 2, 6, 2, 1.0


@dataclass(frozen=True)
class Size:
    """Every count and shape the checks use."""

    name: str
    height: int  # training images
    width: int
    batch: int | None  # None: the recipe's batch size
    steps: int  # timed training steps (one more runs as warm-up)
    synth_height: int  # generated image size (the training transform resizes to height x width)
    synth_width: int
    channels: int  # matching feature maps [C, map_h, map_w]
    map_h: int
    map_w: int
    fp16_probes: int
    fp16_gallery: int
    fp16_ids: int
    probes: int  # exhaustive and two-stage
    gallery: int
    ids: int
    candidates: tuple[int, ...]
    k: int = 10


FULL = Size("full", 384, 128, None, 20, 128, 64, 128, 24, 8, 200, 2000, 100, 3368, 15913, 750, (100, 400))
SMALL = Size("small", 64, 32, 8, 2, 32, 16, 32, 8, 4, 20, 200, 10, 100, 500, 25, (10, 40))


# -- helpers -------------------------------------------------------------------------------------------------
def topk_agreement(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[float, float]:
    """For two score matrices ``[P, G]``: (fraction of rows whose top-``k`` index sets are equal, mean overlap
    ``|top_k(a) & top_k(b)| / k``)."""
    k = min(k, a.shape[1])
    ia, ib = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return topk_overlap(ia, ib)


def topk_overlap(ia: torch.Tensor, ib: torch.Tensor) -> tuple[float, float]:
    """For two index matrices ``[P, k]``: (fraction of rows with equal sets, mean ``|row_a & row_b| / k``)."""
    if ia.numel() == 0:
        return math.nan, math.nan
    hits = (ia.unsqueeze(2) == ib.unsqueeze(1)).any(dim=2).sum(dim=1)  # indices within a row are distinct
    k = ia.shape[1]
    return float((hits == k).float().mean()), float(hits.float().mean() / k)


class _DtypeMatcher(Matcher):
    """The package's matching engine with its tile dtype forced (fp32 on CUDA, fp16 on CPU)."""

    def __init__(self, head: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        super().__init__(head, device)
        self.dtype = dtype

    def _compute_dtype(self) -> torch.dtype:
        return self.dtype


def matcher_for(head: torch.nn.Module, dev: torch.device, dtype: torch.dtype) -> tuple[Matcher, str]:
    """A Matcher that tiles in ``dtype`` on ``dev``, and how: the package's own path or a forced dtype."""
    if not hasattr(Matcher, "_compute_dtype"):
        raise RuntimeError("qaconv.matching.Matcher has no _compute_dtype any more: update gpu_check.py")
    plain = Matcher(head, dev)
    if plain._compute_dtype() == dtype:
        return plain, "package"
    return _DtypeMatcher(head, dev, dtype), "forced"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        reset_peak()


def _peak_mib(dev: torch.device) -> float:
    """CUDA: peak allocated memory since the last reset; CPU: the process's peak resident set (VmHWM)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    kib = status_kib("VmHWM")
    return math.nan if kib is None else kib / 1024


def _timed(dev: torch.device, fn: Callable):
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0


def structured_maps(n_p: int, n_g: int, ids: int, c: int, h: int, w: int, gen: torch.Generator):
    """Probe and gallery maps with identity structure (eval_scale.py's generator and defaults)."""
    bases = make_bases(ids, c, h, w, PARTS, PALETTE, DETAIL, gen)
    return make_set(n_p, bases, NOISE, SHIFT, gen)[0], make_set(n_g, bases, NOISE, SHIFT, gen)[0]


def device_info(dev: torch.device) -> dict:
    info = {
        "device": str(dev),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": None,
        "cudnn": None,
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    return info


# -- checks --------------------------------------------------------------------------------------------------
def check_train(size: Size, dev: torch.device, steps: int, workers: int, seed: int) -> dict:
    """Steps of the default recipe through the package's Trainer (see the module docstring, check 1)."""
    from qaconv.data.images import collate_skip_bad
    from qaconv.data.market import load_market_layout
    from qaconv.data.synth import generate_domain
    from qaconv.engine.runner import DEFAULTS, _amp, _freeze_bn, build_criterion, build_model
    from qaconv.engine.trainer import Trainer
    from qaconv.recipes import DEFAULT_RECIPE, load_recipe

    cfg = {
        **DEFAULTS,
        **load_recipe(DEFAULT_RECIPE),
        "pretrained": "none",
        "backbone_weights": None,
        "height": size.height,
        "width": size.width,
    }
    if size.batch is not None:
        cfg["batch_size"] = size.batch
    per_id = cfg["num_instance"]
    num_ids = max(cfg["batch_size"] // per_id, steps + 1)  # a full batch, and one graph batch per step
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_domain(
            "A",
            tmp,
            seed=seed,
            num_train_ids=num_ids,
            num_test_ids=1,
            height=size.synth_height,
            width=size.synth_width,
            workers=workers,
            progress=False,
        )
        records = load_market_layout(tmp).train
        t_data = time.perf_counter() - t0
        torch.manual_seed(seed)
        model, matcher = build_model(cfg, load_weights=False)
        criterion = build_criterion(cfg, model, matcher, len({r.pid for r in records}))
        trainer = Trainer(
            model, matcher, criterion, records, Path(tmp) / "run", height=cfg["height"], width=cfg["width"],
            batch_size=cfg["batch_size"], num_instance=per_id, sampler=cfg["sampler"],
            gs_pre_epochs=cfg["gs_pre_epochs"], gs_rerank=cfg["gs_rerank"], lr=cfg["lr"],
            weight_decay=cfg["weight_decay"], backbone_lr_mult=cfg["backbone_lr_mult"], clip=cfg["clip"],
            step_factor=cfg["step_factor"], max_epochs=cfg["max_epochs"], freeze_backbone_bn=_freeze_bn(cfg),
            augment=cfg["augment"], augment_after_acc=cfg["augment_after_acc"], amp=_amp(cfg["amp"]),
            workers=workers, device=dev, seed=seed, eval_batch=cfg["fea_batch"], progress=False,
        )  # fmt: skip
        trainer.sampler.set_epoch(1)
        batches, t_graph = _timed(dev, lambda: list(trainer.sampler)[: steps + 1])
        loader = torch.utils.data.DataLoader(
            trainer.dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_skip_bad
        )
        loaded = [(images, pids) for images, pids, *_ in loader]
    trainer._set_train_mode()
    _reset_peak(dev)
    losses, times = [], []
    for images, pids in loaded:
        images = images.to(dev).contiguous(memory_format=torch.channels_last)
        targets = pids.to(dev)
        (loss, _), dt = _timed(dev, lambda im=images, t=targets: trainer._step(im, t))
        losses.append(math.nan if loss is None else loss)
        times.append(dt)
    timed = loaded[1:] if len(loaded) > 1 else loaded
    seen = sum(len(images) for images, _ in timed)
    return {
        "recipe": DEFAULT_RECIPE,
        "arch": f"{cfg['arch']} ibn-{cfg['ibn']} {cfg['final_layer']} neck {cfg['neck']}",
        "image_size": f"{cfg['height']}x{cfg['width']}",
        "batch": f"{cfg['batch_size']} = {cfg['batch_size'] // per_id} ids x {per_id}",
        "amp": bool(trainer.amp),
        "timed_steps": len(timed),
        "images_per_s": seen / sum(times[1:] if len(times) > 1 else times),
        "peak_mem_mib": _peak_mib(dev),
        "loss_finite": all(math.isfinite(v) for v in losses),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "warmup_step_s": times[0],
        "graph_s": t_graph,
        "data_s": t_data,
    }


def check_fp16(size: Size, dev: torch.device, seed: int) -> dict:
    """fp16 against fp32 logits of the same Matcher on the same inputs (module docstring, check 2)."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w, n_p, n_g = size.channels, size.map_h, size.map_w, size.fp16_probes, size.fp16_gallery
    head = QAConv(c, h, w).eval()  # default eval head: fc weight 1/HW, identity BatchNorms
    m16, path16 = matcher_for(head, dev, torch.float16)
    m32, path32 = matcher_for(head, dev, torch.float32)
    sets = {
        "random": (F.normalize(torch.randn(n_p, c, h, w, generator=gen), dim=1),
                   F.normalize(torch.randn(n_g, c, h, w, generator=gen), dim=1)),
        "structured": structured_maps(n_p, n_g, size.fp16_ids, c, h, w, gen),
    }  # fmt: skip
    out = {
        "pairs": n_p * n_g,
        "maps": f"C={c} {h}x{w}",
        "fp16_path": path16,
        "fp32_path": path32,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    for name, (prob, gal) in sets.items():
        s16, t16 = _timed(dev, lambda p=prob, g=gal: m16.scores(p, g))
        s32, t32 = _timed(dev, lambda p=prob, g=gal: m32.scores(p, g))
        diff = float((s16 - s32).abs().max())
        equal, overlap = topk_agreement(s16, s32, size.k)
        out[name] = {
            "max_abs_diff": diff,
            "rel_to_range": diff / max(float(s32.max() - s32.min()), 1e-30),
            "top10_equal": equal,
            "top10_overlap": overlap,
            "fp16_s": t16,
            "fp32_s": t32,
        }
    return out


def check_exhaustive(size: Size, dev: torch.device, head: QAConv, prob, gal) -> tuple[dict, torch.Tensor]:
    """All-pairs Matcher.scores at Market size (module docstring, check 3); also returns the scores."""
    Matcher(head, dev).scores(prob[:8], gal[:256])  # warm-up: CUDA context, kernels
    _reset_peak(dev)
    scores, t = _timed(dev, lambda: Matcher(head, dev).scores(prob, gal))
    pairs = len(prob) * len(gal)
    return {
        "pairs": pairs,
        "time_s": t,
        "pairs_per_s": pairs / t,
        "peak_mem_mib": _peak_mib(dev),
        "dtype": str(Matcher(head, dev)._compute_dtype()).replace("torch.", ""),
    }, scores


def check_two_stage(
    size: Size, dev: torch.device, head: QAConv, prob, gal, exhaustive: dict | None, full: torch.Tensor | None
) -> list[dict]:
    """two_stage_scores for each M (module docstring, check 4)."""
    k = min(size.k, len(gal))
    ex_top = None if full is None else full.topk(k, dim=1).indices
    two_stage_scores(head, prob[:8], gal[:256], min(size.candidates[0], 255), device=dev)  # warm-up
    rows = []
    for m in size.candidates:
        _reset_peak(dev)
        (scores, _), t = _timed(dev, lambda m=m: two_stage_scores(head, prob, gal, m, device=dev))
        row = {
            "M": m,
            "time_s": t,
            "rescored_pairs_per_s": len(prob) * min(m, len(gal)) / t,
            "peak_mem_mib": _peak_mib(dev),
            "speedup": None,
            "recall_at_10": None,
        }
        if exhaustive is not None:
            row["speedup"] = exhaustive["time_s"] / t
            row["recall_at_10"] = topk_overlap(scores.topk(k, dim=1).indices, ex_top)[1]
        rows.append(row)
    return rows


# -- output --------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.3e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e6) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _print_values(title: str, values: dict) -> None:
    """A section: one ``name value`` line per scalar."""
    print(f"\n{title}", flush=True)
    for name, value in values.items():
        print(f"  {name:<22} {_fmt(value)}", flush=True)


def _print_table(title: str, rows: dict[str, dict]) -> None:
    """A section as a table: one column per row label (e.g. M=100), one line per figure."""
    labels = list(rows)
    names = list(dict.fromkeys(n for r in rows.values() for n in r))
    print((f"\n{title}\n" if title else "") + f"  {'':<22} " + " ".join(f"{lab:>12}" for lab in labels), flush=True)
    for name in names:
        print(f"  {name:<22} " + " ".join(f"{_fmt(rows[lab].get(name)):>12}" for lab in labels), flush=True)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    ap.add_argument("--small", action="store_true", help="every check at a tiny size (seconds on a CPU)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the JSON line here")
    ap.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 20; 2 with --small)")
    ap.add_argument("--workers", type=int, default=None, help="data workers (default: up to 8; 0 with --small)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        dev = pick_device(None if args.device == "auto" else args.device)
    except ValueError as exc:
        ap.error(str(exc))
    size = SMALL if args.small else FULL
    steps = size.steps if args.steps is None else args.steps
    workers = (0 if args.small else min(8, os.cpu_count() or 1)) if args.workers is None else args.workers
    if steps < 1 or workers < 0:
        ap.error("--steps must be >= 1 and --workers >= 0")

    start = time.perf_counter()
    mem_kind = "cuda max_memory_allocated" if dev.type == "cuda" else "process peak RSS (VmHWM)"
    result = {"size": size.name, **device_info(dev), "peak_mem_kind": mem_kind, "sizes": asdict(size)}
    print(f"gpu_check, {size.name} size; peak_mem_mib: {mem_kind}", flush=True)
    if dev.type == "cpu" and not args.small:
        print(
            "warning: full size on the CPU: check 2 forces fp16 matching (under 1 GFLOP/s on CPUs without fp16 "
            "units: hours) and check 3 takes about an hour on 2 cores; use --small, or --checks to pick checks",
            flush=True,
        )
    _print_values("device", {k: v for k, v in result.items() if k not in ("size", "sizes", "peak_mem_kind")})
    if "train" in args.checks:
        result["train"] = check_train(size, dev, steps, workers, args.seed)
        _print_values("1. training steps of the default recipe", result["train"])
    if "fp16" in args.checks:
        result["fp16"] = check_fp16(size, dev, args.seed)
        fp16 = result["fp16"]
        _print_values("2. fp16 against fp32 matching", {k: v for k, v in fp16.items() if not isinstance(v, dict)})
        _print_table("", {k: v for k, v in fp16.items() if isinstance(v, dict)})
    if "exhaustive" in args.checks or "two_stage" in args.checks:
        gen = torch.Generator().manual_seed(args.seed + 1)
        c, h, w = size.channels, size.map_h, size.map_w
        (prob, gal), t_feat = _timed(dev, lambda: structured_maps(size.probes, size.gallery, size.ids, c, h, w, gen))
        result["features"] = {
            "probes": size.probes,
            "gallery": size.gallery,
            "ids": size.ids,
            "maps": f"C={c} {h}x{w}",
            "build_s": t_feat,
        }
        _print_values("structured features for 3 and 4 (eval_scale.py)", result["features"])
        torch.manual_seed(args.seed)
        head = QAConv(c, h, w).eval()
        full = None
        if "exhaustive" in args.checks:
            result["exhaustive"], full = check_exhaustive(size, dev, head, prob, gal)
            _print_values("3. exhaustive matching", result["exhaustive"])
        if "two_stage" in args.checks:
            result["two_stage"] = check_two_stage(size, dev, head, prob, gal, result.get("exhaustive"), full)
            rows = {f"M={r['M']}": {k: v for k, v in r.items() if k != "M"} for r in result["two_stage"]}
            _print_table("4. two-stage protocol", rows)
    result["total_s"] = time.perf_counter() - start
    print(f"\ntotal {result['total_s']:.1f} s", flush=True)
    line = json.dumps(_json_safe(result), allow_nan=False)
    print(line, flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
