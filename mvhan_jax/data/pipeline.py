"""Input pipeline: deterministic, resumable, sharded training batches as a Grain `MapDataset`.

``ds = train_batches(source, batch_size, seed)``; ``ds[i]`` is the batch of global step ``i``: a dict
of numpy arrays stacked along a leading batch axis. It is a pure function of (source, batch_size,
seed, shard, i): epoch ``e = i // steps_per_epoch`` visits the examples in the permutation
``default_rng([seed, e])``, so a resumed run continues from any step exactly and every epoch has a
different order. The last incomplete global batch of each epoch is dropped.

Why the training records are held in memory: TFDS decodes every record with a generic per-feature
protobuf parser (~100-250 us per record; `tfds.data_source` reads one record at a time at ~1k/s
and ``__getitems__`` at ~5-12k/s on the 2-core dev machine), so reading the ArrayRecord split per
batch would starve the accelerator. `movielens_train_source` instead reads the split once, in large
batched reads, into numpy arrays (MovieLens-100k at maxlen 50: 97k examples, ~20 MB), and batches
are then a single fancy-indexing gather (see ``experiments/bench_pipeline.py`` for the numbers).
Any random-access source still works with `train_batches`: it uses ``take(indices)`` (a dict of
stacked arrays) if the source has it, else ``__getitems__``, else one read per record.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

Batch = dict[str, np.ndarray]


class ArraySource:
  """A random-access source over parallel numpy arrays (one row per example).

  ``source[i]`` is a dict of row ``i``; ``source.take(indices)`` gathers a whole batch at once.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: len(v) for k, v in arrays.items()}
    if not arrays or len(set(lengths.values())) != 1:
      raise ValueError(f"ArraySource needs >= 1 array, all of one length; got lengths {lengths}")
    self.arrays = arrays
    self._len = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    return [self[int(i)] for i in indices]

  def take(self, indices: np.ndarray) -> Batch:
    """Rows ``indices`` of every array: dict of [len(indices), ...] arrays."""
    return {k: v[indices] for k, v in self.arrays.items()}

  def __repr__(self) -> str:
    shapes = {k: (v.shape, str(v.dtype)) for k, v in self.arrays.items()}
    return f"ArraySource({shapes})"


def _dtypes(source) -> dict[str, np.dtype] | None:
  """Per-field dtypes of a TFDS source (its decoder returns scalars as Python ints)."""
  info = getattr(source, "dataset_info", None)
  if info is None:
    return None
  return {k: np.dtype(f.np_dtype) for k, f in info.features.items()}


def _stack(records: Sequence[Mapping[str, Any]], dtypes: Mapping[str, np.dtype] | None = None) -> Batch:
  dtypes = dtypes or {}
  return {k: np.stack([np.asarray(r[k], dtypes.get(k)) for r in records]) for k in records[0]}


def _read(source, indices: np.ndarray) -> Batch:
  if hasattr(source, "take"):
    return source.take(indices)
  idx = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return _stack(source.__getitems__(idx), _dtypes(source))
  return _stack([source[i] for i in idx], _dtypes(source))


class TrainBatches(grain.MapDataset):
  """``ds[i]`` = this shard's part of the global batch of step ``i`` (see `train_batches`)."""

  def __init__(self, source, batch_size: int, seed: int, num_epochs: int | None, shard_index: int,
               shard_count: int):
    super().__init__()
    n = len(source)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
      raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
                       f"shard_count={shard_count}")
    if batch_size % shard_count:
      raise ValueError(f"batch_size={batch_size} is the global batch and must be divisible by "
                       f"shard_count={shard_count}: pick a multiple of the number of processes")
    if n < batch_size:
      raise ValueError(f"source has {n} examples, fewer than one global batch of {batch_size} "
                       "(the remainder is dropped): lower batch_size")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None (infinite), got {num_epochs}")
    self._source = source
    self._num_examples = n
    self.batch_size = batch_size
    self.per_shard = batch_size // shard_count
    self.seed = seed
    self.num_epochs = num_epochs
    self.shard_index = shard_index
    self.shard_count = shard_count
    self.steps_per_epoch = n // batch_size
    self._lock = threading.Lock()
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    # Grain's convention for an infinite MapDataset is sys.maxsize.
    return sys.maxsize if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

  def __str__(self) -> str:
    return (f"TrainBatches(n={self._num_examples}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shard={self.shard_index}/{self.shard_count})")

  def permutation(self, epoch: int) -> np.ndarray:
    """int64 [n] the example order of `epoch`, a pure function of (seed, epoch)."""
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self._num_examples)
        # Prefetch threads work on at most two adjacent epochs at a time.
        self._perms = {e: p for e, p in self._perms.items() if abs(e - epoch) <= 1}
        self._perms[epoch] = perm
      return perm

  def indices(self, step: int) -> np.ndarray:
    """int64 [per_shard] the example indices of this shard's part of global batch `step`."""
    if not 0 <= step < len(self):
      raise IndexError(f"step {step} out of range [0, {len(self)})")
    epoch, b = divmod(step, self.steps_per_epoch)
    start = b * self.batch_size + self.shard_index * self.per_shard
    return self.permutation(epoch)[start:start + self.per_shard]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return _read(self._source, self.indices(int(index)))


