"""Expert layers for multi-scenario multi-task ranking, vectorised over experts and scenarios.

Every bank of G parallel MLPs ("experts", "sub-experts", "towers") is one set of stacked weights
``[G, in, out]`` applied with a batched einsum, never a Python loop over scenarios or experts, so a
model with S scenarios compiles to the same number of ops as one with a single scenario.

References: SEI and the scenario-aware attentive network (SAN) follow HiNet (Zhou et al., ICDE'23,
arXiv 2303.06095, Sec. III-B) and its authors' code (mrchor/HiNet); CGC / PLE follow Tang et al.
(RecSys'20); MMoE Ma et al. (KDD'18); STAR Sheng et al. (CIKM'21).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_KERNEL_INIT = nn.initializers.lecun_normal(batch_axis=(0,))


class StackedMLP(nn.Module):
  """``num`` independent ReLU MLPs evaluated at once.

  Attributes:
    num: number of MLPs G.
    hidden: widths of the layers; every layer is followed by a ReLU unless it is the last layer
      and ``linear_out`` is set.
    linear_out: no activation after the last layer (towers producing logits).

  Call: ``x`` [B, in] (the same input for every MLP) or [B, G, in] (one input per MLP) -> [B, G, out].
  """

  num: int
  hidden: Sequence[int]
  linear_out: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for layer, width in enumerate(self.hidden):
      w = self.param(f"kernel_{layer}", _KERNEL_INIT, (self.num, x.shape[-1], width))
      b = self.param(f"bias_{layer}", nn.initializers.zeros, (self.num, width))
      x = (jnp.einsum("bi,gio->bgo", x, w) if x.ndim == 2 else jnp.einsum("bgi,gio->bgo", x, w)) + b
      if not (self.linear_out and layer == len(self.hidden) - 1):
        x = nn.relu(x)
    return x


class StackedGate(nn.Module):
  """``num`` softmax gates over ``width`` choices: x [B, in] or [B, G, in] -> [B, G, width]."""

  num: int
  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("kernel_0", _KERNEL_INIT, (self.num, x.shape[-1], self.width))
    b = self.param("bias_0", nn.initializers.zeros, (self.num, self.width))
    logits = (jnp.einsum("bi,gio->bgo", x, w) if x.ndim == 2 else jnp.einsum("bgi,gio->bgo", x, w)) + b
    return jax.nn.softmax(logits, axis=-1)


class SEI(nn.Module):
  """Sub-expert integration: ``SEI_g(x) = sum_k softmax(W_g x)_k MLP_gk(x)`` for G groups at once.

  HiNet Sec. III-B: an MMoE-style gated mixture of K sub-experts. The authors' code puts a ReLU
  before the gate softmax; it is left out here (a ReLU makes every negative gate logit tie at 0).

  Attributes:
    num_groups: G independent SEI modules (1 for the scenario-shared one, S for the specific ones).
    num_sub_experts: K.
    hidden: sub-expert MLP widths (paper: 128 -> 64).

  Call: x [B, in] -> [B, G, hidden[-1]].
  """

  num_groups: int
  num_sub_experts: int
  hidden: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    g, k = self.num_groups, self.num_sub_experts
    sub = StackedMLP(g * k, self.hidden, name="sub_experts")(x)           # [B, G*K, D]
    sub = sub.reshape(sub.shape[0], g, k, sub.shape[-1])                  # [B, G, K, D]
    gate = StackedGate(g, k, name="gate")(x)                              # [B, G, K]
    return jnp.einsum("bgk,bgkd->bgd", gate, sub)


def select_scenario(experts: jax.Array, scenario: jax.Array) -> jax.Array:
  """``experts[b, scenario[b]]``: [B, S, D], int [B] -> [B, D]."""
  return jnp.take_along_axis(experts, scenario[:, None, None], axis=1)[:, 0]


def scenario_attention(weights: jax.Array, experts: jax.Array, scenario: jax.Array) -> jax.Array:
  """SAN read-out: ``A = sum_{j != s} a_j E_j`` with the own scenario's weight zeroed.

  As in HiNet, ``a`` is a softmax over *all* scenarios and the own scenario is then dropped without
  renormalising (the weights of the others sum to 1 - a_s).

  Args:
    weights: float [B, S] softmax weights a.
    experts: float [B, S, D] every scenario's expert output E_j.
    scenario: int [B] the sample's scenario s.
  Returns:
    float [B, D].
  """
  others = 1.0 - jax.nn.one_hot(scenario, weights.shape[-1], dtype=weights.dtype)
  return jnp.einsum("bs,bsd->bd", weights * others, experts)


class ScenarioAttention(nn.Module):
  """HiNet's scenario-aware attentive network: ``a = softmax(MLP(emb(s)))`` over S scenarios.

  The authors' gate MLP ends in a 1-unit ReLU layer before the S-way output (a bottleneck that
  makes ``a`` nearly constant); here the MLP is ``hidden`` ReLU layers then a linear S-way layer.

  Call: (scenario_emb [B, E], experts [B, S, D], scenario int [B]) -> ([B, D], weights [B, S]).
  """

  num_scenarios: int
  hidden: Sequence[int] = (32,)

  @nn.compact
  def __call__(self, scenario_emb, experts, scenario):
    h = scenario_emb
    for width in self.hidden:
      h = nn.relu(nn.Dense(width)(h))
    weights = jax.nn.softmax(nn.Dense(self.num_scenarios)(h), axis=-1)
    return scenario_attention(weights, experts, scenario), weights


class CGC(nn.Module):
  """Customised gate control (PLE's extraction layer) for H heads.

  Head h mixes its own ``num_specific`` experts and the ``num_shared`` shared experts with a softmax
  gate computed from its input. With ``final=False`` (a lower PLE level) a further shared gate over
  *all* experts produces the next level's shared input.

  Call: x [B, in] (one input for every head and the shared experts) or a pair
  (head_inputs [B, H, in], shared_input [B, in]).
  Returns: head outputs [B, H, D] (and the shared output [B, D] when ``final`` is False).
  """

  num_heads: int
  num_specific: int
  num_shared: int
  hidden: Sequence[int]
  final: bool = True

  @nn.compact
  def __call__(self, x):
    head_in, shared_in = (x if isinstance(x, tuple) else (x, x))
    h, k, ks = self.num_heads, self.num_specific, self.num_shared
    if head_in.ndim == 2:
      specific = StackedMLP(h * k, self.hidden, name="specific")(head_in)            # [B, H*K, D]
    else:
      specific = StackedMLP(h * k, self.hidden, name="specific")(jnp.repeat(head_in, k, axis=1))
    specific = specific.reshape(specific.shape[0], h, k, -1)                          # [B, H, K, D]
    shared = StackedMLP(ks, self.hidden, name="shared")(shared_in)                    # [B, Ks, D]
    candidates = jnp.concatenate(
        [specific, jnp.broadcast_to(shared[:, None], (shared.shape[0], h) + shared.shape[1:])], axis=2)
    gate = StackedGate(h, k + ks, name="gate")(head_in)                               # [B, H, K+Ks]
    out = jnp.einsum("bhe,bhed->bhd", gate, candidates)
    if self.final:
      return out
    every = jnp.concatenate([specific.reshape(specific.shape[0], h * k, -1), shared], axis=1)
    shared_gate = StackedGate(1, h * k + ks, name="shared_gate")(shared_in)[:, 0]      # [B, H*K+Ks]
    return out, jnp.einsum("be,bed->bd", shared_gate, every)


class MMoE(nn.Module):
  """Multi-gate mixture of experts: E shared experts, one gate per head. x [B, in] -> [B, H, D]."""

  num_heads: int
  num_experts: int
  hidden: Sequence[int]

  @nn.compact
  def __call__(self, x):
    experts = StackedMLP(self.num_experts, self.hidden, name="experts")(x)            # [B, E, D]
    gate = StackedGate(self.num_heads, self.num_experts, name="gate")(x)              # [B, H, E]
    return jnp.einsum("bhe,bed->bhd", gate, experts)


class StarFCN(nn.Module):
  """STAR's star-topology fully connected network (Sheng et al., CIKM'21, Sec. 4.2).

  Scenario s uses ``W = W_shared * W_s`` (element-wise) and ``b = b_shared + b_s`` in every layer.
  Every scenario's output is computed (an einsum over S, cheaper on accelerators than gathering a
  [B, in, out] weight per sample) and the sample's own is selected. Partitioned normalisation is
  replaced by a per-scenario LayerNorm (scale and bias per scenario).

  Call: (x [B, in], scenario int [B]) -> [B, hidden[-1]].
  """

  num_scenarios: int
  hidden: Sequence[int]

  @nn.compact
  def __call__(self, x, scenario):
    s = self.num_scenarios
    scale = self.param("pn_scale", nn.initializers.ones, (s, x.shape[-1]))
    shift = self.param("pn_bias", nn.initializers.zeros, (s, x.shape[-1]))
    x = nn.LayerNorm(use_scale=False, use_bias=False)(x) * scale[scenario] + shift[scenario]
    for layer, width in enumerate(self.hidden):
      w_shared = self.param(f"shared_kernel_{layer}", nn.initializers.lecun_normal(), (x.shape[-1], width))
      b_shared = self.param(f"shared_bias_{layer}", nn.initializers.zeros, (width,))
      w_spec = self.param(f"specific_kernel_{layer}", nn.initializers.ones, (s, x.shape[-1], width))
      b_spec = self.param(f"specific_bias_{layer}", nn.initializers.zeros, (s, width))
      out = jnp.einsum("bi,sio->bso", x, w_shared[None] * w_spec) + b_shared + b_spec    # [B, S, out]
      x = nn.relu(select_scenario(out, scenario))
    return x
