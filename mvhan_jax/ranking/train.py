"""The ranking trainer: multi-scenario multi-task BCE with ESMM's CTCVR, AUC / GAUC evaluation.

Sections as `mvhan_jax.train`: experiment (data, model), optimizer and state, loss and update step,
evaluation, checkpoints (resume), loop, final evaluation.

Loss. A model returns logits [B, S, T] for every (scenario, task) head. Sample b contributes only
through the heads of its own scenario s_b (the authors' code sums every head's loss over every
sample; here each head's loss is masked to its scenario's samples, so a sample never trains another
scenario's heads):
  L = sum_t w_t sum_b BCE_t(b, s_b) / B                        (``loss.scenario_weighting='sample'``)
  L = sum_s sum_t w_t mean_{b: s_b = s} BCE_t(b, s) / S'       ('scenario': every present scenario
                                                               weighs the same; S' = their number)
with BCE_ctr on pCTR = sigmoid(logit_ctr) and BCE_ctcvr on pCTCVR = pCTR * sigmoid(logit_cvr)
against click AND conversion, over every impression (the entire space, ESMM). pCVR is never
supervised on its own.

Exact resumption as in `mvhan_jax.train`: batch i is a pure function of (seed, i) and the step key is
``fold_in(key, i)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from mvhan_jax.data import pipeline
from mvhan_jax.metrics_writer import MetricsWriter
from mvhan_jax.ranking import candidates
from mvhan_jax.ranking import data as ranking_data
from mvhan_jax.ranking import metrics as ranking_metrics
from mvhan_jax.ranking import models
from mvhan_jax import train as retrieval_train
from mvhan_jax.train import TrainState, make_optimizer

EVAL_TASKS = ("ctr", "ctcvr", "cvr")


# --------------------------------------------------------------------------------------------------
# Experiment
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RankingExperiment:
  config: ml_collections.ConfigDict
  data: ranking_data.RankingData
  model: Any
  tables: dict[str, dict[str, jax.Array]]

  @property
  def train_source(self) -> pipeline.ArraySource:
    return pipeline.ArraySource(self.data.splits["train"])


def build_ranking_experiment(config, data: ranking_data.RankingData | None = None) -> RankingExperiment:
  data = data if data is not None else ranking_data.load_ranking_data(config, candidates.negative_pool(config))
  model = models.build_ranking_model(config.model, data.spec)
  tables = {"user": {k: jnp.asarray(v) for k, v in data.user_features.items()},
            "item": {k: jnp.asarray(v) for k, v in data.item_features.items()}}
  return RankingExperiment(config, data, model, tables)


FEATURE_KEYS = ("user", "item", "scenario", "history", "history_len")


def init_state(exp: RankingExperiment, tx, rng) -> TrainState:
  example = {k: v[:2] for k, v in exp.data.splits["train"].items() if k in FEATURE_KEYS}

  @jax.jit
  def _init(rng, batch):
    params = exp.model.init({"params": rng, "dropout": rng}, batch, exp.tables)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return _init(rng, example)


# --------------------------------------------------------------------------------------------------
# Loss and update step
# --------------------------------------------------------------------------------------------------
def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, accurate at both ends."""
  return jnp.where(x > -0.6931, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def head_losses(logits, click, ctcvr):
  """Per-sample, per-head BCE: logits [B, S, 2], labels [B] -> [B, S, 2] (CTR, CTCVR)."""
  ctr_logit, cvr_logit = logits[..., 0], logits[..., 1]
  y_click, y_ctcvr = click[:, None], ctcvr[:, None]
  bce_ctr = optax.sigmoid_binary_cross_entropy(ctr_logit, jnp.broadcast_to(y_click, ctr_logit.shape))
  log_p = jnp.minimum(jax.nn.log_sigmoid(ctr_logit) + jax.nn.log_sigmoid(cvr_logit), -1e-7)
  bce_ctcvr = -(y_ctcvr * log_p + (1.0 - y_ctcvr) * _log1mexp(log_p))
  return jnp.stack([bce_ctr, bce_ctcvr], axis=-1)


def masked_ranking_loss(logits, batch, task_weights, scenario_weighting: str = "sample"):
  """Scalar loss and the per-(scenario, task) mean losses [S, 2] (see the module docstring)."""
  num_scenarios = logits.shape[1]
  mask = jax.nn.one_hot(batch["scenario"], num_scenarios, dtype=bool)                  # [B, S]
  per = jnp.where(mask[..., None], head_losses(logits, batch["click"], batch["ctcvr"]), 0.0)
  count = mask.sum(0).astype(per.dtype)                                                 # [S]
  per_head = per.sum(0) / jnp.maximum(count, 1.0)[:, None]                             # [S, 2]
  w = jnp.asarray(task_weights, per.dtype)
  if scenario_weighting == "sample":
    loss = jnp.sum(per.sum(0) * w) / logits.shape[0]
  elif scenario_weighting == "scenario":
    present = (count > 0).astype(per.dtype)
    loss = jnp.sum(per_head * w * present[:, None]) / jnp.maximum(present.sum(), 1.0)
  else:
    raise ValueError(f"config.loss.scenario_weighting={scenario_weighting!r} is unknown: use 'sample' or 'scenario'")
  return loss, per_head


def make_train_step(exp: RankingExperiment, tx):
  model, cfg = exp.model, exp.config.loss

  def loss_fn(params, batch, tables, rng):
    logits = model.apply(params, batch, tables, True, rngs={"dropout": rng})
    loss, per_head = masked_ranking_loss(logits, batch, tuple(cfg.task_weights), cfg.scenario_weighting)
    return loss, {"loss": loss, "loss_ctr": per_head[:, 0].mean(), "loss_ctcvr": per_head[:, 1].mean()}

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state: TrainState, batch, tables, key):
    rng = jax.random.fold_in(key, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, tables, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics

  return train_step


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jitted_predict(model):
  return jax.jit(lambda p, b, t: models.predict(model, p, b, t))


def predict_split(exp: RankingExperiment, params, split: dict[str, np.ndarray], chunk: int = 8192) -> dict[str, np.ndarray]:
  """Own-scenario 'ctr', 'cvr', 'ctcvr' probabilities [N] for a split (fixed-size padded chunks)."""
  fn = _jitted_predict(exp.model)
  n = len(split["user"])
  size = min(chunk, n)
  out = {k: [] for k in ("ctr", "cvr", "ctcvr")}
  for s in range(0, n, size):
    idx = np.arange(s, s + size) % n
    p = fn(params, {k: split[k][idx] for k in FEATURE_KEYS}, exp.tables)
    for k in out:
      out[k].append(np.asarray(p[k])[: min(size, n - s)])
  return {k: np.concatenate(v) for k, v in out.items()}


def evaluate_predictions(split: dict[str, np.ndarray], preds: dict[str, np.ndarray],
                         scenario_names) -> dict[str, float]:
  """'{task}/{AUC|GAUC}/{scenario|all}' for task in ctr, ctcvr (entire space) and 'cvr/AUC/...' (on
  clicked impressions, label = conversion); plus 'mean/AUC/all' = mean of the ctr and ctcvr AUCs."""
  out = {}
  sc = split["scenario"]
  labels = {"ctr": split["click"], "ctcvr": split["ctcvr"]}
  groups = [("all", np.ones(len(sc), bool))] + [(name, sc == s) for s, name in enumerate(scenario_names)]
  for gname, sel in groups:
    for task in ("ctr", "ctcvr"):
      out[f"{task}/AUC/{gname}"] = ranking_metrics.auc(labels[task][sel], preds[task][sel])
      out[f"{task}/GAUC/{gname}"] = ranking_metrics.gauc(labels[task][sel], preds[task][sel], split["user"][sel])
    clicked = sel & (split["click"] > 0)
    out[f"cvr/AUC/{gname}"] = ranking_metrics.auc(split["ctcvr"][clicked], preds["cvr"][clicked])
  out["mean/AUC/all"] = (out["ctr/AUC/all"] + out["ctcvr/AUC/all"]) / 2.0
  return out


def evaluate(exp: RankingExperiment, params, split: str) -> dict[str, float]:
  data = exp.data.splits[split]
  return evaluate_predictions(data, predict_split(exp, params, data), exp.data.scenario_names)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
# The retrieval trainer's checkpoint layout: 'state' + 'meta' items, the same manager options.
_manager = retrieval_train._manager  # pylint: disable=protected-access
_abstract = retrieval_train._abstract  # pylint: disable=protected-access


def restore_params(workdir: str, exp: RankingExperiment, which: str = "best"):
  """Parameters of the best-by-validation (``which='best'``) or latest checkpoint, and its step."""
  path = os.path.join(workdir, "best" if which == "best" else "checkpoints")
  mngr = _manager(path, 1)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {path}: train with this workdir first")
  tx = make_optimizer(exp.config.optimizer, 1)
  template = jax.eval_shape(lambda: init_state(exp, tx, jax.random.key(0)))
  target = template.params if which == "best" else template
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))["state"]
  return (state if which == "best" else state.params), step


