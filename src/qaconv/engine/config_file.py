"""Training configuration from a YAML file and ``KEY=VALUE`` overrides, layered FastReID-style:

    recipe preset < config file < explicit command-line options < KEY=VALUE overrides

Values from a file or an override are parsed as the matching command-line option parses its text, then
validated by :meth:`TrainConfig.validate`; every error is one line naming where the value came from
(``FILE:LINE`` or the override as written). Keys may be written with ``_`` or ``-``."""

from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path

import yaml

from ..errors import QAConvError
from ..recipes import DEFAULT_RECIPE, RECIPE_KEYS, RECIPES, load_recipe
from .config import FIELD_NAMES, TrainConfig, from_dict

# command-line choices that are not part of a configuration: refused as keys, with the option to use
RUN_CONTROL = {
    "resume": "--resume",
    "overwrite": "--overwrite",
    "config": "--config",
    "print_config": "--print-config",
}
_TYPES = {f.name: f.type for f in fields(TrainConfig)}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_BOOL_TEXT = ("amp", "augment")  # text options that read true/false (YAML on/off) as on/off, full/none


def _key(raw, where: str) -> str:
    """``raw`` as a field name ('-' read as '_'); unknown names refused with the closest known one."""
    if not isinstance(raw, str) or not raw.strip():
        raise QAConvError(f"{where}: a key must be a name, got {raw!r}")
    key = raw.strip().replace("-", "_")
    if key in RUN_CONTROL:
        raise QAConvError(f"{where}: {raw} is not a configuration key: pass {RUN_CONTROL[key]} on the command line")
    if key not in FIELD_NAMES:
        close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else " (qaconv train --print-config lists every key)"
        raise QAConvError(f"{where}: unknown key {raw!r}{hint}")
    return key


def coerce(name: str, value, text: str | None = None):
    """``value`` (YAML-parsed) as option ``--name`` would take it: number text to a number, true/false
    words to booleans; ``text``, the command line's own spelling, is kept for text options (``1501``
    stays the string '1501'). Wrong types raise :class:`QAConvError` naming ``name``; ranges and choices
    are left to :meth:`TrainConfig.validate`."""
    kind = _TYPES[name]
    if isinstance(value, (dict, list)):
        raise QAConvError(f"{name} takes a single value, got {value!r}")
    if kind in ("int", "float"):
        if isinstance(value, str):
            try:
                value = int(value) if kind == "int" else float(value)
            except ValueError:
                what = "an integer" if kind == "int" else "a number"
                raise QAConvError(f"{name} must be {what}, got {value!r}") from None
        if isinstance(value, bool) or value is None or (kind == "int" and not isinstance(value, int)):
            what = "an integer" if kind == "int" else "a number"
            raise QAConvError(f"{name} must be {what}, got {_show(value)}")
        return value
    if kind in ("bool", "str | bool"):
        if kind == "str | bool" and value == "auto":
            return value
        if isinstance(value, bool):
            return value
        word = str(value).lower() if isinstance(value, (str, int)) else None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        allowed = "true, false or auto" if kind == "str | bool" else "true or false"
        raise QAConvError(f"{name} must be {allowed}, got {_show(value)}")
    # text options
    if value is None:
        if kind == "str | None":
            return None
        raise QAConvError(f"{name} needs a value" + (" ('' for none)" if name == "testsets" else ""))
    if isinstance(value, bool):
        if name in _BOOL_TEXT:
            return value
        if text is None:
            raise QAConvError(f"{name} must be text, got {_show(value)} (quote it)")
    if isinstance(value, str):
        return value
    return text if text is not None else str(value)


