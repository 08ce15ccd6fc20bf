"""The ``qaconv`` command: thin wrappers that parse options, call the library and print."""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import QAConvError, writing


class FORMATTER(argparse.ArgumentDefaultsHelpFormatter):
    """States every default, except None ones, whose meaning the help text itself gives."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr, exit status 2; a mistyped command, choice or option is answered
    with the closest known spelling: ``qaconv search: error: unrecognized option --topp; did you mean --top?``."""

    _argv: list = []  # the arguments this parser was last given (a subcommand's parser: those after its name)
    _parsing: list = []  # the parsers now parsing, outermost first (the command's, then a subcommand's, ...)

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        Parser._parsing.append(self)
        try:
            return super().parse_known_args(args, namespace)
        finally:
            Parser._parsing.remove(self)

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the (sub)command parser that has a near miss for them, else the innermost one
            chain = _chosen_parsers(self, ns)
            culprit = next((p for p in chain if p._mistyped_option()), chain[-1])
            culprit.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def error(self, message: str):
        prog = self.prog
        for parser in [*Parser._parsing, self]:  # a typo in an option (this parser's or an enclosing one's)
            typo = parser._mistyped_option()  # explains most other errors too
            if typo:
                prog, message = parser.prog, typo
                break
        self.exit(2, f"{prog}: error: {message} (see --help)\n")

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            close = _closest(str(value), {str(c): str(c) for c in action.choices})
            if close:
                raise argparse.ArgumentError(action, f"invalid choice: '{value}'; did you mean '{close}'?")
        super()._check_value(action, value)

    def _mistyped_option(self) -> str | None:
        """'unrecognized option --topp; did you mean --top?' for the first option in this parser's arguments that
        it does not know but that is close to one it knows; None when there is none."""
        known = self._option_string_actions
        nested = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        for token in self._argv:
            if token == "--":
                break
            if not token.startswith("-") or token == "-" or _NUMBER.fullmatch(token):
                if nested:
                    break  # the command name: what follows belongs to its parser
                continue
            name = token.split("=", 1)[0]
            if (name in known or (name.startswith("--") and any(k.startswith(name) for k in known))
                    or (not name.startswith("--") and name[:2] in known)):
                continue  # known, a unique or ambiguous abbreviation (argparse's), or -j4
            close = _closest(name.lstrip("-"), {k.lstrip("-"): k for k in known})
            if close:
                return f"unrecognized option {name}; did you mean {close}?"
        return None


_NUMBER = re.compile(r"-\d+|-\d*\.?\d+(e[-+]?\d+)?", re.IGNORECASE)


def _closest(word: str, candidates: dict) -> str | None:
    """The value of the key in ``candidates`` most like ``word`` (difflib ratio >= 0.6, no tie), else None."""
    scored = sorted(((difflib.SequenceMatcher(None, word, k).ratio(), k) for k in candidates), reverse=True)
    if not scored or scored[0][0] < 0.6 or (len(scored) > 1 and scored[1][0] == scored[0][0]):
        return None
    return candidates[scored[0][1]]


def _chosen_parsers(parser, ns) -> list:
    """``parser`` and the (sub)command parsers ``ns`` went through, outermost first."""
    chain = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(ns, action.dest, None) in action.choices:
            chain += _chosen_parsers(action.choices[getattr(ns, action.dest)], ns)
    return chain


QUIET_HELP = "no progress bars or progress lines (errors and results are still printed); TQDM_DISABLE=1 also works"


def _add_quiet(parser) -> None:
    """``-q/--quiet`` after every (sub)command too, so that ``qaconv index ... --quiet`` works as well as
    ``qaconv --quiet index ...`` (an option a command already has under that name is left alone)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags = [f for f in ("-q", "--quiet") if f not in sub._option_string_actions]
                if "--quiet" in flags:
                    sub.add_argument(*flags, dest="quiet", action="store_true", default=argparse.SUPPRESS,
                                     help=QUIET_HELP)
                _add_quiet(sub)


def _choices_or_none(*choices):
    def parse(value: str):
        v = value.lower()
        if v not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice '{value}' (choose from {', '.join(choices)})")
        return None if v == "none" else v

    return parse


def _positive(kind, zero: bool = False):
    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got '{value}'") from None
        if not math.isfinite(v) or v < 0 or (v == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero else '>'} 0 and finite, got {value}")
        return v

    return parse


def _bool(value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


class _Explicit:
    """An argument group whose options are recorded only when given, so that a recipe fills in the rest;
    the help states the default recipe's (2.1) value."""

    def __init__(self, group):
        self.group = group

    def add_argument(self, *flags, default=None, help=None, **kw):
        from .recipes import RECIPE_KEYS

        key = max(flags, key=len).lstrip("-").replace("-", "_")
        shown = default if default not in (None, "") else (False if kw.get("action") == "store_true" else "none")
        help = f"{help} (" + ("2.1 recipe: " if key in RECIPE_KEYS else "default: ") + f"{shown})"
        return self.group.add_argument(*flags, default=argparse.SUPPRESS, help=help, **kw)


def _group(p, title: str, explicit: bool):
    g = p.add_argument_group(title)
    return _Explicit(g) if explicit else g


