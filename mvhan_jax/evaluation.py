"""Full-corpus retrieval evaluation: exact top-k on device, target ranks and metrics.

Everything here ranks a query against the *whole* item catalogue (no sampled
negatives: sampled metrics are biased, see SEEDS.md "Cross-cutting"), with the
user's own history excluded from the ranking.

Shapes used throughout:
  Q: number of queries (users), K: interests per user, D: embedding width,
  I: number of items, E: longest exclusion list, T: targets per query.

Queries are either single vectors ``[Q, D]`` or multi-interest ``[Q, K, D]``
with a ``query_mask [Q, K]`` (True = live interest). The score of an item for a
multi-interest query is the max over its live interests of the inner product,
so every item appears at most once in a top-k ("merge by max score with
de-duplication" of MIND/ComiRec serving, done exactly).

The scoring is chunked twice so that e.g. 100k users x 1M items fits in host or
device memory: queries in chunks of ``query_chunk`` rows (a Python loop, one
compiled call per chunk) and items in chunks of ``item_chunk`` rows (a
``lax.scan`` inside the compiled call, with a running top-k or running count).
The ``[query_chunk, item_chunk]`` score block is the only large temporary. The
last chunks are padded so every call has the same static shapes and the
function compiles once per (chunk sizes, K, D, k, E).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -np.inf


# ---------------------------------------------------------------------------
# Input normalisation and validation (NumPy, host side).
# ---------------------------------------------------------------------------


class NonFiniteError(ValueError):
  """Vectors or scores to rank hold NaN or inf: the model has diverged. ``detail`` says which
  values of which split (the training loop reports it as `mvhan_jax.train.Diverged`)."""

  def __init__(self, detail: str):
    super().__init__(f"{detail}: the model has diverged, and a NaN score would rank its target first; "
                     "retrain from a finite checkpoint (e.g. with a lower learning rate) instead of evaluating it")
    self.detail = detail


def check_finite(x, what: str, split: str | None = None) -> None:
  """Raises `NonFiniteError` (a ValueError) when ``x`` holds NaN or inf, naming ``what`` and ``split``.

  A diverged model must never look perfect: a NaN score compares false with every other score, so
  a rank counted as "#{s_i >= s_target}" puts a NaN target first (HR = NDCG = 1) and an AUC counts a
  NaN positive above every negative. Vectors and scores are checked before anything is ranked.
  """
  x = np.asarray(x)
  bad = ~np.isfinite(x)
  if bad.any():
    first = int(np.unravel_index(np.argmax(bad), bad.shape)[0]) if x.ndim else 0
    raise NonFiniteError(f"{split + ' split: ' if split else ''}{what} hold {int(bad.sum())} NaN or inf values "
                         f"(first in row {first})")


def _as_multi_interest(queries, query_mask, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns queries as float32 [Q, K, D] and a bool mask [Q, K]; every live interest finite."""
  queries = np.asarray(queries, dtype=np.float32)
  if queries.ndim == 2:
    if query_mask is not None:
      raise ValueError(
          "query_mask is only meaningful for multi-interest queries [Q, K, D]; got "
          f"queries of shape {queries.shape}: drop query_mask or pass [Q, K, D] queries")
    check_finite(queries, "user vectors", split)
    return queries[:, None, :], np.ones(queries.shape[:1] + (1,), dtype=bool)
  if queries.ndim != 3:
    raise ValueError(
        f"queries must be [Q, D] or [Q, K, D], got shape {queries.shape}")
  if query_mask is None:
    query_mask = np.ones(queries.shape[:2], dtype=bool)
  query_mask = np.asarray(query_mask, dtype=bool)
  if query_mask.shape != queries.shape[:2]:
    raise ValueError(
        f"query_mask must be [Q, K] = {queries.shape[:2]}, got {query_mask.shape}")
  dead = ~query_mask.any(axis=1)
  if dead.any():
    raise ValueError(
        f"query_mask: {int(dead.sum())} queries (first: row {int(np.argmax(dead))}) have no "
        "live interest, so they cannot score any item; keep at least one interest per user "
        "(MIND uses K'_u = max(1, ...)) or drop those rows")
  # Dead interests never score (masked to -inf), whatever they hold.
  check_finite(np.where(query_mask[..., None], queries, 0.0), "user vectors (live interests)", split)
  return queries, query_mask


def _check_items(items, dim: int, split: str | None = None) -> np.ndarray:
  items = np.asarray(items, dtype=np.float32)
  if items.ndim != 2 or items.shape[1] != dim:
    raise ValueError(
        f"items must be [I, D] with D = {dim} (the query width), got shape {items.shape}")
  if items.shape[0] == 0:
    raise ValueError("items is empty: the catalogue needs at least one item")
  check_finite(items, "item vectors", split)
  return items


