"""Score calibration: ROC and TAR@FAR against brute force (ties included), FARs too small for the negatives,
Platt scaling against a hand-computed case and scipy.optimize, verdict bands, and the CLI end to end
(calibrate, match's verdict, refused foreign calibrations, the evaluation report's histograms and ROC)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from qaconv import calibrate as cal
from qaconv.cli import main
from qaconv.errors import QAConvError

# ---------------------------------------------------------------- brute-force references


def brute_rates(pos, neg, t):
    """(TAR, FAR) when a pair is accepted at score >= t."""
    return sum(p >= t for p in pos) / len(pos), sum(n >= t for n in neg) / len(neg)


def brute_tar_at_far(pos, neg, f):
    """(tar, threshold) by a loop over every candidate threshold: the best TAR with FAR <= f, and the highest
    threshold reaching it; threshold None when no positive is accepted."""
    if f * len(neg) < 1 - 1e-9:
        return None, None
    allowed = math.floor(f * len(neg) + 1e-9)
    best, best_t = 0.0, None
    for t in sorted(set(pos) | set(neg)) + [math.inf]:
        tar, far = brute_rates(pos, neg, t)
        if sum(n >= t for n in neg) <= allowed and tar > 0 and (tar > best or (tar == best and t > best_t)):
            best, best_t = tar, t
    return best, best_t


def brute_keeping(pos, frac):
    """The highest threshold keeping at least ``frac`` of the positives (loop over candidate thresholds)."""
    return max(t for t in set(pos) if brute_rates(pos, [0.0], t)[0] >= frac - 1e-12)


def brute_auc(pos, neg):
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def random_case(rng, ties: bool):
    n_pos, n_neg = rng.integers(1, 30), rng.integers(1, 300)
    if ties:  # few distinct values: many ties within and across the classes
        return (rng.integers(-3, 6, n_pos).astype(float).tolist(), rng.integers(-6, 3, n_neg).astype(float).tolist())
    return rng.normal(1, 1, n_pos).tolist(), rng.normal(-1, 1, n_neg).tolist()


# ---------------------------------------------------------------- ROC and TAR@FAR


@pytest.mark.parametrize("ties", [True, False])
def test_tar_at_far_against_brute_force(ties):
    rng = np.random.default_rng(1 if ties else 2)
    for _ in range(150):
        pos, neg = random_case(rng, ties)
        fars = [1e-2, 1e-3, 1 / len(neg), 2 / len(neg), 0.1, 0.5, 1.0, 0.999 / len(neg)]
        for f, row in zip(fars, cal.tar_at_far(pos, neg, fars), strict=True):
            tar, threshold = brute_tar_at_far(pos, neg, f)
            assert row["far"] == f
            if tar is None:
                assert row["tar"] is None and row["threshold"] is None and "cannot be estimated" in row["reason"]
                continue
            assert row["tar"] == pytest.approx(tar) and row["threshold"] == threshold
            if threshold is not None:
                far = brute_rates(pos, neg, threshold)[1]
                assert row["far_achieved"] == pytest.approx(far) and far <= f * (1 + 1e-9)
                assert row["reason"] is None
            else:
                assert row["tar"] == 0.0 and row["reason"]


def test_roc_corners_and_auc_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(60):
        pos, neg = random_case(rng, ties=bool(rng.integers(2)))
        roc = cal.roc_curve(pos, neg)
        assert roc["threshold"].tolist() == sorted(set(pos), reverse=True)
        for t, tar, far in zip(roc["threshold"], roc["tar"], roc["far"], strict=True):
            assert (tar, far) == pytest.approx(brute_rates(pos, neg, t))
        assert cal.auc(pos, neg) == pytest.approx(brute_auc(pos, neg))
        for frac in (0.5, 0.9, 0.99, 1.0, 1 / len(pos)):
            assert cal.threshold_keeping(pos, frac) == brute_keeping(pos, frac)


def test_hand_made_cases_with_ties():
    pos, neg = [3.0, 2.0, 2.0, 1.0], [2.0, 1.0, 0.0, 0.0]
    # thresholds: 3 -> TAR 1/4 FAR 0; 2 -> TAR 3/4 FAR 1/4 (the negative tied at 2 is accepted too); 1 -> 1, 1/2
    rows = cal.tar_at_far(pos, neg, [0.25, 0.3, 0.5, 1.0])
    assert [(r["tar"], r["threshold"], r["far_achieved"]) for r in rows] == [
        (0.75, 2.0, 0.25), (0.75, 2.0, 0.25), (1.0, 1.0, 0.5), (1.0, 1.0, 0.5)]
    assert cal.threshold_keeping(pos, 0.99) == 1.0 and cal.threshold_keeping(pos, 0.75) == 2.0
    assert cal.threshold_keeping(pos, 0.5) == 2.0  # 3/4 of the positives score >= 2, only 1/4 >= 3
    assert cal.auc(pos, neg) == pytest.approx((4 + 3.5 + 3.5 + 2.5) / 16)  # ties count one half
    # every score tied: accepting the tie accepts everything
    assert cal.tar_at_far([1.0, 1.0], [1.0] * 4, [0.25])[0]["tar"] == 0.0
    assert cal.tar_at_far([1.0, 1.0], [1.0] * 4, [1.0])[0]["threshold"] == 1.0
    # no positive above the two negatives at 2 when one false accept is allowed
    row = cal.tar_at_far([1.0], [2.0, 2.0, 0.0, 0.0], [0.25])[0]
    assert row["tar"] == 0.0 and row["threshold"] is None and "no same-identity pair" in row["reason"]


def test_far_too_small_for_the_negatives_is_null_with_a_reason():
    pos = [5.0, 4.0]
    neg999, neg1000 = list(np.linspace(-3, 3, 999)), list(np.linspace(-3, 3, 1000))
    row = cal.tar_at_far(pos, neg999, [1e-3])[0]
    assert row["tar"] is None and row["threshold"] is None and row["far_achieved"] is None
    assert "1,000" in row["reason"] and "999" in row["reason"]
    assert cal.tar_at_far(pos, neg1000, [1e-3])[0] == {"far": 1e-3, "tar": 1.0, "threshold": 4.0,
                                                        "far_achieved": 0.0, "reason": None}
    json.dumps(cal.score_summary(pos, neg999), allow_nan=False)  # nulls, never NaN or a made-up number
    # the same band falls back to FAR 1/N, and says so
    bands = cal.verdict_bands(pos, neg999)
    assert bands["same_far"] == 1 / 999 and bands["same_far_requested"] == 1e-3 and "1/999" in bands["note"]
    assert cal.verdict_bands(pos, neg1000)["same_far"] == 1e-3 and not cal.verdict_bands(pos, neg1000)["note"]


def test_cross_camera_pairs_against_a_loop():
    rng = np.random.default_rng(4)
    q_pids, g_pids = rng.integers(-1, 4, 7), rng.integers(-1, 4, 11)
    q_cams, g_cams = rng.integers(0, 3, 7), rng.integers(0, 3, 11)
    logits = rng.normal(size=(7, 11))
    pos, neg = cal.cross_camera_pairs(logits, q_pids, g_pids, q_cams, g_cams)
    want_pos, want_neg = [], []
    for i in range(7):
        for j in range(11):
            if q_cams[i] != g_cams[j] and q_pids[i] >= 0 and g_pids[j] >= 0:
                (want_pos if q_pids[i] == g_pids[j] else want_neg).append(logits[i, j])
    assert sorted(pos) == sorted(want_pos) and sorted(neg) == sorted(want_neg) and len(pos) and len(neg)
    with pytest.raises(QAConvError, match="NaN or infinite"):
        cal.cross_camera_pairs(np.full((7, 11), np.nan), q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(QAConvError, match="positive and negative pairs"):
        cal.calibrate_scores([], [1.0])


# ---------------------------------------------------------------- Platt scaling


def test_platt_hand_computed_two_point_case():
    """Scores 0 (1 positive, 3 negatives) and 1 (3 positives, 1 negative): with two distinct scores the fit
    puts sigmoid(a s + b) at each score's weighted mean target. P = N = 4: weights 1/8 each, Platt targets
    5/6 and 1/6, so sigmoid(b) = (5/6 + 3/6) / 4 = 1/3 and sigmoid(a + b) = (15/6 + 1/6) / 4 = 2/3:
    b = -ln 2, a = 2 ln 2."""
    m = cal.fit_calibration_model([0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0])
    assert m["a"] == pytest.approx(2 * math.log(2), abs=1e-9) and m["b"] == pytest.approx(-math.log(2), abs=1e-9)
    assert m["targets"] == [5 / 6, 1 / 6] and m["prior"] == 0.5
    # class-balanced: 1 positive and 3 negatives at score 0, 8 positives and 1 negative at 1 (P 9, N 4):
    # w+ = 1/18, w- = 1/8, t+ = 10/11, t- = 1/6
    m = cal.fit_calibration_model([0.0] + [1.0] * 8, [0.0, 0.0, 0.0, 1.0])
    wp, wn, tp, tn = 1 / 18, 1 / 8, 10 / 11, 1 / 6
    m0 = (wp * tp + 3 * wn * tn) / (wp + 3 * wn)
    m1 = (8 * wp * tp + wn * tn) / (8 * wp + wn)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert m["b"] == pytest.approx(logit(m0), abs=1e-9) and m["a"] == pytest.approx(logit(m1) - logit(m0), abs=1e-9)


def test_platt_against_scipy_optimize():
    rng = np.random.default_rng(5)
    for n_pos, n_neg, shift in ((40, 900, 2.0), (300, 300, 0.3), (5, 5000, 4.0)):
        pos, neg = rng.normal(shift, 1.3, n_pos) + 7, rng.normal(0, 0.8, n_neg) + 7
        m = cal.fit_calibration_model(pos, neg)
        s = np.concatenate([pos, neg])
        t = np.concatenate([np.full(n_pos, (n_pos + 1) / (n_pos + 2)), np.full(n_neg, 1 / (n_neg + 2))])
        w = np.concatenate([np.full(n_pos, 0.5 / n_pos), np.full(n_neg, 0.5 / n_neg)])

        def loss(p, s=s, t=t, w=w):
            z = p[0] * s + p[1]
            return -np.sum(w * (t * log_expit(z) + (1 - t) * log_expit(-z)))

        ref = minimize(loss, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14,
                                                                        "maxiter": 20000})
        assert loss([m["a"], m["b"]]) <= ref.fun + 1e-12
        assert (m["a"], m["b"]) == pytest.approx(tuple(ref.x), rel=1e-4, abs=1e-4)


def test_platt_is_finite_on_separated_classes_and_recovers_a_known_posterior():
    m = cal.fit_calibration_model([5.0, 6.0, 7.0], [-1.0, 0.0, 1.0])
    assert math.isfinite(m["a"]) and math.isfinite(m["b"]) and m["a"] > 0
    # equal-variance Gaussians N(2, 1) vs N(-1, 1) at equal priors: log-odds 3 s - 1.5
    rng = np.random.default_rng(6)
    m = cal.fit_calibration_model(rng.normal(2, 1, 20000), rng.normal(-1, 1, 50000))
    assert m["a"] == pytest.approx(3.0, abs=0.1) and m["b"] == pytest.approx(-1.5, abs=0.1)


def test_probability_at_another_prior():
    c = {"platt": {"a": 2.0, "b": -1.0, "prior": 0.5}}
    assert cal.probability(1.5, c) == pytest.approx(expit(2.0))
    assert cal.probability(1.5, c, prior=0.1) == pytest.approx(expit(2.0 + math.log(0.1 / 0.9)))
    assert cal.probability(np.array([-1e6, 1e6]), c).tolist() == [0.0, 1.0]
    with pytest.raises(QAConvError, match="prior"):
        cal.probability(0.0, c, prior=1.0)


# ---------------------------------------------------------------- verdict bands


def _cal(same, different):
    return {"bands": {"same_threshold": same, "different_threshold": different, "same_far": 1e-3,
                      "different_tar": 0.99}, "platt": {"a": 1.0, "b": 0.0, "prior": 0.5}}


def test_verdict_bands():
    c = _cal(2.0, -1.0)
    got = {x: cal.verdict(x, c)["verdict"] for x in (5.0, 2.0, 1.999, 0.0, -1.0, -1.0001, -9.0)}
    assert got == {5.0: "same person", 2.0: "same person", 1.999: "uncertain", 0.0: "uncertain", -1.0: "uncertain",
                   -1.0001: "different", -9.0: "different"}
    v = cal.verdict(0.5, c)
    assert v["calibrated"] and v["probability"] == pytest.approx(expit(0.5)) and v["prior"] == 0.5
    assert v["bands"] == {"same_at_or_above": 2.0, "different_below": -1.0} and "uncertain" in v["message"]
    # crossed bands (well separated scores): 'same person' wins above its threshold
    assert [cal.verdict(x, _cal(1.0, 3.0))["verdict"] for x in (0.9, 1.0, 2.9, 3.0)] == [
        "different", "same person", "same person", "same person"]
    # no 'same' band when no positive scores above the negatives that FAR allows
    assert [cal.verdict(x, _cal(None, 0.0))["verdict"] for x in (-1.0, 0.0, 99.0)] == ["different", "uncertain",
                                                                                       "uncertain"]
    u = cal.verdict(1.25, None)
    assert not u["calibrated"] and u["verdict"] is None and u["probability"] is None
    assert "uncalibrated" in u["message"] and "qaconv calibrate" in u["message"]


def test_bands_from_scores_follow_their_definition():
    rng = np.random.default_rng(7)
    pos, neg = rng.normal(2, 1, 400).tolist(), rng.normal(-1, 1, 5000).tolist()
    b = cal.verdict_bands(pos, neg)
    assert b["same_threshold"] == brute_tar_at_far(pos, neg, 1e-3)[1]
    assert b["different_threshold"] == brute_keeping(pos, 0.99)
    assert sum(p >= b["different_threshold"] for p in pos) >= 0.99 * len(pos)
    assert sum(n >= b["same_threshold"] for n in neg) <= 1e-3 * len(neg)


# ---------------------------------------------------------------- files


def test_load_refuses_foreign_and_broken_calibrations(tmp_path):
    c = {**_cal(1.0, 0.0), "format": cal.FORMAT, "model": {"hash": "a" * 64, "feature_shape": [16, 8, 4],
                                                           "checkpoint": "/runs/x/checkpoint.pt"}}
    path = cal.save_calibration(c, tmp_path / "calibration.json")
    mine = {"hash": "a" * 64, "feature_shape": (16, 8, 4), "checkpoint": "/runs/x/checkpoint.pt"}
    assert cal.load_calibration(path, mine) == c
    other = {**mine, "hash": "b" * 64}
    with pytest.raises(QAConvError, match="calibrates another model") as exc:
        cal.load_calibration(path, other)
    assert len(str(exc.value).splitlines()) == 1 and "aaaaaaaaaaaa" in str(exc.value)
    assert cal.find_calibration(tmp_path / "elsewhere" / "checkpoint.pt", mine) is None
    with pytest.raises(QAConvError, match="does not exist"):
        cal.find_calibration(tmp_path, mine, path=tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(QAConvError, match="not a qaconv calibration"):
        cal.load_calibration(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(QAConvError, match="cannot be read"):
        cal.load_calibration(tmp_path / "broken.json")


# ---------------------------------------------------------------- command line, end to end


def _checkpoint(folder, seed):
    from qaconv.engine.checkpoint import save_checkpoint
    from qaconv.engine.runner import DEFAULTS, build_model

    torch.manual_seed(seed)
    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16}
    model, matcher = build_model(cfg, load_weights=False)
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()},
                    folder / "checkpoint.pt")
    return folder


@pytest.fixture(scope="module")
def calibrated(tiny_domain, tmp_path_factory):
    """A random-init tiny QAConv calibrated on the tiny domain, with its saved evaluation scores."""
    root = tmp_path_factory.mktemp("calib")
    run = _checkpoint(root / "run", 0)
    common = ["--data-dir", str(tiny_domain.parent), "--workers", "0", "--device", "cpu"]
    assert main(["calibrate", "--checkpoint", str(run), "--testsets", "synth_A", *common]) == 0
    assert main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", "--save-scores", "-o",
                 str(root / "scores"), *common]) == 0
    return run, np.load(root / "scores" / "synth_A_scores.npz"), common


def test_cli_calibrate_writes_what_the_saved_scores_give(calibrated):
    run, saved, _ = calibrated
    c = json.loads((run / "calibration.json").read_text())
    logits = saved["logit"].astype(np.float64)
    pos, neg = [], []
    for i, (qp, qc) in enumerate(zip(saved["prob_ids"], saved["prob_cams"], strict=True)):
        for j, (gp, gc) in enumerate(zip(saved["gal_ids"], saved["gal_cams"], strict=True)):
            if qc != gc:
                (pos if qp == gp else neg).append(logits[i, j])
    assert c["pairs"] == {"positive": len(pos), "negative": len(neg)} and len(neg) < 1000
    for row in c["tar_at_far"]:
        tar, threshold = brute_tar_at_far(pos, neg, row["far"])
        assert row["tar"] == (None if tar is None else pytest.approx(tar))
        assert row["threshold"] == (None if threshold is None else pytest.approx(threshold, abs=1e-6))
    assert c["tar_at_far"][1]["tar"] is None and "1,000" in c["tar_at_far"][1]["reason"]  # FAR 1e-3: too few
    assert c["bands"]["same_far"] == pytest.approx(1 / len(neg))
    assert c["bands"]["different_threshold"] == pytest.approx(brute_keeping(pos, 0.99), abs=1e-6)
    from qaconv.extractor import FeatureExtractor
    from qaconv.gallery import model_identity

    assert c["model"]["hash"] == model_identity(FeatureExtractor(run, device="cpu"))["hash"]
    assert (run / "calibration.png").stat().st_size > 20_000
    assert not list(run.glob("*.tmp"))  # written atomically, nothing left over


def test_cli_calibrate_prints_a_table_and_refuses_bad_options(calibrated, capsys, tmp_path):
    run, _, common = calibrated
    out = tmp_path / "c.json"
    assert main(["calibrate", "--checkpoint", str(run), "--testsets", "synth_A", "-o", str(out), "--plot",
                 str(tmp_path / "c.png"), *common]) == 0
    text = capsys.readouterr().out
    assert "TAR" in text and "threshold" in text and "cannot be estimated" in text and "uncertain between" in text
    c = json.loads(out.read_text())
    same = c["bands"]["same_threshold"]
    assert (f"same person if logit >= {same:.4f}" if same is not None else "never 'same person'") in text
    assert f"wrote {out} and {tmp_path / 'c.png'}" in text
    for argv, needle in ((["--different-tar", "1.5"], "--different-tar"), (["--same-far", "2"], "--same-far"),
                         (["-o", str(tmp_path)], "is a folder"), (["--testsets", " "], "no test sets")):
        argv = ["calibrate", "--checkpoint", str(run), "--testsets", "synth_A", *common, *argv]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0]


def _match(images, run, tmp_path, capsys, *extra):
    """(logit, verdict line) of 'qaconv match' on two images."""
    assert main(["match", str(images[0]), str(images[1]), "--checkpoint", str(run), "-o", str(tmp_path / "m.png"),
                 "--device", "cpu", *extra]) == 0
    out = capsys.readouterr().out.splitlines()
    return float(out[0].split()[2].rstrip(";")), out[1]


def test_cli_match_prints_the_verdict_or_says_uncalibrated(calibrated, tiny_domain, tmp_path, capsys):
    run, _, _ = calibrated
    query = sorted((tiny_domain / "query").iterdir())[0]
    gallery = sorted((tiny_domain / "bounding_box_test").iterdir())[:6]
    c = cal.load_calibration(run / "calibration.json")
    logits = []
    for g in gallery:
        logit, line = _match([query, g], run, tmp_path, capsys)
        v = cal.verdict(logit, c)
        assert line.startswith(f"verdict: {v['verdict']}: P(same) = ")
        printed = float(line.split("P(same) = ")[1].split()[0])  # the logit printed is rounded to 3 decimals
        assert cal.probability(logit - 5e-4, c) - 5e-4 <= printed <= cal.probability(logit + 5e-4, c) + 5e-4
        logits.append(logit)
    # the same model with bands placed among these logits (--calibration): all three verdicts appear
    lo, hi = np.sort(logits)[[1, 4]]
    c["bands"].update(same_threshold=float(hi), different_threshold=float(lo))
    custom = cal.save_calibration(c, tmp_path / "custom.json")
    seen = {}
    for g, logit in zip(gallery, logits, strict=True):
        again, line = _match([query, g], run, tmp_path, capsys, "--calibration", str(custom))
        assert again == logit
        seen[line.split(":")[1].strip()] = seen.get(line.split(":")[1].strip(), 0) + 1
        want = "same person" if logit >= hi - 5e-4 else "different" if logit < lo - 5e-4 else "uncertain"
        if abs(logit - hi) > 5e-4 and abs(logit - lo) > 5e-4:  # the printed logit is rounded to 3 decimals
            assert line.startswith(f"verdict: {want}: ")
    assert set(seen) == set(cal.VERDICTS)
    # elsewhere, without calibration.json: uncalibrated, and how to calibrate
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("calibration.*"))
    _, line = _match([query, gallery[0]], bare, tmp_path, capsys)
    assert "uncalibrated" in line and "qaconv calibrate --checkpoint" in line


def test_calibration_of_another_model_is_refused(calibrated, tiny_domain, tmp_path, capsys):
    run, _, _ = calibrated
    other = _checkpoint(tmp_path / "other", 1)
    shutil.copy(run / "calibration.json", other / "calibration.json")
    images = sorted((tiny_domain / "query").iterdir())[:2]
    argv = ["match", str(images[0]), str(images[1]), "--checkpoint", str(other), "-o", str(tmp_path / "m.png"),
            "--device", "cpu"]
    assert main(argv) == 0  # beside the checkpoint: refused in one line, the score reported uncalibrated
    res = capsys.readouterr()
    err = res.err.strip().splitlines()
    assert len(err) == 1 and "calibration refused" in err[0] and "calibrates another model" in err[0]
    assert "uncalibrated" in res.out
    assert main([*argv, "--calibration", str(run / "calibration.json")]) == 1  # asked for explicitly: an error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibrates another model" in err[0]


def test_help_documents_the_bands(capsys):
    for command in ("calibrate", "match"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "'same person' when the logit is >= the threshold at FAR 1e-3" in text
        assert "keeps 99% of true cross-camera matches" in text and "'uncertain' between" in text


def test_evaluation_report_shows_histograms_roc_and_tar_at_far(calibrated, tmp_path, capsys):
    run, _, common = calibrated
    rep = tmp_path / "rep"
    assert main(["evaluate", "--checkpoint", str(run), "--testsets", "synth_A", "--report", str(rep),
                 "--report-queries", "1", *common]) == 0
    page = (rep / "index.html").read_text()
    assert 'src="synth_A/scores.png"' in page and (rep / "synth_A" / "scores.png").stat().st_size > 20_000
    c = json.loads((run / "calibration.json").read_text())
    row = c["tar_at_far"][0]
    assert f"<td>{100 * row['tar']:.2f}%</td><td>{row['threshold']:.4f}</td>" in page  # the calibration's numbers
    assert page.count("different-identity pairs, there are") == 2  # FAR 1e-3 and 1e-4 with fewer than 1,000 negatives
    assert f"{c['pairs']['positive']:,} same-identity and {c['pairs']['negative']:,} different-identity" in page


def test_cli_search_gives_verdicts_per_result_or_says_uncalibrated(calibrated, tiny_domain, tmp_path, capsys):
    """search --json: with calibration.json beside the checkpoint every hit of a crop query carries the verdict
    of its logit under the file's bands (checked against the thresholds by hand) and P(same) = the Platt
    sigmoid written out here; tracklet aggregates and a checkpoint without calibration carry none, and say why."""
    import json

    run, _, _ = calibrated
    store = tmp_path / "g.store"
    assert main(["index", str(tiny_domain / "bounding_box_test"), "--checkpoint", str(run), "-o", str(store),
                 "--device", "cpu"]) == 0  # fmt: skip
    c = cal.load_calibration(run / "calibration.json")
    queries = sorted((tiny_domain / "query").iterdir())[:3]
    # bands placed among this search's logits, so that all three verdicts occur
    custom = tmp_path / "custom.json"
    argv = ["search", *map(str, queries), "--index", str(store), "--checkpoint", str(run), "--json", "--top", "8",
            "--include-same-camera", "--device", "cpu"]  # fmt: skip
    capsys.readouterr()
    assert main([*argv]) == 0
    res = json.loads(capsys.readouterr().out)
    scores = np.sort([h["score"] for r in res for h in r["results"]])
    c["bands"].update(same_threshold=float(scores[-3]), different_threshold=float(scores[3]))
    cal.save_calibration(c, custom)
    assert main([*argv, "--calibration", str(custom)]) == 0
    res = json.loads(capsys.readouterr().out)
    a, b = c["platt"]["a"], c["platt"]["b"]  # prior 0.5 = the fit's prior: no shift
    seen = set()
    for r in res:
        assert r["calibrated"] is True and r["verdict_note"] is None
        for h in r["results"]:
            want = "same person" if h["score"] >= scores[-3] else "different" if h["score"] < scores[3] else \
                "uncertain"
            assert h["verdict"] == want
            assert h["p_same"] == pytest.approx(1 / (1 + math.exp(-(a * h["score"] + b))), rel=1e-12)
            seen.add(want)
    assert seen == set(cal.VERDICTS)
    assert main([a for a in argv if a != "--json"] + ["--calibration", str(custom)]) == 0  # the table: columns
    table = capsys.readouterr().out
    assert "verdict" in table and "P(same)" in table
    # a tracklet aggregate gets no verdict, and says why
    track = tmp_path / "track"
    track.mkdir()
    for q in [q for q in sorted((tiny_domain / "query").iterdir()) if "_c1s" in q.name][:2]:
        shutil.copy(q, track / q.name)
    assert main(["search", str(track), "--tracklet", "--index", str(store), "--checkpoint", str(run),
                 "--json", "--include-same-camera", "--calibration", str(custom), "--device", "cpu"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert "no verdict" in res[0]["verdict_note"] and all(h["verdict"] is None for h in res[0]["results"])
    # without calibration.json: uncalibrated, and how to calibrate
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("calibration.*"))
    assert main([*argv[:3], "--index", str(store), "--checkpoint", str(bare), "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)[0]  # the store knows its model by content: the copy is the same model
    assert r["calibrated"] is False and "uncalibrated" in r["verdict_note"]
    assert "qaconv calibrate --checkpoint" in r["verdict_note"] and "verdict" not in r["results"][0]
