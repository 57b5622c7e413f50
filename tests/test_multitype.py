"""Content types for MV-HAN: the MovieLens type split, single-type schedules, per-type negatives and
per-type evaluation (restricted ranking and AUC against hand-checked numbers and a brute force)."""

import dataclasses

import jax
import numpy as np
import pytest

from mvhan_jax import evaluation, losses
from mvhan_jax.data import movielens, multitype, protocol

# ---- MovieLens-100k content types ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k():
  try:
    return movielens.load_movielens_100k()
  except RuntimeError as e:  # no local copy and no network
    pytest.skip(f"MovieLens-100k unavailable: {e}")


@pytest.mark.parametrize("scheme, names, items, ratings", [
    ("genre_family", ("mainstream", "family", "niche"), (1410, 131, 141), (84818, 7855, 7327)),
    ("era", ("1970-96", "classic", "recent"), (1215, 179, 288), (72528, 11237, 16235)),
])
def test_movielens_schemes_give_the_documented_counts(ml100k, scheme, names, items, ratings):
  data, got_names = multitype.add_movielens_content_types(ml100k, scheme)
  assert got_names == names
  t = data.item_features["type"]
  assert t.dtype == np.int32 and t.shape == (1682,) and data.vocab["type"] == 4
  assert tuple(np.bincount(t, minlength=4)[1:]) == items
  assert tuple(np.bincount(t[data.item], minlength=4)[1:]) == ratings
  if scheme == "genre_family":  # the sparse side the scheme exists for: 5-15% per target type
    assert all(0.05 <= r / 1e5 <= 0.15 for r in ratings[1:])
  assert "type" not in ml100k.item_features  # the input is not modified
  with pytest.raises(ValueError, match="already has an item feature 'type'"):
    multitype.add_movielens_content_types(data, scheme)


def test_genre_family_rule_on_known_movies(ml100k):
  t = multitype.movielens_item_types(ml100k, "genre_family")
  by_title = dict(zip(ml100k.item_titles, t))
  assert by_title["Toy Story (1995)"] == 2         # Animation|Children's|Comedy
  assert by_title["Aladdin (1992)"] == 2           # Animation|Children's|Comedy|Musical: family wins
  assert by_title["Wizard of Oz, The (1939)"] == 2  # Adventure|Children's|Drama|Musical
  assert by_title["Unforgiven (1992)"] == 3        # Western
  assert by_title["Hoop Dreams (1994)"] == 3       # Documentary
  assert by_title["Star Wars (1977)"] == 1
  assert by_title["unknown"] == 1                  # no genre -> source
  # The documented leave-one-out targets per type (test, valid).
  split = protocol.leave_one_out(ml100k)
  for target, want in ((split.test_target, (811, 58, 74)), (split.valid_target, (835, 60, 48))):
    assert tuple(np.bincount(t[target[target >= 0]], minlength=4)[1:]) == want
  with pytest.raises(ValueError, match="'genre_family'"):
    multitype.add_movielens_content_types(ml100k, "decade")


# ---- Splitting examples and the alternating schedule ---------------------------------------------

ITEM_TYPE = np.array([1, 2, 1, 3, 1, 1, 2, 1, 3, 1], np.int32)  # 10 items, types interleaved


def _examples(n=120, seed=0):
  rng = np.random.default_rng(seed)
  target = rng.integers(0, len(ITEM_TYPE), n).astype(np.int32)
  # 'eid' is the example id, 'history' checks that fields stay aligned after the split.
  return {"eid": np.arange(n, dtype=np.int32), "target": target,
          "history": np.stack([np.arange(n), target], 1).astype(np.int32)}


def test_split_examples_by_type_partitions_by_target_type():
  ex = _examples()
  by_type = multitype.split_examples_by_type(ex, ITEM_TYPE)
  assert sorted(by_type) == [1, 2, 3]
  seen = []
  for t, src in by_type.items():
    a = src.arrays
    assert (ITEM_TYPE[a["target"]] == t).all()
    np.testing.assert_array_equal(a["history"], np.stack([a["eid"], a["target"]], 1))
    assert (np.diff(a["eid"]) > 0).all()  # original order kept
    seen.append(a["eid"])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), ex["eid"])


