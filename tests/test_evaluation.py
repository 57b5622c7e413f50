"""Tests for mvhan_jax.evaluation: hand-computed metrics and NumPy brute force."""

import dataclasses

import numpy as np
import pytest

from mvhan_jax import evaluation as ev


# ---------------------------------------------------------------------------
# NumPy references.
# ---------------------------------------------------------------------------


def _csr(lists):
  indptr = np.zeros(len(lists) + 1, np.int64)
  indptr[1:] = np.cumsum([len(l) for l in lists])
  indices = np.array([i for l in lists for i in l], np.int32)
  return indptr, indices


def _brute_scores(queries, items, mask=None, excl=None):
  """float64 [Q, I] max-over-live-interest scores, -inf for excluded items."""
  q = np.asarray(queries, np.float64)
  if q.ndim == 2:
    q = q[:, None]
  s = np.einsum("qkd,id->qki", q, np.asarray(items, np.float64))
  if mask is not None:
    s = np.where(np.asarray(mask)[:, :, None], s, -np.inf)
  s = s.max(axis=1)
  if excl is not None:
    for row, ids in enumerate(excl):
      s[row, list(ids)] = -np.inf
  return s


def _brute_topk(scores, k):
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, 1), order


def _random_exclusions(rng, num_queries, num_items, max_len):
  return [rng.choice(num_items, size=rng.integers(0, max_len + 1), replace=False)
          for _ in range(num_queries)]


# ---------------------------------------------------------------------------
# Metrics against hand-computed numbers.
# ---------------------------------------------------------------------------


def test_leave_one_out_metrics_hand_computed():
  ranks = np.array([0, 3, 12, 60])
  m = ev.leave_one_out_metrics(ranks, ks=(10, 50))
  # HR@10: ranks 0 and 3 hit -> 2/4; HR@50: 0, 3, 12 hit -> 3/4.
  assert m["HR@10"] == pytest.approx(0.5)
  assert m["HR@50"] == pytest.approx(0.75)
  # NDCG: rank 0 -> 1, rank 3 -> 1/log2(5) = 0.430677, rank 12 -> 0 at k=10,
  # 1/log2(14) = 0.262650 at k=50, rank 60 -> 0.
  assert m["NDCG@10"] == pytest.approx((1 + 0.4306765581) / 4, abs=1e-9)
  assert m["NDCG@50"] == pytest.approx((1 + 0.4306765581 + 0.2626495350) / 4, abs=1e-9)
  # MRR over all ranks, untruncated: (1 + 1/4 + 1/13 + 1/61) / 4.
  assert m["MRR"] == pytest.approx((1 + 0.25 + 1 / 13 + 1 / 61) / 4)
  per = ev.leave_one_out_per_user(ranks, ks=(10,))
  np.testing.assert_allclose(per["NDCG@10"], [1.0, 0.4306765581, 0.0, 0.0], atol=1e-9)


