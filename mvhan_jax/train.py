"""The training loop: one top-to-bottom ``train_and_evaluate`` for every model of the library.

What differs between models lives in a *task* (`mvhan_jax/tasks/`): retrieval (two-tower, MIND,
ComiRec, multi-tower, MV-HAN / MV-DNN), ranking (HiNet, shared-bottom, MMoE, PLE, STAR) and SEMINAR.
A task turns a config into one or more `Stage`s (SEMINAR: PSU pretraining, then finetuning) and
finishes the run (final evaluation of the best checkpoint, ScaNN index, PQ codebooks). This module
owns everything the stages share, in big_vision's order: set up the mesh, create the state inside
``jit`` with its output shardings, load the checkpoint, the input pipeline (per-process Grain shards
assembled into global batches), the loop (log, evaluate, select the best step, stop early, save),
and the end of the stage.

Exact resumption: the batch of step ``i`` is a pure function of ``(seed, i)`` (a random-access Grain
dataset) and every random draw of step ``i`` uses ``fold_in(key, i)``, so a run restored from its
checkpoint at step ``s`` replays steps ``s+1..`` exactly as an uninterrupted run would.

Preemption: SIGTERM (what cloud TPU/GPU schedulers send before they take a machine) makes the loop
save the latest checkpoint at the next step boundary and raise `Preempted`; the CLI exits with
status 143, and rerunning the same command resumes.

Divergence: a NaN model would score perfectly (a NaN target score compares false with every other
score, so it ranks first). A non-finite training loss (at a log step or a save point), a non-finite
state (at a save point, before anything is evaluated or saved) or non-finite vectors or scores in
the validation (`evaluation.NonFiniteError`) make the loop raise `Diverged` without saving, so the
newest checkpoint is the last finite one; the CLI exits with status 1.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import sys
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from mvhan_jax import artifacts
from mvhan_jax import configs
from mvhan_jax import evaluation
from mvhan_jax import host_memory
from mvhan_jax import sharding
from mvhan_jax import sparse
from mvhan_jax import workdir as wd
from mvhan_jax.data import pipeline
from mvhan_jax.metrics_writer import MetricsWriter


class Preempted(Exception):
  """The run received SIGTERM and saved its latest checkpoint: rerun the same command to resume."""


class Diverged(Exception):
  """The training loss, the state or the validation's vectors became NaN / inf: the run stopped
  without saving that step, so its latest checkpoint (if any) is the last finite one."""


# --------------------------------------------------------------------------------------------------
# State and optimizer
# --------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Task state that is neither parameter nor optimizer state (SEMINAR: the PQ codebooks); None if none.
  extra: Any = None


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation | sparse.SparseTableAdamW:
  """AdamW with warmup + cosine / constant schedule and global-norm clipping.

  ``cfg.sparse_min_rows`` > 0: `sparse.SparseTableAdamW` instead, the same update for every
  parameter except the `nn.Embed` tables with at least that many rows, which are updated lazily
  (only the rows a batch looks up; mvhan_jax/sparse.py).
  ``cfg.group_pattern`` (a regular expression over `param_path`, '' = off): the parameters it matches
  train with the learning rate x ``cfg.group_lr_scale`` and the weight decay ``cfg.group_weight_decay``
  (e.g. MV-HAN's gated heads against the SASRec part they start from).
  """
  warmup = max(min(cfg.warmup_steps, total_steps - 1), 1)
  if cfg.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1),
                                            end_value=cfg.lr * cfg.final_lr_fraction)
  elif cfg.schedule == "constant":
    lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)], [warmup])
  else:
    raise ValueError(f"config.optimizer.schedule={cfg.schedule!r} is unknown: use 'cosine' or 'constant'")
  min_rows = cfg.get("sparse_min_rows", 0)
  if min_rows < 0:
    raise ValueError(f"config.optimizer.sparse_min_rows={min_rows}: use 0 (off) or a row count")
  pattern = cfg.get("group_pattern", "")
  if min_rows and pattern:
    raise configs.ConfigError("config.optimizer.group_pattern is not supported with "
                              "config.optimizer.sparse_min_rows: set one of them")
  if min_rows:
    return sparse.SparseTableAdamW(lr, cfg.weight_decay, cfg.grad_clip, min_rows)
  adamw = optax.adamw(lr, weight_decay=cfg.weight_decay)
  if pattern:
    adamw = _grouped_adamw(lr, cfg.weight_decay, pattern, cfg.get("group_lr_scale", 1.0),
                           cfg.get("group_weight_decay", cfg.weight_decay))
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
      adamw,
  )


def freeze(tx, is_frozen: Callable[[Any], bool]) -> optax.GradientTransformation:
  """``tx`` for every parameter but those whose key path ``is_frozen`` accepts, which get zero updates
  (`optax.set_to_zero`; their gradients do not reach ``tx``, so they count in no clip norm).
  Used by SEMINAR's frozen embedder (config.pretrain.freeze) and warm starts (config.warm_start.freeze)."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if is_frozen(p) else "train", params)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def param_path(path) -> str:
  """A parameter's key path as 'params/content_fel/attention_0/LayerNorm_0/scale' (dict keys joined by '/')."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _grouped_adamw(lr, weight_decay: float, pattern: str, lr_scale: float, group_decay: float):
  """AdamW whose parameters matching ``pattern`` (re.search over `param_path`) take the learning rate
  x ``lr_scale`` and the decoupled weight decay ``group_decay``; the others ``lr`` and ``weight_decay``."""
  if lr_scale <= 0 or group_decay < 0:
    raise configs.ConfigError(f"config.optimizer.group_lr_scale={lr_scale} must be > 0 and "
                              f"group_weight_decay={group_decay} >= 0")
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise configs.ConfigError(f"config.optimizer.group_pattern={pattern!r} is not a regular expression ({e}): "
                              "fix it, e.g. '(content_heads|user_mlp)'") from None

  def labels(params):
    tree = jax.tree_util.tree_map_with_path(lambda p, _: "group" if regex.search(param_path(p)) else "rest",
                                            params)
    if "group" not in jax.tree_util.tree_leaves(tree):
      paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)][:4]
      raise configs.ConfigError(f"config.optimizer.group_pattern={pattern!r} matches no parameter (paths "
                                f"look like {paths}): fix the pattern or set it to ''")
    return tree

  return optax.multi_transform(
      {"rest": optax.adamw(lr, weight_decay=weight_decay),
       "group": optax.adamw(lambda step: lr_scale * lr(step), weight_decay=group_decay)},
      labels)


def example_batch(source, batch_size: int) -> dict[str, np.ndarray]:
  """The first ``batch_size`` examples of a random-access source, stacked (shapes for ``init``)."""
  if hasattr(source, "take"):
    return source.take(np.arange(min(batch_size, len(source))))
  rows = [source[i] for i in range(min(batch_size, len(source)))]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def init_state(init_params: Callable, init_args: tuple, tx, mesh, mesh_cfg, extra: Any = None) -> TrainState:
  """Parameters and optimizer state created inside ``jit`` with their shardings on ``mesh``: a
  row-sharded table is never whole on one device (mvhan_jax/sharding.py).

  Two jits, the parameters (``init_params(*init_args)``) then the optimizer state from them: in one
  jit a table's random-number temporaries stay alive beside the Adam moments (for a 10^7 x 64 table
  on 8 CPU devices, 0.89 GiB of temporaries beside 0.89 GiB of state per device:
  `experiments/bench_scale.py --compile_only`). ``extra`` (host or device values) is replicated.
  """
  params, _ = sharding.init_sharded(init_params, mesh, mesh_cfg, *init_args)
  opt_shardings = sharding.tree_shardings(jax.eval_shape(tx.init, params), mesh, mesh_cfg)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  step = sharding.put_replicated(np.zeros((), np.int32), mesh)
  extra = sharding.put_replicated(extra, mesh) if extra is not None else None
  return TrainState(step=step, params=params, opt_state=opt_state, extra=extra)


def state_init_fn(init_params: Callable, tx, extra: Any = None) -> Callable:
  """The whole state in one function (its shapes are `init_state`'s; `abstract_state` traces it)."""
  def _init(*args):
    params = init_params(*args)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra=extra)
  return _init