def _printable(text) -> str:
    """``text`` with every non-printable character (terminal escape sequences, newlines, tabs) shown as a
    Python escape, so a crafted file name can neither clear the screen nor forge output lines."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def _switch(g, flag: str, help: str) -> None:
    """An off-by-default switch: ``--flag`` alone turns it on; ``--flag false`` (e.g. over a recipe) off."""
    g.add_argument(flag, default=False, type=_bool, nargs="?", const=True, metavar="BOOL", help=help)


def _augment(value: str) -> str:
    v = value.lower()
    if v in ("full", "flip-occlusion", "none"):
        return v
    try:
        return "full" if _bool(v) else "none"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected full, flip-occlusion or none, got '{value}'") from None


def _add_model_args(p, d: dict, explicit: bool = False) -> None:
    g = _group(p, "model", explicit)
    g.add_argument(
        "-a",
        "--arch",
        default=d["arch"],
        choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
        help="torchvision ResNet backbone",
    )
    g.add_argument(
        "--final-layer",
        default=d["final_layer"],
        choices=["layer2", "layer3", "layer4"],
        help="cut the backbone after this stage",
    )
    g.add_argument(
        "--ibn", default=d["ibn"], type=_choices_or_none("a", "b", "none"), help="IBN-Net variant: a, b or none"
    )
    g.add_argument("--neck", default=d["neck"], type=_positive(int, zero=True), help="3x3 neck conv channels; 0 = none")
    g.add_argument(
        "--neck-bn", default=d["neck_bn"], type=_bool, help="v1.0-v2.0 neck: conv without bias + BatchNorm2d"
    )
    g.add_argument(
        "--input-norm",
        default=d["input_norm"],
        choices=["imagenet", "none"],
        help="normalisation applied inside the model to RGB in [0,1] ('none': [0,1] RGB, as the official code)",
    )
    g.add_argument(
        "--pretrained",
        default=d["pretrained"],
        type=_choices_or_none("imagenet", "none"),
        help="backbone init: torchvision ImageNet weights from the local torch cache (never downloaded), or none",
    )
    g.add_argument(
        "--backbone-weights",
        default=d["backbone_weights"],
        metavar="PATH",
        help="local backbone state dict (torchvision or IBN-Net key layout); overrides --pretrained",
    )
    g.add_argument("--height", default=d["height"], type=_positive(int), help="input height")
    g.add_argument("--width", default=d["width"], type=_positive(int), help="input width")
    g.add_argument(
        "--matcher",
        default=d["matcher"],
        choices=["qaconv", "pooled"],
        help="qaconv (explicit local matching) or pooled (global average pooling + cosine baseline)",
    )
    g.add_argument(
        "--qaconv-version",
        default=d["qaconv_version"],
        choices=["2.1", "1"],
        help="QAConv head: 2.1 (shared FC, symmetric) or 1 (Linear(2HW->1))",
    )


DATA_DIR_HELP = ("folder holding the datasets, synthetic ones included; none: benchmarks and named folders under "
                 "./data, synthetic domains generated into the cache folder $XDG_CACHE_HOME/qaconv or ~/.cache/qaconv")


def _add_run_args(p, d: dict, explicit: bool = False,
                  testsets_help: str = "comma-separated test sets evaluated after training") -> None:
    g = _group(p, "run", explicit)
    g.add_argument("--data-dir", default=d["data_dir"], help=DATA_DIR_HELP)
    g.add_argument("--testsets", default=d["testsets"], help=testsets_help)
    g.add_argument("-j", "--workers", default=d["workers"], type=int, help="data-loading worker processes")
    g.add_argument("--device", default=d["device"], help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    g.add_argument("--fea-batch", default=d["fea_batch"], type=_positive(int), help="feature-extraction batch")
    g.add_argument(
        "--match-memory",
        default=d["match_memory"],
        type=_positive(float),
        help="memory budget (MB) of one tile of all-pairs matching; bounds the matching's working memory",
    )


def _add_post_args(p, d: dict, explicit: bool = False) -> None:
    g = _group(p, "post-processing (the official protocol: re-ranking, then TLift on the re-ranked score)", explicit)
    _switch(g, "--rerank", "add the +RR row")
    _switch(g, "--tlift", "add the official +RR and +RR+TLift rows (TLift on re-ranked scores; needs time stamps)")
    _switch(g, "--tlift-direct", "also a row of TLift on sigma(logit) without re-ranking (not the official protocol)")
    g.add_argument(
        "--rerank-input",
        default=d["rerank_input"],
        choices=["sigmoid", "logit"],
        help="distances fed to re-ranking: 1 - sigma(logit/10) (tags v1.0-v2.1) or -logit (latest official commit); "
        "evaluate: the checkpoint's recipe unless given",
    )
    _switch(g, "--save-scores", "write the official NAME_score.mat (score, score_rerank, score_tlift, ...) and a .npz")
    g.add_argument("--k1", default=d["k1"], type=_positive(int), help="re-ranking k1")
    g.add_argument("--k2", default=d["k2"], type=_positive(int), help="re-ranking k2 (query expansion)")
    g.add_argument(
        "--lambda-value", default=d["lambda_value"], type=float, help="re-ranking weight of the original distance (0-1)"
    )
    g.add_argument(
        "--rerank-dense-max",
        default=d["rerank_dense_max"],
        type=int,
        help="re-rank densely up to this many query+gallery images, from kNN lists (bounded memory) above",
    )
    g.add_argument("--tau", default=d["tau"], type=_positive(float), help="TLift co-occurrence window (s)")
    g.add_argument("--sigma", default=d["sigma"], type=_positive(float), help="TLift Gaussian width (s)")
    g.add_argument(
        "--tlift-k", default=d["tlift_k"], type=_positive(int), help="TLift K: pivots per co-occurring group"
    )
    g.add_argument("--alpha", default=d["alpha"], type=_positive(float, zero=True), help="TLift regulariser")
    g.add_argument(
        "--two-stage",
        default=d["two_stage"],
        type=_positive(int, zero=True),
        metavar="M",
        help="if > 0, QAConv re-scores only each query's M best gallery images by pooled cosine (the rest "
        "ranked by cosine below them); with --rerank/--tlift the k-reciprocal lists likewise come from each "
        "image's M nearest of query+gallery, re-scored (no [Q+G]^2 matrix; M >= Q+G is exhaustive); 0 = exhaustive",
    )
    g.add_argument(
        "--report",
        default=d["report"],
        metavar="DIR",
        help="write a self-contained HTML report to DIR/index.html: metrics, CMC curves, ranked lists of the "
        "worst and of random queries, match pictures",
    )
    g.add_argument(
        "--report-queries",
        default=d["report_queries"],
        type=_positive(int),
        help="worst and random queries shown per test set in the report",
    )


POST_KEYS = (
    "rerank",
    "tlift",
    "tlift_direct",
    "rerank_input",
    "save_scores",
    "k1",
    "k2",
    "lambda_value",
    "rerank_dense_max",
    "tau",
    "sigma",
    "tlift_k",
    "alpha",
    "two_stage",
    "report",
    "report_queries",
)


class _Intermixed:
    """Parser mixin: positional ``KEY=VALUE`` overrides may stand anywhere among the options
    (argparse's intermixed parsing, also when the parser is a sub-command's)."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_mixing", False):
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


