"""Product quantisation (PQ) for SEMINAR's approximate multi-modal attention: k-means, codebooks,
encode / decode, asymmetric (query look-up table) and symmetric (centroid-centroid table) scores,
and the exact / PQ top-K position selection of the general search unit.

References:
  SEMINAR: "Search-Enhanced Multi-modal Interest Network and Approximate Retrieval for Lifelong
    Sequential Recommendation", Ant Group (arXiv 2407.10714), Sec. "approximate retrieval": the
    multi-modal score sum_i sum_j w_i w_j <q_i, k_j>, each modality's vectors product-quantised
    (C sub-spaces, 256 centroids), centroid inner products precomputed, a position's score read
    from tables.
  PQ: Jegou, Douze, Schmid, "Product Quantization for Nearest Neighbor Search", TPAMI 2011
    (asymmetric distance computation, ADC = exact query against quantised keys; symmetric, SDC =
    both quantised, centroid-centroid tables).

Shapes (all float32, codes int32; every shape is static under ``jax.jit``):
  N training vectors, D = vector width, C = ``num_subspaces``, K = ``num_centroids``,
  s = D // C sub-vector width; B batch, H heads, L sequence positions, M modalities, d width.
  codebooks  [C, K, s]        one modality; ``[M, C, K, d // C]`` for M modalities
  codes      [..., C]         centroid index per sub-space; ``[B, L, M, C]`` for a multi-modal sequence
  lut        [..., C, K]      query look-up table: <q sub-vector c, centroid k of sub-space c>

Multi-modal score. With per-modality weights w [M], queries q [B, H, M, d] and keys k [B, L, M, d],
  score[b, h, l] = sum_i sum_j w_i w_j <q[b, h, i], k[b, l, j]> = <sum_i w_i q_i, sum_j w_j k_j>.
The exact path is one matmul with an M d contraction (the query side carries both weight sums; O(M d)
per position, not O(M^2 d)); ``fused_exact_scores`` takes cached fused keys sum_j w_j k_j (O(d)). The PQ path
(``multimodal_pq_scores``) folds the weights into one look-up table per (modality, sub-space): M C
lookups per position, equal to the exact score on decoded keys. ``multimodal_sdc_scores`` is the
paper's form with quantised queries too (precomputed [M, M, C, K, K] tables; O(M^2 C) lookups per
position when the table is formed, then the same M C lookups per position).

Re-scored PQ top-K (``rescored_topk``): the PQ scores pick R candidates per query, exact scores of
those R only (``fused_candidate_scores``: a row gather of R fused keys) pick the top-K; R = L gives the
exact top-K. On the benchmark's clustered keys (L = 2,048, top-32, C = 8) R = 128 recovers 0.93-0.94
of the exact top-32 against 0.65 for the PQ top-32 itself; on XLA CPU no PQ path is faster than a
matmul over cached fused keys (a (position, head) needs C to M C gather elements of 5-8 ns each,
more than its memory-bound dot product; experiments/results/bench/README.md, SEMINAR attention).

SEMINAR's (query, item) pair keys (``pair_pq_scores``; ``pair_sdc_scores`` with quantised queries): items and query keywords are quantised
separately at catalogue level and a position's codes gathered by id; a pair key is linear in its
item and keyword vectors, so its score is still table look-ups (M C per position for the item, C per
live keyword), and encoding costs N M + V vectors per refresh instead of B L M.

Keys are shared across heads: a per-head projection belongs on the query side,
q_h^T (W_h k) = (W_h^T q_h)^T k, so the keys (item vectors) can be quantised once, offline.

The L axis: every per-position function takes ``chunk`` (static int or None). With ``chunk`` set,
positions are scored ``chunk`` at a time under ``lax.map`` (L is padded to a multiple of it), so the
[..., chunk, C] gather intermediates stay small at B = 256, L = 8,192.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------


def _sq_dists(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """||x_n - c_k||^2 [N, K] for x [N, d], centroids [K, d] (clamped at 0 against rounding)."""
  d2 = (jnp.sum(x * x, axis=-1)[:, None] - 2.0 * x @ centroids.T
        + jnp.sum(centroids * centroids, axis=-1)[None, :])
  return jnp.maximum(d2, 0.0)


def _map_positions(fn: Callable[[jax.Array], jax.Array], codes: jax.Array, chunk: Optional[int],
                   pos_axis: int) -> jax.Array:
  """fn(codes) -> [..., L] evaluated ``chunk`` positions at a time.

  ``codes`` has its L positions on ``pos_axis`` (negative); ``fn`` maps a codes array with any
  number of positions P on that axis to an array whose last axis is P.
  """
  length = codes.shape[pos_axis]
  if chunk is None or chunk >= length:
    return fn(codes)
  if chunk <= 0:
    raise ValueError(f"chunk={chunk} must be a positive number of positions (or None)")
  n = -(-length // chunk)
  pad = n * chunk - length
  axis = codes.ndim + pos_axis
  if pad:
    widths = [(0, 0)] * codes.ndim
    widths[axis] = (0, pad)
    codes = jnp.pad(codes, widths)  # code 0 is a valid centroid; the padded scores are dropped
  shape = codes.shape[:axis] + (n, chunk) + codes.shape[axis + 1:]
  blocks = jnp.moveaxis(codes.reshape(shape), axis, 0)  # [n, ..., chunk, ...]
  out = jax.lax.map(fn, blocks)  # [n, ..., chunk]
  out = jnp.moveaxis(out, 0, -2)  # [..., n, chunk]
  return out.reshape(out.shape[:-2] + (n * chunk,))[..., :length]


def _check_subspaces(dim: int, num_subspaces: int) -> None:
  if num_subspaces <= 0 or dim % num_subspaces:
    raise ValueError(f"num_subspaces={num_subspaces} must divide the vector width D={dim} "
                     f"(D % num_subspaces == 0); choose a divisor of {dim}, e.g. 8 or 16 for 64")


# --------------------------------------------------------------------------------------------------
# k-means and codebooks.
# --------------------------------------------------------------------------------------------------


def _kmeanspp_init(key: jax.Array, x: jax.Array, num_centroids: int) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with prob. ~ D(x)^2."""
  n, d = x.shape
  k0, key = jax.random.split(key)
  first = x[jax.random.randint(k0, (), 0, n)]
  centroids = jnp.zeros((num_centroids, d), x.dtype).at[0].set(first)
  min_d2 = jnp.sum((x - first) ** 2, axis=-1)

  def body(i, carry):
    centroids, min_d2 = carry
    total = jnp.sum(min_d2)
    # All points coincide with a centre (duplicates): fall back to a uniform draw.
    logits = jnp.where(total > 0, jnp.log(jnp.maximum(min_d2, 1e-30)), jnp.zeros_like(min_d2))
    logits = jnp.where((total > 0) & (min_d2 <= 0), NEG_INF, logits)
    pick = jax.random.categorical(jax.random.fold_in(key, i), logits)
    c = x[pick]
    return centroids.at[i].set(c), jnp.minimum(min_d2, jnp.sum((x - c) ** 2, axis=-1))

  centroids, _ = jax.lax.fori_loop(1, num_centroids, body, (centroids, min_d2))
  return centroids