def test_hit_rate_cut_off_is_strict():
  # 0-based ranks exactly k - 1, k and k + 1: only the first is in the top k (rank < k, not <=).
  k = 5
  per = ev.leave_one_out_per_user(np.array([k - 1, k, k + 1]), ks=(k,))
  np.testing.assert_array_equal(per[f"HR@{k}"], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(per[f"NDCG@{k}"], [1 / np.log2(k + 1), 0.0, 0.0], rtol=1e-12)
  m = ev.leave_one_out_metrics(np.array([k - 1, k, k + 1]), ks=(k,))
  assert m[f"HR@{k}"] == pytest.approx(1 / 3) and m[f"NDCG@{k}"] == pytest.approx(1 / np.log2(k + 1) / 3)


def test_multi_target_metrics_hand_computed():
  topk = np.array([
      [5, 1, 7, 2],      # truth {1, 2, 9}: hits at positions 1 and 3
      [0, 3, 4, 8],      # truth {6}: no hit
      [6, 2, -1, -1],    # truth {6, 6}: duplicated id counts once -> hit at 0
  ])
  targets = np.array([[9, 1, 2], [6, -1, -1], [6, 6, -1]])
  m = ev.multi_target_per_user(topk, targets, ks=(2, 4))
  # k=2: row0 sees {5, 1} -> 1 of 3 truths; row2 -> 1 of 1.
  np.testing.assert_allclose(m["Recall@2"], [1 / 3, 0, 1])
  np.testing.assert_allclose(m["HR@2"], [1, 0, 1])
  # NDCG@2 row0: DCG = 1/log2(3) = 0.630930; IDCG over min(3, 2) = 2 slots
  # = 1 + 0.630930 -> 0.386853.
  np.testing.assert_allclose(m["NDCG@2"], [0.6309297536 / 1.6309297536, 0, 1], atol=1e-9)
  # k=4 row0: DCG = 1/log2(3) + 1/log2(5) = 1.061606; IDCG over 3 slots
  # = 1 + 0.630930 + 0.5 = 2.130930 -> 0.498189.
  np.testing.assert_allclose(m["Recall@4"], [2 / 3, 0, 1])
  np.testing.assert_allclose(
      m["NDCG@4"], [(0.6309297536 + 0.4306765581) / 2.1309297536, 0, 1], atol=1e-9)
  means = ev.multi_target_metrics(topk, targets, ks=(2, 4))
  assert means["Recall@4"] == pytest.approx((2 / 3 + 1) / 3)
  assert means["HR@4"] == pytest.approx(2 / 3)


def test_multi_target_metrics_rejects_bad_input():
  with pytest.raises(ValueError, match="max\\(ks\\)"):
    ev.multi_target_metrics(np.zeros((1, 10), int), np.zeros((1, 1), int), ks=(20,))
  with pytest.raises(ValueError, match="no valid target"):
    ev.multi_target_metrics(np.arange(4)[None], np.full((1, 2), -1), ks=(2,))
  with pytest.raises(ValueError, match="twice"):
    ev.multi_target_metrics(np.array([[3, 3]]), np.array([[3]]), ks=(2,))


# ---------------------------------------------------------------------------
# exact_topk.
# ---------------------------------------------------------------------------


def test_exact_topk_matches_brute_force_with_exclusions_and_odd_chunks():
  rng = np.random.default_rng(0)
  q, i, d, k = 13, 57, 8, 20
  queries = rng.normal(size=(q, d)).astype(np.float32)
  items = rng.normal(size=(i, d)).astype(np.float32)
  excl = _random_exclusions(rng, q, i, 9)
  indptr, indices = _csr(excl)
  # Chunks that divide neither Q nor I, and k = 20 larger than an item chunk of 16.
  scores, ids = ev.exact_topk(queries, items, k, exclude_indptr=indptr, exclude_indices=indices,
                              item_chunk=16, query_chunk=5)
  ref_s, ref_i = _brute_topk(_brute_scores(queries, items, excl=excl), k)
  np.testing.assert_array_equal(ids, ref_i)
  np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
  assert ids.dtype == np.int32 and scores.dtype == np.float32
  for row in range(q):
    assert not set(ids[row]) & set(excl[row].tolist())


def test_exact_topk_multi_interest_ignores_masked_interest():
  rng = np.random.default_rng(1)
  q, kint, i, d, k = 6, 3, 40, 4, 7
  queries = rng.normal(size=(q, kint, d)).astype(np.float32)
  items = rng.normal(size=(i, d)).astype(np.float32)
  # Interest 2 of every even user is huge and masked: if it leaked, it would
  # own the whole top-k.
  queries[::2, 2] = 100.0 * items[0]
  mask = np.ones((q, kint), bool)
  mask[::2, 2] = False
  scores, ids = ev.exact_topk(queries, items, k, query_mask=mask, item_chunk=9, query_chunk=4)
  ref_s, ref_i = _brute_topk(_brute_scores(queries, items, mask), k)
  np.testing.assert_array_equal(ids, ref_i)
  np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
  assert all(len(set(row)) == k for row in ids)  # de-duplicated by construction
  # Unmasked, the dominant interest does take over (the test is not vacuous).
  _, ids_unmasked = ev.exact_topk(queries, items, k, item_chunk=9, query_chunk=4)
  np.testing.assert_array_equal(ids_unmasked, _brute_topk(_brute_scores(queries, items), k)[1])
  assert not np.array_equal(ids_unmasked[::2], ids[::2])


def test_exact_topk_pads_when_exclusions_leave_fewer_than_k():
  items = np.eye(4, dtype=np.float32)
  queries = np.ones((2, 4), np.float32)
  indptr, indices = _csr([[0, 1, 2], []])
  scores, ids = ev.exact_topk(queries, items, 3, exclude_indptr=indptr, exclude_indices=indices,
                              item_chunk=3)
  np.testing.assert_array_equal(ids, [[3, -1, -1], [0, 1, 2]])  # ties -> lower id first
  assert np.isneginf(scores[0, 1:]).all() and scores[0, 0] == 1.0


def test_exact_topk_argument_errors():
  items = np.zeros((5, 3), np.float32)
  with pytest.raises(ValueError, match="k must lie"):
    ev.exact_topk(np.zeros((2, 3)), items, 6)
  with pytest.raises(ValueError, match="no live interest"):
    ev.exact_topk(np.zeros((2, 2, 3)), items, 1, query_mask=np.array([[1, 0], [0, 0]], bool))
  with pytest.raises(ValueError, match="D = 4"):
    ev.exact_topk(np.zeros((2, 4)), items, 1)
  with pytest.raises(ValueError, match="both exclude_indptr"):
    ev.exact_topk(np.zeros((2, 3)), items, 1, exclude_indptr=np.zeros(3, np.int64))


# ---------------------------------------------------------------------------
# target_ranks.
# ---------------------------------------------------------------------------


def test_target_ranks_match_brute_force():
  rng = np.random.default_rng(2)
  q, kint, i, d = 11, 2, 45, 6
  queries = rng.normal(size=(q, kint, d)).astype(np.float32)
  mask = rng.random((q, kint)) < 0.7
  mask[:, 0] = True
  items = rng.normal(size=(i, d)).astype(np.float32)
  items[30:35] = items[3]  # exact duplicates: ties must count against the target
  targets = rng.integers(0, i, size=q)
  targets[0] = 3
  excl = []
  for t in targets:
    e = rng.choice(i, size=rng.integers(0, 8), replace=False)
    excl.append(e[e != t])
  indptr, indices = _csr(excl)
  ranks = ev.target_ranks(queries, items, targets[:, None], query_mask=mask,
                          exclude_indptr=indptr, exclude_indices=indices,
                          item_chunk=7, query_chunk=4)
  s = _brute_scores(queries, items, mask, excl)
  st = s[np.arange(q), targets]
  s[np.arange(q), targets] = -np.inf
  np.testing.assert_array_equal(ranks, (s >= st[:, None]).sum(axis=1))
  # Target 3 has 5 exact copies (30..34) that are not excluded -> they all rank above it.
  assert ranks[0] >= 5 - np.isin(np.arange(30, 35), excl[0]).sum()


def test_target_ranks_constant_scorer_is_pessimistic():
  rng = np.random.default_rng(3)
  i = 50
  items = np.tile(rng.normal(size=(1, 8)).astype(np.float32), (i, 1))  # identical items
  queries = rng.normal(size=(4, 8)).astype(np.float32)
  targets = np.array([0, 17, 49, 25])
  excl = [[1, 2], [], [3, 4, 5], [24]]
  indptr, indices = _csr(excl)
  ranks = ev.target_ranks(queries, items, targets, exclude_indptr=indptr,
                          exclude_indices=indices, item_chunk=16)
  # Worst rank = I - 1 - #excluded.
  np.testing.assert_array_equal(ranks, [47, 49, 46, 48])


def test_target_in_exclusions_raises():
  indptr, indices = _csr([[1, 2], [4]])
  with pytest.raises(ValueError, match="query 1: its target item 4 is in its exclusion list"):
    ev.target_ranks(np.ones((2, 3)), np.ones((6, 3)), [0, 4],
                    exclude_indptr=indptr, exclude_indices=indices)
  with pytest.raises(ValueError, match="multi_target_metrics"):
    ev.target_ranks(np.ones((2, 3)), np.ones((6, 3)), np.zeros((2, 2), int))


# ---------------------------------------------------------------------------
# Evaluators.
# ---------------------------------------------------------------------------


def test_chunked_apply_pads_each_call_and_trims_the_output():
  calls = []

  def fn(batch):
    calls.append(batch.shape)
    return {"double": 2 * batch, "sum": batch.sum(1)}

  x = np.arange(14).reshape(7, 2)
  wrap = lambda s, e: x[np.arange(s, s + 3) % 7]  # wrapping ids, as the trainers pad
  out = ev.chunked_apply(fn, 7, 3, wrap)
  assert calls == [(3, 2)] * 3  # one shape for every call: one compile
  np.testing.assert_array_equal(out["double"], 2 * x)
  np.testing.assert_array_equal(out["sum"], x.sum(1))
  fill = lambda s, e: np.concatenate([x[s:e], np.full((3 - (e - s), 2), -1)])
  np.testing.assert_array_equal(ev.chunked_apply(lambda b: b, 7, 3, fill), x)  # tuple-free output
  with pytest.raises(ValueError, match="n >= 1"):
    ev.chunked_apply(fn, 0, 3, wrap)


def test_auc_forms_agree_and_ties_count_as_asked():
  # One positive (score 0.5) against candidates [0.9, 0.5, 0.5, 0.1]: 1 above, 2 tied, 1 below.
  scores = np.array([0.9, 0.5, 0.5, 0.1])
  ge, gt = np.array([(scores >= 0.5).sum()]), np.array([(scores > 0.5).sum()])
  np.testing.assert_allclose(ev.target_auc(ge, [4], gt), [(1 + 2 / 2) / 4])     # ties half (ROC AUC)
  np.testing.assert_allclose(ev.target_auc(ge, [4]), [1 / 4])                    # ties as losses
  assert ev.auc([1, 0, 0, 0, 0], np.concatenate([[0.5], scores])) == pytest.approx(0.5)
  assert np.isnan(ev.target_auc([0], [0])[0]) and np.isnan(ev.auc([1, 1], [0.1, 0.2]))
  # The general AUC equals the mean of per-positive target AUCs (one count per positive).
  rng = np.random.default_rng(0)
  lab, sc = rng.random(300) < 0.3, rng.integers(0, 5, 300).astype(float)
  neg = sc[~lab]
  per = ev.target_auc([(neg >= p).sum() for p in sc[lab]], np.full(lab.sum(), len(neg)),
                      [(neg > p).sum() for p in sc[lab]])
  assert ev.auc(lab, sc) == pytest.approx(per.mean(), abs=1e-12)


def test_auc_refuses_non_finite_scores():
  # np.sort puts NaN last: a NaN positive would count above every negative (AUC 1).
  with pytest.raises(ValueError, match="scores hold 1 NaN or inf"):
    ev.auc([1, 0, 0], [np.nan, 0.1, 0.2])


@dataclasses.dataclass
class _EvalSet:
  user: np.ndarray
  history: np.ndarray
  history_len: np.ndarray
  exclude_indptr: np.ndarray
  exclude_indices: np.ndarray
  targets: np.ndarray


def _toy_eval_set(targets, excl):
  q = len(targets)
  indptr, indices = _csr(excl)
  return _EvalSet(np.arange(q, dtype=np.int32), np.zeros((q, 1), np.int32),
                  np.zeros(q, np.int32), indptr, indices, np.asarray(targets, np.int32))


def test_leave_one_out_evaluator_end_to_end():
  # 1-D scores: user u scores item i as u * i, so the ranking is by item id.
  items = np.arange(20, dtype=np.float32)[:, None]
  users = np.array([[1.0], [-1.0]], np.float32)
  # User 0 ranks 19, 18, ...; 19 and 18 are excluded -> target 15 has rank 2.
  # User 1 ranks 0, 1, ...; target 0 has rank 0.
  es = _toy_eval_set([[15], [0]], [[19, 18], [5]])
  evaluator = ev.EVALUATORS["leave_one_out"](es, ks=(1, 3))
  m = evaluator.evaluate(users, items)
  assert m == pytest.approx({"HR@1": 0.5, "HR@3": 1.0, "NDCG@1": 0.5,
                             "NDCG@3": (1 + 0.5) / 2, "MRR": (1 / 3 + 1) / 2})
  np.testing.assert_array_equal(evaluator.per_user(users, items)["rank"], [2, 0])
  with pytest.raises(ValueError, match="eval set has 2 queries"):
    evaluator.evaluate(users[:1], items)


def test_comirec_evaluator_end_to_end_multi_interest():
  items = np.arange(10, dtype=np.float32)[:, None]
  # Interest 0 prefers high ids, interest 1 low ids; merged by max |score|.
  users = np.array([[[1.0], [-0.5]]], np.float32)
  mask = np.array([[True, True]])
  # Scores: 9, 8, 7, ..., and 0 (item 0 from interest 1), item 1 -> max(1, -0.5)=1.
  # Item 9 is history -> top-3 = [8, 7, 6].
  es = _toy_eval_set([[7, 0, -1]], [[9]])
  evaluator = ev.get_evaluator("comirec", es, ks=(1, 3))
  per = evaluator.per_user(users, items, mask)
  np.testing.assert_array_equal(per["topk_ids"], [[8, 7, 6]])
  m = evaluator.evaluate(users, items, mask)
  # Truth {7, 0}: @1 no hit; @3 hit at position 1 -> recall 1/2,
  # NDCG = (1/log2 3) / (1 + 1/log2 3).
  assert m == pytest.approx({"Recall@1": 0.0, "HR@1": 0.0, "NDCG@1": 0.0, "Recall@3": 0.5,
                             "HR@3": 1.0, "NDCG@3": 0.6309297536 / 1.6309297536})
  with pytest.raises(ValueError, match="unknown evaluator"):
    ev.get_evaluator("sampled", es)


def test_interests_recovered_hand_example():
  # Two topics along the axes; items 0-1 are topic 0, items 2-3 topic 1.
  items = np.array([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]], np.float32)
  item_topic = np.array([0, 0, 1, 1])
  user_interests = np.array([[0, 1], [0, 1], [1, -1]])
  users = np.array([
      [[2.0, 0.0], [0.0, 3.0]],   # user 0: one capsule per topic -> recovered
      [[1.0, 1.0], [-1.0, -1.0]],  # user 1: capsule 0 is the best match of both topics -> not recovered
      [[0.0, 1.0], [5.0, 5.0]],   # user 2: one true topic, matched -> recovered
  ], np.float32)
  mask = np.array([[True, True], [True, True], [True, False]])
  got = ev.interests_recovered(users, mask, items, item_topic, user_interests, np.arange(3))
  assert got == pytest.approx(2 / 3)
  # A dead capsule cannot match: user 0 with only one live capsule has 2 topics > 1 live -> 1/3.
  mask[0, 1] = False
  assert ev.interests_recovered(users, mask, items, item_topic, user_interests, np.arange(3)) == pytest.approx(1 / 3)