TRAIN_LAYERS = (
    "Configuration, lowest precedence first: the --recipe preset (default 2.1), the --config file, options "
    "given on the command line, KEY=VALUE overrides. A --config file is a run's config.yaml, a recipe preset "
    "(src/qaconv/recipes/*.yaml) or any subset of its keys; its recipe line (or the preset it is) picks the "
    "preset beneath it. Its out_dir is used unless -o or out_dir= is given (a folder that holds a run is "
    "refused unless --overwrite); resume and overwrite are command-line choices only, never keys. "
    "Keys are the options' long names with '_' or '-' (lr=0.01, max-epochs=5, testsets=synth_B,market, "
    "ibn=none, rerank=true); values are parsed as YAML scalars, then checked as the options are."
)


def _add_train_args(p, d: dict, explicit: bool = False) -> None:
    p.__class__ = type("TrainParser", (_Intermixed, type(p)), {})
    p.description = "Train a model and evaluate it on --testsets. " + TRAIN_LAYERS
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="configuration overrides, e.g. lr=0.01 max_epochs=5 (above --config and the options)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="configuration file: a run's config.yaml (repeats that run), a recipe preset or any subset of keys",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as YAML (what config.yaml would hold) and exit: nothing is trained "
        "or written, data sets are not looked up",
    )
    p.add_argument(
        "--recipe",
        default=argparse.SUPPRESS,
        choices=["1.0", "1.1", "1.2", "2.0", "2.1", "latest"],
        help="published recipe: sets every option as that official version's main.py does (see README); "
        "a --config file's recipe line picks one too; the file's values and options given explicitly override it "
        "(default: 2.1)",
    )
    g = _group(p, "training", explicit)
    g.add_argument(
        "-d",
        "--dataset",
        default=d["dataset"],
        help="training set (required): a benchmark (market, duke, cuhk03_np_detected, cuhk03_np_labeled, msmt17, "
        "randperson, clonedperson), synth_A/B/C, a CSV manifest or a Market-layout folder; comma-separated names "
        "are pooled",
    )
    g.add_argument("--combine-all", action="store_true", help="MSMT17 'all': train on train+val+query+gallery")
    g.add_argument(
        "-o", "--out-dir", default=d["out_dir"], help="output directory (config.yaml, metrics.jsonl, checkpoint.pt)"
    )
    g.add_argument(
        "--loss",
        default=d["loss"],
        choices=["triplet", "pairwise", "memory"],
        help="batch-hard triplet (QAConv-GS), pairwise BCE (v2.0) or class memory (v1)",
    )
    g.add_argument("--margin", default=d["margin"], type=_positive(float), help="triplet margin in logit units")
    g.add_argument("--mem-batch-size", default=d["mem_batch_size"], type=_positive(int), help="class-memory chunk")
    g.add_argument(
        "--mem-mask-invalid",
        default=d["mem_mask_invalid"],
        type=_bool,
        help="class memory: ignore classes never written (v1.1+)",
    )
    g.add_argument(
        "--mem-joint-bn",
        default=d["mem_joint_bn"],
        type=_bool,
        help="class memory: head BNs over all memory chunks at once (v1.0) instead of per chunk",
    )
    g.add_argument(
        "--sampler",
        default=d["sampler"],
        choices=["graph", "pk", "shuffle"],
        help="graph sampler, PxK random identities, or shuffled images (v1.x)",
    )
    g.add_argument(
        "--gs-pre-epochs",
        default=d["gs_pre_epochs"],
        type=_positive(int, zero=True),
        help="graph sampler: first epochs with random PxK batches (v2.0: 1)",
    )
    g.add_argument(
        "--gs-rerank",
        default=d["gs_rerank"],
        type=_bool,
        help="graph sampler: k-reciprocal re-ranked class graph (v2.0)",
    )
    _switch(g, "--gs-save", "graph sampler: save each epoch's class distances and neighbours (OUT_DIR/graph_sampler)")
    g.add_argument("-b", "--batch-size", default=d["batch_size"], type=_positive(int), help="images per batch")
    g.add_argument("--num-instance", default=d["num_instance"], type=_positive(int), help="images per class in a batch")
    g.add_argument(
        "--lr", default=d["lr"], type=_positive(float), help="learning rate of neck and matcher (backbone 0.1x)"
    )
    g.add_argument("--weight-decay", default=d["weight_decay"], type=float, help="SGD weight decay")
    g.add_argument(
        "--backbone-lr-mult",
        default=d["backbone_lr_mult"],
        type=_positive(float),
        help="backbone learning rate as a multiple of --lr",
    )
    g.add_argument("--clip", default=d["clip"], type=float, help="gradient-norm clip; 0 disables clipping")
    g.add_argument(
        "--amp", default=d["amp"], choices=["auto", "on", "off"], help="mixed precision (auto: on CUDA only)"
    )
    g.add_argument(
        "--step-factor",
        default=d["step_factor"],
        type=_positive(float),
        help="< 1: decay once loss < factor x epoch-2 loss; >= 1: decay after that epoch",
    )
    g.add_argument("--max-epochs", default=d["max_epochs"], type=_positive(int), help="upper bound on epochs")
    g.add_argument(
        "--freeze-backbone-bn",
        default=d["freeze_backbone_bn"],
        type=lambda v: v if v == "auto" else _bool(v),
        help="keep backbone BN statistics frozen: true, false, or auto (true with pretrained weights)",
    )
    g.add_argument(
        "--augment",
        default=d["augment"],
        type=_augment,
        help="full (v1.2-v2.x list), flip-occlusion (v1.0/v1.1) or none",
    )
    g.add_argument(
        "--augment-after-acc",
        default=d["augment_after_acc"],
        type=float,
        help="> 0: no augmentation until an epoch's accuracy exceeds this (v1.1/v1.2: 0.6)",
    )
    g.add_argument(
        "--pretrain-trials",
        default=d["pretrain_trials"],
        type=_positive(int, zero=True),
        help="pre-training trials of one epoch, the best kept (v1.1/v1.2: 10)",
    )
    g.add_argument(
        "--pretrain-steps", default=d["pretrain_steps"], type=_positive(int), help="steps per pre-training trial"
    )
    _switch(g, "--strict", "stop at the first unreadable training image instead of skipping it")
    g.add_argument("--seed", default=d["seed"], type=_positive(int, zero=True), help="random seed")
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt with its saved configuration"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in OUT_DIR (default: refuse)")


