"""Published recipes: each resolves to the values of its official main.py, explicit options win, the
configuration is validated as a whole up front, and a few steps of every recipe run (and resume)."""

import json
import math

import pytest
import torch
import yaml

from qaconv.cli import main
from qaconv.engine.config import TrainConfig, resolve_config
from qaconv.errors import QAConvError
from qaconv.recipes import RECIPE_KEYS, RECIPES, load_recipe

# Facts read from the official code (main.py / main_gs.py argparse defaults, resmap.py, trainers*.py) of
# each tag; written out here by hand, independently of the YAML files.
OFFICIAL = {
    "1.0": dict(ibn=None, neck=128, neck_bn=True, qaconv_version="1", loss="memory", sampler="shuffle",
                batch_size=32, lr=0.01, step_factor=40, max_epochs=60, clip=0.0, amp="off",
                freeze_backbone_bn=False, augment="flip-occlusion", augment_after_acc=0.0, pretrain_trials=0,
                mem_mask_invalid=False, mem_joint_bn=True, rerank_input="sigmoid"),
    "1.1": dict(ibn=None, neck=64, neck_bn=True, qaconv_version="1", loss="memory", sampler="shuffle",
                batch_size=8, lr=0.005, step_factor=10, max_epochs=15, clip=0.0, amp="off",
                freeze_backbone_bn=False, augment="flip-occlusion", augment_after_acc=0.6, pretrain_trials=10,
                pretrain_steps=2000, mem_mask_invalid=True, mem_joint_bn=False, rerank_input="sigmoid"),
    "1.2": dict(ibn=None, neck=64, neck_bn=True, qaconv_version="1", loss="memory", sampler="shuffle",
                batch_size=8, lr=0.005, step_factor=10, max_epochs=15, clip=0.0, amp="off",
                freeze_backbone_bn=False, augment="full", augment_after_acc=0.6, pretrain_trials=10,
                pretrain_steps=2000, mem_mask_invalid=True, mem_joint_bn=False, rerank_input="sigmoid"),
    "2.0": dict(ibn="b", neck=64, neck_bn=True, qaconv_version="1", loss="pairwise", sampler="graph",
                batch_size=64, num_instance=4, gs_pre_epochs=1, gs_rerank=True, lr=0.001, step_factor=10,
                max_epochs=15, clip=512.0, amp="off", freeze_backbone_bn=False, augment="full",
                augment_after_acc=0.0, pretrain_trials=0, rerank_input="sigmoid"),
    "2.1": dict(ibn="b", neck=128, neck_bn=False, qaconv_version="2.1", loss="triplet", margin=16.0,
                sampler="graph", batch_size=64, num_instance=2, gs_pre_epochs=0, gs_rerank=False, lr=0.005,
                step_factor=0.7, max_epochs=60, clip=8.0, amp="auto", augment="full", augment_after_acc=0.0,
                pretrain_trials=0, rerank_input="sigmoid"),
    "latest": dict(ibn="b", neck=128, neck_bn=False, qaconv_version="2.1", loss="triplet", sampler="graph",
                   batch_size=64, num_instance=2, lr=0.005, step_factor=0.7, max_epochs=60, clip=8.0,
                   rerank_input="logit"),
}  # fmt: skip
COMMON = dict(arch="resnet50", final_layer="layer3", input_norm="none", pretrained="imagenet", height=384,
              width=128, weight_decay=5e-4, backbone_lr_mult=0.1, matcher="qaconv")  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_resolves_to_the_official_values(recipe):
    cfg = resolve_config(recipe).validate()
    for key, value in {**COMMON, **OFFICIAL[recipe]}.items():
        assert getattr(cfg, key) == value, (recipe, key)
    assert cfg.recipe == recipe
    assert set(load_recipe(recipe)) == set(RECIPE_KEYS)


def test_default_config_is_the_2_1_recipe():
    default = TrainConfig()
    assert {k: getattr(default, k) for k in RECIPE_KEYS} == load_recipe("2.1")


