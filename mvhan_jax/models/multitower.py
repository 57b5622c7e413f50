"""Multi-tower multi-interest retrieval with user representation repel (Xiong, Yu; arXiv 2403.05122).

The paper was withdrawn and only its abstract is public. The abstract names three problems of
multi-interest models: (1) the training objective differs from the deployed one, (2) item side
information is not used (id-only item embeddings), (3) single-tower architectures, where the user
model and the items share one embedding table, are hard to deploy. It proposes a multi-tower
framework with "user representation repel". Everything below is a reconstruction; each choice is
listed so that it can be changed.

Reconstruction choices:
  R1 User tower = any multi-interest extractor of ``mind.py`` (``extractor`` = 'mind', 'comirec_sa'
     or 'comirec_dr'), reused as a submodule with its own behaviour-embedding table: it emits K
     interests ``[B, K, D]`` and a live mask ``[B, K]`` (MIND's dynamic K'_u; all K for ComiRec).
     Interests are L2-normalised (cosine scores; the loss temperature sets the sharpness).
  R2 Item tower = a separate tower: its own id embedding concatenated with one token per item side
     field (genres / year / title words on MovieLens; type / category / tags / author / genre /
     buckets / text and image vectors on the synthetic world: whatever ``InteractionData`` carries),
     a ReLU MLP and L2 normalisation. Only its output is indexed; the behaviour table of the user
     tower is never served. Nothing is shared between the towers (the abstract's point 3).
  R3 Cold items: when ``tables['item']`` holds ``KNOWN_ITEMS_KEY`` (float [I], 1 = seen in training)
     and ``drop_unseen_ids`` is set, the id embedding of an unseen item is replaced by zeros, so its
     vector comes from its features alone (an untrained id row is random noise). ``id_dropout`` > 0
     also drops the id embedding of random training items, so the MLP learns to work without it.
  R4 Train = serve: every candidate, the positive and each shared sampled negative, is scored with
     the serving score s(u, i) = max_k <v_u^k, e_i> over live interests inside the sampled softmax
     with logQ correction and accidental-hit removal (``training='serve'``; the trainer calls
     ``score_candidates``). ``score='lse'`` replaces the max by the smooth
     tau * logsumexp_k(<v_u^k, e_i> / tau) (``lse_temperature`` = tau; -> max as tau -> 0); serving is
     always the max (what an ANN index over the interests computes). ``training='argmax'`` is the
     MIND/ComiRec training readout (the interest closest to the positive scores every candidate),
     kept for the ablation.
  R5 Repel: a regulariser on each user's live interests, weighted by ``repel_weight`` (lambda_rep)
     and added to the loss through ``aux_loss``:
       'hinge':   sum over live pairs k < l of max(0, cos(v^k, v^l) - m), m = ``repel_margin``
                  (zero once every pair is at most m-similar; zero for orthogonal interests, m >= 0);
       'infonce': for each live interest k, -log softmax over the user's live interests l of
                  cos(v^k, v^l) / tau_rep with k itself as the positive, i.e.
                  log(1 + sum_{l != k} exp((cos(v^k, v^l) - 1) / tau_rep)), averaged over k; it
                  increases monotonically with every pairwise cosine (minimum at cos = -1, not 0);
       'none':    off.
     Both are averaged over the users of the batch; users with one live interest contribute 0.
     Dead interests are excluded from every pair.
  R6 Sampled softmax with the trainer's shared negatives, logQ and temperature (the foundation's
     loss), not a new loss: only the score function changes.

Interface: the multi-interest interface of ``mind.py`` (``multi_interest = True``, ``encode_users``
-> (interests, mask), ``encode_items``, ``readout``) plus ``score_candidates`` and ``aux_loss``,
which the trainer uses when present (``train_equals_serve`` selects R4).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvhan_jax.features import DataSpec, FeatureSpec
from mvhan_jax.layers import MLP, FieldEmbedding, gather_rows, l2_normalize
from mvhan_jax.models import mind
from mvhan_jax.models.interest import label_aware_attention

KNOWN_ITEMS_KEY = "_known_item"  # optional tables['item'] entry, float [I]: 1 = seen in training
EXTRACTORS = ("mind", "comirec_sa", "comirec_dr")
TRAININGS = ("serve", "argmax")
SCORES = ("max", "lse")
REPELS = ("none", "hinge", "infonce")
_NEG = -1e9


def interest_scores(interests: jax.Array, mask: jax.Array, cand: jax.Array, score: str = "max",
                    lse_temperature: float = 0.1) -> jax.Array:
  """Serving score of every candidate for every user (R4).

  Args:
    interests: v_u^k, float [B, K, D].
    mask: bool [B, K], live interests (each row needs one).
    cand: e_i, float [N, D].
    score: 'max' (max_k <v_u^k, e_i>) or 'lse' (tau * logsumexp_k(<v_u^k, e_i> / tau)).
    lse_temperature: tau of 'lse'.

  Returns:
    float [B, N]. Dead interests never contribute: they are replaced by a -1e9 score before the max
    (or the log-sum-exp, where exp underflows to exactly 0).
  """
  # One [B*K, D] x [D, N] matmul: XLA:CPU runs the 3-D einsum 'bkd,nd->bkn' (and its gradient) 2-3x
  # slower at B = 128-256 (experiments/results/bench/README.md, multi-tower).
  B, K, D = interests.shape
  s = (interests.reshape(B * K, D) @ cand.T).reshape(B, K, cand.shape[0])
  return _reduce_interests(jnp.where(mask[:, :, None], s, _NEG), score, lse_temperature)


def paired_interest_scores(interests: jax.Array, mask: jax.Array, targets: jax.Array, score: str = "max",
                           lse_temperature: float = 0.1) -> jax.Array:
  """`interest_scores` of each user's own candidate only: the diagonal of ``interest_scores(interests,
  mask, targets)`` without the [B, K, B] scores around it. targets float [B, D]. Returns [B]."""
  s = jnp.sum(interests * targets[:, None, :], axis=-1)  # <v_b^k, t_b>, [B, K]
  return _reduce_interests(jnp.where(mask, s, _NEG), score, lse_temperature)


def _reduce_interests(s: jax.Array, score: str, lse_temperature: float) -> jax.Array:
  """max or tau * logsumexp(. / tau) over axis 1 (the interests) of masked scores."""
  if score == "max":
    return jnp.max(s, axis=1)
  if score == "lse":
    return lse_temperature * jax.nn.logsumexp(s / lse_temperature, axis=1)
  raise ValueError(f"model.score={score!r} is unknown: use one of {SCORES}")


def pairwise_cosine(interests: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos(v^k, v^l) [B, K, K] and the bool [B, K, K] mask of live pairs k < l."""
  v = l2_normalize(interests)
  cos = jnp.einsum("bkd,bld->bkl", v, v)
  K = interests.shape[1]
  upper = jnp.triu(jnp.ones((K, K), bool), k=1)
  return cos, mask[:, :, None] & mask[:, None, :] & upper[None]


