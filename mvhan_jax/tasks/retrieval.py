"""The retrieval task: next-item retrieval with a two-tower-shaped model (two-tower, MIND, ComiRec,
multi-tower multi-interest, MV-HAN / MV-DNN), trained by `mvhan_jax.train`'s loop.

The task supplies: the experiment (data, protocol, model, negative samplers, MV-HAN's content types),
the sampled-softmax / in-batch train step, full-corpus evaluation of the user and item vectors
(per content type with ``config.eval_per_type``), and at the end the ScaNN index (and one per content
type) with its recall against exact search. Serving (``--mode=recommend``) reads that index.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mvhan_jax import artifacts
from mvhan_jax import configs
from mvhan_jax import errors
from mvhan_jax import evaluation
from mvhan_jax import losses
from mvhan_jax import models
from mvhan_jax import precision
from mvhan_jax import retrieval
from mvhan_jax import sharding
from mvhan_jax import sparse
from mvhan_jax import train as loop
from mvhan_jax import warm_start
from mvhan_jax import workdir as wd
from mvhan_jax.data import pipeline
from mvhan_jax.data import protocol
from mvhan_jax.data import registry
from mvhan_jax.data.types import InteractionData
from mvhan_jax.metrics_writer import MetricsWriter
from mvhan_jax.train import TrainState, example_batch, make_optimizer


# --------------------------------------------------------------------------------------------------
# Experiment: data, protocol, model (shared by the train, eval, index and recommend modes)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  data: InteractionData
  split: Any                      # protocol.LeaveOneOutSplit or protocol.ComiRecSplit
  train_source: Any               # random-access source of training examples
  eval_sets: dict[str, Any]       # 'valid' / 'test' -> protocol.EvalSet
  model: Any
  tables: dict[str, dict[str, jax.Array]]
  sampler: losses.Sampler
  # Content types (MV-HAN; None for an untyped dataset): item_type int32 [I] in 1..T, their names.
  item_type: np.ndarray | None = None
  type_names: tuple[str, ...] | None = None
  # Single-type training (config.type_schedule non-empty): examples grouped by their target's type,
  # and one negative sampler per type (config.loss.negatives_per_type).
  examples_by_type: dict[int, Any] | None = None
  type_samplers: dict[int, losses.Sampler] | None = None
  evaluators: dict[str, Any] = dataclasses.field(default_factory=dict)
  # An interaction log's raw ids in dense-id order (config.dataset.name='interactions'), else None.
  raw_user_ids: list | None = None
  raw_item_ids: list | None = None


PROTOCOLS = ("leave_one_out", "comirec")
LOSSES = ("sampled_softmax", "in_batch", "full_softmax")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# config.loss.positions: train the user vector of the whole history only ('last', every model), or
# the vector of every history prefix against the item that followed it ('all': SASRec's objective;
# models with `encode_positions`). config.train_examples: every prefix of every training sequence
# ('prefixes', the default) or SASRec's non-overlapping windows (protocol.training_windows).
POSITIONS = ("last", "all")
TRAIN_EXAMPLES = ("prefixes", "windows")


def check_config(config) -> None:
  """The fields the retrieval task reads, checked before any data is loaded or folder written:
  `configs.ConfigError` naming the first bad one and the fix (a config of another task is named so)."""
  configs.check_task_fields(config, "retrieval")
  configs.check_choice(config, "dataset.name", registry.DATASETS)
  configs.check_choice(config, "protocol", PROTOCOLS)
  configs.check_choice(config, "model.name", sorted(models.MODELS))
  configs.check_choice(config, "loss.kind", LOSSES)
  configs.check_choice(config, "loss.sampler", losses.SAMPLERS)
  configs.check_choice(config, "optimizer.schedule", ("cosine", "constant"))
  if config.get("compute_dtype") is not None:
    configs.check_choice(config, "compute_dtype", COMPUTE_DTYPES)
  configs.check_min(config, ("batch_size",), meaning="training examples per step")
  configs.check_length(config)
  configs.check_min(config, ("log_every_steps",), meaning="steps between two metric logs")
  configs.check_min(config, ("checkpoint_every_steps",), meaning="steps between two checkpoints")
  configs.check_min(config, ("maxlen",), meaning="history length")
  configs.check_min(config, ("eval_every_steps",), 0, "0: evaluate at the end only")
  configs.check_min(config, ("early_stopping_patience",), 0, "0: never stop early")
  warm_start.check(config)
  if config.loss.kind == "sampled_softmax":
    configs.check_min(config, ("loss.num_negatives",), meaning="sampled negatives per step")
  if config.loss.kind == "full_softmax" and config.loss.get("negatives_per_type", False):
    raise configs.ConfigError("config.loss.kind='full_softmax' ranks every item, whatever its type: it excludes "
                              "config.loss.negatives_per_type=True (use 'sampled_softmax' for typed negatives)")
  if config.get("train_examples") is not None:
    configs.check_choice(config, "train_examples", TRAIN_EXAMPLES)
  if config.loss.get("positions") is not None:
    configs.check_choice(config, "loss.positions", POSITIONS)
    if config.loss.positions == "all" and config.loss.kind == "in_batch":
      raise configs.ConfigError("config.loss.positions='all' needs config.loss.kind='sampled_softmax' or "
                                "'full_softmax'")
  sharding.check_mesh(config)


def build_experiment(config) -> Experiment:
  check_config(config)
  data = registry.load_dataset(config)
  maxlen = config.maxlen
  if config.protocol == "leave_one_out":
    split = protocol.leave_one_out(data)
    sequences = split.train_sequences
  elif config.protocol == "comirec":
    split = protocol.comirec_split(data, seed=config.seed, maxlen=maxlen)
    sequences = split.train_sequences
  else:
    raise configs.ConfigError(f"config.protocol={config.protocol!r} is unknown: use 'leave_one_out' or 'comirec'")
  train_source = registry.train_source(config, data, split)
  eval_sets = {name: split.eval_set(name, maxlen) for name in ("valid", "test")}
  counts = np.bincount(np.concatenate([np.asarray(s) for s in sequences if len(s)]), minlength=data.num_items)
  sampler = losses.make_sampler(config.loss.sampler, counts, config.loss.get("alpha", 0.75))
  model = models.build_model(config.model, data.spec)
  if config.loss.get("positions", "last") == "all" and not getattr(model, "encodes_positions", False):
    raise configs.ConfigError(f"config.loss.positions='all' needs a model with a vector per history position "
                              f"(encode_positions: 'sasrec', or 'mvhan' with config.model.behaviour_encoder="
                              f"'causal'); {config.model.name!r} as configured has none: set "
                              "config.loss.positions='last'")
  if config.loss.kind == "full_softmax" and getattr(model, "train_equals_serve", False):
    raise configs.ConfigError(f"config.loss.kind='full_softmax' is not wired for {config.model.name!r} trained "
                              "with its serving score: use 'sampled_softmax' or another model.training")
  tables = {
      "user": {k: jnp.asarray(v) for k, v in data.user_features.items()},
      "item": {k: jnp.asarray(v) for k, v in data.item_features.items()},
  }
  exp = Experiment(config, data, split, train_source, eval_sets, model, tables, sampler)
  if config.dataset.name == "interactions":  # raw ids for `recommend` (mvhan_jax/data/logs.py)
    from mvhan_jax.data import logs  # pylint: disable=import-outside-toplevel
    folder = registry.log_folder(config)
    exp.raw_user_ids, exp.raw_item_ids = logs.raw_ids(folder, "user"), logs.raw_ids(folder, "item")
  _setup_content_types(exp, counts)
  return exp


def _setup_content_types(exp: Experiment, counts: np.ndarray) -> None:
  """MV-HAN's multi-type training: single-type batches on a schedule, negatives of the target's type.

  ``config.type_schedule``: the content types of the steps of one cycle, e.g. (1, 2, 1, 3) = source,
  target, source, target (empty: ordinary batches over all examples). ``config.loss.negatives_per_type``:
  draw a batch's negatives among the items of its type only (needs a schedule, since a batch must
  have one type). ``config.eval_per_type``: evaluate with `multitype.TypedEvaluator` (per-type metrics,
  ranking restricted to the target's type, AUC) besides the pooled ones.
  """
  from mvhan_jax.data import multitype  # pylint: disable=import-outside-toplevel
  config, data = exp.config, exp.data
  schedule = tuple(config.get("type_schedule", ()) or ())
  per_type_neg = bool(config.loss.get("negatives_per_type", False))
  per_type_eval = bool(config.get("eval_per_type", False))
  if not (schedule or per_type_neg or per_type_eval):
    return
  if "type" not in data.item_features:
    raise configs.ConfigError(f"config.type_schedule / loss.negatives_per_type / eval_per_type need content types, "
                              f"but dataset {data.name!r} has no item feature 'type': set "
                              "config.dataset.content_types='genre_family' (MovieLens) or use the synthetic world")
  if per_type_neg and not schedule:
    raise configs.ConfigError("config.loss.negatives_per_type=True needs single-type batches: set "
                              "config.type_schedule, e.g. (1, 2, 1, 3)")
  exp.item_type = np.asarray(data.item_features["type"], np.int32)
  exp.type_names = registry.content_type_names(config, data)
  if schedule:
    examples = getattr(exp.train_source, "arrays", None)
    if examples is None:
      raise configs.ConfigError("config.type_schedule needs an in-memory training source (pipeline.ArraySource)")
    exp.examples_by_type = multitype.split_examples_by_type(examples, exp.item_type)
  if per_type_neg:
    exp.type_samplers = multitype.type_samplers(counts, exp.item_type, config.loss.sampler,
                                                config.loss.get("alpha", 0.75))


def train_dataset(exp: Experiment, batch_size: int, seed: int, shard_index: int | None = None,
                  shard_count: int | None = None):
  """The random-access training batches: ``ds[i]`` is the batch of step ``i`` (a pure function of
  (seed, i)). Single-type batches carry ``content_type`` int32 [B] (all equal)."""
  if exp.examples_by_type is not None:
    from mvhan_jax.data import multitype  # pylint: disable=import-outside-toplevel
    return multitype.typed_train_batches(exp.examples_by_type, batch_size, seed,
                                         tuple(exp.config.type_schedule), shard_index=shard_index,
                                         shard_count=shard_count, type_key="content_type")
  return pipeline.train_batches(exp.train_source, batch_size, seed=seed, shard_index=shard_index,
                                shard_count=shard_count)


def num_train_examples(exp: Experiment) -> int:
  """Examples per epoch: those of the scheduled types under single-type training, else all."""
  if exp.examples_by_type is not None:
    return sum(len(exp.examples_by_type[t]) for t in set(exp.config.type_schedule))
  return len(exp.train_source)


def _params_init_fn(exp: Experiment) -> Callable:
  def _init(rng, batch):
    return exp.model.init({"params": rng, "routing": rng, "dropout": rng}, batch, exp.tables)
  return _init


def init_state(exp: Experiment, tx, rng, mesh=None) -> TrainState:
  """`mvhan_jax.train.init_state` for this experiment's model (default mesh: ``config.mesh``)."""
  mesh = mesh or sharding.mesh_from_config(exp.config)
  return loop.init_state(_params_init_fn(exp), (rng, example_batch(exp.train_source, 2)), tx, mesh,
                         sharding.mesh_config(exp.config))


def abstract_state(exp: Experiment, tx, mesh=None) -> TrainState:
  """`init_state`'s shapes, dtypes and shardings without computing it (a checkpoint restore target)."""
  mesh = mesh or sharding.mesh_from_config(exp.config)
  return loop.abstract_state(_params_init_fn(exp), (jax.random.key(0), example_batch(exp.train_source, 2)), tx,
                             mesh, sharding.mesh_config(exp.config))


# --------------------------------------------------------------------------------------------------
# Update step
# --------------------------------------------------------------------------------------------------
def make_train_step(exp: Experiment, tx) -> Callable:
  model, cfg = exp.model, exp.config.loss
  num_neg = cfg.num_negatives
  num_items = int(np.shape(exp.sampler.cdf)[0])  # the sampler spans the catalogue (exp.data may be None)
  if exp.type_samplers is not None:
    # One proposal per content type, stacked [T, I]; a batch (one type) picks its row.
    types = sorted(exp.type_samplers)
    cdfs = jnp.asarray(np.stack([exp.type_samplers[t].cdf for t in types]))
    log_qs = jnp.asarray(np.stack([exp.type_samplers[t].log_probs for t in types])) + jnp.log(float(max(num_neg, 1)))
  else:
    cdfs = jnp.asarray(exp.sampler.cdf)[None]
    log_qs = (jnp.asarray(exp.sampler.log_probs) + jnp.log(float(max(num_neg, 1))))[None]

  multi = getattr(model, "multi_interest", False)
  learned_temperature = getattr(model, "learn_temperature", False)
  # Multi-interest models may train with their serving score (train = serve, models/multitower.py)
  # and add a regulariser on the interests (aux_loss, e.g. the repel term).
  train_equals_serve = multi and hasattr(model, "score_candidates") and getattr(model, "train_equals_serve", False)
  has_aux_loss = multi and hasattr(model, "aux_loss")

  # Mixed precision (config.compute_dtype, default float32): the float parameters and feature tables
  # are cast for the forward pass (gradients reach the float32 master copy through the cast); the
  # user/item vectors are cast back to float32 before scores, softmax and losses.
  compute_dtype = jnp.dtype(exp.config.get("compute_dtype", "float32"))
  if compute_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise configs.ConfigError(f"config.compute_dtype={exp.config.compute_dtype!r}: use 'float32', 'bfloat16' or "
                              "'float16'")
  low_precision = compute_dtype != jnp.dtype(jnp.float32)

  def cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  compute_cast = exp.config.get("compute_cast", "rows")
  if compute_cast not in ("rows", "tables"):
    raise ValueError(f"config.compute_cast={compute_cast!r}: use 'rows' (tables gathered in float32, rows cast) "
                     "or 'tables' (whole tables cast first: bfloat16 scatters in the gradient; for benchmarks)")

  def loss_fn(params, batch, tables, rng):
    if low_precision and compute_cast == "tables":
      return _loss_fn(cast(params, compute_dtype), batch, cast(tables, compute_dtype), rng)
    if low_precision:
      # Tables gathered in float32 and only the rows cast: the gather's gradient stays a float32
      # scatter-add (a bfloat16 one onto Zipf-repeated rows serialises on GPUs; precision.py).
      params, tables = precision.compute_cast(params, tables, compute_dtype)
      with precision.float32_gathers(compute_dtype):
        return _loss_fn(params, batch, tables, rng)
    return _loss_fn(params, batch, tables, rng)

  all_positions = cfg.get("positions", "last") == "all"

  def all_item_vectors(params, tables, rngs):
    """config.loss.kind='full_softmax': every item's vector, once per step. [I, D] float32."""
    return model.apply(params, jnp.arange(num_items, dtype=jnp.int32), tables, True, method=model.encode_items,
                       rngs=rngs).astype(jnp.float32)

  def _all_positions_loss(params, batch, tables, rngs, rng_neg, cdf, log_q, temperature):
    """SASRec's objective: the vector of every history prefix against the item that followed it
    (`position_targets`), one sampled softmax over the B x L valid positions with shared negatives."""
    users, valid = model.apply(params, batch, tables, True, method=model.encode_positions, rngs=rngs)
    targets = position_targets(batch["history"], batch["history_len"], batch["target"])
    b, length = targets.shape
    pos_ids = targets.reshape(-1)
    flat_users = users.reshape(b * length, -1).astype(jnp.float32)
    if cfg.kind == "full_softmax":
      loss, logits = losses.full_softmax_loss(flat_users, all_item_vectors(params, tables, rngs), pos_ids,
                                              temperature)
      correct = (jnp.argmax(logits, axis=1) == pos_ids).astype(jnp.float32)
    else:
      neg_ids = losses.sample_negatives(rng_neg, cdf, num_neg)
      items = model.apply(params, jnp.concatenate([pos_ids, neg_ids]), tables, True, method=model.encode_items,
                          rngs=rngs).astype(jnp.float32)
      loss, logits = losses.sampled_softmax_loss(
          flat_users, items[: b * length], items[b * length:], pos_ids, neg_ids,
          pos_log_q=log_q[pos_ids] if cfg.logq else None,
          neg_log_q=log_q[neg_ids] if cfg.logq else None,
          temperature=temperature, remove_accidental_hits=cfg.remove_accidental_hits)
      correct = (jnp.argmax(logits, axis=1) == 0).astype(jnp.float32)
    w = valid.reshape(-1).astype(jnp.float32)
    count = jnp.maximum(w.sum(), 1.0)
    # batch_acc over the last positions only, comparable with the 'last' runs.
    last = jnp.arange(length)[None, :] == (batch["history_len"] - 1)[:, None]
    last = (last & valid).reshape(-1).astype(jnp.float32)
    aux = {"loss": jnp.sum(loss * w) / count, "batch_acc": jnp.sum(correct * last) / jnp.maximum(last.sum(), 1.0)}
    return aux["loss"], aux

  def _loss_fn(params, batch, tables, rng):
    rng_neg, rng_drop, rng_route = jax.random.split(rng, 3)
    rngs = {"dropout": rng_drop, "routing": rng_route}
    pos_ids = batch["target"]
    b = pos_ids.shape[0]
    row = batch["content_type"][0] - 1 if exp.type_samplers is not None else 0
    cdf, log_q = cdfs[row], log_qs[row]
    temperature = model.apply(params, method=model.temperature) if learned_temperature else cfg.temperature
    if all_positions:
      return _all_positions_loss(params, batch, tables, rngs, rng_neg, cdf, log_q, temperature)
    if cfg.kind == "sampled_softmax":
      neg_ids = losses.sample_negatives(rng_neg, cdf, num_neg)
      items = model.apply(params, jnp.concatenate([pos_ids, neg_ids]), tables, True, method=model.encode_items, rngs=rngs)
      items = items.astype(jnp.float32)
      pos, neg = items[:b], items[b:]
    elif cfg.kind == "in_batch":
      pos = model.apply(params, pos_ids, tables, True, method=model.encode_items, rngs=rngs).astype(jnp.float32)
    elif cfg.kind == "full_softmax":
      all_items = all_item_vectors(params, tables, rngs)  # the positives are rows of it
      pos = all_items[pos_ids]
    else:
      raise configs.ConfigError(f"config.loss.kind={cfg.kind!r} is unknown: use one of {LOSSES}")
    users = cast(model.apply(params, batch, tables, True, method=model.encode_users, rngs=rngs), jnp.float32)
    serve_scores = None
    if multi:
      interests, mask = users
      if train_equals_serve and cfg.kind == "sampled_softmax":
        # Every candidate scored as at serving time: each positive against its own user's interests
        # [B], the shared negatives against every user's [B, S] (not the [B, B] block of other users'
        # positives, which the sampled softmax never reads).
        serve_scores = (model.apply(params, interests, mask, pos, True, method=model.score_targets, rngs=rngs),
                        model.apply(params, interests, mask, neg, True, method=model.score_candidates, rngs=rngs))
      else:
        # Training readout (MIND: label-aware attention; ComiRec: the interest closest to the target).
        users = model.apply(params, interests, mask, pos, True, method=model.readout, rngs=rngs)
    if serve_scores is not None:
      loss, logits = losses.sampled_softmax_loss_from_scores(
          *serve_scores, pos_ids, neg_ids,
          pos_log_q=log_q[pos_ids] if cfg.logq else None,
          neg_log_q=log_q[neg_ids] if cfg.logq else None,
          temperature=temperature, remove_accidental_hits=cfg.remove_accidental_hits)
      correct = jnp.argmax(logits, axis=1) == 0
    elif cfg.kind == "sampled_softmax":
      loss, logits = losses.sampled_softmax_loss(
          users, pos, neg, pos_ids, neg_ids,
          pos_log_q=log_q[pos_ids] if cfg.logq else None,
          neg_log_q=log_q[neg_ids] if cfg.logq else None,
          temperature=temperature, remove_accidental_hits=cfg.remove_accidental_hits)
      correct = jnp.argmax(logits, axis=1) == 0
    elif cfg.kind == "full_softmax":
      loss, logits = losses.full_softmax_loss(users, all_items, pos_ids, temperature)
      correct = jnp.argmax(logits, axis=1) == pos_ids
    else:
      loss, logits = losses.in_batch_softmax_loss(
          users, pos, pos_ids, pos_log_q=log_q[pos_ids] if cfg.logq else None, temperature=temperature)
      correct = jnp.argmax(logits, axis=1) == jnp.arange(b)
    # Fraction of rows whose positive outscores every negative: a cheap, loss-independent signal.
    aux = {"loss": loss.mean(), "batch_acc": jnp.mean(correct)}
    if learned_temperature:
      aux["temperature"] = temperature
    if has_aux_loss:
      aux["aux_loss"] = model.apply(params, interests, mask, method=model.aux_loss, rngs=rngs)
      return loss.mean() + aux["aux_loss"], aux
    return loss.mean(), aux

  if isinstance(tx, sparse.SparseTableAdamW):
    return _sparse_train_step(tx, loss_fn)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state: TrainState, batch, tables, key):
    rng = jax.random.fold_in(key, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, tables, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def position_targets(history: jax.Array, history_len: jax.Array, target: jax.Array) -> jax.Array:
  """The item that followed each history position: ``history[b, p + 1]`` for ``p < history_len - 1``,
  ``target[b]`` at ``p = history_len - 1`` (and, masked by the loss, beyond). int [B, L]."""
  nxt = jnp.concatenate([history[:, 1:], history[:, -1:]], axis=1)
  p = jnp.arange(history.shape[1])[None, :]
  return jnp.where(p < history_len[:, None] - 1, nxt, target[:, None]).astype(history.dtype)


def _sparse_train_step(tx: sparse.SparseTableAdamW, loss_fn: Callable) -> Callable:
  """The train step with lazy row updates of the large tables (mvhan_jax/sparse.py): the loss is
  differentiated w.r.t. the other parameters and the looked-up rows, never w.r.t. a whole table."""

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state: TrainState, batch, tables, key):
    rng = jax.random.fold_in(key, state.step)
    paths = tx.paths(state.params)  # static: decided by parameter shapes at trace time
    metrics, dense_grads, rows = sparse.grads_by_rows(loss_fn, state.params, paths, batch, tables, rng)
    params, opt_state, norm = tx.update(state.step, dense_grads, rows, state.opt_state, state.params)
    metrics["grad_norm"] = norm
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


