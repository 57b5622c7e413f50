"""Multi-interest extraction layers: MIND's B2I dynamic routing, ComiRec's DR and SA extractors, and
MIND's label-aware attention.

References:
  MIND: Li et al., "Multi-Interest Network with Dynamic Routing for Recommendation at Tmall",
    CIKM 2019 (arXiv 1904.08030). Algorithm 1 (B2I dynamic routing), Eq. (squash), Sec. 4.2
    (dynamic interest number K'_u), Sec. 4.3 (label-aware attention).
  ComiRec: Cen et al., "Controllable Multi-Interest Framework for Recommendation", KDD 2020
    (arXiv 2005.09347). Sec. 3.2 (dynamic routing with per-position maps, Eq. 1-4; self-attentive
    method, Eq. 5-6); official code THUDM/ComiRec (``CapsuleNetwork``, ``Model_ComiRec_SA``).

Layout conventions shared by every function here:
  * history rows are left-aligned (the most recent behaviour at ``history_len - 1``) and padded; the
    padding is identified by a boolean mask ``[B, L]``, never by the item id (id 0 is a real item);
  * interest masks are boolean ``[B, K]``; dead interests come out as exact zeros;
  * routing logits are indexed ``b[b, i, j]`` = behaviour i, interest j, i.e. ``[B, L, K]``, the
    order of the paper's ``b_ij``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

SOFTMAX_AXES = ("interests", "behaviours")


def masked_softmax(logits: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """Softmax of ``logits`` over ``axis`` restricted to ``mask`` (same shape, bool).

  Masked entries get exactly 0 and a fully masked slice gives all zeros (not NaN, not uniform), so a
  dead row can never leak into a weighted sum.
  """
  # A finite fill keeps the gradient NaN-free; the product with the mask zeroes the residual weight.
  x = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  w = jax.nn.softmax(x, axis=axis) * mask
  return w / jnp.maximum(jnp.sum(w, axis=axis, keepdims=True), jnp.finfo(logits.dtype).tiny)


def squash(z: jax.Array) -> jax.Array:
  """Capsule squash (MIND Eq. 3, Sabour et al. 2017): |z|^2 / (1 + |z|^2) * z / |z| over the last axis.

  Written as z * |z| / (1 + |z|^2) with a double ``where`` so that z = 0 gives 0 and a zero (not NaN)
  gradient: an empty or fully masked capsule must stay harmless.
  """
  n2 = jnp.sum(z * z, axis=-1, keepdims=True)
  live = n2 > 0
  norm = jnp.sqrt(jnp.where(live, n2, 1.0))
  return jnp.where(live, z * norm / (1.0 + n2), 0.0)


def history_mask(history_len: jax.Array, L: int) -> jax.Array:
  """bool [B, L]: position l is a real behaviour iff l < history_len (left-aligned histories)."""
  return jnp.arange(L)[None, :] < history_len[:, None]


def dynamic_interest_count(history_len: jax.Array, K: int) -> jax.Array:
  """MIND Sec. 4.2 (Eq. 9): K'_u = max(1, min(K, floor(log2 |I_u|))). history_len int [B] -> int32 [B].

  floor(log2 n) is computed exactly on integers (bit length - 1) rather than through a float log2,
  which can land just below an integer for powers of two. Lengths 0 and 1 give 1 (log2 1 = 0).
  """
  n = jnp.maximum(history_len.astype(jnp.int32), 1)
  floor_log2 = 31 - jax.lax.clz(n)
  return jnp.clip(floor_log2, 1, K).astype(jnp.int32)


def interest_mask(history_len: jax.Array, K: int) -> jax.Array:
  """bool [B, K]: the first K'_u interests of each user are live (MIND Sec. 4.2)."""
  return jnp.arange(K)[None, :] < dynamic_interest_count(history_len, K)[:, None]


def check_softmax_axis(softmax_axis: str):
  if softmax_axis not in SOFTMAX_AXES:
    raise ValueError(
        f"model.softmax_axis={softmax_axis!r} is unknown: use 'interests' (MIND Algorithm 1) or "
        "'behaviours' (the torch-rechub / PaddleRec convention)")


