"""Typed config dataclasses and `--set a.b=c` overrides, for every run config.

`check_types(obj)` checks each field of a frozen dataclass against its annotation (called in
`__post_init__`); `apply_overrides(config, ["train.steps=100", ...])` parses command-line
values by the field's type. An unknown key, or a value of the wrong type, is a ValueError naming
the key and the keys (or the type) allowed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Sequence
from typing import Any


def check_types(obj: Any) -> None:
  """Checks every field of a dataclass against its annotation (int is not bool; ints are
  accepted, and stored, as floats)."""
  for f in dataclasses.fields(obj):
    hint = typing.get_type_hints(type(obj))[f.name]
    value = getattr(obj, f.name)
    ok, value = _conforms(value, hint)
    if not ok:
      raise ValueError(f"{type(obj).__name__}.{f.name}={value!r} must be {_type_name(hint)}")
    object.__setattr__(obj, f.name, value)


def _conforms(value: Any, hint: Any) -> tuple[bool, Any]:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if value is None:
      return type(None) in args, value
    return _conforms(value, next(a for a in args if a is not type(None)))
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      return False, value
    checked = [_conforms(v, args[0]) for v in value]
    return all(ok for ok, _ in checked), tuple(v for _, v in checked)
  if hint is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok, float(value) if ok else value
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool), value
  return isinstance(value, hint), value


def _type_name(hint: Any) -> str:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    inner = next(a for a in args if a is not type(None))
    return f"{_type_name(inner)} or none"
  if origin is tuple:
    return f"a list of {_type_name(args[0])} (comma-separated, or a JSON list)"
  if hint is bool:
    return "a bool (true/false)"
  return {int: "an int", float: "a float", str: "a string"}.get(hint, getattr(hint, "__name__",
                                                                             str(hint)))


_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}


def parse_value(raw: str, hint: Any, key: str) -> Any:
  """`raw` (a command-line string) as the type `hint`, or a ValueError naming `key`."""
  def bad():
    return ValueError(f"--set {key}={raw}: {key} must be {_type_name(hint)}, got {raw!r}")

  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if raw.strip().lower() in ("none", "null"):
      return None
    try:
      return parse_value(raw, next(a for a in args if a is not type(None)), key)
    except ValueError:
      raise bad() from None
  if origin is tuple:
    text = raw.strip()
    if text.startswith("["):
      try:
        items = json.loads(text)
      except json.JSONDecodeError:
        raise bad() from None
      if not isinstance(items, list):
        raise bad()
      items = [i if isinstance(i, str) else json.dumps(i) for i in items]
    else:
      items = [s.strip() for s in text.split(",")] if text else []
    try:
      return tuple(parse_value(i, args[0], key) for i in items)
    except ValueError:
      raise bad() from None
  text = raw.strip()
  if hint is bool:
    if text.lower() not in _BOOLS:
      raise bad()
    return _BOOLS[text.lower()]
  if hint is int:
    if not re.fullmatch(r"[+-]?\d+", text.replace("_", "")):
      raise bad()
    return int(text.replace("_", ""))
  if hint is float:
    try:
      return float(text)
    except ValueError:
      raise bad() from None
  if hint is str:
    return raw
  raise bad()


def _keys(obj: Any) -> list[str]:
  return sorted(f.name for f in dataclasses.fields(obj))


def _parse(obj: Any, path: list[str], raw: str, key: str, done: str = "") -> Any:
  """Checks `key` against the dataclass fields and parses `raw` by the field's type."""
  name = path[0]
  where = f"'{done}'" if done else "the run config"
  if name not in _keys(obj):
    raise ValueError(f"unknown config key {key!r}: {where} has keys {_keys(obj)}")
  hint = typing.get_type_hints(type(obj))[name]
  here = f"{done}.{name}" if done else name
  value = getattr(obj, name)
  if len(path) == 1:
    if dataclasses.is_dataclass(value):
      raise ValueError(f"config key {key!r} is a section, not a value; set one of its keys: "
                       f"{[f'{here}.{k}' for k in _keys(value)]}")
    return parse_value(raw, hint, key)
  if not dataclasses.is_dataclass(value):
    raise ValueError(f"unknown config key {key!r}: {here!r} is a value "
                     f"({_type_name(hint)}), not a section")
  return _parse(value, path[1:], raw, key, here)


def _apply(obj: Any, updates: dict[str, Any], done: str, given: dict[str, str]) -> Any:
  changes = {}
  for name, value in updates.items():
    here = f"{done}.{name}" if done else name
    changes[name] = _apply(getattr(obj, name), value, here, given) if isinstance(
        value, dict) else value
  try:
    return dataclasses.replace(obj, **changes)
  except (TypeError, ValueError) as e:
    sets = [f"{k}={v}" for k, v in given.items() if not done or k.startswith(done + ".")]
    raise ValueError(f"--set {' '.join(sets)}: {e}") from e


def apply_overrides(config: Any, sets: Sequence[str]) -> Any:
  """A run config (any frozen dataclass) with `key=value` overrides applied
  (`model.num_heads=8`, `data.tokenizer.vocab_size=512`,
  `report.prompts=["a", "b"]`); a later one of the same key wins.

  All keys and types are checked first; then each changed section is rebuilt once with all
  its changes and validates, so the order of the overrides does not matter.
  """
  updates: dict[str, Any] = {}
  given: dict[str, str] = {}
  for item in sets:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"--set expects key=value (e.g. train.steps=100), got {item!r}")
    path = key.split(".")
    value = _parse(config, path, raw, key)
    node = updates
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
    given[key] = raw
  return _apply(config, updates, "", given) if updates else config