# --------------------------------------------------------------------------------------------------
# Encoding users and items for evaluation and serving
# --------------------------------------------------------------------------------------------------
# Routing-style models draw random initial logits; evaluation and serving use one fixed key so that
# a user's vectors are a deterministic function of the parameters.
_EVAL_RNGS = {"routing": 0, "dropout": 0}


@functools.lru_cache(maxsize=None)
def _jitted_encoders(model):
  def users(p, b, t):
    rngs = {k: jax.random.key(v) for k, v in _EVAL_RNGS.items()}
    out = model.apply(p, b, t, False, method=model.encode_users, rngs=rngs)
    return out if isinstance(out, tuple) else (out, jnp.ones(out.shape[:1], bool))

  items = jax.jit(lambda p, ids, t: model.apply(p, ids, t, False, method=model.encode_items))
  return jax.jit(users), items


def encode_items(exp: Experiment, params, chunk: int = 65536) -> np.ndarray:
  """All item vectors [I, D]; the last chunk wraps around so every call has the same shape."""
  _, enc = _jitted_encoders(exp.model)
  params = sharding.host_local(params)
  n = exp.data.num_items
  return evaluation.chunked_apply(lambda ids: enc(params, ids, exp.tables), n, min(chunk, n),
                                  lambda s, e: jnp.asarray(np.arange(s, s + min(chunk, n)) % n, jnp.int32))


