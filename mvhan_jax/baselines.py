"""Baselines with no training: popularity and a first-order Markov chain over items.

Both read the training sequences of a split only (`protocol.LeaveOneOutSplit.train_sequences`) and
score every item for every query of an `protocol.EvalSet`; `evaluate` ranks them with the repo's
`evaluation.LeaveOneOutEvaluator` (the user's history excluded, the target never; a tie with the
target counts against it).

Popularity: an item's number of training interactions.

Markov chain (first order, with a second-to-last term): ``T[a, b]`` = how often item ``b`` directly
follows item ``a`` within a training sequence (pairs never span two users, and the validation /
test items are not training data, so the validation -> test transition is never counted), ``r[a] =
sum_b T[a, b]`` (0 for an item never followed by anything). For a query whose history ends ``..., p,
l`` (``l`` the last item; for the test split that is the validation item)::

    score(j) = T[l, j] / r[l] + 0.5 * T[p, j] / r[p]        (a term whose r is 0 is 0)

and popularity breaks ties: items of equal Markov score are ordered by training count (an item
with neither is tied with every such item). The tie-break is applied exactly, not as a float
``+ eps * count``: for one query r[l] and r[p] are fixed, so ``2 r[p] r[l] * score(j) = 2 r[p] T[l,
j] + r[l] T[p, j]`` is an integer, and the ranking key ``that integer * (max count + 1) + count(j)``
is an int64 (< 3 r[l] r[p] (max count + 1) ~ 4e10 on ML-1M) with no rounding anywhere.
`markov_chain_scores` also gives the float form (Markov score + a per-query eps * normalised
count, eps below the smallest nonzero gap 1 / (2 r[l] r[p])): the same order up to float rounding.

Measured (test split, history masked; experiments/results/ml100k.md, ml1m.md): ML-100k Markov HR@10
0.1686 / NDCG@10 0.0930 / HR@50 0.3340, ML-1M 0.2281 / 0.1362 / 0.4157, ML-1M popularity 0.0353 /
0.0173 / 0.1288. Figures quoted for this protocol in the project's issue 18 (ML-100k 0.168 / 0.093 /
0.335, ML-1M 0.229 / 0.136 / 0.415) differ by 1 (ML-100k) to 3-8 (ML-1M) users per metric: a global
``+ 1e-3 * count / max count`` (which does reorder close Markov scores) gives ML-100k's three figures
exactly but not ML-1M's (0.2293 / 0.1365 / 0.4157); transitions counted over train + validation,
row counts = item occurrences, popularity from train + validation, skip-2 second-order terms, a
joint normalisation and other item-id orders (which also change the popularity row) reproduce
neither. The popularity row matches to the quoted digits on both datasets.

Memory: T is a dense int64 [I, I] (ML-1M: 3,706^2 x 8 B = 110 MB; ML-100k 23 MB) and the keys a
dense int64 [Q, I] per call (ML-1M test: 6,040 x 3,706 x 8 B = 179 MB), plus, in `evaluate`, the
float32 per-query ranks [I, Q] and an identity [Q, Q] (90 + 146 MB on ML-1M): the evaluator takes
vectors, so each query's vector picks its own row of ranks (exact in float32: values < 2^24). A
catalogue much larger than ~10^4 items would need sparse T rows and a chunked evaluation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mvhan_jax import evaluation

SECOND_ORDER_WEIGHT = 0.5


def item_counts(train_sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """int64 [I] training interactions per item."""
  seqs = [np.asarray(s, np.int64) for s in train_sequences if len(s)]
  flat = np.concatenate(seqs) if seqs else np.zeros((0,), np.int64)
  return np.bincount(flat, minlength=num_items).astype(np.int64)


def popularity_scores(train_sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """float64 [I] the popularity score (training count) of every item, the same for every user."""
  return item_counts(train_sequences, num_items).astype(np.float64)


def transition_counts(train_sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """int64 [I, I]: ``T[a, b]`` = times ``b`` directly follows ``a`` within one training sequence."""
  src, dst = [], []
  for s in train_sequences:
    s = np.asarray(s, np.int64)
    if len(s) >= 2:
      src.append(s[:-1])
      dst.append(s[1:])
  if not src:
    return np.zeros((num_items, num_items), np.int64)
  pairs = np.concatenate(src) * num_items + np.concatenate(dst)
  return np.bincount(pairs, minlength=num_items * num_items).astype(np.int64).reshape(num_items, num_items)


def _last_two(history: np.ndarray, history_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(last item, second-to-last item or -1) of left-aligned histories."""
  history, history_len = np.asarray(history), np.asarray(history_len)
  if (history_len < 1).any():
    raise ValueError("every query needs a non-empty history (the Markov chain scores from its last item)")
  rows = np.arange(len(history))
  last = history[rows, history_len - 1].astype(np.int64)
  prev = np.where(history_len >= 2, history[rows, np.maximum(history_len - 2, 0)], -1).astype(np.int64)
  return last, prev


