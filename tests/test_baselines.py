"""Popularity and first-order Markov-chain baselines against a hand-computed example."""

import numpy as np
import pytest

from mvhan_jax import baselines
from mvhan_jax.data import protocol

# Items 0..4. Transitions within sequences: 0->1 x2, 1->2 x2, 1->3, 4->0, 0->2 (3->1 would span u1|u2:
# never counted). Row counts r0 = 3, r1 = 3, r4 = 1, r2 = r3 = 0. Item counts [3, 3, 3, 1, 1].
TRAIN = [np.array([0, 1, 2]), np.array([0, 1, 3]), np.array([1, 2]), np.array([4, 0, 2])]
I = 5


def _eval_set(histories, targets):
  return protocol._make_eval_set(np.arange(len(histories)), [np.array(h) for h in histories],
                                 [np.array([t]) for t in targets], maxlen=4)


def test_counts_and_transitions():
  np.testing.assert_array_equal(baselines.item_counts(TRAIN, I), [3, 3, 3, 1, 1])
  np.testing.assert_array_equal(baselines.popularity_scores(TRAIN, I), [3., 3., 3., 1., 1.])
  t = baselines.transition_counts(TRAIN, I)
  want = np.zeros((I, I), int)
  want[0, 1], want[1, 2], want[1, 3], want[4, 0], want[0, 2] = 2, 2, 1, 1, 1
  np.testing.assert_array_equal(t, want)
  assert t[3, 1] == 0 and t[2, 1] == 0  # nothing across sequence boundaries


def test_markov_keys_and_scores_by_hand():
  es = _eval_set([[0, 1], [4], [1, 2]], [3, 2, 0])
  keys = baselines.markov_chain_keys(TRAIN, es.history, es.history_len, I)
  # q0: last 1 (r 3), prev 0 (r 3): score = T[1]/3 + 0.5 T[0]/3 = [0, 1/3, 5/6, 1/3, 0];
  #     N = 2*3*T[1] + 3*T[0] = [0, 6, 15, 6, 0]; key = N * (3 + 1) + count.
  # q1: last 4 (r 1), no prev: score [1, 0, 0, 0, 0]; N = 2*T[4] = [2, 0, 0, 0, 0].
  # q2: last 2 (never followed: r 0, term 0), prev 1 (r 3): score = 0.5*T[1]/3 = [0, 0, 1/3, 1/6, 0];
  #     N = 2*3*T[2] + max(0, 1)*T[1] = [0, 0, 2, 1, 0].
  np.testing.assert_array_equal(keys, [[3, 27, 63, 25, 1], [11, 3, 3, 1, 1], [3, 3, 11, 5, 1]])
  scores = baselines.markov_chain_scores(TRAIN, es.history, es.history_len, I)
  markov = np.array([[0, 1 / 3, 5 / 6, 1 / 3, 0], [1, 0, 0, 0, 0], [0, 0, 1 / 3, 1 / 6, 0]])
  # + eps_q * count / max count, eps_q = 1 / (4 R_l R_p): 1/36, 1/4, 1/12.
  np.testing.assert_allclose(scores - markov, np.array([[1 / 36], [1 / 4], [1 / 12]]) * [1, 1, 1, 1 / 3, 1 / 3])
  # The float form orders (and ties) exactly like the keys: popularity only breaks Markov ties.
  np.testing.assert_array_equal(baselines.row_ranks(scores), baselines.row_ranks(keys))
  np.testing.assert_array_equal(baselines.row_ranks(keys)[0], [1, 3, 4, 2, 0])


def test_row_ranks_dense_with_ties():
  np.testing.assert_array_equal(baselines.row_ranks(np.array([[5, 1, 5, 7], [0, 0, 0, 0]])),
                                [[1, 0, 1, 2], [0, 0, 0, 0]])


def test_evaluate_through_the_leave_one_out_evaluator():
  es = _eval_set([[0, 1], [4], [1, 2]], [3, 2, 0])
  keys = baselines.markov_chain_keys(TRAIN, es.history, es.history_len, I)
  m = baselines.evaluate_per_query(es, keys, ks=(1, 2, 3))
  # q0: history 0, 1 excluded; target 3 (key 25) below item 2 (63): rank 1.
  # q1: item 4 excluded; target 2 (key 3): item 0 (11) and item 1 (3, a tie: counted against it): rank 2.
  # q2: items 1, 2 excluded; target 0 (key 3) below item 3 (5): rank 1.
  assert m["HR@1"] == 0.0 and m["HR@2"] == pytest.approx(2 / 3) and m["HR@3"] == 1.0
  assert m["MRR"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
  assert m["NDCG@2"] == pytest.approx((2 / np.log2(3)) / 3)


def test_split_helpers_use_training_transitions_only():
  # Full sequences [0 1 2 | 3 | 4] and [3 1 2 | 0 | 4] over 7 items (5, 6 never seen): the validation
  # and test items (and the valid -> test transition) are not training data; the test query's last
  # item is the validation item.
  split = protocol.LeaveOneOutSplit(
      num_users=2, num_items=7, train_sequences=(np.array([0, 1, 2]), np.array([3, 1, 2])),
      valid_target=np.array([3, 0], np.int32), test_target=np.array([4, 4], np.int32))
  test = split.eval_set("test", maxlen=8)
  t = baselines.transition_counts(split.train_sequences, 7)
  assert t[2, 3] == 0 and t[3, 4] == 0 and t[2, 0] == 0 and t[0, 4] == 0 and t[3, 1] == 1
  keys = baselines.markov_chain_keys(split.train_sequences, test.history, test.history_len, 7)
  assert keys[0].argmax() == 1  # u0: last = 3 (the valid item; 3->1 once), prev = 2 (never followed)
  # Both histories cover items 0-3; target 4 ties with the unseen 5 and 6 (no transition, count 0):
  # ties count against it, rank 2 for both users and both baselines.
  for m in (baselines.evaluate_popularity(split, test, ks=(2, 3)), baselines.evaluate_markov_chain(split, test, ks=(2, 3))):
    assert m["HR@2"] == 0.0 and m["HR@3"] == 1.0 and m["MRR"] == pytest.approx(1 / 3)


def test_empty_history_is_refused():
  with pytest.raises(ValueError, match="non-empty history"):
    baselines.markov_chain_keys(TRAIN, np.zeros((1, 2), np.int32), np.zeros((1,), np.int32), I)
