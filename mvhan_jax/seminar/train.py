"""SEMINAR's trainer: PSU pretraining, downstream finetuning, full-corpus and sampled evaluation.

Sections as `mvhan_jax.train`: config checks, experiment, PSU pretraining, downstream state and
step, product-quantisation codebooks, evaluation, train_and_evaluate.

Workdir layout:
  psu/checkpoints, psu/final    PSU pretraining (resumable; ``final`` holds the pretrained params)
  checkpoints/, best/           downstream state (latest 2) and best-by-validation params
  metrics.jsonl, config.json, results.json
Checkpoints use the retrieval trainer's manager (`mvhan_jax.train._manager`: 'state' + 'meta'
items). Exact resumption as there: batch i is a pure function of (seed, i), step keys are
``fold_in(key, i)``, and the PQ codebooks (refreshed at evaluation steps) live in the state.

Evaluation (leave-one-out, `mvhan_jax.seminar.data`): 'full/*' ranks the target against every item
of the catalogue (each item scored as the model's target; the user's history excluded, the target
never; pessimistic ties), 'sampled/*' against the 99 fixed random non-interacted items of the
paper's protocol (biased upwards: reported for comparison only).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from mvhan_jax import evaluation
from mvhan_jax import losses as shared_losses
from mvhan_jax import train as retrieval_train
from mvhan_jax.data import pipeline
from mvhan_jax.metrics_writer import MetricsWriter
from mvhan_jax.models import pq
from mvhan_jax.seminar import data as sdata
from mvhan_jax.seminar import losses
from mvhan_jax.seminar import model as smodel

_manager = retrieval_train._manager  # pylint: disable=protected-access
_abstract = retrieval_train._abstract  # pylint: disable=protected-access
make_optimizer = retrieval_train.make_optimizer
KS = (10, 50)


# --------------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------------
def check_config(config) -> None:
  """Raises ValueError naming the offending field and the fix."""
  def need(cond, field, msg):
    if not cond:
      raise ValueError(f"config.{field}: {msg}")

  m = config.model
  need(m.attention in smodel.ATTENTION, "model.attention", f"{m.attention!r}: use one of {smodel.ATTENTION}")
  need(m.get("eval_attention", "") in ("",) + smodel.ATTENTION, "model.eval_attention",
       f"{m.get('eval_attention')!r}: use '' (same as model.attention) or one of {smodel.ATTENTION}")
  for f in ("dim", "heads", "top_k", "head_dim"):
    need(int(m[f]) >= 1, f"model.{f}", f"must be >= 1, got {m[f]}")
  need(config.maxlen >= 1, "maxlen", f"must be >= 1, got {config.maxlen}")
  need(m.get("pq_scoring", "decoded") in ("lut", "decoded"), "model.pq_scoring",
       f"{m.get('pq_scoring')!r}: use 'decoded' (exact dot products with decoded keys) or 'lut'")
  need(m.top_k <= config.maxlen, "model.top_k", f"top-K {m.top_k} exceeds maxlen={config.maxlen}: lower it")
  need(0.0 <= m.alpha <= 1.0, "model.alpha", f"must lie in [0, 1], got {m.alpha}")
  need(m.dim % m.pq_subspaces == 0, "model.pq_subspaces",
       f"{m.pq_subspaces} must divide model.dim={m.dim}")
  need(m.pq_train_vectors >= m.pq_centroids, "model.pq_train_vectors",
       f"needs >= pq_centroids={m.pq_centroids} vectors, got {m.pq_train_vectors}")
  p = config.pretrain
  need(p.tau > 0, "pretrain.tau", f"must be > 0, got {p.tau}")
  for f in ("w_next", "w_align", "w_rel"):
    need(p[f] >= 0, f"pretrain.{f}", f"must be >= 0, got {p[f]}")
  need(p.window >= 2, "pretrain.window", f"must be >= 2 (next-pair prediction), got {p.window}")
  need(not p.freeze or p.enabled or p.checkpoint, "pretrain.freeze",
       "freezing needs pretrained embeddings: set pretrain.enabled or pretrain.checkpoint")
  t = config.train
  need(t.num_negatives >= 1, "train.num_negatives", f"must be >= 1, got {t.num_negatives}")
  need(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
  need(t.get("negatives", "uniform") in ("uniform", "popularity", "log_uniform"), "train.negatives",
       f"{t.get('negatives')!r}: use 'uniform', 'popularity' (count^train.negative_power) or 'log_uniform'")
  for att in config.eval.get("extra_attentions", ()):
    need(att in smodel.ATTENTION, "eval.extra_attentions", f"{att!r}: use entries of {smodel.ATTENTION}")
  need(config.select_metric.split("/")[0] in ("full", "sampled"), "select_metric",
       f"{config.select_metric!r}: use 'sampled/NDCG@10', 'full/NDCG@10', ...")


# --------------------------------------------------------------------------------------------------
# Experiment
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SeminarExperiment:
  config: ml_collections.ConfigDict
  data: sdata.SeminarData
  model: smodel.SeminarModel
  psu: smodel.PSU
  tables: dict[str, jax.Array]
  negatives: dict[str, jax.Array]  # the finetuning negatives' proposal: 'cdf' [N], 'log_nq' = log(N Q(i)) [N]


def build_experiment(config, data: sdata.SeminarData | None = None) -> SeminarExperiment:
  check_config(config)
  data = data if data is not None else sdata.load_data(config)
  model = smodel.model_from_config(config, data.spec)
  psu = smodel.PSU(embedder=smodel.embedder_from_config(config, data.spec))
  counts = np.bincount(data.item[_training_events(data)], minlength=data.num_items)
  sampler = shared_losses.make_sampler(config.train.negatives, counts, config.train.negative_power)
  negatives = {"cdf": jnp.asarray(sampler.cdf), "log_nq": jnp.asarray(sampler.log_probs + np.log(data.num_items))}
  return SeminarExperiment(config, data, model, psu, {k: jnp.asarray(v) for k, v in data.tables().items()},
                           negatives)


@flax.struct.dataclass
class SeminarState:
  step: jax.Array
  params: Any
  opt_state: Any
  codebooks: jax.Array  # [M + 1, C_pq, 256, d / C_pq] (modalities, keywords); zeros until trained


def _example(source, n: int = 2):
  return source.take(np.arange(min(n, len(source))))


def _save(mngr, step, tree, meta):
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))


def _restore(mngr, step, template):
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(template)), meta=ocp.args.JsonRestore()))


# --------------------------------------------------------------------------------------------------
# PSU pretraining
# --------------------------------------------------------------------------------------------------
def psu_loss(psu, params, batch, neg_items, tables, pcfg):
  """The weighted PSU loss and its three terms (weights pretrain.w_next / w_align / w_rel)."""
  out = psu.apply(params, batch, neg_items, tables)
  valid = out["valid"]
  items = batch["history_item"]
  m, d = out["modal"].shape[-2:]
  next_l = losses.next_pair_loss(out["pred"], out["pair"], out["neg_pair"], valid)
  align = losses.alignment_loss(out["modal"].reshape(-1, m, d), pcfg.tau, valid.reshape(-1), items.reshape(-1))
  rel = losses.relevance_loss(out["query"], out["item"], out["has_query"], valid, items, pcfg.tau)
  total = pcfg.w_next * next_l + pcfg.w_align * align + pcfg.w_rel * rel
  return total, {"loss": total, "next": next_l, "align": align, "relevance": rel}


def make_psu_step(exp: SeminarExperiment, tx):
  pcfg, n_items = exp.config.pretrain, exp.data.num_items

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step_fn(state, batch, tables, key):
    neg = jax.random.randint(jax.random.fold_in(key, state.step), batch["history_item"].shape, 0, n_items)
    grads, metrics = jax.grad(lambda p: psu_loss(exp.psu, p, batch, neg, tables, pcfg), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return retrieval_train.TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics

  return step_fn


def _psu_optimizer(config, total_steps):
  ocfg = ml_collections.ConfigDict(config.optimizer.to_dict())
  ocfg.lr = config.pretrain.lr
  return make_optimizer(ocfg, total_steps)


def _psu_init(exp, tx, key, example):
  @jax.jit
  def init(key, example, tables):
    neg = jnp.zeros_like(example["history_item"])
    params = exp.psu.init(key, example, neg, tables)
    return retrieval_train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  return init(key, example, exp.tables)


def pretrain(exp: SeminarExperiment, psu_dir: str) -> str:
  """Runs (or resumes, or skips when done) PSU pretraining; returns the ``final`` checkpoint dir."""
  config, pcfg = exp.config, exp.config.pretrain
  final_dir = os.path.join(psu_dir, "final")
  final = _manager(final_dir, 1)
  if final.latest_step() is not None:
    return final_dir
  source = sdata.psu_source(exp.data, pcfg.window, pcfg.windows_per_user, config.dataset.data_seed)
  steps_per_epoch = len(source) // pcfg.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.pretrain.batch_size={pcfg.batch_size} exceeds the {len(source)} PSU windows")
  total = pcfg.get("total_steps") or pcfg.num_epochs * steps_per_epoch
  tx = _psu_optimizer(config, total)
  init_key, step_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
  state = _psu_init(exp, tx, init_key, _example(source))
  latest = _manager(os.path.join(psu_dir, "checkpoints"), 2)
  meta = {}
  if latest.latest_step() is not None:
    state = _restore(latest, latest.latest_step(), state)["state"]
  writer = MetricsWriter(psu_dir, tensorboard=False)
  writer.truncate_after(int(state.step))
  step_fn = make_psu_step(exp, tx)
  batches = pipeline.iterate(pipeline.train_batches(source, pcfg.batch_size, seed=config.seed + 1000, shard_index=0,
                                                    shard_count=1), start_step=int(state.step), prefetch=2)
  step = int(state.step)
  while step < total:
    state, m = step_fn(state, next(batches), exp.tables, step_key)
    step += 1
    if step % config.log_every_steps == 0 or step == total:
      writer.write(step, {f"psu/{k}": float(v) for k, v in jax.device_get(m).items()})
    if step % config.checkpoint_every_steps == 0 and step < total:
      _save(latest, step, state, meta)
    if step == config.pretrain.get("stop_at_step", -1):
      latest.wait_until_finished()
      raise InterruptedError(f"pretraining stopped at step {step} (config.pretrain.stop_at_step)")
  _save(final, step, state.params, {"step": step})
  final.wait_until_finished()
  latest.wait_until_finished()
  writer.close()
  return final_dir


def load_pretrained_embedder(exp: SeminarExperiment, path: str):
  """The embedder parameters of a PSU ``final`` checkpoint dir (or a workdir / its psu dir)."""
  for cand in (path, os.path.join(path, "final"), os.path.join(path, "psu", "final")):
    mngr = _manager(cand, 1)
    if mngr.latest_step() is not None:
      break
  else:
    raise FileNotFoundError(f"config.pretrain.checkpoint={path!r} holds no PSU checkpoint (expected "
                            "<dir>/final written by pretraining)")
  tx = _psu_optimizer(exp.config, 1)
  template = jax.eval_shape(lambda: _psu_init(exp, tx, jax.random.key(0), _example(
      sdata.WindowSource(exp.data, np.zeros(2, np.int32), exp.data.offsets[:1].repeat(2) + 2,
                         exp.config.pretrain.window))))
  params = _restore(mngr, mngr.latest_step(), template.params)["state"]
  return params["params"]["embedder"]


# --------------------------------------------------------------------------------------------------
# Downstream state and step
# --------------------------------------------------------------------------------------------------
def is_embedder_path(path) -> bool:
  return any(getattr(k, "key", None) == "embedder" for k in path)


def downstream_optimizer(config, total_steps):
  tx = make_optimizer(config.optimizer, total_steps)
  if not config.pretrain.freeze:
    return tx
  labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda p, _: "frozen" if is_embedder_path(p) else "train", params)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _codebook_shape(config, data):
  m = config.model
  return (len(data.modality_names) + 1, m.pq_subspaces, m.pq_centroids, m.dim // m.pq_subspaces)


def init_state(exp: SeminarExperiment, tx, key, example, embedder_params=None) -> SeminarState:
  """Fresh downstream state; ``embedder_params`` (from the PSU) replace the embedder's init."""
  shape = _codebook_shape(exp.config, exp.data)

  @jax.jit
  def init(key, example, tables, emb):
    cand = example["target"][:, None]
    params = exp.model.init(key, example, cand, tables)
    if emb is not None:
      params = flax.core.unfreeze(params)
      params["params"]["embedder"] = emb
    return SeminarState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.zeros(shape, jnp.float32))

  return init(key, example, exp.tables, embedder_params)


