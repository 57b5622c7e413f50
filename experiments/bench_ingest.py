r"""Log ingestion at scale: rows/s and peak memory of each conversion engine, then training from its shards.

  python experiments/bench_ingest.py --rows=1000000,10000000 --engines=local,beam \
      --out=experiments/results/bench/ingest_cpu_x86_64_2cores.json

For each size it generates a log (CSV shards of 10^6 rows: string user ids, integer item ids with a
Zipf popularity, ISO-8601 times; about 50 events per user; written in chunks, never held whole),
then converts it once per engine in a fresh subprocess, so the peak RSS is that conversion's own
(``ru_maxrss`` of the child), and checks that both engines wrote identical files. Last, the first
training steps of a two-tower on the converted shards: examples/s of the input pipeline alone
(`logs.ShardedExamples` through `pipeline.train_batches`) and of whole training steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 1_000_000


def generate(folder: str, rows: int, seed: int = 0) -> str:
  """CSV shards of a synthetic log; returns the glob."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.csv as pacsv  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  users = max(rows // 50, 1)
  items = 100_000
  t0 = int(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc).timestamp())
  for k, start in enumerate(range(0, rows, CHUNK)):
    n = min(CHUNK, rows - start)
    u = rng.integers(0, users, n)
    i = np.minimum(rng.zipf(1.2, n), items) - 1
    t = (t0 + rng.integers(0, 365 * 86400, n)).astype("datetime64[s]")
    table = pa.table({"account": pa.array([f"acct-{x}" for x in u]), "product": pa.array(i),
                      "event_time": pa.array(np.datetime_as_string(t, unit="s"))})
    pacsv.write_csv(table, os.path.join(folder, f"events-{k:05d}.csv"))
  return os.path.join(folder, "events-*.csv")


def _config(path: str, data_dir: str, engine: str, shards: int):
  from mvhan_jax import configs  # pylint: disable=import-outside-toplevel
  c = configs.load_config("experiments/configs/interactions.py")
  c.dataset.update(path=path, user_column="account", item_column="product", time_column="event_time",
                   engine=engine, shards=shards, data_dir=data_dir)
  return c


def convert_child(path: str, data_dir: str, engine: str, shards: int) -> None:
  """In the child process: one conversion, timed; prints a JSON line."""
  from mvhan_jax.data import logs, registry  # pylint: disable=import-outside-toplevel
  c = _config(path, data_dir, engine, shards)
  t0 = time.perf_counter()
  folder = registry.log_folder(c, quiet=True)
  seconds = time.perf_counter() - t0
  m = logs.read_manifest(folder)
  print(json.dumps({"seconds": seconds, "folder": folder, "counts": m["counts"], "sha256": m["sha256"]}))


