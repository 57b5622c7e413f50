"""Tests for mvhan_jax.retrieval: merge, ScaNN recall, save/load, multi-interest."""

import logging
import sys

import numpy as np
import pytest

from mvhan_jax import evaluation, retrieval


def _merge_reference(ids, scores, mask, k):
  """Plain-Python merge: dict of max score per item, sorted by (-score, id)."""
  out_ids, out_scores = [], []
  for row in range(ids.shape[0]):
    best = {}
    for j in range(ids.shape[1]):
      if not mask[row, j]:
        continue
      for i, s in zip(ids[row, j], scores[row, j]):
        if i >= 0:
          best[int(i)] = max(best.get(int(i), -np.inf), float(s))
    ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    ranked += [(-1, -np.inf)] * (k - len(ranked))
    out_ids.append([i for i, _ in ranked])
    out_scores.append([s for _, s in ranked])
  return np.array(out_ids), np.array(out_scores, np.float32)


def _clustered(rng, n, d, clusters):
  centres = rng.normal(size=(clusters, d))
  x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
  return x.astype(np.float32)


@pytest.fixture(scope="module")
def clustered():
  rng = np.random.default_rng(0)
  items = _clustered(rng, 5000, 32, 50)
  queries = _clustered(rng, 200, 32, 50)
  return items, queries


@pytest.fixture(scope="module")
def scann_index(clustered):
  # A tree (71 leaves, 18 searched: what for_size gives a 5,000-item catalogue above NO_TREE_BELOW).
  return retrieval.build_index(clustered[0], retrieval.IndexConfig.for_size(5000, num_leaves=71,
                                                                            num_leaves_to_search=18))


def test_merge_interests_matches_python_reference():
  rng = np.random.default_rng(1)
  q, kint, per, k = 30, 4, 6, 8
  # Ids from a small range -> many duplicates across interests; scores from a
  # small set -> exact ties that must be broken by item id.
  ids = rng.integers(0, 15, size=(q, kint, per))
  ids[rng.random(ids.shape) < 0.15] = -1
  scores = rng.integers(0, 6, size=(q, kint, per)).astype(np.float32)
  mask = rng.random((q, kint)) < 0.7
  mask[0] = False          # a user with no live interest -> all padding
  mask[1] = [True, False, False, False]
  got_ids, got_scores = retrieval.merge_interests(ids, scores, mask, k)
  ref_ids, ref_scores = _merge_reference(ids, scores, mask, k)
  np.testing.assert_array_equal(got_ids, ref_ids)
  np.testing.assert_array_equal(got_scores, ref_scores)
  assert (got_ids[0] == -1).all()
  for row in got_ids:
    live = row[row >= 0]
    assert len(set(live.tolist())) == len(live)


@pytest.mark.parametrize("k", [3, 8, 40])
def test_merge_interests_packed_keys_keep_float_order(k):
  # The merge packs (item, score) into uint64 keys: negative scores, -0.0 vs 0.0, denormals and
  # large ids must keep the reference's order; k above K * k' pads with -1 / -inf.
  rng = np.random.default_rng(k)
  q, kint, per = 50, 4, 6
  ids = rng.integers(0, 12, size=(q, kint, per))
  ids[:, :, 0] = 2**31 - 2 - rng.integers(0, 3, size=(q, kint))
  ids[rng.random(ids.shape) < 0.1] = -1
  values = np.array([-np.inf, -3.5, -1e-40, -0.0, 0.0, 1e-40, 0.25, 7.0], np.float32)
  scores = values[rng.integers(0, len(values), size=ids.shape)]
  scores[rng.random(ids.shape) < 0.05] = np.nan
  mask = rng.random((q, kint)) < 0.8
  got_ids, got_scores = retrieval.merge_interests(ids, scores, mask, k)
  # NaN-scored entries are dropped like padding.
  ref_ids, ref_scores = _merge_reference(np.where(np.isnan(scores), -1, ids), scores, mask, k)
  np.testing.assert_array_equal(got_ids, ref_ids)
  np.testing.assert_array_equal(got_scores, ref_scores)
  assert (np.signbit(got_scores[got_scores == 0]) == False).all()  # -0.0 and 0.0 merge as 0.0
  assert got_ids.shape == (q, k) and got_ids.dtype == np.int32 and got_scores.dtype == np.float32