def _candidates(batch, key, cdf, num_negatives):
  b = batch["target"].shape[0]
  neg = shared_losses.sample_negatives(key, cdf, b * num_negatives).reshape(b, num_negatives)
  cand = jnp.concatenate([batch["target"][:, None], neg], axis=1)
  valid = jnp.concatenate([jnp.ones_like(batch["target"][:, None], bool), neg != batch["target"][:, None]], axis=1)
  return cand, valid


def nce_logits(scores, candidates, log_nq):
  """The BCE logits of candidates [B, C] drawn from the data (column 0) or k times from Q:
  scores - log(N Q(i)) (NCE, Gutmann & Hyvarinen 2010). The Bayes-optimal classifier logit is
  log p(i | history) - log(k Q(i)), so the score s then estimates log p(i | history) + const and
  ranks the whole catalogue as the data would, whatever Q. Measured relative to uniform
  (log(N Q(i)) = 0 for uniform negatives) so the constant stays near 0 at initialisation."""
  return scores - jnp.take(log_nq, candidates)


def make_train_step(exp: SeminarExperiment, tx):
  cfg = exp.config
  attention = cfg.model.attention

  def loss_fn(params, batch, tables, codebooks, key, negatives):
    cand, valid = _candidates(batch, key, negatives["cdf"], cfg.train.num_negatives)
    logits = exp.model.apply(params, batch, cand, tables, codebooks, attention)
    loss = losses.candidate_bce(nce_logits(logits, cand, negatives["log_nq"]), valid)
    return loss, {"loss": loss}

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state: SeminarState, batch, tables, key, negatives):
    """One BCE step; ``negatives`` = `SeminarExperiment.negatives`."""
    k = jax.random.fold_in(key, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, tables, state.codebooks, k, negatives)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return dataclasses.replace(state, step=state.step + 1, params=optax.apply_updates(state.params, updates),
                               opt_state=opt_state), metrics

  return train_step


