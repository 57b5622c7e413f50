"""Your own interaction log: from CSV / TSV / Parquet files to training shards and an `InteractionData`.

A log is one file or a glob of shards (``.csv``, ``.tsv``, ``.parquet``/``.pq``, each optionally
``.gz``), read with pyarrow in record batches, so it is never held whole in memory. Its columns are
named by `LogSpec` (``config.dataset`` of ``experiments/configs/interactions.py``): user, item and
time (epoch seconds or ISO-8601 datetimes), optionally a rating; optional item and user feature
files (categorical, multi-valued with a separator, dense float vectors, a title), each with its key.

Conversion (`convert`, the default single-machine engine; `mvhan_jax.data.beam_ingest` runs the same
steps as an Apache Beam pipeline and writes identical files):

  1. parse every file batch by batch; write the parsed columns to temporary Parquet parts and keep
     only the distinct raw user and item ids;
  2. raw ids -> dense ids: sorted numerically when every id of the column is an integer, else as
     strings; users are cut into ``shards`` contiguous ranges of ids, and every parsed row is
     appended to its range's bucket file;
  3. bucket by bucket, in id order: sort each user's events by (time, item id), drop exact
     duplicates (same user, item, time and rating) and users with fewer than ``min_events`` events
     (both counted and printed), renumber the users left (monotonically, so ranges stay contiguous),
     and write the bucket's leave-one-out training examples as one ArrayRecord shard plus its events.

Peak memory is one batch, the distinct ids and one bucket. The result is a folder under
``<data_dir>/logs/`` keyed by the spec and the input files' names, sizes and mtimes, built in a
temporary folder and renamed when complete (an interrupted or failed conversion leaves nothing):

  manifest.json                                   spec, counts, dropped rows, sha256 of every file
  users.parquet / items.parquet                   ``raw_id`` (and ``title``) in dense-id order
  events-BBBBB.{user,item,timestamp,rating}.npy   the kept events of shard B, sorted (user, time, item)
  train-BBBBB-of-NNNNN.array_record               shard B's training examples (`ExampleCodec`)
  features/{user,item}.<name>.npy                 feature arrays (see `types.InteractionData`)

The training examples are exactly ``protocol.training_examples(leave_one_out(data).train_sequences,
maxlen)`` in that order (tested), read per batch through Grain's ArrayRecord source
(`ShardedExamples`), so a log larger than memory trains without being loaded.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mvhan_jax import errors
from mvhan_jax import workdir as wd
from mvhan_jax.data import locks, protocol
from mvhan_jax.data.types import InteractionData

FORMAT_VERSION = 1
BATCH_ROWS = 1 << 20          # rows per parsed batch (CSV: bytes per block, see `_csv_batches`)
CSV_BLOCK_BYTES = 16 << 20
ROWS_PER_SHARD = 2_000_000    # automatic shard count: one shard per this many log rows
MAX_AUTO_SHARDS = 256


class LogError(errors.UserError, ValueError):
  """A log or feature file that cannot be used: the message names the file, the column and the fix."""


# ---------------------------------------------------------------------------------------------
# The spec: what the config names.
# ---------------------------------------------------------------------------------------------

def _columns(value) -> tuple[str, ...]:
  """'a,b' / ('a', 'b') / '' / None -> a tuple of column names."""
  if not value:
    return ()
  if isinstance(value, str):
    return tuple(c.strip() for c in value.split(",") if c.strip())
  return tuple(str(c) for c in value)


@dataclasses.dataclass(frozen=True)
class FeatureFileSpec:
  """A user or item feature file: one row per key (raw id as in the log)."""

  path: str
  key: str
  categorical: tuple[str, ...] = ()
  multi: tuple[str, ...] = ()       # strings of values joined by `separator`
  separator: str = "|"
  max_values: int = 16              # multi-valued features keep their first this many values
  dense: tuple[str, ...] = ()       # list<float> columns, or strings of numbers split by spaces/commas/;
  title: str = ""                   # item files: a display name for `recommend`
  type: str = ""                    # item files: MV-HAN's content type (any values -> feature 'type' 1..T)

  def columns(self) -> tuple[str, ...]:
    extra = tuple(c for c in (self.title, self.type) if c)
    return tuple(dict.fromkeys((self.key, *self.categorical, *self.multi, *self.dense, *extra)))


@dataclasses.dataclass(frozen=True)
class LogSpec:
  """An interaction log and how to read it (``config.dataset`` of the interactions config)."""

  path: str
  user_column: str
  item_column: str
  time_column: str
  rating_column: str = ""
  min_events: int = 3
  maxlen: int = 50
  shards: int = 0                   # 0: one per ROWS_PER_SHARD log rows
  item_features: FeatureFileSpec | None = None
  user_features: FeatureFileSpec | None = None

  def log_columns(self) -> tuple[str, ...]:
    return (self.user_column, self.item_column, self.time_column,
            *((self.rating_column,) if self.rating_column else ()))


def _feature_spec(node) -> FeatureFileSpec | None:
  if node is None or not node.get("path"):
    return None
  if not node.get("key"):
    raise LogError(f"config.dataset.*_features.path={node.path!r} needs its key column: set "
                   "config.dataset.item_features.key (or user_features.key) to the column holding the raw id")
  return FeatureFileSpec(
      path=str(node.path), key=str(node.key), categorical=_columns(node.get("categorical")),
      multi=_columns(node.get("multi")), separator=str(node.get("separator") or "|"),
      max_values=int(node.get("max_values") or 16), dense=_columns(node.get("dense")),
      title=str(node.get("title") or ""), type=str(node.get("type") or ""))


def spec_from_config(config) -> LogSpec:
  """The `LogSpec` of ``config.dataset`` (see ``experiments/configs/interactions.py``)."""
  d = config.dataset
  missing = [f for f in ("path", "user_column", "item_column", "time_column") if not d.get(f)]
  if missing:
    raise LogError("config.dataset." + missing[0] + " is not set: an interaction log needs --config.dataset.path "
                   "(a file or a glob of CSV/TSV/Parquet shards) and --config.dataset.user_column, "
                   "--config.dataset.item_column, --config.dataset.time_column naming its columns")
  return LogSpec(path=str(d.path), user_column=str(d.user_column), item_column=str(d.item_column),
                 time_column=str(d.time_column), rating_column=str(d.get("rating_column") or ""),
                 min_events=int(d.get("min_events", 3)), maxlen=int(config.maxlen),
                 shards=int(d.get("shards") or 0), item_features=_feature_spec(d.get("item_features")),
                 user_features=_feature_spec(d.get("user_features")))


# ---------------------------------------------------------------------------------------------
# Reading files with pyarrow.
# ---------------------------------------------------------------------------------------------

def _format(path: str) -> str:
  name = path[:-3] if path.endswith(".gz") else path
  ext = os.path.splitext(name)[1].lower()
  if ext in (".csv", ".tsv"):
    return ext[1:]
  if ext in (".parquet", ".pq"):
    return "parquet"
  raise LogError(f"{path}: unknown file type {ext or '(none)'!r}: use .csv, .tsv or .parquet (optionally .gz)")


def expand(pattern: str, what: str = "config.dataset.path") -> list[str]:
  """The files of a path or glob, sorted; a clear error when there are none."""
  if any(ch in pattern for ch in "*?["):
    files = sorted(f for f in globlib.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    if not files:
      raise LogError(f"{what}={pattern!r} matches no file: check the folder and the pattern")
    return files
  path = os.path.expanduser(pattern)
  if not os.path.isfile(path):
    raise LogError(f"{what}={pattern!r} does not exist: give an existing file or a glob of shards")
  return [path]


def _check_columns(path: str, available: Sequence[str], wanted: Sequence[str], what: str) -> None:
  for col in wanted:
    if col not in available:
      raise LogError(f"{path}: no column {col!r} (set by {what}); the file has columns "
                     f"{', '.join(map(repr, available))}: fix the column name")


def _csv_options(path: str):
  delim = "\t" if _format(path) == "tsv" else ","
  return pacsv.ParseOptions(delimiter=delim)


def _csv_header(path: str) -> list[str]:
  try:
    reader = pacsv.open_csv(path, parse_options=_csv_options(path),
                            read_options=pacsv.ReadOptions(block_size=1 << 16))
  except pa.ArrowInvalid as e:
    if "empty" in str(e).lower():
      raise LogError(f"{path} is empty: give a file with a header line and rows") from None
    raise LogError(f"{path} cannot be read as {_format(path).upper()}: {str(e).splitlines()[0]}") from None
  return list(reader.schema.names)


def _arrow_error(path: str, e: Exception, header: Sequence[str] = ()) -> LogError:
  msg = str(e).splitlines()[0]
  m = re.search(r"column #(\d+)", msg)
  col = header[int(m.group(1))] if m and int(m.group(1)) < len(header) else None
  where = f"column {col!r}: " if col else ""
  return LogError(f"{path}: {where}{msg}: the column holds values of more than one type (e.g. numbers, then "
                  "text, or an unparsable time): make every value of that column the same type, or fix those rows")


def read_batches(path: str, columns: Sequence[str], what: str, string_columns: Sequence[str] = ()) -> Iterator[pa.RecordBatch]:
  """Record batches of ``columns`` of one file (CSV/TSV: ``string_columns`` read as text)."""
  fmt = _format(path)
  if fmt == "parquet":
    try:
      f = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
      raise LogError(f"{path} cannot be read as Parquet ({str(e).splitlines()[0]}): check the file") from None
    _check_columns(path, f.schema_arrow.names, columns, what)
    if f.metadata.num_rows == 0:
      raise LogError(f"{path} has no rows: remove it from the log or give a file with interactions")
    for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=list(columns)):
      yield batch
    return
  header = _csv_header(path)
  _check_columns(path, header, columns, what)
  convert = pacsv.ConvertOptions(include_columns=list(columns),
                                 column_types={c: pa.string() for c in string_columns})
  reader = pacsv.open_csv(path, parse_options=_csv_options(path), convert_options=convert,
                          read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES))
  rows = 0
  while True:
    try:
      batch = reader.read_next_batch()
    except StopIteration:
      break
    except pa.ArrowInvalid as e:
      raise _arrow_error(path, e, header) from None
    rows += batch.num_rows
    yield batch
  if rows == 0:
    raise LogError(f"{path} has a header but no rows: remove it from the log or give a file with interactions")


def read_table(path: str, columns: Sequence[str], what: str, string_columns: Sequence[str] = ()) -> pa.Table:
  batches = list(read_batches(path, columns, what, string_columns))
  return pa.Table.from_batches(batches).select(list(columns))


# ---------------------------------------------------------------------------------------------
# Column normalisation.
# ---------------------------------------------------------------------------------------------

def _as_id_strings(arr: pa.Array, path: str, column: str) -> pa.Array:
  if arr.null_count:
    raise LogError(f"{path}: column {column!r} has {arr.null_count} empty values: every row needs a "
                   f"{column}; drop those rows")
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    return arr.cast(pa.string())
  if pa.types.is_integer(arr.type):
    return arr.cast(pa.int64()).cast(pa.string())
  raise LogError(f"{path}: column {column!r} has type {arr.type}: ids must be integers or strings")


def _seconds(arr: pa.Array, path: str, column: str) -> np.ndarray:
  """int64 epoch seconds of a time column: integers/floats as epoch seconds, ISO-8601 datetimes."""
  if arr.null_count:
    raise LogError(f"{path}: column {column!r} has {arr.null_count} empty values: every row needs a time")
  t = arr.type
  if pa.types.is_integer(t):
    return arr.cast(pa.int64()).to_numpy()
  if pa.types.is_floating(t):
    return np.floor(arr.to_numpy()).astype(np.int64)
  if pa.types.is_timestamp(t) or pa.types.is_date(t):
    ts = arr.cast(pa.timestamp("s", tz=getattr(t, "tz", None))) if pa.types.is_timestamp(t) else arr.cast(pa.timestamp("s"))
    return ts.cast(pa.int64()).to_numpy()
  if pa.types.is_string(t) or pa.types.is_large_string(t):
    try:
      return pc.cast(arr, pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      pass
    # ISO-8601: a datetime without a zone is taken as UTC, a date alone as its midnight (UTC).
    iso = pc.utf8_trim_whitespace(arr)
    iso = pc.replace_substring_regex(iso, r"^(\d{4}-\d\d-\d\d)$", r"\1T00:00:00")
    iso = pc.replace_substring_regex(iso, r"^(.*\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?)$", r"\1+00:00")
    try:
      us = pc.cast(iso, pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
      return np.floor_divide(us, 1_000_000)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      pass
    bad = next((s for s in arr.to_pylist() if len(arr) > 1 and not _parses_as_time(s)), arr[0].as_py())
    raise LogError(f"{path}: column {column!r} has a value {bad!r} that is neither epoch seconds nor an "
                   "ISO-8601 datetime (e.g. 2024-03-01T12:30:00): fix or drop those rows")
  raise LogError(f"{path}: column {column!r} has type {t}: use epoch seconds or ISO-8601 datetimes")


def _is_int(s) -> bool:
  return isinstance(s, str) and re.fullmatch(r"[+-]?\d+", s.strip() or "x") is not None


def _parses_as_time(s) -> bool:
  try:
    _seconds(pa.array([s], pa.string()), "", "")
    return True
  except LogError:
    return False


def _ratings(arr: pa.Array, path: str, column: str) -> np.ndarray:
  if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
    try:
      arr = pc.cast(arr, pa.float64())
    except pa.ArrowInvalid:
      raise LogError(f"{path}: column {column!r} (config.dataset.rating_column) holds non-numbers: "
                     "use a numeric column, or leave rating_column empty") from None
  return np.nan_to_num(arr.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Dense ids.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class IdMap:
  """Raw ids in dense-id order, as strings (`lookup` key) and as the values to show (int or str)."""

  keys: pa.Array        # string, dense id = position
  numeric: bool

  @classmethod
  def from_unique(cls, unique: pa.Array) -> "IdMap":
    values = unique.to_pylist()
    numeric = all(_is_int(v) and (v == str(int(v))) for v in values)
    order = sorted(values, key=int) if numeric else sorted(values)
    return cls(pa.array(order, pa.string()), numeric)

  def __len__(self) -> int:
    return len(self.keys)

  def lookup(self, raw: pa.Array) -> np.ndarray:
    """int64 dense ids of raw id strings, -1 where unknown."""
    idx = pc.index_in(raw, value_set=self.keys)
    return idx.fill_null(-1).to_numpy().astype(np.int64)

  def raw_values(self) -> pa.Array:
    return self.keys.cast(pa.int64()) if self.numeric else self.keys


def _merge_unique(parts: list[pa.Array]) -> pa.Array:
  return pc.unique(pa.chunked_array(parts, pa.string()).combine_chunks()) if parts else pa.array([], pa.string())


# ---------------------------------------------------------------------------------------------
# Training examples: fixed-size records.
# ---------------------------------------------------------------------------------------------

class ExampleCodec:
  """One training example as ``3 + maxlen`` little-endian int32: user, history_len, target, history."""

  def __init__(self, maxlen: int):
    self.maxlen = maxlen
    self.width = 3 + maxlen

  def encode(self, ex: dict[str, np.ndarray]) -> list[bytes]:
    rows = np.concatenate([ex["user"][:, None], ex["history_len"][:, None], ex["target"][:, None],
                           ex["history"]], axis=1).astype("<i4")
    return [r.tobytes() for r in rows]

  def decode(self, records: Sequence[bytes]) -> dict[str, np.ndarray]:
    rows = np.frombuffer(b"".join(records), "<i4").reshape(len(records), self.width)
    return {"user": rows[:, 0].astype(np.int32), "history": rows[:, 3:].astype(np.int32),
            "history_len": rows[:, 1].astype(np.int32), "target": rows[:, 2].astype(np.int32)}


class ShardedExamples:
  """The training examples of a converted log, read per batch from its ArrayRecord shards."""

  def __init__(self, folder: str):
    import grain  # pylint: disable=import-outside-toplevel
    manifest = read_manifest(folder)
    self.codec = ExampleCodec(manifest["maxlen"])
    files = [os.path.join(folder, f) for f in manifest["train_shards"]]
    self._files = files
    self._source = grain.sources.ArrayRecordDataSource(files)
    self._len = len(self._source)
    if self._len != manifest["counts"]["train_examples"]:
      raise LogError(f"{folder}: the training shards hold {self._len} examples, the manifest says "
                     f"{manifest['counts']['train_examples']}: delete the folder to convert the log again")

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.take(np.array([index])).items()}

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return self.codec.decode(self._source.__getitems__([int(i) for i in indices]))

  def nbytes(self) -> int:
    return self._len * self.codec.width * 4

  def load_all(self) -> dict[str, np.ndarray]:
    """Every example, read shard by shard sequentially (far faster than per-record random access)."""
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    parts = []
    for path in self._files:
      reader = array_record_module.ArrayRecordReader(path)
      n = reader.num_records()
      for start in range(0, n, 1 << 18):
        parts.append(self.codec.decode(reader.read(list(range(start, min(n, start + (1 << 18)))))))
      reader.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


# ---------------------------------------------------------------------------------------------
# One bucket: sort, de-duplicate, filter, renumber, examples.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Bucket:
  """The processed events of one user range (before renumbering by the global offset)."""

  user: np.ndarray        # int64 old (pre-filter) dense ids, sorted with time, item
  item: np.ndarray
  timestamp: np.ndarray
  rating: np.ndarray | None
  kept_users: np.ndarray  # int64 old ids of the users kept, ascending
  duplicates: int
  short_users: int
  short_events: int


def process_bucket(user, item, timestamp, rating, min_events: int) -> Bucket:
  """Sorts by (user, time, item, rating), drops exact duplicates and users with < min_events events."""
  keys = (item, timestamp, user) if rating is None else (rating, item, timestamp, user)
  order = np.lexsort(keys)
  user, item, timestamp = user[order], item[order], timestamp[order]
  rating = None if rating is None else rating[order]
  dup = np.zeros(len(user), bool)
  if len(user) > 1:
    same = (user[1:] == user[:-1]) & (item[1:] == item[:-1]) & (timestamp[1:] == timestamp[:-1])
    if rating is not None:
      same &= rating[1:] == rating[:-1]
    dup[1:] = same
  keep = ~dup
  user, item, timestamp = user[keep], item[keep], timestamp[keep]
  rating = None if rating is None else rating[keep]
  users, counts = np.unique(user, return_counts=True)
  short = counts < min_events
  ok = np.isin(user, users[short], invert=True)
  return Bucket(user[ok], item[ok], timestamp[ok], None if rating is None else rating[ok], users[~short],
                int(dup.sum()), int(short.sum()), int(counts[short].sum()))


USERS_PER_CHUNK = 4096  # examples are built and written this many users at a time (bounds the memory)


def bucket_outputs(b: Bucket, offset: int, maxlen: int, codec: ExampleCodec) -> tuple[dict[str, np.ndarray], Iterator[list[bytes]]]:
  """(events with final user ids, the encoded leave-one-out training examples in chunks of users)."""
  new_user = (np.searchsorted(b.kept_users, b.user) + offset).astype(np.int32)
  bounds = np.searchsorted(new_user, np.arange(offset, offset + len(b.kept_users) + 1))
  items = b.item.astype(np.int32)

  def chunks():
    for lo in range(0, len(b.kept_users), USERS_PER_CHUNK):
      hi = min(lo + USERS_PER_CHUNK, len(b.kept_users))
      seqs = [items[bounds[j]:bounds[j + 1]][:-2] for j in range(lo, hi)]
      ex = protocol.training_examples(seqs, maxlen)
      if len(ex["target"]):
        ex["user"] = (ex["user"] + offset + lo).astype(np.int32)
        yield codec.encode(ex)

  events = {"user": new_user, "item": items, "timestamp": b.timestamp.astype(np.int64)}
  if b.rating is not None:
    events["rating"] = b.rating.astype(np.float32)
  return events, chunks()


def map_and_split(table: pa.Table, user_ids: "IdMap", item_ids: "IdMap", shards: int) -> Iterator[tuple[int, pa.Table]]:
  """Parsed rows with dense (pre-filter) ids, split by shard: (shard, table) for each non-empty shard."""
  u = user_ids.lookup(table.column("user").combine_chunks())
  i = item_ids.lookup(table.column("item").combine_chunks())
  cols = {"user": u, "item": i, "timestamp": table.column("timestamp").to_numpy()}
  if "rating" in table.column_names:
    cols["rating"] = table.column("rating").to_numpy()
  s = shard_of(u, len(user_ids), shards)
  order = np.argsort(s, kind="stable")
  bounds = np.searchsorted(s[order], np.arange(shards + 1))
  for b in range(shards):
    sel = order[bounds[b]:bounds[b + 1]]
    if len(sel):
      yield b, pa.table({k: v[sel] for k, v in cols.items()})


def bucket_from_table(table: pa.Table | None, spec: "LogSpec") -> Bucket:
  """`process_bucket` of a shard's rows (None: a shard without rows)."""
  if table is None:
    e = np.zeros((0,), np.int64)
    return Bucket(e, e, e, np.zeros((0,), np.float32) if spec.rating_column else None, e, 0, 0, 0)
  col = lambda k: table.column(k).to_numpy() if k in table.column_names else None
  return process_bucket(col("user"), col("item"), col("timestamp"), col("rating"), spec.min_events)


