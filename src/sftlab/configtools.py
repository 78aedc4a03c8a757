"""Typed dataclass configs from plain dicts: strict keys, type checks, key=value overrides, docs.

This module imports nothing heavy, so a bad config fails in milliseconds, before torch loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem, with the key that has it and what to do about it."""


def doc(help: str, **kw) -> Any:
    """A dataclass field with a help text (shown by `sftlab config --show` and --help)."""
    if "default_factory" not in kw and "default" not in kw:
        raise TypeError("doc() needs a default or default_factory")
    return dataclasses.field(metadata={"help": help}, **kw)


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        k, v = get_args(tp)
        return f"mapping {_type_name(k)} -> {_type_name(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against annotation `tp`; return it converted (int -> float, dict -> dataclass)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}{hint}")
        return value
    if origin in (list, tuple):
        (item_tp,) = get_args(tp)[:1]
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            if dataclasses.is_dataclass(item_tp) and isinstance(value, dict):
                value = [value]  # one section where a list is expected: accept it
            elif item_tp is str and isinstance(value, str):
                value = [value]
            else:
                raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping of keys), got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:  # YAML reads 1e-4 as a string (no dot): accept scientific notation
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is dict:  # free-form options (arena.method_options.lora): checked where they are used
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


# Names other tools use for our fields: a miss on one of these suggests ours.
ALIASES = {"learning_rate": "lr", "lr_rate": "lr", "rank": "r", "lora_r": "r", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "max_seq_length": "max_length", "max_seq_len": "max_length",
           "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "num_train_epochs": "epochs", "max_steps": "steps", "warmup_ratio": "warmup", "warmup_steps": "warmup",
           "lr_scheduler_type": "schedule", "output": "output_dir", "model_name_or_path": "path"}


def suggest(key: str, allowed) -> str | None:
    allowed = list(allowed)
    if ALIASES.get(key) in allowed:
        return ALIASES[key]
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return close[0] if close else None


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from `data`, refusing unknown keys with a suggestion."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = suggest(str(key), fields)
            hint = f"; did you mean {close!r}?" if close else ""
            raise ConfigError(f"{full}: unknown key{hint} (allowed: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(f"{prefix}.{msg}" if prefix and not msg.startswith(prefix) else msg) from None
    return obj


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place.

    A number indexes a list (`data.train.0.path=x`); a path that runs into a value which is not a section
    (`train.lr.x=1`), past a list's end or into an unset list is refused with the fix, before the value is
    type-checked against the config's fields."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write it as key.path=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: the key {key.strip()!r} has an empty part; write "
                              "key.path=value with dots only between names, e.g. train.lr=1e-4")
        node: Any = data
        for i, part in enumerate(parts):
            here = ".".join(parts[:i])  # the node we are in (never the root: that is a dict)
            last = i == len(parts) - 1
            if isinstance(node, list):
                index = _list_index(node, part, here, item)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                    break
                nxt = node.get(part)
                if nxt is None:
                    if parts[i + 1].isdigit():
                        at = ".".join(parts[: i + 1])
                        raise ConfigError(f"override {item!r}: {at} is not set, so it has no entry {parts[i + 1]}; "
                                          f"set the whole list, e.g. {at}=[...]")
                    nxt = node[part] = {}
                node = nxt
            else:
                raise ConfigError(f"override {item!r}: {here} is {_kind(node)} ({node!r}), not a section, so it has "
                                  f"no key {part!r}; set it directly, e.g. {here}=...")
    return data


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


def _list_index(node: list, part: str, here: str, item: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"override {item!r}: {here} is a list; name an entry by its position, e.g. "
                          f"{here}.0 (not {part!r})")
    index, n = int(part), len(node)
    if index >= n:
        has = "is an empty list" if not n else "has 1 entry (index 0)" if n == 1 else f"has {n} entries (0..{n - 1})"
        raise ConfigError(f"override {item!r}: {here} {has}; to add one, set the whole list, e.g. {here}=[...]")
    return index


def describe(cls, prefix: str = "", indent: int = 0) -> list[str]:
    """One line per field: key, type, default and help (nested sections indented)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        pad = "  " * indent
        help_ = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            lines.append(f"{pad}{key}:  {help_}")
            lines.extend(describe(tp, f"{key}.", indent + 1))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        lines.append(f"{pad}{key} ({_type_name(tp)}, default {to_dict(default)!r}): {help_}")
        inner = get_args(tp)[0] if get_origin(tp) in (list, tuple) else None
        if inner is not None and dataclasses.is_dataclass(inner):
            lines.extend(describe(inner, f"{key}[].", indent + 1))
    return lines


def check(cond: bool, key: str, message: str) -> None:
    """Raise a ConfigError for `key` when `cond` is false (used in __post_init__)."""
    if not cond:
        raise ConfigError(f"{key}: {message}")
