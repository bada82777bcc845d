"""Config trees: a defaults tree as the schema, ``key=value`` overrides, typed merging with key-path errors.

The machinery behind :func:`vfm_adapters.seg.config.load_config` and
:func:`vfm_adapters.adaptation.load_adaptation_config` (each passes its own defaults
tree and checks). Rules of :func:`merge_config`:

* a non-empty mapping is a closed section: an unknown key is an error that names the
  key path and suggests the closest accepted key (difflib);
* an empty mapping is open (e.g. ``backbone_kwargs``), unless a check validates it;
* a leaf takes the type of its default: a float default accepts ints and numbers that
  PyYAML reads as strings (``1e-3``), an int default accepts integral numbers, a bool
  default only booleans, a string default only strings; ``null`` passes, to be judged
  by the caller's value rules.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Check", "ConfigError", "apply_overrides", "dataclass_options", "merge_config", "parse_overrides",
           "read_config_file", "read_source", "unknown_key_error"]

#: A check for one key path: ``(path, value) -> normalised value``; raises :class:`ConfigError`.
Check = Callable[[str, Any], Any]


class ConfigError(ValueError):
    """A training config with unknown keys or invalid values."""


def unknown_key_error(path: str, key: str, accepted: Iterable[str], what: str = "unknown key") -> ConfigError:
    """``path: unknown key; did you mean X?`` (difflib's closest accepted name), listing the accepted keys.

    Example:
        >>> print(unknown_key_error("optim.lrr", "lrr", ["lr", "betas"]))
        optim.lrr: unknown key; did you mean lr? (accepted: betas, lr)
    """
    accepted = sorted(str(a) for a in accepted)
    close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"{path}: {what}{hint} (accepted: {', '.join(accepted) or 'none'})")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML or JSON file (an empty file is an empty mapping).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / "c.yaml").write_text("optim: {lr: 1e-3}\\n")
        ...     read_config_file(Path(d) / "c.yaml")
        {'optim': {'lr': '1e-3'}}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        raw = json.loads(text)
    else:
        import yaml

        raw = yaml.safe_load(text)
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a config is a mapping of sections, got {type(raw).__name__}")
    return dict(raw)


def parse_overrides(items: Iterable[str | tuple[str, Any]] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``["optim.lr=2e-4", ...]`` -> ``[("optim.lr", 0.0002), ...]``, values parsed by ``yaml.safe_load``.

    A mapping ``{"optim.lr": 2e-4}`` or a ``(key, value)`` pair gives typed values
    unchanged (values of command-line flags).

    Example:
        >>> parse_overrides(["optim.lr=2e-4", "model.methods=[rein, lora]", "train.log_with=", "train.output_dir=runs/a"])
        [('optim.lr', 0.0002), ('model.methods', ['rein', 'lora']), ('train.log_with', None), ('train.output_dir', 'runs/a')]
    """
    if isinstance(items, Mapping):
        return [(str(k), v) for k, v in items.items()]
    import yaml

    parsed = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            parsed.append((str(item[0]), item[1]))
            continue
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=2e-4")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{key}: cannot parse the value {text!r} ({error.__class__.__name__})") from None
        if isinstance(value, str) and _as_number(value) is not None:  # YAML 1.1 reads 2e-4 as a string
            value = _as_number(value)
        parsed.append((key, value))
    return parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str | tuple[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with every dotted override set (missing mappings created; ``N`` indexes a list).

    Example:
        >>> apply_overrides({"data": {"train": [{"type": "gta5"}]}}, ["data.train.0.weight=2", "optim.lr=1e-3"])
        {'data': {'train': [{'type': 'gta5', 'weight': 2}]}, 'optim': {'lr': 0.001}}
    """
    result = copy.deepcopy(dict(raw))
    for key, value in parse_overrides(overrides):
        parts = key.split(".")
        node: Any = result
        for depth, part in enumerate(parts):
            path = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{path}: {'.'.join(parts[:depth])} is a list of {len(node)}; "
                                      f"index it with 0..{len(node) - 1}")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
                if not last and node.get(part) is None:
                    node[part] = {}
            else:
                raise ConfigError(f"{path}: {'.'.join(parts[:depth])} is a {type(node).__name__}, not a mapping")
            if last:
                node[index] = copy.deepcopy(value)
            else:
                node = node[index]
    return result


def _as_number(text: str) -> int | float | None:
    """The number a string spells (``"1e-3"``, ``"40000"``), else ``None``."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _coerce(path: str, value: Any, default: Any, kind: type | None = None) -> Any:
    """``value`` as the type of ``default`` (or ``kind``); ``null`` passes, to be judged by the value rules."""
    if value is None:
        return None
    kind = kind or (type(default) if default is not None else None)
    if kind is None:
        return copy.deepcopy(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if kind in (int, float):
        number = _as_number(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{path}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
        if kind is int:
            if isinstance(number, float) and not number.is_integer():
                raise ConfigError(f"{path}: expected an integer, got {value!r}")
            return int(number)
        return float(number)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        numeric = bool(default) and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in default)
        if not numeric:
            return copy.deepcopy(list(value))
        element = float if any(isinstance(d, float) for d in default) else None
        out = []
        for i, item in enumerate(value):
            number = _as_number(item) if isinstance(item, str) else item
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ConfigError(f"{path}[{i}]: expected a number, got {item!r}")
            out.append(float(number) if element is float else number)
        return out
    if kind is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return copy.deepcopy(dict(value))
    return copy.deepcopy(value)


def merge_config(defaults: Mapping[str, Any], raw: Mapping[str, Any], checks: Mapping[str, Check] | None = None,
                 types: Mapping[str, type] | None = None, prefix: str = "") -> dict[str, Any]:
    """``defaults`` updated by ``raw``, key by key, refusing unknown keys and wrong types.

    Args:
        defaults: The schema: non-empty mappings are closed sections, empty ones open.
        raw: The user's values (file + overrides).
        checks: Per key path, a function that validates and normalises the value
            instead of the generic rule (e.g. ``model.method_options``).
        types: Types of keys whose default is ``null``.
        prefix: The key path of ``defaults`` (used in messages).

    Example:
        >>> merge_config({"optim": {"lr": 1e-4, "betas": [0.9, 0.999]}}, {"optim": {"lr": "1e-3"}})
        {'optim': {'lr': 0.001, 'betas': [0.9, 0.999]}}
        >>> merge_config({"optim": {"lr": 1e-4}}, {"optim": {"lrr": 1}})
        Traceback (most recent call last):
        ...
        vfm_adapters.config_tree.ConfigError: optim.lrr: unknown key; did you mean lr? (accepted: lr)
    """
    checks, types = checks or {}, types or {}
    if not isinstance(raw, Mapping):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(sorted(defaults))}, got {raw!r}")
    result = copy.deepcopy(dict(defaults))
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            raise unknown_key_error(path, key, defaults, "unknown config section" if not prefix else "unknown key")
        default = defaults[key]
        if path in checks:
            result[key] = checks[path](path, value)
        elif isinstance(default, Mapping) and default:
            result[key] = merge_config(default, value if value is not None else {}, checks, types, path + ".")
        else:
            result[key] = _coerce(path, value, default, types.get(path))
    return result

def read_source(source: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of a config given as a path (YAML/JSON), a mapping or ``None`` (empty).

    Example:
        >>> read_source(None), read_source({"optim": {"lr": 1e-3}})
        ({}, {'optim': {'lr': 0.001}})
    """
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    return read_config_file(source)

def dataclass_options(path: str, config_class: type, options: Any) -> dict[str, Any]:
    """``options`` checked against a config dataclass: keys among its fields, values typed by them.

    Only the keys given are returned (the dataclass's defaults still apply when it is built).

    Example:
        >>> from vfm_adapters.adaptation.dacs import DACSConfig
        >>> dataclass_options("dacs", DACSConfig, {"threshold": "9e-1"})
        {'threshold': 0.9}
    """
    options = {} if options is None else options
    fields = {f.name: f for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else {}
    merged = merge_config({k: _field_default(f) for k, f in fields.items()}, options, prefix=f"{path}.",
                          types={f"{path}.{k}": t for k, f in fields.items() if (t := _field_type(f))})
    return {k: v for k, v in merged.items() if k in options}


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def _field_type(field: dataclasses.Field) -> type | None:
    """A plain scalar type of a dataclass field (``float``, ``int``, ``bool``, ``str``), else ``None`` (not checked)."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    annotation = str(annotation).replace(" ", "")
    for optional in ("|None", "None|"):  # ``float | None``: a float or null
        annotation = annotation.replace(optional, "")
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        annotation = annotation[len("Optional["):-1]
    return {"float": float, "int": int, "bool": bool, "str": str}.get(annotation)
