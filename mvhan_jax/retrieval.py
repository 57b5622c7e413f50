"""Serving-time retrieval: ScaNN approximate index, exact reference, multi-interest merge.

Two indexes with one interface:
  * `ScannIndex`: ScaNN tree (k-means partitions) + anisotropic quantisation
    (AH) scoring + exact re-ordering, for inner-product search.
  * `ExactIndex`: `evaluation.exact_topk` (chunked JAX), the reference that
    ANN recall is measured against, and the fallback where ScaNN is missing.

Both take single-vector queries [Q, D] or multi-interest queries [Q, K, D]
with a mask [Q, K]. Multi-interest serving (MIND / ComiRec): every live
interest retrieves k items, the lists are merged by max score, de-duplicated
and cut to k (`merge_interests`).

An index directory holds the backend's files plus ``index.json`` (backend,
step, config, num_items, dim, user metadata, and the sha256 of every file beside
it); ``index.json`` is written last, so its presence marks a complete save.
`load_index` reads it to pick the class, and every load checks the files against
those digests (`artifacts.ArtifactDamaged` naming the file that differs).
The directory may be remote (``gs://...``): every file goes through `mvhan_jax.workdir`, and ScaNN,
which serializes to and loads from a local folder only, is staged through a temporary one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping

import numpy as np

from mvhan_jax import artifacts
from mvhan_jax import evaluation
from mvhan_jax import workdir

_META_FILE = "index.json"
_EXACT_FILE = "items.npz"
# ScaNN's lut16 asymmetric hashing trains 16 centres per block, so it needs
# at least that many training points; smaller catalogues are brute-forced.
_MIN_AH_POINTS = 16

logger = logging.getLogger(__name__)


def _import_scann():
  """Returns the scann module or None (wheels exist for Linux x86_64 only)."""
  try:
    import scann  # pylint: disable=g-import-not-at-top
    return scann
  except ImportError:
    return None


NO_TREE_BELOW = 10_000  # catalogues smaller than this are scanned whole (IndexConfig.for_size)


@dataclasses.dataclass(frozen=True)
class IndexConfig:
  """ANN index hyperparameters.

  Attributes:
    num_leaves: k-means partitions of the tree; 0 disables the tree (every
      query scores every item with AH). Must be <= the number of items.
    num_leaves_to_search: partitions visited per query (recall vs speed).
    training_sample_size: items sampled to train the tree and the AH codebooks.
    dims_per_block: dimensions per AH sub-space (2 is ScaNN's recommendation).
    anisotropic_quantization_threshold: AH noise-shaping threshold (0.2 for
      inner product, per ScaNN's docs).
    reorder_k: candidates re-scored exactly after AH; >= the k of a search.
    backend: 'scann' or 'exact'.
  """

  num_leaves: int = 1000
  num_leaves_to_search: int = 100
  training_sample_size: int = 250_000
  dims_per_block: int = 2
  anisotropic_quantization_threshold: float = 0.2
  reorder_k: int = 250
  backend: str = "scann"

  def __post_init__(self):
    if self.backend not in ("scann", "exact"):
      raise ValueError(f"IndexConfig.backend must be 'scann' or 'exact', got {self.backend!r}")
    if self.num_leaves < 0 or (self.num_leaves and not
                               1 <= self.num_leaves_to_search <= self.num_leaves):
      raise ValueError(
          f"IndexConfig: need num_leaves >= 0 and 1 <= num_leaves_to_search <= num_leaves, got "
          f"num_leaves={self.num_leaves}, num_leaves_to_search={self.num_leaves_to_search}")
    if self.dims_per_block < 1 or self.reorder_k < 1 or self.training_sample_size < 1:
      raise ValueError(
          "IndexConfig: dims_per_block, reorder_k and training_sample_size must be >= 1")

  @classmethod
  def for_size(cls, num_items: int, backend: str = "scann", **overrides) -> "IndexConfig":
    """Defaults for a catalogue of `num_items` items.

    num_leaves ~ sqrt(n) (ScaNN's rule of thumb), searching ~10% of them (25%
    under 100k items, where sqrt(n) leaves are few and a missed leaf costs a
    large share of recall: measured on MovieLens-100k's 1,682 items, 10% gave
    recall@10 0.69-0.76, 25% gave 0.95-1.0), trained on up to 250k items.
    Catalogues under 10,000 items (``NO_TREE_BELOW``) get no tree: partitions
    there hold a few dozen items, scanning the whole catalogue with AH costs
    microseconds, and trees lost recall on both MovieLens catalogues: up to 23%
    recall@10 over ML-100k's 1,682 items for multi-interest queries whose
    interests point at different partitions, and 7-10% recall@50 over ML-1M's
    3,706 items (61 leaves, 16 searched: 0.90-0.93 in experiments/results/ml1m.md
    before the threshold moved from 2,000 to 10,000).
    """
    if num_items < 1:
      raise ValueError(f"num_items must be >= 1, got {num_items}")
    if num_items < NO_TREE_BELOW:
      leaves, search = 0, 0
    else:
      leaves = min(num_items, max(1, int(round(math.sqrt(num_items)))))
      search = max(1, int(math.ceil((0.25 if num_items < 100_000 else 0.1) * leaves)))
    params = dict(num_leaves=leaves, num_leaves_to_search=search,
                  training_sample_size=min(num_items, 250_000),
                  reorder_k=min(num_items, 250), backend=backend)
    params.update(overrides)
    return cls(**params)


# ---------------------------------------------------------------------------
# Multi-interest merge and recall.
# ---------------------------------------------------------------------------


_PAD_ID = np.uint64(0x7FFFFFFF)  # sorts after every real int32 id
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


def _descending_key(scores: np.ndarray) -> np.ndarray:
  """uint64 of float32 scores whose ascending order is the scores' descending order."""
  bits = (scores.astype(np.float32) + np.float32(0.0)).view(np.uint32)  # + 0.0: -0.0 ties 0.0
  ascending = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))
  return (~ascending).astype(np.uint64)