def repel_hinge(interests: jax.Array, mask: jax.Array, margin: float = 0.0) -> jax.Array:
  """R5 'hinge': sum_{k<l live} max(0, cos(v^k, v^l) - margin), mean over users. [B,K,D],[B,K] -> []."""
  cos, pairs = pairwise_cosine(interests, mask)
  per_user = jnp.sum(jnp.where(pairs, jax.nn.relu(cos - margin), 0.0), axis=(1, 2))
  return jnp.mean(per_user)


def repel_infonce(interests: jax.Array, mask: jax.Array, temperature: float = 0.1) -> jax.Array:
  """R5 'infonce': mean over live k of log(1 + sum_{l != k live} exp((cos_kl - 1) / tau)), mean over
  users; each interest is the positive of its own softmax and the user's other interests are its
  negatives. [B, K, D], [B, K] -> []."""
  v = l2_normalize(interests)
  cos = jnp.einsum("bkd,bld->bkl", v, v)
  K = interests.shape[1]
  others = mask[:, :, None] & mask[:, None, :] & ~jnp.eye(K, dtype=bool)[None]
  # Written as log(1 + sum) with the self-similarity (exactly 1 in exact arithmetic) factored out, so
  # that rounding of |v|^2 cannot make the term of a lone interest non-zero.
  terms = jnp.where(others, jnp.exp((cos - 1.0) / temperature), 0.0)
  per_interest = jnp.log1p(jnp.sum(terms, axis=2))  # [B, K]
  per_user = jnp.sum(jnp.where(mask, per_interest, 0.0), 1) / jnp.maximum(jnp.sum(mask, 1), 1)
  return jnp.mean(per_user)