def abstract_state(init_params: Callable, init_args: tuple, tx, mesh, mesh_cfg, extra: Any = None) -> TrainState:
  """`init_state`'s shapes, dtypes and shardings without computing it (a checkpoint restore target)."""
  shapes = jax.eval_shape(state_init_fn(init_params, tx, extra), *init_args)
  return sharding.abstract_with_shardings(shapes, sharding.tree_shardings(shapes, mesh, mesh_cfg))


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def checkpoint_manager(path, max_to_keep: int) -> ocp.CheckpointManager:
  """An orbax manager of ('state', 'meta') items under ``path`` (local or e.g. gs://)."""
  path = wd.path(path)
  # Barrier names carry the directory's name: in a multi-process run 'best' and 'checkpoints' save
  # the same step at an evaluation, and orbax's barriers are otherwise named by the step alone
  # ("Barrier _async_commit_complete.<step> is already ongoing").
  return ocp.CheckpointManager(
      wd.absolute(path),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=path.name)),
      item_names=("state", "meta"))


def abstract(tree):
  """ShapeDtypeStructs (with the shardings the arrays carry) of a tree: an orbax restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, tree, meta: dict, stamp: dict | None = None) -> None:
  """Saves ``tree`` and the JSON ``meta`` as checkpoint ``step``. ``stamp`` (`artifacts.provenance` of
  the run's config) goes into ``meta['artifact']`` with the step, every leaf's shape and dtype and a
  sha256 of the tree, which `restore_checkpoint` checks."""
  if stamp is not None:
    checksum, note = artifacts.tree_checksum(tree)
    meta = dict(meta, artifact=dict(stamp, format=artifacts.FORMAT, kind="checkpoint", step=int(step),
                                    leaves=artifacts.leaf_signature(tree), checksum=checksum,
                                    **({"checksum_note": note} if note else {})))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))


def _where(mngr: ocp.CheckpointManager, step: int) -> str:
  return str(wd.path(mngr.directory) / str(step))


def _damaged(mngr: ocp.CheckpointManager, step: int, reason: str) -> artifacts.ArtifactDamaged:
  where = _where(mngr, step)
  if wd.path(mngr.directory).name == "best":  # 'best' keeps one checkpoint: nothing older stands in for it
    fix = "retrain: run --mode=train with another --workdir (or delete this one first)"
  else:
    fix = f"delete {where} and rerun to continue from the previous checkpoint, or retrain"
  return artifacts.ArtifactDamaged(f"checkpoint {where} is damaged: {reason}; {fix}", reason)


def _mismatch_fix(mngr: ocp.CheckpointManager) -> str:
  directory = wd.path(mngr.directory)
  for parent in (directory.parent, directory.parent.parent):  # <workdir>/best, <workdir>/psu/checkpoints
    if (parent / "config.json").exists():
      return f"use the config it was trained with (saved in {parent / 'config.json'}) or pass another --workdir"
  return "use the config it was trained with or pass another --workdir"


def checkpoint_stamp(mngr: ocp.CheckpointManager, step: int) -> dict | None:
  """``meta['artifact']`` of checkpoint ``step`` (None for a checkpoint saved before stamps existed);
  `artifacts.ArtifactDamaged` when its meta item cannot be read."""
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # pylint: disable=broad-except  # orbax raises KeyError, JSONDecodeError, OSError...
    raise _damaged(mngr, step, f"its 'meta' item cannot be read ({artifacts.first_line(e)})") from e
  return meta.get("artifact") if isinstance(meta, dict) else None


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, target, config=None) -> tuple[Any, dict]:
  """(tree, meta) of checkpoint ``step``, restored into ``target``'s shapes and shardings.

  Before orbax reads an array, the checkpoint's stamp is compared with ``config`` (task, model, config
  hash; skipped when None) and with ``target``'s leaves (`artifacts.ArtifactMismatch`); after, the
  restored tree with the checksum saved with it (`artifacts.ArtifactDamaged`, as for files orbax
  cannot read). Checkpoints saved before stamps existed are restored unchecked.
  """
  where = _where(mngr, step)
  stamp = checkpoint_stamp(mngr, step)
  if stamp is not None:
    if config is not None:
      artifacts.check_provenance(stamp, config, where, "checkpoint", _mismatch_fix(mngr))
    diff = artifacts.signature_differences(stamp.get("leaves", {}), artifacts.leaf_signature(abstract(target)))
    if diff:
      raise artifacts.ArtifactMismatch(f"{where} does not fit the {stamp.get('model')} this config builds "
                                       f"({'; '.join(diff)}): {_mismatch_fix(mngr)}")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract(target)), meta=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except  # missing files surface as KeyError, ValueError, ...
    # Unstamped (older) checkpoints were not compared with the target first: it may not fit it either.
    what = "orbax cannot read it" if stamp is not None else "orbax cannot read it into this config's state"
    raise _damaged(mngr, step, f"{what} ({artifacts.first_line(e)})") from e
  tree, meta = restored["state"], dict(restored["meta"])
  meta.pop("artifact", None)
  if stamp is not None and stamp.get("checksum"):
    got, _ = artifacts.tree_checksum(tree, max_bytes=float("inf"))
    if got is not None and got != stamp["checksum"]:
      raise _damaged(mngr, step, "its arrays do not match the checksum saved with them")
  return tree, meta


def restore_latest(mngr: ocp.CheckpointManager, target, config=None) -> tuple[Any, dict] | None:
  """(tree, meta) of the newest intact checkpoint of ``mngr`` (None when it has none).

  Newer damaged checkpoints are moved aside to ``damaged_<step>`` (orbax ignores such names, and the
  resumed run saves those steps again) with a printed warning naming both steps; when every one is
  damaged, `artifacts.ArtifactDamaged` names them all. A checkpoint of another model or config is an
  `artifacts.ArtifactMismatch`, never skipped.
  """
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = restore_checkpoint(mngr, step, target, config)
    except artifacts.ArtifactDamaged as e:
      damaged.append((step, e))
      continue
    if damaged:
      _set_aside(mngr, [s for s, _ in damaged])
      if jax.process_index() == 0:
        print(f"warning: resuming {wd.path(mngr.directory)} from step {step}, the newest intact checkpoint, not "
              f"from step {damaged[0][0]}: " + "; ".join(f"step {s} is damaged ({e.reason})" for s, e in damaged)
              + f" (kept as {', '.join(f'damaged_{s}' for s, _ in damaged)})", file=sys.stderr, flush=True)
    return restored
  if damaged:
    raise artifacts.ArtifactDamaged(
        f"every checkpoint under {wd.path(mngr.directory)} is damaged (steps "
        f"{', '.join(str(s) for s, _ in damaged)}; step {damaged[0][0]}: {damaged[0][1].reason}); delete that "
        "directory to train from step 0, or pass another --workdir")
  return None


def _set_aside(mngr: ocp.CheckpointManager, steps) -> None:
  """Renames damaged step directories out of orbax's view (process 0; the others wait)."""
  if jax.process_index() == 0:
    for step in steps:
      src = wd.path(mngr.directory) / str(step)
      dst, n = wd.path(mngr.directory) / f"damaged_{step}", 1
      while dst.exists():
        dst, n = wd.path(mngr.directory) / f"damaged_{step}.{n}", n + 1
      src.rename(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f"mvhan_set_aside_{wd.path(mngr.directory).name}")
  mngr.reload()


