"""Content types for MV-HAN: a typed MovieLens split, single-type training batches, per-type
negatives and per-type evaluation.

MV-HAN (SEEDS.md section 1) learns one user space for several content types: a data-rich *source*
type and sparse *target* types. It trains on batches whose targets are all of one type, alternating
types on a fixed schedule (source, target, source, ...), with a softmax over the positive and
negatives *of the same type*, and reports HR@50 and AUC per target type with retrieval restricted
to that type. This module holds those building blocks; the model reads the item feature ``type``
(1..T, vocab T + 1; 0 would mean "unknown") that every dataset here provides.

Pieces:
  * `add_movielens_content_types`: the item feature ``type`` for MovieLens-100k or -1M (scheme
    'genre_family', the default, or 'era').
  * `split_examples_by_type` + `typed_train_batches`: ``ds[i]`` = a batch of type
    ``schedule[i % len(schedule)]``, a pure function of (seed, i), so resume = replay still holds.
  * `type_samplers`: one negative sampler per type, zero probability outside the type.
  * `typed_eval_sets` + `TypedEvaluator`: per-type leave-one-out HR/NDCG/MRR and AUC with the
    ranking restricted to the target's type, plus the pooled (all types, unrestricted) metrics.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Mapping, Sequence

import grain
import numpy as np

from mvhan_jax import evaluation
from mvhan_jax.data import pipeline
from mvhan_jax.data.movielens import GENRES, title_year
from mvhan_jax.data.protocol import EvalSet
from mvhan_jax.data.types import InteractionData
from mvhan_jax.losses import Sampler, make_sampler

TYPE_FIELD = "type"

# ---------------------------------------------------------------------------------------------
# MovieLens content types (ML-100k and ML-1M share the genre ids).
# ---------------------------------------------------------------------------------------------

# Genres that make an item 'family' (type 2); checked before NICHE_GENRES, see the scheme doc.
FAMILY_GENRES = ("Children's", "Animation")
# The genres with the fewest ratings in ML-100k, each < 5,000 of the 100,000 (Documentary 758,
# Fantasy 1,352, Film-Noir 1,733, Western 1,854, Musical 4,954; Animation 3,605 is family).
NICHE_GENRES = ("Documentary", "Fantasy", "Film-Noir", "Musical", "Western")
CLASSIC_BEFORE, RECENT_FROM = 1970, 1997

MOVIELENS_TYPE_SCHEMES: dict[str, tuple[str, ...]] = {
    "genre_family": ("mainstream", "family", "niche"),
    "era": ("1970-96", "classic", "recent"),
}


def movielens_item_types(data: InteractionData, scheme: str = "genre_family") -> np.ndarray:
  """int32 [I] the content type (1..3) of every MovieLens item under `scheme`.

  Schemes (type 1 is always the data-rich source; counts on MovieLens-100k, 1,682 items and
  100,000 ratings, checked by tests/test_multitype.py):

  'genre_family' (default) - a deterministic rule on the item's genre flags, first match wins:
      2 'family'     : any of Children's, Animation                       131 items   7,855 ratings
      3 'niche'      : else any of Documentary, Fantasy, Film-Noir,        141 items   7,327 ratings
                       Musical, Western (the five least-rated non-family
                       genres, each < 5% of ratings)
      1 'mainstream' : everything else (incl. the one genre-less item)   1,410 items  84,818 ratings
    Family is checked first because a family film that is also a musical or a fantasy (Aladdin,
    The Wizard of Oz) is watched as family content. Why this scheme: it is a real content-type
    distinction (different audiences, as articles vs. novels in the paper), both target types
    are sparse (7.9% and 7.3% of ratings, ~8% of items each) against an 85% source, as MV-HAN
    assumes, and most users touch every type (811 / 854 of 943 users have family / niche
    training interactions), so cross-type transfer through the shared user tower is measurable.
    Leave-one-out (foundation protocol): test targets fall 811 / 58 / 74 on mainstream / family /
    niche (valid: 835 / 60 / 48), training examples 82,282 / 7,722 / 7,167. Per-type test metrics
    rest on ~60-75 users each: expect a std of ~0.06 on HR@50. Restricted to its type, a family
    target competes with ~130 items, not 1,682, so restricted HR@50 is high even for popularity
    (test: family 0.71, niche 0.65, mainstream 0.16; AUC 0.70 / 0.71 / 0.76); compare models, not
    these numbers with the pooled HR@50 (popularity: 0.140 on all rows).
    MovieLens-1M (same rule, same genre ids; 3,706 items, 1,000,209 ratings): family 271 items /
    82,006 ratings, niche 319 / 86,755, mainstream 3,116 / 831,448 (8.2% / 8.7% / 83%); the five
    niche genres are again among the seven least-rated (Mystery edges out Musical there); 5,374 /
    5,687 of 6,040 users have family / niche training interactions; test targets 4,963 / 478 / 599.

  'era' - by the release year in the title:
      2 'classic'    : released before 1970                                179 items  11,237 ratings
      3 'recent'     : released 1997-1998 (during the rating collection,  288 items  16,235 ratings
                       Sept 1997 - Apr 1998: the "new content" type)
      1 '1970-96'    : 1970-1996 and the one item without a year          1,215 items  72,528 ratings
    Less sparse (11% / 16%) and the types differ mostly in age, not in kind; an alternative,
    not the default. (Equal-width eras such as <1990 / 1990-94 / 1995-98 hold 30% / 22% / 47%
    of the ratings: no sparse side at all.) On MovieLens-1M (rated 2000-03) 'recent' (1997-2000)
    is not new content and holds 26% of the ratings (classic 12%): not a sparse target there.

  Raises:
    ValueError: unknown `scheme`, or `data` lacks the MovieLens features the scheme reads.
  """
  if scheme not in MOVIELENS_TYPE_SCHEMES:
    raise ValueError(f"content-type scheme {scheme!r} is unknown: use one of {sorted(MOVIELENS_TYPE_SCHEMES)}")
  types = np.ones((data.num_items,), np.int32)
  if scheme == "genre_family":
    if "genres" not in data.item_features:
      raise ValueError("scheme 'genre_family' needs the MovieLens item feature 'genres' "
                       "(load the data with movielens.load_movielens_100k or load_movielens_1m)")
    genres = np.asarray(data.item_features["genres"])

    def any_of(names):
      ids = [GENRES.index(g) for g in names]  # the feature's ids are indices into GENRES
      return np.isin(genres, ids).any(axis=1)

    types[any_of(NICHE_GENRES)] = 3
    types[any_of(FAMILY_GENRES)] = 2  # written last: family wins over niche
  else:
    if data.item_titles is None:
      raise ValueError("scheme 'era' needs item_titles with '(year)' (load the data with "
                       "movielens.load_movielens_100k or load_movielens_1m)")
    years = np.array([title_year(t) or 0 for t in data.item_titles], np.int64)
    types[(years > 0) & (years < CLASSIC_BEFORE)] = 2
    types[years >= RECENT_FROM] = 3
  return types


def add_movielens_content_types(data: InteractionData,
                                scheme: str = "genre_family") -> tuple[InteractionData, tuple[str, ...]]:
  """Adds the categorical item feature ``type`` (values 1..T, vocab T + 1) to MovieLens data.

  Args:
    data: MovieLens-100k or -1M as `movielens.load_movielens_100k` / `load_movielens_1m` return it.
    scheme: 'genre_family' or 'era' (see `movielens_item_types` for the rules and the counts).

  Returns:
    (data with ``item_features['type']`` int32 [I] and ``vocab['type'] = T + 1``, the type names
    (name of type t at position t - 1; type 1 is the source)).
  """
  if TYPE_FIELD in data.item_features:
    raise ValueError(f"data {data.name!r} already has an item feature {TYPE_FIELD!r}: add content "
                     "types once, to the untyped MovieLens data")
  names = MOVIELENS_TYPE_SCHEMES.get(scheme)
  types = movielens_item_types(data, scheme)
  data = dataclasses.replace(
      data, name=f"{data.name}-{scheme}",
      item_features={**data.item_features, TYPE_FIELD: types},
      vocab={**data.vocab, TYPE_FIELD: len(names) + 1})
  return data, names


def _check_item_type(item_type, num_items: int | None = None, what: str = "item_type") -> np.ndarray:
  """Validates int [I] content types in 1..T; returns them as int32."""
  item_type = np.asarray(item_type)
  if item_type.ndim != 1 or not np.issubdtype(item_type.dtype, np.integer) or not item_type.size:
    raise ValueError(f"{what} must be a non-empty int [I] array of content types, got "
                     f"{item_type.dtype} {item_type.shape}")
  if num_items is not None and len(item_type) != num_items:
    raise ValueError(f"{what} has {len(item_type)} entries but there are {num_items} items: pass "
                     "data.item_features['type'] of the same dataset")
  if item_type.min() < 1:
    raise ValueError(f"{what}: item {int(np.argmin(item_type))} has type {int(item_type.min())}; "
                     "types must be 1..T (0 = unknown cannot be trained or evaluated per type): "
                     "assign every item a type")
  return item_type.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Single-type training batches on an alternating schedule.
# ---------------------------------------------------------------------------------------------

def split_examples_by_type(examples: Mapping[str, np.ndarray],
                           item_type: np.ndarray) -> dict[int, pipeline.ArraySource]:
  """Groups training examples by the content type of their target.

  Args:
    examples: parallel arrays with a ``target`` int [N] field (e.g. `protocol.training_examples`).
    item_type: int32 [I] types 1..T.

  Returns:
    {t: ArraySource of the examples whose target has type t} for every t in 1..T (possibly
    empty), each keeping the original (user, position) order.
  """
  if "target" not in examples:
    raise ValueError(f"examples need a 'target' field to be split by type; got fields {sorted(examples)}")
  item_type = _check_item_type(item_type)
  target = np.asarray(examples["target"])
  if target.size and (target.min() < 0 or target.max() >= len(item_type)):
    raise ValueError(f"example targets lie in [{target.min()}, {target.max()}] but item_type covers "
                     f"{len(item_type)} items: pass the item types of the same dataset")
  t_of = item_type[target]
  out = {}
  for t in range(1, int(item_type.max()) + 1):
    keep = np.flatnonzero(t_of == t)
    out[t] = pipeline.ArraySource({k: np.asarray(v)[keep] for k, v in examples.items()})
  return out


def _type_seed(seed: int, t: int) -> int:
  # Independent streams per type; a fixed function of (seed, t), so batches stay replayable.
  return int(np.random.SeedSequence([seed, t]).generate_state(1, np.uint32)[0])


class TypedTrainBatches(grain.MapDataset):
  """``ds[i]`` = the batch of step ``i``: targets all of type ``schedule[i % len(schedule)]``.

  Each type ``t`` has its own `pipeline.TrainBatches` stream over its own examples (seeded by
  (seed, t), reshuffled every epoch of *that* type). Step ``i`` takes element ``j`` of type t's
  stream, where ``j`` = the number of earlier steps of type t in the schedule:
  ``j = (i // L) * count_t + #{s < i % L : schedule[s] == t}`` with ``L = len(schedule)``. So
  ``ds[i]`` is a pure function of (seed, i) and a resumed run replays exactly. Types run through
  their epochs at different speeds (a sparse type recycles its examples more often). Endless:
  the trainer's ``num_steps`` bounds it.
  """

  def __init__(self, examples_by_type: Mapping[int, object], batch_size: int, seed: int,
               schedule: Sequence[int], shard_index: int, shard_count: int,
               type_key: str | None = None):
    super().__init__()
    schedule = tuple(int(t) for t in schedule)
    if not schedule:
      raise ValueError("schedule is empty: give the type of each step of one cycle, e.g. [1, 2, 1, 3] "
                       "(source, target, source, target)")
    missing = sorted(set(schedule) - set(examples_by_type))
    if missing:
      raise ValueError(f"schedule {list(schedule)} names types {missing} that have no examples; "
                       f"types with examples: {sorted(examples_by_type)}")
    self.schedule = schedule
    self.seed = seed
    self.batch_size = batch_size
    self.type_key = type_key
    self.streams: dict[int, pipeline.TrainBatches] = {}
    for t in sorted(set(schedule)):
      source = examples_by_type[t]
      if len(source) < batch_size:
        raise ValueError(f"type {t} has {len(source)} training examples, fewer than one batch of "
                         f"{batch_size}: lower batch_size or drop type {t} from the schedule")
      self.streams[t] = pipeline.train_batches(source, batch_size, _type_seed(seed, t), None,
                                               shard_index, shard_count)
    # per_cycle[t] = steps of type t per cycle; before[s] = steps of type schedule[s] before s.
    self.per_cycle = {t: schedule.count(t) for t in self.streams}
    self._before = tuple(schedule[:s].count(schedule[s]) for s in range(len(schedule)))

  def __len__(self) -> int:
    return sys.maxsize  # Grain's convention for an endless MapDataset

  def __str__(self) -> str:
    return (f"TypedTrainBatches(schedule={list(self.schedule)}, batch_size={self.batch_size}, "
            f"seed={self.seed}, sizes={ {t: len(s._source) for t, s in self.streams.items()} })")

  def type_of(self, step: int) -> int:
    """The content type of every target in batch `step`."""
    return self.schedule[step % len(self.schedule)]

  def stream_step(self, step: int) -> tuple[int, int]:
    """(type t, index j into type t's stream) that global step `step` reads."""
    if step < 0:
      raise IndexError(f"step {step} must be >= 0")
    cycle, s = divmod(step, len(self.schedule))
    t = self.schedule[s]
    return t, cycle * self.per_cycle[t] + self._before[s]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    t, j = self.stream_step(int(index))
    batch = self.streams[t][j]
    if self.type_key is not None:
      batch = {**batch, self.type_key: np.full((len(batch["target"]),), t, np.int32)}
    return batch


def typed_train_batches(examples_by_type: Mapping[int, object], batch_size: int, seed: int,
                        schedule: Sequence[int] = (1, 2, 1, 3), shard_index: int | None = None,
                        shard_count: int | None = None, type_key: str | None = None) -> TypedTrainBatches:
  """Single-type batches on an alternating schedule (MV-HAN's training; see `TypedTrainBatches`).

  Args:
    examples_by_type: {type t: random-access examples whose targets are of type t}
      (`split_examples_by_type`).
    batch_size: global batch size of every step (all types).
    seed: shuffling seed.
    schedule: the types of the steps of one cycle, repeated forever, e.g. (1, 2, 1, 3) = the
      paper's alternation source, target, source, target with two target types.
    shard_index, shard_count: as in `pipeline.train_batches` (default: the JAX process).
    type_key: if set, every batch gets ``batch[type_key]`` = int32 [B] filled with its type.

  Returns:
    A `grain.MapDataset`; element ``i`` is a dict of arrays with leading axis
    ``batch_size // shard_count``, all of whose targets have type ``ds.type_of(i)``.
  """
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # only for the multi-process defaults
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  return TypedTrainBatches(examples_by_type, batch_size, seed, schedule, shard_index, shard_count,
                           type_key)


# ---------------------------------------------------------------------------------------------
# Per-type negatives.
# ---------------------------------------------------------------------------------------------

def type_samplers(item_counts: np.ndarray, item_type: np.ndarray, name: str = "popularity",
                  alpha: float = 0.75) -> dict[int, Sampler]:
  """One negative sampler per content type: Q_t(i) = 0 outside type t.

  Q_t is `losses.make_sampler` built on the items of type t alone (so 'log_uniform' ranks items
  within their type), scattered into a full-catalogue [I] vector: a zero-probability item has a
  flat CDF step, which `losses.sample_negatives`' inverse-CDF lookup never lands on.

  Args:
    item_counts: int [I] training interactions per item.
    item_type: int [I] types 1..T.
    name, alpha: as in `losses.make_sampler`.

  Returns:
    {t: Sampler with probs float32 [I], summing to 1 over the items of type t} for t in 1..T.
  """
  counts = np.asarray(item_counts)
  item_type = _check_item_type(item_type, len(counts), "item_type (for the samplers)")
  out = {}
  for t in range(1, int(item_type.max()) + 1):
    members = np.flatnonzero(item_type == t)
    if not len(members):
      raise ValueError(f"content type {t} has no items, so it has no negatives: types must be 1..T "
                       "with every type present")
    sub = make_sampler(name, counts[members], alpha)
    probs = np.zeros((len(counts),), np.float32)
    probs[members] = sub.probs
    out[t] = Sampler(f"{name}@type{t}", probs)
  return out


# ---------------------------------------------------------------------------------------------
# Per-type evaluation.
# ---------------------------------------------------------------------------------------------

def _single_targets(eval_set) -> np.ndarray:
  targets = np.asarray(eval_set.targets)
  if targets.ndim != 2 or targets.shape[1] != 1 or (targets.size and targets.min() < 0):
    raise ValueError(f"per-type evaluation needs leave-one-out eval sets (targets [Q, 1], no -1), "
                     f"got targets of shape {targets.shape}: use LeaveOneOutSplit.eval_set")
  return targets[:, 0]


def _csr_rows(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Row ids [nnz] and positions [nnz] of the CSR entries of `rows` (in the order of `rows`)."""
  lens = np.diff(indptr)[rows]
  starts = np.repeat(indptr[rows], lens)
  pos = starts + np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
  return np.repeat(np.arange(len(rows)), lens), pos.astype(np.int64)


def _subset_eval_set(eval_set, rows: np.ndarray, keep_item=None, remap=None) -> EvalSet:
  """Rows `rows` of an EvalSet; exclusions filtered by ``keep_item[id]`` and mapped by ``remap``."""
  indptr = np.asarray(eval_set.exclude_indptr, np.int64)
  indices = np.asarray(eval_set.exclude_indices)
  new_row, pos = _csr_rows(indptr, rows)
  ids = indices[pos]
  if keep_item is not None:
    keep = keep_item[ids]
    new_row, ids = new_row[keep], ids[keep]
  if remap is not None:
    ids = remap[ids]
  # Unique per row (the evaluation counts candidates from these lists).
  key = np.unique(new_row.astype(np.int64) * (int(ids.max(initial=0)) + 1) + ids)
  width = int(ids.max(initial=0)) + 1
  new_row, ids = key // width, key % width
  new_indptr = np.searchsorted(new_row, np.arange(len(rows) + 1)).astype(np.int64)
  return EvalSet(
      user=np.asarray(eval_set.user)[rows], history=np.asarray(eval_set.history)[rows],
      history_len=np.asarray(eval_set.history_len)[rows], exclude_indptr=new_indptr,
      exclude_indices=ids.astype(np.int32),
      targets=np.asarray(eval_set.targets)[rows] if remap is None
      else remap[np.asarray(eval_set.targets)[rows]].astype(np.int32))


def typed_eval_sets(eval_set, item_type: np.ndarray, restrict: bool = False) -> dict[int, EvalSet]:
  """Splits a leave-one-out EvalSet by the content type of each row's target.

  Args:
    eval_set: an `EvalSet` with targets [Q, 1].
    item_type: int [I] types 1..T.
    restrict: if True, every row's exclusion list also holds all items of the other types, so
      a plain `evaluation.LeaveOneOutEvaluator` on the result ranks within the type (the same
      ranks as `TypedEvaluator`, which is cheaper: it scores only the type's items).

  Returns:
    {t: EvalSet of the rows whose target has type t} for t in 1..T (possibly 0 rows), rows in
    the original order, item ids unchanged.
  """
  item_type = _check_item_type(item_type)
  types = item_type[_single_targets(eval_set)]
  out = {}
  for t in range(1, int(item_type.max()) + 1):
    rows = np.flatnonzero(types == t)
    sub = _subset_eval_set(eval_set, rows)
    if restrict:
      others = np.flatnonzero(item_type != t).astype(np.int32)
      lens = np.diff(sub.exclude_indptr)
      row_of = np.repeat(np.arange(len(rows)), lens)
      keep = item_type[sub.exclude_indices] == t  # this type's history; other types come next
      ids = np.concatenate([sub.exclude_indices[keep], np.tile(others, len(rows))])
      row_of = np.concatenate([row_of[keep], np.repeat(np.arange(len(rows)), len(others))])
      order = np.lexsort((ids, row_of))
      sub = dataclasses.replace(
          sub, exclude_indices=ids[order].astype(np.int32),
          exclude_indptr=np.searchsorted(row_of[order], np.arange(len(rows) + 1)).astype(np.int64))
    out[t] = sub
  return out


class TypedEvaluator:
  """Leave-one-out metrics per content type, ranking restricted to the target's type, plus AUC.

  For a row whose target has type t, the candidates are the items of type t that are not in the
  user's exclusion list (their history); items of other types are not ranked at all (MV-HAN's
  "retrieval restricted to one type"). Computed exactly with `evaluation.target_ranks` on the
  type's item subset (ids remapped), so the ranks are pessimistic on ties as everywhere here.

  AUC per row = fraction of the other n candidates scored below the target, ties counting half
  (the ROC AUC of one positive against n negatives; a constant scorer gets 0.5). The count of
  strictly higher scores comes from a second rank pass with negated user vectors (exact: IEEE
  rounding is sign-symmetric), so ``auc_ties='half'`` needs single-vector users [Q, D];
  ``auc_ties='pessimistic'`` (AUC = 1 - rank / n, ties count as above the target) needs one pass
  and also takes multi-interest users.

  `evaluate` returns, with ``{name}`` the type's name:
    '{name}/HR@k', '{name}/NDCG@k', '{name}/MRR', '{name}/AUC'  restricted ranking (the paper's);
    '{name}/pooled_HR@k', '{name}/pooled_NDCG@k'                 same rows, ranked among all items;
    '{name}/queries'                                              rows whose target has type t;
    'HR@k', 'NDCG@k', 'MRR', 'AUC'                                all rows, all items (pooled).
  A type without rows gets NaN metrics and 'queries' 0.
  """

  def __init__(self, eval_set, item_type, ks: Sequence[int] = (10, 50),
               type_names: Sequence[str] | None = None, auc_ties: str = "half", *,
               item_chunk: int = 65536, query_chunk: int = 4096, split: str | None = None):
    self.item_type = _check_item_type(item_type)
    self.split = split  # named in errors (non-finite vectors)
    self.num_types = int(self.item_type.max())
    self.eval_set = eval_set
    self.row_type = self.item_type[_single_targets(eval_set)]
    self.ks = tuple(ks)
    if not self.ks or min(self.ks) < 1:
      raise ValueError(f"ks must be positive cut-offs, got {ks}")
    if type_names is None:
      type_names = tuple(f"type{t}" for t in range(1, self.num_types + 1))
    if len(type_names) != self.num_types:
      raise ValueError(f"type_names has {len(type_names)} names but item_type holds types "
                       f"1..{self.num_types}: give one name per type (the names "
                       "add_movielens_content_types returns)")
    self.type_names = tuple(type_names)
    if auc_ties not in ("half", "pessimistic"):
      raise ValueError(f"auc_ties={auc_ties!r}: use 'half' (ROC AUC) or 'pessimistic'")
    self.auc_ties = auc_ties
    self.item_chunk, self.query_chunk = item_chunk, query_chunk
    # All rows with de-duplicated exclusion lists (the candidate counts of AUC rely on it).
    self._full = _subset_eval_set(eval_set, np.arange(len(self.row_type)))
    # Per type: the rows, the type's items, and the rows' EvalSet in the subset's local ids.
    self._typed = {}
    for t in range(1, self.num_types + 1):
      rows = np.flatnonzero(self.row_type == t)
      members = np.flatnonzero(self.item_type == t)
      remap = np.full((len(self.item_type),), -1, np.int64)
      remap[members] = np.arange(len(members))
      sub = _subset_eval_set(eval_set, rows, keep_item=self.item_type == t, remap=remap)
      self._typed[t] = (rows, members, sub)

  def _ranks(self, users, items, es, user_mask):
    """(>= counts, > counts or None, candidates besides the target) for the rows of `es`."""
    kw = dict(exclude_indptr=es.exclude_indptr, exclude_indices=es.exclude_indices,
              item_chunk=self.item_chunk, query_chunk=self.query_chunk, split=self.split)
    ge = evaluation.target_ranks(users, items, es.targets, query_mask=user_mask, **kw)
    n = len(items) - 1 - np.diff(es.exclude_indptr)
    if self.auc_ties == "pessimistic":
      return ge, None, n
    # With negated queries, the >= count is #{s_i <= s_target}; the rest are strictly above.
    le = evaluation.target_ranks(-users, items, es.targets, query_mask=user_mask, **kw)
    return ge, n - le, n

  def per_user(self, user_vectors, item_vectors, user_mask=None) -> dict[str, np.ndarray]:
    """Per-row arrays [Q]: 'type', 'rank' / 'auc' (pooled), 'typed_rank' / 'typed_auc', and the pooled
    'HR@k' / 'NDCG@k' / 'RR' of `evaluation.leave_one_out_per_user` (as the leave-one-out evaluator's)."""
    users = np.asarray(user_vectors, np.float32)
    items = np.asarray(item_vectors, np.float32)
    if users.shape[0] != len(self.row_type):
      raise ValueError(f"user_vectors has {users.shape[0]} rows but the eval set has "
                       f"{len(self.row_type)} queries: one vector per eval-set row, in order")
    if items.shape[0] != len(self.item_type):
      raise ValueError(f"item_vectors has {items.shape[0]} rows but item_type has "
                       f"{len(self.item_type)}: encode the whole catalogue")
    if self.auc_ties == "half" and (users.ndim != 2 or user_mask is not None):
      raise ValueError("auc_ties='half' needs single-vector users [Q, D] (the negation trick does "
                       "not hold for a max over interests): use auc_ties='pessimistic'")
    ge, gt, n = self._ranks(users, items, self._full, user_mask)
    out = {"type": self.row_type, "rank": ge,
           "auc": evaluation.target_auc(ge, n, gt),
           "typed_rank": np.zeros_like(ge), "typed_auc": np.full(ge.shape, np.nan)}
    for t, (rows, members, sub) in self._typed.items():
      if not len(rows):
        continue
      mask = None if user_mask is None else np.asarray(user_mask)[rows]
      tge, tgt, tn = self._ranks(users[rows], items[members], sub, mask)
      out["typed_rank"][rows] = tge
      out["typed_auc"][rows] = evaluation.target_auc(tge, tn, tgt)
    out.update({k: v for k, v in evaluation.leave_one_out_per_user(ge, self.ks).items() if k != "rank"})
    return out

  def evaluate(self, user_vectors, item_vectors, user_mask=None) -> dict[str, float]:
    """Mean metrics (see the class docstring for the names)."""
    per = self.per_user(user_vectors, item_vectors, user_mask)
    out = evaluation.leave_one_out_metrics(per["rank"], self.ks)
    out["AUC"] = float(np.nanmean(per["auc"])) if len(per["auc"]) else float("nan")
    for t, name in enumerate(self.type_names, start=1):
      rows = per["type"] == t
      out[f"{name}/queries"] = float(rows.sum())
      if not rows.any():
        for k in self.ks:
          for m in ("HR", "NDCG", "pooled_HR", "pooled_NDCG"):
            out[f"{name}/{m}@{k}"] = float("nan")
        out[f"{name}/MRR"] = out[f"{name}/AUC"] = float("nan")
        continue
      for key, v in evaluation.leave_one_out_metrics(per["typed_rank"][rows], self.ks).items():
        out[f"{name}/{key}"] = v
      for key, v in evaluation.leave_one_out_metrics(per["rank"][rows], self.ks).items():
        if "@" in key:
          out[f"{name}/pooled_{key}"] = v
      auc = per["typed_auc"][rows]
      out[f"{name}/AUC"] = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
    return out
