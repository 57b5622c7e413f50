"""The config vocabulary shared by experiments/configs/*.py, scripts, tests and notebooks.

- ``parse_args``: a config file's arguments (the ``arg`` of ``--config=file.py:arg``), ``'key=value,flag'``
  -> ``{'key': 'value', 'flag': ''}``, unknown names rejected. ``format_args`` is its inverse.
- ``sibling``: another config file of the same folder as a module (a config that builds on it calls its
  ``get_config`` or helpers).
- ``load_config``: ``'path/to/config.py:arg'`` -> that config, as ``--config=`` would build it.
- ``apply_overrides``: ``['a.b=value', ...]`` set on a loaded config (the ``--override`` flag of the
  table scripts; ``--config.a.b=value`` does the same for the trainers' absl config flag).
- ``check_task_fields``: the fields a task reads, present (a config of another family is named as
  such); ``check_min`` / ``check_length`` / ``check_choice``: one-field checks the tasks'
  ``check_config`` run before any data is loaded.

Every error here is a `ConfigError` (a `mvhan_jax.errors.UserError` and a ValueError): the CLI
prints its message alone, one sentence naming the field and the fix.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
import importlib.util
import os
from types import ModuleType

import ml_collections

from mvhan_jax import errors

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(errors.UserError, ValueError):
  """A config file, config arg, override or field value the user can fix; the message names it and
  the fix. A ValueError too, for callers written before it existed."""


class ConfigFileNotFoundError(errors.UserError, FileNotFoundError):
  """A config file (or a sibling it builds on) that does not exist."""


def parse_args(arg: str | None, known: Iterable[str], config_file: str) -> dict[str, str]:
  """``'model=mind,K=4,smoke'`` -> ``{'model': 'mind', 'K': '4', 'smoke': ''}``.

  ``known`` names the accepted arguments: ``'name='`` for one that takes a value, ``'name'`` for a flag
  (present or not; it maps to ``''``). ``config_file`` (usually the caller's ``__file__``) names the
  file in errors. Raises ConfigError (a ValueError) for an unknown name, a flag given a value, a value-less
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
      raise ConfigError(f"{where}: config arg {key!r} given twice in {arg!r}")
    elif key in flags and has_value:
      raise ConfigError(f"{where}: config arg {key!r} is a flag and takes no value (got {part!r})")
    elif key in valued and not value:
      raise ConfigError(f"{where}: config arg {key!r} needs a value: {key}=...")
    else:
      out[key] = value
  if unknown:
    raise ConfigError(f"{where}: unknown config arg(s) {unknown}; known: {', '.join(sorted(known, key=str.lower))}"
                     " (see the file's docstring)")
  return out


def number_arg(args: Mapping[str, str], key: str, default, config_file: str, kind=int):
  """The value of a numeric config arg (``parse_args`` output) read as ``kind`` (int or float), or
  ``default`` when absent; ConfigError naming the file and the arg when it is not a number."""
  if key not in args:
    return default
  try:
    return kind(args[key])
  except ValueError:
    what = "an integer" if kind is int else "a number"
    raise ConfigError(f"{os.path.basename(config_file)}: config arg {key}={args[key]!r} is not {what}") from None


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
    raise ConfigFileNotFoundError(f"{os.path.basename(config_file)}: no sibling config {name!r} ({path})")
  return _module(path)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'experiments/configs/x.py:arg'`` -> that file's ``get_config(arg)``, as ``--config=`` would.

  A relative path is read from the working directory, else from the repository root.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(_REPO_ROOT, path)
  if not os.path.exists(path):
    raise ConfigFileNotFoundError(f"config file {spec.partition(':')[0]!r} not found (cwd or {_REPO_ROOT})")
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
  one (a typo) raises ConfigError (a ValueError) naming it and its parent's fields, where ``update_from_flattened_dict``
  alone would add it silently.
  """
  for item in _join_split_values(items):
    key, has_value, text = item.partition("=")
    key = key.strip()
    if not has_value or not key:
      raise ConfigError(f"override {item!r}: expected 'field.path=value'")
    node, path = cfg, key.split(".")
    for i, name in enumerate(path):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        parent = ".".join(path[:i]) or "the config"
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"override {item!r}: {parent} has no field {name!r}"
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
      raise ConfigError(f"override {item!r}: {e}") from e
  return cfg


# --------------------------------------------------------------------------------------------------
# Field checks: run by each task's check_config before any data is loaded or any folder written
# --------------------------------------------------------------------------------------------------
_OPTIMIZER = ("optimizer.lr", "optimizer.weight_decay", "optimizer.schedule", "optimizer.warmup_steps",
              "optimizer.final_lr_fraction", "optimizer.grad_clip")
# The fields each task reads without a default. A config written for another task lacks some of them
# (hinet_*.py has no loss.num_negatives, two_tower_*.py no loss.task_weights): without this table the
# run would fail deep inside the task with a bare AttributeError.
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "retrieval": ("seed", "dataset.name", "protocol", "maxlen", "batch_size", "log_every_steps",
                  "eval_every_steps", "checkpoint_every_steps", "early_stopping_patience", "select_metric",
                  "model.name", "loss.kind", "loss.sampler", "loss.num_negatives", "loss.logq",
                  "loss.remove_accidental_hits", "loss.temperature", "index.build", *_OPTIMIZER),
    "ranking": ("seed", "dataset.name", "maxlen", "batch_size", "log_every_steps",
                "checkpoint_every_steps", "select_metric", "model.name", "loss.task_weights",
                "loss.scenario_weighting", *_OPTIMIZER),
    "seminar": ("seed", "dataset.name", "dataset.data_seed", "maxlen", "log_every_steps", "checkpoint_every_steps",
                "select_metric", "model.attention", "model.dim", "model.heads", "model.top_k", "model.head_dim",
                "model.alpha", "model.pq_subspaces", "model.pq_centroids", "model.pq_train_vectors",
                "pretrain.enabled", "pretrain.checkpoint", "pretrain.freeze", "pretrain.batch_size",
                "pretrain.window", "train.batch_size", "train.num_negatives", "eval.user_chunk", "eval.item_chunk",
                *_OPTIMIZER),
}
TASK_EXAMPLES = {"retrieval": "experiments/configs/two_tower_ml100k.py",
                 "ranking": "experiments/configs/hinet_ml100k.py",
                 "seminar": "experiments/configs/seminar_synthetic.py"}


def has_field(cfg, name: str) -> bool:
  """Whether the dotted field ``name`` ('loss.num_negatives') exists in ``cfg``."""
  node = cfg
  for part in name.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def field(cfg, name: str):
  node = cfg
  for part in name.split("."):
    node = node[part]
  return node


def check_task_fields(cfg, task: str) -> None:
  """ConfigError when ``cfg`` lacks a field ``task`` reads, saying which task's config it is."""
  missing = [f for f in TASK_FIELDS[task] if not has_field(cfg, f)]
  if not missing:
    return
  shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
  fits = [t for t in TASK_FIELDS if t != task and all(has_field(cfg, f) for f in TASK_FIELDS[t])]
  if fits:
    hint = (f"it is a {fits[0]} config: run it with config.task={fits[0]!r} (no --config.task override), or "
            f"start the {task} run from a {task} config such as {TASK_EXAMPLES[task]}")
  else:
    hint = f"start from a {task} config such as {TASK_EXAMPLES[task]} (the fields it reads are configs.TASK_FIELDS)"
  raise ConfigError(f"config.task={task!r} reads fields this config lacks ({shown}): {hint}")


def check_min(cfg, names: Iterable[str], minimum: int = 1, meaning: str = "") -> None:
  """ConfigError naming the first of the dotted fields ``names`` below ``minimum``."""
  for name in names:
    value = field(cfg, name)
    if not value >= minimum:  # also refuses NaN
      raise ConfigError(f"config.{name}={value!r} is invalid: set it to an integer >= {minimum}"
                        + (f" ({meaning})" if meaning else ""))


def check_length(cfg, prefix: str = "") -> None:
  """``<prefix>total_steps`` >= 0 and, when it is 0 (absent), ``<prefix>num_epochs`` >= 1."""
  node = field(cfg, prefix) if prefix else cfg
  where = f"config.{prefix}." if prefix else "config."
  total = node.get("total_steps", 0) or 0
  if total < 0:
    raise ConfigError(f"{where}total_steps={total} is invalid: set it >= 1, or 0 to train {where}num_epochs epochs")
  epochs = node.get("num_epochs")
  if not total and not (epochs is not None and epochs >= 1):
    raise ConfigError(f"{where}num_epochs={epochs!r} trains nothing: set it >= 1 (or {where}total_steps >= 1)")


def check_choice(cfg, name: str, choices: Iterable[str]) -> None:
  choices = tuple(choices)
  value = field(cfg, name)
  if value not in choices:
    raise ConfigError(f"config.{name}={value!r} is unknown: use one of {', '.join(repr(c) for c in choices)}")


# --------------------------------------------------------------------------------------------------
# MovieLens-100k configs on MovieLens-1M (config arg ``dataset=ml1m``)
# --------------------------------------------------------------------------------------------------
MOVIELENS_DATASETS = {"ml100k": "movielens_100k", "ml1m": "movielens_1m"}
# Leave-one-out training examples (sum over users of len - 3): an epoch's length.
LEAVE_ONE_OUT_EXAMPLES = {"movielens_100k": 97_171, "movielens_1m": 982_089}
ML1M_EPOCH_DIVISOR = 3  # ML-1M has 10x ML-100k's examples: a third of the epochs is still ~3.4x the steps


def set_fixed_steps(c: ml_collections.ConfigDict, args: Mapping[str, str], config_file: str) -> None:
  """Config arg ``steps=<int>``: a run of that many steps (instead of epochs), evaluated and
  checkpointed every tenth of it; nothing when the arg is absent."""
  if "steps" not in args:
    return
  steps = number_arg(args, "steps", None, config_file)
  if steps < 1:
    raise ConfigError(f"{os.path.basename(config_file)}: steps={steps} must be >= 1")
  c.total_steps = steps
  c.eval_every_steps = c.checkpoint_every_steps = max(1, steps // 10)


def set_movielens_dataset(c: ml_collections.ConfigDict, arg: str | None, config_file: str) -> ml_collections.ConfigDict:
  """Points a MovieLens-100k retrieval config at ``dataset=ml100k`` (unchanged) or ``ml1m``.

  On ML-1M (``config.dataset.name='movielens_1m'``, 3,706 items, 982,089 training examples:
  3,837 steps per epoch at batch 256) an epoch-based run trains ``ceil(num_epochs / 3)`` epochs
  (two-tower / MIND: 12 -> 4; MV-HAN: 6 -> 2) and evaluates and checkpoints every half epoch (the
  ML-100k configs: about every epoch; early-stopping patience stays 3 evaluations). A fixed-length
  run (``total_steps`` > 0, e.g. ``smoke``) keeps its cadence. Applied once, at the end of the
  config's own settings (a second call on an ML-1M config changes nothing).
  """
  if arg is None or arg == "":
    return c
  if arg not in MOVIELENS_DATASETS:
    raise ConfigError(f"{os.path.basename(config_file)}: config arg dataset={arg!r} is unknown: use "
                      f"{' or '.join(MOVIELENS_DATASETS)}")
  name = MOVIELENS_DATASETS[arg]
  if c.dataset.name == name:
    return c
  if c.dataset.name != "movielens_100k":
    raise ConfigError(f"{os.path.basename(config_file)}: dataset={arg} applies to MovieLens-100k configs, "
                      f"not to config.dataset.name={c.dataset.name!r}")
  c.dataset.name = name
  if not c.get("total_steps"):
    steps_per_epoch = -(-LEAVE_ONE_OUT_EXAMPLES[name] // c.batch_size)
    c.num_epochs = max(1, -(-c.num_epochs // ML1M_EPOCH_DIVISOR))
    c.eval_every_steps = -(-steps_per_epoch // 2)
    c.checkpoint_every_steps = c.eval_every_steps
  return c
