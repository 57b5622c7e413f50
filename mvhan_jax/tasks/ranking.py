"""The ranking task: multi-scenario multi-task BCE with ESMM's CTCVR, AUC / GAUC evaluation, for
HiNet and its baselines (shared-bottom, MMoE, PLE, STAR), trained by `mvhan_jax.train`'s loop.

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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mvhan_jax import configs
from mvhan_jax import evaluation
from mvhan_jax import sharding
from mvhan_jax import train as loop
from mvhan_jax.data import pipeline
from mvhan_jax.metrics_writer import MetricsWriter
from mvhan_jax.ranking import candidates
from mvhan_jax.ranking import data as ranking_data
from mvhan_jax.ranking import metrics as ranking_metrics
from mvhan_jax.ranking import models
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


SCENARIO_WEIGHTINGS = ("sample", "scenario")


def check_config(config) -> None:
  """The fields the ranking task reads, checked before any data is loaded or folder written:
  `configs.ConfigError` naming the first bad one and the fix (a config of another task is named so)."""
  configs.check_task_fields(config, "ranking")
  configs.check_choice(config, "dataset.name", ("movielens_100k", "synthetic"))
  configs.check_choice(config, "model.name", sorted(models.MODELS))
  configs.check_choice(config, "loss.scenario_weighting", SCENARIO_WEIGHTINGS)
  configs.check_choice(config, "optimizer.schedule", ("cosine", "constant"))
  configs.check_min(config, ("batch_size",), meaning="training impressions per step")
  configs.check_length(config)
  configs.check_min(config, ("log_every_steps",), meaning="steps between two metric logs")
  configs.check_min(config, ("checkpoint_every_steps",), meaning="steps between two checkpoints")
  configs.check_min(config, ("maxlen",), meaning="history length")
  for name, meaning in (("eval_every_steps", "0: once per epoch"), ("early_stopping_patience", "0: never stop early")):
    if configs.has_field(config, name):
      configs.check_min(config, (name,), 0, meaning)
  sharding.check_mesh(config)


def build_ranking_experiment(config, data: ranking_data.RankingData | None = None) -> RankingExperiment:
  check_config(config)
  data = data if data is not None else ranking_data.load_ranking_data(config, candidates.negative_pool(config))
  model = models.build_ranking_model(config.model, data.spec)
  tables = {"user": {k: jnp.asarray(v) for k, v in data.user_features.items()},
            "item": {k: jnp.asarray(v) for k, v in data.item_features.items()}}
  return RankingExperiment(config, data, model, tables)


FEATURE_KEYS = ("user", "item", "scenario", "history", "history_len")


def _params_init_fn(exp: RankingExperiment):
  def _init(rng, batch, tables):
    return exp.model.init({"params": rng, "dropout": rng}, batch, tables)
  return _init


def example_batch(exp: RankingExperiment, n: int = 2) -> dict[str, np.ndarray]:
  return {k: v[:n] for k, v in exp.data.splits["train"].items() if k in FEATURE_KEYS}


def init_state(exp: RankingExperiment, tx, rng, mesh=None) -> TrainState:
  """`mvhan_jax.train.init_state` for this experiment's model (default mesh: ``config.mesh``)."""
  mesh = mesh or sharding.mesh_from_config(exp.config)
  return loop.init_state(_params_init_fn(exp), (rng, example_batch(exp), exp.tables), tx, mesh,
                         sharding.mesh_config(exp.config))


def abstract_state(exp: RankingExperiment, tx, mesh=None) -> TrainState:
  mesh = mesh or sharding.mesh_from_config(exp.config)
  return loop.abstract_state(_params_init_fn(exp), (jax.random.key(0), example_batch(exp), exp.tables), tx, mesh,
                             sharding.mesh_config(exp.config))


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
    raise configs.ConfigError(f"config.loss.scenario_weighting={scenario_weighting!r} is unknown: use 'sample' or "
                              "'scenario'")
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
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state), metrics

  return train_step


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jitted_predict(model):
  return jax.jit(lambda p, b, t: models.predict(model, p, b, t))


