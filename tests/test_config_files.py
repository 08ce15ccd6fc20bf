"""`qaconv train --config FILE.yaml KEY=VALUE ... --print-config`: layering (preset < file < options <
overrides), a run's config.yaml repeating the run, recipe presets as files, and one located line per error."""

import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qaconv.recipes
from qaconv.cli import main
from qaconv.engine.config import FIELD_NAMES, TrainConfig, resolve_config
from qaconv.engine.config_file import config_yaml, layered_config, parse_overrides, read_config_file
from qaconv.errors import QAConvError
from qaconv.recipes import RECIPES, load_recipe, recipe_file


def _printed(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["train", "--print-config", *map(str, argv)]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def _error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(["train", *map(str, argv)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- layering -------------------------------------------------------------------------------------------


def test_each_layer_wins_over_the_ones_below(tmp_path, capsys):
    """lr: recipe 1.0 says 0.01; the file 0.02; --lr 0.03; lr=0.04. Remove the top layer, the next one shows."""
    cfg = _write(tmp_path / "c.yaml", "recipe: '1.0'\nlr: 0.02\nmax_epochs: 7\n")
    assert _printed(capsys, "--config", cfg, "--lr", "0.03", "lr=0.04")["lr"] == 0.04
    assert _printed(capsys, "--config", cfg, "--lr", "0.03")["lr"] == 0.03
    shown = _printed(capsys, "--config", cfg)
    assert (shown["lr"], shown["max_epochs"], shown["recipe"]) == (0.02, 7, "1.0")
    assert shown["loss"] == "memory" and shown["batch_size"] == 32  # the rest from the 1.0 preset under the file
    assert _printed(capsys, "--recipe", "1.0")["lr"] == 0.01
    assert _printed(capsys)["lr"] == 0.005  # the default 2.1 recipe
    # an option given explicitly wins over the file even when it equals the default
    assert _printed(capsys, "--config", cfg, "--max-epochs", "60")["max_epochs"] == 60


def test_the_command_line_recipe_builds_a_file_without_one(tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", "lr: 0.02\n")
    shown = _printed(capsys, "--config", cfg, "--recipe", "2.0")
    assert (shown["recipe"], shown["loss"], shown["lr"]) == ("2.0", "pairwise", 0.02)
    assert _printed(capsys, "--config", cfg, "recipe=1.1", "--recipe", "2.0")["recipe"] == "1.1"  # override wins
    named = _write(tmp_path / "r.yaml", "recipe: '2.0'\n")
    line = _error(capsys, "--config", named, "--recipe", "1.0", "--print-config")
    assert "recipe 1.0 contradicts" in line and "r.yaml" in line and "sets recipe 2.0" in line


def test_overrides_are_yaml_scalars_parsed_as_the_options_parse_them():
    values, where = parse_overrides([
        "lr=0.01", "weight-decay=1e-4", "max-epochs=5", "testsets=synth_B,market", "dataset=1501", "ibn=none",
        "rerank=true", "tlift=no", "amp=off", "freeze_backbone_bn=auto", "qaconv_version=1", "device=null",
        "data_dir='my data'", "augment=flip-occlusion", "margin=2", "testsets=",
    ])  # fmt: skip
    assert values == dict(lr=0.01, weight_decay=1e-4, max_epochs=5, testsets="", dataset="1501", ibn=None,
                          rerank=True, tlift=False, amp="off", freeze_backbone_bn="auto", qaconv_version="1",
                          device=None, data_dir="my data", augment="flip-occlusion", margin=2.0)  # fmt: skip
    assert type(values["lr"]) is float and type(values["max_epochs"]) is int and type(values["margin"]) is float
    assert where["testsets"] == "override 'testsets='"  # the later one for a repeated key, as a repeated option
    assert parse_overrides(["freeze-backbone-bn=false"])[0] == {"freeze_backbone_bn": False}
    # true/false as the options read them: --augment true is full, YAML on/off for --amp
    assert parse_overrides(["augment=true", "amp=on"])[0] == {"augment": "full", "amp": "on"}
    # text the YAML reading would turn into a list or a mapping stays text, as the option takes it
    assert parse_overrides(["dataset=[a, b]", "report=runs/a: b"])[0] == {"dataset": "[a, b]", "report": "runs/a: b"}


def test_the_same_bad_value_gets_the_same_message_from_an_option_a_file_and_an_override(tmp_path, capsys):
    """One validation (TrainConfig.validate) behind all three."""
    for key, text in (("lr", "20"), ("lambda-value", "2"), ("weight-decay", "2"), ("augment-after-acc", "1.5")):
        flag = _error(capsys, f"--{key}", text, "--print-config")
        over = _error(capsys, f"{key}={text}", "--print-config")
        file = _error(capsys, "--config", _write(tmp_path / "c.yaml", f"{key}: {text}\n"), "--print-config")
        message = flag.split("error: ", 1)[1]
        assert message.startswith(key.replace("-", "_"))
        assert over.endswith(f"override '{key}={text}': {message}")
        assert file.endswith(f"c.yaml:1: {message}")


def test_keys_and_values_mix_freely_with_the_options(tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", "seed: 3\n")
    shown = _printed(
        capsys, "lr=0.02", "--config", cfg, "-o", tmp_path / "o", "max-epochs=3", "--seed", "5", "testsets="
    )
    assert (shown["lr"], shown["max_epochs"], shown["seed"], shown["testsets"]) == (0.02, 3, 5, "")
    assert shown["out_dir"] == str(tmp_path / "o")


def test_help_states_the_precedence(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lowest precedence first: the --recipe preset (default 2.1), the --config file, options given on the " \
           "command line, KEY=VALUE overrides" in text  # fmt: skip
    assert "--print-config" in text and "KEY=VALUE" in text


# --- recipe presets as files ----------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_preset_file_is_that_recipe(recipe, capsys):
    preset = Path(qaconv.recipes.__file__).parent / recipe_file(recipe)
    assert _printed(capsys, "--config", preset) == _printed(capsys, "--recipe", recipe)
    assert _printed(capsys, "--config", preset, "--recipe", recipe)["recipe"] == recipe


def test_a_preset_file_with_a_changed_value_sits_on_the_command_line_recipe(tmp_path, capsys):
    values = load_recipe("1.0")
    values["lr"] = 0.5
    cfg = _write(tmp_path / "mine.yaml", yaml.safe_dump(values))
    shown = _printed(capsys, "--config", cfg)
    assert shown["recipe"] == "2.1"  # the default preset beneath: every recipe value comes from the file anyway
    expected = TrainConfig(**{**load_recipe("1.0"), "lr": 0.5}).to_dict()
    assert {k: shown[k] for k in values} == {k: expected[k] for k in values}
    preset = Path(qaconv.recipes.__file__).parent / recipe_file("2.0")
    line = _error(capsys, "--config", preset, "--recipe", "2.1", "--print-config")
    assert "is the 2.0 preset" in line


# --- a run's config.yaml repeats the run ----------------------------------------------------------------

TEXT_VALUES = st.sampled_from(
    ["yes", "no", "on", "off", "null", "~", "1501", "2.1", "1e3", "", "a,b", "synth_B,market", "'q'", "#x",
     "a: b", "- x", "true", "  padded ", "über/straße", "C:\\data", "line\\nbreak", "0x10", "12:30"]
) | st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=12)  # fmt: skip


@st.composite
def configs(draw) -> TrainConfig:
    num_instance = draw(st.integers(1, 6))
    values = dict(
        dataset=draw(TEXT_VALUES), testsets=draw(TEXT_VALUES), data_dir=draw(TEXT_VALUES), out_dir=draw(TEXT_VALUES),
        backbone_weights=draw(st.none() | TEXT_VALUES), report=draw(st.none() | TEXT_VALUES),
        ibn=draw(st.sampled_from([None, "a", "b"])), pretrained=draw(st.sampled_from([None, "imagenet"])),
        amp=draw(st.sampled_from(["auto", "on", "off"])), device=draw(st.sampled_from([None, "cpu"])),
        freeze_backbone_bn=draw(st.sampled_from(["auto", True, False])),
        qaconv_version=draw(st.sampled_from(["1", "2.1"])), combine_all=draw(st.booleans()),
        rerank=draw(st.booleans()), lr=draw(st.floats(1e-9, 10, exclude_min=False)),
        weight_decay=draw(st.floats(0, 1)), margin=draw(st.floats(1e-6, 1e6)), seed=draw(st.integers(0, 2**40)),
        max_epochs=draw(st.integers(1, 10**6)), num_instance=num_instance,
        batch_size=num_instance * draw(st.integers(2, 16)), step_factor=draw(st.floats(1e-3, 100)),
        match_memory=draw(st.floats(1e-3, 1e5)), two_stage=draw(st.integers(0, 10**9)),
    )  # fmt: skip
    recipe = draw(st.sampled_from(RECIPES))
    chosen = {k: v for k, v in values.items() if k not in ("batch_size", "num_instance") and draw(st.booleans())}
    if draw(st.booleans()):  # batch_size and num_instance together (a valid pair), or both the recipe's
        chosen.update(batch_size=values["batch_size"], num_instance=num_instance)
    return resolve_config(recipe, chosen).validate()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_a_saved_config_resolves_to_the_same_config_field_by_field(cfg):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_yaml(cfg))
        values, _ = read_config_file(path)
        again = layered_config(file=values)
    assert list(values) == list(FIELD_NAMES)
    for name in FIELD_NAMES:
        assert getattr(again, name) == getattr(cfg, name), name
        assert type(getattr(again, name)) is type(getattr(cfg, name)), name


TINY = ["--arch", "resnet18", "--ibn", "none", "--pretrained", "none", "--height", "64", "--width", "32",
        "--workers", "0", "--device", "cpu", "--fea-batch", "16", "--match-memory", "1", "--testsets", "",
        "--batch-size", "8", "--max-epochs", "1", "--neck", "16", "--margin", "2"]  # fmt: skip


def test_training_from_a_runs_config_yaml_repeats_it_bitwise(tiny_domain, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    flags = ["--dataset", tiny_domain, "--data-dir", tiny_domain.parent, *TINY]
    printed = _printed(capsys, *flags, "-o", first)
    assert not first.exists()  # --print-config trains and writes nothing
    assert main(["train", *map(str, flags), "-o", str(first)]) == 0
    saved = (first / "config.yaml").read_text()
    assert yaml.safe_load(saved) == printed
    assert _printed(capsys, "--config", first / "config.yaml") == printed  # resolved again: the same, out_dir too

    # without -o the file's out_dir holds, and a folder holding a run is refused before anything is touched
    before = (first / "checkpoint.pt").read_bytes()
    line = _error(capsys, "--config", first / "config.yaml")
    assert f"out_dir at {first / 'config.yaml'}:" in line and "-o NEW_DIR" in line and "--overwrite" in line
    assert (first / "checkpoint.pt").read_bytes() == before

    assert main(["train", "--config", str(first / "config.yaml"), "-o", str(second)]) == 0
    again = yaml.safe_load((second / "config.yaml").read_text())
    assert again == {**printed, "out_dir": str(second)}
    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (first, second))
    assert a["epoch"] == b["epoch"] == 1
    for part in ("model", "matcher", "criterion"):
        assert a[part].keys() == b[part].keys()
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)


def test_out_dir_from_a_file_unless_given_and_overwrite_stays_a_command_line_choice(tmp_path, capsys, monkeypatch):
    cfg = _write(tmp_path / "c.yaml", f"out_dir: {tmp_path / 'from_file'}\n")
    assert _printed(capsys, "--config", cfg)["out_dir"] == str(tmp_path / "from_file")
    assert _printed(capsys, "--config", cfg, "-o", tmp_path / "flag")["out_dir"] == str(tmp_path / "flag")
    assert _printed(capsys, "--config", cfg, "-o", tmp_path / "flag", f"out_dir={tmp_path / 'kv'}")["out_dir"] == str(
        tmp_path / "kv"
    )
    (tmp_path / "from_file").mkdir()
    (tmp_path / "from_file" / "metrics.jsonl").write_text("")
    calls = []
    monkeypatch.setattr("qaconv.engine.runner.train", lambda cfg, **kw: calls.append((cfg, kw)))
    assert "already holds a run (metrics.jsonl)" in _error(capsys, "--config", cfg)
    assert not calls
    assert main(["train", "--config", str(cfg), "--overwrite"]) == 0  # asked for: the runner replaces the old run
    ((called, kw),) = calls
    assert called.out_dir == str(tmp_path / "from_file") and kw["overwrite"] is True and kw["resume"] is False


def test_print_config_touches_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shown = _printed(capsys, "-o", "runs/x", "--testsets", "synth_B,synth_C")
    assert shown["out_dir"] == "runs/x" and shown["data_dir"] is None  # benchmarks under ./data, synthetic: cache
    assert list(tmp_path.iterdir()) == []
    assert set(shown) == set(FIELD_NAMES)


# --- errors: one located line ---------------------------------------------------------------------------

FILE_ERRORS = [
    ("lr: 0.01\nmax_epoch: 3\n", "c.yaml:2: unknown key 'max_epoch' (did you mean max_epochs?)"),
    ("nek: 3\n", "c.yaml:1: unknown key 'nek' (did you mean neck?)"),
    ("MODEL:\n  BACKBONE: r50\n", "c.yaml:1: unknown key 'MODEL'"),
    ("seed: 1\nlr: abc\n", "c.yaml:2: lr must be a number, got 'abc'"),
    ("max-epochs: 2.5\n", "c.yaml:1: max_epochs must be an integer, got 2.5"),
    ("seed: true\n", "c.yaml:1: seed must be an integer, got true"),
    ("rerank: maybe\n", "c.yaml:1: rerank must be true or false, got 'maybe'"),
    ("arch: resnet9\n", "c.yaml:1: arch = 'resnet9' is not one of: resnet18"),
    ("lr: [0.1, 0.2]\n", "c.yaml:1: lr takes a single value, got [0.1, 0.2]"),
    ("lr:\n", "c.yaml:1: lr must be a number, got null"),
    ("testsets:\n", "c.yaml:1: testsets needs a value ('' for none)"),
    ("dataset: yes\n", "c.yaml:1: dataset must be text, got true (quote it)"),
    ("augment: maybe\n", "c.yaml:1: augment = 'maybe' is not one of: full, flip-occlusion, none"),
    ("batch_size: 0\n", "c.yaml:1: batch_size must be > 0, got 0"),
    ("lr: .nan\n", "c.yaml:1: lr must be a finite number, got nan"),
    ("recipe: '3.0'\n", "c.yaml:1: recipe = '3.0' is not one of: 1.0"),
    ("lr: 0.1\nseed: 1\nlr: 0.2\n", "c.yaml:3: lr is set twice (first at line 1)"),
    ("max_epochs: 1\nmax-epochs: 2\n", "c.yaml:2: max_epochs is set twice (first at line 1)"),
    ("resume: true\n", "c.yaml:1: resume is not a configuration key: pass --resume on the command line"),
    ("overwrite: true\n", "c.yaml:1: overwrite is not a configuration key: pass --overwrite on the command line"),
    ("lr: [0.1\n", "c.yaml:2: not valid YAML"),
    ("- lr\n- seed\n", "c.yaml: expected 'key: value' lines, got a YAML sequence"),
    ("batch_size: 8\nnum_instance: 3\n", "batch_size (8) must be a multiple of num_instance (3)"),
]


@pytest.mark.parametrize("text, message", FILE_ERRORS)
def test_a_bad_file_gets_one_located_line(text, message, tmp_path, capsys):
    path = _write(tmp_path / "c.yaml", text)
    line = _error(capsys, "--config", path, "--print-config")
    assert line.startswith("qaconv train: error: ")
    assert message in line.replace(str(tmp_path) + "/", "")


OVERRIDE_ERRORS = [
    ("max_epoch=3", "override 'max_epoch=3': unknown key 'max_epoch' (did you mean max_epochs?)"),
    ("lr=abc", "override 'lr=abc': lr must be a number, got 'abc'"),
    ("max-epochs=5.0", "override 'max-epochs=5.0': max_epochs must be an integer, got 5.0"),
    ("rerank=2", "override 'rerank=2': rerank must be true or false, got 2"),
    ("freeze_backbone_bn=sometimes", "freeze_backbone_bn must be true, false or auto, got 'sometimes'"),
    ("sampler=random", "override 'sampler=random': sampler = 'random' is not one of: graph, pk, shuffle"),
    ("lr=", "override 'lr=': lr must be a number, got ''"),
    ("resume=true", "resume is not a configuration key: pass --resume on the command line"),
    ("print-config=true", "print-config is not a configuration key: pass --print-config on the command line"),
    ("synth_A", "override 'synth_A': expected KEY=VALUE"),
    ("=3", "override '=3': expected KEY=VALUE"),
]


@pytest.mark.parametrize("item, message", OVERRIDE_ERRORS)
def test_a_bad_override_gets_one_located_line(item, message, capsys):
    assert message in _error(capsys, item, "--print-config")


def test_missing_or_unreadable_config_files(tmp_path, capsys):
    assert "config file " in _error(capsys, "--config", tmp_path / "none.yaml", "--print-config")
    assert "is not a file" in _error(capsys, "--config", tmp_path, "--print-config")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00lr")
    assert "is not a text (YAML) file" in _error(capsys, "--config", tmp_path / "bin.yaml", "--print-config")
    assert _printed(capsys, "--config", _write(tmp_path / "empty.yaml", "# nothing\n")) == _printed(capsys)


def test_config_and_print_config_do_not_combine_with_resume(tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", "lr: 0.01\n")
    assert "--config does not combine with --resume" in _error(capsys, "--config", cfg, "--resume", "-o", tmp_path)
    assert "--print-config does not combine with --resume" in _error(capsys, "--print-config", "--resume")


def test_library_errors_are_qaconv_errors(tmp_path):
    with pytest.raises(QAConvError, match="unknown key 'lrr'"):
        parse_overrides(["lrr=1"])
    with pytest.raises(QAConvError, match=r"x\.yaml:1: neck must be >= 0"):
        read_config_file(_write(tmp_path / "x.yaml", "neck: -1\n"))
