"""Tests for retrieval.autotune: held-out recall, monotone choice, impossible targets."""

import numpy as np
import pytest

from mvhan_jax import evaluation, retrieval

pytest.importorskip("scann")

_K = 10


def _clustered(rng, n, d, centres):
  """Topic centroids + noise with Zipf cluster sizes (like the synthetic world)."""
  p = 1.0 / np.arange(1, len(centres) + 1) ** 1.1
  topic = rng.choice(len(centres), size=n, p=p / p.sum())
  return (centres[topic] + 0.5 / np.sqrt(d) * rng.normal(size=(n, d))).astype(np.float32)


def _user_queries(rng, q, d, centres):
  """A mixture of 1-3 topic vectors + noise per query (user-like)."""
  mix = rng.dirichlet(np.ones(3), size=q) * (rng.random((q, 3)) < 0.6)
  mix[:, 0] += 1e-3  # never all-zero
  topics = rng.integers(0, len(centres), (q, 3))
  x = np.einsum("qt,qtd->qd", mix, centres[topics]) + 0.3 / np.sqrt(d) * rng.normal(size=(q, d))
  return x.astype(np.float32)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  d = 32
  centres = rng.normal(size=(100, d)) / np.sqrt(d)
  items = _clustered(rng, 20_000, d, centres)
  tune_q = _user_queries(rng, 600, d, centres)
  held_q = _user_queries(rng, 600, d, centres)
  return items, tune_q, held_q


@pytest.fixture(scope="module")
def result(data):
  items, tune_q, _ = data
  # A reduced grid keeps the test fast; settings sharing num_leaves share one tree.
  grid = [c for c in retrieval.default_tune_grid(len(items), _K) if c.reorder_k in (20, 100)]
  return retrieval.autotune(items, tune_q, 0.9, _K, candidates=grid, repeats=1), grid


def test_choice_meets_target_on_held_out_queries(data, result):
  items, _, held_q = data
  res, grid = result
  assert res.recall - res.margin >= 0.9
  assert len(res.curve) == len(grid)
  assert res.build_time_s > 0 and res.index_bytes > items.nbytes // 2
  _, exact = evaluation.exact_topk(held_q, items, _K)
  ids, _ = res.index.search(held_q, _K)
  assert retrieval.ann_recall(ids, exact) >= 0.9
  # The config alone rebuilds an equivalent index. ScaNN's tree training is not seeded, so a rebuild
  # has its own tree: its held-out recall is compared with the tuned index's within 0.04, not with the
  # target (one suite run's rebuild gave 0.883 against 0.9; six rebuilds of one choice gave 0.929-0.946).
  rebuilt = retrieval.build_index(items, res.config)
  assert rebuilt.config == res.config
  held = retrieval.ann_recall(ids, exact)
  assert abs(retrieval.ann_recall(rebuilt.search(held_q, _K)[0], exact) - held) <= 0.04
  # It is the fastest accepted Pareto point of its own curve.
  front = retrieval.pareto_front(res.curve)
  ok = [p for p in front if p.recall - 2.0 * p.recall_sem >= 0.9]
  assert res.queries_per_s == max(p.queries_per_s for p in ok)


def test_higher_target_never_picks_lower_recall(data, result):
  res, _ = result
  # Re-select on the measured curve for rising targets (no re-measuring: the
  # selection rule is the thing under test), then end to end at two targets.
  picks = [retrieval.choose_setting(res.curve, t) for t in np.linspace(0.3, 1.0, 71)]
  recalls = [p.recall for p in picks if p is not None]
  assert recalls == sorted(recalls) and len(set(recalls)) >= 3
  items, tune_q, _ = data
  grid = [c for c in retrieval.default_tune_grid(len(items), _K)
          if c.reorder_k == 100 and c.num_leaves == res.config.num_leaves]
  lo = retrieval.autotune(items, tune_q, 0.8, _K, candidates=grid, repeats=1)
  hi = retrieval.autotune(items, tune_q, 0.95, _K, candidates=grid, repeats=1)
  # The grid varies only leaves_to_search, so the higher target searches at least as many leaves.
  assert hi.config.num_leaves_to_search >= lo.config.num_leaves_to_search
  # The two calls build their trees independently and ScaNN's tree training is not seeded: the same
  # setting measured twice differed by 0.002 (0.9793 vs 0.9813) in one suite run. So recalls are
  # compared within the calls' own confidence margins (z * SEM), not exactly.
  assert hi.recall >= lo.recall - (hi.margin + lo.margin)
  assert hi.recall - hi.margin >= 0.95 and lo.recall - lo.margin >= 0.8


def test_multi_interest_queries(data):
  items, tune_q, _ = data
  q = tune_q[:200].reshape(50, 4, -1)
  mask = np.ones((50, 4), bool)
  mask[::2, 2:] = False
  grid = [c for c in retrieval.default_tune_grid(len(items), _K)
          if c.reorder_k == 100 and c.num_leaves == 141]
  res = retrieval.autotune(items, q, 0.8, _K, candidates=grid, query_mask=mask, repeats=1)
  _, exact = evaluation.exact_topk(q, items, _K, query_mask=mask)
  assert retrieval.ann_recall(res.index.search(q, _K, mask)[0], exact) >= 0.8


def test_impossible_target_raises(data):
  items, tune_q, _ = data
  with pytest.raises(ValueError, match="target_recall must lie in"):
    retrieval.autotune(items, tune_q, 1.01, _K)
  grid = [retrieval.IndexConfig(num_leaves=141, num_leaves_to_search=1, reorder_k=10,
                                training_sample_size=20_000)]
  with pytest.raises(ValueError, match="no candidate reaches recall@10"):
    retrieval.autotune(items, tune_q, 0.999, _K, candidates=grid, repeats=1)
