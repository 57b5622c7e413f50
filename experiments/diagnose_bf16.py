r"""Why bfloat16 steps are slow: isolated ops and full MIND steps, float32 vs bfloat16.

  python experiments/diagnose_bf16.py            # accelerator: batch 1,024 and 8,192 (~2-3 min)
  python experiments/diagnose_bf16.py --small    # 2-core CPU: batch 128 and 1,024, MIND step at 256

The first bfloat16 forward (`config.compute_dtype='bfloat16'`) cast whole embedding tables before
the gather, so the gradient of every lookup was a bfloat16 scatter-add of [B*L, D] rows into an
[I, D] table; MovieLens histories repeat popular items and are 0-padded (row 0 is hit by every
padded slot). `mvhan_jax/precision.py` gathers float32 rows and casts the rows instead. At the
sizes of the MovieLens MIND / MV-HAN steps (I = 1,682 items, D = 64, L = 50, K = 4), this times:

  (a) gather      rows of an [I, D] table by ids [B, L]: float32; bfloat16 table; float32 table cast in
                  the jit then gathered (the old forward); gathered in float32 then cast (the fix)
  (b) gather grad d/d table of sum(w * rows): float32; table cast before the gather (old: bfloat16
                  scatter-add); rows cast after the gather (fix: float32 scatter-add); and the bare
                  scatter-add of [B*L, D] rows into zeros [I, D] in float32 and in bfloat16
  (c) routing     MIND's B2I routing (models/interest.py `b2i_routing`, 3 iterations of einsums over
                  [B, L, K] and [B, L, D]), forward and forward + backward, float32 vs bfloat16
  (d) MIND step   `rtask.make_train_step` (via experiments/bench_accel.py `bench`): float32;
                  'bfloat16' = the step's own casting (old until precision.mixed_precision is wired
                  in); 'bfloat16_fixed' = `precision.CastingModel` (the fix), with the number of
                  bfloat16 scatters in each step's jaxpr

Ids: the `history` of real MovieLens training batches (the step's own lookups, padding included);
`--ids=zipf` (or no dataset) draws Zipf(--zipf_a) ids instead. Each op is jitted and compiled first,
then timed as the median of --repeats windows (bench_accel's helpers). Prints a table and writes
experiments/results/bench/diagnose_bf16_<platform>_<device>.json (rows written as they come).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mvhan_jax import configs
from mvhan_jax import precision
from mvhan_jax import report
from mvhan_jax.models import interest
from mvhan_jax.tasks import retrieval as rtask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The step benchmark's helpers and flags (--steps, --repeats, --out_dir, --peak_n apply to (d)).
bench_accel = configs.sibling(__file__, "bench_accel")

flags.DEFINE_bool("small", False, "CPU sizes: ops at batch 128 and 1,024, the MIND step at batch 256.")
flags.DEFINE_list("op_batch_sizes", None, "Batch sizes of (a)-(c) (default 1024,8192; --small 128,1024).")
flags.DEFINE_list("step_batch_sizes", None, "Batch sizes of (d) (default 1024,8192; --small 256; empty skips).")
flags.DEFINE_list("step_dtypes", ["float32", "bfloat16_tables", "bfloat16", "bfloat16_fixed"], "Variants of (d).")
flags.DEFINE_enum("ids", "movielens", ["movielens", "zipf"], "Ids of (a)-(b): real batch histories or Zipf.")
flags.DEFINE_float("zipf_a", 1.0, "Zipf exponent of --ids=zipf (p(rank k) ~ k^-a over the I rows).")
flags.DEFINE_integer("rows", 1682, "I (MovieLens-100k items).")
flags.DEFINE_integer("dim", 64, "D.")
flags.DEFINE_integer("maxlen", 50, "L.")
flags.DEFINE_integer("interests", 4, "K.")
flags.DEFINE_float("window_s", 0.2, "Target seconds per timed window of an op (calls per window adapt).")
FLAGS = flags.FLAGS

BF16 = jnp.bfloat16


def _time_op(fn, *args) -> float:
  """Seconds per call of the jitted ``fn(*args)``: compiled first, then the median of windows of n
  calls, n chosen so that a window lasts about --window_s."""
  f = jax.jit(fn)
  bench_accel._sync(f(*args))  # compile
  t0 = time.perf_counter()
  bench_accel._sync(f(*args))
  one = max(time.perf_counter() - t0, 1e-6)
  n = int(min(max(FLAGS.window_s / one, 1), 200))
  return bench_accel._median_time(lambda: [f(*args) for _ in range(n)][-1], FLAGS.repeats) / n


def _ids_stats(ids: np.ndarray) -> dict:
  flat = ids.reshape(-1)
  counts = np.bincount(flat, minlength=FLAGS.rows)
  return {"lookups": int(flat.size), "unique_rows": int((counts > 0).sum()),
          "top_row": int(counts.argmax()), "top_row_share": float(counts.max() / flat.size)}


_EXP = {}


def _movielens():
  """bench_accel's MIND experiment (None when the dataset cannot be loaded)."""
  if "mind" not in _EXP:
    try:
      _EXP["mind"] = bench_accel._experiment("mind")
    except Exception as e:  # pylint: disable=broad-except  # no dataset on this machine: Zipf ids
      print(f"MovieLens unavailable ({type(e).__name__}: {e}); using Zipf ids, skipping (d)", flush=True)
      _EXP["mind"] = None
  return _EXP["mind"]


