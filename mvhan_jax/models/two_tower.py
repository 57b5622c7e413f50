"""Two-tower retrieval baseline in the YouTube-DNN style (Covington et al., RecSys 2016, Sec. 3).

User tower: pooled embeddings of the user's history items (masked mean, or a learned recency-weighted
mean) concatenated with the profile fields -> MLP -> [B, D]. Item tower: item id + side fields
(genres, year, title words on MovieLens) -> MLP -> [I, D]. Score: inner product, or cosine when
``normalize`` (then the loss temperature sets the softmax sharpness). The history pooling and the item
tower share one item-id table, as YouTube-DNN shares its video embeddings.

Both towers read feature tables ``tables = {'user': {name: [U, ...]}, 'item': {name: [I, ...]}}``
that are passed to ``apply`` as constants, so the parameters stay a pure pytree and the data's
features never enter the parameter tree.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvhan_jax.features import DataSpec, FeatureSpec
from mvhan_jax.layers import MLP, FieldEmbedding, gather_rows, l2_normalize, masked_mean, recency_weights


class TwoTower(nn.Module):
  """Attributes:
    num_items: catalogue size I.
    user_specs / item_specs: side fields of users and items.
    dim: output width D (also the field-embedding width).
    hidden: ReLU widths of both towers' MLPs.
    pooling: 'mean' or 'recency' (softmax over learned per-recency-position logits, masked).
    maxlen: history length L (needed for 'recency').
    normalize: L2-normalise both towers' outputs (cosine score).
    dropout: after every hidden layer.
  """

  num_items: int
  user_specs: Sequence[FeatureSpec]
  item_specs: Sequence[FeatureSpec]
  dim: int = 64
  hidden: Sequence[int] = (256,)
  pooling: str = "mean"
  maxlen: int = 50
  normalize: bool = True
  dropout: float = 0.0

  def setup(self):
    self.item_id_embed = nn.Embed(self.num_items, self.dim, embedding_init=nn.initializers.normal(0.05))
    self.user_fields = FieldEmbedding(self.user_specs, self.dim)
    self.item_fields = FieldEmbedding(self.item_specs, self.dim)
    self.user_mlp = MLP(self.hidden, self.dim, self.dropout)
    self.item_mlp = MLP(self.hidden, self.dim, self.dropout)
    if self.pooling == "recency":
      self.recency_logits = self.param("recency_logits", nn.initializers.zeros, (self.maxlen,))
    elif self.pooling != "mean":
      raise ValueError(f"model.pooling={self.pooling!r} is unknown: use 'mean' or 'recency'")

  def _out(self, x: jax.Array) -> jax.Array:
    return l2_normalize(x, zero_safe=False) if self.normalize else x

  def pool_history(self, history: jax.Array, history_len: jax.Array) -> jax.Array:
    """history: int [B, L] left-aligned, most recent at history_len-1. Returns [B, D]."""
    L = history.shape[1]
    emb = self.item_id_embed(history)
    if self.pooling == "mean":
      return masked_mean(emb, jnp.arange(L)[None, :] < history_len[:, None])
    return jnp.einsum("bl,bld->bd", recency_weights(self.recency_logits, history_len, L), emb)

  def encode_users(self, batch: dict[str, jax.Array], tables, train: bool = False) -> jax.Array:
    """batch: 'user' [B], 'history' [B, L], 'history_len' [B]. Returns [B, D]."""
    pooled = self.pool_history(batch["history"], batch["history_len"])
    x = pooled
    if self.user_specs:  # a log without user features has none
      fields = self.user_fields(gather_rows(tables["user"], batch["user"]))  # [B, F, D]
      x = jnp.concatenate([pooled, fields.reshape(fields.shape[0], -1)], axis=-1)
    return self._out(self.user_mlp(x, train=train))

  def encode_items(self, item_ids: jax.Array, tables, train: bool = False) -> jax.Array:
    """item_ids: int [N]. Returns [N, D]."""
    x = self.item_id_embed(item_ids)
    if self.item_specs:
      fields = self.item_fields(gather_rows(tables["item"], item_ids))
      x = jnp.concatenate([x, fields.reshape(fields.shape[0], -1)], axis=-1)
    return self._out(self.item_mlp(x, train=train))

  def __call__(self, batch, tables, train: bool = False):
    return self.encode_users(batch, tables, train), self.encode_items(batch["target"], tables, train)


def from_config(cfg, spec: DataSpec) -> TwoTower:
  return TwoTower(
      num_items=spec.num_items,
      user_specs=spec.user_specs,
      item_specs=spec.item_specs,
      dim=cfg.dim,
      hidden=tuple(cfg.hidden),
      pooling=cfg.pooling,
      maxlen=cfg.maxlen,
      normalize=cfg.normalize,
      dropout=cfg.dropout,
  )