def build_parser() -> argparse.ArgumentParser:
    from .calibrate import BANDS_HELP, DIFFERENT_TAR, SAME_FAR
    from .engine.config import TrainConfig  # light: building the parser imports no torch (qaconv --help is fast)

    DEFAULTS = TrainConfig().to_dict()  # as qaconv.engine.runner.DEFAULTS

    parser = Parser(
        prog="qaconv",
        description="QAConv person re-identification: train, evaluate, generate data, demo.",
        formatter_class=FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP + " (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser(
        "demo",
        formatter_class=FORMATTER,
        help="train QAConv-GS and a pooled baseline on synthetic domain A, test on unseen domain B",
    )
    from .demo import add_demo_args

    add_demo_args(p)

    p = sub.add_parser("train", formatter_class=FORMATTER, help="train a model (QAConv-GS by default)")
    _add_train_args(p, DEFAULTS, explicit=True)
    _add_model_args(p, DEFAULTS, explicit=True)
    _add_run_args(p, DEFAULTS, explicit=True)
    _add_post_args(p, DEFAULTS, explicit=True)

    p = sub.add_parser("evaluate", formatter_class=FORMATTER, help="evaluate a trained checkpoint on test sets")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its folder) written by 'qaconv train'")
    p.add_argument(
        "-o", "--out-dir", default=None, help="where --save-scores writes (default: the checkpoint's folder)"
    )
    _add_run_args(p, {**DEFAULTS, "testsets": None}, testsets_help="test sets, comma-separated (required): a "
                  "benchmark, a CSV manifest, a Market-layout folder, or synth_A/B/C (generated on first use)")
    _add_post_args(p, DEFAULTS)
    _switch(p, "--strict", "stop at the first undecodable query or gallery image instead of skipping it")
    p.set_defaults(rerank_input=None)  # the checkpoint's recipe decides

    p = sub.add_parser("match", formatter_class=FORMATTER, help="draw which parts of two images matched")
    p.add_argument("image_a", help="probe image")
    p.add_argument("image_b", help="gallery image")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its folder) written by 'qaconv train'")
    p.add_argument("-o", "--out", default="match.png", help="output PNG")
    p.add_argument("--top", default=20, type=_positive(int), help="lines for the strongest correspondences")
    p.add_argument(
        "--threshold",
        default=None,
        type=float,
        help="draw every correspondence above this value (the cosine; the contribution under --semantics official, "
        "where the official demo.m's 0.5 is 0.0025)",
    )
    p.add_argument(
        "--semantics",
        default="default",
        choices=["default", "official"],
        help="default: probe = kernel side, lines ranked by cosine x fc weight, title shows the logit; official: as "
        "the official matching/qaconv_match.py (gallery = kernel side, fc weight x bn(cosine)), sigmoid(logit/10)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA if available)")
    p.add_argument(
        "--calibration",
        default=None,
        metavar="JSON",
        help="calibration from 'qaconv calibrate' for the verdict (default: calibration.json beside the checkpoint, "
        "if there; without one the score is reported as uncalibrated)",
    )
    p.epilog = "The verdict (same person / different / uncertain) and P(same) need a calibration. " + BANDS_HELP

    p = sub.add_parser(
        "calibrate",
        formatter_class=FORMATTER,
        help="score distributions, ROC, TAR@FAR and verdict bands on a labelled set; writes calibration.json",
        description="Measure what QAConv logits mean on a labelled test set (identities and cameras known): "
        "the logits of same- and different-identity cross-camera query x gallery pairs, the ROC, TAR at "
        "FAR 1e-2/1e-3/1e-4 with their thresholds, and a Platt-scaled probability; written to calibration.json "
        "beside the checkpoint (used by 'qaconv match') with a PNG of the histograms and the ROC. " + BANDS_HELP,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its folder) written by 'qaconv train'")
    p.add_argument(
        "--testsets", required=True, help="labelled test set(s), comma-separated (pairs pooled): synth_A, a "
        "Market-layout folder or a CSV manifest"
    )
    p.add_argument("-o", "--out", default=None, help="calibration file (default: calibration.json beside the "
                   "checkpoint, where 'qaconv match' finds it)")
    p.add_argument("--plot", default=None, help="PNG of histograms and ROC (default: calibration.png beside OUT)")
    p.add_argument(
        "--same-far", default=SAME_FAR, type=_positive(float), help="FAR whose threshold starts the 'same person' band"
    )
    p.add_argument(
        "--different-tar", default=DIFFERENT_TAR, type=_positive(float),
        help="fraction of true matches kept above the 'different' band",
    )
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("-j", "--workers", default=0, type=_positive(int, zero=True), help="data-loading worker processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.add_argument("--fea-batch", default=DEFAULTS["fea_batch"], type=_positive(int), help="feature-extraction batch")
    p.add_argument(
        "--match-memory", default=DEFAULTS["match_memory"], type=_positive(float),
        help="memory budget (MB) of one tile of all-pairs matching",
    )
    _switch(p, "--strict", "stop at the first undecodable query or gallery image instead of skipping it")

    p = sub.add_parser(
        "index", formatter_class=FORMATTER, help="extract the feature maps of a gallery folder into a gallery store",
        description="Build or grow a gallery store: a folder holding a LanceDB table (float16 feature maps, pooled "
        "vectors, path, pid, camera, time) and a JSON file naming the model. --append adds only new images "
        "(O(new images), committed in chunks of 4096: a kill keeps what was committed). An old single-file .npz "
        "index is converted with --convert OLD.npz -o STORE. --export-pooled DIR writes the pooled vectors and "
        "the metadata of OUT for a vector database of one's own (alone: of the existing store OUT).",
    )
    p.add_argument("gallery_dir", nargs="?", default=None,
                   help="folder of gallery images (.jpg .jpeg .png .bmp .webp .tif .tiff; searched recursively; "
                   "other files are counted and named, not indexed)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint.pt (or its folder) written by 'qaconv train' (required unless --convert)")
    p.add_argument("-o", "--out", default="gallery.store", help="gallery store folder to create or grow")
    p.add_argument("--manifest", default=None, help="CSV 'path,pid,camid[,time][,track]' overriding Market-style "
                   "names and --cam-from-folder; 'track' labels tracklets (one camera, one label)")
    p.add_argument("--cam-from-folder", action="store_true",
                   help="camera label = the folder an image lies in (camA/img_001.jpg -> camA)")
    p.add_argument("--export-pooled", default=None, metavar="DIR",
                   help="write DIR/pooled.npy (float32 [N, C], unit norm) and DIR/metadata.csv (row id, path, pid, "
                   "camera, time, track; empty = unknown), row i describing vector i")
    p.add_argument("--export-format", default="csv", choices=["csv", "parquet"],
                   help="metadata file of --export-pooled: metadata.csv or metadata.parquet")
    p.add_argument("--append", action="store_true", help="add only images not yet in OUT (same model required)")
    p.add_argument("--overwrite", action="store_true", help="rebuild OUT when it already exists")
    p.add_argument("--convert", default=None, metavar="OLD_INDEX",
                   help="convert an old single-file .npz index into the store OUT (no model needed)")
    p.add_argument("-b", "--batch-size", default=64, type=_positive(int), help="images per forward pass")
    p.add_argument("-j", "--workers", default=2, type=_positive(int), help="image-decoding threads")
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA if available)")

    p = sub.add_parser(
        "search", formatter_class=FORMATTER, help="rank the images of a gallery store for queries",
        description="Rank a gallery store for query images, folders of them, tracklets (--tracklet, or a query "
        "manifest's track column) or a query manifest. Same-camera entries are left out for every query whose "
        "camera is known (Market-style names, --query-cam, --cam-from-folder or the manifest), as re-ID "
        "evaluation does; --include-same-camera keeps them.",
    )
    p.add_argument("queries", nargs="*", metavar="QUERY", help="query images or folders of them (or --query-manifest)")
    p.add_argument("--query-manifest", default=None, metavar="CSV",
                   help="queries from a CSV 'path,camid[,time][,pid][,track]' instead of QUERY arguments; rows with "
                   "one camid and track form one tracklet query")
    p.add_argument("--cam-from-folder", action="store_true",
                   help="a query's camera is the folder it lies in (camA/img.jpg -> camA; with --tracklet the folder "
                   "holding the tracklet folder)")
    p.add_argument("--tracklet", action="store_true",
                   help="each QUERY is one query: a folder is a tracklet of all its crops (one person, one camera)")
    p.add_argument("--aggregate", default="mean", choices=["mean", "max"],
                   help="score of a tracklet pair: mean or max of the QAConv logits of its crop pairs")
    p.add_argument("--group-tracks", action="store_true",
                   help="list gallery tracklets (the store's track labels), not crops")
    p.add_argument("--calibration", default=None, metavar="JSON",
                   help="calibration from 'qaconv calibrate': a verdict and P(same) per result of a crop query ranked "
                   "by QAConv logits (default: calibration.json beside the checkpoint, if there; without one the "
                   "scores are reported as uncalibrated)")
    p.add_argument("--index", required=True, help="gallery store written by 'qaconv index'")
    p.add_argument("--checkpoint", required=True, help="the checkpoint the store was built with")
    p.add_argument("--top", default=10, type=_positive(int), help="results per query")
    p.add_argument(
        "--candidates", default=100, type=_positive(int), help="pooled-cosine shortlist re-scored by QAConv (M)"
    )
    p.add_argument("--exhaustive", action="store_true", help="score every gallery image with QAConv")
    p.add_argument("--cameras", default=None, help="only gallery images of these camera labels, comma-separated "
                   "(default: all)")
    p.add_argument("--time-window", default=None, metavar="START,END", help="only gallery images with a time stamp "
                   "in [START, END] seconds; either side may be empty (default: all, with or without time)")
    p.add_argument("--exclude-same-camera", dest="exclude_same_camera", action="store_const", const=True,
                   default=None, help="leave out the gallery images of each query's own camera; an error when a "
                   "query's camera is unknown (default: left out for every query whose camera is known)")
    p.add_argument("--include-same-camera", dest="exclude_same_camera", action="store_const", const=False,
                   help="keep the gallery images of the query's own camera")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--html", default=None, help="also write an HTML page: thumbnails linked to the full-size images "
                   "and a match picture of every result, in a folder next to it")
    p.add_argument("--tlift", action="store_true", help="re-rank with temporal lifting (index needs times; "
                   "same-camera entries are dropped after lifting); single crops only")
    p.add_argument(
        "--query-cam", default=None, help="camera label of the queries, one or comma-separated per query "
        "(default: from Market-style names); must be a camera of the store"
    )
    p.add_argument(
        "--query-time", default=None, help="time stamp (s) of the queries, one or comma-separated per query "
        "(default: from Market-style names)"
    )
    p.add_argument("--tau", default=DEFAULTS["tau"], type=_positive(float), help="TLift co-occurrence window (s)")
    p.add_argument("--sigma", default=DEFAULTS["sigma"], type=_positive(float), help="TLift Gaussian width (s)")
    p.add_argument("--tlift-k", default=DEFAULTS["tlift_k"], type=_positive(int), help="TLift K")
    p.add_argument("--alpha", default=DEFAULTS["alpha"], type=_positive(float, zero=True), help="TLift regulariser")
    p.add_argument("-b", "--batch-size", default=64, type=_positive(int), help="query images per forward pass")
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA if available)")

    p = sub.add_parser(
        "convert", formatter_class=FORMATTER, help="official QAConv checkpoint.pth.tar -> this package's checkpoint"
    )
    p.add_argument("official", help="checkpoint.pth.tar written by the official QAConv code")
    p.add_argument("-o", "--out-dir", required=True, help="folder for checkpoint.pt and config.yaml")
    p.add_argument(
        "-a",
        "--arch",
        default="resnet50",
        choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
        help="the official run's --arch",
    )
    p.add_argument("--ibn", default="b", type=_choices_or_none("a", "b", "none"), help="the official run's --ibn")
    p.add_argument(
        "--final-layer", default="layer3", choices=["layer2", "layer3", "layer4"], help="the official --final_layer"
    )
    p.add_argument("--neck", default=128, type=int, help="the official run's --neck (v1.1-v2.0 READMEs used 64)")
    p.add_argument("--height", default=384, type=_positive(int), help="the official run's --height")
    p.add_argument("--width", default=128, type=_positive(int), help="the official run's --width")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR/checkpoint.pt")

    p = sub.add_parser("export", formatter_class=FORMATTER, help="export the feature extractor to ONNX")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its folder) from 'qaconv train' or 'convert'")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--opset", default=17, type=_positive(int), help="ONNX opset version")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")

    p = sub.add_parser("serve", formatter_class=FORMATTER, help="serve a gallery store over HTTP (search, add)")
    p.add_argument("--gallery", required=True, help="gallery store folder (from 'qaconv index')")
    p.add_argument("--checkpoint", default=None, help="the store's model (default: the checkpoint it records)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", default=8000, type=_positive(int), help="TCP port")
    p.add_argument("--image-root", default=None,
                   help="the only folder images may be read from by path (default: none, by-path requests refused)")
    p.add_argument("--max-upload-mb", default=10.0, type=_positive(float), help="largest image accepted, MiB")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA if available)")

    p = sub.add_parser("data", formatter_class=FORMATTER, help="inspect datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    q = data_sub.add_parser(
        "info", formatter_class=FORMATTER, help="per-split statistics, protocol warnings, bad files"
    )
    q.add_argument("name", help="dataset name, CSV manifest or Market-layout folder")
    q.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    q.add_argument("--combine-all", action="store_true", help="MSMT17 'all' setting")
    q.add_argument("--no-scan", action="store_true", help="skip checking that every image file can be read")
    q.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("synth", formatter_class=FORMATTER, help="write a synthetic domain in Market-1501 layout")
    p.add_argument("--domain", default="A", help="domain name (A, B, ...)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", default=0, type=int, help="random seed")
    p.add_argument(
        "--train-ids", default=None, type=_positive(int), help="training identities (default: domain preset)"
    )
    p.add_argument("--test-ids", default=None, type=_positive(int), help="test identities (default: domain preset)")
    p.add_argument("--height", default=128, type=_positive(int), help="image height")
    p.add_argument("--width", default=64, type=_positive(int), help="image width")
    _add_quiet(parser)
    return parser


