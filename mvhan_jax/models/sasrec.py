"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): the library's
reference sequential baseline, trained by the retrieval task like every other user tower.

User tower: the left-aligned history ``history[:history_len]`` (newest at ``history_len - 1``) ->
item embeddings scaled by sqrt(D) (as the authors' code) + learned positional embeddings -> dropout
-> ``num_blocks`` transformer blocks (causal multi-head self-attention, point-wise two-layer ReLU
FFN of width D, residuals, layer norm before ('pre', the authors' code) or after ('post', the paper's
equations) each sub-layer, dropout) -> the output at the last valid position, ``history_len - 1``.
Padding positions (``>= history_len``; item 0 is a real item, so the mask is built from
``history_len``, never from the ids) are masked as keys and zeroed after every block; with causal
attention a position's output depends only on the items at or before it.

Item tower: the same item embedding the history reads (the paper's shared input/output embedding),
optionally plus the mean of the item's side-field tokens (``item_fields``), so ``encode_items``, the
ScaNN index and the evaluation see a plain two-tower interface. ``normalize``: L2-normalise both
outputs (cosine scores; the loss temperature sets the sharpness), as the two-tower does.

Positions: 'absolute' (default) indexes the position in the history window (0 = oldest kept item),
so the output at position p is exactly the output of the prefix ``history[:p+1]``: what the
all-positions loss (``encode_sequence``, ``config.loss.positions='all'`` in the retrieval task)
needs. 'recency' indexes the distance from the newest item (the authors' right-aligned layout): the
newest item always gets embedding 0, but a position's output then depends on the history length.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvhan_jax.features import DataSpec, FeatureSpec
from mvhan_jax.layers import FieldEmbedding, gather_rows, l2_normalize

POSITIONS = ("absolute", "recency")
NORMS = ("pre", "post")


class CausalBlock(nn.Module):
  """One SASRec block: causal self-attention then the point-wise FFN, each with a residual (also MV-HAN's
  causal behaviour encoder)."""

  dim: int
  num_heads: int
  dropout: float
  norm: str

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    """x: [B, L, D]; mask: bool [B, 1, L, L] (query, key) attention mask. Returns [B, L, D]."""
    attn = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=self.dim, out_features=self.dim, dropout_rate=self.dropout,
        broadcast_dropout=False, deterministic=not train, name="attention")
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)  # noqa: E731

    def ffn(y):
      y = drop(nn.relu(nn.Dense(self.dim, name="ffn_in")(y)))
      return drop(nn.Dense(self.dim, name="ffn_out")(y))

    if self.norm == "pre":
      h = nn.LayerNorm(epsilon=1e-8, name="attention_norm")(x)
      x = x + drop(attn(h, h, mask=mask))
      x = x + ffn(nn.LayerNorm(epsilon=1e-8, name="ffn_norm")(x))
    else:
      x = nn.LayerNorm(epsilon=1e-8, name="attention_norm")(x + drop(attn(x, x, mask=mask)))
      x = nn.LayerNorm(epsilon=1e-8, name="ffn_norm")(x + ffn(x))
    return x


def causal_stack(x: jax.Array, valid: jax.Array, blocks, final_norm, train: bool) -> jax.Array:
  """The causal blocks over embedded inputs x [B, L, D] (padding already zeroed), valid bool [B, L];
  ``final_norm`` (pre-LN) or None. Returns [B, L, D], zero at padding.

  Causal and padding: query q attends to the keys k <= q with k < history_len. A padding query
  (q >= history_len) still sees the valid keys, so nothing is all-masked unless history_len = 0 (then
  flax's masked softmax is uniform, still finite); padding outputs are zeroed after every block.
  """
  keep = valid[..., None].astype(x.dtype)
  mask = nn.combine_masks(nn.make_causal_mask(valid), nn.make_attention_mask(valid, valid))
  for block in blocks:
    x = block(x, mask, train) * keep
  if final_norm is not None:
    x = final_norm(x) * keep
  return x


class SASRec(nn.Module):
  """Attributes:
    num_items: catalogue size I.
    item_specs: side fields of items (used when ``item_fields``).
    dim: D, embedding and model width.
    num_blocks: transformer blocks.
    num_heads: attention heads (D must divide by it).
    maxlen: history window L (rows of the positional table).
    dropout: on the input embeddings, the attention weights and after each sub-layer.
    norm: 'pre' (LayerNorm before each sub-layer and once at the end) or 'post'.
    positions: 'absolute' or 'recency' (module docstring).
    normalize: L2-normalise user and item outputs.
    item_fields: item embedding = id embedding + mean of the item's field tokens.
    scale_embeddings: multiply the history's item embeddings by sqrt(D) (the authors' code).
  """

  num_items: int
  item_specs: Sequence[FeatureSpec] = ()
  dim: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  maxlen: int = 50
  dropout: float = 0.2
  norm: str = "pre"
  positions: str = "absolute"
  normalize: bool = True
  item_fields: bool = False
  scale_embeddings: bool = True
  encodes_positions = True  # encode_positions: the retrieval task's all-positions loss

  def setup(self):
    if self.norm not in NORMS:
      raise ValueError(f"model.norm={self.norm!r} is unknown: use 'pre' or 'post'")
    if self.positions not in POSITIONS:
      raise ValueError(f"model.positions={self.positions!r} is unknown: use 'absolute' or 'recency'")
    if self.dim % self.num_heads:
      raise ValueError(f"model.dim={self.dim} must divide by model.num_heads={self.num_heads}")
    self.item_id_embed = nn.Embed(self.num_items, self.dim, embedding_init=nn.initializers.normal(0.05))
    self.position_embed = nn.Embed(self.maxlen, self.dim, embedding_init=nn.initializers.normal(0.05))
    if self.item_fields and self.item_specs:
      self.item_field_embed = FieldEmbedding(self.item_specs, self.dim)
    self.blocks = [CausalBlock(self.dim, self.num_heads, self.dropout, self.norm, name=f"block_{i}")
                   for i in range(self.num_blocks)]
    self.input_dropout = nn.Dropout(self.dropout)
    if self.norm == "pre":
      self.final_norm = nn.LayerNorm(epsilon=1e-8)

  def _out(self, x: jax.Array) -> jax.Array:
    return l2_normalize(x) if self.normalize else x

  def item_embedding(self, item_ids: jax.Array, tables) -> jax.Array:
    """Un-normalised item embedding of ids of any shape [...] -> [..., D] (history input and output)."""
    emb = self.item_id_embed(item_ids)
    if self.item_fields and self.item_specs:
      flat = item_ids.reshape(-1)
      fields = self.item_field_embed(gather_rows(tables["item"], flat)).mean(axis=-2)
      emb = emb + fields.reshape(emb.shape)
    return emb

  def encode_sequence(self, batch: dict[str, jax.Array], tables, train: bool = False):
    """The output at every position: ([B, L, D] un-normalised, valid bool [B, L]).

    batch: 'history' int [B, L] left-aligned, 'history_len' int [B]."""
    history, history_len = batch["history"], batch["history_len"]
    L = history.shape[1]
    if L > self.maxlen:
      raise ValueError(f"history width {L} exceeds model.maxlen={self.maxlen}: set model.maxlen >= config.maxlen")
    pos = jnp.arange(L)[None, :]
    valid = pos < history_len[:, None]
    x = self.item_embedding(history, tables)
    if self.scale_embeddings:
      x = x * jnp.sqrt(jnp.asarray(self.dim, x.dtype))
    if self.positions == "absolute":
      index = jnp.broadcast_to(pos, history.shape)
    else:
      index = jnp.clip(history_len[:, None] - 1 - pos, 0, self.maxlen - 1)
    x = x + self.position_embed(index)
    x = self.input_dropout(x, deterministic=not train)
    keep = valid[..., None].astype(x.dtype)
    x = x * keep
    return causal_stack(x, valid, self.blocks, self.final_norm if self.norm == "pre" else None, train), valid

  def encode_users(self, batch: dict[str, jax.Array], tables, train: bool = False) -> jax.Array:
    """batch: 'history' [B, L], 'history_len' [B] ('user' is not read). Returns [B, D]: the output at
    position history_len - 1."""
    seq, _ = self.encode_sequence(batch, tables, train)
    last = jnp.clip(batch["history_len"] - 1, 0, seq.shape[1] - 1)
    out = jnp.take_along_axis(seq, last[:, None, None], axis=1)[:, 0]
    return self._out(out)

  def encode_positions(self, batch: dict[str, jax.Array], tables, train: bool = False):
    """Every position's user vector ([B, L, D], normalised like `encode_users`) and valid [B, L]:
    the all-positions loss of the retrieval task (``config.loss.positions='all'``)."""
    seq, valid = self.encode_sequence(batch, tables, train)
    return self._out(seq), valid

  def encode_items(self, item_ids: jax.Array, tables, train: bool = False) -> jax.Array:
    """item_ids: int [N]. Returns [N, D]."""
    del train
    return self._out(self.item_embedding(item_ids, tables))

  def __call__(self, batch, tables, train: bool = False):
    return self.encode_users(batch, tables, train), self.encode_items(batch["target"], tables, train)


def from_config(cfg, spec: DataSpec) -> SASRec:
  return SASRec(
      num_items=spec.num_items,
      item_specs=spec.item_specs,
      dim=cfg.dim,
      num_blocks=cfg.get("num_blocks", 2),
      num_heads=cfg.get("num_heads", 1),
      maxlen=cfg.maxlen,
      dropout=cfg.get("dropout", 0.2),
      norm=cfg.get("norm", "pre"),
      positions=cfg.get("positions", "absolute"),
      normalize=cfg.get("normalize", True),
      item_fields=cfg.get("item_fields", False),
      scale_embeddings=cfg.get("scale_embeddings", True),
  )


MODELS = {"sasrec": from_config}