def _scores_from_key(key: np.ndarray) -> np.ndarray:
  ascending = ~key.astype(np.uint32)
  return np.where(ascending >> 31, ascending & np.uint32(0x7FFFFFFF), ~ascending).view(np.float32)


def merge_interests(ids, scores, mask=None, k: int | None = None):
  """Merges per-interest result lists into one list per user.

  An item's merged score is its max over the interests that returned it; each
  item appears once; -1 ids (padding) and masked interests are dropped; the
  result is sorted by score descending, ties by lower item id.

  Args:
    ids: int [Q, K, k'] per-interest ids in [0, 2^31 - 1), -1 = no result.
    scores: float [Q, K, k'] matching scores.
    mask: bool [Q, K] live interests (None = all live).
    k: merged list length (default k').

  Returns:
    ids int32 [Q, k] (-1 padded when fewer distinct items exist) and scores
    float32 [Q, k] (-inf where padded).
  """
  ids = np.asarray(ids)
  scores = np.asarray(scores, dtype=np.float32)
  if ids.ndim != 3 or ids.shape != scores.shape:
    raise ValueError(
        f"ids and scores must both be [Q, K, k], got {ids.shape} and {scores.shape}")
  q, kint, per = ids.shape
  k = per if k is None else int(k)
  if mask is None:
    mask = np.ones((q, kint), dtype=bool)
  mask = np.asarray(mask, dtype=bool)
  if mask.shape != (q, kint):
    raise ValueError(f"mask must be [Q, K] = {(q, kint)}, got {mask.shape}")
  if ids.size and ids.max() >= int(_PAD_ID):
    raise ValueError(f"ids must be int32 item ids below {int(_PAD_ID)}, got {ids.max()}")

  # Every (item, score) pair is packed into one uint64 so that each step is a plain per-row
  # np.sort of K * k' keys (no global lexsort, no gathers): 5-8x faster than sorting the
  # flattened triples (row, item, score).
  valid = (ids >= 0) & mask[:, :, None] & ~np.isnan(scores)
  item = np.where(valid, ids, int(_PAD_ID)).astype(np.uint64).reshape(q, -1)
  desc = _descending_key(np.where(valid, scores, -np.inf)).reshape(q, -1)
  # 1) Sorted by (item, score desc): the first key of each item run holds the item's max score.
  key = np.sort((item << _SHIFT) | desc, axis=-1)
  item, desc = key >> _SHIFT, key & _LOW32
  dead = item == _PAD_ID
  dead[:, 1:] |= item[:, 1:] == item[:, :-1]
  # 2) Sorted by (score desc, item); duplicates and padding sort last.
  key = np.where(dead, (_LOW32 << _SHIFT) | _PAD_ID, (desc << _SHIFT) | item)
  key = np.sort(key, axis=-1)[:, :k]
  item = (key & _LOW32).astype(np.int64)
  pad = item == int(_PAD_ID)
  out_ids = np.full((q, k), -1, dtype=np.int32)
  out_scores = np.full((q, k), -np.inf, dtype=np.float32)
  width = key.shape[1]
  out_ids[:, :width] = np.where(pad, -1, item)
  out_scores[:, :width] = np.where(pad, -np.inf, _scores_from_key(key >> _SHIFT))
  return out_ids, out_scores