def test_merge_interests_rejects_ids_beyond_int32():
  with pytest.raises(ValueError, match="int32 item ids"):
    retrieval.merge_interests(np.full((1, 1, 1), 2**31 - 1), np.zeros((1, 1, 1)))


def test_merge_interests_hand_example():
  ids = np.array([[[7, 3, -1], [3, 9, 7]]])
  scores = np.array([[[0.9, 0.5, 0.0], [0.8, 0.5, 0.1]]], np.float32)
  got_ids, got_scores = retrieval.merge_interests(ids, scores, None, 4)
  # 7 -> max(0.9, 0.1); 3 -> max(0.5, 0.8); 9 -> 0.5; padding dropped.
  np.testing.assert_array_equal(got_ids, [[7, 3, 9, -1]])
  np.testing.assert_allclose(got_scores, [[0.9, 0.8, 0.5, -np.inf]])


def test_ann_recall_hand_example():
  approx = np.array([[1, 2, 3], [4, 5, -1]])
  exact = np.array([[3, 2, 9], [6, 7, 8]])
  assert retrieval.ann_recall(approx, exact) == pytest.approx((2 / 3 + 0) / 2)


def test_scann_recall_against_exact(clustered, scann_index):
  items, queries = clustered
  assert isinstance(scann_index, retrieval.ScannIndex)
  assert scann_index.config.num_leaves == 71 and scann_index.config.num_leaves_to_search == 18
  approx_ids, approx_scores = scann_index.search(queries, 10)
  exact_ids, exact_scores = retrieval.ExactIndex(items).search(queries, 10)
  assert approx_ids.shape == (200, 10) and approx_ids.dtype == np.int32
  assert retrieval.ann_recall(approx_ids, exact_ids) >= 0.9
  # Reordering rescores exactly: returned scores are the true inner products.
  true = np.einsum("qd,qkd->qk", queries, items[approx_ids])
  np.testing.assert_allclose(approx_scores, true, rtol=1e-4, atol=1e-4)
  assert np.all(np.diff(approx_scores, axis=1) <= 1e-6)


def test_scann_multi_interest_equals_merged_single_searches(clustered, scann_index):
  items, queries = clustered
  multi = queries[:60].reshape(20, 3, 32)
  mask = np.ones((20, 3), bool)
  mask[::3, 1:] = False
  ids, scores = scann_index.search(multi, 10, query_mask=mask)
  flat_ids, flat_scores = scann_index.search(multi.reshape(60, 32), 10)
  ref_ids, ref_scores = retrieval.merge_interests(
      flat_ids.reshape(20, 3, 10), flat_scores.reshape(20, 3, 10), mask, 10)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(scores, ref_scores)


def test_exhaustive_scann_multi_interest_equals_exact(clustered):
  items, queries = clustered
  items = items[:500]
  # Every leaf searched and every item reordered -> ScaNN is exact.
  config = retrieval.IndexConfig(num_leaves=10, num_leaves_to_search=10,
                                 training_sample_size=500, reorder_k=500)
  index = retrieval.ScannIndex.build(items, config)
  multi = queries[:40].reshape(10, 4, 32)
  mask = np.random.default_rng(2).random((10, 4)) < 0.6
  mask[:, 0] = True
  ids, scores = index.search(multi, 15, query_mask=mask)
  exact_ids, exact_scores = retrieval.ExactIndex(items).search(multi, 15, query_mask=mask)
  np.testing.assert_array_equal(ids, exact_ids)
  np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)


def test_exact_index_multi_interest_equals_merged_exact_searches():
  rng = np.random.default_rng(3)
  items = rng.normal(size=(300, 16)).astype(np.float32)
  multi = rng.normal(size=(12, 3, 16)).astype(np.float32)
  mask = rng.random((12, 3)) < 0.6
  mask[:, 2] = True
  index = retrieval.ExactIndex(items)
  ids, scores = index.search(multi, 20, query_mask=mask)
  per_s, per_i = evaluation.exact_topk(multi.reshape(36, 16), items, 20)
  ref_ids, ref_scores = retrieval.merge_interests(
      per_i.reshape(12, 3, 20), per_s.reshape(12, 3, 20), mask, 20)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
  np.testing.assert_array_equal(ids, evaluation.exact_topk(multi, items, 20, query_mask=mask)[1])


