"""A trained retrieval model's candidates: the retrieval side of the ranking stack.

`ranking.data` never imports this module (data modules import no trainer): whoever loads ranking
data with ``config.dataset.negatives='retrieval'`` computes the pool here (`negative_pool`) and passes
it to `ranking.data.load_ranking_data`. `ranking.rerank` loads its retrieval model here too.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from mvhan_jax import evaluation
from mvhan_jax.tasks import retrieval as retrieval_train
from mvhan_jax.configs import load_config
from mvhan_jax.data import protocol
from mvhan_jax.ranking.data import NEGATIVES

# (users int [N], history int [N, maxlen], history_len int [N]) -> candidate items int32 [N, P], -1 padded.
NegativePool = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def load_retrieval(retrieval_config, retrieval_workdir: str):
  """-> (retrieval experiment, best-checkpoint parameters, item vectors)."""
  exp = retrieval_train.build_experiment(retrieval_config)
  params, _ = retrieval_train.restore_params(retrieval_workdir, exp, "best")
  return exp, params, retrieval_train.encode_items(exp, params)


def candidate_pool(retrieval_config, retrieval_workdir: str, size: int = 100) -> NegativePool:
  """A function ``pool(users, history, history_len) -> int32 [N, size]``: for each impression (user,
  left-aligned history of the retrieval config's maxlen), the retrieval model's top-``size`` items
  outside the user's training sequence.

  Each impression gets the candidates of its own time point (its history), i.e. the hard negatives a
  re-ranker meets when serving that request. One pool per user (say from the latest history) would
  pair early training positives with candidates of the end of the training period, a time mismatch
  the ranker learns instead of the user's taste (an earlier version did that and was no better).
  `ranking.data.movielens_ranking` further drops what the user had rated by then (training) or ever
  (evaluation).
  """
  exp, params, items = load_retrieval(retrieval_config, retrieval_workdir)
  train_items = [np.unique(s).astype(np.int32) for s in exp.split.train_sequences]
  maxlen = retrieval_config.maxlen

  def pool(users: np.ndarray, history: np.ndarray, history_len: np.ndarray) -> np.ndarray:
    if history.shape[1] != maxlen:
      raise ValueError(f"the ranking config.maxlen={history.shape[1]} must equal the retrieval config.maxlen="
                       f"{maxlen} to reuse its histories: set them equal")
    excl = [train_items[u] for u in users]
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excl])]).astype(np.int64)
    queries = protocol.EvalSet(user=np.asarray(users, np.int32), history=history, history_len=history_len,
                               exclude_indptr=indptr, exclude_indices=np.concatenate(excl),
                               targets=np.full((len(users), 1), -1, np.int32))
    vecs, mask = retrieval_train.encode_users(exp, params, queries)
    _, ids = evaluation.exact_topk(vecs, items, size, query_mask=mask, exclude_indptr=indptr,
                                   exclude_indices=queries.exclude_indices)
    return np.asarray(ids, np.int32)

  return pool


def negative_pool(config) -> NegativePool | None:
  """The pool ``config.dataset.negatives`` asks for: None for 'popularity' (or a dataset without the
  option), `candidate_pool` of ``config.dataset.retrieval_config`` / ``retrieval_workdir`` for
  'retrieval'. Pass it to `ranking.data.load_ranking_data`."""
  d = config.dataset
  negatives = d.get("negatives", "popularity")
  if negatives not in NEGATIVES:
    raise ValueError(f"config.dataset.negatives={negatives!r} is unknown: use 'popularity' or 'retrieval'")
  if negatives == "popularity":
    return None
  if not os.path.isdir(os.path.join(d.retrieval_workdir, "best")):
    raise FileNotFoundError(
        f"config.dataset.retrieval_workdir={d.retrieval_workdir!r} holds no trained retrieval model: train "
        f"it first (mvhan-train --config={d.retrieval_config} --workdir={d.retrieval_workdir})")
  return candidate_pool(load_config(d.retrieval_config), d.retrieval_workdir, d.pool_size)