def _lloyd_step(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """One Lloyd iteration; an empty cluster is re-seeded with one of the points farthest from its
  centre (the j-th empty cluster gets the j-th farthest point), which splits the worst clusters."""
  num_centroids = centroids.shape[0]
  d2 = _sq_dists(x, centroids)
  assign = jnp.argmin(d2, axis=-1)
  onehot = jax.nn.one_hot(assign, num_centroids, dtype=x.dtype)  # [N, K]
  counts = onehot.sum(axis=0)
  means = (onehot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
  empty = counts == 0
  far = jax.lax.top_k(jnp.min(d2, axis=-1), min(num_centroids, x.shape[0]))[1]
  rank = jnp.clip(jnp.cumsum(empty) - 1, 0, far.shape[0] - 1)
  return jnp.where(empty[:, None], x[far[rank]], means)


@functools.partial(jax.jit, static_argnames=("num_centroids", "init"))
def kmeans(key: jax.Array, x: jax.Array, num_centroids: int = 256, iters: int = 20,
           init: str = "kmeans++") -> jax.Array:
  """Lloyd's k-means in JAX: centroids [num_centroids, d] of x [N, d].

  Deterministic given ``key``. ``init`` is "kmeans++" (default) or "random" (distinct sample
  points); ``iters`` may be traced (no recompilation per value). Empty clusters are re-seeded at every iteration. Memory is O(N * num_centroids): give it
  a sample (tens of thousands of vectors), not a whole catalogue.
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2:
    raise ValueError(f"kmeans: x must be [N, d], got shape {x.shape}")
  n = x.shape[0]
  if num_centroids > n:
    raise ValueError(f"num_centroids={num_centroids} exceeds the number of training vectors "
                     f"N={n}: lower num_centroids or train on more vectors")
  if init == "kmeans++":
    centroids = _kmeanspp_init(key, x, num_centroids)
  elif init == "random":
    centroids = x[jax.random.choice(key, n, (num_centroids,), replace=False)]
  else:
    raise ValueError(f"init={init!r}: choose 'kmeans++' or 'random'")
  return jax.lax.fori_loop(0, iters, lambda _, c: _lloyd_step(x, c), centroids)


def kmeans_error(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """Mean squared distance of x [N, d] to its nearest centroid (within-cluster error)."""
  return jnp.mean(jnp.min(_sq_dists(jnp.asarray(x, jnp.float32), centroids), axis=-1))


@functools.partial(jax.jit, static_argnames=("num_subspaces", "num_centroids", "init"))
def train_pq(key: jax.Array, x: jax.Array, num_subspaces: int, num_centroids: int = 256,
             iters: int = 20, init: str = "kmeans++") -> jax.Array:
  """PQ codebooks [C, num_centroids, D // C] of x [N, D]: one k-means per sub-space (vmapped).

  Raises ValueError naming ``num_subspaces`` when it does not divide D.
  """
  x = jnp.asarray(x, jnp.float32)
  n, dim = x.shape
  _check_subspaces(dim, num_subspaces)
  sub = jnp.transpose(x.reshape(n, num_subspaces, dim // num_subspaces), (1, 0, 2))  # [C, N, s]
  keys = jax.random.split(key, num_subspaces)
  return jax.vmap(lambda k, xs: kmeans(k, xs, num_centroids, iters, init))(keys, sub)


def train_multimodal_pq(key: jax.Array, x: jax.Array, num_subspaces: int, num_centroids: int = 256,
                        iters: int = 20, init: str = "kmeans++") -> jax.Array:
  """Per-modality codebooks [M, C, K, d // C] from training vectors x [N, M, d]."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 3:
    raise ValueError(f"train_multimodal_pq: x must be [N, M, d], got shape {x.shape}")
  keys = jax.random.split(key, x.shape[1])
  return jnp.stack([train_pq(keys[m], x[:, m], num_subspaces, num_centroids, iters, init)
                    for m in range(x.shape[1])])


# --------------------------------------------------------------------------------------------------
# Encode / decode.
# --------------------------------------------------------------------------------------------------


def encode(codebooks: jax.Array, x: jax.Array, chunk: Optional[int] = 16384) -> jax.Array:
  """Nearest centroid per sub-space: codes int32 [..., C] of x [..., D], codebooks [C, K, s].

  Rows are encoded ``chunk`` at a time (the [rows, C, K] distance block is the memory peak).
  Store the codes as uint8 when K <= 256 if memory matters; every function here accepts them.
  """
  num_subspaces, _, s = codebooks.shape
  dim = x.shape[-1]
  _check_subspaces(dim, num_subspaces)
  if dim != num_subspaces * s:
    raise ValueError(f"encode: x width {dim} != C * s = {num_subspaces} * {s} of the codebooks")
  lead = x.shape[:-1]
  flat = jnp.asarray(x, jnp.float32).reshape(-1, num_subspaces, s)  # [R, C, s]
  cb_sq = jnp.sum(codebooks * codebooks, axis=-1)  # [C, K]

  def enc(rows):  # [P, C, s] -> [C, P] (positions last, as _map_positions wants)
    d2 = cb_sq[None] - 2.0 * jnp.einsum("rcs,cks->rck", rows, codebooks)
    return jnp.argmin(d2, axis=-1).astype(jnp.int32).T

  codes = _map_positions(enc, flat, chunk, -3)  # [C, R]
  return codes.T.reshape(lead + (num_subspaces,))


def decode(codebooks: jax.Array, codes: jax.Array) -> jax.Array:
  """Reconstruction [..., D] of codes [..., C] from codebooks [C, K, s]."""
  num_subspaces, _, s = codebooks.shape
  sub = codebooks[jnp.arange(num_subspaces), codes.astype(jnp.int32)]  # [..., C, s]
  return sub.reshape(codes.shape[:-1] + (num_subspaces * s,))


def multimodal_encode(codebooks: jax.Array, x: jax.Array, chunk: Optional[int] = 16384) -> jax.Array:
  """codes [..., M, C] of multi-modal vectors x [..., M, d] with codebooks [M, C, K, d // C]."""
  return jnp.stack([encode(codebooks[m], x[..., m, :], chunk) for m in range(codebooks.shape[0])],
                   axis=-2)


def multimodal_decode(codebooks: jax.Array, codes: jax.Array) -> jax.Array:
  """[..., M, d] from codes [..., M, C] and codebooks [M, C, K, d // C]."""
  return jnp.stack([decode(codebooks[m], codes[..., m, :]) for m in range(codebooks.shape[0])],
                   axis=-2)


# --------------------------------------------------------------------------------------------------
# Table scores.
# --------------------------------------------------------------------------------------------------


def query_lut(codebooks: jax.Array, q: jax.Array) -> jax.Array:
  """ADC look-up table [..., C, K]: <q sub-vector c, centroid k of sub-space c>, q [..., D]."""
  num_subspaces, _, s = codebooks.shape
  _check_subspaces(q.shape[-1], num_subspaces)
  qs = q.reshape(q.shape[:-1] + (num_subspaces, s))
  return jnp.einsum("...cs,cks->...ck", qs, codebooks)


def _lut_scores_block(lut: jax.Array, codes: jax.Array) -> jax.Array:
  """sum_c lut[..., c, codes[..., l, c]] for lut [..., C, K], codes [..., P, C] -> [..., P]."""
  idx = codes.astype(jnp.int32)[..., None]  # [..., P, C, 1]
  picked = jnp.take_along_axis(lut[..., None, :, :], idx, axis=-1, mode="clip")  # [..., P, C, 1]
  return jnp.sum(picked[..., 0], axis=-1)


def lut_scores(lut: jax.Array, codes: jax.Array, chunk: Optional[int] = None) -> jax.Array:
  """Scores [..., L] = sum over sub-spaces of table look-ups lut[..., c, codes[..., l, c]].

  lut [..., C, K] and codes [..., L, C] broadcast on their leading axes (e.g. lut [B, H, C, K] with
  codes [B, 1, L, C] -> [B, H, L]). Equals q . decode(codes) when lut = query_lut(codebooks, q).
  """
  if lut.shape[-2] != codes.shape[-1]:
    raise ValueError(f"lut_scores: lut has {lut.shape[-2]} sub-spaces, codes {codes.shape[-1]}")
  return _map_positions(lambda c: _lut_scores_block(lut, c), codes, chunk, -2)


def centroid_tables(codebooks_a: jax.Array, codebooks_b: jax.Array) -> jax.Array:
  """Centroid-centroid inner products [C, K_a, K_b] of codebooks [C, K_a, s] and [C, K_b, s]."""
  return jnp.einsum("cas,cbs->cab", codebooks_a, codebooks_b)


def sdc_scores(tables: jax.Array, q_codes: jax.Array, k_codes: jax.Array,
               chunk: Optional[int] = None) -> jax.Array:
  """Symmetric scores [..., L] = sum_c tables[c, q_codes[..., c], k_codes[..., l, c]].

  tables [C, K_q, K_k] (``centroid_tables``), q_codes [..., C], k_codes [..., L, C]; equals
  decode(q_codes) . decode(k_codes).
  """
  num_subspaces = tables.shape[0]
  lut = tables[jnp.arange(num_subspaces), q_codes.astype(jnp.int32)]  # [..., C, K_k]
  return lut_scores(lut, k_codes, chunk)


# --------------------------------------------------------------------------------------------------
# Multi-modal scores: score = sum_i sum_j w_i w_j <q_i, k_j>.
# --------------------------------------------------------------------------------------------------


def _check_modalities(name: str, m: int, w: jax.Array) -> None:
  if w.shape != (m,):
    raise ValueError(f"{name}: modality weights w must be [M] = [{m}], got shape {w.shape}")


def multimodal_exact_scores(q: jax.Array, keys: jax.Array, w: jax.Array) -> jax.Array:
  """Exact multi-modal scores [B, H, L] of q [B, H, M, d] and keys [B, L, M, d], weights w [M]."""
  _check_modalities("multimodal_exact_scores", q.shape[-2], w)
  # One matmul with an M d contraction: the query side carries both weight sums,
  # (sum_i w_i q_i) w_j against k_j, so the keys are read once and never fused into a [B, L, d]
  # copy (XLA CPU ran the former einsum("blmd,m->bld") + matmul 2-5x slower).
  b, h, m, d = q.shape
  qe = jnp.einsum("bhmd,m,j->bhjd", q, w, w).reshape(b, h, m * d)
  return jnp.einsum("bhx,blx->bhl", qe, keys.reshape(keys.shape[:2] + (m * d,)))


def fused_exact_scores(q: jax.Array, fused_keys: jax.Array, w: jax.Array) -> jax.Array:
  """Exact multi-modal scores [B, H, L] against cached fused keys sum_j w_j k_j [B, L, d]."""
  _check_modalities("fused_exact_scores", q.shape[-2], w)
  return jnp.einsum("bhd,bld->bhl", jnp.einsum("bhmd,m->bhd", q, w), fused_keys)


def multimodal_query_lut(q: jax.Array, codebooks: jax.Array, w: jax.Array) -> jax.Array:
  """Weighted ADC table [B, H, M * C, K]: w_j <sum_i w_i q_i (sub-space c), centroid k of (j, c)>.

  q [B, H, M, d], codebooks [M, C, K, d // C]. Its row (j, c) is read with the code of modality j,
  sub-space c, i.e. codes [B, L, M, C] flattened to [B, L, M * C].
  """
  m, c, k, _ = codebooks.shape
  _check_modalities("multimodal_query_lut", m, w)
  qw = jnp.einsum("bhmd,m->bhd", q, w)
  lut = jnp.stack([query_lut(codebooks[j], qw) for j in range(m)], axis=-3)  # [B, H, M, C, K]
  lut = lut * w[:, None, None]
  return lut.reshape(lut.shape[:-3] + (m * c, k))


def multimodal_pq_scores(q: jax.Array, codes: jax.Array, codebooks: jax.Array, w: jax.Array,
                         chunk: Optional[int] = None) -> jax.Array:
  """PQ multi-modal scores [B, H, L] from codes [B, L, M, C] and codebooks [M, C, K, d // C].

  M * C table look-ups per (head, position); equals ``multimodal_exact_scores`` on the decoded
  keys (the O(M^2 C) form sums the same terms: the query-side modality sum is folded into the
  table first).
  """
  b, length, m, c = codes.shape
  lut = multimodal_query_lut(q, codebooks, w)  # [B, H, M * C, K]
  return lut_scores(lut, codes.reshape(b, 1, length, m * c), chunk)


def pair_pq_scores(q: jax.Array, item_codes: jax.Array, keyword_codes: jax.Array,
                   keyword_mask: jax.Array, codebooks: jax.Array, query_codebooks: jax.Array,
                   w: jax.Array, alpha: float, chunk: Optional[int] = None) -> jax.Array:
  """PQ multi-modal scores [B, H, L] of (query, item) pair keys from catalogue-level codes.

  A position's per-modality key is key_j = alpha * qbar + (1 - alpha) * e_j for a search event
  (qbar = mean of its keyword vectors) and e_j for a browsing event (SEMINAR's pair embedding).
  Items and keywords are quantised separately (codes of the catalogue, gathered by id), so
    score = (1 - alpha h) sum_j w_j <qw, dec e_j> + alpha h mean_t <qw, dec kw_t>
  with qw = sum_i w_i q_i, h = 1 for a search event, 0 otherwise (the weights w sum to 1). Both
  terms are table look-ups: M C per position for the item, C per live keyword.

  q [B, H, M, d]; item_codes [B, L, M, C] (the history items' codes); keyword_codes [B, L, Q, C];
  keyword_mask bool [B, L, Q] (live keywords; a row without any is a browsing event); codebooks
  [M, C, K, d // C] (item modalities), query_codebooks [C, K, d // C] (keywords).
  Equals ``multimodal_exact_scores`` on the pair keys built from the decoded items and keywords.
  """
  item = multimodal_pq_scores(q, item_codes, codebooks, w, chunk)              # [B, H, L]
  qw = jnp.einsum("bhmd,m->bhd", q, w)
  return _pair_mix(item, query_lut(query_codebooks, qw), keyword_codes, keyword_mask, alpha, chunk)


def _pair_mix(item: jax.Array, kw_lut: jax.Array, keyword_codes: jax.Array, keyword_mask: jax.Array,
              alpha: float, chunk: Optional[int]) -> jax.Array:
  """(1 - alpha h) item + alpha h mean_t kw_lut . keyword t (see ``pair_pq_scores``)."""
  b, length, nq, c = keyword_codes.shape
  kw = lut_scores(kw_lut, keyword_codes.reshape(b, 1, length * nq, c), chunk)
  kmask = keyword_mask.astype(item.dtype)
  n = kmask.sum(-1)                                                            # [B, L]
  query = jnp.sum(kw.reshape(kw.shape[:2] + (length, nq)) * kmask[:, None], -1) / jnp.maximum(n, 1.0)[:, None]
  a = alpha * (n > 0).astype(item.dtype)[:, None]                              # [B, 1, L]
  return (1.0 - a) * item + a * query


def pair_sdc_scores(q_codes: jax.Array, item_codes: jax.Array, keyword_codes: jax.Array,
                    keyword_mask: jax.Array, codebooks: jax.Array, query_codebooks: jax.Array,
                    w: jax.Array, alpha: float, chunk: Optional[int] = None) -> jax.Array:
  """``pair_pq_scores`` with quantised queries (the paper's symmetric form): q_codes [B, H, M, C]
  (the queries encoded with the item codebooks), scores from centroid-centroid tables only:
  [M, M, C, K, K] item-item (``multimodal_centroid_tables``) and [M, C, K, K_kw] item-keyword.
  Equals ``pair_pq_scores`` of the decoded queries."""
  m, c = codebooks.shape[:2]
  item = multimodal_sdc_scores(multimodal_centroid_tables(codebooks), q_codes, item_codes, w, chunk)
  kw_tables = jnp.einsum("icas,cbs->icab", codebooks, query_codebooks)           # [M, C, K, K_kw]
  qc = q_codes.astype(jnp.int32)
  rows = kw_tables[jnp.arange(m)[:, None], jnp.arange(c)[None, :], qc]          # [B, H, M, C, K_kw]
  return _pair_mix(item, jnp.einsum("bhick,i->bhck", rows, w), keyword_codes, keyword_mask, alpha, chunk)


def multimodal_centroid_tables(codebooks: jax.Array) -> jax.Array:
  """The paper's precomputed tables [M, M, C, K, K]: <centroid of (i, c), centroid of (j, c)>."""
  return jnp.einsum("icas,jcbs->ijcab", codebooks, codebooks)


def multimodal_sdc_scores(tables: jax.Array, q_codes: jax.Array, k_codes: jax.Array, w: jax.Array,
                          chunk: Optional[int] = None) -> jax.Array:
  """Scores [B, H, L] with quantised queries too (the paper's centroid-centroid tables).

  tables [M, M, C, K, K] (``multimodal_centroid_tables``), q_codes [B, H, M, C], k_codes
  [B, L, M, C]. Equals ``multimodal_exact_scores`` of the decoded queries and decoded keys.
  """
  m, _, c, _, _ = tables.shape
  lut = multimodal_sdc_lut(tables, q_codes, w)
  b, length = k_codes.shape[:2]
  return lut_scores(lut, k_codes.reshape(b, 1, length, m * c), chunk)


def multimodal_sdc_lut(tables: jax.Array, q_codes: jax.Array, w: jax.Array) -> jax.Array:
  """The SDC look-up table [B, H, M * C, K] of quantised queries q_codes [B, H, M, C]:
  lut[(j, c), k] = sum_i w_i w_j tables[i, j, c, q_codes[i, c], k]. Rows of the precomputed
  centroid-centroid tables, summed: no multiply by the query (the ADC table costs M K d MACs per
  query; this one M^2 C K additions of table rows)."""
  m, _, c, _, k = tables.shape
  _check_modalities("multimodal_sdc_lut", m, w)
  # rows[b, h, i, j, c, :] = tables[i, j, c, q_codes[b, h, i, c], :]
  qc = q_codes.astype(jnp.int32)
  rows = tables[jnp.arange(m)[:, None, None], jnp.arange(m)[None, :, None],
                jnp.arange(c)[None, None, :], qc[..., :, None, :]]  # [B, H, M_i, M_j, C, K]
  return jnp.einsum("bhijck,i,j->bhjck", rows, w, w).reshape(qc.shape[:-2] + (m * c, k))


# --------------------------------------------------------------------------------------------------
# Top-K positions (the general search unit) and the gather for the exact search unit.
# --------------------------------------------------------------------------------------------------


def topk_positions(scores: jax.Array, mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k positions of scores [B, H, L] among live positions mask [B, L] (bool).

  Returns (idx int32 [B, H, k], valid bool [B, H, k]), best first. Masked positions score -inf and
  are never chosen over a live one; when fewer than k positions are live, the surplus slots hold
  masked positions with valid = False (gather them if convenient, but mask them out downstream).
  """
  length = scores.shape[-1]
  if k > length:
    raise ValueError(f"top-K k={k} exceeds the sequence length L={length}: lower k (the config's "
                     f"top-K) or lengthen the sequence")
  if mask.shape != (scores.shape[0], length):
    raise ValueError(f"topk_positions: mask must be [B, L] = {(scores.shape[0], length)}, "
                     f"got {mask.shape}")
  mask = mask.astype(bool)
  masked = jnp.where(mask[:, None, :], scores, NEG_INF)
  _, idx = jax.lax.top_k(masked, k)
  valid = jnp.take_along_axis(jnp.broadcast_to(mask[:, None, :], masked.shape), idx, axis=-1)
  return idx.astype(jnp.int32), valid


def exact_topk(q: jax.Array, keys: jax.Array, w: jax.Array, mask: jax.Array,
               k: int) -> tuple[jax.Array, jax.Array]:
  """(idx [B, H, k], valid [B, H, k]) of the exact multi-modal scores; q [B, H, M, d], keys
  [B, L, M, d], w [M], mask [B, L]. Same interface as ``pq_topk``."""
  return topk_positions(multimodal_exact_scores(q, keys, w), mask, k)


def pq_topk(q: jax.Array, codes: jax.Array, codebooks: jax.Array, w: jax.Array, mask: jax.Array,
            k: int, chunk: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
  """(idx [B, H, k], valid [B, H, k]) of the PQ multi-modal scores; codes [B, L, M, C], codebooks
  [M, C, K, d // C]. Same interface as ``exact_topk``."""
  return topk_positions(multimodal_pq_scores(q, codes, codebooks, w, chunk), mask, k)


def rescored_topk(approx: jax.Array, mask: jax.Array, k: int, num_candidates: int,
                  exact_fn: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Re-scored approximate top-k: the top ``num_candidates`` positions by the approximate scores
  approx [B, H, L] (PQ look-ups), exact scores on those candidates only, then their top k.

  exact_fn(cand int32 [B, H, R]) -> exact scores [B, H, R] of the candidate positions (e.g.
  ``fused_candidate_scores``). Returns (idx [B, H, k], valid [B, H, k]) like ``topk_positions``:
  R = max(k, min(num_candidates, L)); with R = L the result is the exact top-k (recall 1).
  """
  length = approx.shape[-1]
  r = max(k, min(int(num_candidates), length))
  cand, cvalid = topk_positions(approx, mask, r)
  exact = jnp.where(cvalid, exact_fn(cand), NEG_INF)
  _, j = jax.lax.top_k(exact, k)
  return (jnp.take_along_axis(cand, j, axis=-1),
          jnp.take_along_axis(cvalid, j, axis=-1))


def fused_candidate_scores(qw: jax.Array, fused_keys: jax.Array, cand: jax.Array) -> jax.Array:
  """Exact scores [B, H, R] of fused queries qw [B, H, d] against the fused keys [B, L, d] of the
  candidate positions cand [B, H, R] (one row gather of B H R keys, then a batched dot)."""
  b, length, d = fused_keys.shape
  rows = cand + (jnp.arange(b, dtype=cand.dtype) * length)[:, None, None]
  picked = jnp.take(fused_keys.reshape(b * length, d), rows, axis=0, mode="clip")  # [B, H, R, d]
  return jnp.einsum("bhd,bhrd->bhr", qw, picked)


def gather_topk(values: jax.Array, idx: jax.Array) -> jax.Array:
  """values [B, L, ...] at idx [B, H, k] -> [B, H, k, ...]."""
  return jax.vmap(lambda v, i: v[i])(values, idx)


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray, valid: Optional[np.ndarray] = None
                ) -> float:
  """Mean |approx top-K ∩ exact top-K| / K over rows; idx [..., K] (NumPy, for benchmarks/tests).

  With ``valid`` [..., K] (of the exact top-K), only valid exact slots count.
  """
  a = np.asarray(approx_idx).reshape(-1, approx_idx.shape[-1])
  e = np.asarray(exact_idx).reshape(-1, exact_idx.shape[-1])
  v = np.ones_like(e, bool) if valid is None else np.asarray(valid).reshape(e.shape)
  hits = [len(set(ai.tolist()) & set(ei[vi].tolist())) / max(int(vi.sum()), 1)
          for ai, ei, vi in zip(a, e, v)]
  return float(np.mean(hits))