def encode_users(exp: Experiment, params, eval_set, rows=None, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray | None]:
  """User vectors for the rows of an EvalSet (all rows, or the int array ``rows``).

  Returns (vectors, mask): [Q, D] and None for single-vector models; [Q, K, D] and the live-interest
  mask [Q, K] for multi-interest models.
  """
  enc, _ = _jitted_encoders(exp.model)
  params = sharding.host_local(params)
  rows = np.arange(len(eval_set.user)) if rows is None else np.asarray(rows)
  q = len(rows)
  size = min(chunk, q)

  def batch(s, e):
    idx = rows[np.arange(s, s + size) % q]
    return {"user": eval_set.user[idx], "history": eval_set.history[idx], "history_len": eval_set.history_len[idx]}

  vecs, masks = evaluation.chunked_apply(lambda b: enc(params, b, exp.tables), q, size, batch)
  return (vecs, masks) if vecs.ndim == 3 else (vecs, None)


def _evaluator(exp: Experiment, split: str):
  if split not in exp.evaluators:
    if exp.config.get("eval_per_type", False):
      from mvhan_jax.data import multitype  # pylint: disable=import-outside-toplevel
      ties = "pessimistic" if getattr(exp.model, "multi_interest", False) else "half"
      exp.evaluators[split] = multitype.TypedEvaluator(exp.eval_sets[split], exp.item_type,
                                                       type_names=exp.type_names, auc_ties=ties, split=split)
    else:
      exp.evaluators[split] = evaluation.EVALUATORS[exp.config.protocol](exp.eval_sets[split], split=split)
  return exp.evaluators[split]