def restore_params(directory, state_template: TrainState, which: str = "best", config=None) -> tuple[Any, int]:
  """(params, step) of the best-by-validation (``which='best'``) or the latest checkpoint of a stage
  directory; ``state_template``: the stage's `abstract_state` (its params for 'best'); ``config``: the
  config the caller builds the model from, checked against the checkpoint's (`restore_checkpoint`)."""
  if which == "best":
    return restore_best(directory, state_template.params, config)
  path = wd.path(directory) / "checkpoints"
  mngr = checkpoint_manager(path, 1)
  step = mngr.latest_step()
  if step is None:
    raise artifacts.ArtifactMissing(f"no checkpoint under {path}: run --mode=train with this --workdir first")
  return restore_checkpoint(mngr, step, state_template, config)[0].params, step


def restore_best(directory, target, config=None) -> tuple[Any, int]:
  """The tree saved under ``<directory>/best`` (restored into ``target``) and its step."""
  path = wd.path(directory) / "best"
  mngr = checkpoint_manager(path, 1)
  step = mngr.latest_step()
  if step is None:
    raise artifacts.ArtifactMissing(f"no checkpoint under {path}: run --mode=train with this --workdir first")
  return restore_checkpoint(mngr, step, target, config)[0], step


def best_stamp(directory, step: int) -> dict | None:
  """The stamp of ``<directory>/best`` checkpoint ``step`` (None: no such checkpoint, or one saved
  before stamps existed)."""
  mngr = checkpoint_manager(wd.path(directory) / "best", 1)
  return checkpoint_stamp(mngr, step) if step in mngr.all_steps() else None