def test_schedule_gives_each_step_its_type_and_each_type_covers_its_examples_per_epoch():
  by_type = multitype.split_examples_by_type(_examples(), ITEM_TYPE)
  schedule = [1, 2, 1, 3]
  ds = multitype.typed_train_batches(by_type, batch_size=4, seed=5, schedule=schedule,
                                     shard_index=0, shard_count=1, type_key="batch_type")
  steps_of = {t: [] for t in (1, 2, 3)}
  for i in range(200):
    b = ds[i]
    t = schedule[i % 4]
    assert ds.type_of(i) == t
    assert (ITEM_TYPE[b["target"]] == t).all() and (b["batch_type"] == t).all()
    steps_of[t].append(b["eid"])
  for t, batches in steps_of.items():
    n = len(by_type[t])
    per_epoch = n // 4
    assert len(batches) >= 2 * per_epoch, (t, n)  # the test sees two full epochs of every type
    for e in range(2):
      ids = np.concatenate(batches[e * per_epoch:(e + 1) * per_epoch])
      # One epoch of type t = a permutation of its examples minus the dropped remainder.
      assert len(set(ids.tolist())) == per_epoch * 4
      assert set(ids.tolist()) <= set(by_type[t].arrays["eid"].tolist())
    # The stream is type t's own TrainBatches, read in order without skipping or repeating.
    stream = ds.streams[t]
    for j, b in enumerate(batches[:2 * per_epoch]):
      np.testing.assert_array_equal(b, stream[j]["eid"])
  # Source steps (two per cycle) advance their stream twice per cycle.
  assert ds.stream_step(4) == (1, 2) and ds.stream_step(6) == (1, 3) and ds.stream_step(7) == (3, 1)


def test_typed_batches_are_a_pure_function_of_seed_and_step():
  by_type = multitype.split_examples_by_type(_examples(), ITEM_TYPE)
  mk = lambda seed: multitype.typed_train_batches(by_type, 4, seed, [1, 2, 1, 3], 0, 1)
  a, b = mk(3), mk(3)
  later = {i: a[i]["eid"] for i in (57, 3, 101)}  # random access, any order (resume at step 57)
  for i in range(120):
    np.testing.assert_array_equal(a[i]["eid"], b[i]["eid"])
  for i, eid in later.items():
    np.testing.assert_array_equal(eid, b[i]["eid"])
  other = mk(4)
  assert any(not np.array_equal(a[i]["eid"], other[i]["eid"]) for i in range(8))
  # Types get independent orders: the same seed is not reused for every type's permutation.
  assert a.streams[1].seed != a.streams[2].seed
  # Shards split every global batch disjointly.
  s0 = multitype.typed_train_batches(by_type, 4, 3, [1, 2, 1, 3], 0, 2)
  s1 = multitype.typed_train_batches(by_type, 4, 3, [1, 2, 1, 3], 1, 2)
  for i in range(12):
    np.testing.assert_array_equal(np.sort(np.concatenate([s0[i]["eid"], s1[i]["eid"]])),
                                  np.sort(a[i]["eid"]))


def test_typed_batches_errors_name_the_fix():
  by_type = multitype.split_examples_by_type(_examples(), ITEM_TYPE)
  with pytest.raises(ValueError, match="types \\[4\\]"):
    multitype.typed_train_batches(by_type, 4, 0, [1, 4], 0, 1)
  with pytest.raises(ValueError, match="fewer than one batch"):
    multitype.typed_train_batches(by_type, 1000, 0, [1, 2], 0, 1)
  with pytest.raises(ValueError, match="types must be 1..T"):
    multitype.split_examples_by_type(_examples(), np.array([0, 1, 1, 2, 1, 1, 2, 1, 2, 1]))


# ---- Per-type negatives ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["uniform", "popularity", "log_uniform"])
def test_type_samplers_never_draw_another_type(name):
  counts = np.array([50, 0, 7, 3, 900, 1, 0, 20, 5, 2])
  samplers = multitype.type_samplers(counts, ITEM_TYPE, name, alpha=0.75)
  assert sorted(samplers) == [1, 2, 3]
  for t, s in samplers.items():
    members = ITEM_TYPE == t
    assert s.probs.shape == (10,)
    assert (s.probs[~members] == 0).all() and (s.probs[members] > 0).all()
    np.testing.assert_allclose(s.probs.sum(), 1.0, rtol=1e-6)
    # Within the type: the same distribution make_sampler gives on the type's items alone.
    np.testing.assert_allclose(s.probs[members], losses.make_sampler(name, counts[members]).probs, rtol=1e-6)
    draws = np.asarray(losses.sample_negatives(jax.random.key(t), s.cdf, 20000))
    assert (ITEM_TYPE[draws] == t).all()
    freq = np.bincount(draws, minlength=10) / len(draws)
    np.testing.assert_allclose(freq[members], s.probs[members], atol=0.015)