def evaluate(exp: Experiment, params, split: str) -> dict[str, float]:
  """Metrics of ``split`` ('valid' / 'test'). With ``config.eval_per_type``, also per content type
  ('{type}/HR@50', '{type}/AUC', ... restricted to the type) and 'targets/<metric>', the mean over
  the target types 2..T (the paper's sparse types) of each per-type metric."""
  users, mask = encode_users(exp, params, exp.eval_sets[split])
  out = _evaluator(exp, split).evaluate(users, encode_items(exp, params), user_mask=mask)
  if exp.config.get("eval_per_type", False) and len(exp.type_names) > 1:
    for metric in ("HR@10", "NDCG@10", "HR@50", "AUC"):
      vals = [out.get(f"{name}/{metric}", np.nan) for name in exp.type_names[1:]]
      out[f"targets/{metric}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
  return out


def make_tx(config, total_steps: int, frozen: bool = True):
  """The run's optimizer: `train.make_optimizer`, and with config.warm_start.freeze the parameters the
  source loads into held fixed (their names from the source checkpoint's stamp). ``frozen=False``:
  without that wrapper (a template whose optimizer state is not read)."""
  tx = make_optimizer(config.optimizer, total_steps)
  if frozen and warm_start.enabled(config) and config.warm_start.get("freeze", False):
    tx = warm_start.freeze(tx, warm_start.source_names(config))
  return tx


def restore_params(workdir, exp: Experiment, which: str = "best") -> tuple[Any, int]:
  """Parameters of the best-by-validation (or latest) checkpoint, and its step. 'best' holds the
  parameters alone, so a warm-started run's source is read only for 'latest' (the optimizer state)."""
  tx = make_tx(exp.config, 1, frozen=which != "best")
  return loop.restore_params(workdir, abstract_state(exp, tx), which, exp.config)


def index_provenance(exp: Experiment, workdir, step: int) -> dict[str, Any]:
  """What an index of the parameters of ``step`` records of them (beside its step, item count and
  dimension): model, config hash and checksum of the best checkpoint of that step when the vectors
  come from it (the current config's hash otherwise), the catalogue size, the dataset."""
  stamp = loop.best_stamp(workdir, step) or {}
  out = {"dataset": exp.config.dataset.name, "model": exp.config.model.name,
         "config_hash": stamp.get("config_hash") or artifacts.config_hash(exp.config),
         "catalogue_items": int(exp.data.num_items)}
  if stamp.get("checksum"):
    out["checkpoint_checksum"] = stamp["checksum"]
  return out


def item_dim(exp: Experiment, params) -> int:
  """The width of the item vectors ``params`` produce (traced, nothing computed)."""
  _, enc = _jitted_encoders(exp.model)
  return int(jax.eval_shape(lambda p: enc(p, jnp.zeros((1,), jnp.int32), exp.tables), params).shape[-1])


def load_serving_index(exp: Experiment, workdir, params, step: int, index_dir=None):
  """The saved index (``<workdir>/index`` or ``index_dir``) after checking that it indexes the best
  checkpoint being served: same step, model, config hash (and checkpoint checksum when both are
  recorded), catalogue size and vector width; `artifacts.ArtifactMismatch` names what differs.
  `retrieval.load_index` has already checked its files against their digests."""
  index_dir = wd.path(index_dir if index_dir is not None else wd.path(workdir) / "index")
  index = retrieval.load_index(str(index_dir))
  meta, stamp = index.metadata, loop.best_stamp(workdir, step) or {}
  want_hash = stamp.get("config_hash") or artifacts.config_hash(exp.config)
  problems = []
  if index.step != step:
    problems.append(f"it was built from step {index.step}, the best checkpoint is step {step}")
  if meta.get("model", exp.config.model.name) != exp.config.model.name:
    problems.append(f"it indexes a {meta['model']} model, this config builds {exp.config.model.name}")
  if meta.get("config_hash", want_hash) != want_hash:
    problems.append(f"its config hash is {meta['config_hash']}, the checkpoint's {want_hash}")
  elif meta.get("checkpoint_checksum") and stamp.get("checksum") and meta["checkpoint_checksum"] != stamp["checksum"]:
    problems.append("it was built from another checkpoint of that step and config")
  items = meta.get("catalogue_items", None if isinstance(index, retrieval.SubsetIndex) else index.num_items)
  if items is not None and items != exp.data.num_items:
    problems.append(f"it holds {items} items, the dataset {exp.data.num_items}")
  dim = item_dim(exp, params)
  if index.dim != dim:
    problems.append(f"its vectors have dimension {index.dim}, the model's {dim}")
  if problems:
    raise artifacts.ArtifactMismatch(f"the index in {index_dir} does not match the best checkpoint "
                                     f"({'; '.join(problems)}): rebuild it with --mode=index")
  return index


def build_and_save_index(exp: Experiment, params, step: int, workdir: str) -> dict[str, Any]:
  """Indexes the item vectors, saves the index with its step and provenance (`index_provenance`),
  and measures ANN recall@10 vs exact."""
  items = encode_items(exp, params)
  cfg = retrieval.IndexConfig.for_size(items.shape[0], **{k: v for k, v in exp.config.index.items() if k != "build"})
  t0 = time.perf_counter()
  index = retrieval.build_index(items, cfg)
  build_s = time.perf_counter() - t0
  path = wd.path(workdir) / "index"
  provenance = index_provenance(exp, workdir, step)
  index.save(str(path), step=step, metadata=provenance)
  test = exp.eval_sets["test"]
  users, mask = encode_users(exp, params, test)
  out = {"backend": type(index).__name__, "path": "index", "build_seconds": build_s}
  for k in (10, 50):
    k = min(k, items.shape[0])
    ann_ids, _ = index.search(users, k, query_mask=mask)
    _, exact_ids = evaluation.exact_topk(users, items, k, query_mask=mask)
    out[f"ann_recall@{k}"] = float(retrieval.ann_recall(ann_ids, np.asarray(exact_ids)))
  if exp.item_type is not None:
    out["types"] = build_and_save_type_indexes(exp, items, users, mask, step, path, provenance)
  return out


def build_and_save_type_indexes(exp: Experiment, items, users, mask, step: int, path: str,
                                provenance: dict[str, Any] | None = None) -> dict[str, Any]:
  """MV-HAN's per-type serving: one index per content type under ``<index>/types/<name>`` (global
  item ids), and each one's ANN recall@10 against the exact top-10 among that type's items."""
  out = {}
  for t, name in enumerate(exp.type_names, start=1):
    members = np.flatnonzero(exp.item_type == t)
    if not len(members):
      continue
    cfg = retrieval.IndexConfig.for_size(len(members), **{k: v for k, v in exp.config.index.items() if k != "build"})
    index = retrieval.SubsetIndex.build(items, members, cfg)
    index.save(str(path / "types" / name), step=step,
               metadata=dict(provenance or {"dataset": exp.config.dataset.name, "model": exp.config.model.name},
                             type=name))
    k = min(10, len(members))
    ann_ids, _ = index.search(users, k, query_mask=mask)
    _, exact_local = evaluation.exact_topk(users, items[members], k, query_mask=mask)
    out[name] = {"items": int(len(members)),
                 "ann_recall@10": float(retrieval.ann_recall(ann_ids, members[np.asarray(exact_local)]))}
  return out



# --------------------------------------------------------------------------------------------------
# The task: its stage for the loop, the end of the run, and the CLI's modes
# --------------------------------------------------------------------------------------------------
class RetrievalTask:
  """Plug-in of `mvhan_jax.train` for the retrieval models (config.task = 'retrieval')."""

  name = "retrieval"

  def __init__(self, config):
    self.config = config
    self.exp = build_experiment(config)

  def stages(self, workdir):
    config, exp = self.config, self.exp
    if config.dataset.name == "interactions" and jax.process_index() == 0:
      save_id_maps(config, workdir)
    n = num_train_examples(exp)
    steps_per_epoch = n // config.batch_size
    if steps_per_epoch == 0:
      raise configs.ConfigError(f"config.batch_size={config.batch_size} exceeds the {n} training examples: lower it")
    total_steps = config.get("total_steps") or config.num_epochs * steps_per_epoch
    tx = make_tx(config, total_steps)
    on_start = None
    if warm_start.enabled(config):  # parameters from another run's best checkpoint (mvhan_jax/warm_start.py)
      source = warm_start.load_source(config)
      where = f"config.warm_start.workdir={warm_start.source_workdir(config)!r}"
      # Names, shapes and dtypes checked before anything trains (a ConfigError, no traceback).
      warm_start.merge(jax.eval_shape(_params_init_fn(exp), jax.random.key(0), example_batch(exp.train_source, 2)),
                       source, where)
      on_start = lambda state: state.replace(  # noqa: E731
          params=warm_start.merge(sharding.host_local(state.params), source, where))
    yield loop.Stage(
        name="", config=config, total_steps=total_steps, batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        dataset=lambda shard, count: train_dataset(exp, config.batch_size, config.seed, shard, count),
        tx=tx, init_params=_params_init_fn(exp), init_args=(example_batch(exp.train_source, 2),),
        train_step=make_train_step(exp, tx), consts=exp.tables, key=jax.random.key(config.seed),
        on_start=on_start, evaluate=lambda params, split: evaluate(exp, params, split),
        eval_every=config.eval_every_steps or steps_per_epoch * config.get("eval_every_epochs", 0),
        select_metric=config.select_metric,
        patience=config.early_stopping_patience, log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint_every_steps, tensorboard=config.get("tensorboard", True),
        shown_metric=lambda k: "/" not in k or k.startswith("targets/"))

  def restore_best(self, workdir):
    return restore_params(workdir, self.exp, "best")

  def evaluate(self, tree, split: str) -> dict[str, float]:
    return evaluate(self.exp, tree, split)

  def finish(self, workdir, metas) -> dict[str, Any]:
    """Final evaluation of the best-by-validation parameters, and the serving index."""
    meta = metas[""]
    params, best_step = self.restore_best(workdir)
    params = sharding.host_local(params)
    results = {"valid": self.evaluate(params, "valid"), "test": self.evaluate(params, "test"),
               "best_step": best_step, "final_step": meta["final_step"],
               "stopped_early": bool(meta["stopped_early"]),
               "train_examples_per_sec": meta["train_examples_per_sec"]}
    is_main = jax.process_index() == 0
    writer = MetricsWriter(workdir, enabled=is_main, tensorboard=self.config.get("tensorboard", True))
    writer.write(meta["final_step"], {f"test/{k}": v for k, v in results["test"].items()})
    writer.close()
    if self.config.index.build and is_main:
      results["index"] = build_and_save_index(self.exp, params, best_step, workdir)
    return results

  def format_results(self, results: dict) -> str:
    return format_table(results, self.config.model.name)


def format_table(results: dict, model_name: str) -> str:
  """The run's table: one row per split (validation, test), the metric names as columns; with
  content types, a second table of the per-type metrics (ranking restricted to the type)."""
  from mvhan_jax import tables  # pylint: disable=import-outside-toplevel
  rows = {f"{model_name} ({split})": [results[split]] for split in ("valid", "test")}
  test = results["test"]
  table = tables.mean_std_table(rows, [k for k in test if "/" not in k])
  types = [k[: -len("/queries")] for k in test if k.endswith("/queries")]
  if types:
    table += "\n\nPer content type (test users whose held-out item has the type, ranked within it):\n\n"
    table += tables.mean_std_table({t: [{m: test[f"{t}/{m}"] for m in ("queries", "HR@10", "HR@50", "AUC")}]
                                    for t in types}, ["queries", "HR@10", "HR@50", "AUC"])
  return table


class UnknownUserError(errors.UserError, ValueError):
  """A user index with nothing to recommend from: out of range, or without a test row."""


def test_row(exp, user: int) -> int:
  """The row of ``user`` (a dense index) in the test split, whose history is the serving query."""
  n = exp.data.num_users
  if not 0 <= user < n:
    raise UnknownUserError(f"--user={user} is out of range: use a dense user index in 0..{n - 1} "
                           "(MovieLens: the raw user id - 1)")
  rows = np.flatnonzero(exp.eval_sets["test"].user == user)
  if not len(rows):
    raise UnknownUserError(f"--user={user} has no test row (too few interactions to hold one out): pick "
                           f"another user in 0..{n - 1}")
  return int(rows[0])


def recommend(exp, index, params, user: int, top_n: int) -> list[tuple[int, float]]:
  """Top-N unseen items for ``user`` from the ANN index, with its whole history as the query."""
  if top_n < 1:
    raise ValueError(f"top_n={top_n}: ask for >= 1 recommendations")
  test = exp.eval_sets["test"]
  row = test_row(exp, user)
  seen = set(test.exclude_indices[test.exclude_indptr[row]:test.exclude_indptr[row + 1]].tolist())
  vec, mask = encode_users(exp, params, test, rows=[row])
  ids, scores = index.search(vec, min(top_n + len(seen), index.num_items), query_mask=mask)
  out = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in seen]
  return out[:top_n]