def mean_pairwise_cosine(interests: np.ndarray, mask: np.ndarray) -> float:
  """Diagnostic: mean over users with >= 2 live interests of the mean cosine between their live
  interests (NaN when no user has two). [Q, K, D], [Q, K] -> float."""
  v = np.asarray(interests, np.float64)
  v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)
  mask = np.asarray(mask, bool)
  cos = np.einsum("qkd,qld->qkl", v, v)
  K = v.shape[1]
  pairs = mask[:, :, None] & mask[:, None, :] & np.triu(np.ones((K, K), bool), 1)[None]
  n = pairs.sum((1, 2))
  keep = n > 0
  if not keep.any():
    return float("nan")
  return float(np.mean(np.where(pairs, cos, 0.0).sum((1, 2))[keep] / n[keep]))


class ItemTower(nn.Module):
  """R2/R3: id embedding + side-field tokens -> ReLU MLP -> L2-normalised [N, D].

  Attributes:
    num_items: I.
    item_specs: the item side fields.
    dim: D (token and output width).
    hidden: ReLU widths of the MLP.
    use_id: include the id embedding (False: features only).
    drop_unseen_ids: zero the id embedding of items marked unseen in ``tables['item'][KNOWN_ITEMS_KEY]``.
    id_dropout: probability of dropping a training item's id embedding (rng stream 'dropout').
  """

  num_items: int
  item_specs: Sequence[FeatureSpec]
  dim: int = 64
  hidden: Sequence[int] = (256,)
  use_id: bool = True
  drop_unseen_ids: bool = True
  id_dropout: float = 0.0

  @nn.compact
  def __call__(self, item_ids: jax.Array, tables, train: bool = False) -> jax.Array:
    """item_ids int [N] -> [N, D]."""
    parts = []
    if self.use_id:
      emb = nn.Embed(self.num_items, self.dim, embedding_init=nn.initializers.normal(0.05), name="id_embed")(item_ids)
      keep = jnp.ones(item_ids.shape, emb.dtype)
      known = tables["item"].get(KNOWN_ITEMS_KEY)
      if known is not None and self.drop_unseen_ids:
        keep = keep * jnp.take(known, item_ids, axis=0).astype(emb.dtype)
      if train and self.id_dropout > 0:
        keep = keep * jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.id_dropout, item_ids.shape)
      parts.append(emb * keep[:, None])
    if self.item_specs:
      specs = [s for s in self.item_specs if s.name != KNOWN_ITEMS_KEY]
      tokens = FieldEmbedding(specs, self.dim, name="fields")(gather_rows(
          {s.name: tables["item"][s.name] for s in specs}, item_ids))
      parts.append(tokens.reshape(tokens.shape[0], -1))
    if not parts:
      raise ValueError("model.item_id=False needs item side features: the dataset has none")
    x = MLP(self.hidden, self.dim, name="mlp")(jnp.concatenate(parts, axis=-1), train=train)
    return l2_normalize(x)