def test_non_finite_vectors_are_refused_not_ranked_first():
  # A NaN user vector gives NaN scores, which compare false with every other score: counted as
  # "#{s_i >= s_target}", its target would get rank 0 and HR@1 = 1. It must raise, naming the split.
  items = np.arange(20, dtype=np.float32)[:, None]
  users = np.array([[1.0], [np.nan]], np.float32)
  es = _toy_eval_set([[15], [0]], [[19, 18], [5]])
  evaluator = ev.EVALUATORS["leave_one_out"](es, ks=(1, 3), split="valid")
  with pytest.raises(ValueError, match="valid split: user vectors hold 1 NaN or inf values \\(first in row 1\\)"):
    evaluator.evaluate(users, items)
  with pytest.raises(ValueError, match="user vectors hold 1 NaN"):
    ev.target_ranks(users, items, [15, 0])
  bad_items = items.copy()
  bad_items[3] = np.inf
  with pytest.raises(ValueError, match="test split: item vectors hold 1 NaN or inf values \\(first in row 3\\)"):
    ev.EVALUATORS["comirec"](es, ks=(3,), split="test").evaluate(np.ones((2, 1), np.float32), bad_items)
  # A dead interest never scores, so what it holds does not matter; a live one must be finite.
  multi = np.array([[[1.0], [np.nan]], [[-1.0], [2.0]]], np.float32)
  mask = np.array([[True, False], [True, True]])
  np.testing.assert_array_equal(ev.target_ranks(multi, items, [15, 0], query_mask=mask), [4, 19])
  with pytest.raises(ValueError, match="live interests"):
    ev.target_ranks(multi, items, [15, 0], query_mask=np.ones((2, 2), bool))


