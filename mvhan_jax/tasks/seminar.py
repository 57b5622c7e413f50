"""The SEMINAR task: PSU pretraining (a first stage), then downstream finetuning with GSU/ESU
target attention, full-corpus and sampled evaluation; trained by `mvhan_jax.train`'s loop.

Workdir layout:
  psu/checkpoints, psu/metrics.jsonl   PSU pretraining (resumable; its last checkpoint holds the
                                       pretrained parameters that ``pretrain.checkpoint`` may name)
  checkpoints/, best/                  downstream state (latest 2) and best-by-validation params + codebooks
  metrics.jsonl, config.json, results.json
The PQ codebooks (refreshed at evaluation steps) live in the state (`TrainState.extra`), so resume
stays exact.

Evaluation (leave-one-out, `mvhan_jax.seminar.data`): 'full/*' ranks the target against every item
of the catalogue (each item scored as the model's target; the user's history excluded, the target
never; pessimistic ties), 'sampled/*' against the 99 fixed random non-interacted items of the
paper's protocol (biased upwards: reported for comparison only).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mvhan_jax import configs
from mvhan_jax import evaluation
from mvhan_jax import losses as shared_losses
from mvhan_jax import sharding
from mvhan_jax import train as loop
from mvhan_jax import workdir as wd
from mvhan_jax.data import pipeline
from mvhan_jax.metrics_writer import MetricsWriter
from mvhan_jax.models import pq
from mvhan_jax.seminar import data as sdata
from mvhan_jax.seminar import losses
from mvhan_jax.seminar import model as smodel
from mvhan_jax.train import TrainState, example_batch, make_optimizer

KS = (10, 50)


# --------------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------------
def check_config(config) -> None:
  """The fields the SEMINAR task reads, checked before any data is loaded or folder written:
  `configs.ConfigError` (a ValueError) naming the first bad one and the fix (a config of another
  task is named so)."""
  def need(cond, field, msg):
    if not cond:
      raise configs.ConfigError(f"config.{field}: {msg}")

  configs.check_task_fields(config, "seminar")
  configs.check_choice(config, "dataset.name", ("synthetic", "movielens_100k"))
  configs.check_choice(config, "optimizer.schedule", ("cosine", "constant"))
  configs.check_min(config, ("train.batch_size",), meaning="finetuning examples per step")
  configs.check_length(config, "train")
  if config.pretrain.enabled and not config.pretrain.checkpoint:
    configs.check_min(config, ("pretrain.batch_size",), meaning="PSU windows per step")
    configs.check_length(config, "pretrain")
  configs.check_min(config, ("log_every_steps",), meaning="steps between two metric logs")
  configs.check_min(config, ("checkpoint_every_steps",), meaning="steps between two checkpoints")
  configs.check_min(config, ("eval.user_chunk", "eval.item_chunk"), meaning="users / items per evaluation call")
  for name, meaning in (("train.eval_every_steps", "0: once per epoch"),
                        ("early_stopping_patience", "0: never stop early")):
    if configs.has_field(config, name):
      configs.check_min(config, (name,), 0, meaning)

  m = config.model
  need(m.attention in smodel.ATTENTION, "model.attention", f"{m.attention!r}: use one of {smodel.ATTENTION}")
  need(m.get("eval_attention", "") in ("",) + smodel.ATTENTION, "model.eval_attention",
       f"{m.get('eval_attention')!r}: use '' (same as model.attention) or one of {smodel.ATTENTION}")
  for f in ("dim", "heads", "top_k", "head_dim"):
    need(int(m[f]) >= 1, f"model.{f}", f"must be >= 1, got {m[f]}")
  need(config.maxlen >= 1, "maxlen", f"must be >= 1, got {config.maxlen}")
  need(m.get("pq_scoring", "decoded") in smodel.PQ_SCORING, "model.pq_scoring",
       f"{m.get('pq_scoring')!r}: use one of {smodel.PQ_SCORING} ('rescored': PQ candidates, exact "
       "scores on them; 'decoded' / 'lut': PQ scores; 'sdc': queries quantised too)")
  need(int(m.get("pq_candidates", 128)) >= 1, "model.pq_candidates",
       f"must be >= 1 (PQ candidates re-scored per query; fewer than top_k count as top_k), "
       f"got {m.get('pq_candidates')}")
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
  need(t.get("negatives", "uniform") in ("uniform", "popularity", "log_uniform"), "train.negatives",
       f"{t.get('negatives')!r}: use 'uniform', 'popularity' (count^train.negative_power) or 'log_uniform'")
  for att in config.eval.get("extra_attentions", ()):
    need(att in smodel.ATTENTION, "eval.extra_attentions", f"{att!r}: use entries of {smodel.ATTENTION}")
  need(config.select_metric.split("/")[0] in ("full", "sampled"), "select_metric",
       f"{config.select_metric!r}: use 'sampled/NDCG@10', 'full/NDCG@10', ...")
  sharding.check_mesh(config)


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
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state), metrics

  return step_fn


def _psu_optimizer(config, total_steps):
  ocfg = ml_collections.ConfigDict(config.optimizer.to_dict())
  ocfg.lr = config.pretrain.lr
  return make_optimizer(ocfg, total_steps)


def _psu_params_fn(exp: SeminarExperiment):
  def init(key, example, tables):
    return exp.psu.init(key, example, jnp.zeros_like(example["history_item"]), tables)
  return init


def _psu_init(exp, tx, key, example):
  """A fresh PSU TrainState (single device; tests)."""
  mesh = sharding.mesh_from_config(exp.config)
  return loop.init_state(_psu_params_fn(exp), (key, example, exp.tables), tx, mesh, sharding.mesh_config(exp.config))


def psu_stage(exp: SeminarExperiment) -> loop.Stage:
  """PSU pretraining as the first stage of the loop (``<workdir>/psu``)."""
  config, pcfg = exp.config, exp.config.pretrain
  source = sdata.psu_source(exp.data, pcfg.window, pcfg.windows_per_user, config.dataset.data_seed)
  steps_per_epoch = len(source) // pcfg.batch_size
  if steps_per_epoch == 0:
    raise configs.ConfigError(f"config.pretrain.batch_size={pcfg.batch_size} exceeds the {len(source)} PSU windows: "
                              "lower it")
  total = pcfg.get("total_steps") or pcfg.num_epochs * steps_per_epoch
  tx = _psu_optimizer(config, total)
  return loop.Stage(
      name="psu", config=config, total_steps=total, batch_size=pcfg.batch_size, steps_per_epoch=steps_per_epoch,
      dataset=lambda shard, count: pipeline.train_batches(source, pcfg.batch_size, seed=config.seed + 1000,
                                                          shard_index=shard, shard_count=count),
      tx=tx, init_params=_psu_params_fn(exp), init_args=(example_batch(source, 2), exp.tables),
      train_step=make_psu_step(exp, tx), consts=exp.tables, key=jax.random.fold_in(jax.random.key(config.seed), 1),
      log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps, metric_prefix="psu",
      lr_field="pretrain.lr")


def pretrain(exp: SeminarExperiment, workdir) -> str:
  """Runs (or resumes, or skips when done) PSU pretraining in ``<workdir>/psu``; returns that dir."""
  loop.run_stage(psu_stage(exp), workdir)
  return str(wd.path(workdir) / "psu")


def load_pretrained_embedder(exp: SeminarExperiment, path):
  """The embedder parameters of the last PSU checkpoint under ``path`` (a workdir, its ``psu``
  directory, or that directory's ``checkpoints``)."""
  path = wd.path(path)
  for cand in (path, path / "checkpoints", path / "psu" / "checkpoints"):
    mngr = loop.checkpoint_manager(cand, 1) if wd.exists(cand) else None
    if mngr is not None and mngr.latest_step() is not None:
      break
  else:
    raise FileNotFoundError(f"config.pretrain.checkpoint={str(path)!r} holds no PSU checkpoint (expected a workdir "
                            "whose psu/checkpoints pretraining wrote)")
  tx = _psu_optimizer(exp.config, 1)
  mesh = sharding.mesh_from_config(exp.config)
  source = sdata.WindowSource(exp.data, np.zeros(2, np.int32), exp.data.offsets[:1].repeat(2) + 2,
                              exp.config.pretrain.window)
  template = loop.abstract_state(_psu_params_fn(exp), (jax.random.key(0), example_batch(source, 2), exp.tables), tx, mesh,
                                 sharding.mesh_config(exp.config))
  state, _ = loop.restore_checkpoint(mngr, mngr.latest_step(), template)
  return sharding.host_local(state.params)["params"]["embedder"]


# --------------------------------------------------------------------------------------------------
# Downstream state and step
# --------------------------------------------------------------------------------------------------
def is_embedder_path(path) -> bool:
  return any(getattr(k, "key", None) == "embedder" for k in path)


def downstream_optimizer(config, total_steps):
  tx = make_optimizer(config.optimizer, total_steps)
  if not config.pretrain.freeze:
    return tx
  return loop.freeze(tx, is_embedder_path)


def _codebook_shape(config, data):
  m = config.model
  return (len(data.modality_names) + 1, m.pq_subspaces, m.pq_centroids, m.dim // m.pq_subspaces)


def _params_fn(exp: SeminarExperiment):
  """init(key, example, tables, embedder params or None) -> params; the PSU's embedder replaces
  the embedder's random init."""
  def init(key, example, tables, emb):
    params = exp.model.init(key, example, example["target"][:, None], tables)
    if emb is not None:
      params = flax.core.unfreeze(params)
      params["params"]["embedder"] = emb
    return params
  return init


def init_state(exp: SeminarExperiment, tx, key, example, embedder_params=None) -> TrainState:
  """Fresh downstream state (codebooks zero in ``extra``); ``embedder_params`` (from the PSU) replace
  the embedder's init."""
  mesh = sharding.mesh_from_config(exp.config)
  return loop.init_state(_params_fn(exp), (key, example, exp.tables, embedder_params), tx, mesh,
                         sharding.mesh_config(exp.config), extra=np.zeros(_codebook_shape(exp.config, exp.data),
                                                                          np.float32))


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
  def train_step(state: TrainState, batch, consts, key):
    """One BCE step; ``consts`` = (feature tables, `SeminarExperiment.negatives`)."""
    tables, negatives = consts
    k = jax.random.fold_in(key, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, tables, state.extra, k, negatives)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
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


def full_ranks(scores: np.ndarray, targets: np.ndarray, exclude_indptr, exclude_indices, rows=None,
               split: str | None = None) -> np.ndarray:
  """0-based ranks int [Q] of each row's target among all items: scores [Q, N]; the excluded items
  (CSR, `EvalQueries`) never count; ties count against the target (pessimistic). ``rows``: the
  CSR row of each score row (default 0..Q-1). NaN or inf scores raise ValueError naming ``split``
  (a NaN target score would compare false with every other and rank first)."""
  evaluation.check_finite(scores, "full-corpus scores", split)
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
    evaluation.check_finite(s, "sampled-candidate scores", split)
    s_ranks.append((s[:, 1:] >= s[:, :1]).sum(1))
    if full_corpus:
      full = np.concatenate([np.asarray(fn(params, hist, jnp.asarray(np.broadcast_to(item_pad[b:b + ic], (uc, ic))),
                                           exp.tables, codebooks)) for b in range(0, len(item_pad), ic)], axis=1)
      f_ranks.append(full_ranks(full[:n, :n_items], eq.target[rows[:n]], eq.exclude_indptr, eq.exclude_indices,
                                rows[:n], split))
  out = {f"sampled/{k}": v for k, v in evaluation.leave_one_out_metrics(np.concatenate(s_ranks), (10,)).items()}
  if full_corpus:
    out.update({f"full/{k}": v for k, v in evaluation.leave_one_out_metrics(np.concatenate(f_ranks), KS).items()})
  return out


def restore_best(workdir, exp: SeminarExperiment):
  """(params, codebooks, step) of the best-by-validation checkpoint."""
  tx = downstream_optimizer(exp.config, 1)
  source = sdata.finetune_source(exp.data, exp.config.maxlen, 1, 1, 0)
  mesh = sharding.mesh_from_config(exp.config)
  template = loop.abstract_state(_params_fn(exp), (jax.random.key(0), example_batch(source, 2), exp.tables, None), tx, mesh,
                                 sharding.mesh_config(exp.config),
                                 extra=np.zeros(_codebook_shape(exp.config, exp.data), np.float32))
  tree, step = loop.restore_best(workdir, {"params": template.params, "codebooks": template.extra}, exp.config)
  tree = sharding.host_local(tree)
  return tree["params"], tree["codebooks"], step


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------
class SeminarTask:
  """Plug-in of `mvhan_jax.train` for SEMINAR (config.task = 'seminar'): stage 'psu' (PSU
  pretraining, when ``pretrain.enabled`` and no ``pretrain.checkpoint``), then finetuning."""

  name = "seminar"

  def __init__(self, config, data: sdata.SeminarData | None = None):
    self.config = config
    self.t0 = time.perf_counter()
    self.exp = build_experiment(config, data)
    self.seconds = {"pretrain": 0.0}

  def stages(self, workdir):
    config, exp = self.config, self.exp
    emb_params = None
    if config.pretrain.enabled or config.pretrain.checkpoint:
      t = time.perf_counter()
      if config.pretrain.checkpoint:
        path = config.pretrain.checkpoint
      else:
        yield psu_stage(exp)
        path = wd.path(workdir) / "psu"
      emb_params = load_pretrained_embedder(exp, path)
      self.seconds["pretrain"] = time.perf_counter() - t
    yield self.finetune_stage(emb_params)

  def finetune_stage(self, emb_params) -> loop.Stage:
    config, exp = self.config, self.exp
    source = sdata.finetune_source(exp.data, config.maxlen, config.train.targets_per_user,
                                   config.train.min_history, config.dataset.data_seed)
    bs = config.train.batch_size
    steps_per_epoch = len(source) // bs
    if steps_per_epoch == 0:
      raise configs.ConfigError(f"config.train.batch_size={bs} exceeds the {len(source)} training examples: lower it")
    total_steps = config.train.get("total_steps") or config.train.num_epochs * steps_per_epoch
    train_att = config.model.attention
    eval_att = config.model.get("eval_attention") or train_att
    pq_key = jax.random.fold_in(jax.random.key(config.seed), 2)
    tx = downstream_optimizer(config, total_steps)

    def on_start(state):
      if train_att != "pq":
        return state
      return state.replace(extra=train_codebooks(exp, sharding.host_local(state.params), jax.random.fold_in(pq_key, 0)))

    def before_eval(state, step):
      # Refresh the codebooks on the keys the embedder now produces (the ones PQ attention uses).
      if "pq" not in (train_att, eval_att):
        return state
      return state.replace(extra=train_codebooks(exp, sharding.host_local(state.params),
                                                 jax.random.fold_in(pq_key, step)))

    def valid_eval(tree, split):
      tree = sharding.host_local(tree)
      return evaluate(exp, tree["params"], split, eval_att, tree["codebooks"] if eval_att == "pq" else None,
                      full_corpus=config.eval.full_corpus_valid or config.select_metric.startswith("full"))

    self.t_train = time.perf_counter()
    return loop.Stage(
        name="", config=config, total_steps=total_steps, batch_size=bs, steps_per_epoch=steps_per_epoch,
        dataset=lambda shard, count: pipeline.train_batches(source, bs, seed=config.seed, shard_index=shard,
                                                            shard_count=count),
        tx=tx, init_params=_params_fn(exp), init_args=(example_batch(source, 2), exp.tables, emb_params),
        train_step=make_train_step(exp, tx), consts=(exp.tables, exp.negatives), key=jax.random.key(config.seed),
        extra=np.zeros(_codebook_shape(config, exp.data), np.float32), on_start=on_start,
        evaluate=valid_eval, before_eval=before_eval,
        best_tree=lambda state: {"params": state.params, "codebooks": state.extra},
        eval_every=config.train.get("eval_every_steps") or steps_per_epoch, select_metric=config.select_metric,
        patience=config.get("early_stopping_patience", 0), log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint_every_steps, tensorboard=config.get("tensorboard", False),
        shown_metric=lambda k: True)

  def restore_best(self, workdir):
    params, codebooks, step = restore_best(workdir, self.exp)
    return {"params": params, "codebooks": codebooks}, step

  def evaluate(self, tree, split: str) -> dict[str, float]:
    eval_att = self.config.model.get("eval_attention") or self.config.model.attention
    return evaluate(self.exp, tree["params"], split, eval_att, tree["codebooks"] if eval_att == "pq" else None,
                    full_corpus=split == "test" or self.config.eval.full_corpus_valid)

  def finish(self, workdir, metas) -> dict[str, Any]:
    """The best checkpoint's valid and test metrics with the inference attention
    ``model.eval_attention`` (default: model.attention); with ``eval.extra_attentions`` (e.g.
    ('pq',)) its test metrics with each of these GSU attentions too, under 'test_by_attention'."""
    config, exp = self.config, self.exp
    meta = metas[""]
    train_time = time.perf_counter() - self.t_train
    t = time.perf_counter()
    train_att = config.model.attention
    eval_att = config.model.get("eval_attention") or train_att
    pq_key = jax.random.fold_in(jax.random.key(config.seed), 2)
    tree, best_step = self.restore_best(workdir)
    params, codebooks = tree["params"], tree["codebooks"]
    results = {"valid": self.evaluate(tree, "valid"), "test": self.evaluate(tree, "test"),
               "best_step": int(best_step), "final_step": meta["final_step"], "attention": train_att,
               "eval_attention": eval_att, "data": exp.data.summary()}
    # The same best checkpoint served with another GSU (the exact / PQ switch at inference); PQ
    # codebooks of a model that never had any are trained on its keys as an eval at that step would.
    for att in config.eval.get("extra_attentions", ()):
      if att == "pq" and not float(jnp.abs(codebooks).max()):
        codebooks = train_codebooks(exp, params, jax.random.fold_in(pq_key, best_step))
      results.setdefault("test_by_attention", {})[att] = evaluate(exp, params, "test", att,
                                                                  codebooks if att == "pq" else None)
    results["seconds"] = dict(self.seconds, train=train_time, final_eval=time.perf_counter() - t,
                              total=time.perf_counter() - self.t0)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False)
    writer.write(meta["final_step"], {f"test/{k}": v for k, v in results["test"].items()})
    writer.close()
    return results

  def format_results(self, results: dict) -> str:
    from mvhan_jax import tables  # pylint: disable=import-outside-toplevel
    cols = sorted(results["test"])
    rows = {f"seminar ({split})": [{c: results[split].get(c, float("nan")) for c in cols}] for split in ("valid", "test")}
    return tables.mean_std_table(rows, cols)