def make_ids(batch: int) -> tuple[np.ndarray, np.ndarray, str]:
  """(ids int32 [B, L], history_len int32 [B], source)."""
  exp = _movielens() if FLAGS.ids == "movielens" else None
  if exp is not None:
    ds = rtask.train_dataset(exp[0], batch, seed=0)
    if len(ds):
      b = ds[0]
      return np.asarray(b["history"], np.int32), np.asarray(b["history_len"], np.int32), "movielens"
  rng = np.random.default_rng(0)
  p = 1.0 / np.arange(1, FLAGS.rows + 1) ** FLAGS.zipf_a
  ids = rng.choice(FLAGS.rows, size=(batch, FLAGS.maxlen), p=p / p.sum()).astype(np.int32)
  return ids, np.full((batch,), FLAGS.maxlen, np.int32), f"zipf({FLAGS.zipf_a})"


def op_rows(batch: int) -> list[dict]:
  ids_np, hlen_np, source = make_ids(batch)
  stats = _ids_stats(ids_np)
  print(f"batch {batch}: ids from {source}, {stats}", flush=True)
  I, D, K = FLAGS.rows, FLAGS.dim, FLAGS.interests
  B, L = ids_np.shape
  key = jax.random.key(0)
  ids = jnp.asarray(ids_np)
  table = jax.random.normal(key, (I, D), jnp.float32) * 0.05
  table16 = table.astype(BF16)
  w = jax.random.normal(jax.random.fold_in(key, 1), (B, L, D), jnp.float32)
  upd, upd16 = w.reshape(B * L, D), w.reshape(B * L, D).astype(BF16)
  flat = ids.reshape(-1)

  # Every array is an argument (a constant captured by the jit would let XLA fold the whole
  # gradient, which does not depend on the table, at compile time).
  def grad_of(gather):
    return jax.grad(lambda t, i, c: jnp.sum(gather(t, i).astype(jnp.float32) * c))

  take = lambda t, i: jnp.take(t, i, axis=0)  # noqa: E731
  ops = [
      ("a", "gather", "float32", take, (table, ids)),
      ("a", "gather", "bfloat16 table", take, (table16, ids)),
      ("a", "gather", "bfloat16 old: cast table, gather", lambda t, i: take(t.astype(BF16), i), (table, ids)),
      ("a", "gather", "bfloat16 fix: gather, cast rows", lambda t, i: take(t, i).astype(BF16), (table, ids)),
      ("b", "gather grad", "float32", grad_of(take), (table, ids, w)),
      ("b", "gather grad", "bfloat16 old: cast table, gather",
       grad_of(lambda t, i: take(t.astype(BF16), i)), (table, ids, w)),
      ("b", "gather grad", "bfloat16 fix: gather, cast rows",
       grad_of(lambda t, i: take(t, i).astype(BF16)), (table, ids, w)),
      ("b", "scatter-add", "float32", lambda z, i, u: z.at[i].add(u), (jnp.zeros((I, D), jnp.float32), flat, upd)),
      ("b", "scatter-add", "bfloat16", lambda z, i, u: z.at[i].add(u), (jnp.zeros((I, D), BF16), flat, upd16)),
  ]
  bmask = jnp.asarray(np.arange(L)[None, :] < hlen_np[:, None])
  imask = interest.interest_mask(jnp.asarray(hlen_np), K)
  beh = jax.random.normal(jax.random.fold_in(key, 2), (B, L, D), jnp.float32)
  S = jax.random.normal(jax.random.fold_in(key, 3), (D, D), jnp.float32) / np.sqrt(D)
  logits0 = jax.random.normal(jax.random.fold_in(key, 4), (B, L, K), jnp.float32)
  wu = jax.random.normal(jax.random.fold_in(key, 5), (B, K, D), jnp.float32)

  def routing(dtype):
    def fwd(e, s, bm, im, l0, c):
      u = interest.b2i_routing(e.astype(dtype), bm, im, l0.astype(dtype), s.astype(dtype))
      return jnp.sum(u.astype(jnp.float32) * c)
    return fwd

  for name, dt in (("float32", jnp.float32), ("bfloat16", BF16)):
    args = (beh, S, bmask, imask, logits0, wu)
    ops.append(("c", "routing fwd", name, routing(dt), args))
    ops.append(("c", "routing fwd+bwd", name, jax.grad(routing(dt), argnums=(0, 1)), args))

  rows = []
  for part, op, variant, fn, args in ops:
    jaxpr = jax.make_jaxpr(fn)(*args)
    sec = _time_op(fn, *args)
    rows.append({"part": part, "op": op, "variant": variant, "batch_size": B, "ms": 1000 * sec,
                 "low_precision_scatters": len(precision.low_precision_scatters(jaxpr)),
                 "ids": source, **stats})
    print(f"  ({part}) {op:16s} {variant:34s} B={B:5d}: {1000 * sec:9.3f} ms", flush=True)
  return rows