def routing_weights(logits: jax.Array, behaviour_mask: jax.Array, interest_mask: jax.Array,
                    softmax_axis: str = "interests") -> jax.Array:
  """Coupling coefficients w_ij of one routing iteration (MIND Alg. 1 line 5). All [B, L, K].

  'interests': softmax over the live interests j for each behaviour i (the paper, ComiRec, DeepMatch);
  'behaviours': softmax over the real behaviours i for each interest j. Either way padded behaviours
  and dead interests get weight exactly 0.
  """
  live = behaviour_mask[:, :, None] & interest_mask[:, None, :]
  return masked_softmax(logits, live, axis=2 if softmax_axis == "interests" else 1)


def b2i_routing(behaviours: jax.Array, behaviour_mask: jax.Array, interest_mask: jax.Array,
                init_logits: jax.Array, S: jax.Array, iterations: int = 3,
                softmax_axis: str = "interests") -> jax.Array:
  """MIND B2I dynamic routing (Algorithm 1) with one bilinear map S shared by all behaviours.

  Args:
    behaviours: e_i, float [B, L, D] (raw item embeddings; S is applied here).
    behaviour_mask: bool [B, L], False on padded positions.
    interest_mask: bool [B, K], False on dead interests (K'_u < K).
    init_logits: b_ij at iteration 0, float [B, L, K] (the caller draws N(0, sigma^2): with all-zero
      logits and one shared S every capsule would be identical).
    S: float [D, D], the shared bilinear map; the routed vector is S e_i (``e_i @ S.T``).
    iterations: r >= 1.
    softmax_axis: 'interests' (paper) or 'behaviours' (see ``routing_weights``).

  Returns:
    capsules u_j, float [B, K, D]; dead interests are exact zeros.

  Gradients: S e_i is passed through ``stop_gradient`` in all but the last iteration, as the TF
  references (DeepMatch, ComiRec) do, so the learned parameters are trained only through the final
  z_j = sum_i w_ij S e_i with the coupling coefficients w_ij acting as constants.
  """
  check_softmax_axis(softmax_axis)
  if iterations < 1:
    raise ValueError(f"model.routing_iterations={iterations} must be >= 1")
  B, L, _ = behaviours.shape
  K = interest_mask.shape[1]
  if init_logits.shape != (B, L, K):
    raise ValueError(f"b2i_routing: init_logits must be [B, L, K] = {(B, L, K)}, got {init_logits.shape}")
  # Zeroing padded behaviours keeps their (finite, arbitrary) values out of the logit updates too.
  se = jnp.einsum("bld,ed->ble", behaviours, S) * behaviour_mask[..., None]  # S e_i  [B, L, D]
  se_frozen = jax.lax.stop_gradient(se)
  logits = init_logits
  for r in range(iterations):
    last = r == iterations - 1
    x = se if last else se_frozen
    w = routing_weights(logits, behaviour_mask, interest_mask, softmax_axis)  # [B, L, K]
    u = squash(jnp.einsum("blk,bld->bkd", w, x))  # u_j = squash(sum_i w_ij S e_i)  [B, K, D]
    if not last:  # the update after the last iteration would be unused
      logits = logits + jnp.einsum("bkd,bld->blk", u, x)  # b_ij += u_j . S e_i
  return u * interest_mask[..., None]