def test_type_sampler_type_at_catalogue_edges():
  # Type 2 owns the first and the last item: leading/trailing zero-probability runs in the CDF.
  item_type = np.array([2, 1, 1, 1, 2], np.int32)
  s = multitype.type_samplers(np.array([1, 5, 5, 5, 1]), item_type, "popularity")
  d1 = np.asarray(losses.sample_negatives(jax.random.key(0), s[1].cdf, 5000))
  d2 = np.asarray(losses.sample_negatives(jax.random.key(1), s[2].cdf, 5000))
  assert set(d1.tolist()) == {1, 2, 3} and set(d2.tolist()) == {0, 4}


# ---- Per-type evaluation --------------------------------------------------------------------------

# 6 items of 2 types, D = 1, so an item's score is its value times the user's sign.
TINY_ITEMS = np.array([[0.9], [0.5], [0.3], [0.7], [0.3], [0.1]], np.float32)
TINY_TYPE = np.array([1, 1, 1, 2, 2, 2], np.int32)


def _eval_set(targets, excluded):
  indptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])]).astype(np.int64)
  q = len(targets)
  return protocol.EvalSet(
      user=np.arange(q, dtype=np.int32), history=np.zeros((q, 1), np.int32),
      history_len=np.zeros((q,), np.int32), exclude_indptr=indptr,
      exclude_indices=np.concatenate([np.sort(e) for e in excluded] + [[]]).astype(np.int32),
      targets=np.asarray(targets, np.int32)[:, None])


# Row 0: target 4 (type 2, s=.3), history {1}. Type 2 candidates {3: .7, 5: .1}: rank 1, AUC 1/2.
#        All items: {0: .9, 2: .3 (tie), 3: .7, 5: .1}: rank 3 (pessimistic), AUC (1 + .5) / 4.
# Row 1: target 0 (type 1, s=.9), history {2, 3}. Type 1: {1}: rank 0, AUC 1. All: rank 0, AUC 1.
# Row 2: user -1, target 2 (type 1, s=-.3), no history. Type 1: {0: -.9, 1: -.5}: rank 0, AUC 1.
#        All: {4: -.3 (tie), 5: -.1} above of 5 candidates: rank 2, AUC (3 + .5) / 5.
# Row 3: target 5 (type 2, s=.1), history {4}. Type 2: {3}: rank 1, AUC 0. All: rank 4, AUC 0.
TINY_USERS = np.array([[1.0], [1.0], [-1.0], [1.0]], np.float32)
TINY_SET = _eval_set([4, 0, 2, 5], [[1], [2, 3], [], [4]])


def test_typed_evaluator_hand_checked_numbers():
  ev = multitype.TypedEvaluator(TINY_SET, TINY_TYPE, ks=(1, 3), type_names=("article", "novel"))
  per = ev.per_user(TINY_USERS, TINY_ITEMS)
  np.testing.assert_array_equal(per["type"], [2, 1, 1, 2])
  np.testing.assert_array_equal(per["typed_rank"], [1, 0, 0, 1])
  np.testing.assert_array_equal(per["rank"], [3, 0, 2, 4])
  np.testing.assert_array_equal(per["HR@3"], [0, 1, 1, 0])  # pooled, per user (mean: m["HR@3"] below)
  np.testing.assert_allclose(per["NDCG@3"], [0, 1, 0.5, 0])
  np.testing.assert_allclose(per["RR"], [1 / 4, 1, 1 / 3, 1 / 5])
  np.testing.assert_allclose(per["typed_auc"], [0.5, 1.0, 1.0, 0.0])
  np.testing.assert_allclose(per["auc"], [1.5 / 4, 1.0, 3.5 / 5, 0.0])
  m = ev.evaluate(TINY_USERS, TINY_ITEMS)
  assert m["novel/queries"] == 2 and m["article/queries"] == 2
  assert m["novel/HR@1"] == 0.0 and m["novel/HR@3"] == 1.0      # restricted: rank 1 of 2 others
  assert m["novel/pooled_HR@3"] == 0.0                            # among all items: ranks 3 and 4
  np.testing.assert_allclose(m["novel/AUC"], 0.25)
  np.testing.assert_allclose(m["novel/NDCG@3"], 1 / np.log2(3))
  np.testing.assert_allclose(m["novel/MRR"], 0.5)
  assert m["article/HR@1"] == 1.0 and m["article/pooled_HR@1"] == 0.5
  np.testing.assert_allclose(m["article/AUC"], 1.0)
  assert m["HR@1"] == 0.25 and m["HR@3"] == 0.5
  np.testing.assert_allclose(m["AUC"], np.mean([1.5 / 4, 1.0, 3.5 / 5, 0.0]))
  # Pessimistic ties: AUC = 1 - rank / n. Only the tied rows change.
  pess = multitype.TypedEvaluator(TINY_SET, TINY_TYPE, ks=(1, 3), auc_ties="pessimistic")
  np.testing.assert_allclose(pess.per_user(TINY_USERS, TINY_ITEMS)["auc"], [1 / 4, 1.0, 3 / 5, 0.0])