def test_explicit_options_override_the_recipe_and_unknown_recipes_fail():
    cfg = resolve_config("1.0", {"lr": 0.005, "batch_size": 16})
    assert (cfg.lr, cfg.batch_size, cfg.loss) == (0.005, 16, "memory")
    with pytest.raises(QAConvError, match="unknown recipe"):
        resolve_config("3.0")


@pytest.mark.parametrize(
    "override,message",
    [
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"lr": 1e6}, "lr must be > 0 and <= 10"),
        ({"neck": -5}, "neck must be >= 0"),
        ({"lambda_value": 7.0}, "lambda_value must be >= 0 and <= 1"),
        ({"alpha": -1e9}, "alpha must be >= 0"),
        ({"tau": float("nan")}, "tau must be a finite number"),
        ({"workers": -3}, "workers must be >= 0"),
        ({"augment": "sometimes"}, "augment = 'sometimes' is not one of"),
        ({"batch_size": 10, "num_instance": 4}, "must be a multiple of num_instance"),
        ({"gs_rerank": True, "sampler": "shuffle"}, "need sampler = graph"),
    ],
)
def test_validation_names_the_field(override, message):
    with pytest.raises(QAConvError, match=message):
        resolve_config("2.1", override).validate()


def test_unknown_test_set_is_found_before_training(tiny_domain, tmp_path, capsys):
    rc = main(["train", "--dataset", str(tiny_domain), "--testsets", "synth_B,no_such_set", "--data-dir",
               str(tiny_domain.parent), "-o", str(tmp_path / "run"), "--arch", "resnet18", "--ibn", "none",
               "--pretrained", "none"])  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert "no_such_set" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was trained or written


TINY = ["--arch", "resnet18", "--ibn", "none", "--pretrained", "none", "--height", "64", "--width", "32",
        "--workers", "0", "--device", "cpu", "--fea-batch", "16", "--match-memory", "1", "--testsets", ""]  # fmt: skip
# per recipe: options that keep its own character but make a few steps on 8 identities cheap
SMALL = {
    "1.0": ["--batch-size", "8", "--max-epochs", "2", "--step-factor", "1", "--neck", "16"],
    "1.1": ["--batch-size", "8", "--max-epochs", "2", "--step-factor", "1", "--neck", "16", "--pretrain-trials",
            "2", "--pretrain-steps", "2", "--augment-after-acc", "0.01"],
    "1.2": ["--batch-size", "8", "--max-epochs", "2", "--step-factor", "1", "--neck", "16", "--pretrain-trials",
            "2", "--pretrain-steps", "2", "--augment-after-acc", "0.01"],
    "2.0": ["--batch-size", "8", "--max-epochs", "2", "--step-factor", "1", "--neck", "16", "--gs-save"],
    "2.1": ["--batch-size", "8", "--max-epochs", "2", "--neck", "16", "--margin", "2"],
    "latest": ["--batch-size", "8", "--max-epochs", "1", "--neck", "16", "--margin", "2"],
}  # fmt: skip


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_few_steps_of_every_recipe(recipe, tiny_domain, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--recipe", recipe, "--dataset", str(tiny_domain), "--data-dir", str(tiny_domain.parent),
            "-o", str(run), *TINY, *SMALL[recipe]]  # fmt: skip
    assert main(args) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["recipe"] == recipe
    expected = resolve_config(recipe).to_dict()
    for key in ("loss", "sampler", "qaconv_version", "neck_bn", "clip", "amp", "lr", "gs_rerank", "rerank_input"):
        assert saved[key] == expected[key], key
    epochs = [r for r in _rows(run) if r["type"] == "epoch"]
    assert epochs and all(math.isfinite(r["loss"]) for r in epochs)
    if recipe in ("1.1", "1.2"):
        pre = [r for r in _rows(run) if r["type"] == "pretrain"]
        assert len(pre) == 1 and len(pre[0]["trials"]) == 2
        assert not epochs[0]["augmented"]  # no augmentation until the accuracy threshold is passed
    if recipe in ("1.0", "2.0", "2.1"):
        assert epochs[0]["augmented"]
    if recipe == "2.0":  # epoch 1 is the random pre-epoch; epoch 2 (0-based 1) a re-ranked graph, saved
        import numpy as np

        assert sorted(p.name for p in (run / "graph_sampler").iterdir()) == ["gs1.npz"]
        saved_gs = np.load(run / "graph_sampler" / "gs1.npz", allow_pickle=False)
        assert saved_gs["neighbours"].shape == (8, 1)  # 8 identities, batch 8 / 4 images - 1 neighbours