def _cmd_train(args) -> None:
    from .engine.config import FIELD_NAMES
    from .engine.config_file import config_yaml, layered_config, parse_overrides, read_config_file

    options = {k: v for k, v in vars(args).items() if k in FIELD_NAMES and k != "recipe"}
    overrides, _ = parse_overrides(args.overrides)
    if args.resume and (args.config or args.print_config):
        flag = "--config" if args.config else "--print-config"
        raise QAConvError(f"{flag} does not combine with --resume: a resumed run keeps its saved OUT_DIR/config.yaml "
                          "(run-time options and KEY=VALUE overrides still apply)")
    file, where = read_config_file(args.config) if args.config else ({}, {})
    cfg = layered_config(getattr(args, "recipe", None), file, options, overrides, file_name=str(args.config))
    if args.print_config:
        print(config_yaml(cfg), end="")
        return
    from .engine.runner import RUN_FILES, train

    if "out_dir" in where and "out_dir" not in options and "out_dir" not in overrides and not args.overwrite:
        held = [name for name in RUN_FILES if (Path(cfg.out_dir) / name).exists()]
        if held:
            raise QAConvError(f"{cfg.out_dir} (out_dir at {where['out_dir']}) already holds a run ({', '.join(held)}):"
                              f" pass -o NEW_DIR to repeat it elsewhere, --resume to continue it, or --overwrite")
    if cfg.report and cfg.testsets:
        from .report import check_report_dir

        check_report_dir(cfg.report)  # fail before training
    train(cfg, resume=args.resume, overwrite=args.overwrite, given=set(options) | set(overrides))