def _show(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def _parsed(key: str, value, where: str, text: str | None = None):
    """``value`` parsed (:func:`coerce`), in its canonical form (``ibn: none`` -> None, ``margin: 2`` -> 2.0)
    and checked on its own (choice, type, range) as the option would be; an error names ``where``."""
    try:
        value = getattr(TrainConfig(**{key: coerce(key, value, text)}).validate(only=(key,)), key)
    except QAConvError as exc:
        raise QAConvError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise QAConvError(f"{where}: bad value for {key}: {exc}") from None
    return value


def read_config_file(path: str | Path) -> tuple[dict, dict]:
    """A configuration file's values (a run's ``config.yaml``, a recipe preset, or any subset of the keys)
    and, per key, where it was set (``FILE:LINE``). Each value is parsed and checked on its own; unknown
    or repeated keys, bad values and wrong types raise one located :class:`QAConvError`."""
    path = Path(path)
    if not path.is_file():
        raise QAConvError(f"config file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except UnicodeDecodeError:
        raise QAConvError(f"{path} is not a text (YAML) file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise QAConvError(f"{path}{line}: not valid YAML: {problem}") from None
    if root is None:
        return {}, {}
    if not isinstance(root, yaml.MappingNode):
        raise QAConvError(f"{path}: expected 'key: value' lines, got a YAML {root.id}")
    values, where = {}, {}
    loader = yaml.SafeLoader("")
    for key_node, value_node in root.value:
        at = f"{path}:{key_node.start_mark.line + 1}"
        try:
            raw = loader.construct_object(key_node, deep=True)
            value = loader.construct_object(value_node, deep=True)
        except yaml.YAMLError as exc:
            raise QAConvError(f"{at}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
        key = _key(raw, at)
        if key in values:
            raise QAConvError(f"{at}: {key} is set twice (first at line {where[key].rsplit(':', 1)[1]})")
        values[key], where[key] = _parsed(key, value, at), at
    return values, where


def parse_overrides(items: list[str]) -> tuple[dict, dict]:
    """``KEY=VALUE`` items: each value read as a YAML scalar (``lr=0.01`` a float, ``rerank=true`` a
    boolean; text options keep the text as written), then parsed and checked as the option would be.
    A later item for the same key wins, as a repeated option does."""
    values, where = {}, {}
    for item in items:
        at = f"override {item!r}"
        name, eq, text = item.partition("=")
        if not eq or not name.strip():
            raise QAConvError(f"{at}: expected KEY=VALUE (e.g. lr=0.01 or max-epochs=5)")
        key = _key(name, at)
        text = text.strip()
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        if _TYPES[key].startswith("str") and not (value is None or isinstance(value, str)):
            # a text option takes the text as written (dataset=1501, testsets=[a]), amp/augment true/false
            value = value if isinstance(value, bool) and key in _BOOL_TEXT else text
        values[key], where[key] = _parsed(key, value, at, text), at
    return values, where


def preset_of(values: dict) -> str | None:
    """The shipped recipe whose every value ``values`` sets unchanged (a recipe preset file), if any."""
    if "recipe" in values or not set(RECIPE_KEYS) <= set(values):
        return None
    given = TrainConfig(**{k: values[k] for k in RECIPE_KEYS}).to_dict()
    for name in RECIPES:
        preset = TrainConfig(**load_recipe(name)).to_dict()
        if all(given[k] == preset[k] for k in RECIPE_KEYS):
            return name
    return None


def layered_config(
    recipe: str | None = None,
    file: dict | None = None,
    options: dict | None = None,
    overrides: dict | None = None,
    file_name: str = "the config file",
) -> TrainConfig:
    """One configuration from the layers, lowest first: the recipe preset, ``file`` (values from
    :func:`read_config_file`), ``options`` (explicit command-line options) and ``overrides`` (from
    :func:`parse_overrides`). The preset is the file's ``recipe`` (or, for a preset file, the recipe it is),
    else ``recipe`` (``--recipe``) or ``overrides['recipe']``, else 2.1; a command-line recipe that
    contradicts the file's is refused, since the file's values would sit above it. Validated as a whole."""
    file, options, overrides = dict(file or {}), dict(options or {}), dict(overrides or {})
    options.pop("recipe", None)
    asked = overrides.pop("recipe", None) or recipe
    named, preset = file.pop("recipe", None), preset_of(file)
    if asked and (named or preset) and str(asked) != str(named or preset):
        which = f"sets recipe {named}" if named else f"is the {preset} preset"
        raise QAConvError(
            f"the command line's recipe {asked} contradicts {file_name}, which {which}: the file's values would sit "
            f"above recipe {asked} and hide it; drop the command line's recipe"
            + (" or the file's recipe line" if named else "")
        )
    named = named or preset
    chosen = str(asked or named or DEFAULT_RECIPE)
    values = {**TrainConfig().to_dict(), **load_recipe(chosen), **file, **options, **overrides, "recipe": chosen}
    return from_dict(values).validate()


def config_yaml(cfg: TrainConfig | dict) -> str:
    """The text of a run's ``config.yaml`` (what ``--print-config`` prints)."""
    return yaml.safe_dump(cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg, sort_keys=False)


__all__ = ["RUN_CONTROL", "coerce", "config_yaml", "layered_config", "parse_overrides", "preset_of",
           "read_config_file"]  # fmt: skip