# --------------------------------------------------------------------------------------------------
# Product-quantisation codebooks
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jitted_catalogue(model):
  return jax.jit(lambda p, t: model.apply(p, t, method=lambda mdl, t: mdl.embedder.catalogue(t)))


def _training_events(data: sdata.SeminarData) -> np.ndarray:
  """Flat indices of every user's training events (never the validation / test events)."""
  te = data.train_end()
  return np.concatenate([np.arange(data.offsets[u], te[u]) for u in range(data.num_users)])


def _fit_codebooks(key, x, m):
  """PQ codebooks [C, K, s] of x [n, d] (n may be 0: zeros, nothing to quantise)."""
  if len(x) == 0:
    return jnp.zeros((m.pq_subspaces, m.pq_centroids, m.dim // m.pq_subspaces), jnp.float32)
  return pq.train_pq(key, jnp.asarray(x), m.pq_subspaces, m.pq_centroids, m.pq_iters)


def train_codebooks(exp: SeminarExperiment, params, key) -> jax.Array:
  """PQ codebooks [M + 1, C, 256, d / C] of the current embedder: per item modality, k-means on the
  modality vectors of ``model.pq_train_vectors`` items drawn from the training events (so as often
  as they occur in histories), and for the keywords on as many keyword occurrences of the training
  events' queries (deterministic in key; no queries, e.g. MovieLens: a zero keyword codebook)."""
  m = exp.config.model
  data = exp.data
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint32).tolist())
  events = _training_events(data)
  items, keywords = (np.asarray(v) for v in _jitted_catalogue(exp.model)(params, exp.tables))
  x_items = items[data.item[rng.choice(events, m.pq_train_vectors)]]               # [n, M, d]
  occurrences = data.query[events][data.query[events] > 0]
  x_kw = keywords[rng.choice(occurrences, m.pq_train_vectors)] if len(occurrences) else keywords[:0]
  k_items, k_kw = jax.random.split(key)
  return jnp.concatenate([pq.train_multimodal_pq(k_items, jnp.asarray(x_items), m.pq_subspaces, m.pq_centroids,
                                                 m.pq_iters),
                          _fit_codebooks(k_kw, x_kw, m)[None]])


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jitted_scores(model, attention):
  return jax.jit(lambda p, b, c, t, cb: model.apply(p, b, c, t, cb, attention))


