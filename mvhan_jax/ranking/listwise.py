"""A listwise re-ranker of a retriever's candidates: retrieval score, transitions, target attention.

Issue 18 ("A ranking stage that adds"). Re-ranking the recency two-tower's top-100 with HiNet
(trained on one popularity negative per positive, history as an unweighted mean) halved HR@10; this
re-ranker is given what that reading says it lacked:

1. the retriever's own evidence: its logit ``u . v / temperature`` (the frozen retriever's vectors),
   the logit minus the list's best, and the log retrieval rank;
2. a recency-aware history: target (DIN-style) attention of the candidate over the last
   ``maxlen`` history items, keys = the frozen retriever's item vectors projected plus a learned
   recency-position embedding; plus the candidate's cosine to each of the 3 most recent items and
   its best cosine to any of them;
3. first-order transition features of the Markov chain (`mvhan_jax.baselines`): ``T[h_k, c] /
   r[h_k]`` and ``log1p T[h_k, c]`` for the last three history items ``h_1`` (newest), ``h_2``, ``h_3``,
   from the TRAINING sequences only, and the candidate's log training popularity;
4. a listwise loss: softmax cross-entropy over each query's candidate list (`listwise_loss`), the
   true next item being the positive (optionally appended to the list when the retriever missed it).

Leave-user-out counts. A training query is a prefix of a training sequence, and that sequence is
counted in ``T`` and the popularity: ``T[last, target]`` would include the very transition being
predicted (and the user's future ones). Every count is therefore taken without the query's own
user (`CountFeatures`): ``T - T_u``, ``r - r_u``, ``count - count_u``. At validation / test time the
candidates exclude everything the user consumed, so the user's own transitions (which all end in a
consumed item) never reach a candidate: there the correction changes nothing but a row count
``r[h]`` by the user's own departures from ``h`` — the same features at training and serving time.

Which queries to train on. The retriever's features are only honest on queries it was not trained
on: on ML-100k its recall@100 is 0.856 on its own training prefixes but 0.683 on the validation
queries and 0.603 on test, so a re-ranker fitted on training prefixes learns to trust the retrieval
logit far more than it deserves, and barely moves test (HR@10 0.175 -> 0.182). Fitted instead on the
validation queries (history = the training sequence, target = the validation item: the retriever
only early-stopped on them), with its epochs chosen by k-fold cross-validation over those queries
(`cross_validate`), it raises test HR@10 to 0.211 (experiments/results/retrieve_then_rank.md).
Queries whose positive the retriever missed are left out of training by default: appended with its
low logit, such a positive teaches the model to flatten the retrieval logit, while at serving time
those queries are misses whatever the order.

The score is ``a * retrieval_logit + MLP(features)`` with ``a`` learned from 1 and the MLP's output
layer initialised at zero: training starts from the retrieval order and learns what to add.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mvhan_jax import baselines

NUM_RECENT = 3  # history items with explicit transition / cosine features
# Dense feature layout (`CountFeatures.dense` and `retrieval_features`), by group.
RETRIEVAL_FEATURES = ("retrieval_logit", "logit_minus_best", "log_rank")
TRANSITION_FEATURES = tuple(f"{kind}_{k}" for k in range(1, NUM_RECENT + 1) for kind in ("trans_ratio", "trans_log"))
POPULARITY_FEATURES = ("log_popularity",)
DENSE_FEATURES = RETRIEVAL_FEATURES + TRANSITION_FEATURES + POPULARITY_FEATURES
FEATURE_GROUPS = {"retrieval": RETRIEVAL_FEATURES, "transition": TRANSITION_FEATURES,
                  "popularity": POPULARITY_FEATURES}


def feature_columns(groups: Sequence[str]) -> tuple[int, ...]:
  """Column indices of DENSE_FEATURES for the dense groups named in ``groups`` ('attention' is the
  model's own block, not a dense column)."""
  names = [n for g in groups if g in FEATURE_GROUPS for n in FEATURE_GROUPS[g]]
  return tuple(DENSE_FEATURES.index(n) for n in names)


# --------------------------------------------------------------------------------------------------
# Features (NumPy)
# --------------------------------------------------------------------------------------------------
def _pair_keys(sequences, num_items):
  """Sorted unique int64 keys ``(u * I + a) * I + b`` of each user's consecutive pairs, with counts."""
  keys = []
  for u, s in enumerate(sequences):
    s = np.asarray(s, np.int64)
    if len(s) >= 2:
      keys.append((u * num_items + s[:-1]) * num_items + s[1:])
  if not keys:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
  return np.unique(np.concatenate(keys), return_counts=True)


def _unique_counts(keys):
  keys = np.asarray(keys, np.int64)
  return np.unique(keys, return_counts=True) if len(keys) else (np.zeros((0,), np.int64),) * 2


def _lookup(sorted_keys, counts, query):
  """counts[key] for each query key (0 when absent)."""
  if not len(sorted_keys):
    return np.zeros(np.shape(query), np.int64)
  pos = np.minimum(np.searchsorted(sorted_keys, query), len(sorted_keys) - 1)
  return np.where(sorted_keys[pos] == query, counts[pos], 0)


class CountFeatures:
  """Transition and popularity features of (query, candidate), counted on the training sequences
  without the query's own user (module doc)."""

  def __init__(self, train_sequences: Sequence[np.ndarray], num_items: int):
    self.num_items = num_items
    self.transitions = baselines.transition_counts(train_sequences, num_items)
    self.row = self.transitions.sum(axis=1)
    self.count = baselines.item_counts(train_sequences, num_items)
    self.max_log_count = float(np.log1p(max(int(self.count.max(initial=0)), 1)))
    i = np.int64(num_items)
    self._pairs, self._pair_n = _pair_keys(train_sequences, num_items)
    # A user's departures from an item (row counts) and interactions with an item.
    self._rows, self._row_n = _unique_counts(np.concatenate(
        [u * i + np.asarray(s[:-1], np.int64) for u, s in enumerate(train_sequences) if len(s) >= 2] or [[]]))
    self._items, self._item_n = _unique_counts(np.concatenate(
        [u * i + np.asarray(s, np.int64) for u, s in enumerate(train_sequences) if len(s)] or [[]]))

  def recent(self, history: np.ndarray, history_len: np.ndarray, k: int = NUM_RECENT) -> np.ndarray:
    """int64 [Q, k]: the k most recent items of left-aligned histories (newest first), -1 padded."""
    history_len = np.asarray(history_len)
    j = history_len[:, None] - 1 - np.arange(k)[None, :]
    return np.where(j >= 0, np.take_along_axis(np.asarray(history, np.int64), np.maximum(j, 0), 1), -1)

  def dense(self, users: np.ndarray, history: np.ndarray, history_len: np.ndarray,
            candidates: np.ndarray) -> np.ndarray:
    """float32 [Q, N, len(TRANSITION_FEATURES) + 1]: transition features of the 3 most recent items,
    then the log popularity, for candidates int [Q, N] (-1 = padding: zeros)."""
    i = np.int64(self.num_items)
    users = np.asarray(users, np.int64)[:, None]
    cand = np.maximum(np.asarray(candidates, np.int64), 0)
    recent = self.recent(history, history_len)
    cols = []
    for k in range(NUM_RECENT):
      h = recent[:, k:k + 1]
      hv = np.maximum(h, 0)
      t = self.transitions[hv, cand] - _lookup(self._pairs, self._pair_n, (users * i + hv) * i + cand)
      r = self.row[hv] - _lookup(self._rows, self._row_n, users * i + hv)
      t = np.where(h >= 0, t, 0)
      cols += [t / np.maximum(r, 1), np.log1p(t)]
    pop = self.count[cand] - _lookup(self._items, self._item_n, users * i + cand)
    cols.append(np.log1p(pop) / self.max_log_count)
    out = np.stack(cols, -1).astype(np.float32)
    return np.where((np.asarray(candidates) >= 0)[..., None], out, 0.0)


def retrieval_features(logits: np.ndarray, valid: np.ndarray, ranks: np.ndarray, max_rank: int) -> np.ndarray:
  """float32 [Q, N, 3]: the retriever's logit, the logit minus the query's best, log1p(rank) / log1p(max_rank)."""
  best = np.max(np.where(valid, logits, -np.inf), axis=1, keepdims=True)
  best = np.where(np.isfinite(best), best, 0.0)
  out = np.stack([logits, logits - best, np.log1p(ranks) / np.log1p(max_rank)], -1).astype(np.float32)
  return np.where(valid[..., None], out, 0.0)


# --------------------------------------------------------------------------------------------------
# Model and loss
# --------------------------------------------------------------------------------------------------
def listwise_loss(scores: jax.Array, label: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over queries of the softmax cross-entropy of the positive slot ``label`` [B] among the
  valid slots ``mask`` [B, N] of ``scores`` [B, N]: -s_pos + logsumexp_{valid} s."""
  s = jnp.where(mask, scores, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  pos = jnp.take_along_axis(scores, label[:, None], axis=-1)[:, 0]
  return jnp.mean(lse - pos)


def target_attention(query, keys, values, mask):
  """DIN-style target attention: for every candidate query [B, N, d] a softmax over the history keys
  [B, L, d] (scaled dot products; ``mask`` [B, L] false = padding, never attended), -> [B, N, d'].
  A query with an empty history gets zeros."""
  logits = jnp.einsum("bnd,bld->bnl", query, keys) / jnp.sqrt(query.shape[-1]).astype(query.dtype)
  m = mask[:, None, :]
  logits = jnp.where(m, logits, -1e30)
  w = jax.nn.softmax(logits, axis=-1) * m
  return jnp.einsum("bnl,bld->bnd", w, values)


class ListwiseRanker(nn.Module):
  """Scores [B, N] of (query, candidate) pairs.

  Inputs of ``__call__``: dense [B, N, F] (the columns of DENSE_FEATURES in ``columns``; column
  ``logit_column`` of the full layout, if given, is the retrieval logit of the skip term), candidate
  ids [B, N] (>= 0), recent history ids [B, L] newest first, its mask [B, L], and the frozen item
  vectors [I, D].
  """

  columns: tuple[int, ...] = tuple(range(len(DENSE_FEATURES)))
  use_attention: bool = True
  maxlen: int = 20
  attn_dim: int = 32
  hidden: tuple[int, ...] = (64, 32)
  skip_logit: bool = True

  @nn.compact
  def __call__(self, dense, candidates, history, history_mask, item_vectors):
    parts = [dense[..., jnp.asarray(self.columns, jnp.int32)]] if self.columns else []
    if self.use_attention:
      c = jnp.take(item_vectors, candidates, axis=0)        # [B, N, D]
      h = jnp.take(item_vectors, history, axis=0)           # [B, L, D]
      recency = self.param("recency", nn.initializers.normal(0.1), (self.maxlen, self.attn_dim))
      q = nn.Dense(self.attn_dim, name="query")(c)
      k = nn.Dense(self.attn_dim, name="key")(h) + recency[None, :h.shape[1]]
      v = nn.Dense(self.attn_dim, name="value")(h) + recency[None, :h.shape[1]]
      pooled = target_attention(q, k, v, history_mask)
      cos = jnp.einsum("bnd,bld->bnl", c, h)
      m = history_mask[:, None, :]
      recent = jnp.where(m[..., :NUM_RECENT], cos[..., :NUM_RECENT], 0.0)
      best = jnp.max(jnp.where(m, cos, -1.0), axis=-1, keepdims=True)
      parts += [pooled, pooled * q, recent, best]
    x = jnp.concatenate(parts, axis=-1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
    out = nn.Dense(1, kernel_init=nn.initializers.zeros, name="out")(x)[..., 0]
    if self.skip_logit:
      a = self.param("logit_weight", nn.initializers.ones, ())
      out = out + a * dense[..., DENSE_FEATURES.index("retrieval_logit")]
    return out


# --------------------------------------------------------------------------------------------------
# Candidate lists and training
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Lists:
  """One split's candidate lists.

  candidates int32 [Q, N] (-1 = empty slot), dense float32 [Q, N, F], label int32 [Q] (slot of the
  positive; at evaluation N_retrieved = a miss, which never counts as a hit), history int32 [Q, L]
  newest first, history_mask bool [Q, L], retrieved int: the retriever's list length (slots beyond it
  hold only the appended positive at training time).
  """

  candidates: np.ndarray
  dense: np.ndarray
  label: np.ndarray
  history: np.ndarray
  history_mask: np.ndarray
  retrieved: int

  def __len__(self):
    return len(self.label)

  def take(self, rows):
    return Lists(self.candidates[rows], self.dense[rows], self.label[rows], self.history[rows],
                 self.history_mask[rows], self.retrieved)


def recent_history(history: np.ndarray, history_len: np.ndarray, maxlen: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-aligned histories -> (the last ``maxlen`` items newest first int32 [Q, maxlen], mask)."""
  history_len = np.asarray(history_len)
  j = history_len[:, None] - 1 - np.arange(maxlen)[None, :]
  mask = j >= 0
  out = np.where(mask, np.take_along_axis(np.asarray(history), np.maximum(j, 0), 1), 0)
  return out.astype(np.int32), mask


@dataclasses.dataclass
class TrainConfig:
  groups: tuple[str, ...] = ("retrieval", "transition", "popularity", "attention")
  maxlen: int = 20
  attn_dim: int = 32
  hidden: tuple[int, ...] = (64, 32)
  lr: float = 1e-3
  weight_decay: float = 1e-4
  batch_size: int = 256
  epochs: int = 8
  patience: int = 2
  eval_every: int = 0   # steps between validations; 0: once per epoch
  seed: int = 0


def make_model(cfg: TrainConfig) -> ListwiseRanker:
  skip = "retrieval" in cfg.groups
  return ListwiseRanker(columns=feature_columns(cfg.groups), use_attention="attention" in cfg.groups,
                        maxlen=cfg.maxlen, attn_dim=cfg.attn_dim, hidden=tuple(cfg.hidden), skip_logit=skip)


def _device_batch(lists: Lists, rows):
  return (jnp.asarray(lists.dense[rows]), jnp.asarray(np.maximum(lists.candidates[rows], 0)),
          jnp.asarray(lists.history[rows]), jnp.asarray(lists.history_mask[rows]),
          jnp.asarray(lists.candidates[rows] >= 0), jnp.asarray(lists.label[rows]))


def score_lists(model, params, lists: Lists, item_vectors, chunk: int = 512) -> np.ndarray:
  """float32 [Q, retrieved] scores of the retrieved slots (empty slots -inf)."""
  fn = _score_fn(model)
  out = []
  n = lists.retrieved
  for s in range(0, len(lists), chunk):
    rows = np.arange(s, min(s + chunk, len(lists)))
    dense, cand, hist, hmask, valid, _ = _device_batch(lists, rows)
    out.append(np.asarray(fn(params, dense[:, :n], cand[:, :n], hist, hmask, item_vectors)))
  scores = np.concatenate(out) if out else np.zeros((0, n), np.float32)
  return np.where(lists.candidates[:, :n] >= 0, scores, -np.inf)


_SCORE_FNS = {}


def _score_fn(model):
  if model not in _SCORE_FNS:
    _SCORE_FNS[model] = jax.jit(lambda p, *a: model.apply(p, *a))
  return _SCORE_FNS[model]


def reranked_positions(candidates: np.ndarray, scores: np.ndarray, label: np.ndarray) -> np.ndarray:
  """0-based position of the positive after a stable descending sort of ``scores`` (ties keep the
  retrieval order); N (= a miss) where ``label`` >= N."""
  n = candidates.shape[1]
  order = np.argsort(-scores, axis=1, kind="stable")
  hit = order == np.minimum(label, n - 1)[:, None]
  return np.where(label < n, hit.argmax(1), n)


def train(cfg: TrainConfig, train_lists: Lists, valid_lists: Lists | None, item_vectors, *,
          valid_metric=None, log=print):
  """Listwise training with early stopping on ``valid_metric(positions) -> float`` (higher is better;
  default NDCG@10) of ``valid_lists``. Returns (model, best params, history of (step, valid metric)).
  ``valid_lists=None``: ``cfg.epochs`` epochs without validation, the final parameters."""
  from mvhan_jax import evaluation  # pylint: disable=import-outside-toplevel
  if valid_metric is None:
    valid_metric = lambda pos: evaluation.leave_one_out_metrics(pos, (10,))["NDCG@10"]  # noqa: E731
  model = make_model(cfg)
  item_vectors = jnp.asarray(item_vectors)
  rng = np.random.default_rng(cfg.seed)
  b = min(cfg.batch_size, len(train_lists))
  init_batch = _device_batch(train_lists, np.arange(b))
  params = model.init(jax.random.key(cfg.seed), *init_batch[:4], item_vectors)
  tx = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, dense, cand, hist, hmask, valid, label):
    def loss_fn(p):
      return listwise_loss(model.apply(p, dense, cand, hist, hmask, item_vectors), label, valid)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  def validate():
    if valid_lists is None:
      return float("nan")
    scores = score_lists(model, params, valid_lists, item_vectors)
    return valid_metric(reranked_positions(valid_lists.candidates[:, :valid_lists.retrieved], scores,
                                           valid_lists.label))

  steps_per_epoch = max(len(train_lists) // b, 1)
  every = cfg.eval_every or steps_per_epoch
  best, best_params, history, bad, t = validate(), params, [], 0, 0
  history.append((0, best))
  log(f"step 0: valid {best:.4f} (the retrieval order)")
  done = False
  for epoch in range(cfg.epochs):
    perm = rng.permutation(len(train_lists))
    losses = []
    for i in range(steps_per_epoch):
      params, opt, loss = step(params, opt, *_device_batch(train_lists, perm[i * b:(i + 1) * b]))
      losses.append(loss)
      t += 1
      if t % every == 0:
        m = validate()
        history.append((t, m))
        log(f"epoch {epoch} step {t}: loss {float(np.mean(losses)):.4f} valid {m:.4f}")
        if valid_lists is None or m > best:
          best, best_params, bad = m, params, 0
        else:
          bad += 1
          if bad >= cfg.patience and cfg.patience > 0:
            done = True
            break
    if done:
      break
  return model, best_params, history


def build_lists(retrieved: dict, counts: CountFeatures, users, history, history_len, *, temperature: float,
                num_candidates: int, maxlen: int) -> Lists:
  """`Lists` from `rerank.retrieved_lists` output and the queries' users / left-aligned histories:
  dense = retrieval features (logit = score / temperature) then the count features."""
  cand = retrieved["candidates"]
  valid = cand >= 0
  logits = np.where(valid, retrieved["scores"], 0.0) / temperature
  dense = np.concatenate([retrieval_features(logits, valid, retrieved["ranks"], num_candidates),
                          counts.dense(users, history, history_len, cand)], -1)
  hist, hmask = recent_history(history, history_len, maxlen)
  return Lists(cand.astype(np.int32), dense, np.asarray(retrieved["label"], np.int32), hist, hmask, num_candidates)


def cross_validate(cfg: TrainConfig, lists: Lists, item_vectors, folds: int = 5, log=print):
  """Epochs to train on all of ``lists``, chosen by ``folds``-fold cross-validation over its queries
  (fold assignment seeded by ``cfg.seed``): per fold, ``cfg.epochs`` epochs on the other folds with the
  held-out fold's NDCG@10 after every epoch. Returns (best epoch count >= 1, mean curve [epochs + 1],
  index 0 = the retrieval order)."""
  fold = np.random.default_rng(cfg.seed).permutation(len(lists)) % folds
  curves = []
  for k in range(folds):
    tr, ho = lists.take(np.flatnonzero(fold != k)), lists.take(np.flatnonzero(fold == k))
    c = dataclasses.replace(cfg, patience=0, eval_every=max(len(tr) // min(cfg.batch_size, len(tr)), 1))
    _, _, hist = train(c, tr, ho, item_vectors, log=lambda s: None)
    curves.append([h[1] for h in hist])
    log(f"fold {k}: held-out NDCG@10 per epoch {np.round(curves[-1], 4).tolist()}")
  curve = np.mean(curves, 0)
  return max(int(np.argmax(curve)), 1), curve