def predict_split(exp: RankingExperiment, params, split: dict[str, np.ndarray], chunk: int = 8192) -> dict[str, np.ndarray]:
  """Own-scenario 'ctr', 'cvr', 'ctcvr' probabilities [N] for a split (fixed-size chunks, wrapped)."""
  fn = _jitted_predict(exp.model)
  n = len(split["user"])
  size = min(chunk, n)
  out = evaluation.chunked_apply(
      lambda b: fn(params, b, exp.tables), n, size,
      lambda s, e: {k: split[k][np.arange(s, s + size) % n] for k in FEATURE_KEYS})
  return {k: out[k] for k in ("ctr", "cvr", "ctcvr")}


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
  preds = predict_split(exp, params, data)
  for task, p in preds.items():  # a NaN prediction would outrank every negative: AUC 1
    evaluation.check_finite(p, f"{task} predictions", split)
  return evaluate_predictions(data, preds, exp.data.scenario_names)



def restore_params(workdir, exp: RankingExperiment, which: str = "best") -> tuple[Any, int]:
  """Parameters of the best-by-validation (or latest) checkpoint, and its step."""
  return loop.restore_params(workdir, abstract_state(exp, make_optimizer(exp.config.optimizer, 1)), which, exp.config)


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------
class RankingTask:
  """Plug-in of `mvhan_jax.train` for the ranking models (config.task = 'ranking')."""

  name = "ranking"

  def __init__(self, config, data: ranking_data.RankingData | None = None):
    self.config = config
    self.exp = build_ranking_experiment(config, data)

  def stages(self, workdir):
    del workdir
    config, exp = self.config, self.exp
    source = exp.train_source
    steps_per_epoch = len(source) // config.batch_size
    if steps_per_epoch == 0:
      raise configs.ConfigError(f"config.batch_size={config.batch_size} exceeds the {len(source)} training "
                                "impressions: lower it")
    total_steps = config.get("total_steps") or config.num_epochs * steps_per_epoch
    tx = make_optimizer(config.optimizer, total_steps)
    yield loop.Stage(
        name="", config=config, total_steps=total_steps, batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        dataset=lambda shard, count: pipeline.train_batches(source, config.batch_size, seed=config.seed,
                                                            shard_index=shard, shard_count=count),
        tx=tx, init_params=_params_init_fn(exp), init_args=(example_batch(exp), exp.tables),
        train_step=make_train_step(exp, tx), consts=exp.tables, key=jax.random.key(config.seed),
        evaluate=lambda params, split: evaluate(exp, sharding.host_local(params), split),
        eval_every=config.get("eval_every_steps") or steps_per_epoch, select_metric=config.select_metric,
        patience=config.get("early_stopping_patience", 0), log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint_every_steps, tensorboard=config.get("tensorboard", False),
        shown_metric=lambda k: k.endswith("/all"))

  def restore_best(self, workdir):
    return restore_params(workdir, self.exp)

  def evaluate(self, tree, split: str) -> dict[str, float]:
    return evaluate(self.exp, sharding.host_local(tree), split)

  def finish(self, workdir, metas) -> dict[str, Any]:
    meta = metas[""]
    params, best_step = self.restore_best(workdir)
    results = {"valid": self.evaluate(params, "valid"), "test": self.evaluate(params, "test"),
               "best_step": int(best_step), "final_step": meta["final_step"],
               "stopped_early": bool(meta["stopped_early"]),
               "train_examples_per_sec": meta["train_examples_per_sec"],
               "data": self.exp.data.summary(), "scenarios": list(self.exp.data.scenario_names)}
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False)
    writer.write(meta["final_step"], {f"test/{k}": v for k, v in results["test"].items()})
    writer.close()
    return results

  def format_results(self, results: dict) -> str:
    return format_table(results, self.config.model.name, self.exp.data.scenario_names)


def format_table(results: dict, model_name: str, scenario_names) -> str:
  """AUC and GAUC per task over all scenarios (one row per split), then test AUC per scenario."""
  from mvhan_jax import tables  # pylint: disable=import-outside-toplevel
  cols = [f"{t}/{m}/all" for t in ("ctr", "ctcvr") for m in ("AUC", "GAUC")] + ["cvr/AUC/all"]
  rows = {f"{model_name} ({split})": [{c: results[split][c] for c in cols}] for split in ("valid", "test")}
  table = tables.mean_std_table(rows, cols)
  test = results["test"]
  cols = [f"{t}/{m}" for t in ("ctr", "ctcvr") for m in ("AUC", "GAUC")] + ["cvr/AUC"]
  per = {name: [{c: test[f"{c}/{name}"] for c in cols}] for name in scenario_names}
  table += "\n\nTest AUC and GAUC per scenario:\n\n" + tables.mean_std_table(per, cols)
  return table
