"""qaconv demo end to end on tiny generated domains: both methods trained, the official post-processing rows
on the unseen domain, results and the CMC plot written."""

import json


def test_demo_runs_end_to_end(tmp_path):
    from qaconv.data.synth import generate_domain
    from qaconv.demo import run_demo

    data = tmp_path / "data"
    for domain in ("A", "B"):
        generate_domain(domain, data / f"synth_{domain}", seed=0, num_train_ids=8, num_test_ids=6, height=64,
                        width=32, progress=False)  # fmt: skip
    summary = run_demo(tmp_path / "out", data_dir=data, max_epochs=1, device="cpu", progress=False)
    saved = json.loads((tmp_path / "out" / "demo_results.json").read_text())
    assert saved["methods"].keys() == summary["methods"].keys() == {"pooled baseline (GAP + cosine)", "QAConv-GS"}
    qaconv = saved["methods"]["QAConv-GS"]["results"]
    assert set(qaconv) == {"synth_B", "synth_B +RR", "synth_B +RR+TLift", "synth_A"}
    assert set(saved["methods"]["pooled baseline (GAP + cosine)"]["results"]) == {"synth_B", "synth_A"}
    config = (tmp_path / "out" / "runs" / "qaconv" / "config.yaml").read_text()
    assert "recipe: '2.1'" in config and "loss: pairwise" in config
    assert (tmp_path / "out" / "cmc.png").stat().st_size > 10_000