def test_scann_save_load_round_trip(tmp_path, clustered, scann_index):
  _, queries = clustered
  directory = scann_index.save(str(tmp_path / "idx"), step=1234, metadata={"model": "mind"})
  loaded = retrieval.load_index(directory)
  assert isinstance(loaded, retrieval.ScannIndex)
  assert loaded.step == 1234 and loaded.metadata == {"model": "mind"}
  assert loaded.config == scann_index.config and loaded.num_items == 5000
  for a, b in zip(scann_index.search(queries, 10), loaded.search(queries, 10)):
    np.testing.assert_array_equal(a, b)


def test_exact_save_load_round_trip(tmp_path):
  items = np.random.default_rng(4).normal(size=(50, 8)).astype(np.float32)
  index = retrieval.build_index(items, retrieval.IndexConfig.for_size(50, backend="exact"))
  assert isinstance(index, retrieval.ExactIndex)
  index.save(str(tmp_path), step=7, metadata={})
  loaded = retrieval.load_index(str(tmp_path))
  assert isinstance(loaded, retrieval.ExactIndex) and loaded.step == 7
  np.testing.assert_array_equal(loaded.item_vectors, items)
  with pytest.raises(FileNotFoundError, match="not a saved index"):
    retrieval.load_index(str(tmp_path / "missing"))


def test_tiny_catalogue_builds_and_is_exact():
  rng = np.random.default_rng(5)
  items = rng.normal(size=(7, 4)).astype(np.float32)
  queries = rng.normal(size=(3, 4)).astype(np.float32)
  config = retrieval.IndexConfig.for_size(7)
  assert config.num_leaves == 0  # no tree under 1,000 items
  ids, _ = retrieval.build_index(items, config).search(queries, 7)
  np.testing.assert_array_equal(ids, np.argsort(-(queries @ items.T), axis=1))
  with pytest.raises(ValueError, match="num_leaves <= num_items"):
    retrieval.ScannIndex.build(items, retrieval.IndexConfig(num_leaves=8, num_leaves_to_search=1))


def test_build_index_falls_back_without_scann(monkeypatch, caplog):
  # A None entry in sys.modules makes `import scann` raise ImportError, exactly
  # as on a platform without wheels; ScaNN itself is not faked.
  monkeypatch.setitem(sys.modules, "scann", None)
  items = np.random.default_rng(6).normal(size=(40, 8)).astype(np.float32)
  with caplog.at_level(logging.WARNING, logger="mvhan_jax.retrieval"):
    index = retrieval.build_index(items)
  assert isinstance(index, retrieval.ExactIndex)
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "scann is not importable" in warnings[0].getMessage()


def test_subset_index_answers_in_global_ids_and_only_from_its_subset(tmp_path):
  rng = np.random.default_rng(3)
  items = rng.normal(size=(3000, 16)).astype(np.float32)
  members = np.sort(rng.choice(3000, size=400, replace=False))
  queries = rng.normal(size=(20, 16)).astype(np.float32)
  index = retrieval.SubsetIndex.build(items, members, retrieval.IndexConfig.for_size(400, backend="exact"))
  ids, scores = index.search(queries, 10)
  assert set(ids.ravel().tolist()) <= set(members.tolist())
  # Equal to a brute-force top-10 among the subset, in global ids.
  s = queries @ items[members].T
  want = members[np.argsort(-s, axis=1)[:, :10]]
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(scores, np.take_along_axis(s, np.argsort(-s, axis=1)[:, :10], 1), rtol=1e-5)
  # A saved and reloaded subset index (ScaNN) keeps the id map.
  scann = retrieval.SubsetIndex.build(items, members)
  scann.save(str(tmp_path / "t"), step=7)
  loaded = retrieval.load_index(str(tmp_path / "t"))
  assert isinstance(loaded, retrieval.SubsetIndex) and loaded.inner.step == 7
  got, _ = loaded.search(queries, 10)
  assert set(got.ravel().tolist()) <= set(members.tolist())
  assert retrieval.ann_recall(got, want) > 0.9