def _check_exclusions(exclude_indptr, exclude_indices, num_queries: int, num_items: int):
  """Validates the CSR exclusion lists; returns (indptr int64, indices int32) or Nones."""
  if (exclude_indptr is None) != (exclude_indices is None):
    raise ValueError(
        "pass both exclude_indptr and exclude_indices (a CSR matrix of excluded item ids "
        "per query) or neither")
  if exclude_indptr is None:
    return None, None
  indptr = np.asarray(exclude_indptr, dtype=np.int64)
  indices = np.asarray(exclude_indices, dtype=np.int32)
  if indptr.shape != (num_queries + 1,):
    raise ValueError(
        f"exclude_indptr must have Q + 1 = {num_queries + 1} entries, got shape {indptr.shape}")
  if indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(np.diff(indptr) < 0):
    raise ValueError(
        "exclude_indptr must start at 0, be non-decreasing and end at len(exclude_indices) = "
        f"{indices.shape[0]}; got indptr[0] = {indptr[0]}, indptr[-1] = {indptr[-1]}")
  if indices.size and (indices.min() < 0 or indices.max() >= num_items):
    raise ValueError(
        f"exclude_indices must be item ids in [0, {num_items}), got values in "
        f"[{indices.min()}, {indices.max()}]")
  return indptr, indices


def _padded_exclusions(indptr, indices, start: int, stop: int, rows: int, width: int) -> np.ndarray:
  """Rows [start, stop) of the CSR lists as int32 [rows, width], padded with -1."""
  out = np.full((rows, width), -1, dtype=np.int32)
  if indptr is None:
    return out
  lens = np.diff(indptr[start:stop + 1])
  lo, hi = indptr[start], indptr[stop]
  row = np.repeat(np.arange(stop - start), lens)
  col = np.arange(hi - lo) - np.repeat(indptr[start:stop] - lo, lens)
  out[row, col] = indices[lo:hi]
  return out


def _exclusion_width(indptr) -> int:
  """Longest exclusion list, rounded up to a power of two to limit recompiles."""
  if indptr is None:
    return 1
  longest = int(np.diff(indptr).max(initial=0))
  return 1 if longest <= 1 else 1 << (longest - 1).bit_length()


