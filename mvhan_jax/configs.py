"""The config vocabulary shared by experiments/configs/*.py, scripts, tests and notebooks.

- ``parse_args``: a config file's arguments (the ``arg`` of ``--config=file.py:arg``), ``'key=value,flag'``
  -> ``{'key': 'value', 'flag': ''}``, unknown names rejected. ``format_args`` is its inverse.
- ``sibling``: another config file of the same folder as a module (a config that builds on it calls its
  ``get_config`` or helpers).
- ``load_config``: ``'path/to/config.py:arg'`` -> that config, as ``--config=`` would build it.
- ``apply_overrides``: ``['a.b=value', ...]`` set on a loaded config (the ``--override`` flag of the
  table scripts; ``--config.a.b=value`` does the same for the trainers' absl config flag).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
import importlib.util
import os
from types import ModuleType

import ml_collections

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(arg: str | None, known: Iterable[str], config_file: str) -> dict[str, str]:
  """``'model=mind,K=4,smoke'`` -> ``{'model': 'mind', 'K': '4', 'smoke': ''}``.

  ``known`` names the accepted arguments: ``'name='`` for one that takes a value, ``'name'`` for a flag
  (present or not; it maps to ``''``). ``config_file`` (usually the caller's ``__file__``) names the
  file in errors. Raises ValueError for an unknown name, a flag given a value, a value-less
  ``name=`` argument, or a name given twice: a typo must not silently start a different run.
  """
  known = tuple(known)
  valued = {k[:-1] for k in known if k.endswith("=")}
  flags = {k for k in known if not k.endswith("=")}
  where = os.path.basename(config_file)
  out: dict[str, str] = {}
  unknown = []
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, has_value, value = part.partition("=")
    if key not in valued | flags:
      unknown.append(part)
    elif key in out:
      raise ValueError(f"{where}: config arg {key!r} given twice in {arg!r}")
    elif key in flags and has_value:
      raise ValueError(f"{where}: config arg {key!r} is a flag and takes no value (got {part!r})")
    elif key in valued and not value:
      raise ValueError(f"{where}: config arg {key!r} needs a value: {key}=...")
    else:
      out[key] = value
  if unknown:
    raise ValueError(f"{where}: unknown config arg(s) {unknown}; known: {', '.join(sorted(known, key=str.lower))}"
                     " (see the file's docstring)")
  return out


def format_args(args: Mapping[str, str]) -> str:
  """The inverse of ``parse_args``: ``{'model': 'mind', 'smoke': ''}`` -> ``'model=mind,smoke'``."""
  return ",".join(k if v == "" else f"{k}={v}" for k, v in args.items())


def _module(path: str) -> ModuleType:
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def sibling(config_file: str, name: str) -> ModuleType:
  """The config file ``name`` (``'two_tower_ml100k'``) next to ``config_file`` (the caller's ``__file__``),
  as a module: ``configs.sibling(__file__, 'two_tower_ml100k').get_config('smoke')``."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name + ".py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{os.path.basename(config_file)}: no sibling config {name!r} ({path})")
  return _module(path)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'experiments/configs/x.py:arg'`` -> that file's ``get_config(arg)``, as ``--config=`` would.

  A relative path is read from the working directory, else from the repository root.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(_REPO_ROOT, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {spec.partition(':')[0]!r} not found (cwd or {_REPO_ROOT})")
  return _module(path).get_config(arg or None)


def _join_split_values(items: Iterable[str]) -> list[str]:
  """Re-joins values a comma list split inside brackets: ['m.hidden=(64', '32)'] -> ['m.hidden=(64,32)']."""
  out: list[str] = []
  for item in items:
    if out and sum(out[-1].count(c) for c in "([{") > sum(out[-1].count(c) for c in ")]}"):
      out[-1] += "," + item
    else:
      out.append(item)
  return out


def apply_overrides(cfg: ml_collections.ConfigDict, items: Iterable[str]) -> ml_collections.ConfigDict:
  """Sets ``'a.b=value'`` items on ``cfg`` (in place; returned for chaining).

  A value is read as a Python literal (``3``, ``1e-3``, ``True``, ``(64, 32)``, ``None``), else kept
  as a string; a string field always takes the text as given (``model.name=3`` stays ``'3'``).
  ml_collections checks the type (an int field refuses ``2.5``). Every field must exist: an unknown
  one (a typo) raises ValueError naming it and its parent's fields, where ``update_from_flattened_dict``
  alone would add it silently.
  """
  for item in _join_split_values(items):
    key, has_value, text = item.partition("=")
    key = key.strip()
    if not has_value or not key:
      raise ValueError(f"override {item!r}: expected 'field.path=value'")
    node, path = cfg, key.split(".")
    for i, name in enumerate(path):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        parent = ".".join(path[:i]) or "the config"
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(f"override {item!r}: {parent} has no field {name!r}"
                         + (f"; its fields: {', '.join(fields)}" if fields else f" ({parent} is not a ConfigDict)"))
      if i < len(path) - 1:
        node = node[name]
    if node.get_type(path[-1]) is str:
      value = text
    else:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text
    try:
      cfg.update_from_flattened_dict({key: value})
    except TypeError as e:  # ml_collections' type check: an int field given 2.5, ...
      raise ValueError(f"override {item!r}: {e}") from e
  return cfg