def _cmd_evaluate(args) -> None:
    from .engine.config import from_dict
    from .engine.runner import evaluate, load_trained

    if not [t for t in (args.testsets or "").split(",") if t.strip()]:
        from .data.registry import HOW_TO_NAME

        raise QAConvError(f"no test sets given: pass --testsets NAME[,NAME...], where NAME is {HOW_TO_NAME}")
    model, matcher, cfg = load_trained(args.checkpoint, device=args.device)
    cfg.update(
        data_dir=args.data_dir,
        workers=args.workers,
        device=args.device,
        fea_batch=args.fea_batch,
        match_memory=args.match_memory,
        strict=args.strict,
        **{k: getattr(args, k) for k in POST_KEYS if getattr(args, k) is not None},
    )
    cfg = from_dict(cfg, strict=False).validate().to_dict()
    ckpt = Path(args.checkpoint)
    out_dir = args.out_dir or (ckpt if ckpt.is_dir() else ckpt.parent)
    evaluate(model, matcher, cfg, args.testsets, out_dir=out_dir if args.save_scores else None)


def _cmd_match(args) -> None:
    from .data.filetypes import check_image_file
    from .extractor import FeatureExtractor
    from .viz.match import match_images

    for image in (args.image_a, args.image_b):
        check_image_file(image)  # before the model loads: "does not exist" or "is not an image file"
    extractor = FeatureExtractor(args.checkpoint, device=args.device)
    score, path = match_images(
        extractor, args.image_a, args.image_b, args.out, top=args.top, threshold=args.threshold,
        semantics=args.semantics,
    )  # fmt: skip
    name = "logit" if args.semantics == "default" else "sigmoid(logit/10)"
    print(f"QAConv {name} {score:.3f}; wrote {path}")
    _print_verdict(args, extractor, score)


def _print_verdict(args, extractor, score: float) -> None:
    """The verdict line of ``qaconv match`` (see qaconv.calibrate.verdict)."""
    from .calibrate import verdict

    # official semantics report sigmoid(logit / 10) of the gallery-as-kernel logit: recover that logit
    logit = score if args.semantics == "default" else 10 * math.log(max(score, 1e-300) / max(1 - score, 1e-300))
    print(f"verdict: {verdict(logit, _calibration(args, extractor, 'match'))['message']}")


def _calibration(args, extractor, command: str):
    """``--calibration`` (or calibration.json beside the checkpoint) for ``extractor``'s model, or None; one made
    for another model is an error when asked for explicitly, else refused in one line on stderr."""
    from .calibrate import find_calibration
    from .gallery import model_identity

    try:
        return find_calibration(args.checkpoint, model_identity(extractor), args.calibration)
    except QAConvError as exc:
        if args.calibration:  # asked for explicitly: an error
            raise
        print(f"qaconv {command}: calibration refused: {_printable(exc)}", file=sys.stderr)
        return None