def convert(path: str, data_dir: str, engine: str, shards: int) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  proc = subprocess.run([sys.executable, __file__, "--child", path, data_dir, engine, str(shards)], cwd=ROOT,
                        env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{engine} conversion failed:\n{proc.stderr[-3000:]}")
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  # ru_maxrss of children is the largest child so far: run the engines from the smallest log upwards.
  out["peak_rss_mb"] = max(peak, before) / 1024
  return out


def train_rates(path: str, data_dir: str, steps: int, batch_size: int) -> dict:
  """Input-pipeline and training-step examples/s over the converted shards (local engine's folder)."""
  import jax  # pylint: disable=import-outside-toplevel
  from mvhan_jax import tasks  # pylint: disable=import-outside-toplevel
  from mvhan_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  c = _config(path, data_dir, "local", 0)
  c.batch_size = batch_size
  t0 = time.perf_counter()
  task = tasks.build_task(c)
  build_s = time.perf_counter() - t0
  src = task.exp.train_source

  def rate(source):
    ds = pipeline.train_batches(source, batch_size, seed=0, shard_index=0, shard_count=1)
    ds[0]
    t0, n = time.perf_counter(), 0
    for i in range(1, steps + 1):
      n += len(ds[i]["target"])
    return n / (time.perf_counter() - t0)

  from mvhan_jax.data import logs, registry  # pylint: disable=import-outside-toplevel
  shards = logs.ShardedExamples(registry.log_folder(c))
  t0 = time.perf_counter()
  shards.load_all()
  load_s = time.perf_counter() - t0
  shard_rate = rate(shards)
  read_rate = rate(src)
  # Whole steps through the loop: `stop_at_step` ends the run after `steps` steps.
  workdir = tempfile.mkdtemp(prefix="bench_ingest_run_")
  c.total_steps = 10 * steps
  c.stop_at_step = steps
  c.progress = False
  c.index.build = False
  c.checkpoint_every_steps = 10 * steps
  c.log_every_steps = max(steps // 5, 1)
  c.eval_every_steps = 10 * steps
  t0 = time.perf_counter()
  tasks.train_and_evaluate(c, workdir)  # returns None at stop_at_step
  run_s = time.perf_counter() - t0
  rates = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rates += [v for k, v in json.loads(line).items() if k.endswith("examples_per_sec")]
  shutil.rmtree(workdir, ignore_errors=True)
  step_rate = float(np.median(rates[1:] or rates)) if rates else float("nan")  # the first includes compilation
  return {"build_experiment_s": build_s, "source": type(src).__name__, "read_examples_per_s": read_rate,
          "shards_random_access_examples_per_s": shard_rate, "shards_load_all_s": load_s, "train_steps": steps,
          "train_run_s_incl_compile": run_s, "train_examples_per_s": step_rate, "train_examples": len(src), "backend": jax.default_backend()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", default="1000000", help="comma-separated log sizes")
  p.add_argument("--engines", default="local,beam")
  p.add_argument("--shards", type=int, default=0, help="0: automatic (one per 2M rows)")
  p.add_argument("--steps", type=int, default=50, help="training steps timed on the shards")
  p.add_argument("--batch_size", type=int, default=1024)
  p.add_argument("--out", default=None, help="JSON file to write")
  p.add_argument("--workdir", default=None, help="where logs and caches go (default: a temporary folder)")
  p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    convert_child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
    return
  root = args.workdir or tempfile.mkdtemp(prefix="bench_ingest_")
  results = []
  for rows in sorted(int(r) for r in args.rows.split(",")):
    folder = os.path.join(root, f"log_{rows}")
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    path = generate(folder, rows)
    gen_s = time.perf_counter() - t0
    size_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
    row = {"rows": rows, "log_mb": size_mb, "generate_s": gen_s, "engines": {}}
    shas = {}
    for engine in args.engines.split(","):
      data_dir = os.path.join(root, f"cache_{rows}_{engine}")
      r = convert(path, data_dir, engine, args.shards)
      shas[engine] = r.pop("sha256")
      r["folder"] = os.path.relpath(r["folder"], root)  # under --workdir: no machine's paths in the JSON
      r["rows_per_s"] = rows / r["seconds"]
      row["engines"][engine] = r
      print(f"{rows:>11,} rows  {engine:5s}  {r['seconds']:7.1f} s  {r['rows_per_s']:>10,.0f} rows/s  "
            f"peak RSS {r['peak_rss_mb']:7.0f} MB  ({r['counts']['train_examples']:,} examples, "
            f"{r['counts']['duplicates']:,} duplicates dropped)", flush=True)
    if len(shas) > 1:
      row["engines_identical"] = len({json.dumps(s, sort_keys=True) for s in shas.values()}) == 1
      print(f"{'':>11}  engines wrote identical files: {row['engines_identical']}", flush=True)
    if "local" in row["engines"]:
      row["training"] = train_rates(path, os.path.join(root, f"cache_{rows}_local"), args.steps, args.batch_size)
      t = row["training"]
      print(f"{'':>11}  batches of {args.batch_size} read per batch from the shards: "
            f"{t['shards_random_access_examples_per_s']:,.0f} examples/s; all shards into memory in "
            f"{t['shards_load_all_s']:.1f} s, then {t['read_examples_per_s']:,.0f} examples/s ({t['source']}); "
            f"training {t['train_examples_per_s']:,.0f} examples/s after compilation ({args.steps} steps in "
            f"{t['train_run_s_incl_compile']:.1f} s with it)", flush=True)
    results.append(row)
    shutil.rmtree(folder, ignore_errors=True)
  doc = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
         "command": "python experiments/bench_ingest.py " + " ".join(a for a in sys.argv[1:]),
         "date": datetime.date.today().isoformat(), "results": results}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(doc, f, indent=1)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
