"""Warm start: a retrieval run's parameters initialised from another run's best checkpoint.

``config.warm_start`` (absent or ``workdir=''``: off):
  workdir  a finished retrieval workdir (its ``best`` checkpoint is read); ``{seed}`` in it is
           replaced by ``config.seed``, so one config serves every seed of a table.
  rename   ``(pattern, replacement)`` pairs of `re.sub` applied in turn to each of the source's
           parameter paths ('params/block_0/attention/query/kernel') to name the parameter it loads
           into here; a source path that becomes '' is skipped.
  freeze   True: the loaded parameters keep their values (``optax.set_to_zero`` for them), and only
           the others train.

E.g. MV-HAN's gated model on a trained SASRec (experiments/configs/mvhan_ml100k.py, ``sasrec_init=``):
SASRec's item table, positions, block and final norm load into MV-HAN's id table, positions, causal
block and causal norm; the FEL and MLP heads start from their initialisation behind gates at 0.

Every loaded array must exist here with the same shape and dtype, and at least one must load:
otherwise a `configs.ConfigError` names the path and the fix.
"""

from __future__ import annotations

import re

import flax
import jax
import numpy as np
import optax

from mvhan_jax import configs
from mvhan_jax import train as loop
from mvhan_jax import workdir as wd


def enabled(config) -> bool:
  return bool(config.get("warm_start") and config.warm_start.get("workdir"))


def source_workdir(config) -> str:
  return str(config.warm_start.workdir).replace("{seed}", str(config.seed))


def _compile_rules(config) -> list[tuple[re.Pattern, str]]:
  rules = []
  for i, pair in enumerate(config.warm_start.get("rename", ())):
    if len(pair) != 2:
      raise configs.ConfigError(f"config.warm_start.rename[{i}]={pair!r} is not a (pattern, replacement) pair")
    try:
      rules.append((re.compile(pair[0]), pair[1]))
    except re.error as e:
      raise configs.ConfigError(f"config.warm_start.rename[{i}] pattern {pair[0]!r} is not a regular "
                                f"expression ({e}): fix it") from None
  return rules


def _source_checkpoint(config):
  """(manager, step, {path: [shape, dtype]}) of the source workdir's best checkpoint."""
  src = source_workdir(config)
  path = wd.path(src) / "best"
  mngr = loop.checkpoint_manager(path, 1) if wd.exists(path) else None
  step = mngr.latest_step() if mngr is not None else None
  if step is None:
    raise configs.ConfigError(f"config.warm_start.workdir={src!r} holds no best checkpoint ({path}): train that "
                              "run first (the config's docstring names its command) or fix the path")
  leaves = (loop.checkpoint_stamp(mngr, step) or {}).get("leaves")
  if not leaves:
    raise configs.ConfigError(f"{path}/{step} has no leaf signature (saved by an older version): retrain the "
                              "source run")
  return mngr, step, leaves


def _rename(config, paths) -> dict[str, str]:
  """{source path: path here} for the source paths the rename rules do not map to ''."""
  rules = _compile_rules(config)
  out = {}
  for source in paths:
    p = source
    for regex, repl in rules:
      p = regex.sub(repl, p)
    if p:
      out[source] = p
  return out


def source_names(config) -> set[str]:
  """The parameter paths here that the source loads into (from its checkpoint's stamp: no array read)."""
  _, _, leaves = _source_checkpoint(config)
  return set(_rename(config, leaves).values())


def load_source(config) -> dict[str, np.ndarray]:
  """{path here: array} of the source workdir's best parameters, renamed by config.warm_start.rename."""
  mngr, step, leaves = _source_checkpoint(config)
  # The restore target from the stamp's signature: shapes and dtypes, on the host.
  flat = {p: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)) for p, (shape, dtype) in leaves.items()}
  target = flax.traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in flat.items()})
  tree, _ = loop.restore_checkpoint(mngr, step, target)
  values = flax.traverse_util.flatten_dict(tree, sep="/")
  out = {here: np.asarray(values[source]) for source, here in _rename(config, values).items()}
  if jax.process_index() == 0:
    print(f"warm start: {len(out)} arrays from {wd.path(mngr.directory)} (step {step})", flush=True)
  return out


def merge(params, source: dict[str, np.ndarray], where: str = "config.warm_start"):
  """``params`` with the leaves ``source`` names replaced by its arrays (shape and dtype checked)."""
  here = {loop.param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  missing = sorted(source.keys() - here.keys())
  if missing:
    raise configs.ConfigError(
        f"{where}: the source's {missing[0]} (and {len(missing) - 1} more) has no parameter of that name here "
        f"(names here look like {sorted(here)[:3]}): fix config.warm_start.rename, or map it to '' to skip it")
  for p, x in source.items():
    if tuple(x.shape) != tuple(here[p].shape) or x.dtype != here[p].dtype:
      raise configs.ConfigError(f"{where}: {p} is {list(x.shape)} {x.dtype} there, {list(here[p].shape)} "
                                f"{here[p].dtype} here: train the source with the same sizes (dataset, dim, maxlen)")
  if not source:
    raise configs.ConfigError(f"{where}: config.warm_start.rename maps every source parameter to '': nothing loads")

  def pick(p, x):
    name = loop.param_path(p)
    return source[name] if name in source else x
  return jax.tree_util.tree_map_with_path(pick, params)


def freeze(tx, frozen_paths) -> optax.GradientTransformation:
  """``tx`` for every parameter but those in ``frozen_paths`` (`train.param_path` names), which stay put."""
  frozen_paths = set(frozen_paths)
  return loop.freeze(tx, lambda p: loop.param_path(p) in frozen_paths)


def check(config) -> None:
  """The fields of config.warm_start, checked before any data is loaded."""
  if not enabled(config):
    return
  _compile_rules(config)
  if config.optimizer.get("sparse_min_rows", 0) and config.warm_start.get("freeze", False):
    raise configs.ConfigError("config.warm_start.freeze is not supported with config.optimizer.sparse_min_rows: "
                              "set one of them")