def save_id_maps(config, workdir) -> None:
  """An interaction log's raw-id maps (users.parquet, items.parquet) and manifest, into <workdir>/ids/,
  so that `--mode=recommend --user=<raw id>` reads the mapping the model was trained with."""
  folder = registry.log_folder(config)
  dest = wd.path(workdir) / "ids"
  dest.mkdir(parents=True, exist_ok=True)
  for name in ("users.parquet", "items.parquet", "manifest.json"):
    with open(os.path.join(folder, name), "rb") as f:
      (dest / name).write_bytes(f.read())


def dense_user(config, exp, workdir, user) -> int:
  """``--user`` as a dense index: an interaction log's raw user id (as in the file, looked up in
  <workdir>/ids/users.parquet), else the dense index itself."""
  if config.dataset.name != "interactions":
    try:
      return int(user)
    except (TypeError, ValueError):
      raise UnknownUserError(f"--user={user!r} is not a dense user index: give an integer in "
                             f"0..{exp.data.num_users - 1} (MovieLens: the raw user id - 1)") from None
  from mvhan_jax.data import logs  # pylint: disable=import-outside-toplevel
  ids = wd.path(workdir) / "ids"
  if wd.exists(ids / "users.parquet"):
    raw = [str(v) for v in logs.raw_ids(ids, "user")]
  else:
    raw = [str(v) for v in exp.raw_user_ids]
  key = str(user).strip()
  if key not in raw:
    raise UnknownUserError(f"--user={user!r} is not a user of this log (after dropping users with fewer than "
                           f"{config.dataset.get('min_events', 3)} events): give a raw id from the log's "
                           f"{config.dataset.user_column!r} column, e.g. {raw[0]!r}")
  return raw.index(key)


def print_recommendations(exp, index, params, users, top_n) -> None:
  titles = exp.data.item_titles or tuple(f"item {i}" for i in range(exp.data.num_items))
  raw_items = getattr(exp, "raw_item_ids", None)
  raw_users = getattr(exp, "raw_user_ids", None)

  def name(i):
    if raw_items is not None and str(raw_items[i]) != titles[i]:
      return f"{titles[i]} [{raw_items[i]}]"
    return titles[i]

  test = exp.eval_sets["test"]
  for user in users:
    row = test_row(exp, user)
    hist = test.history[row, : test.history_len[row]][-3:]
    target = int(test.targets[row, 0])
    label = f"User {raw_users[user]}" if raw_users is not None else f"User {user}"
    print(f"\n{label}: recently watched " + "; ".join(name(i) for i in hist))
    for rank, (item, score) in enumerate(recommend(exp, index, params, user, top_n), 1):
      mark = "  <- held-out test item" if item == target else ""
      print(f"  {rank:2d}. {name(item)}  ({score:.3f}){mark}")
