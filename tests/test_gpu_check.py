"""benchmarks/gpu_check.py at its small size on the CPU: every figure present and sane; top-k helpers against
brute-force set loops."""

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

FIGURES = {
    "train": ["images_per_s", "peak_mem_mib", "loss_finite", "first_loss", "last_loss", "timed_steps", "graph_s"],
    "fp16": ["pairs", "fp16_path", "random", "structured"],
    "exhaustive": ["pairs", "time_s", "pairs_per_s", "peak_mem_mib"],
}
FP16_FIGURES = ["max_abs_diff", "rel_to_range", "top10_equal", "top10_overlap", "fp16_s", "fp32_s"]
TWO_STAGE_FIGURES = ["M", "time_s", "rescored_pairs_per_s", "peak_mem_mib", "speedup", "recall_at_10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_check") / "out.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gpu_check.main(["--device", "cpu", "--small", "--json", str(path)])
    return json.loads(path.read_text()), out.getvalue()


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_json_has_every_figure_and_is_the_last_line(run):
    result, stdout = run
    assert json.loads(stdout.strip().splitlines()[-1]) == result
    assert result["device"] == "cpu" and result["size"] == "small"
    for section, names in FIGURES.items():
        assert all(result[section].get(n) is not None for n in names), section
    for name in ("random", "structured"):
        assert all(result["fp16"][name].get(n) is not None for n in FP16_FIGURES)
    assert [row["M"] for row in result["two_stage"]] == list(gpu_check.SMALL.candidates)
    assert all(row.get(n) is not None for row in result["two_stage"] for n in TWO_STAGE_FIGURES)
    numbers = list(_numbers({k: v for k, v in result.items() if k != "sizes"}))
    assert len(numbers) > 30 and all(math.isfinite(x) for x in numbers)
    for title in ("1. training", "2. fp16", "3. exhaustive", "4. two-stage"):
        assert title in stdout


def test_figures_are_sane(run):
    result, _ = run
    small = gpu_check.SMALL
    train = result["train"]
    assert train["loss_finite"] is True and train["amp"] is False  # the recipe's amp: auto is off on CPU
    assert train["timed_steps"] == small.steps and train["images_per_s"] > 0
    assert train["batch"] == "8 = 4 ids x 2"  # the 2.1 recipe's num_instance = 2
    assert result["fp16"]["pairs"] == small.fp16_probes * small.fp16_gallery
    assert result["fp16"]["fp16_path"] == "forced" and result["fp16"]["fp32_path"] == "package"
    for name in ("random", "structured"):
        row = result["fp16"][name]
        assert 0 < row["max_abs_diff"] < 1e-2  # fp16 really ran (nonzero) and stays close to fp32
        assert 0 <= row["top10_equal"] <= row["top10_overlap"] <= 1
    ex = result["exhaustive"]
    assert ex["pairs"] == small.probes * small.gallery
    assert ex["pairs_per_s"] == pytest.approx(ex["pairs"] / ex["time_s"])
    recalls = [row["recall_at_10"] for row in result["two_stage"]]
    assert all(0 <= r <= 1 for r in recalls)
    assert recalls == sorted(recalls)  # a longer shortlist holds a superset of the candidates


def _brute(ia: torch.Tensor, ib: torch.Tensor) -> tuple[float, float]:
    equal = overlap = 0
    for a, b in zip(ia.tolist(), ib.tolist(), strict=True):
        equal += set(a) == set(b)
        overlap += len(set(a) & set(b)) / len(a)
    return equal / len(ia), overlap / len(ia)


def test_topk_overlap_hand_case_and_brute_force():
    ia = torch.tensor([[0, 1, 2], [3, 4, 5]])
    ib = torch.tensor([[2, 0, 1], [3, 9, 8]])
    assert gpu_check.topk_overlap(ia, ib) == pytest.approx((0.5, (1 + 1 / 3) / 2))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = torch.randn(7, 12, generator=gen), torch.randn(7, 12, generator=gen)
        b[:3] = a[:3] + 1e-3 * b[:3]  # some rows with equal top sets
        k = int(torch.randint(1, 12, (), generator=gen))
        ia, ib = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
        assert gpu_check.topk_agreement(a, b, k) == pytest.approx(_brute(ia, ib))


def test_bad_device_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cuda:99", "--small"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cuda:99" in err and "not available" in err
