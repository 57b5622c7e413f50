r"""Train steps on an accelerator against the roofline: compile time, step time, flops and bytes.

  python experiments/bench_accel.py --models=mind,mvhan,two_tower --batch_sizes=128,1024,8192 \
      --dtypes=float32,bfloat16

For each (model, compute dtype, batch): the jitted train step of `mvhan_jax.rtask.make_train_step`
(MovieLens-100k examples, d = 64, K = 4, maxlen 50, the model config's sampled softmax) is lowered and
compiled once (compile seconds reported apart), then timed on a device-resident batch (median of
--repeats windows of --steps steps, each window ended by block_until_ready), and once more fed by
the real input pipeline (Grain batches from host memory with prefetch) to show whether the host keeps
up. The compiled step's XLA cost analysis gives the flops and the bytes its ops touch (every unfused
operand counted, an upper bound on traffic); the floor of the step is
  max(flops / measured matmul rate of that dtype,  min bytes / measured copy bandwidth),
with min bytes = the train state (parameters + Adam moments) read and written once plus the batch read
once. The machine's two ceilings are measured at the start (a large matmul in float32 and bfloat16 and
a large device-to-device copy, counting bytes read plus written).

--dtypes: 'bfloat16' is `config.compute_dtype='bfloat16'`, the train step's own casting (since the
bfloat16 fix: tables gathered in float32, rows cast); 'bfloat16_tables' the casting before the fix;
'bfloat16_fixed' is the casting of `mvhan_jax/precision.py` (tables gathered in float32, only the
rows cast), applied around the model so that it is timed whatever the step does. The experiment and
its initial state are built once per model and shared by its dtypes and batch sizes.

Prints a table and writes experiments/results/bench/accel_<platform>_<device>.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import statistics
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
from mvhan_jax import train
from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CONFIGS = {
    "two_tower": "two_tower_ml100k.py",
    "mind": "mind_ml100k.py:model=mind",
    "comirec_sa": "mind_ml100k.py:model=comirec_sa",
    "mvhan": "mvhan_ml100k.py:softmax=sampled",  # the step of the bench tables (256 negatives)
    "mv_dnn": "mvhan_ml100k.py:model=mv_dnn,softmax=sampled",
}
flags.DEFINE_list("models", ["mind", "mvhan", "two_tower"], f"Models to time: {sorted(CONFIGS)}.")
flags.DEFINE_list("batch_sizes", ["128", "1024", "8192"], "Batch sizes.")
DTYPES = ("float32", "bfloat16", "float16", "bfloat16_fixed", "bfloat16_tables")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "config.compute_dtype values, or 'bfloat16_fixed': the "
                  "step in float32 on precision.CastingModel (tables gathered in float32, rows cast).")
flags.DEFINE_integer("steps", 50, "Steps per timed window.")
flags.DEFINE_integer("repeats", 5, "Timed windows; the median is reported.")
flags.DEFINE_integer("pipeline_steps", 50, "Steps fed by the input pipeline (0 skips that column).")
flags.DEFINE_integer("peak_n", 0, "Matmul size for the ceilings (0: 8192 on accelerators, 2048 on CPU).")
flags.DEFINE_bool("diagnose_scatter", False, "Also time the embedding-gradient scatter-add alone in float32 "
                  "and bfloat16 (MovieLens-like Zipf ids), the suspect of slow bfloat16 steps.")
flags.DEFINE_string("out_dir", "experiments/results/bench", "Where the JSON goes.")
FLAGS = flags.FLAGS


def _sync(x):
  jax.block_until_ready(x)
  return x


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _sync(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure_ceilings(n: int) -> dict:
  """Measured matmul rates (float32 at default precision, bfloat16) and copy bandwidth."""
  out = {}
  key = jax.random.key(0)
  for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    a = jax.random.normal(key, (n, n), dt)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dt)
    mm = jax.jit(lambda x, y: x @ y)
    _sync(mm(a, b))
    reps = 10
    t = _median_time(lambda: [mm(a, b) for _ in range(reps)][-1], 3) / reps
    out[f"matmul_tflops_{name}"] = 2 * n**3 / t / 1e12
  m = (1 << 28) if jax.devices()[0].platform != "cpu" else (1 << 25)  # float32 elements
  x = jax.random.normal(key, (m,), jnp.float32)
  cp = jax.jit(lambda v: v * 1.0001)
  _sync(cp(x))
  reps = 10
  t = _median_time(lambda: [cp(x) for _ in range(reps)][-1], 3) / reps
  out["copy_gb_s"] = 2 * 4 * m / t / 1e9
  return out


def scatter_diagnostic(batch: int = 8192, maxlen: int = 50, rows: int = 1682, dim: int = 64) -> dict:
  """Gradient of a row gather (a scatter-add into the table) with Zipf-distributed ids, per dtype."""
  rng = np.random.default_rng(0)
  ids = jnp.asarray(np.minimum(rng.zipf(1.2, size=(batch, maxlen)) - 1, rows - 1).astype(np.int32))
  out = {}
  for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    table = jax.random.normal(jax.random.key(0), (rows, dim), dt)
    g = jax.jit(jax.grad(lambda t: jnp.sum(jnp.take(t, ids, axis=0).astype(jnp.float32) ** 2)))
    _sync(g(table))
    out[f"gather_grad_ms_{name}"] = 1000 * _median_time(lambda: g(table), 5)
  return out


def _nbytes(tree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(tree)))


@functools.lru_cache(maxsize=None)
def _experiment(name: str):
  """(experiment, optimizer, initial state) of a model, float32; shared by its dtypes and batches
  (nothing in them depends on either)."""
  if name not in CONFIGS:
    raise ValueError(f"--models: unknown model {name!r}; choose from {sorted(CONFIGS)}")
  cfg = configs.load_config(os.path.join(ROOT, "experiments", "configs", CONFIGS[name]))
  cfg.model.dim = 64
  cfg.maxlen = 50
  exp = rtask.build_experiment(cfg)
  tx = train.make_optimizer(cfg.optimizer, 10_000)
  return exp, tx, rtask.init_state(exp, tx, jax.random.key(0))


def _variant(name: str, batch_size: int, dtype: str):
  """(experiment, optimizer, a fresh copy of the initial state, train step) for one --dtypes value:
  'float32' / 'bfloat16' / 'float16' set config.compute_dtype (the step's own casting);
  'bfloat16_fixed' is a float32 step on `precision.CastingModel` (mvhan_jax/precision.py: tables
  gathered in float32, only rows cast), whatever the step's own casting is; 'bfloat16_tables' is the
  step's casting before that fix (``config.compute_cast='tables'``: whole tables cast to bfloat16
  before the gathers, so the gradient scatters in bfloat16)."""
  if dtype not in DTYPES:
    raise ValueError(f"--dtypes: unknown {dtype!r}; choose from {DTYPES}")
  exp, tx, state = _experiment(name)
  cfg = exp.config.copy_and_resolve_references()
  cfg.batch_size = batch_size
  cfg.compute_dtype = {"bfloat16_fixed": "float32", "bfloat16_tables": "bfloat16"}.get(dtype, dtype)
  cfg.compute_cast = "tables" if dtype == "bfloat16_tables" else "rows"
  exp = dataclasses.replace(exp, config=cfg)
  if dtype == "bfloat16_fixed":
    exp = dataclasses.replace(exp, model=precision.CastingModel(exp.model, "bfloat16"))
  state = jax.tree.map(jnp.copy, state)  # the step donates its state
  return exp, tx, state, rtask.make_train_step(exp, tx)


def step_jaxpr(name: str, batch_size: int, dtype: str):
  """The jaxpr of one train step (e.g. for `precision.low_precision_scatters`)."""
  exp, _, state, step_fn = _variant(name, batch_size, dtype)
  batch = rtask.train_dataset(exp, batch_size, seed=0)[0]
  return jax.make_jaxpr(step_fn)(state, batch, exp.tables, jax.random.key(0))


def bench(name: str, batch_size: int, dtype: str, ceilings: dict) -> dict:
  exp, _, state, step_fn = _variant(name, batch_size, dtype)
  key = jax.random.key(0)
  batches = pipeline.iterate(pipeline.train_batches(exp.train_source, batch_size, seed=0), 0, prefetch=2)
  batch = jax.device_put(next(batches))
  tables = jax.device_put(exp.tables)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, tables, key).compile()
  compile_s = time.perf_counter() - t0
  cost = report.xla_cost(compiled)
  state, metrics = compiled(state, batch, tables, key)
  _sync(metrics)
  loss0 = float(metrics["loss"])

  def window():
    nonlocal state
    m = None
    for _ in range(FLAGS.steps):
      state, m = compiled(state, batch, tables, key)
    return m

  _sync(window())  # warm-up
  step_s = _median_time(window, FLAGS.repeats) / FLAGS.steps

  e2e = float("nan")
  if FLAGS.pipeline_steps:
    state, metrics = compiled(state, jax.device_put(next(batches)), tables, key)
    _sync(metrics)
    t0 = time.perf_counter()
    for _ in range(FLAGS.pipeline_steps):
      state, metrics = compiled(state, next(batches), tables, key)
    _sync(metrics)
    e2e = FLAGS.pipeline_steps * batch_size / (time.perf_counter() - t0)

  state_bytes = _nbytes(state)
  min_bytes = 2 * state_bytes + _nbytes(batch)
  rate = ceilings[f"matmul_tflops_{'bfloat16' if dtype != 'float32' else 'float32'}"] * 1e12
  floor_flops = cost["flops"] / rate
  floor_bytes = min_bytes / (ceilings["copy_gb_s"] * 1e9)
  floor = max(floor_flops, floor_bytes)
  return {
      "model": name, "dtype": dtype, "batch_size": batch_size, "compile_s": compile_s,
      "step_ms": 1000 * step_s, "examples_per_s": batch_size / step_s, "examples_per_s_with_pipeline": e2e,
      "gflop_per_step": cost["flops"] / 1e9, "xla_bytes_accessed_mb": cost["bytes_accessed"] / 1e6,
      "min_bytes_mb": min_bytes / 1e6, "floor_ms_flops": 1000 * floor_flops, "floor_ms_bytes": 1000 * floor_bytes,
      "floor_ms": 1000 * floor, "time_over_floor": step_s / floor if floor > 0 else float("nan"),
      "achieved_tflops": cost["flops"] / step_s / 1e12, "first_loss": loss0,
      "params": sum(x.size for x in jax.tree.leaves(state.params)),
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  dev = jax.devices()[0]
  n = FLAGS.peak_n or (2048 if dev.platform == "cpu" else 8192)
  ceilings = measure_ceilings(n)
  machine = report.machine_description()
  print(f"Machine: {machine}")
  if FLAGS.diagnose_scatter:
    ceilings.update(scatter_diagnostic())
  print("Ceilings: " + ", ".join(f"{k} {v:,.3f}" for k, v in ceilings.items()), flush=True)
  tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{dev.platform}_{dev.device_kind}").strip("_").lower()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  path = os.path.join(FLAGS.out_dir, f"accel_{tag}.json")
  rows = []
  header = ("| model | dtype | batch | step ms | examples/s | with pipeline | compile s | GFLOP/step | "
            "XLA MB/step | floor ms | time / floor |")
  for m in FLAGS.models:
    for dt in FLAGS.dtypes:
      for b in FLAGS.batch_sizes:
        r = bench(m, int(b), dt, ceilings)
        rows.append(r)
        print(f"{m} {dt} {b}: {r['step_ms']:.2f} ms, {r['examples_per_s']:,.0f} ex/s, "
              f"pipeline {r['examples_per_s_with_pipeline']:,.0f} ex/s, compile {r['compile_s']:.1f} s, "
              f"{r['gflop_per_step']:.2f} GFLOP, floor {r['floor_ms']:.3f} ms, loss {r['first_loss']:.3f}", flush=True)
        with open(path, "w") as f:
          json.dump({"machine": machine, "jax": jax.__version__, "ceilings": ceilings,
                     "command": " ".join(["python"] + sys.argv), "rows": rows}, f, indent=2)
  print(f"\nMachine: {machine}\n")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  for r in rows:
    print(f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {r['step_ms']:.2f} | {r['examples_per_s']:,.0f} | "
          f"{r['examples_per_s_with_pipeline']:,.0f} | {r['compile_s']:.1f} | {r['gflop_per_step']:.2f} | "
          f"{r['xla_bytes_accessed_mb']:.0f} | {r['floor_ms']:.3f} | {r['time_over_floor']:.0f}x |")
  print(f"\nwrote {path}")


if __name__ == "__main__":
  app.run(main)