def test_a_new_grad_scaler_every_epoch(tiny_domain, tmp_path, monkeypatch):
    """As the official trainer: torch.cuda.amp.GradScaler() at the start of every epoch."""
    from qaconv.engine import trainer as trainer_module

    made = []
    real = torch.amp.GradScaler

    def spy(*args, **kw):
        made.append(real(*args, **kw))
        return made[-1]

    monkeypatch.setattr(trainer_module.torch.amp, "GradScaler", spy)
    trainer = _tiny_trainer(tiny_domain, tmp_path)
    for epoch in (1, 2):
        trainer.train_epoch(epoch)
    assert len(made) == 3 and trainer.scaler is made[-1] and len({id(m) for m in made}) == 3
    assert "scaler" not in trainer.state_dict()


def test_resume_keeps_the_recipe(tiny_domain, tmp_path):
    from qaconv.engine.runner import train

    run = tmp_path / "run"
    cfg = resolve_config("2.0", dict(dataset=str(tiny_domain), data_dir=str(tiny_domain.parent), out_dir=str(run),
                                     arch="resnet18", ibn=None, pretrained=None, height=64, width=32, workers=0,
                                     device="cpu", fea_batch=16, match_memory=1, testsets="", batch_size=8,
                                     step_factor=1, neck=16, max_epochs=2))  # fmt: skip

    def stop(epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_epoch_end=stop)
    # resumed with the default recipe on the command line: the saved 2.0 recipe still holds
    assert main(["train", "-o", str(run), "--resume", *TINY]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["recipe"], saved["loss"], saved["gs_rerank"], saved["lr"]) == ("2.0", "pairwise", True, 0.001)
    assert [r["epoch"] for r in _rows(run) if r["type"] == "epoch"] == [1, 2]


def test_readme_recipe_table_matches_the_presets():
    from pathlib import Path

    from qaconv.recipes import markdown_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("<!-- recipes-table -->\n", 1)[1].split("\n<!-- /recipes-table -->", 1)[0]
    assert table == markdown_table()


def _tiny_trainer(tiny_domain, tmp_path, **kw):
    from qaconv.data.market import load_market_layout
    from qaconv.engine.runner import build_criterion, build_model
    from qaconv.engine.trainer import Trainer

    cfg = resolve_config("1.2", dict(arch="resnet18", ibn=None, pretrained=None, height=64, width=32, neck=8,
                                     batch_size=8)).to_dict()  # fmt: skip
    data = load_market_layout(tiny_domain)
    model, matcher = build_model(cfg, load_weights=False)
    criterion = build_criterion(cfg, model, matcher, data.num_train_pids)
    return Trainer(model, matcher, criterion, data.train, tmp_path, height=64, width=32, batch_size=8,
                   sampler="shuffle", device="cpu", progress=False, **kw)  # fmt: skip


