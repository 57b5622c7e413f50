"""SEMINAR's data: per-user lifelong (query, item) event sequences, item modality vectors, the
chronological leave-one-out split, training windows and evaluation queries.

Layout (E events in all, U users, Q = max query length, N items):
  ``item`` int32 [E], ``query`` int32 [E, Q] (keyword ids, 0 = padding; an all-zero row is a browsing
  event), user u's events at ``[offsets[u], offsets[u + 1])`` in time order (ties by item id).
  ``item_vectors``: one float32 [N, F_m] array per non-id modality, in ``modality_names[1:]`` order
  (the id modality is a learned table).
Histories are left-aligned windows of the events before a target (newest at ``history_len - 1``),
padded with item 0 / keyword 0 and masked by ``history_len`` (item 0 is a real item).

Split (as `mvhan_jax.data.protocol.leave_one_out`): a user with n >= 3 events has the event n - 1
as the test target, n - 2 as the validation target, events [0, n - 2) for training; users with fewer
events only train. Validation histories are the training events; test histories add the validation
event. Training targets and PSU windows never reach past a user's training events.

Datasets:
- ``synthetic``: `mvhan_jax.data.synthetic_gen`'s world; every exposure event is an event (search
  events carry their query, browsing events none; ``dataset.clicks_only`` keeps clicked events
  only). Modalities id, text, image: the world's two rotated noisy views of the item latent vector.
- ``movielens_100k`` / ``movielens_1m``: ratings in (timestamp, item id) order; no queries (Q = 1,
  all padding).
  Modalities id, text, genre: text = mean over the title's words (year removed) of a fixed Gaussian
  random vector per hashed word (crc32 mod ``dataset.text_buckets``, width ``dataset.text_dim``; a
  fixed random projection of the hashed bag of words, no learned text encoder); genre = the 18-dim
  multi-hot genre vector, used in the slot the synthetic world's image view takes.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Mapping

import numpy as np

from mvhan_jax import features
from mvhan_jax.data import protocol
from mvhan_jax.data.types import InteractionData

SPLITS = ("valid", "test")
NUM_SAMPLED_NEGATIVES = 99


@dataclasses.dataclass(frozen=True)
class EvalQueries:
  """One evaluation split, one row per evaluated user.

  ``user`` int32 [Qe]; ``end`` int64 [Qe]: flat index of the target event (the history is the
  events before it); ``target`` int32 [Qe]; ``exclude_indptr`` / ``exclude_indices``: CSR of the
  items excluded from the full ranking (the user's whole history minus the target);
  ``sampled`` int32 [Qe, 100]: the target in column 0 then 99 uniform items the user never
  interacted with (the paper's sampled protocol; fixed by ``dataset.data_seed``).
  """

  user: np.ndarray
  end: np.ndarray
  target: np.ndarray
  exclude_indptr: np.ndarray
  exclude_indices: np.ndarray
  sampled: np.ndarray

  def __len__(self) -> int:
    return len(self.user)


@dataclasses.dataclass(frozen=True)
class SeminarData:
  name: str
  num_items: int
  num_keywords: int
  modality_names: tuple[str, ...]
  item_vectors: Mapping[str, np.ndarray]
  offsets: np.ndarray
  item: np.ndarray
  query: np.ndarray
  eval_queries: Mapping[str, EvalQueries]

  @property
  def num_users(self) -> int:
    return len(self.offsets) - 1

  @property
  def max_query_len(self) -> int:
    return int(self.query.shape[1])

  def train_end(self) -> np.ndarray:
    """int64 [U]: flat index one past each user's last training event."""
    n = np.diff(self.offsets)
    return self.offsets[1:] - np.where(n >= 3, 2, 0)

  @functools.cached_property
  def spec(self) -> features.DataSpec:
    """What SEMINAR's modules are built from (`mvhan_jax.features.DataSpec`): no user features, the
    item vectors as dense item features, the keyword vocabulary and the modality names."""
    return features.data_spec(self.name, self.num_users, self.num_items, {}, self.item_vectors, {},
                              num_keywords=int(self.num_keywords), modality_names=tuple(self.modality_names))

  def tables(self) -> dict[str, np.ndarray]:
    """The item modality vectors, passed to the model as ``tables`` (never baked into the HLO)."""
    return {k: np.asarray(v, np.float32) for k, v in self.item_vectors.items()}

  def summary(self) -> dict:
    n = np.diff(self.offsets)
    return {"name": self.name, "users": self.num_users, "items": self.num_items, "events": int(n.sum()),
            "events_per_user_min": int(n.min()), "events_per_user_max": int(n.max()),
            "search_fraction": float((self.query > 0).any(1).mean()),
            "eval_users": len(self.eval_queries["test"]), "modalities": list(self.modality_names)}


def windows(item: np.ndarray, query: np.ndarray, start: np.ndarray, end: np.ndarray, maxlen: int) -> dict:
  """Left-aligned windows of the (at most ``maxlen``) events in ``[start, end)``, per row.

  Returns ``history_item`` int32 [B, maxlen], ``history_query`` int32 [B, maxlen, Q],
  ``history_len`` int32 [B].
  """
  start, end = np.asarray(start, np.int64), np.asarray(end, np.int64)
  hlen = np.minimum(end - start, maxlen)
  idx = (end - hlen)[:, None] + np.arange(maxlen)[None, :]
  valid = np.arange(maxlen)[None, :] < hlen[:, None]
  idx = np.where(valid, idx, 0)
  return {"history_item": np.where(valid, item[idx], 0).astype(np.int32),
          "history_query": np.where(valid[..., None], query[idx], 0).astype(np.int32),
          "history_len": hlen.astype(np.int32)}


class WindowSource:
  """Random-access training examples for `mvhan_jax.data.pipeline.train_batches`.

  Example i: the window of events before ``end[i]`` (within the user's events from ``start[i]``)
  and ``target`` = the item of event ``end[i]`` (PSU windows ignore it). Built on the fly with one
  vectorised gather per batch (an [examples, maxlen] history matrix would not fit at maxlen 1,024).
  """

  def __init__(self, data: SeminarData, user: np.ndarray, end: np.ndarray, maxlen: int):
    self.data, self.maxlen = data, maxlen
    self.user = np.asarray(user, np.int32)
    self.end = np.asarray(end, np.int64)
    self.start = data.offsets[self.user]

  def __len__(self) -> int:
    return len(self.end)

  def take(self, indices) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    end = self.end[indices]
    out = windows(self.data.item, self.data.query, self.start[indices], end, self.maxlen)
    out["target"] = self.data.item[np.minimum(end, len(self.data.item) - 1)].astype(np.int32)
    out["user"] = self.user[indices]
    return out

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.take(np.array([i])).items()}


def _sample_positions(rng, lo: int, hi: int, count: int) -> np.ndarray:
  if hi <= lo:
    return np.zeros((0,), np.int64)
  if count <= 0 or hi - lo <= count:
    return np.arange(lo, hi, dtype=np.int64)
  return np.sort(rng.choice(np.arange(lo, hi, dtype=np.int64), count, replace=False))


def finetune_source(data: SeminarData, maxlen: int, targets_per_user: int, min_history: int,
                    seed: int) -> WindowSource:
  """Next-item examples: per user, ``targets_per_user`` training events (all if <= 0) with at
  least ``min_history`` events before them, drawn once from ``seed``."""
  rng = np.random.default_rng([seed, 11])
  te = data.train_end()
  users, ends = [], []
  for u in range(data.num_users):
    e = _sample_positions(rng, int(data.offsets[u]) + min_history, int(te[u]), targets_per_user)
    users.append(np.full(len(e), u, np.int32))
    ends.append(e)
  return WindowSource(data, np.concatenate(users), np.concatenate(ends), maxlen)


def psu_source(data: SeminarData, window: int, windows_per_user: int, seed: int) -> WindowSource:
  """PSU pretraining windows: per user, ``windows_per_user`` windows of up to ``window`` training
  events (at least 2), drawn once from ``seed``."""
  rng = np.random.default_rng([seed, 12])
  te = data.train_end()
  users, ends = [], []
  for u in range(data.num_users):
    e = _sample_positions(rng, int(data.offsets[u]) + 2, int(te[u]) + 1, windows_per_user)
    users.append(np.full(len(e), u, np.int32))
    ends.append(e)
  return WindowSource(data, np.concatenate(users), np.concatenate(ends), window)


def _eval_queries(offsets, item, num_items, split: str, seed: int) -> EvalQueries:
  n = np.diff(offsets)
  users = np.flatnonzero(n >= 3).astype(np.int32)
  end = offsets[1:][users] - (2 if split == "valid" else 1)
  target = item[end].astype(np.int32)
  rng = np.random.default_rng([seed, 13 if split == "valid" else 14])
  excl, indptr, sampled = [], [0], np.zeros((len(users), NUM_SAMPLED_NEGATIVES + 1), np.int32)
  for q, u in enumerate(users):
    hist = item[offsets[u]:end[q]]
    e = np.setdiff1d(hist, target[q:q + 1]).astype(np.int32)
    excl.append(e)
    indptr.append(indptr[-1] + len(e))
    seen = np.zeros(num_items, bool)
    seen[item[offsets[u]:offsets[u + 1]]] = True
    pool = np.flatnonzero(~seen)
    if len(pool) == 0:
      raise ValueError(f"user {u} interacted with every item: no sampled negatives can be drawn")
    sampled[q, 0] = target[q]
    sampled[q, 1:] = rng.choice(pool, NUM_SAMPLED_NEGATIVES, replace=len(pool) < NUM_SAMPLED_NEGATIVES)
  return EvalQueries(users, end.astype(np.int64), target, np.asarray(indptr, np.int64),
                     np.concatenate(excl) if excl else np.zeros((0,), np.int32), sampled)


def _assemble(name, num_items, num_keywords, modality_names, item_vectors, user, item, timestamp,
              query, num_users, seed) -> SeminarData:
  order = np.lexsort((item, timestamp, user))  # protocol.user_sequences' order
  user, item, query = user[order], item[order].astype(np.int32), query[order].astype(np.int32)
  offsets = np.searchsorted(user, np.arange(num_users + 1)).astype(np.int64)
  evals = {s: _eval_queries(offsets, item, num_items, s, seed) for s in SPLITS}
  return SeminarData(name, num_items, num_keywords, tuple(modality_names), dict(item_vectors), offsets,
                     item, query, evals)


def synthetic_data(dcfg) -> SeminarData:
  """The synthetic world's lifelong (query, item) sequences (see the module docstring)."""
  from mvhan_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  wcfg = synthetic.WorldConfig(**dcfg.world.to_dict())
  world = synthetic.generate_world(wcfg)
  ev = world.events
  keep = ev["click"].astype(bool) if dcfg.get("clicks_only", False) else np.ones(world.num_events, bool)
  vectors = {"text": world.text_vectors, "image": world.image_vectors}
  return _assemble("synthetic", wcfg.num_items, 1 + wcfg.num_topics * wcfg.keywords_per_topic,
                   ("id", "text", "image"), vectors, ev["user"][keep], ev["item"][keep],
                   ev["timestamp"][keep], ev["query"][keep], wcfg.num_users, dcfg.data_seed)


def hashed_title_vectors(titles, buckets: int, dim: int, seed: int = 0) -> np.ndarray:
  """float32 [N, dim]: mean over a title's words (year removed) of a fixed N(0, 1/dim) vector per
  crc32(word) mod ``buckets`` (zeros for a title without words)."""
  from mvhan_jax.data import movielens  # pylint: disable=import-outside-toplevel
  table = np.random.default_rng([seed, 21]).standard_normal((buckets, dim)).astype(np.float32) / np.sqrt(dim)
  out = np.zeros((len(titles), dim), np.float32)
  for i, t in enumerate(titles):
    words = movielens.title_words(t)
    if words:
      out[i] = table[[zlib.crc32(w.encode("utf-8")) % buckets for w in words]].mean(0)
  return out


def genre_multi_hot(genres: np.ndarray, num_genres: int) -> np.ndarray:
  """int32 [N, M] genre ids (0 = padding) -> float32 [N, num_genres] multi-hot (genre id g at g - 1)."""
  out = np.zeros((len(genres), num_genres), np.float32)
  rows, cols = np.nonzero(genres > 0)
  out[rows, genres[rows, cols] - 1] = 1.0
  return out


def movielens_data(dcfg) -> SeminarData:
  """MovieLens-100k or -1M (``dcfg.name``) as SEMINAR events: the same loaders, protocol order,
  genre ids and title words as the retrieval models (ML-1M's genres use ML-100k's ids)."""
  from mvhan_jax.data import movielens  # pylint: disable=import-outside-toplevel
  ml: InteractionData = movielens.LOADERS[dcfg.name](dcfg.get("data_dir"))
  text = hashed_title_vectors(ml.item_titles, dcfg.text_buckets, dcfg.text_dim, dcfg.data_seed)
  genre = genre_multi_hot(ml.item_features["genres"], len(movielens.GENRES) - 1)
  query = np.zeros((len(ml.user), 1), np.int32)
  return _assemble(ml.name, ml.num_items, 1, ("id", "text", "genre"), {"text": text, "genre": genre},
                   ml.user, ml.item, ml.timestamp, query, ml.num_users, dcfg.data_seed)


def load_data(config) -> SeminarData:
  from mvhan_jax.data import registry  # pylint: disable=import-outside-toplevel
  name = config.dataset.name
  if name == "synthetic":
    return synthetic_data(config.dataset)
  if name in registry.MOVIELENS:
    return movielens_data(config.dataset)
  raise ValueError(f"config.dataset.name={name!r} is unknown: use 'synthetic', "
                   f"{', '.join(map(repr, registry.MOVIELENS))}")


def check_split_matches_protocol(data: SeminarData, ml: InteractionData) -> bool:
  """True when the targets equal `protocol.leave_one_out`'s (used by the tests)."""
  split = protocol.leave_one_out(ml)
  for s, tgt in (("valid", split.valid_target), ("test", split.test_target)):
    q = data.eval_queries[s]
    if not np.array_equal(tgt[q.user], q.target) or not np.array_equal(np.flatnonzero(tgt >= 0), q.user):
      return False
  return True