def ann_recall(approx_ids, exact_ids) -> float:
  """Mean over queries of |approx ∩ exact| / |exact| (-1 padding ignored).

  Args:
    approx_ids: int [Q, k] ids from the approximate index.
    exact_ids: int [Q, k] ids from the exact index (the reference).
  """
  approx_ids = np.asarray(approx_ids)
  exact_ids = np.asarray(exact_ids)
  if approx_ids.ndim != 2 or approx_ids.shape[0] != exact_ids.shape[0]:
    raise ValueError(
        f"approx_ids [Q, k] and exact_ids [Q, k] must share Q, got {approx_ids.shape} and "
        f"{exact_ids.shape}")
  hit = (approx_ids[:, :, None] == exact_ids[:, None, :]) & (exact_ids[:, None, :] >= 0)
  found = hit.any(axis=1).sum(axis=1)
  size = np.maximum((exact_ids >= 0).sum(axis=1), 1)
  return float(np.mean(found / size))


# ---------------------------------------------------------------------------
# Indexes.
# ---------------------------------------------------------------------------


def _check_item_vectors(item_vectors) -> np.ndarray:
  item_vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
  if item_vectors.ndim != 2 or item_vectors.shape[0] == 0:
    raise ValueError(f"item_vectors must be a non-empty [I, D] array, got {item_vectors.shape}")
  return item_vectors


def _write_meta(directory: str, meta: Mapping[str, Any]) -> None:
  # workdir.write_json never leaves a half-written index.json, the marker of a complete save.
  workdir.write_json(workdir.path(directory) / _META_FILE, meta, indent=2, sort_keys=True)


def _read_meta(directory: str) -> dict[str, Any]:
  path = workdir.path(directory) / _META_FILE
  if not path.is_file():
    raise artifacts.ArtifactMissing(
        f"{path} not found: {directory!r} is not a saved index (or its save did not finish)")
  try:
    meta = workdir.read_json(path)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise artifacts.ArtifactDamaged(f"{path} is not valid JSON ({artifacts.first_line(e)}): rebuild the index "
                                    "with --mode=index") from e
  if not isinstance(meta, dict) or not {"backend", "step", "num_items", "dim"} <= meta.keys():
    raise artifacts.ArtifactDamaged(f"{path} is not an index record (it lacks backend, step, num_items or dim): "
                                    "rebuild the index with --mode=index")
  return meta


def _index_files(directory: str) -> list[str]:
  """The files an index save wrote beside ``index.json`` (not sub-directories: per-type indexes)."""
  return [p.name for p in workdir.path(directory).iterdir() if p.name != _META_FILE and p.is_file()]


def _check_files(directory: str, meta: Mapping[str, Any]) -> None:
  """Every file recorded in ``meta['files']`` is there with its sha256 (indexes saved before the
  digests existed are not checked)."""
  recorded = meta.get("files")
  if not recorded:
    return
  present = set(_index_files(directory))
  for name in sorted(recorded):
    if name not in present:
      raise artifacts.ArtifactDamaged(f"the index in {directory} is damaged: {name}, recorded in {_META_FILE}, is "
                                      "missing; rebuild it with --mode=index")
  got = artifacts.file_digests(directory, recorded)
  for name in sorted(recorded):
    if got[name] != recorded[name]:
      raise artifacts.ArtifactDamaged(f"the index in {directory} is damaged: {name} does not match the sha256 "
                                      f"recorded in {_META_FILE}; rebuild it with --mode=index")


class _Index:
  """Interface shared by the two backends."""

  backend = ""

  def __init__(self, config: IndexConfig, num_items: int, dim: int,
               step: int | None = None, metadata: Mapping[str, Any] | None = None):
    self.config = config
    self.num_items = num_items
    self.dim = dim
    self.step = step              # training step of the vectors, set by save/load
    self.metadata = dict(metadata or {})

  def _check_queries(self, queries, query_mask):
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim not in (2, 3) or queries.shape[-1] != self.dim:
      raise ValueError(
          f"queries must be [Q, {self.dim}] or [Q, K, {self.dim}] (the index dim), got "
          f"{queries.shape}")
    if query_mask is not None and queries.ndim == 2:
      raise ValueError("query_mask needs multi-interest queries [Q, K, D]")
    return queries

  def _check_k(self, k: int):
    if not 1 <= k <= self.num_items:
      raise ValueError(f"k must lie in [1, num_items = {self.num_items}], got {k}")

  def search(self, queries, k: int, query_mask=None) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _save_files(self, directory: str) -> None:
    raise NotImplementedError

  def save(self, directory: str, step: int, metadata: Mapping[str, Any] | None = None) -> str:
    """Writes the index and ``index.json`` into `directory`; returns it.

    Args:
      directory: target folder (created; an older save there is overwritten).
      step: training step the item vectors come from (for serving rollouts).
      metadata: JSON-serialisable extras (model name, data version, ...).
    """
    stale = workdir.makedirs(directory) / _META_FILE
    if stale.exists():
      stale.unlink()  # an interrupted overwrite must not look complete
    self._save_files(directory)
    self.step = int(step)
    self.metadata = dict(metadata or {})
    _write_meta(directory, {
        "backend": self.backend, "step": self.step, "config": dataclasses.asdict(self.config),
        "num_items": self.num_items, "dim": self.dim, "metadata": self.metadata,
        "files": artifacts.file_digests(directory, _index_files(directory))})
    return directory