def _cmd_calibrate(args) -> None:
    from .calibrate import calibrate_checkpoint, calibration_path, format_table, plot_calibration, save_calibration

    if not 0 < args.same_far < 1:
        raise QAConvError(f"--same-far must be a false-accept rate in (0, 1), got {args.same_far}")
    if not 0 < args.different_tar <= 1:
        raise QAConvError(f"--different-tar must be a fraction in (0, 1], got {args.different_tar}")
    out = Path(args.out) if args.out else calibration_path(args.checkpoint)
    if out.is_dir():
        raise QAConvError(f"{out} is a folder: -o names the calibration file to write (e.g. {out / 'calib.json'})")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    cal, _ = calibrate_checkpoint(
        args.checkpoint, args.testsets, data_dir=args.data_dir, device=args.device, workers=args.workers,
        fea_batch=args.fea_batch, match_memory=args.match_memory, strict=args.strict, same_far=args.same_far,
        different_tar=args.different_tar,
    )  # fmt: skip
    print(f"calibration of {_printable(args.checkpoint)} (model {cal['model']['hash'][:12]}) on "
          f"{_printable(', '.join(cal['testsets']))}:")
    print(format_table(cal))
    for name, row in cal.get("per_testset", {}).items():
        tars = ", ".join(f"TAR@{r['far']:g} " + ("-" if r["tar"] is None else f"{100 * r['tar']:.1f}%")
                         for r in row["tar_at_far"])
        print(f"  {_printable(name)}: {row['pairs']['positive']:,}+ / {row['pairs']['negative']:,}- pairs, "
              f"AUC {row['auc']:.4f}, {tars}")
    save_calibration(cal, out)
    plot_calibration(cal, plot, title=f"QAConv logits on {', '.join(cal['testsets'])}")
    print(f"wrote {out} and {plot}")


def _index_target(out: Path, args) -> bool:
    """Check -o before any work; True when OUT is an existing store to append to."""
    from .gallery import is_store
    from .gallery.store import Store

    if out.is_dir() and not is_store(out):
        raise QAConvError(f"{out} is a folder but not a gallery store: -o names the store to create "
                          f"(e.g. {out / 'gallery.store'})")
    if not out.parent.is_dir():
        raise QAConvError(f"the folder of {out} does not exist: create {out.parent} first")
    if not (out.exists() or out.is_symlink()):
        return False
    if args.append and not args.convert:
        if out.is_file():
            Store.open(out)  # an old .npz index or another file: refused, naming the command that converts it
        return True
    if not args.overwrite:
        raise QAConvError(f"{out} exists: pass --append to add new images or --overwrite to rebuild it")
    return False