def test_constant_scorer_gets_auc_one_half_and_the_worst_rank():
  ev = multitype.TypedEvaluator(TINY_SET, TINY_TYPE, ks=(1,))
  per = ev.per_user(np.ones((4, 1), np.float32), np.ones((6, 1), np.float32))
  np.testing.assert_allclose(per["typed_auc"], 0.5)
  np.testing.assert_allclose(per["auc"], 0.5)
  np.testing.assert_array_equal(per["typed_rank"], [2, 1, 2, 1])  # every other candidate above


def _brute_force(users, items, item_type, es, restrict):
  """NumPy reference: per row, (pessimistic rank, ties-half AUC) over the candidate set."""
  ranks, aucs = [], []
  scores = users @ items.T
  for q in range(len(users)):
    tgt = es.targets[q, 0]
    cand = np.ones(len(items), bool)
    cand[es.excluded(q)] = False
    cand[tgt] = False
    if restrict:
      cand &= item_type == item_type[tgt]
    s, st = scores[q, cand], scores[q, tgt]
    ranks.append(int((s >= st).sum()))
    aucs.append(((s < st).sum() + 0.5 * (s == st).sum()) / cand.sum())
  return np.array(ranks), np.array(aucs)


def test_typed_evaluator_matches_numpy_brute_force_with_ties():
  rng = np.random.default_rng(0)
  n_items, n_users = 40, 25
  item_type = rng.integers(1, 4, n_items).astype(np.int32)
  item_type[:3] = [1, 2, 3]
  # Small integer vectors make exact score ties common.
  items = rng.integers(-2, 3, (n_items, 3)).astype(np.float32)
  users = rng.integers(-2, 3, (n_users, 3)).astype(np.float32)
  targets = rng.integers(0, n_items, n_users)
  excluded = [np.setdiff1d(rng.choice(n_items, rng.integers(0, 8), replace=False), [t]) for t in targets]
  es = _eval_set(targets, excluded)
  ev = multitype.TypedEvaluator(es, item_type, ks=(5,), item_chunk=16, query_chunk=8)
  per = ev.per_user(users, items)
  ref_rank, ref_auc = _brute_force(users, items, item_type, es, restrict=False)
  ref_trank, ref_tauc = _brute_force(users, items, item_type, es, restrict=True)
  assert (ref_tauc != np.round(ref_tauc)).any()  # ties do occur, so 'half' is exercised
  np.testing.assert_array_equal(per["rank"], ref_rank)
  np.testing.assert_array_equal(per["typed_rank"], ref_trank)
  np.testing.assert_allclose(per["auc"], ref_auc)
  np.testing.assert_allclose(per["typed_auc"], ref_tauc)
  # typed_eval_sets(restrict=True) + the plain leave-one-out evaluator give the same ranks.
  sets = multitype.typed_eval_sets(es, item_type, restrict=True)
  for t, sub in sets.items():
    rows = np.flatnonzero(item_type[targets] == t)
    np.testing.assert_array_equal(sub.user, es.user[rows])
    r = evaluation.LeaveOneOutEvaluator(sub, ks=(5,)).per_user(users[rows], items)["rank"]
    np.testing.assert_array_equal(r, ref_trank[rows])


def test_typed_eval_sets_keep_rows_by_target_type():
  sets = multitype.typed_eval_sets(TINY_SET, TINY_TYPE)
  np.testing.assert_array_equal(sets[1].targets[:, 0], [0, 2])
  np.testing.assert_array_equal(sets[2].targets[:, 0], [4, 5])
  assert [sets[1].excluded(q).tolist() for q in range(2)] == [[2, 3], []]
  assert [sets[2].excluded(q).tolist() for q in range(2)] == [[1], [4]]
  restricted = multitype.typed_eval_sets(TINY_SET, TINY_TYPE, restrict=True)
  assert [restricted[2].excluded(q).tolist() for q in range(2)] == [[0, 1, 2], [0, 1, 2, 4]]
  multi = dataclasses.replace(TINY_SET, targets=np.array([[4, 1], [0, -1], [2, -1], [5, -1]], np.int32))
  with pytest.raises(ValueError, match="leave-one-out"):
    multitype.typed_eval_sets(multi, TINY_TYPE)
