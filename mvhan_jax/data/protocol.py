"""Evaluation protocols shared by every model: chronological leave-one-out and ComiRec's user split.

Layout conventions used by every array produced here:
- A *history* row is left-aligned: ``history[q, :history_len[q]]`` are the most recent items in
  chronological order (the newest at ``history_len[q] - 1``), the rest is 0. Item 0 is a real item,
  so consumers must mask with ``history_len``, never with ``history != 0``.
- Targets are padded with -1, which is never a valid item id.
- A user's *sequence* is their items sorted by (timestamp, item id): ties in time are broken by item
  id so that the split is deterministic and independent of the log's row order.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mvhan_jax.data.types import InteractionData


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """The queries of one evaluation split, one row per evaluated user.

  Attributes:
    user: int32 [Q] user ids.
    history: int32 [Q, maxlen] the most recent ``maxlen`` history items, left-aligned, 0-padded.
    history_len: int32 [Q] valid entries of ``history`` (<= maxlen).
    exclude_indptr: int64 [Q+1] CSR row pointers of the items to exclude from the ranking: the
      user's full (untruncated) history minus the targets, sorted and unique per row.
    exclude_indices: int32 [nnz] CSR column indices (item ids).
    targets: int32 [Q, T] ground-truth items, padded with -1.
  """

  user: np.ndarray
  history: np.ndarray
  history_len: np.ndarray
  exclude_indptr: np.ndarray
  exclude_indices: np.ndarray
  targets: np.ndarray

  def __len__(self) -> int:
    return len(self.user)

  def excluded(self, q: int) -> np.ndarray:
    """int32 [n_q] the items excluded for query row ``q``."""
    return self.exclude_indices[self.exclude_indptr[q]:self.exclude_indptr[q + 1]]


def user_sequences(data: InteractionData) -> tuple[np.ndarray, ...]:
  """Per user (index = user id), the int32 items sorted by (timestamp, item id)."""
  order = np.lexsort((data.item, data.timestamp, data.user))
  users, items = data.user[order], data.item[order].astype(np.int32)
  bounds = np.searchsorted(users, np.arange(data.num_users + 1))
  return tuple(items[bounds[u]:bounds[u + 1]] for u in range(data.num_users))


def _left_aligned(histories: Sequence[np.ndarray], maxlen: int) -> tuple[np.ndarray, np.ndarray]:
  """Stacks the last ``maxlen`` items of each history: ([Q, maxlen] int32, [Q] int32)."""
  out = np.zeros((len(histories), maxlen), np.int32)
  lens = np.zeros((len(histories),), np.int32)
  for q, h in enumerate(histories):
    h = h[-maxlen:] if maxlen > 0 else h[:0]
    out[q, :len(h)] = h
    lens[q] = len(h)
  return out, lens


def _make_eval_set(users: np.ndarray, histories: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                   maxlen: int) -> EvalSet:
  if maxlen < 1:
    raise ValueError(f"maxlen must be >= 1, got {maxlen}")
  history, history_len = _left_aligned(histories, maxlen)
  width = max([len(t) for t in targets], default=1) or 1
  tgt = np.full((len(targets), width), -1, np.int32)
  excl, indptr = [], [0]
  for q, (h, t) in enumerate(zip(histories, targets)):
    tgt[q, :len(t)] = t
    # The full history, not the truncated one: a model must not be rewarded for re-recommending
    # anything the user already consumed; but a target the user also consumed earlier must stay
    # rankable, or it could never be hit.
    e = np.setdiff1d(np.asarray(h, np.int32), np.asarray(t, np.int32))
    excl.append(e.astype(np.int32))
    indptr.append(indptr[-1] + len(e))
  return EvalSet(
      user=np.asarray(users, np.int32), history=history, history_len=history_len,
      exclude_indptr=np.asarray(indptr, np.int64),
      exclude_indices=np.concatenate(excl).astype(np.int32) if excl else np.zeros((0,), np.int32),
      targets=tgt)


# ---------------------------------------------------------------------------------------------
# Leave-one-out.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LeaveOneOutSplit:
  """Chronological leave-one-out: per user, last item = test, second-to-last = validation.

  Users with fewer than 3 interactions keep their whole sequence in ``train_sequences`` and are
  never evaluated (their targets are -1): a validation or test target would leave them at most one
  training item, and dropping them would discard training signal.

  Attributes:
    num_users, num_items: id ranges of the source `InteractionData`.
    train_sequences: per user id, int32 chronological items (all but the last two).
    valid_target: int32 [U] second-to-last item, -1 where the user is not evaluated.
    test_target: int32 [U] last item, -1 where the user is not evaluated.
  """

  num_users: int
  num_items: int
  train_sequences: tuple[np.ndarray, ...]
  valid_target: np.ndarray
  test_target: np.ndarray

  def eval_set(self, split: str, maxlen: int) -> EvalSet:
    """Queries for ``split`` in {'valid', 'test'} (targets [Q, 1]).

    'valid': history = the training sequence, target = the validation item.
    'test':  history = the training sequence + the validation item, target = the test item.
    """
    if split not in ("valid", "test"):
      raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    users = np.flatnonzero(self.valid_target >= 0).astype(np.int32)
    if split == "valid":
      hist = [self.train_sequences[u] for u in users]
      tgt = [self.valid_target[u:u + 1] for u in users]
    else:
      hist = [np.append(self.train_sequences[u], self.valid_target[u]).astype(np.int32) for u in users]
      tgt = [self.test_target[u:u + 1] for u in users]
    return _make_eval_set(users, hist, tgt, maxlen)


def leave_one_out(data: InteractionData) -> LeaveOneOutSplit:
  """Splits `data` chronologically, one validation and one test item per user (see the class)."""
  seqs = user_sequences(data)
  valid = np.full((data.num_users,), -1, np.int32)
  test = np.full((data.num_users,), -1, np.int32)
  train = []
  for u, s in enumerate(seqs):
    if len(s) >= 3:
      valid[u], test[u] = s[-2], s[-1]
      train.append(s[:-2].copy())
    else:
      train.append(s.copy())
  return LeaveOneOutSplit(data.num_users, data.num_items, tuple(train), valid, test)


def training_windows(sequences: Sequence[np.ndarray], maxlen: int) -> dict[str, np.ndarray]:
  """SASRec's training data: the examples of `training_examples` whose target index ``t`` is the
  sequence's last, or ``maxlen``, ``2 maxlen``, ... before it (``(len - 1 - t) % maxlen == 0``).

  Read at every position (the all-positions loss, ``config.loss.positions='all'``), these
  non-overlapping windows predict every item ``s[1:]`` of every sequence exactly once, each from
  its own prefix (truncated to the window): one pass is one epoch of SASRec, whereas every prefix
  example read at every position would repeat item ``s[j]`` ``min(maxlen, len - j)`` times.
  Same fields and order as `training_examples`.
  """
  out = training_examples(sequences, maxlen)
  lens = np.array([len(s) for s in sequences], np.int64)
  per_user = np.maximum(lens - 1, 0)
  first = np.concatenate([[0], np.cumsum(per_user)[:-1]]).astype(np.int64)
  t = np.arange(int(per_user.sum()), dtype=np.int64) - np.repeat(first, per_user) + 1
  keep = (np.repeat(lens, per_user) - 1 - t) % maxlen == 0
  return {k: v[keep] for k, v in out.items()}


def training_examples(sequences: Sequence[np.ndarray], maxlen: int, min_history: int = 1) -> dict[str, np.ndarray]:
  """Next-item examples: one per position ``t >= min_history`` of each sequence.

  Example ``(u, t)`` has target ``sequences[u][t]`` and the history ``sequences[u][:t]`` truncated
  to its last ``maxlen`` items, left-aligned as in `EvalSet`. ``user`` is the sequence's index,
  which is the user id for the splits of this module. Examples are ordered by (user, t).

  Returns:
    ``user`` int32 [N], ``history`` int32 [N, maxlen], ``history_len`` int32 [N], ``target`` int32 [N].
  """
  if maxlen < 1:
    raise ValueError(f"maxlen must be >= 1, got {maxlen}")
  if min_history < 0:
    raise ValueError(f"min_history must be >= 0, got {min_history}")
  lens = np.array([len(s) for s in sequences], np.int64)
  flat = (np.concatenate([np.asarray(s, np.int32) for s in sequences]) if len(sequences)
          else np.zeros((0,), np.int32))
  starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
  per_user = np.maximum(lens - min_history, 0)
  user = np.repeat(np.arange(len(sequences), dtype=np.int32), per_user)
  # t for every example: min_history, min_history+1, ... within each user (vectorised ragged arange).
  first = np.concatenate([[0], np.cumsum(per_user)[:-1]]).astype(np.int64)
  t = np.arange(int(per_user.sum()), dtype=np.int64) - np.repeat(first, per_user) + min_history
  pos = np.repeat(starts, per_user) + t  # flat index of the target
  hlen = np.minimum(t, maxlen)
  idx = pos[:, None] - hlen[:, None] + np.arange(maxlen)[None, :]
  valid = np.arange(maxlen)[None, :] < hlen[:, None]
  history = np.where(valid, flat[np.where(valid, idx, 0)] if len(flat) else 0, 0).astype(np.int32)
  return {"user": user, "history": history.reshape(-1, maxlen), "history_len": hlen.astype(np.int32),
          "target": flat[pos].astype(np.int32) if len(flat) else np.zeros((0,), np.int32)}


# ---------------------------------------------------------------------------------------------
# ComiRec (Cen et al., KDD'20): users split 8:1:1, held-out users unseen in training.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ComiRecSplit:
  """ComiRec's protocol.

  Item ids are those of the source `InteractionData` (not re-indexed by frequency as in ComiRec's
  preprocessing) so that item features stay aligned; a popularity-ordered negative sampler should
  compute frequencies from ``train_sequences``.

  Attributes:
    num_users, num_items: id ranges of the source data.
    maxlen: default history length of `eval_set`.
    train_users, valid_users, test_users: int32 disjoint user ids (8:1:1 of the kept users).
    train_sequences: per user id, int32 chronological items; empty for every user that is not a
      training user, so examples built from it can never touch a held-out user.
    sequences: per user id, the full chronological sequence (after the min-count filter).
  """

  num_users: int
  num_items: int
  maxlen: int
  train_users: np.ndarray
  valid_users: np.ndarray
  test_users: np.ndarray
  train_sequences: tuple[np.ndarray, ...]
  sequences: tuple[np.ndarray, ...]

  def eval_set(self, split: str, maxlen: int | None = None) -> EvalSet:
    """Held-out users of ``split`` in {'valid', 'test'}.

    For a sequence of length n, the first ``k = floor(0.8 n)`` items are the history and the rest
    (de-duplicated, in order) are the targets, as in ComiRec's evaluation (``int(len * 0.8)``).
    Exclude lists follow `EvalSet` (history minus targets); note that ComiRec's official code does
    not filter history items, so ignore them to reproduce its numbers.
    """
    if split not in ("valid", "test"):
      raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    users = self.valid_users if split == "valid" else self.test_users
    hist, tgt = [], []
    for u in users:
      s = self.sequences[u]
      k = int(len(s) * 0.8)
      hist.append(s[:k])
      _, first = np.unique(s[k:], return_index=True)
      tgt.append(s[k:][np.sort(first)])
    return _make_eval_set(users, hist, tgt, maxlen or self.maxlen)


def comirec_split(data: InteractionData, seed: int, maxlen: int, min_count: int = 5) -> ComiRecSplit:
  """Splits users 8:1:1 into train / valid / test (a seeded permutation).

  Filter (one pass, as ComiRec's preprocessing): interactions with items seen fewer than
  ``min_count`` times are dropped, then users left with fewer than ``min_count`` interactions are
  dropped from all three splits. Item ids are unchanged.
  """
  item_count = np.bincount(data.item, minlength=data.num_items)
  keep = item_count[data.item] >= min_count
  seqs = list(user_sequences(dataclasses.replace(
      data, user=data.user[keep], item=data.item[keep], timestamp=data.timestamp[keep],
      rating=None if data.rating is None else data.rating[keep])))
  kept = np.array([u for u, s in enumerate(seqs) if len(s) >= min_count], np.int32)
  for u in range(len(seqs)):
    if len(seqs[u]) < min_count:
      seqs[u] = seqs[u][:0]
  perm = np.random.default_rng(seed).permutation(kept)
  n_train = int(round(0.8 * len(perm)))
  n_valid = int(round(0.1 * len(perm)))
  train_u = np.sort(perm[:n_train]).astype(np.int32)
  valid_u = np.sort(perm[n_train:n_train + n_valid]).astype(np.int32)
  test_u = np.sort(perm[n_train + n_valid:]).astype(np.int32)
  is_train = np.zeros((data.num_users,), bool)
  is_train[train_u] = True
  train_seqs = tuple(s if is_train[u] else s[:0] for u, s in enumerate(seqs))
  return ComiRecSplit(data.num_users, data.num_items, maxlen, train_u, valid_u, test_u, train_seqs, tuple(seqs))


def comirec_training_examples(sequences: Sequence[np.ndarray], maxlen: int, min_cut: int = 4) -> dict[str, np.ndarray]:
  """Every ComiRec training cut: target ``s[k]``, history ``s[:k][-maxlen:]``, for k in [min_cut, len).

  ComiRec samples a user uniformly, then one random cut; enumerating every cut instead weights
  each user by the length of their sequence (long-history users dominate an epoch). Reweight or
  subsample per user if the uniform-user objective matters.
  """
  return training_examples(sequences, maxlen, min_history=min_cut)