# --------------------------------------------------------------------------------------------------
# A stage: what a task hands the loop
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Stage:
  """One training stage of a task (SEMINAR has two: PSU pretraining, then finetuning).

  The loop calls ``train_step(state, batch, consts, key)`` (a pure function that folds ``state.step``
  into ``key`` itself and returns ``(state, metrics)``), evaluates ``evaluate(best_tree(state),
  'valid')`` every ``eval_every`` steps and at the end, keeps the best tree by ``select_metric``, and
  stops after ``patience`` evaluations without improvement (0: never).
  """
  name: str                                 # '' (the workdir itself) or a sub-directory ('psu')
  config: Any                               # the run's config (mesh, logging, test hooks)
  total_steps: int
  batch_size: int                           # the global batch
  steps_per_epoch: int
  dataset: Callable[[int, int], Any]        # (shard_index, shard_count) -> Grain MapDataset of batches
  tx: Any
  init_params: Callable                     # init_params(init_key, *init_args) -> params (traced under jit)
  init_args: tuple
  train_step: Callable                      # (state, batch, consts, key) -> (state, metrics)
  consts: Any                               # replicated step inputs (feature tables, proposals)
  key: jax.Array                            # split into the init key and the step key
  extra: Any = None                         # the initial TrainState.extra
  on_start: Callable | None = None          # (state) -> state, on a fresh (not resumed) state
  evaluate: Callable | None = None          # (tree, split) -> {metric: value}
  before_eval: Callable | None = None       # (state, step) -> state (e.g. refresh PQ codebooks)
  best_tree: Callable = lambda state: state.params
  eval_every: int = 0                       # 0: only at the end
  select_metric: str | None = None
  patience: int = 0
  log_every: int = 50
  checkpoint_every: int = 100
  lr_field: str = "optimizer.lr"            # the config field `Diverged` suggests lowering
  metric_prefix: str = "train"
  tensorboard: bool = False
  shown_metric: Callable[[str], bool] = lambda k: "/" not in k