def full_ranks(scores: np.ndarray, targets: np.ndarray, exclude_indptr, exclude_indices, rows=None) -> np.ndarray:
  """0-based ranks int [Q] of each row's target among all items: scores [Q, N]; the excluded items
  (CSR, `EvalQueries`) never count; ties count against the target (pessimistic). ``rows``: the
  CSR row of each score row (default 0..Q-1)."""
  scores = np.array(scores, np.float32, copy=True)
  q = np.arange(len(scores))
  rows = q if rows is None else np.asarray(rows)
  t = scores[q, targets].copy()
  for i, r in enumerate(rows):
    scores[i, exclude_indices[exclude_indptr[r]:exclude_indptr[r + 1]]] = -np.inf
  scores[q, targets] = -np.inf  # the target itself is not a competitor
  return (scores >= t[:, None]).sum(1).astype(np.int64)


def evaluate(exp: SeminarExperiment, params, split: str, attention: str, codebooks=None,
             full_corpus: bool = True) -> dict[str, float]:
  """'sampled/{HR,NDCG}@k', 'sampled/MRR' and (``full_corpus``) 'full/{HR,NDCG}@k', 'full/MRR'."""
  ecfg, data = exp.config.eval, exp.data
  eq = data.eval_queries[split]
  fn = _jitted_scores(exp.model, attention)
  n_users, uc, ic = len(eq), ecfg.user_chunk, ecfg.item_chunk
  n_items = data.num_items
  item_pad = np.arange(-(-n_items // ic) * ic) % n_items
  s_ranks, f_ranks = [], []
  for a in range(0, n_users, uc):
    rows = np.arange(a, a + uc) % n_users
    n = min(uc, n_users - a)
    hist = sdata.windows(data.item, data.query, data.offsets[eq.user[rows]], eq.end[rows], exp.config.maxlen)
    s = np.asarray(fn(params, hist, jnp.asarray(eq.sampled[rows]), exp.tables, codebooks))[:n]
    s_ranks.append((s[:, 1:] >= s[:, :1]).sum(1))
    if full_corpus:
      full = np.concatenate([np.asarray(fn(params, hist, jnp.asarray(np.broadcast_to(item_pad[b:b + ic], (uc, ic))),
                                           exp.tables, codebooks)) for b in range(0, len(item_pad), ic)], axis=1)
      f_ranks.append(full_ranks(full[:n, :n_items], eq.target[rows[:n]], eq.exclude_indptr, eq.exclude_indices,
                                rows[:n]))
  out = {f"sampled/{k}": v for k, v in evaluation.leave_one_out_metrics(np.concatenate(s_ranks), (10,)).items()}
  if full_corpus:
    out.update({f"full/{k}": v for k, v in evaluation.leave_one_out_metrics(np.concatenate(f_ranks), KS).items()})
  return out


def restore_best(workdir: str, exp: SeminarExperiment):
  """(params, codebooks, step) of the best-by-validation checkpoint."""
  mngr = _manager(os.path.join(workdir, "best"), 1)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/best: train with this workdir first")
  tx = downstream_optimizer(exp.config, 1)
  source = sdata.finetune_source(exp.data, exp.config.maxlen, 1, 1, 0)
  template = jax.eval_shape(lambda: init_state(exp, tx, jax.random.key(0), _example(source)))
  tree = _restore(mngr, step, {"params": template.params, "codebooks": template.codebooks})["state"]
  return tree["params"], tree["codebooks"], step


# --------------------------------------------------------------------------------------------------
# train_and_evaluate
# --------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, data: sdata.SeminarData | None = None) -> dict[str, Any] | None:
  """Pretrains (if enabled), finetunes (resuming from ``workdir``), selects the best step by
  ``config.select_metric`` on validation and returns (and writes to results.json) its valid and
  test metrics with the inference attention ``model.eval_attention`` (default: model.attention).

  ``eval.extra_attentions`` (e.g. ('pq',)): the best checkpoint's test metrics with each of these
  GSU attentions too, under results['test_by_attention'].
  Returns None when ``config.stop_at_step`` ends the run early (a simulated preemption).
  """
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  exp = build_experiment(config, data)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  source = sdata.finetune_source(exp.data, config.maxlen, config.train.targets_per_user,
                                 config.train.min_history, config.dataset.data_seed)
  steps_per_epoch = len(source) // config.train.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} exceeds the {len(source)} training examples")
  total_steps = config.train.get("total_steps") or config.train.num_epochs * steps_per_epoch
  eval_every = config.train.get("eval_every_steps") or steps_per_epoch
  train_att = config.model.attention
  eval_att = config.model.get("eval_attention") or train_att

  # Pretraining and the embedder restore.
  emb_params, psu_time = None, 0.0
  if config.pretrain.enabled or config.pretrain.checkpoint:
    t = time.perf_counter()
    path = config.pretrain.checkpoint or pretrain(exp, os.path.join(workdir, "psu"))
    emb_params = load_pretrained_embedder(exp, path)
    psu_time = time.perf_counter() - t

  tx = downstream_optimizer(config, total_steps)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  pq_key = jax.random.fold_in(jax.random.key(config.seed), 2)
  state = init_state(exp, tx, init_key, _example(source), emb_params)
  latest, best = _manager(os.path.join(workdir, "checkpoints"), 2), _manager(os.path.join(workdir, "best"), 1)
  meta = {"best_metric": -1.0, "best_step": -1}
  if latest.latest_step() is not None:
    restored = _restore(latest, latest.latest_step(), state)
    state, meta = restored["state"], restored["meta"]
    logging.info("resumed from step %d", int(state.step))
  elif train_att == "pq":
    state = dataclasses.replace(state, codebooks=train_codebooks(exp, state.params, jax.random.fold_in(pq_key, 0)))
  start_step = int(state.step)
  writer = MetricsWriter(workdir, tensorboard=config.get("tensorboard", False))
  writer.truncate_after(start_step)
  train_step = make_train_step(exp, tx)
  batches = pipeline.iterate(pipeline.train_batches(source, config.train.batch_size, seed=config.seed, shard_index=0,
                                                    shard_count=1), start_step=start_step, prefetch=2)
  step, t_train = start_step, time.perf_counter()
  while step < total_steps:
    state, m = train_step(state, next(batches), exp.tables, step_key, exp.negatives)
    step += 1
    if step % config.log_every_steps == 0 or step == total_steps:
      writer.write(step, {f"train/{k}": float(v) for k, v in jax.device_get(m).items()})
    is_eval = step % eval_every == 0 or step == total_steps
    if is_eval:
      if train_att == "pq":  # refresh the codebooks on the keys the embedder now produces
        state = dataclasses.replace(state, codebooks=train_codebooks(exp, state.params, jax.random.fold_in(pq_key, step)))
      cb = state.codebooks if eval_att == "pq" else None
      if eval_att == "pq" and train_att != "pq":
        cb = train_codebooks(exp, state.params, jax.random.fold_in(pq_key, step))
      valid = evaluate(exp, state.params, "valid", eval_att, cb,
                       full_corpus=config.eval.full_corpus_valid or config.select_metric.startswith("full"))
      writer.write(step, {f"valid/{k}": v for k, v in valid.items()})
      logging.info("step %d: valid %s %.4f", step, config.select_metric, valid[config.select_metric])
      if valid[config.select_metric] > meta["best_metric"]:
        meta.update(best_metric=float(valid[config.select_metric]), best_step=step)
        if best.latest_step() != step:  # a run killed between this save and the next 'latest' one
          _save(best, step, {"params": state.params, "codebooks": cb if cb is not None else state.codebooks}, meta)
    if is_eval or step % config.checkpoint_every_steps == 0 or step == config.get("stop_at_step", -1):
      _save(latest, step, state, meta)
    if step == config.get("stop_at_step", -1):
      latest.wait_until_finished()
      best.wait_until_finished()
      writer.close()
      return None
  train_time = time.perf_counter() - t_train
  latest.wait_until_finished()
  best.wait_until_finished()

  t = time.perf_counter()
  params, codebooks, best_step = restore_best(workdir, exp)
  cb = codebooks if eval_att == "pq" else None
  results = {"valid": evaluate(exp, params, "valid", eval_att, cb, full_corpus=config.eval.full_corpus_valid),
             "test": evaluate(exp, params, "test", eval_att, cb),
             "best_step": int(best_step), "final_step": step, "attention": train_att, "eval_attention": eval_att,
             "data": exp.data.summary()}
  # The same best checkpoint served with another GSU (the exact / PQ switch at inference); PQ
  # codebooks of a model that never had any are trained on its keys as an eval at that step would.
  for att in config.eval.get("extra_attentions", ()):
    if att == "pq" and not float(jnp.abs(codebooks).max()):
      codebooks = train_codebooks(exp, params, jax.random.fold_in(pq_key, best_step))
    results.setdefault("test_by_attention", {})[att] = evaluate(exp, params, "test", att,
                                                                codebooks if att == "pq" else None)
  results["seconds"] = {"pretrain": psu_time, "train": train_time, "final_eval": time.perf_counter() - t,
                        "total": time.perf_counter() - t0}
  writer.write(step, {f"test/{k}": v for k, v in results["test"].items()})
  writer.close()
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results
