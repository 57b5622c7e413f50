"""MV-HAN: multi-view two-tower retrieval with hybrid attentive networks across content types
(Fan, Zhang, Wang, Chen, ASE'22, arXiv 2210.07660), and the MV-DNN baseline (Elkahky et al., WWW'15).

Each tower = embedding layer -> feature-extraction layers (FEL) -> multi-view representation layers
(MRL), as the paper's method section and model figure lay it out. Citations below name the paper's
components (embedding layer, FEL, MRL, parameter sharing) and its Table 3 ablations:
- Embedding layer: one D-wide token per field. Content: item id + every item feature except
  ``type``. User: user id + profile fields + one pooled-history token (masked mean of all history items)
  + the last ``num_behaviour_tokens`` behaviours as tokens, each = item-id embedding + a learned
  position embedding (position = distance from the most recent behaviour). The order of the history
  carries much of the signal on MovieLens (issue 4), which a single pooled field cannot express.
  ``behaviour_encoder='causal'`` (an extension, not the paper's) replaces the pooled and recent
  behaviour tokens by one token: the output, at the most recent position, of a causal self-attention
  encoder over the whole history window (SASRec's pre-LN blocks over the shared item-id embeddings
  scaled by sqrt(D) plus absolute positions). Position p of that encoder depends on
  ``history[:p+1]`` only, so ``encode_positions`` gives the user vector of every prefix in one pass
  and the tower trains on SASRec's all-positions objective while the FEL still crosses the sequence
  state with the user's id and profile fields (``experiments/results/mvhan_quality.md`` says why:
  the paper's tokens tower never learnt the last item -> next item map that SASRec reads).
- FEL: ``fel_layers`` AutoInt-style self-attention blocks over the field tokens, pre-norm:
  ``x = x + Dropout(MHSA(LayerNorm(x)))``, and one final LayerNorm. Pre-norm keeps the residual path
  an identity, so stacking trains without warmup. Padded behaviour tokens are key-masked (never
  attended) and their outputs are zeroed (they carry nothing onward), then all tokens are flattened
  (the paper's "flatten"; a zeroed padded token flattens to zeros, so padding never reaches the MRL).
  ``interaction='mlp'`` (Table 3 ablation) replaces MHSA by a residual MLP over the flattened tokens.
- MRL: one MLP for users; one MLP head per content type for contents.
- Score: cosine(z_user, z_content) (``normalize=True`` L2-normalises both outputs); the trainer divides
  by the loss temperature. ``learn_temperature=True`` adds a scalar parameter ``log_temperature``
  (initialised at log ``init_temperature``) read through ``model.temperature()``; a trainer that
  supports it uses that value instead of the config's fixed temperature. Without it ``temperature()``
  returns ``init_temperature`` as a constant.

Content types: ``tables['item']['type']`` holds 1..T (``num_types = T``). Value 0 ("unknown" in the
feature conventions) is treated as type 1, the source type: jit-compiled code cannot raise on data,
and the source head is the best-trained one, so it is the safest fallback for an untyped item.

Parameter sharing (Table 3 ablations): the user tower is always shared across types.
``share_embeddings`` (one set of content embedding tables, or exclusive tables per type selected by the
item's type), ``share_fel`` (one content FEL, or one per type), ``interaction`` ('mhsa' or 'mlp').
Per-type modules are one ``nn.vmap``-ed module whose parameters carry a leading axis T; every item is
run through all T copies and its own type's output is gathered (``_select``). That is vectorised (no
Python loop over items), creates every type's parameters at ``init`` whatever the init batch holds,
and gives exactly zero gradient to the heads of types absent from a batch. It costs T x the compute of
the per-type parts, fine for the few content types of the paper (T = 3). With exclusive embeddings,
behaviour tokens look the behaviour item up in its own type's id table, so the id embedding of an item
is the same in both towers under both flags and the flag changes only cross-type sharing.

Interface (as ``two_tower.py``): feature tables ``tables = {'user': {name: [U, ...]}, 'item':
{name: [I, ...]}}`` are passed to ``apply`` as constants. Histories are left-aligned, most recent at
``history_len - 1``, and masked with ``history_len`` only (item id 0 is a real item).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvhan_jax import precision
from mvhan_jax.features import DataSpec, FeatureSpec
from mvhan_jax.layers import MLP, FieldEmbedding, gather_rows, l2_normalize, masked_mean
from mvhan_jax.models.sasrec import CausalBlock, causal_stack

TYPE_FIELD = "type"
BEHAVIOUR_ENCODERS = ("tokens", "causal")
_INIT = nn.initializers.normal(0.05)


def _per_type(module_cls, num_types: int, methods=("__call__",)):
  """``module_cls`` with T independent parameter sets (leading axis T); all inputs are broadcast and
  the outputs of ``methods`` gain a leading axis T. ``train`` must be passed positionally."""
  return nn.vmap(module_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=None, out_axes=0, axis_size=num_types, methods=list(methods))


def _select(per_type: jax.Array, type_idx: jax.Array) -> jax.Array:
  """per_type [T, *S, ...], type_idx int [*S] -> [*S, ...]: each row's own type's output.

  A gather (not a one-hot mix), so types absent from ``type_idx`` get exactly zero cotangent.
  """
  moved = jnp.moveaxis(per_type, 0, type_idx.ndim)  # [*S, T, ...]
  idx = type_idx.reshape(type_idx.shape + (1,) * (moved.ndim - type_idx.ndim))
  # precision.take_along_axis: under bfloat16 compute the gradient's scatter stays float32.
  return precision.take_along_axis(moved, idx, axis=type_idx.ndim).squeeze(type_idx.ndim)


def recent_behaviours(history: jax.Array, history_len: jax.Array, num_tokens: int
                      ) -> tuple[jax.Array, jax.Array]:
  """MV-HAN embedding layer, behaviour tokens. history int [B, L] left-aligned, history_len [B],
  K = num_tokens.

  Returns (ids [B, K], live bool [B, K]): slot k holds the behaviour at distance k from the most recent
  one (history index history_len-1-k), the slot its position embedding is learned for; slots
  k >= history_len are padding (that covers K > L too, since history_len <= L).
  """
  L = history.shape[1]
  dist = jnp.arange(num_tokens)[None, :]
  idx = jnp.clip(history_len[:, None] - 1 - dist, 0, L - 1)
  return jnp.take_along_axis(history, idx, axis=1), dist < history_len[:, None]


class ContentEmbedding(nn.Module):
  """MV-HAN embedding layer, content side: item-id token + one token per content field.

  Attributes:
    num_items: I.
    specs: content fields (item features without ``type``).
    dim: D.
  """

  num_items: int
  specs: Sequence[FeatureSpec]
  dim: int

  def setup(self):
    self.id_embed = nn.Embed(self.num_items, self.dim, embedding_init=_INIT)
    if self.specs:
      self.fields = FieldEmbedding(self.specs, self.dim)

  def __call__(self, item_ids: jax.Array, features: dict[str, jax.Array]) -> jax.Array:
    """item_ids [N], features name -> [N, ...]. Returns tokens [N, 1 + F, D]."""
    tokens = self.id_embed(item_ids)[:, None, :]
    if self.specs:
      tokens = jnp.concatenate([tokens, self.fields(features)], axis=1)
    return tokens

  def embed_ids(self, item_ids: jax.Array) -> jax.Array:
    """item_ids of any shape [...] -> [..., D] (behaviour tokens share this table)."""
    return self.id_embed(item_ids)


class AttentionBlock(nn.Module):
  """MV-HAN FEL block (AutoInt-style hybrid attentive interaction): pre-norm MHSA with a key padding mask.

  Attributes:
    num_heads: attention heads (D must be divisible by it).
    dropout: on the attention output.
  """

  num_heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
    """x [N, F, D], mask bool [N, F] (False: padded token). Returns [N, F, D]; a padded token's row
    is not zeroed here (`FEL` zeroes it once, after the last block)."""
    h = nn.LayerNorm()(x)
    # Key mask only: a padded token is never attended, so what a padded row holds never reaches a live
    # one (its softmax weight is exactly 0). Fixed fields are always live in both towers, so no live
    # query sees an all-masked row; even an all-masked row stays finite (flax masks with the dtype's
    # min, not -inf, so the softmax is uniform, not NaN). No jnp.where on the residual: zeroing padded
    # rows after every block gave bit-identical outputs and gradients, but XLA CPU fused the backward
    # of that chain of selects into a transposing loop that took 2 ms of MV-HAN's 36 ms step at batch
    # 256 (bench README, "The FEL's residual masking").
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=0.0)(
        h, h, mask=mask[:, None, None, :])
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return x + h


class MLPBlock(nn.Module):
  """Table 3 'MLP instead of MHSA' ablation: a pre-norm residual MLP over the flattened tokens, so all
  fields still interact, but without attention. x [N, F*D] -> [N, F*D].

  Attributes:
    hidden: bottleneck width.
    dropout: after the ReLU.
  """

  hidden: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = nn.relu(nn.Dense(self.hidden)(nn.LayerNorm()(x)))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return x + nn.Dense(x.shape[-1])(h)


class FEL(nn.Module):
  """MV-HAN feature-extraction layers (FEL): tokens [N, F, D] + mask [N, F] -> flat [N, F*D].

  Attributes:
    num_layers: stacked blocks (0: the masked tokens are flattened as they are).
    num_heads: attention heads ('mhsa').
    interaction: 'mhsa' (the paper) or 'mlp' (Table 3 ablation).
    dropout: inside every block.
  """

  num_layers: int
  num_heads: int
  interaction: str = "mhsa"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
    N, F, D = tokens.shape
    x = jnp.where(mask[..., None], tokens, 0.0)
    if self.interaction == "mhsa":
      for i in range(self.num_layers):
        x = AttentionBlock(self.num_heads, self.dropout, name=f"attention_{i}")(x, mask, train)
      if self.num_layers:  # padded tokens carry nothing onward (the blocks leave their rows as they are)
        x = jnp.where(mask[..., None], nn.LayerNorm(name="final_norm")(x), 0.0)
      return x.reshape(N, F * D)
    x = x.reshape(N, F * D)
    for i in range(self.num_layers):
      x = MLPBlock(4 * D, self.dropout, name=f"mlp_{i}")(x, train)
    return x


class MVHAN(nn.Module):
  """MV-HAN (Fan et al., ASE'22). See the module docstring for the architecture and the sharing flags.

  Attributes:
    num_users: U (the user-id field).
    num_items: I.
    num_types: T, content types 1..T in ``tables['item']['type']``.
    user_specs: user profile fields.
    item_specs: item fields; ``type`` is read for head selection and is not a content token.
    dim: D, the token width and the output width.
    fel_layers: FEL depth.
    num_heads: attention heads (``dim`` must be divisible by it).
    mrl_hidden: ReLU widths of the user MLP and of every per-type content head.
    num_behaviour_tokens: K, the most recent behaviours given as position-embedded tokens.
    share_embeddings / share_fel / interaction: the Table 3 ablation flags.
    normalize: L2-normalise both towers (cosine score).
    dropout: in the FEL blocks and after every MRL hidden layer.
    learn_temperature: add a learned ``log_temperature`` (see ``temperature``).
    init_temperature: its initial value, or the constant ``temperature()`` returns.
    tie_behaviour_embeddings: history items look up the content tower's id table (default), or a
      table of the user tower's own (an item as history and as target need not share a vector).
    user_id_token: the user-id field (default); False leaves the user described by profile and
      history only (a per-user table can memorise training targets instead of reading the history).
    last_token_readout: add a projection of the FEL output at the most recent behaviour's token to
      the user MRL's output (SASRec reads its user vector there; default off, the paper's tower).
    item_id_residual: add the item's id embedding (the table behaviour tokens read) to its type
      head's output before normalising, so the score keeps SASRec's direct path from the shared id
      table to the logit (default off, the paper's content tower).
    behaviour_encoder: 'tokens' (the paper's embedding layer: pooled history + K recent behaviours
      as field tokens) or 'causal': one behaviour token, the output of a causal self-attention
      encoder over the history (SASRec's blocks) at the most recent position. 'causal' adds
      ``encode_positions`` (the user vector of every history prefix, the retrieval task's
      all-positions loss) and needs ``maxlen`` >= the history width.
    maxlen / causal_blocks / causal_heads / causal_dropout: the causal encoder's position table,
      depth, heads and dropout (read with behaviour_encoder='causal' only).
    sasrec_gate: behaviour_encoder='causal' only: user vector = the causal encoder's state at the
      newest position + g_u * (the FEL -> MLP head's output), item vector = the item's id embedding
      + g_i * (its type head's output), with learned scalar gates g_u, g_i that start at 0 (ReZero),
      so the model starts as SASRec (same encoder, same shared id table) and the profile and
      content fields enter only as far as training finds them useful (``item_id_residual`` is then
      implied).
  """

  num_users: int
  num_items: int
  num_types: int
  user_specs: Sequence[FeatureSpec]
  item_specs: Sequence[FeatureSpec]
  dim: int = 64
  fel_layers: int = 2
  num_heads: int = 2
  mrl_hidden: Sequence[int] = (256,)
  num_behaviour_tokens: int = 20
  share_embeddings: bool = True
  share_fel: bool = True
  interaction: str = "mhsa"
  normalize: bool = True
  dropout: float = 0.0
  learn_temperature: bool = False
  init_temperature: float = 0.1
  tie_behaviour_embeddings: bool = True
  user_id_token: bool = True
  last_token_readout: bool = False
  item_id_residual: bool = False
  behaviour_encoder: str = "tokens"
  maxlen: int = 50
  causal_blocks: int = 1
  causal_heads: int = 1
  causal_dropout: float = 0.2
  sasrec_gate: bool = False

  def setup(self):
    if self.interaction not in ("mhsa", "mlp"):
      raise ValueError(f"model.interaction={self.interaction!r} is unknown: use 'mhsa' or 'mlp'")
    if self.interaction == "mhsa" and self.dim % self.num_heads:
      raise ValueError(f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}: "
                       "change one of them")
    if self.num_types < 1:
      raise ValueError(f"num_types={self.num_types} must be >= 1 (item feature 'type' holds 1..T)")
    if self.behaviour_encoder not in BEHAVIOUR_ENCODERS:
      raise ValueError(f"model.behaviour_encoder={self.behaviour_encoder!r} is unknown: use one of "
                       f"{BEHAVIOUR_ENCODERS}")
    causal = self.behaviour_encoder == "causal"
    if causal and self.dim % self.causal_heads:
      raise ValueError(f"model.dim={self.dim} is not divisible by model.causal_heads={self.causal_heads}")
    if self.num_behaviour_tokens < 0 or self.fel_layers < 0:
      raise ValueError("model.num_behaviour_tokens and model.fel_layers must be >= 0")
    if self.learn_temperature and self.init_temperature <= 0:
      raise ValueError(f"model.init_temperature={self.init_temperature} must be > 0")
    T = self.num_types
    content_specs = self.content_specs
    # Content tower: per-type parts are vmapped modules with a leading T axis.
    emb_cls = (ContentEmbedding if self.share_embeddings
               else _per_type(ContentEmbedding, T, ("__call__", "embed_ids")))
    self.content_embed = emb_cls(self.num_items, content_specs, self.dim)
    fel_cls = FEL if self.share_fel else _per_type(FEL, T)
    self.content_fel = fel_cls(self.fel_layers, self.num_heads, self.interaction, self.dropout)
    self.content_heads = _per_type(MLP, T)(tuple(self.mrl_hidden), self.dim, self.dropout)
    # User tower (always shared across types).
    if self.user_id_token:
      self.user_id_embed = nn.Embed(self.num_users, self.dim, embedding_init=_INIT)
    if self.user_specs:
      self.user_fields = FieldEmbedding(self.user_specs, self.dim)
    if causal:
      self.position_embed = nn.Embed(self.maxlen, self.dim, embedding_init=_INIT)
      self.causal_encoder = [CausalBlock(self.dim, self.causal_heads, self.causal_dropout, "pre",
                                         name=f"causal_{i}") for i in range(self.causal_blocks)]
      self.causal_norm = nn.LayerNorm(epsilon=1e-8)
      self.causal_input_dropout = nn.Dropout(self.causal_dropout)
    elif self.num_behaviour_tokens:
      self.position_embed = nn.Embed(self.num_behaviour_tokens, self.dim, embedding_init=_INIT)
    if not self.tie_behaviour_embeddings:
      self.behaviour_embed = nn.Embed(self.num_items, self.dim, embedding_init=_INIT)
    self.user_fel = FEL(self.fel_layers, self.num_heads, self.interaction, self.dropout)
    self.user_mlp = MLP(tuple(self.mrl_hidden), self.dim, self.dropout)
    if self.last_token_readout:
      if (not causal and not self.num_behaviour_tokens) or self.interaction != "mhsa":
        raise ValueError("model.last_token_readout needs behaviour tokens (num_behaviour_tokens > 0) and "
                         "interaction='mhsa'")
      self.last_readout = nn.Dense(self.dim, name="last_readout")
    if self.sasrec_gate:
      if not causal:
        raise ValueError("model.sasrec_gate needs model.behaviour_encoder='causal' (the gate opens onto "
                         "the causal encoder's state)")
      self.user_gate = self.param("user_gate", nn.initializers.zeros, ())
      self.item_gate = self.param("item_gate", nn.initializers.zeros, ())
    if self.learn_temperature:
      self.log_temperature = self.param("log_temperature", nn.initializers.constant(
          math.log(self.init_temperature)), ())

  @property
  def encodes_positions(self) -> bool:
    """Whether ``encode_positions`` exists for this configuration (behaviour_encoder='causal')."""
    return self.behaviour_encoder == "causal"

  @property
  def content_specs(self) -> tuple[FeatureSpec, ...]:
    return tuple(s for s in self.item_specs if s.name != TYPE_FIELD)

  def _out(self, x: jax.Array) -> jax.Array:
    # sasrec_gate: a padded position's (or an empty history's) user vector starts all-zero, whose
    # norm has a NaN gradient; the other configurations keep the recorded results' exact arithmetic.
    return l2_normalize(x, zero_safe=self.sasrec_gate) if self.normalize else x

  def type_index(self, item_ids: jax.Array, tables) -> jax.Array:
    """0-based type of items of any shape [...]: type t in 1..T -> t-1; unknown (0) -> 0 (type 1)."""
    t = jnp.take(tables["item"][TYPE_FIELD], item_ids, axis=0)
    return jnp.clip(t - 1, 0, self.num_types - 1)

  def temperature(self) -> jax.Array:
    """The score temperature: exp(log_temperature) when learned, else the constant init_temperature."""
    if self.learn_temperature:
      return jnp.exp(self.log_temperature)
    return jnp.asarray(self.init_temperature, jnp.float32)

  def behaviour_embedding(self, item_ids: jax.Array, tables) -> jax.Array:
    """Id embedding of history items, shared with the content tower's id table (or the user tower's
    own table when ``tie_behaviour_embeddings=False``). [...] -> [..., D]."""
    if not self.tie_behaviour_embeddings:
      return self.behaviour_embed(item_ids)
    return self.item_id_embedding(item_ids, tables)

  def item_id_embedding(self, item_ids: jax.Array, tables) -> jax.Array:
    """The content tower's id embedding of items (each item's own type's table when embeddings are
    exclusive). [...] -> [..., D]."""
    emb = self.content_embed.embed_ids(item_ids)
    if self.share_embeddings:
      return emb
    return _select(emb, self.type_index(item_ids, tables))  # each item's own type's table

  def _fixed_tokens(self, batch, tables) -> list[jax.Array]:
    """The user-id token and the profile-field tokens: a list of [B, n, D]."""
    fixed = [self.user_id_embed(batch["user"])[:, None, :]] if self.user_id_token else []
    if self.user_specs:
      fixed.append(self.user_fields(gather_rows(tables["user"], batch["user"])))  # [B, Fu, D]
    return fixed

  def _user_head(self, tokens: jax.Array, mask: jax.Array, readout_slot: int, train: bool) -> jax.Array:
    """FEL -> MLP (-> + the read-out at ``readout_slot``) (-> state + gate * that) -> normalised.
    tokens [N, F, D] -> [N, D]."""
    x = self.user_fel(tokens, mask, train)
    out = self.user_mlp(x, train)
    D = self.dim
    if self.last_token_readout:
      # SASRec's read-out added to the MRL's: the FEL output at the most recent behaviour's slot
      # (zeros for an empty history), projected.
      out = out + self.last_readout(x[:, readout_slot * D:(readout_slot + 1) * D])
    if self.sasrec_gate:
      # The FEL's input at the read-out slot is the causal state itself (zeros for an empty history).
      out = tokens[:, readout_slot] + self.user_gate * out
    return self._out(out)

  def causal_sequence(self, batch, tables, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """behaviour_encoder='causal': the encoder's output at every history position ([B, L, D], zero
    at padding) and valid [B, L]. Position p depends on ``history[:p+1]`` only (absolute positions
    in the window, causal attention), as SASRec's ``encode_sequence``."""
    history, history_len = batch["history"], batch["history_len"]
    L = history.shape[1]
    if L > self.maxlen:
      raise ValueError(f"history width {L} exceeds model.maxlen={self.maxlen}: set model.maxlen >= config.maxlen")
    valid = jnp.arange(L)[None, :] < history_len[:, None]
    x = self.behaviour_embedding(history, tables) * jnp.sqrt(jnp.asarray(self.dim, jnp.float32))
    x = x + self.position_embed(jnp.arange(L))[None]
    x = self.causal_input_dropout(x, deterministic=not train) * valid[..., None].astype(x.dtype)
    return causal_stack(x, valid, self.causal_encoder, self.causal_norm, train), valid

  def encode_users(self, batch: dict[str, jax.Array], tables, train: bool = False) -> jax.Array:
    """MV-HAN user tower (embedding layer -> FEL -> MRL, shared by all types).

    batch: 'user' [B], 'history' [B, L], 'history_len' [B].

    'tokens': [B, 2 + Fu + K, D] = [user id, profile fields..., pooled history, K recent behaviours];
    'causal': [B, 2 + Fu, D] = [user id, profile fields..., the causal encoder at the newest item]
    -> FEL -> MLP -> [B, D].
    """
    history, history_len = batch["history"], batch["history_len"]
    fixed = self._fixed_tokens(batch, tables)
    if self.behaviour_encoder == "causal":
      seq, valid = self.causal_sequence(batch, tables, train)
      last = jnp.clip(history_len - 1, 0, seq.shape[1] - 1)
      state = jnp.take_along_axis(seq, last[:, None, None], axis=1)  # [B, 1, D]
      fixed = jnp.concatenate(fixed + [state], axis=1)
      mask = jnp.ones(fixed.shape[:2], bool).at[:, -1].set(history_len > 0)
      return self._user_head(fixed, mask, fixed.shape[1] - 1, train)
    L = history.shape[1]
    live = jnp.arange(L)[None, :] < history_len[:, None]  # [B, L]
    fixed.append(masked_mean(self.behaviour_embedding(history, tables), live)[:, None, :])
    fixed = jnp.concatenate(fixed, axis=1)
    tokens, mask = fixed, jnp.ones(fixed.shape[:2], bool)
    K = self.num_behaviour_tokens
    if K:
      recent, recent_mask = recent_behaviours(history, history_len, K)
      behaviours = self.behaviour_embedding(recent, tables) + self.position_embed(jnp.arange(K))[None]
      tokens = jnp.concatenate([fixed, behaviours], axis=1)
      mask = jnp.concatenate([mask, recent_mask], axis=1)
    return self._user_head(tokens, mask, fixed.shape[1], train)

  def encode_positions(self, batch: dict[str, jax.Array], tables, train: bool = False):
    """behaviour_encoder='causal' only: the user vector of every history prefix ([B, L, D]; position
    p equals ``encode_users`` of ``history[:p+1]``) and valid [B, L]: the retrieval task's
    all-positions loss (``config.loss.positions='all'``)."""
    if self.behaviour_encoder != "causal":
      raise ValueError("MV-HAN's encode_positions needs model.behaviour_encoder='causal' (the 'tokens' tower "
                       "has no vector per history position): set it, or config.loss.positions='last'")
    seq, valid = self.causal_sequence(batch, tables, train)
    B, L, D = seq.shape
    fixed = self._fixed_tokens(batch, tables)
    fixed = (jnp.concatenate(fixed, axis=1) if fixed else jnp.zeros((B, 0, D), seq.dtype))
    tokens = jnp.concatenate([jnp.broadcast_to(fixed[:, None], (B, L) + fixed.shape[1:]), seq[:, :, None]], axis=2)
    n = tokens.shape[2]
    mask = jnp.ones((B, L, n), bool).at[:, :, -1].set(valid)
    out = self._user_head(tokens.reshape(B * L, n, D), mask.reshape(B * L, n), n - 1, train)
    return out.reshape(B, L, -1), valid

  def encode_items(self, item_ids: jax.Array, tables, train: bool = False) -> jax.Array:
    """MV-HAN content tower (embedding layer -> FEL -> the item's type's MRL head).

    item_ids int [N] -> [N, D].
    """
    type_idx = self.type_index(item_ids, tables)  # [N]
    features = gather_rows(tables["item"], item_ids)
    tokens = self.content_embed(item_ids, features)  # [N, F, D], or [T, N, F, D] if exclusive
    if not self.share_embeddings:
      tokens = _select(tokens, type_idx)
    mask = jnp.ones(tokens.shape[:2], bool)
    x = self.content_fel(tokens, mask, train)  # [N, F*D], or [T, N, F*D] if one FEL per type
    if not self.share_fel:
      x = _select(x, type_idx)
    out = _select(self.content_heads(x, train), type_idx)  # heads: [T, N, D]
    if self.sasrec_gate:
      out = self.item_id_embedding(item_ids, tables) + self.item_gate * out
    elif self.item_id_residual:
      out = out + self.item_id_embedding(item_ids, tables)
    return self._out(out)

  def __call__(self, batch, tables, train: bool = False):
    """Creates every parameter (all T per-type copies, whatever types the batch holds).

    Returns (users [B, D], target items [B, D]).
    """
    if self.learn_temperature:
      self.temperature()
    return self.encode_users(batch, tables, train), self.encode_items(batch["target"], tables, train)


def _num_types(spec: DataSpec) -> int:
  type_spec = spec.item_spec(TYPE_FIELD)
  if type_spec is None:
    raise ValueError(f"dataset {spec.name!r} has no item feature {TYPE_FIELD!r}: MV-HAN / MV-DNN need a "
                     "content type per item (int32 [I], values 1..T); use a multi-type dataset or a "
                     "single-type model such as two_tower")
  if type_spec.kind != "categorical" or type_spec.size < 2:
    raise ValueError(f"item feature {TYPE_FIELD!r} must be categorical int32 [I] with vocab[{TYPE_FIELD!r}]"
                     f" = T + 1 >= 2, got kind={type_spec.kind!r} size={type_spec.size}")
  return type_spec.size - 1


def _common_kwargs(cfg, spec: DataSpec, fel_layers_default: int) -> dict:
  """The constructor arguments MV-HAN and MV-DNN read the same way from ``config.model``."""
  return dict(
      num_users=spec.num_users,
      num_items=spec.num_items,
      num_types=_num_types(spec),
      user_specs=spec.user_specs,
      item_specs=spec.item_specs,
      dim=cfg.dim,
      fel_layers=cfg.get("fel_layers", fel_layers_default),
      num_heads=cfg.get("num_heads", 2),
      mrl_hidden=tuple(cfg.get("mrl_hidden", (256,))),
      num_behaviour_tokens=cfg.get("num_behaviour_tokens", 20),
      normalize=cfg.get("normalize", True),
      dropout=cfg.get("dropout", 0.0),
      learn_temperature=cfg.get("learn_temperature", False),
      init_temperature=cfg.get("init_temperature", 0.1),
      tie_behaviour_embeddings=cfg.get("tie_behaviour_embeddings", True),
      user_id_token=cfg.get("user_id_token", True),
      last_token_readout=cfg.get("last_token_readout", False),
      item_id_residual=cfg.get("item_id_residual", False),
      behaviour_encoder=cfg.get("behaviour_encoder", "tokens"),
      maxlen=cfg.get("maxlen", 50),
      causal_blocks=cfg.get("causal_blocks", 1),
      causal_heads=cfg.get("causal_heads", 1),
      causal_dropout=cfg.get("causal_dropout", 0.2),
      sasrec_gate=cfg.get("sasrec_gate", False),
  )


def from_config(cfg, spec: DataSpec) -> MVHAN:
  """MV-HAN from ``config.model``; ``num_types`` = vocab['type'] - 1."""
  return MVHAN(
      **_common_kwargs(cfg, spec, fel_layers_default=2),
      share_embeddings=cfg.get("share_embeddings", True),
      share_fel=cfg.get("share_fel", True),
      interaction=cfg.get("interaction", "mhsa"),
  )


class MVDNN(MVHAN):
  """MV-DNN (Elkahky et al., WWW'15): a shared user view and one tower per item view (content
  type), no attention: the MV-HAN module with exclusive embeddings, one FEL per type, interaction 'mlp'
  and, by default, no FEL blocks (``fel_layers=0``: the concatenated field tokens go straight into the
  per-type MLP, the original's DNN towers). The user tower keeps MV-HAN's inputs (position-embedded
  recent behaviours, pooled history, profile) so the comparison isolates attention and sharing.
  """

  fel_layers: int = 0
  share_embeddings: bool = False
  share_fel: bool = False
  interaction: str = "mlp"

  def setup(self):
    if self.share_embeddings or self.share_fel or self.interaction != "mlp":
      raise ValueError("MV-DNN has per-type towers without attention: leave model.share_embeddings, "
                       "model.share_fel and model.interaction unset (or use model.name='mvhan')")
    super().setup()


def mv_dnn_from_config(cfg, spec: DataSpec) -> MVDNN:
  """MV-DNN from ``config.model`` (the sharing and interaction flags are fixed by the baseline)."""
  return MVDNN(**_common_kwargs(cfg, spec, fel_layers_default=0))


MODELS = {
    "mvhan": from_config,
    "mv_dnn": mv_dnn_from_config,
}
