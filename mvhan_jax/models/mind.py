"""Multi-interest retrieval models: MIND (Li et al., CIKM'19) and ComiRec-DR / ComiRec-SA (Cen et al.,
KDD'20). The extraction layers live in ``interest.py``.

Interface (the TwoTower interface plus multi-interest outputs; ``multi_interest = True`` tells the
trainer which one to use):
  encode_users(batch, tables, train) -> (interests [B, K, D], mask [B, K] bool)
  encode_items(item_ids [N], tables, train) -> [N, D]
  readout(interests, mask, target_emb [B, D], train) -> [B, D]   the training-time user vector
  __call__(batch, tables, train) -> (readout [B, D], target items [B, D]); creates every parameter.

Routing randomness: MIND draws its initial routing logits from the 'routing' RNG stream, so ``init``
and every ``apply`` of a MIND model need ``rngs={'routing': key}``. The draws are keyed by user id
(``interest.B2IRouting``), so with a fixed key at evaluation a user's vectors are the same whatever
its row or batch. The ComiRec models are deterministic and ignore that stream.

Feature tables: ``tables = {'user': {name: [U, ...]}, 'item': {name: [I, ...]}}`` are passed to
``apply`` as constants and gathered by id, as in ``two_tower.py``. Histories are left-aligned and
masked with ``history_len`` only (item id 0 is a real item).
"""

from __future__ import annotations

from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvhan_jax import precision
from mvhan_jax.features import DataSpec, FeatureSpec
from mvhan_jax.layers import MLP, FieldEmbedding, gather_rows, l2_normalize, recency_weights
from mvhan_jax.models.interest import (B2IRouting, ComiRecDR as ComiRecDRLayer, SelfAttentiveExtractor,
                                       check_softmax_axis, history_mask, interest_mask, label_aware_attention)


def _check_power(power):
  if power != "hard" and (isinstance(power, str) or power < 0):
    raise ValueError(f"model.label_power={power!r} must be a float >= 0 or 'hard'")


class _MultiInterest(nn.Module):
  """Shared item tower and readout. Subclasses define ``setup`` and ``encode_users``.

  Attributes (common):
    num_items: catalogue size I.
    user_specs / item_specs: side fields of users and items.
    dim: D, the embedding, interest and item width.
    num_interests: K.
    label_power: training readout, a float p >= 0 (label-aware attention) or 'hard' (argmax).
    normalize: L2-normalise interests, items and the readout (cosine scores; the trainer applies the
      loss temperature).
    item_fields: item embedding = mean of the id embedding and the item's field tokens (MIND Sec. 3,
      "average of id and attribute embeddings"); False: the id embedding alone.
  """

  num_items: int
  user_specs: Sequence[FeatureSpec]
  item_specs: Sequence[FeatureSpec]
  dim: int = 64
  num_interests: int = 4
  label_power: Union[float, str] = 1.0
  normalize: bool = True
  item_fields: bool = True

  multi_interest = True  # not a dataclass field: the trainer checks it on the class

  def _setup_items(self):
    _check_power(self.label_power)
    if self.num_interests < 1:
      raise ValueError(f"model.num_interests={self.num_interests} must be >= 1")
    self.item_id_embed = nn.Embed(self.num_items, self.dim, embedding_init=nn.initializers.normal(0.05))
    if self.item_fields and self.item_specs:
      self.item_field_embed = FieldEmbedding(self.item_specs, self.dim)

  def _out(self, x: jax.Array) -> jax.Array:
    return l2_normalize(x, zero_safe=False) if self.normalize else x

  def item_embedding(self, item_ids: jax.Array, tables) -> jax.Array:
    """Un-normalised item embedding of ids of any shape [...] -> [..., D] (used for behaviours too).

    MIND Sec. 3: the mean of the id embedding and the attribute-field tokens, the same for behaviours
    and for the label / candidate items.
    """
    shape = item_ids.shape
    flat = item_ids.reshape(-1)
    if self.item_fields and self.item_specs and flat.shape[0] > self.num_items:
      # More lookups than items (a [B, L] history of a small catalogue): embed the whole catalogue
      # once and gather rows. Same values; the backward pass scatters into I rows, not B*L*F.
      # take_rows: under bfloat16 compute that scatter stays float32 (mvhan_jax/precision.py).
      catalogue = self._embed_rows(jnp.arange(self.num_items), tables)
      return precision.take_rows(catalogue, flat).reshape(*shape, self.dim)
    return self._embed_rows(flat, tables).reshape(*shape, self.dim)

  def _embed_rows(self, flat: jax.Array, tables) -> jax.Array:
    emb = self.item_id_embed(flat)
    if self.item_fields and self.item_specs:
      tokens = self.item_field_embed(gather_rows(tables["item"], flat))  # [N, F, D]
      emb = (emb + jnp.sum(tokens, axis=1)) / (1 + tokens.shape[1])
    return emb

  def encode_items(self, item_ids: jax.Array, tables, train: bool = False) -> jax.Array:
    """item_ids: int [N]. Returns [N, D]."""
    return self._out(self.item_embedding(item_ids, tables))

  def readout(self, interests: jax.Array, mask: jax.Array, target_emb: jax.Array,
              train: bool = False) -> jax.Array:
    """MIND Sec. 4.3 label-aware attention (or ComiRec's hard readout). [B, K, D], [B, K], [B, D] -> [B, D].

    With ``normalize`` the soft mixture is re-normalised so the training score stays a cosine (a 'hard'
    readout already is one).
    """
    v = label_aware_attention(interests, mask, target_emb, self.label_power)
    return self._out(v) if self.label_power != "hard" else v

  def __call__(self, batch, tables, train: bool = False):
    """Creates every parameter. Returns (readout [B, D], target item embeddings [B, D])."""
    interests, mask = self.encode_users(batch, tables, train)
    items = self.encode_items(batch["target"], tables, train)
    return self.readout(interests, mask, items, train), items