class ExactIndex(_Index):
  """Exact inner-product search with `evaluation.exact_topk` (the reference)."""

  backend = "exact"

  def __init__(self, item_vectors, config: IndexConfig | None = None, **kwargs):
    item_vectors = _check_item_vectors(item_vectors)
    config = config or IndexConfig.for_size(item_vectors.shape[0], backend="exact")
    super().__init__(config, item_vectors.shape[0], item_vectors.shape[1], **kwargs)
    self.item_vectors = item_vectors

  @classmethod
  def build(cls, item_vectors, config: IndexConfig | None = None) -> "ExactIndex":
    return cls(item_vectors, config)

  def search(self, queries, k: int, query_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k.

    Args:
      queries: float [Q, D] or [Q, K, D]; query_mask: bool [Q, K].
      k: results per query.

    Returns:
      ids int32 [Q, k] and scores float32 [Q, k], best first; multi-interest
      scores are max over live interests (identical to `merge_interests` of the
      per-interest exact lists).
    """
    queries = self._check_queries(queries, query_mask)
    self._check_k(k)
    scores, ids = evaluation.exact_topk(queries, self.item_vectors, k, query_mask=query_mask)
    return ids, scores

  def _save_files(self, directory: str) -> None:
    with (workdir.path(directory) / _EXACT_FILE).open("wb") as f:
      np.savez(f, item_vectors=self.item_vectors)

  @classmethod
  def load(cls, directory: str) -> "ExactIndex":
    meta = _read_meta(directory)
    if meta["backend"] != cls.backend:
      raise ValueError(f"{directory!r} holds a {meta['backend']!r} index: use load_index()")
    _check_files(directory, meta)
    with (workdir.path(directory) / _EXACT_FILE).open("rb") as f, np.load(f) as npz:
      items = npz["item_vectors"]
    return cls(items, IndexConfig(**meta["config"]), step=meta["step"],
               metadata=meta["metadata"])


class ScannIndex(_Index):
  """ScaNN tree + asymmetric hashing + exact reordering over inner products."""

  backend = "scann"

  def __init__(self, searcher, config: IndexConfig, num_items: int, dim: int, **kwargs):
    super().__init__(config, num_items, dim, **kwargs)
    self.searcher = searcher

  @classmethod
  def build(cls, item_vectors, config: IndexConfig | None = None) -> "ScannIndex":
    """Trains the ScaNN index on `item_vectors` float [I, D]."""
    scann = _import_scann()
    if scann is None:
      raise ImportError(
          "scann is not importable (wheels exist for Linux x86_64 only): use build_index(), "
          "which falls back to ExactIndex, or IndexConfig(backend='exact')")
    db = _check_item_vectors(item_vectors)
    n, dim = db.shape
    config = config or IndexConfig.for_size(n)
    if config.num_leaves > n:
      raise ValueError(
          f"IndexConfig.num_leaves = {config.num_leaves} exceeds the {n} items: ScaNN's "
          "k-means tree needs num_leaves <= num_items; use IndexConfig.for_size(num_items)")
    builder = scann.scann_ops_pybind.builder(db, min(10, n), "dot_product")
    if config.num_leaves:
      builder = builder.tree(
          num_leaves=config.num_leaves, num_leaves_to_search=config.num_leaves_to_search,
          training_sample_size=min(config.training_sample_size, n))
    if n >= _MIN_AH_POINTS:
      builder = builder.score_ah(
          config.dims_per_block,
          anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
          training_sample_size=min(config.training_sample_size, n))
      builder = builder.reorder(config.reorder_k)
    else:
      builder = builder.score_brute_force()
    return cls(builder.build(), config, n, dim)

  def _search_flat(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-vector search of float32 [N, D]: ids int32 [N, k] (-1 pad), scores [N, k]."""
    kwargs = {}
    if self.config.num_leaves:
      kwargs["leaves_to_search"] = self.config.num_leaves_to_search
    if self.num_items >= _MIN_AH_POINTS:
      kwargs["pre_reorder_num_neighbors"] = max(self.config.reorder_k, k)
    ids, scores = self.searcher.search_batched(queries, final_num_neighbors=k, **kwargs)
    ids = np.asarray(ids).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    # ScaNN pads short result lists with id 0 and a NaN score.
    pad = np.isnan(scores)
    return np.where(pad, -1, ids).astype(np.int32), np.where(pad, -np.inf, scores)

  def search(self, queries, k: int, query_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k.

    Args:
      queries: float [Q, D] or multi-interest [Q, K, D]; query_mask: bool [Q, K].
      k: results per query.

    Returns:
      ids int32 [Q, k] (-1 padded) and scores float32 [Q, k] (-inf padded),
      best first. Multi-interest: each live interest retrieves k items and the
      lists are merged with `merge_interests`.
    """
    queries = self._check_queries(queries, query_mask)
    self._check_k(k)
    if queries.ndim == 2:
      return self._search_flat(queries, k)
    q, kint, _ = queries.shape
    mask = (np.ones((q, kint), bool) if query_mask is None
            else np.asarray(query_mask, dtype=bool))
    if mask.shape != (q, kint):
      raise ValueError(f"query_mask must be [Q, K] = {(q, kint)}, got {mask.shape}")
    ids = np.full((q, kint, k), -1, np.int32)
    scores = np.full((q, kint, k), -np.inf, np.float32)
    if mask.any():  # only live interests are searched
      ids[mask], scores[mask] = self._search_flat(np.ascontiguousarray(queries[mask]), k)
    return merge_interests(ids, scores, mask, k)

  def _save_files(self, directory: str) -> None:
    # relative_path=True keeps the directory relocatable (copy it to servers, or from the staging
    # folder of a remote directory).
    with workdir.local_dir_to_write(directory) as local:
      self.searcher.serialize(local, relative_path=True)

  @classmethod
  def load(cls, directory: str) -> "ScannIndex":
    meta = _read_meta(directory)
    if meta["backend"] != cls.backend:
      raise ValueError(f"{directory!r} holds a {meta['backend']!r} index: use load_index()")
    _check_files(directory, meta)
    scann = _import_scann()
    if scann is None:
      raise ImportError(
          f"{directory!r} is a ScaNN index but scann is not importable here (Linux x86_64 "
          "wheels only): load it on a supported machine or rebuild with backend='exact'")
    # The searcher holds its data in memory once loaded, so a remote directory's staging copy can go.
    with workdir.local_dir_to_read(directory) as local:
      searcher = scann.scann_ops_pybind.load_searcher(local)
    return cls(searcher, IndexConfig(**meta["config"]), meta["num_items"], meta["dim"],
               step=meta["step"], metadata=meta["metadata"])


_BACKENDS = {"scann": ScannIndex, "exact": ExactIndex}


def build_index(item_vectors, config: IndexConfig | None = None) -> _Index:
  """Builds the configured index, falling back to ExactIndex without ScaNN.

  Args:
    item_vectors: float [I, D].
    config: index settings (default `IndexConfig.for_size(I)`).
  """
  item_vectors = _check_item_vectors(item_vectors)
  config = config or IndexConfig.for_size(item_vectors.shape[0])
  if config.backend == "scann" and _import_scann() is None:
    logger.warning(
        "scann is not importable (wheels exist for Linux x86_64 only); using the exact "
        "index instead, which is correct but scans every item per query")
    return ExactIndex(item_vectors, dataclasses.replace(config, backend="exact"))
  return _BACKENDS[config.backend].build(item_vectors, config)


def load_index(directory: str):
  """Loads an index saved by `.save` (or a `SubsetIndex`), choosing the class from its index.json."""
  if (workdir.path(directory) / SubsetIndex.IDS_FILE).is_file():
    return SubsetIndex.load(directory)
  backend = _read_meta(directory).get("backend")
  if backend not in _BACKENDS:
    raise ValueError(f"{directory!r}: unknown index backend {backend!r}")
  return _BACKENDS[backend].load(directory)


class SubsetIndex:
  """An index over a subset of the catalogue (e.g. one content type) that answers in global item ids.

  MV-HAN serves one index over all types and one per type: a retrieval restricted to a type searches
  that type's index, so no result of another type can appear (filtering a global top-k would need an
  unbounded k for a sparse type).

  Attributes:
    inner: the index over ``item_vectors[item_ids]`` (local ids 0..n-1).
    item_ids: int64 [n] the global id of every local id.
  """

  IDS_FILE = "item_ids.npy"

  def __init__(self, inner, item_ids):
    self.inner = inner
    self.item_ids = np.asarray(item_ids, np.int64)
    if self.item_ids.shape != (inner.num_items,):
      raise ValueError(f"item_ids has shape {self.item_ids.shape}, the index holds {inner.num_items} items")

  @classmethod
  def build(cls, item_vectors, item_ids, config: IndexConfig | None = None) -> "SubsetIndex":
    """Indexes ``item_vectors[item_ids]`` (item_vectors: the whole catalogue [I, D])."""
    item_ids = np.asarray(item_ids, np.int64)
    if item_ids.ndim != 1 or not item_ids.size:
      raise ValueError("item_ids must be a non-empty int [n] array of global item ids")
    sub = np.asarray(item_vectors)[item_ids]
    return cls(build_index(sub, config or IndexConfig.for_size(len(item_ids))), item_ids)

  @property
  def num_items(self) -> int:
    return self.inner.num_items

  @property
  def dim(self) -> int:
    return self.inner.dim

  @property
  def step(self) -> int | None:
    return self.inner.step

  @property
  def metadata(self) -> dict[str, Any]:
    return self.inner.metadata

  def search(self, queries, k: int, query_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """As `_Index.search`; ids are global, -1 stays -1."""
    ids, scores = self.inner.search(queries, k, query_mask=query_mask)
    ids = np.asarray(ids)
    return np.where(ids >= 0, self.item_ids[np.maximum(ids, 0)], -1), scores

  def save(self, directory: str, step: int, metadata: Mapping[str, Any] | None = None) -> str:
    # The id map first: index.json, written last by the inner save, marks the whole save complete.
    with (workdir.makedirs(directory) / self.IDS_FILE).open("wb") as f:
      np.save(f, self.item_ids)
    return self.inner.save(directory, step, metadata)

  @classmethod
  def load(cls, directory: str) -> "SubsetIndex":
    backend = _read_meta(directory).get("backend")
    if backend not in _BACKENDS:
      raise ValueError(f"{directory!r}: unknown index backend {backend!r}")
    inner = _BACKENDS[backend].load(directory)  # checks every file, the id map too, first
    with (workdir.path(directory) / cls.IDS_FILE).open("rb") as f:
      item_ids = np.load(f)
    return cls(inner, item_ids)


# ---------------------------------------------------------------------------
# Auto-tuning: the fastest ScaNN setting that meets a recall target.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TunePoint:
  """One measured setting of `autotune`.

  Attributes:
    config: the IndexConfig (num_leaves, num_leaves_to_search, reorder_k).
    recall: mean recall@k against exact search over the tuning queries.
    recall_sem: standard error of that mean (per-query spread / sqrt(Q)).
    queries_per_s: batched throughput of `ScannIndex.search` (single-threaded
      `search_batched`, one query = one row of sample_queries, i.e. one user
      with all its interests and the merge for [Q, K, D] queries); best of
      `repeats` runs, so interference from other processes is mostly removed.
    build_time_s: wall time to train and build this setting's tree (shared by
      every setting with the same num_leaves).
    index_bytes: size of the serialized index (`searcher.serialize`).
  """

  config: IndexConfig
  recall: float
  recall_sem: float
  queries_per_s: float
  build_time_s: float
  index_bytes: int

  def as_dict(self) -> dict[str, Any]:
    return {"num_leaves": self.config.num_leaves,
            "num_leaves_to_search": self.config.num_leaves_to_search,
            "reorder_k": self.config.reorder_k, "recall": self.recall,
            "recall_sem": self.recall_sem, "queries_per_s": self.queries_per_s,
            "build_time_s": self.build_time_s, "index_bytes": self.index_bytes}


@dataclasses.dataclass(frozen=True)
class TuneResult:
  """What `autotune` chose and everything it measured.

  Attributes:
    config: the chosen IndexConfig; `build_index(items, config)` rebuilds it.
    recall, queries_per_s, build_time_s, index_bytes: the chosen point's
      measurements (see `TunePoint`).
    target_recall: the requested recall@k.
    margin: confidence_z * the chosen point's recall standard error; a point
      is accepted when recall - margin >= target_recall.
    k: the k of recall@k.
    curve: every measured point, fastest first (`pareto_front(curve)` gives
      the useful ones).
    index: a ready ScannIndex with the chosen config (the tree built during
      tuning, so no second build is needed).
  """

  config: IndexConfig
  recall: float
  queries_per_s: float
  build_time_s: float
  index_bytes: int
  target_recall: float
  margin: float
  k: int
  curve: tuple[TunePoint, ...]
  index: "ScannIndex" = dataclasses.field(repr=False, compare=False)

  def as_dict(self) -> dict[str, Any]:
    """JSON-serialisable summary (without the index)."""
    return {"config": dataclasses.asdict(self.config), "recall": self.recall,
            "queries_per_s": self.queries_per_s, "build_time_s": self.build_time_s,
            "index_bytes": self.index_bytes, "target_recall": self.target_recall,
            "margin": self.margin, "k": self.k, "curve": [p.as_dict() for p in self.curve]}


def default_tune_grid(num_items: int, k: int = 10) -> list[IndexConfig]:
  """The settings `autotune` tries by default.

  num_leaves ~ sqrt(n) x {0.5, 1, 2}; leaves_to_search 1% .. 40% of the
  leaves; reorder_k in {2k, 5k, 10k, 25k}. Under NO_TREE_BELOW items there is no tree
  (IndexConfig.for_size), so only reorder_k varies.
  """
  if num_items < 1:
    raise ValueError(f"num_items must be >= 1, got {num_items}")
  reorders = sorted({min(num_items, max(k, m * k)) for m in (2, 5, 10, 25)})
  base = IndexConfig.for_size(num_items)
  if base.num_leaves == 0:
    return [dataclasses.replace(base, reorder_k=r) for r in reorders]
  grid = []
  root = math.sqrt(num_items)
  for leaves in sorted({min(num_items, max(2, int(round(root * f)))) for f in (0.5, 1.0, 2.0)}):
    searches = sorted({min(leaves, max(1, int(math.ceil(leaves * f))))
                       for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)})
    for s in searches:
      for r in reorders:
        grid.append(dataclasses.replace(base, num_leaves=leaves, num_leaves_to_search=s,
                                        reorder_k=r))
  return grid


def _per_query_recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> np.ndarray:
  """float [Q]: |approx ∩ exact| / |exact| per query (-1 padding ignored)."""
  hit = (approx_ids[:, :, None] == exact_ids[:, None, :]) & (exact_ids[:, None, :] >= 0)
  return hit.any(axis=1).sum(axis=1) / np.maximum((exact_ids >= 0).sum(axis=1), 1)


def _serialized_bytes(index: "ScannIndex") -> int:
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp(prefix="scann_size_")
  try:
    index.searcher.serialize(tmp, relative_path=True)
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(tmp) for f in files)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def pareto_front(curve) -> list[TunePoint]:
  """The points no other point beats on both queries/s and recall, fastest first.

  Along the front recall rises as speed falls, which is what makes the choice
  of `choose_setting` monotone in the target.
  """
  front, best_recall = [], -math.inf
  for p in sorted(curve, key=lambda p: (-p.queries_per_s, -p.recall)):
    if p.recall > best_recall:
      front.append(p)
      best_recall = p.recall
  return front


def choose_setting(curve, target_recall: float, confidence_z: float = 2.0) -> TunePoint | None:
  """Fastest Pareto point with recall - confidence_z * recall_sem >= target_recall.

  Restricting to the Pareto front (by mean recall and queries/s) means a
  higher target never picks a point with a lower measured recall: the points
  accepted for a higher target are a subset, and along the front the slower
  point always has the higher recall. Returns None when no point qualifies.
  """
  for p in pareto_front(curve):
    if p.recall - confidence_z * p.recall_sem >= target_recall:
      return p
  return None


def autotune(item_vectors, sample_queries, target_recall: float, k: int = 10,
             candidates=None, *, query_mask=None, confidence_z: float = 2.0,
             repeats: int = 3) -> TuneResult:
  """Picks the fastest ScaNN setting whose recall@k meets `target_recall`.

  Settings sharing num_leaves (and the training parameters) share one built
  tree: leaves_to_search and reorder_k are search-time arguments of ScaNN's
  `search_batched`, so a grid of 3 leaf counts costs 3 builds, not 72.

  Recall is measured against `evaluation.exact_topk` on `sample_queries`. To
  make the choice hold on unseen queries from the same distribution, a setting
  is accepted only when its mean recall minus `confidence_z` standard errors
  reaches the target, and only Pareto-optimal settings are considered, so a
  higher target never picks a setting with a lower measured recall (see
  `choose_setting`). Use a few hundred queries or more: the standard error
  shrinks as 1 / sqrt(Q).

  Args:
    item_vectors: float [I, D] catalogue.
    sample_queries: float [Q, D], or multi-interest [Q, K, D] (with
      `query_mask` bool [Q, K]): representative serving queries.
    target_recall: required recall@k in (0, 1].
    k: results per query.
    candidates: IndexConfigs to try (default `default_tune_grid(I, k)`).
    query_mask: bool [Q, K] live interests of multi-interest queries.
    confidence_z: margin in standard errors (0 = accept the raw mean).
    repeats: timed runs per setting; the fastest is kept.

  Returns:
    TuneResult: the chosen config and index, its recall, queries/s, build time
    and serialized size, and the whole curve.

  Raises:
    ValueError: target_recall outside (0, 1], or no candidate reaches it (the
      message names the best recall measured and how to get further).
    ImportError: scann is not installed.
  """
  import time  # pylint: disable=g-import-not-at-top
  if _import_scann() is None:
    raise ImportError(
        "autotune needs scann (Linux x86_64 wheels only); elsewhere use ExactIndex, which "
        "always has recall 1")
  if not 0.0 < target_recall <= 1.0:
    raise ValueError(
        f"target_recall must lie in (0, 1] (recall@k cannot exceed 1), got {target_recall}")
  if repeats < 1 or confidence_z < 0:
    raise ValueError(f"need repeats >= 1 and confidence_z >= 0, got {repeats}, {confidence_z}")
  db = _check_item_vectors(item_vectors)
  n, dim = db.shape
  if not 1 <= k <= n:
    raise ValueError(f"k must lie in [1, num_items = {n}], got {k}")
  queries = np.ascontiguousarray(sample_queries, dtype=np.float32)
  if queries.ndim not in (2, 3) or queries.shape[-1] != dim or queries.shape[0] < 1:
    raise ValueError(
        f"sample_queries must be a non-empty [Q, {dim}] or [Q, K, {dim}] array (D of "
        f"item_vectors), got {queries.shape}")
  candidates = list(default_tune_grid(n, k) if candidates is None else candidates)
  if not candidates:
    raise ValueError("candidates is empty: pass None for the default grid")
  for c in candidates:
    if not isinstance(c, IndexConfig) or c.backend != "scann" or c.num_leaves > n:
      raise ValueError(
          f"candidates must be IndexConfig(backend='scann') with num_leaves <= {n}, got {c!r}")

  _, exact_ids = evaluation.exact_topk(queries, db, k, query_mask=query_mask)
  # One tree per group of settings that differ only in search-time arguments.
  groups: dict[tuple, list[IndexConfig]] = {}
  for c in candidates:
    key = (c.num_leaves, c.training_sample_size, c.dims_per_block,
           c.anisotropic_quantization_threshold)
    groups.setdefault(key, []).append(c)

  points, searchers = [], []
  for configs in groups.values():
    tree_config = dataclasses.replace(
        configs[0], num_leaves_to_search=max(c.num_leaves_to_search for c in configs),
        reorder_k=max(c.reorder_k for c in configs))
    t0 = time.perf_counter()
    tree = ScannIndex.build(db, tree_config)
    build_s = time.perf_counter() - t0
    size = _serialized_bytes(tree)
    for c in configs:
      view = ScannIndex(tree.searcher, c, n, dim)
      ids, _ = view.search(queries, k, query_mask)  # also the warm-up run
      best = math.inf
      for _ in range(repeats):
        t0 = time.perf_counter()
        view.search(queries, k, query_mask)
        best = min(best, time.perf_counter() - t0)
      per_query = _per_query_recall(ids, exact_ids)
      searchers.append(tree.searcher)
      points.append(TunePoint(
          config=c, recall=float(per_query.mean()),
          recall_sem=float(per_query.std() / math.sqrt(len(per_query))),
          queries_per_s=queries.shape[0] / max(best, 1e-9), build_time_s=build_s,
          index_bytes=size))

  curve = tuple(sorted(points, key=lambda p: (-p.queries_per_s, -p.recall)))
  chosen = choose_setting(curve, target_recall, confidence_z)
  if chosen is None:
    top = max(points, key=lambda p: p.recall)
    raise ValueError(
        f"no candidate reaches recall@{k} >= target_recall={target_recall} with "
        f"confidence_z={confidence_z} standard errors to spare ({queries.shape[0]} queries): "
        f"the best measured is {top.recall:.4f} +- {top.recall_sem:.4f} with "
        f"num_leaves={top.config.num_leaves}, num_leaves_to_search="
        f"{top.config.num_leaves_to_search}, reorder_k={top.config.reorder_k}; lower "
        "target_recall, pass candidates with more leaves_to_search or a larger reorder_k, "
        "use more sample_queries (smaller error) or ExactIndex (recall 1)")
  chosen_searcher = next(s for q, s in zip(points, searchers) if q is chosen)
  p = chosen
  return TuneResult(
      config=p.config, recall=p.recall, queries_per_s=p.queries_per_s,
      build_time_s=p.build_time_s, index_bytes=p.index_bytes, target_recall=target_recall,
      margin=confidence_z * p.recall_sem, k=k, curve=curve,
      index=ScannIndex(chosen_searcher, p.config, n, dim))