def _chunked_items(items: np.ndarray, item_chunk: int) -> tuple[jax.Array, int]:
  """Pads items to whole chunks: returns float32 [num_chunks, chunk, D] and chunk."""
  if item_chunk < 1:
    raise ValueError(f"item_chunk must be >= 1, got {item_chunk}")
  num_items = items.shape[0]
  chunk = min(item_chunk, num_items)
  num_chunks = -(-num_items // chunk)
  padded = np.zeros((num_chunks * chunk, items.shape[1]), dtype=np.float32)
  padded[:num_items] = items
  return jnp.asarray(padded.reshape(num_chunks, chunk, -1)), chunk


def _pad_rows(x: np.ndarray, rows: int, fill) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.full((rows - x.shape[0],) + x.shape[1:], fill, dtype=x.dtype)
  return np.concatenate([x, pad], axis=0)


def chunked_apply(fn: Callable[[Any], Any], n: int, size: int, make_batch: Callable[[int, int], Any]) -> Any:
  """``fn`` over rows ``0..n-1`` in chunks of exactly ``size`` rows, outputs concatenated on host.

  For each ``start`` in ``range(0, n, size)``, ``stop = min(start + size, n)``:
  ``out = fn(make_batch(start, stop))``, where ``make_batch`` returns the rows ``start:stop`` padded
  to ``size`` rows however the caller likes (a fill value, or wrapping ids ``np.arange(start,
  start + size) % n``), so that a jitted ``fn`` sees one shape and compiles once. ``out`` is an array
  or a pytree of arrays whose leading axis is that chunk's ``size`` rows; the padding rows are
  dropped. Returns the same pytree of NumPy arrays with leading axis ``n``.

  ``size``: rows per call; ``min(chunk, n)`` avoids padding an input smaller than one chunk.
  """
  if n < 1 or size < 1:
    raise ValueError(f"chunked_apply needs n >= 1 rows and size >= 1, got n={n}, size={size}")
  parts = []
  for start in range(0, n, size):
    stop = min(start + size, n)
    parts.append(jax.tree.map(lambda x, k=stop - start: np.asarray(x)[:k], fn(make_batch(start, stop))))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


# ---------------------------------------------------------------------------
# Compiled kernels.
# ---------------------------------------------------------------------------


def _block_scores(queries, query_mask, block):
  """Max-over-live-interests inner products.

  Args:
    queries: float32 [Qc, K, D].
    query_mask: bool [Qc, K].
    block: float32 [Ic, D].

  Returns:
    float32 [Qc, Ic]; -inf where the query has no live interest.
  """
  scores = None
  # A Python loop over the (small, static) interest axis keeps one [Qc, Ic]
  # running max instead of materialising a K times larger [Qc, K, Ic] block.
  for j in range(queries.shape[1]):
    s = jnp.dot(queries[:, j], block.T, precision=jax.lax.Precision.HIGHEST)
    s = jnp.where(query_mask[:, j, None], s, _NEG_INF)
    scores = s if scores is None else jnp.maximum(scores, s)
  return scores


def _mask_block(scores, offset, num_items, excluded):
  """Sets padded items and excluded ids of this item chunk to -inf.

  Args:
    scores: float32 [Qc, Ic] block for items [offset, offset + Ic).
    offset: int32 scalar, first item id of the chunk.
    num_items: real number of items (ids >= it are padding).
    excluded: int32 [Qc, E] ids to drop, -1 padded.
  """
  qc, ic = scores.shape
  ids = offset + jnp.arange(ic, dtype=jnp.int32)
  scores = jnp.where(ids[None, :] < num_items, scores, _NEG_INF)
  local = excluded - offset
  inside = (excluded >= 0) & (local >= 0) & (local < ic)
  # Ids outside this chunk are routed to column `ic`, which mode='drop' ignores.
  cols = jnp.where(inside, local, ic)
  rows = jnp.broadcast_to(jnp.arange(qc)[:, None], cols.shape)
  return scores.at[rows, cols].set(_NEG_INF, mode="drop")


@functools.partial(jax.jit, static_argnames=("k", "num_items"))
def _topk_chunk(queries, query_mask, excluded, item_chunks, *, k, num_items):
  """Top-k over all item chunks for one query chunk.

  Args:
    queries: float32 [Qc, K, D]; query_mask: bool [Qc, K];
    excluded: int32 [Qc, E]; item_chunks: float32 [C, Ic, D].

  Returns:
    (scores float32 [Qc, k], ids int32 [Qc, k]), ids -1 where the score is -inf.
  """
  qc = queries.shape[0]
  num_chunks, ic, _ = item_chunks.shape
  kk = min(k, ic)

  def step(carry, xs):
    best_s, best_i = carry
    block, offset = xs
    s = _mask_block(_block_scores(queries, query_mask, block), offset, num_items, excluded)
    chunk_s, chunk_i = jax.lax.top_k(s, kk)
    # Running results come first, so among equal scores the lower item id
    # (an earlier chunk) wins, matching a stable sort over the full catalogue.
    all_s = jnp.concatenate([best_s, chunk_s], axis=1)
    all_i = jnp.concatenate([best_i, chunk_i.astype(jnp.int32) + offset], axis=1)
    best_s, pos = jax.lax.top_k(all_s, k)
    return (best_s, jnp.take_along_axis(all_i, pos, axis=1)), None

  init = (jnp.full((qc, k), _NEG_INF, jnp.float32), jnp.full((qc, k), -1, jnp.int32))
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * ic
  (best_s, best_i), _ = jax.lax.scan(step, init, (item_chunks, offsets))
  return best_s, jnp.where(jnp.isneginf(best_s), -1, best_i)


@functools.partial(jax.jit, static_argnames=("num_items",))
def _rank_chunk(queries, query_mask, excluded, target_vecs, targets, item_chunks, *, num_items):
  """Pessimistic 0-based rank of each query's target among non-excluded items.

  Args:
    queries: float32 [Qc, K, D]; query_mask: bool [Qc, K];
    excluded: int32 [Qc, E]; target_vecs: float32 [Qc, D] = items[targets];
    targets: int32 [Qc]; item_chunks: float32 [C, Ic, D].

  Returns:
    int32 [Qc] = #{i != target, not excluded: s_i >= s_target}, and bool [Qc]: a score of the row
    (its target's or an item's) is NaN or inf, which finite vectors give only when a product
    overflows (an inf or NaN target score would rank first).
  """
  qc = queries.shape[0]
  num_chunks, ic, _ = item_chunks.shape

  def step(carry, xs):
    count, nonfinite = carry
    block, offset = xs
    # The target vectors ride along as extra columns of the same matmul, so the
    # target score is rounded exactly like the item scores it is compared to;
    # a separately computed dot product can differ in the last ulp and turn a
    # tie into a flattering rank.
    s = _block_scores(queries, query_mask, jnp.concatenate([block, target_vecs], axis=0))
    s_items = s[:, :ic]
    s_target = jnp.diagonal(s[:, ic:])
    # Padding rows (no live interest) score -inf by construction: only live rows count.
    bad = (~jnp.isfinite(s_items)).any(axis=1) | ~jnp.isfinite(s_target)
    nonfinite = nonfinite | (bad & query_mask.any(axis=1))
    s_items = _mask_block(s_items, offset, num_items, excluded)
    # The target itself is not counted (it is masked like an excluded id).
    s_items = _mask_block(s_items, offset, num_items, targets[:, None])
    return (count + jnp.sum(s_items >= s_target[:, None], axis=1, dtype=jnp.int32), nonfinite), None

  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * ic
  init = (jnp.zeros((qc,), jnp.int32), jnp.zeros((qc,), bool))
  (count, nonfinite), _ = jax.lax.scan(step, init, (item_chunks, offsets))
  return count, nonfinite


# ---------------------------------------------------------------------------
# Public scoring functions.
# ---------------------------------------------------------------------------


def exact_topk(
    queries,
    items,
    k: int,
    *,
    query_mask=None,
    exclude_indptr=None,
    exclude_indices=None,
    item_chunk: int = 65536,
    query_chunk: int = 4096,
    split: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner-product top-k of every query over the full catalogue.

  Args:
    queries: float [Q, D], or multi-interest float [Q, K, D].
    items: float [I, D] item vectors (ids are row numbers 0..I-1).
    k: number of results per query, 1 <= k <= I.
    query_mask: bool [Q, K] for multi-interest queries (True = live interest);
      a query's item score is the max over its live interests, so each item is
      returned at most once. Every query needs at least one live interest.
    exclude_indptr: int64 [Q + 1] CSR row pointers of items never to return.
    exclude_indices: int32 [nnz] CSR item ids (typically the user's history).
    item_chunk: items scored per scan step.
    query_chunk: queries per compiled call. Peak memory is a few (about five)
      score blocks of query_chunk * item_chunk * 4 bytes, 1 GiB each at the
      defaults (measured: 5.7 GB RSS for K = 4, D = 64 on CPU).
    split: the evaluation split's name, for error messages (NaN or inf vectors or scores raise).

  Returns:
    scores float32 [Q, k] in descending order and ids int32 [Q, k]. Ties are
    broken by lower item id. If fewer than k items survive the exclusions the
    tail is padded with score -inf and id -1.
  """
  queries, query_mask = _as_multi_interest(queries, query_mask, split)
  num_queries = queries.shape[0]
  items = _check_items(items, queries.shape[2], split)
  num_items = items.shape[0]
  if not 1 <= k <= num_items:
    raise ValueError(f"k must lie in [1, I = {num_items}], got k = {k}")
  indptr, indices = _check_exclusions(exclude_indptr, exclude_indices, num_queries, num_items)
  if query_chunk < 1:
    raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
  item_chunks, _ = _chunked_items(items, item_chunk)
  qc = min(query_chunk, num_queries)
  width = _exclusion_width(indptr)

  def chunk(start, stop):
    return (_pad_rows(queries[start:stop], qc, 0.0), _pad_rows(query_mask[start:stop], qc, False),
            _padded_exclusions(indptr, indices, start, stop, qc, width))

  scores, ids = chunked_apply(lambda b: _topk_chunk(*map(jnp.asarray, b), item_chunks, k=k, num_items=num_items),
                              num_queries, qc, chunk)
  # Finite vectors whose products overflow give inf or NaN scores, which top_k ranks first.
  check_finite(np.where(np.isneginf(scores), 0.0, scores), "top-k scores", split)
  return scores.astype(np.float32, copy=False), ids.astype(np.int32, copy=False)


def target_ranks(
    queries,
    items,
    targets,
    *,
    query_mask=None,
    exclude_indptr=None,
    exclude_indices=None,
    item_chunk: int = 65536,
    query_chunk: int = 4096,
    split: str | None = None,
) -> np.ndarray:
  """0-based full-corpus rank of each query's single target, pessimistic on ties.

  rank = #{items i != target, i not excluded : s_i >= s_target}, so an item
  scoring exactly like the target is counted as ranked above it and a constant
  scorer gets the worst possible rank (I - 1 - #excluded), never a flattering one.

  Args:
    queries: float [Q, D] or [Q, K, D] (see `exact_topk`).
    items: float [I, D].
    targets: int [Q] or [Q, 1] target item ids (leave-one-out; use
      `multi_target_metrics` for several targets per query).
    query_mask, exclude_indptr, exclude_indices, item_chunk, query_chunk: as in
      `exact_topk`. A target may not be in its own exclusion list.
    split: the evaluation split's name, for error messages (NaN or inf vectors or scores raise:
      a NaN target score would otherwise get rank 0).

  Returns:
    int32 [Q] ranks in [0, I - 1].
  """
  queries, query_mask = _as_multi_interest(queries, query_mask, split)
  num_queries = queries.shape[0]
  items = _check_items(items, queries.shape[2], split)
  num_items = items.shape[0]
  targets = np.asarray(targets)
  if targets.ndim == 2 and targets.shape[1] == 1:
    targets = targets[:, 0]
  if targets.shape != (num_queries,):
    raise ValueError(
        f"targets must be [Q] or [Q, 1] with Q = {num_queries}, got shape {targets.shape}; "
        "for several targets per query use exact_topk + multi_target_metrics")
  targets = targets.astype(np.int32)
  if targets.min() < 0 or targets.max() >= num_items:
    bad = int(np.argmax((targets < 0) | (targets >= num_items)))
    raise ValueError(
        f"targets must be item ids in [0, {num_items}); query {bad} has target {targets[bad]} "
        "(-1 padding is not allowed: every leave-one-out query needs exactly one target)")
  indptr, indices = _check_exclusions(exclude_indptr, exclude_indices, num_queries, num_items)
  if indptr is not None:
    rows = np.repeat(np.arange(num_queries), np.diff(indptr))
    clash = indices == targets[rows]
    if clash.any():
      q = int(rows[np.argmax(clash)])
      raise ValueError(
          f"query {q}: its target item {targets[q]} is in its exclusion list, so it could never "
          "be ranked; the protocol must exclude only the history, never the held-out target")
  if query_chunk < 1:
    raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
  item_chunks, _ = _chunked_items(items, item_chunk)
  qc = min(query_chunk, num_queries)
  width = _exclusion_width(indptr)

  def chunk(start, stop):
    t = _pad_rows(targets[start:stop], qc, 0)
    return (_pad_rows(queries[start:stop], qc, 0.0), _pad_rows(query_mask[start:stop], qc, False),
            _padded_exclusions(indptr, indices, start, stop, qc, width), items[t], t)

  ranks, nonfinite = chunked_apply(lambda b: _rank_chunk(*map(jnp.asarray, b), item_chunks, num_items=num_items),
                             num_queries, qc, chunk)
  if nonfinite.any():
    raise NonFiniteError(
        f"{split + ' split: ' if split else ''}{int(nonfinite.sum())} queries (first: row "
        f"{int(np.argmax(nonfinite))}) have "
        "NaN or inf scores although their vectors are finite (a product overflowed)")
  return ranks.astype(np.int32, copy=False)


# ---------------------------------------------------------------------------
# Metrics (NumPy).
# ---------------------------------------------------------------------------


def _wins(num_ge, num_gt, num_negatives):
  """Mann-Whitney count of a positive: negatives scored below it plus half the tied ones,
  n - (#>= + #>) / 2 (exact in float64: half-integers)."""
  return num_negatives - 0.5 * (num_ge + num_gt)


def target_auc(num_ge, num_negatives, num_gt=None) -> np.ndarray:
  """AUC [Q] of one positive (a row's target) against ``num_negatives`` [Q] other candidates.

  ``num_ge`` [Q]: candidates scored >= the target (its pessimistic 0-based rank, as `target_ranks`
  returns); ``num_gt`` [Q]: candidates scored strictly above it. Ties count half:
  AUC = (#below + #tied / 2) / n = (n - (num_ge + num_gt) / 2) / n, the ROC AUC of the row (a
  constant scorer gets 0.5). ``num_gt=None``: every tie counts as above the target, AUC = 1 -
  num_ge / n (pessimistic, all a rank alone can give). NaN where n = 0.
  """
  num_ge = np.asarray(num_ge)
  num_gt = num_ge if num_gt is None else np.asarray(num_gt)
  n = np.asarray(num_negatives).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, _wins(num_ge, num_gt, n) / n, np.nan)


def auc(labels, scores) -> float:
  """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg)); ties count 1/2; NaN if one class.

  Every positive contributes its `target_auc` count against all negatives.
  """
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  check_finite(scores, "scores")  # np.sort puts NaN last: a NaN positive would beat every negative
  n_pos = int(labels.sum())
  n_neg = len(labels) - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  neg = np.sort(scores[~labels])
  pos = scores[labels]
  num_ge = n_neg - np.searchsorted(neg, pos, side="left")
  num_gt = n_neg - np.searchsorted(neg, pos, side="right")
  return float(np.sum(_wins(num_ge, num_gt, n_neg)) / (n_pos * n_neg))


def leave_one_out_per_user(ranks, ks: Sequence[int] = (10, 50)) -> dict[str, np.ndarray]:
  """Per-query leave-one-out metrics from 0-based ranks int [Q].

  Returns float64 [Q] arrays 'HR@k' (rank < k), 'NDCG@k' (1 / log2(rank + 2) if
  rank < k else 0: one relevant item, so IDCG = 1), 'RR' (1 / (rank + 1), not
  truncated) and int 'rank'.
  """
  ranks = np.asarray(ranks)
  if ranks.ndim != 1 or (ranks.size and ranks.min() < 0):
    raise ValueError(f"ranks must be non-negative int [Q], got shape {ranks.shape}")
  out: dict[str, np.ndarray] = {"rank": ranks}
  gain = 1.0 / np.log2(ranks.astype(np.float64) + 2.0)
  for k in ks:
    hit = ranks < k
    out[f"HR@{k}"] = hit.astype(np.float64)
    out[f"NDCG@{k}"] = np.where(hit, gain, 0.0)
  out["RR"] = 1.0 / (ranks.astype(np.float64) + 1.0)
  return out


def leave_one_out_metrics(ranks, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
  """Means of `leave_one_out_per_user`: 'HR@k', 'NDCG@k' for each k and 'MRR'."""
  per = leave_one_out_per_user(ranks, ks)
  out = {name: float(v.mean()) for name, v in per.items() if "@" in name}
  out["MRR"] = float(per["RR"].mean())
  return out


def multi_target_per_user(
    topk_ids, targets, ks: Sequence[int] = (20, 50), row_chunk: int = 8192,
) -> dict[str, np.ndarray]:
  """Per-query ComiRec-protocol metrics, float64 [Q] arrays.

  Args:
    topk_ids: int [Q, N] ranked item ids without duplicates (-1 padding allowed),
      N >= max(ks).
    targets: int [Q, T] ground-truth ids padded with -1; the truth is the *set*
      of a row's valid ids (a repeated id counts once). Every row needs one.
    ks: cut-offs.
    row_chunk: rows processed at once (bounds the [rows, N, T] comparison).

  Returns:
    'Recall@k' = |top-k ∩ truth| / |truth|; 'HR@k' = 1 if any hit;
    'NDCG@k' = DCG / IDCG with binary gains 1 / log2(pos + 2) over the top-k and
    IDCG over min(|truth|, k) positions (the standard definition). The official
    ComiRec code computes NDCG differently (it discounts by the position in the
    *truth list* and normalises by the number of hits), so its NDCG numbers are
    not comparable with these; Recall and HR match it.
  """
  topk_ids = np.asarray(topk_ids)
  targets = np.asarray(targets)
  if topk_ids.ndim != 2 or targets.ndim != 2 or topk_ids.shape[0] != targets.shape[0]:
    raise ValueError(
        f"topk_ids must be [Q, N] and targets [Q, T] with the same Q, got {topk_ids.shape} "
        f"and {targets.shape}")
  if topk_ids.shape[1] < max(ks):
    raise ValueError(
        f"topk_ids has N = {topk_ids.shape[1]} columns but max(ks) = {max(ks)}: retrieve at "
        "least max(ks) items per query")
  # |truth| = number of distinct valid ids: count the first of each run in the
  # sorted row, skipping the -1 padding.
  t_sorted = np.sort(targets, axis=1)
  distinct = (t_sorted >= 0) & np.concatenate(
      [np.ones_like(t_sorted[:, :1], bool), t_sorted[:, 1:] != t_sorted[:, :-1]], axis=1)
  truth_size = distinct.sum(axis=1)
  if np.any(truth_size == 0):
    raise ValueError(
        f"targets: query {int(np.argmax(truth_size == 0))} has no valid target (all -1); "
        "drop queries without ground truth before evaluating")
  ranked = np.sort(np.where(topk_ids >= 0, topk_ids, -1), axis=1)
  dup = (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)
  if dup.any():
    raise ValueError(
        f"topk_ids: query {int(np.argmax(dup.any(axis=1)))} lists an item twice; merge "
        "multi-interest results with de-duplication (retrieval.merge_interests)")

  n = max(ks)
  hits = np.empty((topk_ids.shape[0], n), dtype=bool)
  for start in range(0, topk_ids.shape[0], row_chunk):
    sl = slice(start, start + row_chunk)
    ids = topk_ids[sl, :n]
    hits[sl] = ((ids[:, :, None] == targets[sl, None, :]) & (targets[sl, None, :] >= 0)).any(-1)
  hits &= topk_ids[:, :n] >= 0

  discount = 1.0 / np.log2(np.arange(n) + 2.0)   # [N]
  ideal = np.cumsum(discount)                      # ideal[m - 1] = IDCG with m relevant
  out: dict[str, np.ndarray] = {}
  for k in ks:
    h = hits[:, :k]
    num_hits = h.sum(axis=1)
    out[f"Recall@{k}"] = num_hits / truth_size
    out[f"HR@{k}"] = (num_hits > 0).astype(np.float64)
    dcg = (h * discount[:k]).sum(axis=1)
    out[f"NDCG@{k}"] = dcg / ideal[np.minimum(truth_size, k) - 1]
  return out


def multi_target_metrics(topk_ids, targets, ks: Sequence[int] = (20, 50)) -> dict[str, float]:
  """Means of `multi_target_per_user` over queries (see there for definitions)."""
  return {name: float(v.mean()) for name, v in multi_target_per_user(topk_ids, targets, ks).items()}


# ---------------------------------------------------------------------------
# Evaluators (selected by name, big_vision style).
# ---------------------------------------------------------------------------


class _Evaluator:
  """Shared plumbing: holds an eval set and scores user vectors against items."""

  default_ks: tuple[int, ...] = ()

  def __init__(self, eval_set: Any, ks: Sequence[int] | None = None, *,
               item_chunk: int = 65536, query_chunk: int = 4096, split: str | None = None):
    for attr in ("exclude_indptr", "exclude_indices", "targets"):
      if not hasattr(eval_set, attr):
        raise TypeError(
            f"eval_set has no attribute {attr!r}: pass the protocol's EvalSet (user, history, "
            "history_len, exclude_indptr, exclude_indices, targets)")
    self.eval_set = eval_set
    self.ks = tuple(ks) if ks is not None else self.default_ks
    if not self.ks or min(self.ks) < 1:
      raise ValueError(f"ks must be positive cut-offs, got {ks}")
    self.item_chunk = item_chunk
    self.query_chunk = query_chunk
    self.split = split  # named in errors (non-finite vectors)

  @property
  def num_queries(self) -> int:
    return int(np.asarray(self.eval_set.targets).shape[0])

  def _check_users(self, user_vectors):
    user_vectors = np.asarray(user_vectors)
    if user_vectors.shape[0] != self.num_queries:
      raise ValueError(
          f"user_vectors has {user_vectors.shape[0]} rows but the eval set has "
          f"{self.num_queries} queries: compute one vector (or [K, D] block) per eval-set row, "
          "in eval-set order")
    return user_vectors

  def per_user(self, user_vectors, item_vectors, user_mask=None) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def evaluate(self, user_vectors, item_vectors, user_mask=None) -> dict[str, float]:
    """Mean metrics over the eval set.

    Args:
      user_vectors: float [Q, D] or [Q, K, D], rows aligned with the eval set.
      item_vectors: float [I, D], the full catalogue.
      user_mask: bool [Q, K] live interests for multi-interest users.
    """
    per = self.per_user(user_vectors, item_vectors, user_mask)
    return self._summarise(per)

  def _summarise(self, per: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.mean(v)) for name, v in per.items() if "@" in name}


class LeaveOneOutEvaluator(_Evaluator):
  """Full-corpus leave-one-out: one target per user, HR@k, NDCG@k and MRR."""

  default_ks = (10, 50)

  def per_user(self, user_vectors, item_vectors, user_mask=None) -> dict[str, np.ndarray]:
    """Per-user 'rank', 'HR@k', 'NDCG@k' and 'RR' arrays [Q]."""
    ranks = target_ranks(
        self._check_users(user_vectors), item_vectors, self.eval_set.targets,
        query_mask=user_mask, exclude_indptr=self.eval_set.exclude_indptr,
        exclude_indices=self.eval_set.exclude_indices, item_chunk=self.item_chunk,
        query_chunk=self.query_chunk, split=self.split)
    return leave_one_out_per_user(ranks, self.ks)

  def _summarise(self, per):
    out = super()._summarise(per)
    out["MRR"] = float(np.mean(per["RR"]))
    return out


class ComiRecEvaluator(_Evaluator):
  """ComiRec protocol: many held-out targets per user, Recall@N, HR@N, NDCG@N.

  The top max(ks) items are retrieved exactly (multi-interest: merged by max
  score, de-duplicated) with the user's history excluded. NDCG is the standard
  one, not the official ComiRec code's (see `multi_target_per_user`).
  """

  default_ks = (20, 50)

  def per_user(self, user_vectors, item_vectors, user_mask=None) -> dict[str, np.ndarray]:
    """Per-user 'Recall@k', 'HR@k', 'NDCG@k' arrays [Q] plus 'topk_ids' [Q, max(ks)]."""
    _, ids = exact_topk(
        self._check_users(user_vectors), item_vectors, max(self.ks), query_mask=user_mask,
        exclude_indptr=self.eval_set.exclude_indptr,
        exclude_indices=self.eval_set.exclude_indices, item_chunk=self.item_chunk,
        query_chunk=self.query_chunk, split=self.split)
    per = multi_target_per_user(ids, self.eval_set.targets, self.ks)
    per["topk_ids"] = ids
    return per


EVALUATORS: dict[str, type[_Evaluator]] = {
    "leave_one_out": LeaveOneOutEvaluator,
    "comirec": ComiRecEvaluator,
}


def get_evaluator(name: str, eval_set: Any, **kwargs) -> _Evaluator:
  """Builds the evaluator registered under `name` (a key of `EVALUATORS`)."""
  if name not in EVALUATORS:
    raise ValueError(f"unknown evaluator {name!r}: choose one of {sorted(EVALUATORS)}")
  return EVALUATORS[name](eval_set, **kwargs)


def interests_recovered(users, mask, items, item_topic, user_interests, test_users) -> float:
  """Fraction of users whose true interest topics are each matched by a distinct live interest.

  Each topic is represented by the mean of its items' vectors in the model's item space; every true
  topic of a user is assigned the live interest vector of highest cosine, and the user counts as
  recovered when those vectors are all different (more true topics than live interests: not
  recovered). Used on the synthetic world, whose ground truth knows every user's topics.

  Args:
    users: float [Q, K, D] interest vectors; mask: bool [Q, K] live interests.
    items: float [I, D] item vectors; item_topic: int [I] each item's topic.
    user_interests: int [U, M] each user's true topics, -1 padded.
    test_users: int [Q] the user id of each row of ``users``.
  """
  num_topics = int(item_topic.max()) + 1
  centroids = np.stack([items[item_topic == t].mean(0) for t in range(num_topics)])
  centroids /= np.linalg.norm(centroids, axis=-1, keepdims=True) + 1e-9
  caps = users / (np.linalg.norm(users, axis=-1, keepdims=True) + 1e-9)
  out = []
  for row, u in enumerate(test_users):
    true = user_interests[u]
    true = true[true >= 0]
    live = np.flatnonzero(mask[row])
    if len(true) > len(live):
      out.append(False)
      continue
    best = (centroids[true] @ caps[row, live].T).argmax(1)  # [|true|]
    out.append(len(set(best.tolist())) == len(true))
  return float(np.mean(out))


def paired_bootstrap(a, b, resamples: int = 10_000, seed: int = 0, chunk: int = 500) -> dict[str, Any]:
  """Paired comparison of two runs' per-user metric on the same users: A - B.

  Args:
    a, b: float [S, Q] (or [Q]): a per-user metric (e.g. `leave_one_out_per_user`'s 'HR@10') of run
      A and run B for S pairs of runs (seeds) on the same Q users, row s of ``a`` paired with row s of
      ``b``. The statistic is the mean over pairs of the mean over users of a - b.
    resamples: bootstrap resamples of the Q users (the same users drawn for every pair: the users
      are what is sampled; the pairs of runs are fixed).
    seed, chunk: the resampling's rng seed and rows per vectorised block.

  Returns: 'a', 'b' (means), 'diff' (a - b), 'per_pair' (diff of each pair [S]), 'std_err' (the
  bootstrap standard deviation of diff), 'ci95' (2.5 / 97.5 percentiles), 'p_two_sided' (twice the
  smaller share of resampled diffs on either side of 0, capped at 1; 1 / resamples resolution),
  'a_only' / 'b_only' (per pair, users where A's value exceeds B's and the reverse: for HR, the
  discordant hits).
  """
  a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
  if a.shape != b.shape or a.ndim != 2 or a.shape[1] == 0:
    raise ValueError(f"a and b must be [S, Q] of the same shape with Q > 0, got {a.shape} and {b.shape}")
  if resamples < 1:
    raise ValueError(f"resamples must be >= 1, got {resamples}")
  d = (a - b).mean(axis=0)  # [Q]: each user's difference averaged over the pairs
  rng = np.random.default_rng(seed)
  q = d.shape[0]
  boot = np.concatenate([d[rng.integers(0, q, size=(min(chunk, resamples - i), q))].mean(axis=1)
                         for i in range(0, resamples, chunk)])
  lo, hi = np.percentile(boot, [2.5, 97.5])
  p = min(1.0, 2.0 * min(np.mean(boot <= 0.0), np.mean(boot >= 0.0)))
  return {"a": float(a.mean()), "b": float(b.mean()), "diff": float(d.mean()),
          "per_pair": (a - b).mean(axis=1), "std_err": float(boot.std(ddof=1)) if resamples > 1 else 0.0,
          "ci95": (float(lo), float(hi)), "p_two_sided": float(p),
          "a_only": (a > b).sum(axis=1), "b_only": (b > a).sum(axis=1)}