def test_pretraining_keeps_the_best_trial_and_resets_between_trials(tiny_domain, tmp_path):
    trainer = _tiny_trainer(tiny_domain, tmp_path, pretrain_trials=3, pretrain_steps=2)
    neck = trainer.model.neck[0].weight
    base0 = {k: v.clone() for k, v in trainer.model.base.state_dict().items()}
    metrics = iter([(1.0, 0.2), (0.5, 0.9), (2.0, 0.1)])  # (loss, acc): trial 2 has the best 100 * acc - loss
    seen = []

    def fake_run(sampler, desc, max_steps=None):
        assert max_steps == 2 and trainer.dataset.transform is not None
        seen.append((neck.detach().clone(), trainer.criterion.class_memory.abs().sum().item(),
                     all(torch.equal(v, base0[k]) for k, v in trainer.model.base.state_dict().items())))
        with torch.no_grad():  # a trial "trains": marks the neck, the backbone and the memory
            neck.fill_(len(seen))
            next(iter(trainer.model.base.parameters())).add_(1.0)
            trainer.criterion.class_memory.fill_(1.0)
        loss, acc = next(metrics)
        return [loss], [acc], 0, 8, 0

    trainer._run_batches = fake_run
    summary = trainer.pretrain()
    assert summary["best_trial"] == 2 and [round(t["metric"], 6) for t in summary["trials"]] == [19.0, 89.5, 8.0]
    assert torch.all(neck == 2)  # the best trial's weights were restored
    for i, (w, memory, base_fresh) in enumerate(seen):
        assert base_fresh and memory == 0  # every trial starts from the initial backbone and an empty memory
        assert not torch.all(w == i)  # with a freshly initialised neck
    assert all(abs(x) <= 1 / math.sqrt(256 * 9) for x in (seen[1][0].min().item(), seen[1][0].max().item()))


def test_augmentation_switches_on_after_the_accuracy_threshold(tiny_domain, tmp_path):
    trainer = _tiny_trainer(tiny_domain, tmp_path, augment="full", augment_after_acc=0.6)
    trainer.schedule.final_epochs = 3
    names = lambda: [type(t).__name__ for t in trainer.dataset.transform.transforms]  # noqa: E731
    assert not trainer.augment_on and "RandomCrop" not in names()
    trainer.epoch = 1
    assert not trainer._switch_augmentation(0.6)  # must exceed the threshold
    assert trainer._switch_augmentation(0.61) and trainer.augment_on and "RandomCrop" in names()
    assert not trainer._switch_augmentation(0.9)  # once
    state = trainer.state_dict()
    again = _tiny_trainer(tiny_domain, tmp_path, augment="full", augment_after_acc=0.6)
    again.load_state_dict(state)
    assert again.augment_on and "RandomCrop" in [type(t).__name__ for t in again.dataset.transform.transforms]
    last = _tiny_trainer(tiny_domain, tmp_path, augment="flip-occlusion", augment_after_acc=0.6)
    last.schedule.final_epochs, last.epoch = 3, 3
    assert not last._switch_augmentation(0.99)  # never after the last epoch


def test_resume_keeps_the_saved_run_options_unless_given(tiny_domain, tmp_path):
    """A run trained with --testsets '' resumes without generating or evaluating synth_B (the default)."""
    from qaconv.engine.runner import train

    run = tmp_path / "run"
    cfg = resolve_config("2.1", dict(dataset=str(tiny_domain), data_dir=str(tiny_domain.parent), out_dir=str(run),
                                     arch="resnet18", ibn=None, pretrained=None, height=64, width=32, workers=0,
                                     device="cpu", fea_batch=16, match_memory=1, testsets="", batch_size=8, neck=16,
                                     margin=2, max_epochs=2))  # fmt: skip

    def stop(epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_epoch_end=stop)
    # the command line names neither --testsets nor --data-dir: the saved '' and data folder hold
    assert main(["train", "-o", str(run), "--resume", "--workers", "0"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["testsets"] == "" and saved["data_dir"] == str(tiny_domain.parent) and saved["device"] == "cpu"
    assert not any(r["type"] == "eval" for r in _rows(run))
    assert not (tiny_domain.parent / "synth_B").exists() and not (tmp_path / "data").exists()


def test_train_config_defaults_agree_with_the_evaluator_defaults():
    """POST_DEFAULTS (the evaluator's options when called directly) and TrainConfig must not drift apart."""
    from qaconv.engine.evaluator import POST_DEFAULTS

    defaults = TrainConfig().to_dict()
    assert {k: defaults[k] for k in POST_DEFAULTS} == POST_DEFAULTS