def step_rows(batch: int, ceilings: dict) -> list[dict]:
  rows = []
  exp = _movielens()
  if exp is None:
    return rows
  for dt in FLAGS.step_dtypes:
    r = bench_accel.bench("mind", batch, dt, ceilings)
    jaxpr = bench_accel.step_jaxpr("mind", batch, dt)
    rows.append({"part": "d", "op": "MIND train step", "variant": dt, "batch_size": batch, "ms": r["step_ms"],
                 "low_precision_scatters": len(precision.low_precision_scatters(jaxpr)),
                 "compile_s": r["compile_s"], "first_loss": r["first_loss"], "gflop_per_step": r["gflop_per_step"]})
    print(f"  (d) MIND train step    {dt:34s} B={batch:5d}: {r['step_ms']:9.3f} ms "
          f"(compile {r['compile_s']:.1f} s, loss {r['first_loss']:.3f}, "
          f"{rows[-1]['low_precision_scatters']} bf16 scatters)", flush=True)
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  t_start = time.perf_counter()
  small = FLAGS.small
  op_batches = [int(b) for b in (FLAGS.op_batch_sizes or (["128", "1024"] if small else ["1024", "8192"]))]
  step_batches = FLAGS.step_batch_sizes
  if step_batches is None:
    step_batches = ["256"] if small else ["1024", "8192"]
  step_batches = [int(b) for b in step_batches if b]
  # (d) times steps as bench_accel does, with shorter windows and no input-pipeline column.
  for name, value in (("steps", 5 if small else 10), ("repeats", 3), ("pipeline_steps", 0)):
    if not FLAGS[name].present:
      FLAGS[name].value = value
  dev = jax.devices()[0]
  machine = report.machine_description()
  print(f"Machine: {machine}", flush=True)
  ceilings = bench_accel.measure_ceilings(FLAGS.peak_n or (1024 if dev.platform == "cpu" else 8192))
  print("Ceilings: " + ", ".join(f"{k} {v:,.3f}" for k, v in ceilings.items()), flush=True)
  tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{dev.platform}_{dev.device_kind}").strip("_").lower()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  path = os.path.join(FLAGS.out_dir, f"diagnose_bf16_{tag}{'_small' if small else ''}.json")
  rows = []

  def dump():
    with open(path, "w") as f:
      json.dump({"machine": machine, "jax": jax.__version__, "ceilings": ceilings,
                 "command": " ".join(["python"] + sys.argv), "sizes": {
                     "rows": FLAGS.rows, "dim": FLAGS.dim, "maxlen": FLAGS.maxlen, "interests": FLAGS.interests},
                 "rows": rows, "seconds": time.perf_counter() - t_start}, f, indent=2)

  for b in op_batches:
    rows.extend(op_rows(b))
    dump()
  for b in step_batches:
    rows.extend(step_rows(b, ceilings))
    dump()

  print(f"\nMachine: {machine}; I = {FLAGS.rows}, D = {FLAGS.dim}, L = {FLAGS.maxlen}, K = {FLAGS.interests}\n")
  print("| part | op | variant | batch | ms | vs float32 | bf16 scatters |")
  print("|---|---|---|---|---|---|---|")
  base = {(r["op"], r["batch_size"]): r["ms"] for r in rows if r["variant"] == "float32"}
  for r in rows:
    ref = base.get((r["op"], r["batch_size"]))
    ratio = f"{r['ms'] / ref:.2f}x" if ref else ""
    print(f"| {r['part']} | {r['op']} | {r['variant']} | {r['batch_size']:,} | {r['ms']:.3f} | {ratio} | "
          f"{r['low_precision_scatters']} |")
  print(f"\n{time.perf_counter() - t_start:.0f} s; wrote {path}")


if __name__ == "__main__":
  app.run(main)
