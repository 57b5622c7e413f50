"""Evaluation protocols: hand-built splits and leakage invariants on the real MovieLens split."""

import numpy as np
import pytest

from mvhan_jax.data import movielens, protocol
from mvhan_jax.data.types import InteractionData


def _data(rows, num_users, num_items):
  u, i, t = (np.array(c) for c in zip(*rows))
  return InteractionData("toy", num_users, num_items, {}, {}, {}, u.astype(np.int32), i.astype(np.int32),
                         t.astype(np.int64))


# (user, item, timestamp), deliberately out of order.
LOG = [
    (0, 4, 10), (3, 2, 7), (0, 2, 10), (1, 5, 1), (0, 7, 20), (2, 6, 2), (0, 1, 5), (3, 5, 8),
    (2, 0, 3), (1, 0, 1), (0, 3, 30), (3, 1, 9), (2, 6, 4), (3, 0, 9),
]
# Chronological sequences, time ties broken by item id:
#   u0: (5,1) (10,2) (10,4) (20,7) (30,3) -> [1, 2, 4, 7, 3]
#   u1: (1,0) (1,5)                         -> [0, 5]   (< 3 interactions: training only)
#   u2: (2,6) (3,0) (4,6)                   -> [6, 0, 6] (a repeat: the test item is also in history)
#   u3: (7,2) (8,5) (9,0) (9,1)             -> [2, 5, 0, 1]


@pytest.fixture
def split():
  return protocol.leave_one_out(_data(LOG, 4, 8))


def test_leave_one_out_by_hand(split):
  assert [s.tolist() for s in split.train_sequences] == [[1, 2, 4], [0, 5], [6], [2, 5]]
  np.testing.assert_array_equal(split.valid_target, [7, -1, 0, 0])
  np.testing.assert_array_equal(split.test_target, [3, -1, 6, 1])
  assert all(s.dtype == np.int32 for s in split.train_sequences)


def test_split_independent_of_row_order():
  a = protocol.leave_one_out(_data(LOG, 4, 8))
  b = protocol.leave_one_out(_data(LOG[::-1], 4, 8))
  assert [s.tolist() for s in a.train_sequences] == [s.tolist() for s in b.train_sequences]
  np.testing.assert_array_equal(a.test_target, b.test_target)


def test_training_examples_by_hand(split):
  ex = protocol.training_examples(split.train_sequences, maxlen=2)
  np.testing.assert_array_equal(ex["user"], [0, 0, 1, 3])
  np.testing.assert_array_equal(ex["history"], [[1, 0], [1, 2], [0, 0], [2, 0]])
  np.testing.assert_array_equal(ex["history_len"], [1, 2, 1, 1])
  np.testing.assert_array_equal(ex["target"], [2, 4, 5, 5])
  # Truncation keeps the most recent items.
  ex1 = protocol.training_examples(split.train_sequences, maxlen=1)
  np.testing.assert_array_equal(ex1["history"][:, 0], [1, 2, 0, 2])
  np.testing.assert_array_equal(ex1["history_len"], [1, 1, 1, 1])
  # min_history=2: only u0's last position qualifies.
  ex2 = protocol.training_examples(split.train_sequences, maxlen=3, min_history=2)
  np.testing.assert_array_equal(ex2["history"], [[1, 2, 0]])
  np.testing.assert_array_equal(ex2["target"], [4])
  for e in (ex, ex1, ex2):
    assert all(v.dtype == np.int32 for v in e.values())


def test_eval_sets_by_hand(split):
  te = split.eval_set("test", maxlen=3)
  np.testing.assert_array_equal(te.user, [0, 2, 3])
  np.testing.assert_array_equal(te.history, [[2, 4, 7], [6, 0, 0], [2, 5, 0]])
  np.testing.assert_array_equal(te.history_len, [3, 2, 3])
  np.testing.assert_array_equal(te.targets, [[3], [6], [1]])
  # Full (untruncated) history minus targets: u0 keeps item 1 although it fell out of the window,
  # u2's repeated item 6 is the target, so it must stay rankable.
  np.testing.assert_array_equal(te.exclude_indptr, [0, 4, 5, 8])
  np.testing.assert_array_equal(te.exclude_indices, [1, 2, 4, 7, 0, 0, 2, 5])
  assert te.exclude_indptr.dtype == np.int64 and te.exclude_indices.dtype == np.int32

  va = split.eval_set("valid", maxlen=3)
  np.testing.assert_array_equal(va.user, [0, 2, 3])
  np.testing.assert_array_equal(va.history, [[1, 2, 4], [6, 0, 0], [2, 5, 0]])
  np.testing.assert_array_equal(va.history_len, [3, 1, 2])
  np.testing.assert_array_equal(va.targets, [[7], [0], [0]])
  assert [va.excluded(q).tolist() for q in range(3)] == [[1, 2, 4], [6], [2, 5]]
  with pytest.raises(ValueError, match="split must be 'valid' or 'test'"):
    split.eval_set("train", 3)


# ---- No leakage on the real MovieLens split. -----------------------------------------------------

@pytest.fixture(scope="module")
def real():
  try:
    data = movielens.load_movielens_100k()
  except RuntimeError as e:
    pytest.skip(f"MovieLens-100k unavailable: {e}")
  return data, protocol.leave_one_out(data)