def _markov_numerators(transitions, history, history_len):
  """(int64 [Q, I] N = 2 R_p T[l] + R_l T[p], R_l [Q], R_p [Q]) with R = max(row count, 1) and the
  second term 0 when there is no second-to-last item: score = N / (2 R_l R_p)."""
  last, prev = _last_two(history, history_len)
  rowcount = transitions.sum(axis=1)
  r_last = np.maximum(rowcount[last], 1)
  has_prev = prev >= 0
  r_prev = np.where(has_prev, np.maximum(rowcount[np.maximum(prev, 0)], 1), 1)
  t_prev = np.where(has_prev[:, None], transitions[np.maximum(prev, 0)], 0)
  num = 2 * r_prev[:, None] * transitions[last] + r_last[:, None] * t_prev
  return num, r_last, r_prev


def markov_chain_keys(train_sequences: Sequence[np.ndarray], history: np.ndarray, history_len: np.ndarray,
                      num_items: int, second_order_weight: float = SECOND_ORDER_WEIGHT) -> np.ndarray:
  """int64 [Q, I] exact ranking keys: Markov score first, training popularity second (module doc).

  Only the weight 0.5 keeps the key an integer; other weights go through `markov_chain_scores`.
  """
  if second_order_weight != SECOND_ORDER_WEIGHT:
    raise ValueError(f"exact keys are defined for second_order_weight={SECOND_ORDER_WEIGHT} only; "
                     "use markov_chain_scores for another weight")
  counts = item_counts(train_sequences, num_items)
  num, _, _ = _markov_numerators(transition_counts(train_sequences, num_items), history, history_len)
  return num * (int(counts.max(initial=0)) + 1) + counts[None, :]


def markov_chain_scores(train_sequences: Sequence[np.ndarray], history: np.ndarray, history_len: np.ndarray,
                        num_items: int, second_order_weight: float = SECOND_ORDER_WEIGHT) -> np.ndarray:
  """float64 [Q, I]: ``T[l, j] / r[l] + w * T[p, j] / r[p] + eps_q * count(j) / max count``.

  ``eps_q`` = 1 / (4 R_l R_p) (R = max(row count, 1)) with w = 0.5, under the smallest nonzero gap
  between two Markov scores of the query, so popularity only breaks ties (up to float rounding of
  equal rational scores; `markov_chain_keys` is exact). Another weight w gets eps_q = 1e-9 / (R_l R_p).
  """
  counts = item_counts(train_sequences, num_items)
  transitions = transition_counts(train_sequences, num_items)
  num, r_last, r_prev = _markov_numerators(transitions, history, history_len)
  if second_order_weight == SECOND_ORDER_WEIGHT:
    markov = num / (2.0 * r_last * r_prev)[:, None]
    eps = 1.0 / (4.0 * r_last * r_prev)
  else:
    last, prev = _last_two(history, history_len)
    t_prev = np.where((prev >= 0)[:, None], transitions[np.maximum(prev, 0)], 0)
    markov = transitions[last] / r_last[:, None] + second_order_weight * t_prev / r_prev[:, None]
    eps = 1e-9 / (r_last * r_prev)
  return markov + eps[:, None] * (counts / max(int(counts.max(initial=0)), 1))[None, :]


def row_ranks(scores: np.ndarray) -> np.ndarray:
  """float32 [Q, I]: per row, the dense rank of each score (0 = lowest; equal scores equal ranks):
  the same order and ties as ``scores`` in values a float32 holds exactly (< 2^24)."""
  scores = np.asarray(scores)
  if scores.shape[1] >= 1 << 24:
    raise ValueError(f"{scores.shape[1]} items: dense ranks would not be exact in float32")
  order = np.argsort(scores, axis=1, kind="stable")
  ordered = np.take_along_axis(scores, order, axis=1)
  dense = np.concatenate([np.zeros((len(scores), 1), np.int64),
                          np.cumsum(ordered[:, 1:] != ordered[:, :-1], axis=1)], axis=1)
  out = np.empty(scores.shape, np.float32)
  np.put_along_axis(out, order, dense.astype(np.float32), axis=1)
  return out


def evaluate_per_query(eval_set, scores: np.ndarray, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
  """Leave-one-out metrics of per-query scores [Q, I] (any dtype, compared exactly per row) with
  `evaluation.LeaveOneOutEvaluator`: query q's vector is the one-hot e_q, item j's vector its
  per-query dense ranks, so q's score of j is its own rank of j."""
  ranks = row_ranks(scores)
  queries = np.eye(len(ranks), dtype=np.float32)
  return evaluation.LeaveOneOutEvaluator(eval_set, ks).evaluate(queries, np.ascontiguousarray(ranks.T))


def evaluate_popularity(split, eval_set, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
  """The popularity baseline on ``eval_set`` (counts from ``split.train_sequences``)."""
  counts = popularity_scores(split.train_sequences, split.num_items).astype(np.float32)  # exact: < 2^24
  return evaluation.LeaveOneOutEvaluator(eval_set, ks).evaluate(
      np.ones((len(eval_set.user), 1), np.float32), counts[:, None])


def evaluate_markov_chain(split, eval_set, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
  """The Markov-chain baseline on ``eval_set`` (transitions from ``split.train_sequences``; the
  query's last two history items, so for the test split the validation item and the last training item)."""
  keys = markov_chain_keys(split.train_sequences, eval_set.history, eval_set.history_len, split.num_items)
  return evaluate_per_query(eval_set, keys, ks)