class MIND(_MultiInterest):
  """MIND (Li et al., CIKM'19): B2I dynamic routing with dynamic K'_u, then per-capsule ReLU layers.

  Attributes (beyond the common ones):
    hidden: ReLU widths applied to [capsule ; profile tokens]; a final linear layer maps to D (a ReLU
      output would confine interests to the positive orthant while item embeddings are signed).
    routing_iterations / routing_sigma / softmax_axis: see ``interest.B2IRouting`` (paper: 3, 1,
      'interests').
    dynamic_k: use K'_u = max(1, min(K, floor(log2 |I_u|))) live interests (paper Sec. 4.2);
      False: all K live.
    dropout: after every hidden layer.
    recency_weights: scale each behaviour by a learned weight of its distance from the newest one
      before routing (n * softmax over the real positions of per-distance logits, all 1 at init, so
      the model starts as the paper's; routing itself is order-blind). Default off (the paper).
    maxlen: distances with a learned weight (older behaviours share the last), for recency_weights.

  MIND-1 is ``num_interests=1`` (routing then has a single capsule: a squashed weighted sum).
  """

  hidden: Sequence[int] = (256,)
  routing_iterations: int = 3
  routing_sigma: float = 1.0
  softmax_axis: str = "interests"
  dynamic_k: bool = True
  dropout: float = 0.0
  recency_weights: bool = False
  maxlen: int = 50

  def setup(self):
    check_softmax_axis(self.softmax_axis)  # fail before any embedding work, naming the config field
    self._setup_items()
    if self.recency_weights:
      self.recency_logits = self.param("recency_logits", nn.initializers.zeros, (self.maxlen,))
    if self.user_specs:
      self.user_fields = FieldEmbedding(self.user_specs, self.dim)
    self.routing = B2IRouting(self.num_interests, self.dim, self.routing_iterations, self.routing_sigma,
                              self.softmax_axis)
    self.user_mlp = MLP(self.hidden, self.dim, self.dropout)

  def encode_users(self, batch, tables, train: bool = False):
    """MIND Sec. 4 (Fig. 2). batch: 'user' [B], 'history' [B, L], 'history_len' [B].

    Returns (interests [B, K, D], mask [B, K]); dead interests are exact zeros.
    """
    history, history_len = batch["history"], batch["history_len"]
    B, L = history.shape
    bmask = history_mask(history_len, L)
    if self.dynamic_k:
      imask = interest_mask(history_len, self.num_interests)
    else:
      imask = jnp.ones((B, self.num_interests), bool)
    behaviours = self.item_embedding(history, tables)  # [B, L, D]
    if self.recency_weights:
      # The two-tower's recency pooling weights, times n: all 1 at init (zero logits).
      w = recency_weights(self.recency_logits, history_len, L)  # [B, L], sums to 1 over real ones
      behaviours = behaviours * (w * jnp.sum(bmask, axis=1, keepdims=True))[..., None]
    capsules = self.routing(behaviours, bmask, imask, batch["user"])  # [B, K, D]
    x = capsules
    if self.user_specs:
      profile = self.user_fields(gather_rows(tables["user"], batch["user"])).reshape(B, 1, -1)  # [B, 1, F*D]
      x = jnp.concatenate([capsules, jnp.broadcast_to(profile, (B, self.num_interests, profile.shape[-1]))], -1)
    h = self.user_mlp(x, train=train)
    # A dead interest's row is replaced by a constant before normalising: without profile features the
    # MLP can map its zero capsule to exactly zero, and |x|'s gradient at 0 is NaN. Live rows are
    # unchanged, and dead rows are zeroed below either way.
    v = self._out(jnp.where(imask[..., None], h, 1.0))
    # The MLP maps a dead (zero) capsule to a non-zero vector: zero it so it can never be retrieved.
    return v * imask[..., None], imask