class MultiTower(nn.Module):
  """Multi-tower multi-interest model (see the module docstring for R1-R6).

  Attributes:
    user_tower: a ``mind.MIND`` / ``mind.ComiRecSA`` / ``mind.ComiRecDR`` module (R1); only its
      ``encode_users`` is used.
    item_tower: an ``ItemTower`` (R2, R3).
    training: 'serve' (R4, train = serve) or 'argmax' (MIND/ComiRec hard readout).
    score: 'max' or 'lse' (training score under 'serve').
    lse_temperature: tau of 'lse'.
    repel: 'none', 'hinge' or 'infonce' (R5).
    repel_weight: lambda_rep.
    repel_margin: m of 'hinge'.
    repel_temperature: tau_rep of 'infonce'.
  """

  user_tower: nn.Module
  item_tower: nn.Module
  training: str = "serve"
  score: str = "max"
  lse_temperature: float = 0.1
  repel: str = "hinge"
  repel_weight: float = 0.1
  repel_margin: float = 0.0
  repel_temperature: float = 0.1

  multi_interest = True

  @property
  def train_equals_serve(self) -> bool:
    return self.training == "serve"

  def encode_users(self, batch, tables, train: bool = False):
    """batch: 'user' [B], 'history' [B, L], 'history_len' [B] -> (interests [B, K, D], mask [B, K])."""
    interests, mask = self.user_tower.encode_users(batch, tables, train)
    # ComiRec towers may run un-normalised; the multi-tower score is always a cosine (R1).
    return l2_normalize(interests) * mask[..., None], mask

  def encode_items(self, item_ids: jax.Array, tables, train: bool = False) -> jax.Array:
    """item_ids int [N] -> [N, D], the only vectors that are indexed (R2)."""
    return self.item_tower(item_ids, tables, train)

  def readout(self, interests, mask, target_emb, train: bool = False) -> jax.Array:
    """'argmax' training readout: the live interest closest to the target. [B, K, D] -> [B, D]."""
    return label_aware_attention(interests, mask, target_emb, "hard")

  def score_candidates(self, interests, mask, cand_emb, train: bool = False) -> jax.Array:
    """R4: serving scores [B, N] of shared candidates ``cand_emb`` [N, D] (before the temperature)."""
    return interest_scores(interests, mask, cand_emb, self.score if train else "max", self.lse_temperature)

  def score_targets(self, interests, mask, target_emb, train: bool = False) -> jax.Array:
    """R4 for each user's own target ``target_emb`` [B, D] only: [B], the diagonal of
    ``score_candidates(interests, mask, target_emb)`` at 1/B of its cost (the training positives)."""
    return paired_interest_scores(interests, mask, target_emb, self.score if train else "max",
                                  self.lse_temperature)

  def aux_loss(self, interests, mask) -> jax.Array:
    """R5: lambda_rep * repel(interests, mask), a scalar (0 when ``repel='none'``)."""
    if self.repel == "none" or self.repel_weight == 0:
      return jnp.zeros((), interests.dtype)
    if self.repel == "hinge":
      return self.repel_weight * repel_hinge(interests, mask, self.repel_margin)
    return self.repel_weight * repel_infonce(interests, mask, self.repel_temperature)

  def __call__(self, batch, tables, train: bool = False):
    """Creates every parameter. Returns (readout [B, D], target item vectors [B, D])."""
    interests, mask = self.encode_users(batch, tables, train)
    items = self.encode_items(batch["target"], tables, train)
    return self.readout(interests, mask, items, train), items


def _check(cfg, field, value, allowed):
  if value not in allowed:
    raise ValueError(f"model.{field}={value!r} is unknown: use one of {allowed}")


def from_config(cfg, spec: DataSpec) -> MultiTower:
  """``config.model``: extractor (+ that extractor's own fields, see ``mind.py``), item_hidden,
  item_id, drop_unseen_ids, id_dropout, training, score, lse_temperature, repel, repel_weight,
  repel_margin, repel_temperature."""
  extractor = cfg.get("extractor", "mind")
  _check(cfg, "extractor", extractor, EXTRACTORS)
  _check(cfg, "training", cfg.get("training", "serve"), TRAININGS)
  _check(cfg, "score", cfg.get("score", "max"), SCORES)
  _check(cfg, "repel", cfg.get("repel", "hinge"), REPELS)
  if cfg.get("lse_temperature", 0.1) <= 0 or cfg.get("repel_temperature", 0.1) <= 0:
    raise ValueError("model.lse_temperature and model.repel_temperature must be > 0")
  if cfg.get("repel_weight", 0.1) < 0:
    raise ValueError(f"model.repel_weight={cfg.get('repel_weight')} must be >= 0")
  user_cfg = ml_collections.ConfigDict(cfg.to_dict())
  user_cfg.name = extractor
  user_cfg.normalize = True
  user_cfg.label_power = "hard"
  user_tower = mind.MODELS[extractor](user_cfg, spec)
  item_tower = ItemTower(
      num_items=spec.num_items, item_specs=spec.item_specs, dim=cfg.dim,
      hidden=tuple(cfg.get("item_hidden", (256,))), use_id=cfg.get("item_id", True),
      drop_unseen_ids=cfg.get("drop_unseen_ids", True), id_dropout=cfg.get("id_dropout", 0.0))
  return MultiTower(
      user_tower=user_tower, item_tower=item_tower,
      training=cfg.get("training", "serve"), score=cfg.get("score", "max"),
      lse_temperature=cfg.get("lse_temperature", 0.1), repel=cfg.get("repel", "hinge"),
      repel_weight=cfg.get("repel_weight", 0.1), repel_margin=cfg.get("repel_margin", 0.0),
      repel_temperature=cfg.get("repel_temperature", 0.1))


MODELS: dict[str, Any] = {"multitower": from_config}
