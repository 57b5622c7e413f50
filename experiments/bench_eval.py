r"""Full-corpus exact evaluation: wall time and peak memory of the chunked on-device scoring.

  python experiments/bench_eval.py                                   # both parts (~10 min, 2 cores)
  python experiments/bench_eval.py --parts=movielens                 # seconds
  python experiments/bench_eval.py --parts=large --users=100000 --items=1000000 \
      --chunks=4096x65536,1024x16384,256x8192

Part 'movielens': the real MovieLens-100k leave-one-out test set (943 users, 1,682 items, each
user's training and validation items excluded) scored by the evaluators the trainer uses
(`evaluation.LeaveOneOutEvaluator`: target ranks -> HR/NDCG@10/50, MRR; and the top-50 lists of
`evaluation.exact_topk`), single-vector users and K = 4 multi-interest users. Vectors are random
(the cost does not depend on their values); the time is after compilation (median of --repeats).

Part 'large': --users x --items exact top-50 (`evaluation.exact_topk`), d = --dim, every user with
--exclude random excluded ids (a history), for each (query_chunk x item_chunk) in --chunks. Memory
is bounded by the chunking, not by users x items: each setting runs in a fresh subprocess whose
peak resident memory is reported (ru_maxrss, which includes the 256 MB item matrix and the
inputs). Throughput in user-item scores per second and the achieved matmul GFLOP/s.

Prints tables and writes experiments/results/bench/eval_<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _median_time(fn, repeats: int) -> float:
  fn()  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def part_movielens(args) -> list[dict]:
  from mvhan_jax import evaluation  # pylint: disable=import-outside-toplevel
  from mvhan_jax.data import movielens, protocol  # pylint: disable=import-outside-toplevel
  data = movielens.load_movielens_100k(args.data_dir)
  es = protocol.leave_one_out(data).eval_set("test", 50)
  rng = np.random.default_rng(0)
  q, n, d = len(es.user), data.num_items, args.dim
  items = rng.standard_normal((n, d), dtype=np.float32)
  rows = []
  for kint in (1, 4):
    users = rng.standard_normal((q, d) if kint == 1 else (q, kint, d), dtype=np.float32)
    mask = None if kint == 1 else rng.random((q, kint)) < 0.6
    if mask is not None:
      mask[:, 0] = True
    ev = evaluation.LeaveOneOutEvaluator(es)
    t_rank = _median_time(lambda: ev.evaluate(users, items, user_mask=mask), args.repeats)
    t_topk = _median_time(lambda: evaluation.exact_topk(
        users, items, 50, query_mask=mask, exclude_indptr=es.exclude_indptr,
        exclude_indices=es.exclude_indices), args.repeats)
    rows.append(dict(part="movielens", users=q, items=n, dim=d, interests=kint,
                     ranks_metrics_s=t_rank, top50_s=t_topk,
                     excluded_per_user=float(np.diff(es.exclude_indptr).mean())))
    print(f"movielens K={kint}: ranks + HR/NDCG/MRR {1e3 * t_rank:.1f} ms, top-50 {1e3 * t_topk:.1f} ms "
          f"({q} users x {n} items)", flush=True)
  return rows


def _large_worker(args, qc: int, ic: int) -> dict:
  """One (query_chunk, item_chunk) setting; runs in its own process for a clean peak RSS."""
  import jax  # pylint: disable=import-outside-toplevel
  from mvhan_jax import evaluation  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  items = rng.standard_normal((args.items, args.dim), dtype=np.float32)
  users = rng.standard_normal((args.users, args.dim), dtype=np.float32)
  indptr = np.arange(args.users + 1, dtype=np.int64) * args.exclude
  indices = rng.integers(0, args.items, args.users * args.exclude).astype(np.int32)
  rss_inputs = _rss_mb()
  # Compile on one query chunk, then time every user.
  t0 = time.perf_counter()
  evaluation.exact_topk(users[:qc], items, args.k, exclude_indptr=indptr[:qc + 1],
                        exclude_indices=indices[:qc * args.exclude], item_chunk=ic, query_chunk=qc)
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  _, ids = evaluation.exact_topk(users, items, args.k, exclude_indptr=indptr, exclude_indices=indices,
                                 item_chunk=ic, query_chunk=qc)
  wall = time.perf_counter() - t0
  # A spot check that the result is the exact top-k: brute force for a few users.
  probe = rng.choice(args.users, 8, replace=False)
  scores = users[probe] @ items.T
  for r, u in enumerate(probe):
    scores[r, indices[indptr[u]:indptr[u + 1]]] = -np.inf
  ref = np.argsort(-scores, axis=1, kind="stable")[:, :args.k]
  exact = bool((ref == ids[probe]).all())
  return dict(part="large", users=args.users, items=args.items, dim=args.dim, k=args.k,
              excluded_per_user=args.exclude, query_chunk=qc, item_chunk=ic,
              score_block_mb=qc * min(ic, args.items) * 4 / 2**20, wall_s=wall,
              compile_plus_first_chunk_s=first_s,
              scores_per_s=args.users * args.items / wall,
              matmul_gflops=2 * args.users * args.items * args.dim / wall / 1e9,
              peak_rss_mb=_rss_mb(), rss_after_inputs_mb=rss_inputs, spot_check_exact=exact,
              jax=jax.__version__)


def part_large(args) -> list[dict]:
  rows = []
  for setting in args.chunks:
    qc, ic = (int(x) for x in setting.split("x"))
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", setting, "--users", str(args.users),
           "--items", str(args.items), "--dim", str(args.dim), "--k", str(args.k),
           "--exclude", str(args.exclude)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append(row)
    print(f"large {args.users} x {args.items}, chunks {qc} x {ic}: {row['wall_s']:.1f} s "
          f"({row['scores_per_s'] / 1e9:.2f}G scores/s, {row['matmul_gflops']:.0f} GFLOP/s), "
          f"peak RSS {row['peak_rss_mb']:.0f} MB, exact {row['spot_check_exact']}", flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default="movielens,large")
  p.add_argument("--users", type=int, default=100_000)
  p.add_argument("--items", type=int, default=1_000_000)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--k", type=int, default=50)
  p.add_argument("--exclude", type=int, default=50, help="Excluded ids per user in part 'large'.")
  p.add_argument("--chunks", default="4096x65536,1024x16384",
                 help="Comma-separated query_chunk x item_chunk settings for part 'large'.")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._worker:  # pylint: disable=protected-access
    qc, ic = (int(x) for x in args._worker.split("x"))  # pylint: disable=protected-access
    print(json.dumps(_large_worker(args, qc, ic)))
    return
  args.chunks = [c for c in args.chunks.split(",") if c]
  parts = [x for x in args.parts.split(",") if x]
  unknown = set(parts) - {"movielens", "large"}
  if unknown:
    p.error(f"--parts: unknown {sorted(unknown)}; use movielens and/or large")
  import jax  # pylint: disable=import-outside-toplevel
  from mvhan_jax import report  # pylint: disable=import-outside-toplevel
  load = os.getloadavg()
  rows = []
  if "movielens" in parts:
    rows += part_movielens(args)
  if "large" in parts:
    rows += part_large(args)
  machine = report.machine_description()
  print(f"\nMachine: {machine}; load average at start {load[0]:.1f}\n")
  tag = f"{jax.devices()[0].platform}_{platform.machine()}_{os.cpu_count()}cores"
  out = args.out or os.path.join(ROOT, "experiments", "results", "bench", f"eval_{tag}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"machine": machine, "jax": jax.__version__, "load_average_at_start": load,
               "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__), ROOT)] + sys.argv[1:]),
               "rows": rows}, f, indent=2)
  print(f"wrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
  main()