def shard_of(old_user: np.ndarray, num_users: int, shards: int) -> np.ndarray:
  """The shard (contiguous user range) of every pre-filter dense user id."""
  return (old_user.astype(np.int64) * shards // max(num_users, 1)).astype(np.int64)


def auto_shards(rows: int, requested: int) -> int:
  return requested if requested > 0 else int(min(MAX_AUTO_SHARDS, max(1, -(-rows // ROWS_PER_SHARD))))


def shard_name(b: int, n: int) -> str:
  return f"train-{b:05d}-of-{n:05d}.array_record"


def write_bucket_files(folder: str, b: int, n: int, events: dict[str, np.ndarray], chunks: Iterator[list[bytes]]) -> int:
  """Writes shard ``b``'s events and training examples; returns the number of examples."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  for k, v in events.items():
    np.save(os.path.join(folder, f"events-{b:05d}.{k}.npy"), v)
  # group_size:1: every record is its own chunk, so random access reads one record, not a group.
  writer = array_record_module.ArrayRecordWriter(os.path.join(folder, shard_name(b, n)), "group_size:1")
  count = 0
  for records in chunks:
    for r in records:
      writer.write(r)
    count += len(records)
  writer.close()
  return count


# ---------------------------------------------------------------------------------------------
# Features.
# ---------------------------------------------------------------------------------------------

def _feature_values(table: pa.Table, col: str) -> list:
  return table.column(col).to_pylist()


def _vocab(values: Sequence[str]) -> dict[str, int]:
  return {v: i + 1 for i, v in enumerate(sorted(set(values)))}


def _dense_rows(values: list, path: str, col: str) -> np.ndarray:
  rows = []
  for v in values:
    if v is None:
      rows.append(None)
      continue
    if isinstance(v, str):
      parts = [p for p in re.split(r"[\s,;]+", v.strip()) if p]
      try:
        v = [float(p) for p in parts]
      except ValueError:
        raise LogError(f"{path}: dense column {col!r} has a value {v!r} that is not a list of numbers "
                       "(a column of mixed types): write every value as numbers separated by spaces, or "
                       "move the column to .categorical") from None
    elif isinstance(v, (int, float)):
      v = [float(v)]
    rows.append(list(v))
  widths = {len(r) for r in rows if r is not None}
  if len(widths) > 1:
    raise LogError(f"{path}: dense column {col!r} has vectors of {sorted(widths)} values: every vector needs "
                   "the same length")
  width = widths.pop() if widths else 1
  return np.array([r if r is not None else [0.0] * width for r in rows], np.float32)


def load_features(fspec: FeatureFileSpec, ids: IdMap, what: str) -> tuple[dict[str, np.ndarray], dict[str, int], list | None, list | None]:
  """(features [N, ...] in dense-id order, vocab sizes, titles or None, content type names or None)."""
  files = expand(fspec.path, f"config.dataset.{what}_features.path")
  conf = f"config.dataset.{what}_features"
  tables = []
  for f in files:
    t = read_table(f, fspec.columns(), conf, string_columns=tuple(
        c for c in fspec.columns() if c not in fspec.dense))
    tables.append((f, t))
  # (string_columns above: keys, categories, multi-valued strings and titles are text whatever they look like)
  types = {}
  for f, t in tables:
    for name in t.column_names:
      prev = types.setdefault(name, (f, t.schema.field(name).type))
      if prev[1] != t.schema.field(name).type:
        raise LogError(f"{f}: column {name!r} has type {t.schema.field(name).type} but {prev[0]} has "
                       f"{prev[1]} (a feature column of mixed types): make it one type in every file")
  table = pa.concat_tables([t for _, t in tables])
  path = fspec.path
  keys = _as_id_strings(table.column(fspec.key).combine_chunks(), path, fspec.key)
  dense = ids.lookup(keys)
  unknown = np.flatnonzero(dense < 0)
  if len(unknown):
    raise LogError(f"{path}: {len(unknown)} ids in column {fspec.key!r} are not in the log (e.g. "
                   f"{keys[int(unknown[0])].as_py()!r}): remove those rows, or check that "
                   f"{conf}.key names the same ids as the log's {what} column")
  if len(np.unique(dense)) != len(dense):
    seen, dup = set(), None
    for r, k in zip(dense.tolist(), keys.to_pylist()):
      if r in seen:
        dup = k
        break
      seen.add(r)
    raise LogError(f"{path}: column {fspec.key!r} repeats ids (e.g. {dup!r}): keep one row per {what}")
  n = len(ids)
  feats, vocab = {}, {}
  type_names = None
  for col, name in [(c, c) for c in fspec.categorical] + ([(fspec.type, "type")] if fspec.type else []):
    vals = ["" if v is None else str(v) for v in _feature_values(table, col)]
    voc = _vocab(v for v in vals if v != "")
    arr = np.zeros((n,), np.int32)
    arr[dense] = [voc.get(v, 0) for v in vals]
    feats[name], vocab[name] = arr, len(voc) + 1
    if name == "type":
      type_names = sorted(voc, key=voc.get)
  for col in fspec.multi:
    lists = [[p for p in (v or "").split(fspec.separator) if p][:fspec.max_values]
             for v in _feature_values(table, col)]
    voc = _vocab(p for l in lists for p in l)
    width = max(1, max((len(l) for l in lists), default=1))
    arr = np.zeros((n, width), np.int32)
    for r, l in zip(dense, lists):
      arr[r, :len(l)] = [voc[p] for p in l]
    feats[col], vocab[col] = arr, len(voc) + 1
  for col in fspec.dense:
    rows = _dense_rows(_feature_values(table, col), path, col)
    arr = np.zeros((n, rows.shape[1]), np.float32)
    arr[dense] = rows
    feats[col] = arr
  titles = None
  if fspec.title:
    raw = ids.raw_values().to_pylist()
    titles = [str(r) for r in raw]
    for r, v in zip(dense, _feature_values(table, fspec.title)):
      if v:
        titles[r] = str(v)
  return feats, vocab, titles, type_names


# ---------------------------------------------------------------------------------------------
# Conversion (single machine, bounded memory).
# ---------------------------------------------------------------------------------------------

def _fingerprint(spec: LogSpec) -> dict[str, Any]:
  def files(pattern, what):
    return [[os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))] for f in expand(pattern, what)]
  fp = {"format": FORMAT_VERSION, "spec": dataclasses.asdict(spec), "log": files(spec.path, "config.dataset.path")}
  for what, fs in (("item", spec.item_features), ("user", spec.user_features)):
    if fs is not None:
      fp[what] = files(fs.path, f"config.dataset.{what}_features.path")
  return fp


def cache_dir(spec: LogSpec, data_dir: str | None = None) -> str:
  from mvhan_jax.data import movielens  # pylint: disable=import-outside-toplevel
  key = hashlib.sha256(json.dumps(_fingerprint(spec), sort_keys=True).encode()).hexdigest()[:16]
  stem = re.sub(r"[^\w.-]+", "_", os.path.basename(spec.path.rstrip("/*")) or "log")[:40]
  return os.path.join(data_dir or movielens.default_data_dir(), "logs", f"{stem}-{key}")


def read_log_batches(spec: LogSpec, path: str) -> Iterator[pa.RecordBatch]:
  return read_batches(path, spec.log_columns(), "config.dataset.*_column",
                      string_columns=(spec.user_column, spec.item_column))


def normalize_batch(spec: LogSpec, batch: pa.RecordBatch, path: str) -> dict[str, pa.Array]:
  """Raw ids as strings, time as int64 epoch seconds, rating as float32."""
  cols = {"user": _as_id_strings(batch.column(spec.user_column), path, spec.user_column),
          "item": _as_id_strings(batch.column(spec.item_column), path, spec.item_column),
          "timestamp": pa.array(_seconds(batch.column(spec.time_column), path, spec.time_column))}
  if spec.rating_column:
    cols["rating"] = pa.array(_ratings(batch.column(spec.rating_column), path, spec.rating_column))
  return cols


def parse_log(spec: LogSpec, out_dir: str) -> tuple[list[str], IdMap, IdMap, int]:
  """Pass 1: parsed Parquet parts (raw ids as strings, int64 seconds, float32 rating) and the id maps."""
  users, items, parts, rows = [], [], [], 0
  for path in expand(spec.path):
    for batch in read_log_batches(spec, path):
      cols = normalize_batch(spec, batch, path)
      part = os.path.join(out_dir, f"part-{len(parts):05d}.parquet")
      pq.write_table(pa.table(cols), part)
      parts.append(part)
      users.append(pc.unique(cols["user"]))
      items.append(pc.unique(cols["item"]))
      rows += batch.num_rows
      if len(users) >= 16:  # keep the distinct ids compact
        users, items = [_merge_unique(users)], [_merge_unique(items)]
  return parts, IdMap.from_unique(_merge_unique(users)), IdMap.from_unique(_merge_unique(items)), rows


def finish(folder: str, spec: LogSpec, user_ids: IdMap, item_ids: IdMap, kept_users: np.ndarray,
           counts: dict[str, int], shards: int, engine: str) -> dict[str, Any]:
  """Features, id maps (users.parquet: kept users in final dense order; items.parquet, with titles) and
  the manifest (with checksums) of a converted folder."""
  feat_dir = os.path.join(folder, "features")
  os.makedirs(feat_dir, exist_ok=True)
  vocab, titles, type_names = {}, None, None
  if spec.item_features is not None:
    feats, voc, titles, type_names = load_features(spec.item_features, item_ids, "item")
    for k, v in feats.items():
      np.save(os.path.join(feat_dir, f"item.{k}.npy"), v)
    vocab.update({f"item.{k}": v for k, v in voc.items()})
  if spec.user_features is not None:
    # Keyed by every user of the log: a user dropped by the min_events policy may be in the file.
    feats, voc, _, _ = load_features(dataclasses.replace(spec.user_features, title="", type=""), user_ids, "user")
    for k, v in feats.items():
      np.save(os.path.join(feat_dir, f"user.{k}.npy"), v[kept_users])
    vocab.update({f"user.{k}": v for k, v in voc.items()})
  pq.write_table(pa.table({"raw_id": user_ids.raw_values().take(pa.array(kept_users))}),
                 os.path.join(folder, "users.parquet"))
  items = {"raw_id": item_ids.raw_values()}
  if titles is not None:
    items["title"] = pa.array(titles, pa.string())
  pq.write_table(pa.table(items), os.path.join(folder, "items.parquet"))
  files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
  manifest = {
      "format": FORMAT_VERSION, "engine": engine, "spec": dataclasses.asdict(spec), "maxlen": spec.maxlen,
      "counts": counts, "vocab": vocab, "shards": shards, "type_names": type_names,
      "train_shards": [shard_name(b, shards) for b in range(shards)],
      "sha256": {f: _sha256(os.path.join(folder, f)) for f in files},
  }
  with open(os.path.join(folder, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  return manifest


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def report(manifest: dict[str, Any], folder: str, out=sys.stderr) -> None:
  c = manifest["counts"]
  print(f"log {manifest['spec']['path']}: {c['rows']:,} rows -> {c['events']:,} events of {c['users']:,} users "
        f"and {c['items']:,} items; dropped {c['duplicates']:,} exact duplicates and {c['short_events']:,} events "
        f"of {c['short_users']:,} users with fewer than {manifest['spec']['min_events']} events; "
        f"{c['train_examples']:,} training examples in {manifest['shards']} shards under {folder}", file=out, flush=True)


def convert_local(spec: LogSpec, folder: str) -> dict[str, Any]:
  """Converts the log into ``folder`` (which must not exist) on this machine, in bounded memory."""
  tmp = folder + ".tmp"
  scratch = os.path.join(tmp, "_scratch")
  os.makedirs(scratch)
  parts, user_ids, item_ids, rows = parse_log(spec, scratch)
  shards = auto_shards(rows, spec.shards)
  # Pass 2: dense ids, rows appended to their shard's bucket file.
  writers = {}
  for part in parts:
    for b, tb in map_and_split(pq.read_table(part), user_ids, item_ids, shards):
      if b not in writers:
        writers[b] = pq.ParquetWriter(os.path.join(scratch, f"bucket-{b:05d}.parquet"), tb.schema)
      writers[b].write_table(tb)
    os.remove(part)
  for w in writers.values():
    w.close()
  # Pass 3: bucket by bucket in user order.
  codec = ExampleCodec(spec.maxlen)
  counts = {"rows": rows, "duplicates": 0, "short_users": 0, "short_events": 0, "events": 0, "train_examples": 0}
  kept, offset = [], 0
  for b in range(shards):
    path = os.path.join(scratch, f"bucket-{b:05d}.parquet")
    table = pq.read_table(path) if os.path.exists(path) else None
    bucket = bucket_from_table(table, spec)
    if table is not None:
      os.remove(path)
    events, chunks = bucket_outputs(bucket, offset, spec.maxlen, codec)
    examples = write_bucket_files(tmp, b, shards, events, chunks)
    kept.append(bucket.kept_users)
    offset += len(bucket.kept_users)
    for k in ("duplicates", "short_users", "short_events"):
      counts[k] += getattr(bucket, k)
    counts["events"] += len(events["user"])
    counts["train_examples"] += examples
  shutil.rmtree(scratch)
  counts.update(users=offset, items=len(item_ids))
  _check_not_empty(spec, counts)
  manifest = finish(tmp, spec, user_ids, item_ids, np.concatenate(kept), counts, shards, "local")
  os.replace(tmp, folder)
  return manifest


def _check_not_empty(spec: LogSpec, counts: dict[str, int]) -> None:
  if counts["users"] == 0:
    raise LogError(f"{spec.path}: no user has {spec.min_events} or more events after dropping "
                   f"{counts['duplicates']} exact duplicates: the leave-one-out protocol needs >= 3 events "
                   "per evaluated user; check config.dataset.user_column")


def convert(spec: LogSpec, data_dir: str | None = None, engine=None, quiet: bool = False) -> str:
  """The converted folder of ``spec``, converting it first when missing with ``engine(spec, folder)``
  (default `convert_local`; `beam_ingest.convert_beam` for Beam); prints the counts."""
  folder = cache_dir(spec, data_dir)
  if not os.path.exists(os.path.join(folder, "manifest.json")):
    # Locked: a second process converting the same log would remove or rename onto this one's
    # temporary folder; it waits here, then finds the manifest. The lock files live apart from the
    # converted folders (a failed conversion leaves nothing beside them).
    lock = os.path.join(os.path.dirname(os.path.dirname(folder)), ".locks", os.path.basename(folder) + ".lock")
    with locks.exclusive(lock):
      if not os.path.exists(os.path.join(folder, "manifest.json")):
        shutil.rmtree(folder + ".tmp", ignore_errors=True)  # a conversion that was interrupted
        try:
          (engine or convert_local)(spec, folder)
        finally:
          shutil.rmtree(folder + ".tmp", ignore_errors=True)
  manifest = read_manifest(folder)
  if not quiet:
    report(manifest, folder)
  return folder


def read_manifest(folder: str) -> dict[str, Any]:
  with open(os.path.join(folder, "manifest.json")) as f:
    return json.load(f)


def load(folder: str, name: str = "interactions") -> InteractionData:
  """The `InteractionData` of a converted folder."""
  m = read_manifest(folder)
  shards = m["shards"]
  ev = {}
  for k in ("user", "item", "timestamp", "rating"):
    paths = [os.path.join(folder, f"events-{b:05d}.{k}.npy") for b in range(shards)]
    if all(os.path.exists(p) for p in paths):
      ev[k] = np.concatenate([np.load(p) for p in paths])
  feats = {"user": {}, "item": {}}
  feat_dir = os.path.join(folder, "features")
  for f in sorted(os.listdir(feat_dir)) if os.path.isdir(feat_dir) else ():
    what, fname = f.split(".", 1)
    feats[what][fname[:-len(".npy")]] = np.load(os.path.join(feat_dir, f))
  vocab = {k.split(".", 1)[1]: v for k, v in m["vocab"].items()}
  items = pq.read_table(os.path.join(folder, "items.parquet"))
  titles = None
  if "title" in items.column_names:
    titles = tuple(items.column("title").to_pylist())
  else:
    titles = tuple(str(v) for v in items.column("raw_id").to_pylist())
  return InteractionData(
      name=name, num_users=m["counts"]["users"], num_items=m["counts"]["items"],
      user_features=feats["user"], item_features=feats["item"], vocab=vocab,
      user=ev["user"].astype(np.int32), item=ev["item"].astype(np.int32), timestamp=ev["timestamp"].astype(np.int64),
      rating=ev.get("rating"), item_titles=titles)


def raw_ids(folder, what: str) -> list:
  """The raw ids of users or items in dense-id order, from ``<folder>/<what>s.parquet``; ``folder``
  is a local path or any `etils.epath` folder (a workdir's ``ids/`` on a bucket).

  Arrow reads an Arrow-owned copy of the file's bytes, never a Python file or bytes object: Arrow's
  scan threads drop their reference to the source after the read, and dropping a Python object takes
  the GIL, which aborts the process if the interpreter is exiting by then ("terminate called without
  an active exception", apache/arrow#34314; seen when a --user error exits at once).
  """
  data = (wd.path(folder) / f"{what}s.parquet").read_bytes()
  buf = pa.allocate_buffer(len(data))
  np.frombuffer(buf, np.uint8)[:] = np.frombuffer(data, np.uint8)
  return pq.read_table(pa.BufferReader(buf)).column("raw_id").to_pylist()
