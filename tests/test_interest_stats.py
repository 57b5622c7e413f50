"""mvhan_jax.interest_stats: hand-computed values on tiny interest sets."""

import numpy as np
import pytest

from mvhan_jax import interest_stats as st


def test_live_pairwise_cosine_collapsed_orthogonal_and_single():
  interests = np.array([
      [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]],   # collapsed onto one direction: cosine 1
      [[1.0, 0.0], [0.0, 5.0], [9.0, 9.0]],   # first two orthogonal, the third masked out
      [[1.0, 1.0], [-1.0, -1.0], [0.0, 1.0]],  # one live interest only: NaN
      [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],   # pairs: 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2/3
  ])
  mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
  cos = st.live_pairwise_cosine(interests, mask)
  np.testing.assert_allclose(cos[0], 1.0)
  np.testing.assert_allclose(cos[1], 0.0, atol=1e-12)
  assert np.isnan(cos[2])
  np.testing.assert_allclose(cos[3], np.sqrt(2) / 3)


def test_owner_is_the_best_live_interest_and_owners_in_topk_counts_distinct():
  items = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0]])
  interests = np.array([
      [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],
      [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],
  ])
  mask = np.array([[1, 1, 1], [1, 1, 0]], bool)  # user 1 cannot use interest 2
  ids = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
  own = st.owner(interests, mask, items, ids)
  np.testing.assert_array_equal(own[0], [0, 1, 0, 2])
  # Item 3 = (-1, 0) scores -1 by interest 0, 0 by interest 1: interest 1 owns it, never the masked 2.
  np.testing.assert_array_equal(own[1], [0, 1, 0, 1])
  np.testing.assert_array_equal(st.owners_in_topk(interests, mask, items, ids), [3, 2])
  np.testing.assert_array_equal(st.owners_in_topk(interests, mask, items, np.array([[0, 2], [1, 3]])), [1, 1])


def test_bucket_means_and_input_checks():
  out = st.bucket_means([1.0, 0.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b", "b"])
  assert out == {"a": (0.5, 2), "b": (2 / 3, 3)}
  with pytest.raises(ValueError, match="at least one live interest"):
    st.live_pairwise_cosine(np.ones((2, 2, 3)), np.array([[1, 0], [0, 0]], bool))
  with pytest.raises(ValueError, match=r"\[Q, K, D\]"):
    st.owner(np.ones((2, 3)), np.ones((2, 3), bool), np.ones((4, 3)), np.zeros((2, 1), int))