def train_batches(source, batch_size: int, seed: int, num_epochs: int | None = None,
                  shard_index: int | None = None, shard_count: int | None = None) -> TrainBatches:
  """Shuffled, sharded, drop-remainder batches with random access by global step.

  Args:
    source: random-access examples (``len`` and ``[i]``; ``take``/``__getitems__`` for speed).
    batch_size: the *global* batch size; each of the `shard_count` processes gets
      ``batch_size // shard_count`` examples of every global batch, disjoint across processes.
    seed: shuffling seed; epoch ``e`` uses the permutation ``np.random.default_rng([seed, e])``.
    num_epochs: number of epochs, or None for an endless dataset.
    shard_index, shard_count: default ``jax.process_index()`` / ``jax.process_count()``.

  Returns:
    A `grain.MapDataset` whose element ``i`` is a dict of arrays with leading axis
    ``batch_size // shard_count``; ``len`` is ``num_epochs * (len(source) // batch_size)``.
  """
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # only for the multi-process defaults
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  return TrainBatches(source, batch_size, seed, num_epochs, shard_index, shard_count)


def iterate(ds: grain.MapDataset, start_step: int = 0, prefetch: int = 2) -> Iterator[Batch]:
  """Iterates ``ds[start_step:]``, preparing up to `prefetch` batches on a background thread.

  ``prefetch=0`` reads synchronously (a plain generator). Otherwise a Grain iterator with one reader
  thread: over the in-memory source a batch is one numpy gather of ~0.1 ms, and 1, 2 or 4 threads
  all measured 2-3M examples/s (no consistent difference) on the 2-core dev machine.
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  sub = ds[start_step:]
  if prefetch <= 0:
    return (sub[i] for i in range(len(sub)))
  return iter(sub.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))


def _raw_int_decoder(source):
  """A fast decoder of TFDS records whose features are all integer tensors, or None.

  TFDS stores such features as ``int64_list`` in a ``tf.train.Example``; parsing that proto
  directly skips TFDS' generic per-feature machinery (~2x faster in total). Callers verify its
  output against the TFDS decoder.
  """
  raw = getattr(source, "data_source", None)  # the underlying array_record source (raw bytes)
  info = getattr(source, "dataset_info", None)
  if raw is None or info is None or not hasattr(raw, "__getitems__"):
    return None
  try:
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  feats = info.features
  shapes = {}
  for k, f in feats.items():
    shape = tuple(f.shape)
    if not np.issubdtype(np.dtype(f.np_dtype), np.integer) or any(d is None or d < 0 for d in shape):
      return None
    shapes[k] = (shape, np.dtype(f.np_dtype))

  def decode(indices: Sequence[int]) -> Batch:
    out = {k: np.empty((len(indices), *shape), dt) for k, (shape, dt) in shapes.items()}
    ex = tf_example_pb2.Example()
    for j, rec in enumerate(raw.__getitems__(list(indices))):
      ex.ParseFromString(rec)
      f = ex.features.feature
      for k, (shape, _) in shapes.items():
        v = f[k].int64_list.value
        out[k][j] = np.asarray(v).reshape(shape) if shape else v[0]
    return out

  return decode


def load_arrays(source, chunk: int = 8192) -> dict[str, np.ndarray]:
  """Reads a whole random-access source with batched reads into stacked numpy arrays.

  TFDS sources of fixed-shape integer features are decoded by a direct protobuf parse (checked
  against TFDS' own decoder on the first record of every chunk); others via ``__getitems__``.
  """
  n = len(source)
  if n == 0:
    raise ValueError("source is empty")
  fast = _raw_int_decoder(source)
  dtypes = _dtypes(source)
  parts = []
  for start in range(0, n, chunk):
    idx = list(range(start, min(start + chunk, n)))
    part = fast(idx) if fast is not None else None
    if part is not None:
      ref = source[idx[0]]
      if ref.keys() != part.keys() or any(not np.array_equal(np.asarray(ref[k]), part[k][0]) for k in ref):
        fast, part = None, None  # an encoding we do not understand: use TFDS' decoder from now on
    if part is None:
      recs = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
      part = _stack(recs, dtypes)
    parts.append(part)
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@functools.lru_cache(maxsize=4)
def _cached_source(data_dir: str | None, maxlen: int) -> ArraySource:
  from mvhan_jax.data import tfds_movielens  # pylint: disable=g-import-not-at-top  # TFDS is heavy
  return ArraySource(tfds_movielens.train_arrays(load_arrays, data_dir, maxlen))  # checked against its checksum


def movielens_train_source(data_dir: str | None = None, maxlen: int = 50) -> ArraySource:
  """The leave-one-out training examples of MovieLens-100k, read through `tfds.data_source`.

  Builds the TFDS ArrayRecord dataset under ``<data_dir>/tfds`` if missing, then loads the
  ``train`` split into memory once per process (cached; checked against the checksum recorded when
  it was built, and rebuilt with a warning when it fails: `tfds_movielens.train_arrays`): fields ``user`` int32 [N],
  ``history`` int32 [N, maxlen], ``history_len`` int32 [N], ``target`` int32 [N].
  """
  return _cached_source(data_dir, maxlen)
