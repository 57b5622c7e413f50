"""Your own interaction log (mvhan_jax/data/logs.py, experiments/configs/interactions.py).

- A generated log with column names unlike MovieLens's and string ids trains through the documented
  flags alone, learns a planted signal far above popularity, and serves `--mode=recommend` by raw id;
  the same log without its time column is refused with a message naming that column.
- The converted shards hold exactly `protocol.training_examples(leave_one_out(data))`; the Beam
  pipeline writes byte-identical files; duplicates and short users are counted.
- Bad input (missing column, unparsable time, empty file, empty glob, feature ids the log lacks, a
  feature column of mixed types) is one clear error naming the file and column, and leaves nothing
  half-written in the cache.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mvhan_jax import evaluation
from mvhan_jax.data import logs
from mvhan_jax.data import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/interactions.py:smoke"


def _cli(*args, timeout=600) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "mvhan_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def planted_log(n_users=600, n_clusters=20, per_cluster=10, length=8, seed=0):
  """Every user walks one cluster of items in a fixed cyclic order from a random start: the next item
  is predictable from the last, and popularity is flat (HR@10 of popularity ~ 10/200)."""
  rng = np.random.default_rng(seed)
  rows = []
  t0 = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
  for u in range(n_users):
    c = rng.integers(n_clusters)
    start = rng.integers(per_cluster)
    when = t0 + datetime.timedelta(hours=int(rng.integers(0, 24 * 300)))
    for k in range(length):
      item = c * per_cluster + (start + k) % per_cluster
      rows.append((f"member-{u:04d}", f"sku/{item:03d}", (when + datetime.timedelta(minutes=7 * k)).isoformat(), 1 + k % 5))
  return rows


def _write_csv(path, rows, columns=("member", "sku", "clicked_at", "stars")):
  cols = list(zip(*rows))
  table = pa.table({name: list(col) for name, col in zip(columns, cols)})
  if str(path).endswith(".gz"):
    with gzip.open(path, "wb") as f:
      pacsv.write_csv(table, f)
  else:
    pacsv.write_csv(table, str(path))


def _flags(path, data_dir, time_column="clicked_at"):
  return [f"--config.dataset.path={path}", "--config.dataset.user_column=member",
          "--config.dataset.item_column=sku", f"--config.dataset.time_column={time_column}",
          f"--data_dir={data_dir}"]


def _user_error(proc, *needles):
  assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("mvhan-train: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.mark.slow
def test_a_log_of_your_own_trains_from_flags_and_beats_popularity(tmp_path):
  rows = planted_log()
  # Two shards, one gzipped CSV and one Parquet: a glob of mixed formats.
  _write_csv(tmp_path / "clicks-0.csv.gz", rows[:2400])
  cols = list(zip(*rows[2400:]))
  pq.write_table(pa.table({"member": list(cols[0]), "sku": list(cols[1]), "clicked_at": list(cols[2]),
                           "stars": list(cols[3])}), tmp_path / "clicks-1.parquet")
  items = sorted({r[1] for r in rows})
  pacsv.write_csv(pa.table({"sku": items, "name": [f"Product {s[4:]}" for s in items],
                            "tags": [f"c{int(s[4:]) // 10}|all" for s in items]}), str(tmp_path / "catalog.csv"))
  workdir = str(tmp_path / "run")
  flags = _flags(str(tmp_path / "clicks-*"), str(tmp_path / "cache"))
  feats = ["--config.dataset.item_features.path=" + str(tmp_path / "catalog.csv"),
           "--config.dataset.item_features.key=sku", "--config.dataset.item_features.title=name",
           "--config.dataset.item_features.multi=tags"]
  proc = _cli(f"--config={CONFIG}", f"--workdir={workdir}", *flags, *feats, "--config.total_steps=150",
              "--config.eval_every_steps=50", "--config.index.build=True", "--examples=1", "--noplots")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "4,800 rows -> 4,800 events of 600 users and 200 items" in proc.stderr
  results = json.load(open(os.path.join(workdir, "results.json")))
  hr = results["test"]["HR@10"]
  # Popularity on the same split (flat popularity: about 10 / 200).
  data = logs.load(logs.cache_dir(logs.LogSpec(path=str(tmp_path / "clicks-*"), user_column="member",
                                               item_column="sku", time_column="clicked_at", maxlen=50,
                                               item_features=logs.FeatureFileSpec(
                                                   path=str(tmp_path / "catalog.csv"), key="sku",
                                                   multi=("tags",), title="name")),
                                  str(tmp_path / "cache")))
  split = protocol.leave_one_out(data)
  counts = np.bincount(np.concatenate(split.train_sequences), minlength=data.num_items).astype(np.float32)
  test = split.eval_set("test", 50)
  pop = evaluation.LeaveOneOutEvaluator(test).evaluate(np.ones((len(test.user), 1), np.float32), counts[:, None])
  assert pop["HR@10"] < 0.12
  assert hr > 0.5 and hr > 4 * pop["HR@10"], (hr, pop)
  # The raw-id maps are in the workdir, and --mode=recommend takes a raw id and prints raw ids and titles.
  assert os.path.exists(os.path.join(workdir, "ids", "users.parquet"))
  rec = _cli(f"--config={CONFIG}", f"--workdir={workdir}", *flags, *feats, "--mode=recommend",
             "--user=member-0007", "--top_n=3")
  assert rec.returncode == 0, rec.stderr[-3000:]
  assert "User member-0007" in rec.stdout and "Product " in rec.stdout and "[sku/" in rec.stdout
  unknown = _cli(f"--config={CONFIG}", f"--workdir={workdir}", *flags, *feats, "--mode=recommend", "--user=nobody")
  _user_error(unknown, "--user='nobody' is not a user of this log", "'member'")
  # The same log without its time column is refused, naming that column; no workdir is left.
  no_time = tmp_path / "notime"
  no_time.mkdir()
  _write_csv(no_time / "clicks.csv", [r[:2] + (r[3],) for r in rows], columns=("member", "sku", "stars"))
  bad = _cli(f"--config={CONFIG}", f"--workdir={tmp_path / 'bad'}", *_flags(str(no_time / "clicks.csv"),
                                                                             str(tmp_path / "cache")))
  _user_error(bad, "no column 'clicked_at'", "clicks.csv", "'member', 'sku', 'stars'")
  assert not os.path.exists(tmp_path / "bad")


def _spec(path, **kw):
  base = dict(path=str(path), user_column="member", item_column="sku", time_column="clicked_at", maxlen=5)
  base.update(kw)
  return logs.LogSpec(**base)


def _small_log(tmp_path, name="log.csv", rows=None):
  rows = rows if rows is not None else planted_log(n_users=40, length=6)
  _write_csv(tmp_path / name, rows)
  return tmp_path / name


def test_shards_hold_the_leave_one_out_examples_and_beam_writes_the_same_files(tmp_path):
  rows = planted_log(n_users=50, length=7)
  rows += rows[:9]                                  # 9 exact duplicates
  rows += [("short-user", "sku/001", "2024-05-01T00:00:00", 3), ("short-user", "sku/002", "2024-05-01T00:01:00", 3)]
  path = _small_log(tmp_path, rows=rows)
  spec = _spec(path, rating_column="stars", shards=3)
  local = logs.convert_local(spec, str(tmp_path / "local"))
  assert local["counts"]["duplicates"] == 9 and local["counts"]["short_users"] == 1
  assert local["counts"]["short_events"] == 2 and local["counts"]["users"] == 50
  data = logs.load(str(tmp_path / "local"))
  # Users in raw-id order, sequences sorted by time: the first user's items are its walk in order.
  assert logs.raw_ids(str(tmp_path / "local"), "user")[0] == "member-0000"
  first = [r[1] for r in rows if r[0] == "member-0000"][:7]  # without its duplicates
  items = logs.raw_ids(str(tmp_path / "local"), "item")
  assert [items[i] for i in protocol.user_sequences(data)[0]] == first
  want = protocol.training_examples(protocol.leave_one_out(data).train_sequences, 5)
  src = logs.ShardedExamples(str(tmp_path / "local"))
  got = src.take(np.arange(len(src)))
  assert len(src) == 50 * 4  # 7 events: 5 in training, 4 next-item examples
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  pytest.importorskip("apache_beam")
  from mvhan_jax.data import beam_ingest  # pylint: disable=import-outside-toplevel
  beam = beam_ingest.convert_beam(spec, str(tmp_path / "beam"))
  assert beam["sha256"] == local["sha256"] and beam["counts"] == local["counts"]
  for f in local["sha256"]:
    with open(tmp_path / "local" / f, "rb") as a, open(tmp_path / "beam" / f, "rb") as b:
      assert a.read() == b.read(), f


def test_numeric_ids_sort_numerically_and_epoch_seconds_work(tmp_path):
  rows = [(str(u), str(i), str(1_700_000_000 + 60 * k), 1) for u in (10, 2, 33) for k, i in enumerate((7, 100, 9))]
  path = _small_log(tmp_path, rows=rows)
  logs.convert_local(_spec(path), str(tmp_path / "out"))
  assert logs.raw_ids(str(tmp_path / "out"), "user") == [2, 10, 33]
  assert logs.raw_ids(str(tmp_path / "out"), "item") == [7, 9, 100]
  data = logs.load(str(tmp_path / "out"))
  assert data.timestamp.min() == 1_700_000_000


@pytest.mark.parametrize("case, needles", [
    ("missing_column", ["no column 'clicked_at'", "log.csv", "fix the column name"]),
    ("bad_time", ["column 'clicked_at'", "'yesterday'", "ISO-8601"]),
    ("empty_file", ["log.csv is empty"]),
    ("header_only", ["log.csv has a header but no rows"]),
    ("no_match", ["matches no file"]),
    ("unknown_feature_ids", ["catalog.csv", "not in the log", "'sku/999'"]),
    ("mixed_dense", ["catalog.csv", "dense column 'vec'", "'fast'"]),
])
def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path, case, needles):
  rows = planted_log(n_users=10, length=4)
  path = tmp_path / "log.csv"
  feature = None
  if case == "missing_column":
    _write_csv(path, [r[:2] + (r[3],) for r in rows], columns=("member", "sku", "stars"))
  elif case == "bad_time":
    _write_csv(path, rows[:-1] + [rows[-1][:2] + ("yesterday", 1)])
  elif case == "empty_file":
    path.write_text("")
  elif case == "header_only":
    path.write_text("member,sku,clicked_at,stars\n")
  elif case == "no_match":
    path = tmp_path / "nothing-*.csv"
  else:
    _write_csv(path, rows)
    items = sorted({r[1] for r in rows})
    if case == "unknown_feature_ids":
      pacsv.write_csv(pa.table({"sku": items + ["sku/999"], "g": ["a"] * (len(items) + 1)}), str(tmp_path / "catalog.csv"))
      feature = logs.FeatureFileSpec(path=str(tmp_path / "catalog.csv"), key="sku", categorical=("g",))
    else:
      vec = ["0.5 1.0"] * (len(items) - 1) + ["fast"]
      pacsv.write_csv(pa.table({"sku": items, "vec": vec}), str(tmp_path / "catalog.csv"))
      feature = logs.FeatureFileSpec(path=str(tmp_path / "catalog.csv"), key="sku", dense=("vec",))
  spec = _spec(path, item_features=feature)
  cache = tmp_path / "cache"
  with pytest.raises(logs.LogError) as e:
    logs.convert(spec, str(cache))
  for needle in needles:
    assert needle in str(e.value), str(e.value)
  leftovers = os.listdir(cache / "logs") if (cache / "logs").exists() else []
  assert leftovers == [], leftovers  # nothing half-written


def test_features_categorical_multi_dense_and_titles(tmp_path):
  rows = planted_log(n_users=12, length=4)
  path = _small_log(tmp_path, rows=rows)
  items = sorted({r[1] for r in rows})
  pq.write_table(pa.table({"sku": items, "brand": ["b" if i % 2 else "a" for i in range(len(items))],
                           "tags": ["x|y" if i % 3 == 0 else "y" for i in range(len(items))],
                           "emb": [[float(i), 1.0, -1.0] for i in range(len(items))],
                           "name": [f"N{i}" for i in range(len(items))]}), tmp_path / "items.parquet")
  users = sorted({r[0] for r in rows})
  pacsv.write_csv(pa.table({"member": users[::-1], "segment": ["z" if u == users[1] else "y" for u in users[::-1]]}),
                  str(tmp_path / "users.csv"))
  spec = _spec(path, item_features=logs.FeatureFileSpec(path=str(tmp_path / "items.parquet"), key="sku",
                                                         categorical=("brand",), multi=("tags",), dense=("emb",),
                                                         title="name"),
               user_features=logs.FeatureFileSpec(path=str(tmp_path / "users.csv"), key="member",
                                                  categorical=("segment",)))
  data = logs.load(logs.convert(spec, str(tmp_path / "cache")))
  np.testing.assert_array_equal(data.item_features["brand"][:3], [1, 2, 1])
  np.testing.assert_array_equal(data.item_features["tags"][:2], [[1, 2], [2, 0]])
  assert data.vocab["brand"] == 3 and data.vocab["tags"] == 3
  np.testing.assert_allclose(data.item_features["emb"][2], [2.0, 1.0, -1.0])
  assert data.item_titles[:2] == ("N0", "N1")
  # User rows follow the log's dense ids, not the file's order.
  np.testing.assert_array_equal(data.user_features["segment"][:3], [1, 2, 1])
  assert data.vocab["segment"] == 3


def test_mind_without_profile_features_trains_finite(tmp_path):
  """A log has no user features: MIND's MLP then maps a dead (zero) capsule to exactly zero, whose
  normalisation had a NaN gradient (the loss was NaN at step 2)."""
  from mvhan_jax import configs, tasks  # pylint: disable=import-outside-toplevel
  path = _small_log(tmp_path, rows=planted_log(n_users=100, length=8))
  c = configs.load_config("experiments/configs/interactions.py:model=mind,smoke")
  c.dataset.update(path=str(path), user_column="member", item_column="sku", time_column="clicked_at",
                   data_dir=str(tmp_path / "cache"), in_memory_mb=0)  # batches read from the shards
  c.update(total_steps=4, eval_every_steps=4, checkpoint_every_steps=4, batch_size=64)
  c.index.build = False
  results = tasks.train_and_evaluate(c, str(tmp_path / "run"))
  assert np.isfinite(results["test"]["HR@10"])


def test_two_processes_converting_one_log_together_both_get_it(tmp_path):
  # Without the lock in logs.convert the second process removes the first's temporary folder or
  # renames onto its finished one.
  path = _small_log(tmp_path, rows=planted_log(n_users=3000, length=8))
  cache = tmp_path / "cache"
  code = ("import sys; from mvhan_jax.data import logs; "
          "spec = logs.LogSpec(path=sys.argv[1], user_column='member', item_column='sku', "
          "time_column='clicked_at', maxlen=5); "
          "print(logs.read_manifest(logs.convert(spec, sys.argv[2], quiet=True))['counts']['users'])")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert [out.split()[-1] for out, _ in outs] == ["3000", "3000"]
