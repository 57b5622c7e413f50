"""The log conversion of `mvhan_jax.data.logs` as an Apache Beam pipeline, for logs beyond one machine.

  mvhan-ingest --config=experiments/configs/interactions.py --config.dataset.path='logs/*.parquet' ... \
      --engine=beam [-- --runner=DataflowRunner --project=... --temp_location=gs://...]

The same steps as `logs.convert_local`, with the same per-shard functions, so both engines write
byte-identical shards, events and id maps for the same log (tested):

  files --parse (one element per record batch)--> batches
  batches --distinct ids, combined--> user / item id maps (side inputs), and the row count
  batches --dense ids, split by user range--> (shard, rows) --GroupByKey--> shard rows
  shard rows --sort, de-duplicate, drop short users--> buckets --kept users per shard--> offsets
  buckets + offsets --renumber, leave-one-out examples--> ArrayRecord shard + events per shard

Elements are record batches and shards, never single rows, so the local runner moves a few hundred
elements rather than 10^7. The driver then writes the id maps, the features and the manifest
(`logs.finish`). The output folder must be reachable from every worker (a local disk for the local
runner, a shared file system otherwise). Needs the optional extra ``pip install 'mvhan_jax[beam]'``.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mvhan_jax.data import logs


def _import_beam():
  try:
    import apache_beam as beam  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise logs.LogError("the Beam engine needs Apache Beam: pip install 'mvhan_jax[beam]' "
                        "(or use --engine=local)") from None
  return beam


def _parse_file(path: str, spec: logs.LogSpec):
  for batch in logs.read_log_batches(spec, path):
    yield pa.table(logs.normalize_batch(spec, batch, path))


def _distinct(column: str):
  beam = _import_beam()

  class Distinct(beam.CombineFn):
    """The distinct raw ids (strings) of a column, as an `logs.IdMap` (sorted)."""

    def create_accumulator(self):
      return []

    def add_input(self, acc, table):
      return [logs._merge_unique(acc + [table.column(column).combine_chunks()])]  # pylint: disable=protected-access

    def merge_accumulators(self, accs):
      return [logs._merge_unique([a for acc in accs for a in acc])]  # pylint: disable=protected-access

    def extract_output(self, acc):
      return logs.IdMap.from_unique(logs._merge_unique(acc))  # pylint: disable=protected-access

  return Distinct()


def _to_bucket(kv, spec: logs.LogSpec):
  b, tables = kv
  return b, logs.bucket_from_table(pa.concat_tables(list(tables)), spec)


def _write(kv, kept_per_shard: dict, shards: int, spec: logs.LogSpec, folder: str):
  b, bucket = kv
  offset = int(sum(n for s, n in kept_per_shard.items() if s < b))
  events, chunks = logs.bucket_outputs(bucket, offset, spec.maxlen, logs.ExampleCodec(spec.maxlen))
  examples = logs.write_bucket_files(folder, b, shards, events, chunks)
  stats = {"duplicates": bucket.duplicates, "short_users": bucket.short_users,
           "short_events": bucket.short_events, "events": int(len(events["user"])),
           "train_examples": examples, "kept": int(len(bucket.kept_users))}
  np.save(os.path.join(folder, "_beam", f"kept-{b:05d}.npy"), bucket.kept_users)
  with open(os.path.join(folder, "_beam", f"stats-{b:05d}.json"), "w") as f:
    json.dump(stats, f)
  return b


def _save_ids(ids: logs.IdMap, folder: str, what: str):
  pq.write_table(pa.table({"key": ids.keys, "numeric": pa.array([ids.numeric] * len(ids), pa.bool_())}),
                 os.path.join(folder, "_beam", f"{what}_ids.parquet"))
  return what


def _load_ids(folder: str, what: str) -> logs.IdMap:
  t = pq.read_table(os.path.join(folder, "_beam", f"{what}_ids.parquet"))
  numeric = bool(t.column("numeric")[0].as_py()) if t.num_rows else False
  return logs.IdMap(t.column("key").combine_chunks().cast(pa.string()), numeric)


def convert_beam(spec: logs.LogSpec, folder: str, pipeline_args: Sequence[str] = ()) -> dict:
  """Converts the log into ``folder`` with a Beam pipeline (`pipeline_args`: Beam's own flags)."""
  beam = _import_beam()
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  tmp = folder + ".tmp"
  os.makedirs(os.path.join(tmp, "_beam"))
  files = logs.expand(spec.path)
  for f in files:  # the clear errors of a missing column or an empty file, before any worker starts
    next(iter(logs.read_log_batches(spec, f)))
  options = PipelineOptions(list(pipeline_args) or ["--runner=DirectRunner", "--direct_num_workers=1"])
  with beam.Pipeline(options=options) as p:
    tables = (p | "Files" >> beam.Create(files)
              | "Parse" >> beam.FlatMap(_parse_file, spec=spec))
    users = tables | "UserIds" >> beam.CombineGlobally(_distinct("user"))
    items = tables | "ItemIds" >> beam.CombineGlobally(_distinct("item"))
    rows = tables | "Rows" >> beam.Map(lambda t: t.num_rows) | "CountRows" >> beam.CombineGlobally(sum)
    shards = rows | "Shards" >> beam.Map(logs.auto_shards, spec.shards)
    _ = users | "SaveUsers" >> beam.Map(_save_ids, tmp, "user")
    _ = items | "SaveItems" >> beam.Map(_save_ids, tmp, "item")
    _ = rows | "SaveRows" >> beam.Map(lambda n: open(os.path.join(tmp, "_beam", "rows.json"), "w").write(str(n)))
    buckets = (tables
               | "DenseIds" >> beam.FlatMap(
                   lambda t, u, i, n: logs.map_and_split(t, u, i, n),
                   beam.pvalue.AsSingleton(users), beam.pvalue.AsSingleton(items), beam.pvalue.AsSingleton(shards))
               | "ByShard" >> beam.GroupByKey()
               | "Process" >> beam.Map(_to_bucket, spec=spec))
    kept = (buckets | "Kept" >> beam.Map(lambda kv: (kv[0], len(kv[1].kept_users)))
            | "KeptPerShard" >> beam.combiners.ToDict())
    _ = buckets | "Write" >> beam.Map(_write, beam.pvalue.AsSingleton(kept), beam.pvalue.AsSingleton(shards),
                                      spec=spec, folder=tmp)
  # The driver: empty shards, counts, id maps, features, manifest.
  with open(os.path.join(tmp, "_beam", "rows.json")) as f:
    rows = int(f.read())
  shards = logs.auto_shards(rows, spec.shards)
  user_ids, item_ids = _load_ids(tmp, "user"), _load_ids(tmp, "item")
  counts = {"rows": rows, "duplicates": 0, "short_users": 0, "short_events": 0, "events": 0, "train_examples": 0}
  kept_users, offset = [], 0
  for b in range(shards):
    stats_path = os.path.join(tmp, "_beam", f"stats-{b:05d}.json")
    if not os.path.exists(stats_path):  # no user of this range: the same empty files as the local engine
      empty = logs.bucket_from_table(None, spec)
      events, chunks = logs.bucket_outputs(empty, offset, spec.maxlen, logs.ExampleCodec(spec.maxlen))
      logs.write_bucket_files(tmp, b, shards, events, chunks)
      continue
    with open(stats_path) as f:
      stats = json.load(f)
    for k in ("duplicates", "short_users", "short_events", "events", "train_examples"):
      counts[k] += stats[k]
    kept_users.append(np.load(os.path.join(tmp, "_beam", f"kept-{b:05d}.npy")))
    offset += stats["kept"]
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(os.path.join(tmp, "_beam"))
  counts.update(users=offset, items=len(item_ids))
  logs._check_not_empty(spec, counts)  # pylint: disable=protected-access
  kept = np.concatenate(kept_users) if kept_users else np.zeros((0,), np.int64)
  manifest = logs.finish(tmp, spec, user_ids, item_ids, kept, counts, shards, "beam")
  os.replace(tmp, folder)
  return manifest