# --------------------------------------------------------------------------------------------------
# train_and_evaluate
# --------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, data: ranking_data.RankingData | None = None) -> dict[str, Any] | None:
  """Trains (resuming from ``workdir``), selects the best step by ``config.select_metric`` on the
  validation split and returns (and writes to ``results.json``) its valid and test metrics.

  ``data``: an already built `RankingData` for this config (scripts reuse it across models).
  Returns None when ``config.stop_at_step`` ends the run early (a simulated preemption).
  """
  os.makedirs(workdir, exist_ok=True)
  exp = build_ranking_experiment(config, data)
  source = exp.train_source
  steps_per_epoch = len(source) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {len(source)} training impressions: lower it")
  total_steps = config.get("total_steps") or config.num_epochs * steps_per_epoch
  eval_every = config.get("eval_every_steps") or steps_per_epoch
  logging.info("%s: %d training impressions, %d steps/epoch, %d steps", exp.data.name, len(source),
               steps_per_epoch, total_steps)

  tx = make_optimizer(config.optimizer, total_steps)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  state = init_state(exp, tx, init_key)
  train_step = make_train_step(exp, tx)

  latest, best = _manager(os.path.join(workdir, "checkpoints"), 2), _manager(os.path.join(workdir, "best"), 1)
  meta = {"best_metric": -1.0, "best_step": -1}
  if latest.latest_step() is not None:
    restored = latest.restore(latest.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state)), meta=ocp.args.JsonRestore()))
    state, meta = restored["state"], restored["meta"]
    logging.info("resumed from step %d", int(state.step))
  start_step = int(state.step)
  writer = MetricsWriter(workdir, tensorboard=config.get("tensorboard", False))
  writer.truncate_after(start_step)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  def save(step, mngr, tree):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))

  batches = pipeline.iterate(pipeline.train_batches(source, config.batch_size, seed=config.seed, shard_index=0,
                                                    shard_count=1), start_step=start_step, prefetch=2)
  stop_at = config.get("stop_at_step", -1)
  t_last, step = time.perf_counter(), start_step
  while step < total_steps:
    state, m = train_step(state, next(batches), exp.tables, step_key)
    step += 1
    if step % config.log_every_steps == 0 or step == total_steps:
      now = time.perf_counter()
      row = {f"train/{k}": float(v) for k, v in jax.device_get(m).items()}
      row["train/examples_per_sec"] = config.log_every_steps * config.batch_size / max(now - t_last, 1e-9)
      t_last = now
      writer.write(step, row)
    is_eval = step % eval_every == 0 or step == total_steps
    if is_eval:
      valid = evaluate(exp, state.params, "valid")
      writer.write(step, {f"valid/{k}": v for k, v in valid.items()})
      logging.info("step %d: valid %s %.4f", step, config.select_metric, valid[config.select_metric])
      if valid[config.select_metric] > meta["best_metric"]:
        meta.update(best_metric=float(valid[config.select_metric]), best_step=step)
        save(step, best, state.params)
    if is_eval or step % config.checkpoint_every_steps == 0 or step == stop_at:
      save(step, latest, state)
    if step == stop_at:
      latest.wait_until_finished()
      best.wait_until_finished()
      writer.close()
      return None
  latest.wait_until_finished()
  best.wait_until_finished()

  params, best_step = restore_params(workdir, exp, "best")
  results = {"valid": evaluate(exp, params, "valid"), "test": evaluate(exp, params, "test"),
             "best_step": int(best_step), "final_step": step, "data": exp.data.summary(),
             "scenarios": list(exp.data.scenario_names)}
  writer.write(step, {f"test/{k}": v for k, v in results["test"].items()})
  writer.close()
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results
