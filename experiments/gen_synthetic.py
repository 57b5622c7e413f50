"""Streams a synthetic world to ArrayRecord shards and reports time, peak RSS and disk size.

  python experiments/gen_synthetic.py --num_items 1000000 --num_users 100000 --out /tmp/world
  python experiments/gen_synthetic.py --num_items 10000000 --num_users 1000000 --num_topics 1000 \
      --out /tmp/world_full --verbose

Peak RSS is the process's maximum resident set (getrusage), i.e. the whole run's high-water mark.
"""

import argparse
import json
import os
import random
import shutil
import time

from mvhan_jax.data.synthetic import WorldConfig, read_shards, write_world


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--num_items", type=int, default=1_000_000)
  p.add_argument("--num_users", type=int, default=100_000)
  p.add_argument("--num_topics", type=int, default=500)
  p.add_argument("--min_events", type=int, default=20)
  p.add_argument("--max_events", type=int, default=60)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--shard_size", type=int, default=100_000)
  p.add_argument("--out", required=True)
  p.add_argument("--delete", action="store_true", help="remove the output afterwards")
  p.add_argument("--verbose", action="store_true")
  a = p.parse_args()
  cfg = WorldConfig(num_items=a.num_items, num_users=a.num_users, num_topics=a.num_topics,
                    min_events=a.min_events, max_events=a.max_events, seed=a.seed)
  if os.path.exists(a.out):
    shutil.rmtree(a.out)
  t = time.perf_counter()
  meta = write_world(cfg, a.out, shard_size=a.shard_size, verbose=a.verbose)
  wall = time.perf_counter() - t
  # Spot-check random access on the result.
  t = time.perf_counter()
  ev = read_shards(a.out, "events")
  ev[0]  # opening a shard reads its index: timed apart from the reads
  open_s = time.perf_counter() - t
  idx = [int(i) for i in random.Random(0).sample(range(len(ev)), min(2000, len(ev)))]
  t = time.perf_counter()
  for i in idx:
    ev[i]
  read_us = (time.perf_counter() - t) / len(idx) * 1e6
  t = time.perf_counter()
  ev.__getitems__(idx)
  batch_us = (time.perf_counter() - t) / len(idx) * 1e6
  report = {
      "num_items": a.num_items, "num_users": a.num_users, "num_events": meta["num_events"],
      "wall_s": round(wall, 1), **{k: round(v, 1) for k, v in meta["timings"].items()},
      "items_per_s": round(a.num_items / meta["timings"]["items_s"]),
      "users_per_s": round(a.num_users / meta["timings"]["users_s"]),
      "peak_rss_mib": round(meta["peak_rss_mib"]), "disk_mib": round(_du(a.out) / 2**20),
      "open_first_shard_s": round(open_s, 2),
      "random_read_us_per_user_record": round(read_us, 1),
      "batched_read_us_per_user_record": round(batch_us, 1),
  }
  print(json.dumps(report, indent=1))
  if a.delete:
    shutil.rmtree(a.out)


if __name__ == "__main__":
  main()