def test_real_split_is_chronological(real):
  data, split = real
  ts = {(int(u), int(i)): int(t) for u, i, t in zip(data.user, data.item, data.timestamp)}
  assert len(ts) == len(data.user)  # ml-100k has no repeated (user, item)
  assert (split.valid_target >= 0).all()  # every user has >= 20 ratings
  sizes = sum(len(s) for s in split.train_sequences) + 2 * data.num_users
  assert sizes == len(data.user)
  for u, s in enumerate(split.train_sequences):
    times = [ts[u, int(i)] for i in s] + [ts[u, int(split.valid_target[u])], ts[u, int(split.test_target[u])]]
    assert times == sorted(times), u


def test_real_no_leakage(real):
  _, split = real
  # Every training history is a window of the training sequence, so checking whole sequences
  # covers any maxlen; the examples themselves are checked at maxlen 50.
  for u, s in enumerate(split.train_sequences):
    assert split.valid_target[u] not in s and split.test_target[u] not in s, u
  ex = protocol.training_examples(split.train_sequences, maxlen=50)
  assert len(ex["target"]) == sum(len(s) - 1 for s in split.train_sequences)
  held = np.stack([split.valid_target[ex["user"]], split.test_target[ex["user"]]], 1)  # [N, 2]
  assert not (ex["target"][:, None] == held).any()
  in_hist = np.arange(ex["history"].shape[1])[None, :] < ex["history_len"][:, None]
  for k in range(2):
    assert not ((ex["history"] == held[:, k:k + 1]) & in_hist).any()

  for name in ("valid", "test"):
    es = split.eval_set(name, maxlen=50)
    for q in range(len(es)):
      assert es.targets[q, 0] not in es.excluded(q)
    # Exclude lists hold the full history: sizes = training length (+ the valid item for 'test').
    np.testing.assert_array_equal(np.diff(es.exclude_indptr),
                                  [len(split.train_sequences[u]) + (name == "test") for u in es.user])

  te = split.eval_set("test", maxlen=50)
  rows = np.arange(len(te))
  # The test history ends with the valid target and never contains the test target.
  np.testing.assert_array_equal(te.history[rows, te.history_len - 1], split.valid_target[te.user])
  mask = np.arange(50)[None, :] < te.history_len[:, None]
  assert not ((te.history == te.targets[:, :1]) & mask).any()
  va = split.eval_set("valid", maxlen=50)
  assert not ((va.history == split.test_target[va.user][:, None]) & (np.arange(50) < va.history_len[:, None])).any()


# ---- ComiRec protocol. -------------------------------------------------------------------------

def _comirec_data():
  # 10 users with lengths 5..14; user u's items are u, u+1, ... at times 0, 1, ...
  rows = [(u, (u + j) % 20, j) for u in range(10) for j in range(u + 5)]
  return _data(rows, 10, 20)


def test_comirec_users_disjoint_and_cut(tmp_path):
  data = _comirec_data()
  s = protocol.comirec_split(data, seed=3, maxlen=4, min_count=1)
  tr, va, te = (set(x.tolist()) for x in (s.train_users, s.valid_users, s.test_users))
  assert (len(tr), len(va), len(te)) == (8, 1, 1)
  assert not (tr & va or tr & te or va & te) and tr | va | te == set(range(10))
  for u in range(10):
    assert (len(s.train_sequences[u]) > 0) == (u in tr)  # held-out users contribute no training data
  # Hand table of k = int(0.8 * n) for the lengths n of this toy log.
  cut = {5: 4, 6: 4, 7: 5, 8: 6, 9: 7, 10: 8, 11: 8, 12: 9, 13: 10, 14: 11}
  for split, users in (("valid", s.valid_users), ("test", s.test_users)):
    es = s.eval_set(split)
    (u,) = users
    n = u + 5
    seq = [(u + j) % 20 for j in range(n)]
    k = cut[n]
    assert es.user.tolist() == [u]
    assert es.targets[0].tolist() == seq[k:]
    assert es.history[0, :es.history_len[0]].tolist() == seq[:k][-4:]
    assert es.excluded(0).tolist() == sorted(set(seq[:k]) - set(seq[k:]))
  # Different seeds give different assignments, the same seed the same.
  s2 = protocol.comirec_split(data, seed=3, maxlen=4, min_count=1)
  np.testing.assert_array_equal(s.test_users, s2.test_users)


def test_comirec_min_count_filter():
  # Item 19 appears once; user 9 has only 4 interactions after it is removed.
  rows = [(u, j, j) for u in range(9) for j in range(6)] + [(9, j, j) for j in range(4)] + [(9, 19, 9)]
  s = protocol.comirec_split(_data(rows, 10, 20), seed=0, maxlen=5, min_count=5)
  assert 9 not in np.concatenate([s.train_users, s.valid_users, s.test_users])
  assert len(s.sequences[9]) == 0
  assert all(19 not in q for q in s.sequences)


def test_comirec_training_examples_cuts():
  ex = protocol.comirec_training_examples([np.arange(6, dtype=np.int32) + 10, np.arange(4, dtype=np.int32)], maxlen=3)
  # Only the first sequence has cuts k in [4, 6): targets s[4], s[5], history the previous 3 items.
  np.testing.assert_array_equal(ex["user"], [0, 0])
  np.testing.assert_array_equal(ex["target"], [14, 15])
  np.testing.assert_array_equal(ex["history"], [[11, 12, 13], [12, 13, 14]])
  np.testing.assert_array_equal(ex["history_len"], [3, 3])


def test_comirec_real_no_leakage(real):
  data, _ = real
  s = protocol.comirec_split(data, seed=0, maxlen=20)
  ex = protocol.comirec_training_examples(s.train_sequences, maxlen=20)
  held = np.concatenate([s.valid_users, s.test_users])
  assert not np.isin(ex["user"], held).any()
  assert len(s.train_users) == round(0.8 * 943)
