"""Input-pipeline throughput on MovieLens-100k leave-one-out examples (maxlen 50).

Run: python experiments/bench_pipeline.py [--data_dir DIR] [--seconds 2]

Prints the one-time costs (TFDS ArrayRecord build, loading the split into memory) and examples/s
for batch 256 and 1024 along three read paths:
  tfds_getitems  `train_batches` straight over `tfds.data_source` (one batched ``__getitems__`` per
                 batch, TFDS' per-record decoder) -- the path we do NOT use for training;
  memory_sync    `train_batches` over the in-memory `ArraySource`, ``ds[i]`` in a loop;
  memory_iterate `iterate(ds, prefetch=2)` (Grain to_iter_dataset, one background reader thread).
The build uses a fresh temporary TFDS directory (the raw files come from the usual cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from mvhan_jax.data import movielens, pipeline, tfds_movielens


def _rate(fn, batch_size: int, seconds: float) -> float:
  fn(0)  # warm-up (first epoch permutation)
  n, t0, step = 0, time.perf_counter(), 1
  while time.perf_counter() - t0 < seconds:
    n += len(fn(step)["target"])
    step += 1
  return n / (time.perf_counter() - t0)


def _iter_rate(ds, seconds: float) -> float:
  it = pipeline.iterate(ds, start_step=0, prefetch=2)
  next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += len(next(it)["target"])
  return n / (time.perf_counter() - t0)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default=None, help="raw-data cache (default: MVHAN_DATA_DIR or ~/.cache/mvhan_jax)")
  p.add_argument("--seconds", type=float, default=2.0, help="measuring time per cell")
  p.add_argument("--maxlen", type=int, default=50)
  args = p.parse_args()

  movielens.load_movielens_100k(args.data_dir)  # make sure the raw files are cached (not timed)
  raw = os.path.join(args.data_dir or movielens.default_data_dir(), "ml-100k")
  tmp = tempfile.mkdtemp(prefix="bench_pipeline_")
  try:
    shutil.copytree(raw, os.path.join(tmp, "ml-100k"))
    t0 = time.perf_counter()
    tfds_movielens.build(tmp, args.maxlen)
    build_s = time.perf_counter() - t0
    tsrc = tfds_movielens.data_source(tmp, args.maxlen)
    t0 = time.perf_counter()
    msrc = pipeline.ArraySource(pipeline.load_arrays(tsrc))
    load_s = time.perf_counter() - t0

    print(f"examples: {len(msrc)}  maxlen: {args.maxlen}  cpus: {os.cpu_count()}")
    print(f"one-time: TFDS ArrayRecord build {build_s:.1f} s, load split into memory {load_s:.2f} s")
    print(f"{'batch':>6} {'tfds_getitems':>14} {'memory_sync':>12} {'memory_iterate':>15}   (examples/s)")
    for bs in (256, 1024):
      td = pipeline.train_batches(tsrc, bs, seed=0, shard_index=0, shard_count=1)
      md = pipeline.train_batches(msrc, bs, seed=0, shard_index=0, shard_count=1)
      r_tfds = _rate(td.__getitem__, bs, min(args.seconds, 2.0))
      r_sync = _rate(md.__getitem__, bs, args.seconds)
      r_iter = _iter_rate(md, args.seconds)
      print(f"{bs:>6} {r_tfds:>14,.0f} {r_sync:>12,.0f} {r_iter:>15,.0f}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
