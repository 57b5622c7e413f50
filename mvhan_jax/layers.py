"""Layers shared by every model: field embeddings, pooling, MLPs, row gathers, L2 normalisation."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvhan_jax.features import FeatureSpec


def l2_normalize(x: jax.Array, eps: float = 1e-6, zero_safe: bool = True) -> jax.Array:
  """``x / max(|x|, eps)`` along the last axis.

  ``zero_safe`` (default): the norm is taken as rsqrt(max(|x|^2, eps^2)), not max(|x|, eps): the
  gradient of |x| at an all-zero row (a dead interest, a padded row) is NaN, and NaN * 0 is still
  NaN. ``zero_safe=False`` divides by max(|x|, eps) as written: the same values, gradients that
  differ in the last bit, which over thousands of steps moves a run's trajectory; the two-tower,
  MIND/ComiRec and MV-HAN towers (whose outputs are never all-zero) keep it so that their recorded
  results reproduce exactly.
  """
  if not zero_safe:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def gather_rows(table: dict[str, jax.Array], ids: jax.Array) -> dict[str, jax.Array]:
  """Rows ``ids`` of every array of a feature table (name -> [N, ...]): name -> [ids.shape, ...]."""
  return {name: jnp.take(arr, ids, axis=0) for name, arr in table.items()}


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``x`` [..., L, D] over L where ``mask`` [..., L] is true; all-masked rows give 0."""
  m = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)


def recency_weights(logits: jax.Array, history_len: jax.Array, L: int) -> jax.Array:
  """Softmax over each left-aligned history's real positions of learned per-distance logits.

  logits: float [maxlen], indexed by the distance from the most recent behaviour (0 for the one at
  ``history_len - 1``; distances >= maxlen share the last logit). history_len: int [B].
  Returns [B, L]: each row sums to 1 over its first ``history_len`` positions, exactly 0 on padding
  (all 0 for an empty history).
  """
  pos = jnp.arange(L)[None, :]
  mask = pos < history_len[:, None]
  dist = jnp.clip(history_len[:, None] - 1 - pos, 0, logits.shape[0] - 1)
  return jax.nn.softmax(jnp.where(mask, logits[dist], -1e9), axis=-1) * mask


class FieldEmbedding(nn.Module):
  """One ``dim``-wide token per feature field (the "embedding layer" of two-tower models).

  Categorical fields are looked up, multi-valued fields are looked up and mean-pooled over their
  non-zero ids (0 is padding), dense fields are projected by a linear map.

  Attributes:
    specs: the fields, in order.
    dim: token width D.
  """

  specs: Sequence[FeatureSpec]
  dim: int
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(0.05)

  @nn.compact
  def __call__(self, features: dict[str, jax.Array]) -> jax.Array:
    """features: name -> [N] int, [N, M] int or [N, F] float. Returns [N, len(specs), D]."""
    tokens = []
    for spec in self.specs:
      x = features[spec.name]
      if spec.kind == "dense":
        tokens.append(nn.Dense(self.dim, name=f"{spec.name}_proj")(x.astype(jnp.float32)))
        continue
      table = nn.Embed(spec.size, self.dim, embedding_init=self.embedding_init, name=f"{spec.name}_embed")
      if spec.kind == "categorical":
        tokens.append(table(x))
      else:
        tokens.append(masked_mean(table(x), x > 0))
    return jnp.stack(tokens, axis=-2)


class MLP(nn.Module):
  """ReLU MLP with an optional linear output layer.

  Attributes:
    hidden: widths of the ReLU layers.
    out_dim: width of a final linear layer (None: no final layer).
    dropout: dropout rate after each ReLU layer.
  """

  hidden: Sequence[int]
  out_dim: int | None = None
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.out_dim is not None:
      x = nn.Dense(self.out_dim)(x)
    return x
