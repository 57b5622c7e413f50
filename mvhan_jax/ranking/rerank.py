"""Retrieve then rank: a trained retrieval model's exact top-N, re-ranked by a multi-scenario ranker.

Stage 1: the retrieval workdir's best parameters encode the leave-one-out test users and every
item; `evaluation.exact_topk` returns the top ``num_candidates`` unseen items (the user's history is
excluded, the target never, as in the retrieval evaluation). Stage 2: the ranking model scores each
(user, candidate) impression in the user's scenario with the same test history, and the candidates
are re-ordered by pCTR (or pCTCVR). A target outside the candidates is a miss for both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mvhan_jax import evaluation
from mvhan_jax import train as retrieval_train
from mvhan_jax.ranking import data as ranking_data
from mvhan_jax.ranking import train as ranking_train


def retrieve(retrieval_config, retrieval_workdir: str, num_candidates: int = 100):
  """-> (retrieval experiment, test EvalSet, candidate ids int32 [Q, N] in retrieval order)."""
  exp = retrieval_train.build_experiment(retrieval_config)
  params, _ = retrieval_train.restore_params(retrieval_workdir, exp, "best")
  test = exp.eval_sets["test"]
  users, mask = retrieval_train.encode_users(exp, params, test)
  items = retrieval_train.encode_items(exp, params)
  _, ids = evaluation.exact_topk(users, items, num_candidates, query_mask=mask,
                                 exclude_indptr=test.exclude_indptr, exclude_indices=test.exclude_indices)
  return exp, test, ids


def target_positions(candidates: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based position of each row's target in its candidate list, N (= a miss) when absent."""
  hit = candidates == targets[:, None]
  return np.where(hit.any(1), hit.argmax(1), candidates.shape[1])


def rank_candidates(rank_exp: ranking_train.RankingExperiment, params, users, history, history_len,
                    candidates: np.ndarray, scenario_of_user: np.ndarray) -> dict[str, np.ndarray]:
  """Probabilities [Q, N] ('ctr', 'ctcvr') of every (user, candidate) impression."""
  q, n = candidates.shape
  valid = candidates >= 0
  split = {"user": np.repeat(users, n), "item": np.where(valid, candidates, 0).reshape(-1),
           "scenario": np.repeat(scenario_of_user[users], n),
           "history": np.repeat(history, n, axis=0), "history_len": np.repeat(history_len, n)}
  preds = ranking_train.predict_split(rank_exp, params, split)
  return {k: np.where(valid, preds[k].reshape(q, n), -np.inf) for k in ("ctr", "ctcvr")}


def rerank(candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Candidates re-ordered by descending score (ties keep the retrieval order)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  return np.take_along_axis(candidates, order, axis=1)


def retrieve_then_rank(retrieval_config, retrieval_workdir: str, ranking_config, ranking_workdir: str,
                       num_candidates: int = 100, ks=(10,)) -> dict[str, Any]:
  """Metrics of retrieval alone and retrieval + ranking on the leave-one-out test users.

  Both workdirs must hold trained models (see `experiments/retrieve_then_rank.py`, which trains
  missing ones). The ranker must be trained on MovieLens-100k with the same leave-one-out split.
  """
  if ranking_config.dataset.name != "movielens_100k" or retrieval_config.dataset.name != "movielens_100k":
    raise ValueError("retrieve-then-rank is wired for MovieLens-100k: set config.dataset.name='movielens_100k' "
                     "in both the retrieval and the ranking config")
  if retrieval_config.protocol != "leave_one_out":
    raise ValueError(f"retrieval config.protocol={retrieval_config.protocol!r}: use 'leave_one_out'")
  exp, test, candidates = retrieve(retrieval_config, retrieval_workdir, num_candidates)
  rank_exp = ranking_train.build_ranking_experiment(ranking_config)
  params, _ = ranking_train.restore_params(ranking_workdir, rank_exp, "best")
  # The ranker's own test history (its maxlen), from the same leave-one-out split.
  rank_test = exp.split.eval_set("test", ranking_config.maxlen)
  if not np.array_equal(rank_test.user, test.user):
    raise ValueError("the retrieval and ranking test users differ: use the same dataset and protocol")
  scenario_of_user = ranking_data.movielens_scenarios(exp.data.user_features["occupation"])
  probs = rank_candidates(rank_exp, params, rank_test.user, rank_test.history, rank_test.history_len,
                          candidates, scenario_of_user)
  targets = test.targets[:, 0]
  rows = {"Retrieval only": target_positions(candidates, targets)}
  for task, label in (("ctr", "pCTR"), ("ctcvr", "pCTCVR")):
    rows[f"Retrieval + HiNet ({label})"] = target_positions(rerank(candidates, probs[task]), targets)
  out = {}
  scen = scenario_of_user[test.user]
  for name, pos in rows.items():
    m = evaluation.leave_one_out_metrics(pos, ks)
    m[f"Recall@{num_candidates}"] = float(np.mean(pos < num_candidates))
    for s, sname in enumerate(ranking_data.ML_SCENARIOS):
      sel = scen == s
      m[f"HR@{ks[0]} {sname[0]}"] = float(np.mean(pos[sel] < ks[0])) if sel.any() else float("nan")
    out[name] = m
  return out
