"""Retrieve then rank: a trained retrieval model's exact top-N, re-ranked by a multi-scenario ranker.

Stage 1: the retrieval workdir's best parameters encode the leave-one-out test users and every
item; `evaluation.exact_topk` returns the top ``num_candidates`` unseen items (the user's history is
excluded, the target never, as in the retrieval evaluation). Stage 2: the ranking model scores each
(user, candidate) impression in the user's scenario with the same test history, and the candidates
are re-ordered by pCTR (or pCTCVR). A target outside the candidates is a miss for both.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mvhan_jax import evaluation
from mvhan_jax.tasks import retrieval as retrieval_task
from mvhan_jax.ranking import candidates as retrieval_candidates
from mvhan_jax.ranking import data as ranking_data
from mvhan_jax.tasks import ranking as ranking_task


def retrieve(retrieval_config, retrieval_workdir: str, num_candidates: int = 100, split: str = "test"):
  """-> (retrieval experiment, the split's EvalSet, candidate ids int32 [Q, N] in retrieval order)."""
  exp, params, items = retrieval_candidates.load_retrieval(retrieval_config, retrieval_workdir)
  queries = exp.eval_sets[split]
  users, mask = retrieval_task.encode_users(exp, params, queries)
  _, ids = evaluation.exact_topk(users, items, num_candidates, query_mask=mask,
                                 exclude_indptr=queries.exclude_indptr, exclude_indices=queries.exclude_indices)
  return exp, queries, np.asarray(ids)


def target_positions(candidates: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based position of each row's target in its candidate list, N (= a miss) when absent."""
  hit = candidates == targets[:, None]
  return np.where(hit.any(1), hit.argmax(1), candidates.shape[1])


def rank_candidates(rank_exp: ranking_task.RankingExperiment, params, users, history, history_len,
                    candidates: np.ndarray, scenario_of_user: np.ndarray) -> dict[str, np.ndarray]:
  """Probabilities [Q, N] ('ctr', 'ctcvr') of every (user, candidate) impression."""
  q, n = candidates.shape
  valid = candidates >= 0
  split = {"user": np.repeat(users, n), "item": np.where(valid, candidates, 0).reshape(-1),
           "scenario": np.repeat(scenario_of_user[users], n),
           "history": np.repeat(history, n, axis=0), "history_len": np.repeat(history_len, n)}
  preds = ranking_task.predict_split(rank_exp, params, split)
  return {k: np.where(valid, preds[k].reshape(q, n), -np.inf) for k in ("ctr", "ctcvr")}


def candidate_auc(positions: np.ndarray, num_candidates: int) -> float:
  """Mean over users of the AUC of the target against the other candidates (one positive, N - 1
  negatives: (N - 1 - position) / (N - 1)), for users whose target is among the candidates."""
  if not len(positions):
    return float("nan")
  return float(np.mean(evaluation.target_auc(positions, num_candidates - 1)))


def rerank(candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Candidates re-ordered by descending score (ties keep the retrieval order)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  return np.take_along_axis(candidates, order, axis=1)


def retrieve_then_rank(retrieval_config, retrieval_workdir: str, rankers: Mapping[str, tuple[Any, str]],
                       num_candidates: int = 100, ks=(10,)) -> dict[str, Any]:
  """Metrics of retrieval alone and retrieval + each ranker on the leave-one-out test users.

  ``rankers``: row label -> (ranking config, trained ranking workdir). Every workdir must hold a
  trained model (see `experiments/retrieve_then_rank.py`, which trains missing ones); rankers must
  be trained on MovieLens-100k with the same leave-one-out split. Rows: 'Retrieval only',
  'Retrieval + popularity' (candidates re-ordered by training popularity, a reference) and
  '<label> (pCTR)' / '<label> (pCTCVR)' per ranker.
  """
  if retrieval_config.dataset.name != "movielens_100k" or any(
      c.dataset.name != "movielens_100k" for c, _ in rankers.values()):
    raise ValueError("retrieve-then-rank is wired for MovieLens-100k: set config.dataset.name='movielens_100k' "
                     "in both the retrieval and the ranking config")
  if retrieval_config.protocol != "leave_one_out":
    raise ValueError(f"retrieval config.protocol={retrieval_config.protocol!r}: use 'leave_one_out'")
  exp, test, candidates = retrieve(retrieval_config, retrieval_workdir, num_candidates)
  scenario_of_user = ranking_data.movielens_scenarios(exp.data.user_features["occupation"])
  targets = test.targets[:, 0]
  rows = {"Retrieval only": target_positions(candidates, targets)}
  # A reference re-ranker: training popularity alone (how much of a ranker's order is popularity).
  popularity = np.bincount(np.concatenate(exp.split.train_sequences), minlength=exp.data.num_items).astype(np.float64)
  pop_scores = np.where(candidates >= 0, popularity[np.maximum(candidates, 0)], -np.inf)
  rows["Retrieval + popularity"] = target_positions(rerank(candidates, pop_scores), targets)
  for label, (ranking_config, ranking_workdir) in rankers.items():
    rank_exp = ranking_task.build_ranking_experiment(ranking_config)
    params, _ = ranking_task.restore_params(ranking_workdir, rank_exp)
    # The ranker's own test history (its maxlen), from the same leave-one-out split.
    rank_test = exp.split.eval_set("test", ranking_config.maxlen)
    if not np.array_equal(rank_test.user, test.user):
      raise ValueError("the retrieval and ranking test users differ: use the same dataset and protocol")
    probs = rank_candidates(rank_exp, params, rank_test.user, rank_test.history, rank_test.history_len,
                            candidates, scenario_of_user)
    for task, name in (("ctr", "pCTR"), ("ctcvr", "pCTCVR")):
      rows[f"{label} ({name})"] = target_positions(rerank(candidates, probs[task]), targets)
  out = {}
  scen = scenario_of_user[test.user]
  found = rows["Retrieval only"] < num_candidates
  for name, pos in rows.items():
    m = evaluation.leave_one_out_metrics(pos, ks)
    m[f"Recall@{num_candidates}"] = float(np.mean(pos < num_candidates))
    m["candidate AUC"] = candidate_auc(pos[found], num_candidates)
    for s, sname in enumerate(ranking_data.ML_SCENARIOS):
      sel = scen == s
      m[f"HR@{ks[0]} {sname[0]}"] = float(np.mean(pos[sel] < ks[0])) if sel.any() else float("nan")
    out[name] = m
  return out


# --------------------------------------------------------------------------------------------------
# Candidate lists for the listwise re-ranker (mvhan_jax/ranking/listwise.py)
# --------------------------------------------------------------------------------------------------
def training_queries(split, maxlen: int, max_queries: int = 0, min_history: int = 1, seed: int = 0):
  """Training queries as an `protocol.EvalSet`: (prefix of a training sequence -> its next item),
  `protocol.training_examples` of ``split.train_sequences``, uniformly subsampled to ``max_queries``
  (0: all; fixed ``seed``). Exclusions = the user's whole training sequence minus the target, as at
  evaluation (the user's later items are neither candidates nor negatives)."""
  from mvhan_jax.data import protocol  # pylint: disable=import-outside-toplevel
  ex = protocol.training_examples(split.train_sequences, maxlen, min_history)
  rows = np.arange(len(ex["target"]))
  if 0 < max_queries < len(rows):
    rows = np.sort(np.random.default_rng(seed).choice(rows, max_queries, replace=False))
  users, targets = ex["user"][rows], ex["target"][rows]
  excl = [np.setdiff1d(split.train_sequences[u], [t]).astype(np.int32) for u, t in zip(users, targets)]
  indptr = np.concatenate([[0], np.cumsum([len(e) for e in excl])]).astype(np.int64)
  return protocol.EvalSet(user=users.astype(np.int32), history=ex["history"][rows],
                          history_len=ex["history_len"][rows], exclude_indptr=indptr,
                          exclude_indices=np.concatenate(excl) if excl else np.zeros((0,), np.int32),
                          targets=targets[:, None].astype(np.int32))


def retrieved_lists(exp, params, items: np.ndarray, queries, num_candidates: int = 100,
                    add_missing: bool = False) -> dict[str, np.ndarray]:
  """The retriever's exact top-``num_candidates`` of each query with its scores.

  Returns 'candidates' int32 [Q, N'] (-1 = empty), 'scores' float32 [Q, N'] (u . v), 'ranks' [Q, N']
  (0-based retrieval rank; N for an appended positive) and 'label' int [Q] (slot of the target, N if
  missed). ``add_missing`` (training only): N' = N + 1, the last slot holding the target where the
  retriever missed it (its own score u . v), else empty.
  """
  users, mask = retrieval_task.encode_users(exp, params, queries)
  if mask is not None:
    raise ValueError("the listwise re-ranker reads one retrieval vector per user: use a single-vector retriever")
  scores, ids = evaluation.exact_topk(users, items, num_candidates, exclude_indptr=queries.exclude_indptr,
                                      exclude_indices=queries.exclude_indices)
  targets = queries.targets[:, 0]
  label = target_positions(ids, targets)
  ranks = np.broadcast_to(np.arange(num_candidates), ids.shape)
  if add_missing:
    missed = label == num_candidates
    tscore = np.einsum("qd,qd->q", users, items[targets]).astype(np.float32)
    ids = np.concatenate([ids, np.where(missed, targets, -1)[:, None].astype(np.int32)], 1)
    scores = np.concatenate([scores, np.where(missed, tscore, -np.inf)[:, None]], 1)
    ranks = np.concatenate([ranks, np.full((len(ids), 1), num_candidates)], 1)
  return {"candidates": ids, "scores": scores, "ranks": np.asarray(ranks), "label": label}
