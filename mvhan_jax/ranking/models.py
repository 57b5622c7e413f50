"""HiNet and the multi-scenario multi-task baselines (shared-bottom, MMoE, PLE, STAR).

Every model maps a batch to logits ``[B, S, T]``: one head per (scenario, task) pair, as in the
HiNet authors' code where CGC's "tasks" are the 2 x S scenario-task pairs. Task 0 is the click
(CTR) logit, task 1 the conversion-given-click (CVR) logit; the trainer forms
``pCTCVR = pCTR * pCVR`` (ESMM) and masks every head's loss to the samples of its own scenario.

Input (all models, `RankingEmbedding`): one ``embed_dim`` token per field, flattened:
user id, user profile fields, item id, item fields, the mean of the item-id embeddings of the
user's history (left-aligned, masked by ``history_len``) and the scenario id.

Batch: ``user`` int [B], ``item`` int [B], ``scenario`` int [B], ``history`` int [B, L],
``history_len`` int [B]; ``tables`` = {'user': {name: [U, ...]}, 'item': {name: [I, ...]}}.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvhan_jax.features import DataSpec, FeatureSpec
from mvhan_jax.layers import MLP, FieldEmbedding, masked_mean
from mvhan_jax.ranking import layers

TASKS = ("ctr", "cvr")


class RankingEmbedding(nn.Module):
  """Batch -> (x [B, F * embed_dim], scenario embedding [B, embed_dim])."""

  user_specs: Sequence[FeatureSpec]
  item_specs: Sequence[FeatureSpec]
  num_users: int
  num_items: int
  num_scenarios: int
  dim: int

  @nn.compact
  def __call__(self, batch, tables):
    user, item = batch["user"], batch["item"]
    init = nn.initializers.normal(0.05)
    item_ids = nn.Embed(self.num_items, self.dim, embedding_init=init, name="item_id")
    tokens = [nn.Embed(self.num_users, self.dim, embedding_init=init, name="user_id")(user)[:, None],
              item_ids(item)[:, None]]
    if self.user_specs:
      tokens.append(FieldEmbedding(self.user_specs, self.dim, name="user_fields")(
          {s.name: tables["user"][s.name][user] for s in self.user_specs}))
    if self.item_specs:
      tokens.append(FieldEmbedding(self.item_specs, self.dim, name="item_fields")(
          {s.name: tables["item"][s.name][item] for s in self.item_specs}))
    hist = batch["history"]
    valid = jnp.arange(hist.shape[1])[None, :] < batch["history_len"][:, None]
    tokens.append(masked_mean(item_ids(hist), valid)[:, None])
    scenario_emb = nn.Embed(self.num_scenarios, self.dim, embedding_init=init, name="scenario")(batch["scenario"])
    tokens.append(scenario_emb[:, None])
    x = jnp.concatenate(tokens, axis=1)
    return x.reshape(x.shape[0], -1), scenario_emb


class _Base(nn.Module):
  """Shared attributes; subclasses implement ``heads(x, scenario_emb, scenario) -> [B, S*T, D]``."""

  user_specs: Sequence[FeatureSpec]
  item_specs: Sequence[FeatureSpec]
  num_users: int
  num_items: int
  num_scenarios: int
  embed_dim: int = 16
  expert_hidden: Sequence[int] = (64, 32)
  tower_hidden: Sequence[int] = (32,)
  num_tasks: int = len(TASKS)

  @property
  def num_heads(self) -> int:
    return self.num_scenarios * self.num_tasks

  def towers(self, head_inputs):
    """[B, S*T, D] -> logits [B, S, T]: one tower MLP (tower_hidden -> 1) per head."""
    out = layers.StackedMLP(self.num_heads, tuple(self.tower_hidden) + (1,), linear_out=True,
                            name="towers")(head_inputs)
    return out.reshape(out.shape[0], self.num_scenarios, self.num_tasks)

  def embed(self, batch, tables):
    return RankingEmbedding(self.user_specs, self.item_specs, self.num_users, self.num_items,
                            self.num_scenarios, self.embed_dim, name="embedding")(batch, tables)


class SharedBottom(_Base):
  """One shared MLP bottom, a tower per (scenario, task) head (Caruana'97)."""

  @nn.compact
  def __call__(self, batch, tables, train: bool = False):
    x, _ = self.embed(batch, tables)
    bottom = MLP(self.expert_hidden, name="bottom")(x)
    return self.towers(jnp.broadcast_to(bottom[:, None], (x.shape[0], self.num_heads, bottom.shape[-1])))


class MMoEModel(_Base):
  """MMoE (Ma et al., KDD'18): shared experts, one softmax gate per (scenario, task) head."""

  num_experts: int = 6

  @nn.compact
  def __call__(self, batch, tables, train: bool = False):
    x, _ = self.embed(batch, tables)
    return self.towers(layers.MMoE(self.num_heads, self.num_experts, self.expert_hidden, name="mmoe")(x))


class PLEModel(_Base):
  """PLE (Tang et al., RecSys'20): ``num_levels`` CGC levels over the (scenario, task) heads."""

  num_specific: int = 2
  num_shared: int = 2
  num_levels: int = 2

  @nn.compact
  def __call__(self, batch, tables, train: bool = False):
    x, _ = self.embed(batch, tables)
    inputs = x
    for level in range(self.num_levels):
      final = level == self.num_levels - 1
      # A lower level returns (head outputs, shared output): the next level's inputs.
      inputs = layers.CGC(self.num_heads, self.num_specific, self.num_shared, self.expert_hidden,
                          final=final, name=f"cgc_{level}")(inputs)
    return self.towers(inputs)


class STARModel(_Base):
  """STAR (Sheng et al., CIKM'21): star-topology FCN + auxiliary scenario network, heads per task.

  STAR is single-task; here its FCN is the bottom of per-(scenario, task) towers, and the auxiliary
  network (an MLP of the scenario embedding, one logit per task) is added to the main logits.
  """

  @nn.compact
  def __call__(self, batch, tables, train: bool = False):
    x, scenario_emb = self.embed(batch, tables)
    scenario = batch["scenario"]
    bottom = layers.StarFCN(self.num_scenarios, self.expert_hidden, name="star")(x, scenario)
    logits = self.towers(jnp.broadcast_to(bottom[:, None], (x.shape[0], self.num_heads, bottom.shape[-1])))
    aux = MLP((self.embed_dim,), out_dim=self.num_tasks, name="auxiliary")(scenario_emb)   # [B, T]
    return logits + aux[:, None, :]


class HiNet(_Base):
  """HiNet (Zhou et al., ICDE'23, arXiv 2303.06095): scenario extraction, then task extraction.

  Scenario extraction layer: ``E_sh = SEI_shared(x)``, ``E_j = SEI_j(x)`` for every scenario j (one
  stacked SEI over S groups), ``E_sp = E_{s(x)}``, SAN ``A = sum_{j != s} a_j E_j`` with
  ``a = softmax(MLP(emb(s)))``; ``C = concat(A, E_sp, E_sh)``. Task extraction layer: a CGC over
  the S x T heads (``num_specific`` experts per head, ``num_shared`` shared), a tower per head.

  Ablations: ``use_san=False`` drops A; ``use_specific=False`` drops the scenario-specific SEIs
  (and with them the SAN): ``C = E_sh``; ``task_layer='shared_tower'`` replaces the CGC by one
  shared MLP feeding the towers.
  """

  num_sub_experts: int = 5
  sei_hidden: Sequence[int] = (64, 32)
  san_hidden: Sequence[int] = (32,)
  num_specific: int = 2
  num_shared: int = 2
  use_san: bool = True
  use_specific: bool = True
  task_layer: str = "cgc"

  def scenario_extraction(self, x, scenario_emb, scenario):
    """-> (C [B, D_c], SAN weights [B, S] or None)."""
    shared = layers.SEI(1, self.num_sub_experts, self.sei_hidden, name="sei_shared")(x)[:, 0]
    if not self.use_specific:
      return shared, None
    experts = layers.SEI(self.num_scenarios, self.num_sub_experts, self.sei_hidden, name="sei_specific")(x)
    own = layers.select_scenario(experts, scenario)
    if not self.use_san:
      return jnp.concatenate([own, shared], axis=-1), None
    transfer, weights = layers.ScenarioAttention(self.num_scenarios, self.san_hidden, name="san")(
        scenario_emb, experts, scenario)
    return jnp.concatenate([transfer, own, shared], axis=-1), weights

  @nn.compact
  def __call__(self, batch, tables, train: bool = False):
    x, scenario_emb = self.embed(batch, tables)
    c, _ = self.scenario_extraction(x, scenario_emb, batch["scenario"])
    if self.task_layer == "cgc":
      heads = layers.CGC(self.num_heads, self.num_specific, self.num_shared, self.expert_hidden, name="cgc")(c)
    elif self.task_layer == "shared_tower":
      bottom = MLP(self.expert_hidden, name="shared_tower")(c)
      heads = jnp.broadcast_to(bottom[:, None], (c.shape[0], self.num_heads, bottom.shape[-1]))
    else:
      raise ValueError(f"config.model.task_layer={self.task_layer!r} is unknown: use 'cgc' or 'shared_tower'")
    return self.towers(heads)


MODELS = {"hinet": HiNet, "shared_bottom": SharedBottom, "mmoe": MMoEModel, "ple": PLEModel, "star": STARModel}

# config.model fields each model reads (besides the common ones).
_COMMON = ("embed_dim", "expert_hidden", "tower_hidden")
_FIELDS = {
    "hinet": ("num_sub_experts", "sei_hidden", "san_hidden", "num_specific", "num_shared", "use_san",
              "use_specific", "task_layer"),
    "shared_bottom": (),
    "mmoe": ("num_experts",),
    "ple": ("num_specific", "num_shared", "num_levels"),
    "star": (),
}


def build_ranking_model(cfg, spec: DataSpec) -> nn.Module:
  """``cfg`` = config.model (``name`` in `MODELS`); ``spec`` = the data's spec (`RankingData.spec`)."""
  if cfg.name not in MODELS:
    raise ValueError(f"config.model.name={cfg.name!r} is unknown: choose one of {sorted(MODELS)}")
  kwargs = {}
  for field in _COMMON + _FIELDS[cfg.name]:
    if field in cfg:
      value = cfg[field]
      kwargs[field] = tuple(value) if isinstance(value, (list, tuple)) else value
  return MODELS[cfg.name](user_specs=spec.user_specs, item_specs=spec.item_specs, num_users=spec.num_users,
                          num_items=spec.num_items, num_scenarios=spec.num_scenarios, **kwargs)


def predict(model, params, batch, tables) -> dict[str, jax.Array]:
  """Own-scenario probabilities: 'ctr' = pCTR, 'cvr' = pCVR, 'ctcvr' = pCTR * pCVR, each [B]."""
  logits = model.apply(params, batch, tables, False)
  own = layers.select_scenario(logits, batch["scenario"])           # [B, T]
  p = jax.nn.sigmoid(own)
  return {"ctr": p[:, 0], "cvr": p[:, 1], "ctcvr": p[:, 0] * p[:, 1]}