class _SigtermFlag:
  """Set by SIGTERM while a stage runs (the previous handler is restored afterwards)."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, as before
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _reshard(tree, shardings):
  """Leaves a task replaced on the host (e.g. PQ codebooks computed outside jit, the same on every
  process) put back with the state's shardings, so the pinned step accepts them."""
  def place(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(place, tree, shardings)


@jax.jit
def _all_finite(tree) -> jax.Array:
  """True when every float leaf of ``tree`` is finite: one reduction on device, replicated, so every
  process reaches the same verdict (a divergence check never leaves one process behind)."""
  ok = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(ok).all() if ok else jnp.asarray(True)


def _config_value(config, dotted: str):
  for part in dotted.split("."):
    config = config.get(part) if config is not None and hasattr(config, "get") else None
  return config


def _any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is on any (a host collective in multi-process runs)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def run_stage(stage: Stage, workdir) -> tuple[Any, dict]:
  """Trains ``stage`` in ``workdir/stage.name`` (resuming from its latest checkpoint) and returns
  (state, meta) with meta = {'best_metric', 'best_step', 'stopped_early', ...}.

  Raises `Preempted` after saving when SIGTERM arrived; raises `Diverged` without saving when the
  training loss (``metrics['loss']``, read at log steps and save points), the state (read at save
  points) or the validation's vectors or scores are not finite; returns (state, meta) with
  meta['stopped_at'] when ``config.stop_at_step`` stopped the run (a test hook); ``config.fail_at_step``
  exits the process abruptly, as a kill -9 would.
  """
  config = stage.config
  is_main = jax.process_index() == 0
  directory = wd.path(workdir) / stage.name if stage.name else wd.path(workdir)

  # Set up mesh: state sharded by config.mesh, the batch split over 'data', step inputs replicated.
  mesh = sharding.mesh_from_config(config)
  mesh_cfg = sharding.mesh_config(config)
  data_sharding = sharding.batch_sharding(mesh, stage.batch_size)
  init_key, step_key = jax.random.split(stage.key)
  state = init_state(stage.init_params, (init_key, *stage.init_args), stage.tx, mesh, mesh_cfg, stage.extra)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  train_step = sharding.pin_shardings(stage.train_step, state_shardings)
  consts, step_key = sharding.put_replicated((stage.consts, step_key), mesh)

  # Load checkpoint: the latest one, with the early-stopping state that belongs to it.
  latest = checkpoint_manager(directory / "checkpoints", 2)
  best = checkpoint_manager(directory / "best", 1) if stage.evaluate is not None else None
  meta = {"best_metric": -float("inf"), "best_step": -1, "evals_without_improvement": 0, "stopped_early": False}
  stamp = artifacts.provenance(config)
  restored = restore_latest(latest, state, config)  # falls back over damaged checkpoints, with a warning
  if restored is not None:
    state, meta = restored
    print(f"{directory}: resumed from step {int(state.step)}", flush=True)
  elif stage.on_start is not None:
    state = _reshard(stage.on_start(state), state_shardings)
  start_step = int(state.step)
  writer = MetricsWriter(directory, enabled=is_main, tensorboard=stage.tensorboard)
  writer.truncate_after(start_step)

  # Input pipeline: this process's rows of every global batch, from the step the state is at.
  dataset = stage.dataset(jax.process_index(), jax.process_count())
  batches = pipeline.iterate(dataset, start_step=start_step, prefetch=config.get("prefetch", 2))
  fail_at = config.get("fail_at_step", -1)   # tests: die like a kill -9 at this step
  stop_at = config.get("stop_at_step", -1)   # tests: save and return at this step (a preemption)
  train_time, examples_seen, t_last = 0.0, 0, time.perf_counter()
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=stage.total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0,
             desc=stage.name or None, disable=not is_main or not config.get("progress", True))
  step = start_step

  def diverged(cause: str) -> Diverged:
    latest.wait_until_finished()  # the last finite checkpoint must be complete before we leave
    if best is not None:
      best.wait_until_finished()
    bar.close()
    writer.close()
    saved = latest.latest_step()
    lr = _config_value(config, stage.lr_field)
    return Diverged(
        f"{'stage ' + repr(stage.name) if stage.name else 'training'} in {directory} diverged at step {step}: "
        f"{cause}. "
        + (f"Nothing non-finite was saved: the latest checkpoint (step {saved}) is the last finite one, and a "
           "rerun resumes from it. " if saved is not None else "No checkpoint was saved. ")
        + f"Lower config.{stage.lr_field}" + (f" (now {lr:g})" if isinstance(lr, (int, float)) else "")
        + " and rerun" + (", or start afresh in another --workdir." if saved is not None else "."))

  def require_finite(tree, loss=None, what="the state"):
    """Raises `Diverged` unless ``loss`` and every float leaf of ``tree`` are finite. A NaN model
    scores perfectly (a NaN target score compares false with every other score, so it ranks first),
    so nothing non-finite may reach an evaluation or a checkpoint."""
    loss_ok, tree_ok = (bool(x) for x in jax.device_get((_all_finite(loss), _all_finite(tree))))
    if not loss_ok:
      raise diverged(f"the training loss is {float(np.asarray(loss))}")
    if not tree_ok:
      raise diverged(f"{what} holds NaN or inf (the loss is still finite)")

  with _SigtermFlag() as sigterm:
    while step < stage.total_steps and not meta["stopped_early"]:
      batch = host_memory.ready(sharding.global_batch(next(batches), data_sharding))  # CPU: the step runs inline
      state, metrics = train_step(state, batch, consts, step_key)
      step += 1
      bar.update(1)
      if step % stage.log_every == 0 or step == stage.total_steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        row = {f"{stage.metric_prefix}/{k}": float(v) for k, v in metrics.items()}
        row[f"{stage.metric_prefix}/examples_per_sec"] = stage.log_every * stage.batch_size / max(dt, 1e-9)
        row[f"{stage.metric_prefix}/epoch"] = step / stage.steps_per_epoch
        loss = row.get(f"{stage.metric_prefix}/loss")
        if loss is not None and not math.isfinite(loss):  # before the log: no NaN curve, no TB warnings
          require_finite(None, loss)
        writer.write(step, row)
        if loss is not None:
          bar.set_postfix(loss=f"{loss:.3f}", epoch=f"{step / stage.steps_per_epoch:.1f}")
        if step > stage.log_every:  # the first window includes compilation
          train_time += dt
          examples_seen += stage.log_every * stage.batch_size
      is_eval = stage.evaluate is not None and (
          (stage.eval_every and step % stage.eval_every == 0) or step == stage.total_steps)
      preempted = _any_process(sigterm.raised) if (jax.process_count() == 1 or step % stage.log_every == 0) else False
      save = (is_eval or step % stage.checkpoint_every == 0 or step == stage.total_steps or step == stop_at
              or preempted)
      if save:
        # The loss alone is not enough: it is computed before the update, so a step whose update
        # overflows reports a finite loss and returns NaN parameters.
        require_finite(state, metrics.get("loss"))
      if is_eval:
        if stage.before_eval is not None:
          state = _reshard(stage.before_eval(state, step), state_shardings)
          require_finite(state.extra, what="the state's extra (refreshed before evaluation)")
        tree = stage.best_tree(state)
        try:
          valid = stage.evaluate(tree, "valid")
        except evaluation.NonFiniteError as e:  # finite parameters whose forward pass overflows
          raise diverged(f"the {e.detail}, although the training loss and the state are finite") from e
        writer.write(step, {f"valid/{k}": v for k, v in valid.items()})
        value = valid[stage.select_metric]
        if value > meta["best_metric"]:
          meta.update(best_metric=float(value), best_step=step, evals_without_improvement=0)
          if best.latest_step() != step:  # a run killed between this save and the 'latest' one redoes the step
            require_finite(tree, what="the best tree")
            save_checkpoint(best, step, tree, meta, stamp)
        else:
          meta["evals_without_improvement"] += 1
          if stage.patience and meta["evals_without_improvement"] >= stage.patience:
            meta["stopped_early"] = True
            logging.info("early stop at step %d: best valid %s %.4f at step %d", step, stage.select_metric,
                         meta["best_metric"], meta["best_step"])
        bar.write(f"{stage.name + ' ' if stage.name else ''}step {step}: valid "
                  + "  ".join(f"{k} {v:.4f}" for k, v in valid.items() if stage.shown_metric(k)))
      if save:
        save_checkpoint(latest, step, state, meta, stamp)
      if step == fail_at:
        latest.wait_until_finished()
        if best is not None:
          best.wait_until_finished()
        os._exit(3)  # pylint: disable=protected-access
      if step == stop_at or preempted:
        latest.wait_until_finished()
        if best is not None:
          best.wait_until_finished()
        bar.close()
        writer.close()
        if preempted:
          raise Preempted(f"SIGTERM at step {step}: saved the latest checkpoint under {directory}; rerun the "
                          "same command to resume")
        meta = dict(meta, stopped_at=step)
        return state, meta
  bar.close()
  latest.wait_until_finished()
  if best is not None:
    best.wait_until_finished()
  writer.flush()
  writer.close()
  meta = dict(meta, final_step=step,
              train_examples_per_sec=examples_seen / train_time if train_time else None)
  return state, meta


def train_and_evaluate(task, workdir) -> dict[str, Any] | None:
  """Trains every stage of ``task`` (a `mvhan_jax.tasks` plug-in; resuming from ``workdir``),
  then lets it finish the run: the best checkpoint on the validation and test splits, the index.

  Returns the results (also written to ``<workdir>/results.json``), or None when
  ``config.stop_at_step`` stopped a stage early (a test hook). `mvhan_jax.tasks.train_and_evaluate`
  builds the task from a config and calls this.
  """
  is_main = jax.process_index() == 0
  workdir = wd.path(workdir)
  if is_main:
    wd.makedirs(workdir)
    wd.write_text(workdir / "config.json", task.config.to_json_best_effort(indent=2))
  metas = {}
  for stage in task.stages(workdir):
    _, meta = run_stage(stage, workdir)
    metas[stage.name] = meta
    if "stopped_at" in meta:
      return None
  results = task.finish(workdir, metas)
  if is_main:
    wd.write_json(workdir / "results.json", results)
  return results
