"""Loading experiment configs outside absl flags (scripts, tests, notebooks, other configs)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'experiments/configs/x.py:arg'`` -> that file's ``get_config(arg)``, as ``--config=`` would.

  A relative path is read from the working directory, else from the repository root.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(_REPO_ROOT, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {spec.partition(':')[0]!r} not found (cwd or {_REPO_ROOT})")
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def config_module(path: str):
  """The config file at ``path`` as a module (for configs that reuse another config's helpers)."""
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module