class B2IRouting(nn.Module):
  """MIND's multi-interest extractor layer (Algorithm 1): owns S and draws the initial logits.

  Attributes:
    K: maximum number of interests.
    dim: D, width of the behaviours and of S (d x d).
    iterations: routing iterations r (paper: 3).
    sigma: std of the initial logits b_ij ~ N(0, sigma^2) (paper: 1).
    softmax_axis: 'interests' (paper) or 'behaviours'.

  The initial logits come from ``self.make_rng('routing')`` folded with the user id and the history
  position: b_ij of user u at position i is the j-th of K N(0, sigma^2) draws from
  ``fold_in(fold_in(key, u), i)``. A user's capsules are thus a function of the key, the parameters
  and that user's history alone, not of its row, its neighbours or the padded length L: evaluation
  (one fixed key, users in chunks) and serving (one user) agree, while training still gets fresh
  logits at every step because the step key changes. Distinct users (and positions) get independent
  draws; rows of the same user in one batch share theirs.
  """

  K: int
  dim: int
  iterations: int = 3
  sigma: float = 1.0
  softmax_axis: str = "interests"

  @nn.compact
  def __call__(self, behaviours: jax.Array, behaviour_mask: jax.Array, interest_mask: jax.Array,
               user: jax.Array) -> jax.Array:
    """behaviours [B, L, D], behaviour_mask [B, L], interest_mask [B, K], user int [B] -> capsules [B, K, D]."""
    check_softmax_axis(self.softmax_axis)
    S = self.param("S", nn.initializers.lecun_normal(), (self.dim, self.dim))
    B, L, _ = behaviours.shape
    if user.shape != (B,):
      raise ValueError(f"B2IRouting: user must be int [B] = {(B,)}, got {user.shape}")
    key = self.make_rng("routing")

    # Keyed by position too: the batch's padded length L then changes no real logit, whether or not
    # jax_threefry_partitionable makes a [L, K] draw prefix-stable.
    def draw(u, i):
      return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, u), i), (self.K,), behaviours.dtype)

    init = self.sigma * jax.vmap(jax.vmap(draw, (None, 0)), (0, None))(user, jnp.arange(L))  # [B, L, K]
    return b2i_routing(behaviours, behaviour_mask, interest_mask, init, S, self.iterations, self.softmax_axis)


def comirec_dr_routing(behaviours: jax.Array, behaviour_mask: jax.Array, W: jax.Array,
                       iterations: int = 3) -> jax.Array:
  """ComiRec-DR dynamic routing (ComiRec Sec. 3.2, Eq. 1-4; THUDM/ComiRec ``CapsuleNetwork``,
  bilinear_type=2): a separate map W[l, j] per (history position l, interest j).

  Args:
    behaviours: e_i, float [B, L, D].
    behaviour_mask: bool [B, L].
    W: float [L, K, D, D]; the routed vector is e_hat_{j|i} = W[i, j] e_i.
    iterations: r >= 1.

  Returns:
    capsules float [B, K, D].

  Logits start at zero (the per-interest maps already break the symmetry), the softmax is over
  interests, the squash and the stop-gradient on e_hat in all but the last iteration are as in MIND.
  """
  if iterations < 1:
    raise ValueError(f"model.routing_iterations={iterations} must be >= 1")
  B, L, _ = behaviours.shape
  K = W.shape[1]
  if W.shape[0] < L:
    raise ValueError(f"ComiRec-DR: history length {L} exceeds model.maxlen={W.shape[0]}: raise "
                     "model.maxlen or truncate the histories")
  e_hat = jnp.einsum("lkde,ble->blkd", W[:L], behaviours) * behaviour_mask[:, :, None, None]  # [B, L, K, D]
  e_hat_frozen = jax.lax.stop_gradient(e_hat)
  all_live = jnp.ones((B, K), bool)
  logits = jnp.zeros((B, L, K), behaviours.dtype)
  for r in range(iterations):
    last = r == iterations - 1
    x = e_hat if last else e_hat_frozen
    w = routing_weights(logits, behaviour_mask, all_live, "interests")
    u = squash(jnp.einsum("blk,blkd->bkd", w, x))
    if not last:
      logits = logits + jnp.einsum("bkd,blkd->blk", u, x)
  return u