def test_overflowing_scores_of_finite_vectors_are_refused():
  # Finite but huge vectors (a diverging model): 3e38 * 3e38 overflows to inf (or NaN with the
  # -3e38 * 3e38 term, depending on the order of the sum), and an inf target score ranks first.
  big = np.float32(3e38)
  users = np.array([[big, big]], np.float32)
  items = np.array([[1.0, 0.0], [big, -big], [0.0, 1.0]], np.float32)
  with pytest.raises(ValueError, match="NaN or inf scores although their vectors are finite"):
    ev.target_ranks(users, items, [1])
  with pytest.raises(ValueError, match="top-k scores hold"):
    ev.exact_topk(users, items, 2)


def test_paired_bootstrap_hand_computed():
  # One pair, four users: A hits users 0, 2, 3, B hits user 2 only -> A - B = 0.5, 2 / 0 discordant.
  r = ev.paired_bootstrap([[1, 0, 1, 1]], [[0, 0, 1, 0]], resamples=20_000, seed=1)
  assert r["a"] == 0.75 and r["b"] == 0.25 and r["diff"] == 0.5
  np.testing.assert_array_equal(r["per_pair"], [0.5])
  np.testing.assert_array_equal(r["a_only"], [2])
  np.testing.assert_array_equal(r["b_only"], [0])
  # A resample is <= 0 only when it draws neither user 0 nor 3 (d = 1 there, 0 elsewhere): (1/2)^4.
  assert r["p_two_sided"] == pytest.approx(2 / 16, abs=0.01)
  assert r["ci95"][0] >= 0.0 and r["ci95"][1] == 1.0
  # Two pairs: the statistic is the mean of the pairs' differences.
  r2 = ev.paired_bootstrap([[1, 1, 0], [0, 0, 0]], [[0, 1, 0], [0, 1, 1]], resamples=10)
  np.testing.assert_allclose(r2["per_pair"], [1 / 3, -2 / 3])
  assert r2["diff"] == pytest.approx(-1 / 6)


def test_paired_bootstrap_identical_runs_and_standard_error():
  rng = np.random.default_rng(0)
  a = (rng.random((2, 3000)) < 0.2).astype(float)
  same = ev.paired_bootstrap(a, a, resamples=500)
  assert same["diff"] == 0.0 and same["ci95"] == (0.0, 0.0) and same["p_two_sided"] == 1.0
  assert same["a_only"].sum() == 0 and same["b_only"].sum() == 0
  b = (rng.random((2, 3000)) < 0.2).astype(float)
  r = ev.paired_bootstrap(a, b, resamples=4000)
  d = (a - b).mean(axis=0)
  assert r["std_err"] == pytest.approx(d.std() / np.sqrt(d.size), rel=0.08)  # the analytic standard error
  assert r["ci95"][0] < r["diff"] < r["ci95"][1]
  with pytest.raises(ValueError, match="same shape"):
    ev.paired_bootstrap(a, b[:, :10])
  with pytest.raises(ValueError, match="resamples"):
    ev.paired_bootstrap(a, b, resamples=0)