class _ComiRec(_MultiInterest):
  """Common ComiRec user-tower plumbing: fixed K (mask all ones), no profile fields (ComiRec has none),
  items embedded by id alone by default (``item_fields=False``, as the official code), 'hard' readout."""

  label_power: Union[float, str] = "hard"
  normalize: bool = False
  item_fields: bool = False
  maxlen: int = 50

  def _extract(self, H, bmask):
    raise NotImplementedError

  def encode_users(self, batch, tables, train: bool = False):
    """batch: 'history' [B, L], 'history_len' [B]. Returns (interests [B, K, D], mask [B, K] all True)."""
    history, history_len = batch["history"], batch["history_len"]
    B, L = history.shape
    if L > self.maxlen:
      raise ValueError(f"history length {L} exceeds model.maxlen={self.maxlen}: raise model.maxlen or "
                       "truncate the histories")
    V = self._extract(self.item_embedding(history, tables), history_mask(history_len, L))
    return self._out(V), jnp.ones((B, self.num_interests), bool)


class ComiRecDR(_ComiRec):
  """ComiRec-DR (Cen et al., KDD'20, Sec. 3.2): capsule routing with a map per (position, interest),
  zero initial logits, softmax over interests (``interest.comirec_dr_routing``)."""

  routing_iterations: int = 3

  def setup(self):
    self._setup_items()
    self.extractor = ComiRecDRLayer(self.num_interests, self.dim, self.maxlen, self.routing_iterations)

  def _extract(self, H, bmask):
    return self.extractor(H, bmask)


class ComiRecSA(_ComiRec):
  """ComiRec-SA (Cen et al., KDD'20, Sec. 3.2, Eq. 5-6): self-attentive extractor
  (``interest.SelfAttentiveExtractor``)."""

  def setup(self):
    self._setup_items()
    self.extractor = SelfAttentiveExtractor(self.num_interests, self.dim, self.maxlen)

  def _extract(self, H, bmask):
    return self.extractor(H, bmask)


def _power(cfg, default):
  p = cfg.get("label_power", default)
  if p != "hard" and isinstance(p, str):
    raise ValueError(f"model.label_power={p!r} must be a float >= 0 or 'hard'")
  return p if p == "hard" else float(p)


def _common_kwargs(cfg, spec: DataSpec, power, normalize: bool, item_fields: bool) -> dict:
  """Arguments every multi-interest model reads the same way; defaults differ per paper."""
  return dict(
      num_items=spec.num_items,
      user_specs=spec.user_specs,
      item_specs=spec.item_specs,
      dim=cfg.dim,
      num_interests=cfg.get("num_interests", 4),
      label_power=_power(cfg, power),
      normalize=cfg.get("normalize", normalize),
      item_fields=cfg.get("item_fields", item_fields),
  )


def mind_from_config(cfg, spec: DataSpec) -> MIND:
  return MIND(
      **_common_kwargs(cfg, spec, power=1.0, normalize=True, item_fields=True),
      hidden=tuple(cfg.get("hidden", (256,))),
      routing_iterations=cfg.get("routing_iterations", 3),
      routing_sigma=cfg.get("routing_sigma", 1.0),
      softmax_axis=cfg.get("softmax_axis", "interests"),
      dynamic_k=cfg.get("dynamic_k", True),
      dropout=cfg.get("dropout", 0.0),
      recency_weights=cfg.get("recency_weights", False),
      maxlen=cfg.get("maxlen", 50),
  )


def _comirec_kwargs(cfg, spec: DataSpec) -> dict:
  return dict(**_common_kwargs(cfg, spec, power="hard", normalize=False, item_fields=False), maxlen=cfg.maxlen)


def comirec_dr_from_config(cfg, spec: DataSpec) -> ComiRecDR:
  return ComiRecDR(routing_iterations=cfg.get("routing_iterations", 3), **_comirec_kwargs(cfg, spec))


def comirec_sa_from_config(cfg, spec: DataSpec) -> ComiRecSA:
  return ComiRecSA(**_comirec_kwargs(cfg, spec))


MODELS = {
    "mind": mind_from_config,
    "comirec_dr": comirec_dr_from_config,
    "comirec_sa": comirec_sa_from_config,
}