class ComiRecDR(nn.Module):
  """ComiRec-DR's capsule network with its per-(position, interest) maps W [maxlen, K, D, D].

  Attributes:
    K: number of interests (fixed: ComiRec has no dynamic K).
    dim: D.
    maxlen: L, the longest history the maps cover (one map per absolute left-aligned position, as in
      ComiRec's data layout).
    iterations: routing iterations (ComiRec: 3).

  W is initialised with a fan-in scaled normal (std 1/sqrt(D)) rather than ComiRec's std-1 normal, so
  the routed vectors have the scale of the embeddings whatever D is.
  """

  K: int
  dim: int
  maxlen: int
  iterations: int = 3

  @nn.compact
  def __call__(self, behaviours: jax.Array, behaviour_mask: jax.Array) -> jax.Array:
    """behaviours [B, L, D], behaviour_mask [B, L] -> capsules [B, K, D]."""
    W = self.param("W", nn.initializers.normal(self.dim ** -0.5), (self.maxlen, self.K, self.dim, self.dim))
    return comirec_dr_routing(behaviours, behaviour_mask, W, self.iterations)


class SelfAttentiveExtractor(nn.Module):
  """ComiRec-SA's multi-interest extractor (ComiRec Sec. 3.2, Eq. 5-6; ``Model_ComiRec_SA``).

  A = softmax over positions of W2 tanh(W1 (H + P)) with W1: D -> 4D, W2: 4D -> K (both with biases,
  as ComiRec's dense layers); V_u = A^T H. The positional embeddings P only steer the attention: the
  interests are mixtures of the plain item embeddings H, as in the official code.

  Attributes:
    K: number of interests.
    dim: D.
    maxlen: number of learned positions (absolute, left-aligned).
  """

  K: int
  dim: int
  maxlen: int

  @nn.compact
  def __call__(self, H: jax.Array, behaviour_mask: jax.Array, return_attention: bool = False):
    """H [B, L, D], behaviour_mask [B, L] -> V_u [B, K, D] (and A [B, K, L] if return_attention).

    Rows of A sum to 1 over real positions and are exactly 0 on padding; a user with no behaviours
    gets all-zero attention and zero interests.
    """
    L = H.shape[1]
    if L > self.maxlen:
      raise ValueError(f"ComiRec-SA: history length {L} exceeds model.maxlen={self.maxlen}: raise "
                       "model.maxlen or truncate the histories")
    P = self.param("pos_embed", nn.initializers.normal(0.05), (self.maxlen, self.dim))
    hidden = jnp.tanh(nn.Dense(4 * self.dim, name="W1")(H + P[None, :L]))  # [B, L, 4D]
    scores = jnp.swapaxes(nn.Dense(self.K, name="W2")(hidden), 1, 2)  # [B, K, L]
    A = masked_softmax(scores, behaviour_mask[:, None, :], axis=-1)
    V = jnp.einsum("bkl,bld->bkd", A, H)
    return (V, A) if return_attention else V


def label_aware_attention(interests: jax.Array, mask: jax.Array, target: jax.Array,
                          power: float | str = 1.0) -> jax.Array:
  """MIND label-aware attention (Sec. 4.3, Eq. 11): v_u = V_u softmax(pow(V_u^T e_label, p)).

  Args:
    interests: V_u, float [B, K, D].
    mask: bool [B, K], live interests (every row needs at least one).
    target: e_label, float [B, D].
    power: p >= 0, or 'hard'.

  Returns:
    float [B, D].

  pow() of a possibly negative dot product is ill-defined, so p is implemented as a sharpening of the
  softmax: weights = softmax over live k of p * <v_k, e_label>. p = 0 gives the uniform mean of the
  live interests and p -> inf tends to the argmax; 'hard' returns the argmax live interest exactly
  (ComiRec's training readout; the gradient reaches only that interest). Dead interests never win.
  """
  logits = jnp.einsum("bkd,bd->bk", interests, target)
  if power == "hard":
    idx = jnp.argmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(interests, idx[:, None, None], axis=1)[:, 0]
  if isinstance(power, str) or power < 0:
    raise ValueError(f"model.label_power={power!r} must be a float >= 0 or 'hard'")
  w = masked_softmax(power * logits, mask, axis=-1)
  return jnp.einsum("bk,bkd->bd", w, interests)