def _replace(out: Path, build) -> None:
    """Run ``build(target)``; the new store replaces ``out`` only when it completes (a failed build is removed)."""
    import os
    import shutil
    import uuid

    target = out if not (out.exists() or out.is_symlink()) else out.parent / f".{out.name}.new-{uuid.uuid4().hex[:8]}"
    try:
        build(target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    if target != out:
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        with writing(out):
            os.rename(out, old)
            os.rename(target, out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _export_pooled(out: Path, args) -> None:
    from .gallery import Gallery

    if args.export_pooled:
        done = Gallery.open(out).export(args.export_pooled, args.export_format)
        print(f"exported {done['entries']} pooled vectors to {_printable(done['pooled'])} and their metadata to "
              f"{_printable(done['metadata'])}")


def _cmd_index(args) -> None:
    import numpy as np

    from .gallery import Gallery

    out = Path(args.out)
    if args.convert:
        if args.gallery_dir or args.append or args.manifest or args.cam_from_folder:
            raise QAConvError("--convert OLD_INDEX takes no GALLERY_DIR, --append, --manifest or --cam-from-folder")
        _index_target(out, args)
        _replace(out, lambda target: Gallery.convert(args.convert, target))
        print(f"converted {_printable(args.convert)} into {_printable(out)}: {len(Gallery.open(out))} images")
        _export_pooled(out, args)
        return
    if args.gallery_dir is None:
        if args.export_pooled and not (args.append or args.overwrite or args.manifest or args.cam_from_folder):
            _export_pooled(out, args)  # of the existing store
            return
        raise QAConvError("index needs GALLERY_DIR (a folder of images), or --convert OLD_INDEX")
    if not Path(args.gallery_dir).is_dir():
        what = "is not a folder" if Path(args.gallery_dir).exists() else "does not exist"
        raise QAConvError(f"gallery folder {args.gallery_dir} {what}")
    append = _index_target(out, args)
    if args.checkpoint is None:
        raise QAConvError("index needs --checkpoint (the model that extracts the feature maps)")
    kw = dict(manifest=args.manifest, workers=args.workers, cam_from_folder=args.cam_from_folder)
    model = dict(device=args.device, batch_size=args.batch_size)
    reports = []
    if append:
        gallery = Gallery.open(out, args.checkpoint, **model)
        gallery.extractor  # noqa: B018 - loads the model: another one than the store's is refused here
        before = len(gallery)
        reports.append(gallery.add_folder(args.gallery_dir, **kw))
    else:
        def build(target):
            g = Gallery.create(target, args.checkpoint, **model)
            reports.append(g.add_folder(args.gallery_dir, **kw))
            if not reports[0]["added"]:
                bad = reports[0]["unreadable"]
                raise QAConvError(f"no readable images in {args.gallery_dir}: all {len(bad)} failed to decode, e.g. "
                                  f"{bad[0][0] if bad else '-'}")

        before = 0
        _replace(out, build)
        gallery = Gallery.open(out, args.checkpoint, **model)
    report = reports[0]
    bad = report["unreadable"]
    print(f"added {report['added']} images, skipped {report['skipped']} already in the store, "
          f"{len(bad)} unreadable skipped" + "".join(f"\n  {_printable(p)}: {_printable(why)}" for p, why in bad[:5]))
    if report["manifest_unmatched"]:
        print(f"{report['manifest_unmatched']} manifest rows name no image in {args.gallery_dir} (ignored)")
    if report.get("not_images"):
        from .data.filetypes import describe_skipped

        print(_printable(describe_skipped(report["not_images"], f"in {args.gallery_dir}")))
    if append and len(gallery) == before:
        print(f"{out} unchanged: {len(gallery)} images")
    else:
        c, h, w = gallery.feature_shape
        timed = int(np.isfinite(gallery.times).sum())
        print(f"wrote {out}: {len(gallery)} images, feature maps {c}x{h}x{w} float16 "
              f"({len(gallery) * c * h * w * 2 / 2**20:.1f} MB), {timed} with time stamps")
    _export_pooled(out, args)


def _time_window(text: str | None):
    if text is None:
        return None
    parts = [v.strip() for v in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (float(v) if v else None for v in parts)
    except ValueError:
        raise QAConvError(f"--time-window must be START,END in seconds (either may be empty), got '{text}'") from None
    if any(v is not None and not math.isfinite(v) for v in (start, end)) or (None not in (start, end) and start > end):
        raise QAConvError(f"--time-window must be START,END with finite START <= END, got '{text}'")
    return start, end


def _cmd_search(args) -> None:
    import json

    from .gallery import Gallery, check_query_maps
    from .gallery.queries import collect_queries, read_query_manifest
    from .gallery.results import format_results, search_queries

    window = _time_window(args.time_window)
    cameras = [c.strip() for c in args.cameras.split(",") if c.strip()] if args.cameras is not None else None
    gallery = Gallery.open(args.index, args.checkpoint, device=args.device, batch_size=args.batch_size)
    if args.query_manifest:
        if args.queries or args.tracklet or args.cam_from_folder:
            raise QAConvError("--query-manifest takes no QUERY arguments, --tracklet or --cam-from-folder (the "
                              "manifest gives the images, tracks and cameras)")
        qs = read_query_manifest(args.query_manifest)
    elif not args.queries:
        raise QAConvError("search needs QUERY images or folders, or --query-manifest CSV")
    else:
        skipped: list[str] = []
        qs = collect_queries(args.queries, tracklet=args.tracklet, cam_from_folder=args.cam_from_folder,
                             skipped=skipped)
        if skipped:
            from .data.filetypes import describe_skipped

            print(_printable(describe_skipped(skipped, "in the query folders")), file=sys.stderr)
    extractor = gallery.extractor  # another model than the store's is refused here
    maps = extractor([str(q) for q in qs.paths])
    check_query_maps(maps, [_printable(q) for q in qs.paths])
    lift = dict(tau=args.tau, sigma=args.sigma, tlift_k=args.tlift_k, alpha=args.alpha) if args.tlift else None
    results = search_queries(
        gallery, qs, maps, top=args.top, candidates=args.candidates, exhaustive=True if args.exhaustive else None,
        cameras=cameras, time_window=window, exclude_same_camera=args.exclude_same_camera,
        query_cam=args.query_cam, query_time=args.query_time, tlift=lift, aggregate=args.aggregate,
        group_tracks=args.group_tracks, calibration=_calibration(args, extractor, "search"),
    )  # fmt: skip
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_results(results, _printable))
    if args.html:
        from .viz.search_html import write_search_html

        root = gallery.root or str(Path(args.index).resolve().parent)
        path = write_search_html(args.html, results, root, title=f"qaconv search: {Path(args.index).name}",
                                 extractor=extractor)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)


def _cmd_convert(args) -> None:
    from .convert import convert_official

    kw = {k: getattr(args, k) for k in ("arch", "ibn", "final_layer", "neck", "height", "width", "overwrite")}
    path = convert_official(args.official, args.out_dir, **kw)
    print(f"wrote {path}; evaluate with: qaconv evaluate --checkpoint {args.out_dir} --testsets NAME")


def _cmd_serve(args) -> None:
    from .gallery.service import serve

    serve(args.gallery, args.checkpoint, host=args.host, port=args.port, image_root=args.image_root,
          max_upload_bytes=int(args.max_upload_mb * 2**20), device=args.device)


def _cmd_export(args) -> None:
    from .export import export_onnx

    info = export_onnx(args.checkpoint, args.onnx, opset=args.opset, check=not args.no_check)
    shape_in, shape_out = (", ".join(map(str, info[k])) for k in ("input_shape", "output_shape"))
    print(f"wrote {info['path']} (opset {info['opset']}): images [{shape_in}] RGB in [0, 1] -> maps [{shape_out}]")
    if info["max_abs_diff"] is not None:
        print(f"onnxruntime vs PyTorch: max |difference| {info['max_abs_diff']:.2e}")
    elif not args.no_check:
        print("onnxruntime is not installed: parity not checked (pip install 'qaconv[onnx]')")


def _cmd_data(args) -> None:
    import json

    from .data.images import scan_images
    from .data.registry import load_dataset
    from .data.validate import format_info, protocol_report

    data = load_dataset(args.name, args.data_dir, combine_all=args.combine_all, require=())  # any usable splits
    report = protocol_report(data)
    if not args.no_scan:
        bad = scan_images(data.train + data.query + data.gallery, progress=not args.json)
        report["unreadable_images"] = len(bad)
        report["unreadable_examples"] = bad[:5]
    if args.json:
        print(json.dumps(report, indent=2))
        return
    if getattr(data, "found", ""):
        print(data.found)
    print(format_info(data, report))
    if not args.no_scan:
        examples = "".join(f"\n  {p}" for p in report["unreadable_examples"])
        print(f"unreadable images: {report['unreadable_images']}{examples}")


def _cmd_synth(args) -> None:
    from .data.synth import generate_domain

    kw = {k: v for k, v in (("num_train_ids", args.train_ids), ("num_test_ids", args.test_ids)) if v is not None}
    with writing(args.out):
        s = generate_domain(args.domain, args.out, seed=args.seed, height=args.height, width=args.width, **kw)
    print(f"synthetic domain {s['domain']}: {s['description']}")
    for split, c in s["splits"].items():
        print(f"  {split:8s} {c['identities']:5d} ids {c['images']:6d} images {c['cameras']:3d} cameras")
    print(f"wrote {s['images']} images to {s['out_dir']} in {s['elapsed_s']:.1f} s ({s['images_per_s']:.0f} images/s)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {
        "train": _cmd_train,
        "evaluate": _cmd_evaluate,
        "synth": _cmd_synth,
        "data": _cmd_data,
        "match": _cmd_match,
        "calibrate": _cmd_calibrate,
        "index": _cmd_index,
        "search": _cmd_search,
        "convert": _cmd_convert,
        "export": _cmd_export,
        "serve": _cmd_serve,
    }
    from .progress import set_quiet

    quiet = set_quiet(args.quiet)
    try:
        if args.command == "demo":
            from .demo import run_demo_from_args

            run_demo_from_args(args)
        else:
            commands[args.command](args)
    except (QAConvError, ValueError, FileNotFoundError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        message = _printable(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        print(f"qaconv {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"qaconv {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        set_quiet(quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
