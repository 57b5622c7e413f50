r"""Where MV-HAN's training step spends its time: XLA cost analysis and wall time per part.

  python experiments/profile_mvhan.py --batch_sizes=256,1024
  python experiments/profile_mvhan.py --batch_sizes=1024 --override=model.fel_layers=1

The step of the bench tables (`experiments/bench_train.py`, model `mvhan`: mvhan_ml100k.py with the
sampled softmax over 256 negatives, d = 64, maxlen 50). Each part is compiled on its own as forward +
backward (`jax.value_and_grad` of the sum of its output with respect to all parameters), on the
batch and negatives a real step sees:
  user tower      encode_users on the batch (embedding layer, FEL over the user tokens, MLP)
    user FEL      its FEL alone, on tokens of the same shape
    user MLP      its MLP alone
  content tower   encode_items on the batch's targets + the negatives
    content FEL   its FEL alone
    content heads the per-type MRL heads (every type's head on every item, then the own one gathered)
  step            the whole training step (loss, gradients, optimizer update)
For each: GFLOP and GB accessed (XLA's cost analysis of the compiled function) and the median wall
time of --repeats calls. Measure with nothing else running (two JAX processes on two cores halve
each other). Prints a markdown table; --out writes the rows as JSON; --trace adds a jax.profiler
trace of the step (compiled ops per step, their time by kind of op).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

from mvhan_jax import configs
from mvhan_jax import host_memory
from mvhan_jax import layers
from mvhan_jax import report
from mvhan_jax import train
from mvhan_jax.data import pipeline
from mvhan_jax.tasks import retrieval as rtask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a script (tests import `profile`, and other
  experiment scripts define flags of the same names)."""
  flags.DEFINE_list("batch_sizes", ["256", "1024"], "Batch sizes.")
  flags.DEFINE_integer("repeats", 20, "Timed calls per part (median reported).")
  flags.DEFINE_list("override", [], "Config field overrides, e.g. model.fel_layers=1.")
  flags.DEFINE_string("config", "experiments/configs/mvhan_ml100k.py:softmax=sampled", "The profiled config.")
  flags.DEFINE_string("out", "", "JSON file for the rows (optional).")
  flags.DEFINE_bool("trace", False, "Also trace the step with jax.profiler: compiled ops per step and their time "
                    "by kind of op.")


def _cost(fn, *args) -> tuple[float, float]:
  cost = report.xla_cost(fn.lower(*args).compile())
  return cost["flops"] / 1e9, cost["bytes_accessed"] / 1e9


def _time(fn, *args, repeats: int, threads_state: bool = False) -> float:
  """Median ms of fn(*args); threads_state: fn donates its first argument and returns it first (the
  train step), so each call gets the previous call's output."""
  def call(args):
    out = fn(*args)
    jax.block_until_ready(out)
    return (out[0],) + tuple(args[1:]) if threads_state else args
  args = call(args)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    args = call(args)
    times.append(time.perf_counter() - t0)
  return 1000 * statistics.median(times)


# Trace events that are not one compiled op: the runtime's own spans and the Python calls around them.
_NOT_OPS = ("ThunkExecutor", "$", "end:", "Slinky", "Pjit", "Common", "Parse")


def trace_step(step_fn, state, args, calls: int = 10) -> dict:
  """A jax.profiler trace of ``calls`` train steps (state threaded, as in `_time`): the number of
  compiled ops per step, their summed time, and that time by kind of op (the op name without its
  numeric suffix: 'transpose_copy_fusion', 'ynn_fusion' (matmuls), ...), ms per step."""
  with tempfile.TemporaryDirectory() as tmp:
    state, _ = step_fn(state, *args)
    jax.block_until_ready(state)
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for _ in range(calls):
      state, metrics = step_fn(state, *args)
      jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(tmp, "**", "*perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  ops = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS)]
  by_kind = collections.Counter()
  for e in ops:
    by_kind[re.sub(r"[._]\d+$", "", e["name"])] += e.get("dur", 0) / 1000 / calls
  return {"ops_per_step": len(ops) / calls, "op_ms_per_step": sum(by_kind.values()),
          "op_ms_by_kind": dict(by_kind.most_common())}


def profile(batch_size: int, config: str, overrides=(), repeats: int = 20, trace: bool = False) -> list[dict]:
  """One row per part (see the module docstring) for the config spec ``config`` at ``batch_size``;
  trace=True adds `trace_step`'s figures to the step's row."""
  cfg = configs.load_config(os.path.join(ROOT, config))
  cfg.model.dim = 64
  cfg.maxlen = 50
  cfg = configs.apply_overrides(cfg, overrides)
  cfg.batch_size = batch_size
  exp = rtask.build_experiment(cfg)
  model = exp.model
  tx = train.make_optimizer(cfg.optimizer, 10_000)
  key = jax.random.key(0)
  state = rtask.init_state(exp, tx, key)
  step_fn = rtask.make_train_step(exp, tx)
  batch = next(pipeline.iterate(pipeline.train_batches(exp.train_source, batch_size, seed=0), 0, prefetch=0))
  batch = jax.tree.map(jnp.asarray, batch)
  tables = exp.tables
  params = state.params
  num_neg = int(cfg.loss.num_negatives)
  ids = jnp.concatenate([batch["target"], jax.random.randint(key, (num_neg,), 1, model.num_items)])
  rngs = {"dropout": jax.random.key(1)}
  users_out = model.apply(params, batch, tables, True, method=model.encode_users, rngs=rngs)
  D = users_out.shape[-1]

  def grad_of(f):
    return jax.jit(jax.value_and_grad(lambda p, *a: jnp.sum(f(p, *a))))

  p = params["params"]
  # Token counts the two FELs see, read from their MLPs' input widths (F tokens x D).
  n_user_tokens = p["user_mlp"]["Dense_0"]["kernel"].shape[0] // D
  n_item_tokens = p["content_heads"]["Dense_0"]["kernel"].shape[-2] // D
  user_tokens = jax.random.normal(key, (batch_size, n_user_tokens, D))
  item_tokens = jax.random.normal(key, (ids.shape[0], n_item_tokens, D))
  ones_u = jnp.ones(user_tokens.shape[:2], bool)
  ones_i = jnp.ones(item_tokens.shape[:2], bool)

  parts = {
      "user tower": (grad_of(lambda prm, b: model.apply(prm, b, tables, True, method=model.encode_users, rngs=rngs)),
                     (params, batch)),
      "content tower": (grad_of(lambda prm, i: model.apply(prm, i, tables, True, method=model.encode_items, rngs=rngs)),
                        (params, ids)),
  }
  # Sub-modules, bound to their own parameter subtrees.
  from mvhan_jax.models import mvhan as mv  # pylint: disable=import-outside-toplevel
  fel = mv.FEL(model.fel_layers, model.num_heads, model.interaction, model.dropout)
  mlp = layers.MLP(tuple(model.mrl_hidden), model.dim, model.dropout)
  heads = mv._per_type(layers.MLP, model.num_types)(tuple(model.mrl_hidden), model.dim, model.dropout)  # pylint: disable=protected-access
  parts["user FEL"] = (grad_of(lambda prm, x, m: fel.apply({"params": prm}, x, m, True, rngs=rngs)),
                       (p["user_fel"], user_tokens, ones_u))
  parts["user MLP"] = (grad_of(lambda prm, x: mlp.apply({"params": prm}, x, True, rngs=rngs)),
                       (p["user_mlp"], user_tokens.reshape(batch_size, -1)))
  if "content_fel" in p:
    parts["content FEL"] = (grad_of(lambda prm, x, m: fel.apply({"params": prm}, x, m, True, rngs=rngs)),
                            (p["content_fel"], item_tokens, ones_i))
  parts["content heads"] = (grad_of(lambda prm, x: heads.apply({"params": prm}, x, True, rngs=rngs)),
                            (p["content_heads"], item_tokens.reshape(ids.shape[0], -1)))
  parts["step"] = (step_fn, (state, batch, tables, key))
  rows = []
  for name, (fn, args) in parts.items():
    gflop, gb = _cost(fn, *args)
    ms = _time(fn, *args, repeats=repeats, threads_state=name == "step")
    rows.append({"part": name, "batch_size": batch_size, "items": int(ids.shape[0]), "gflop": gflop, "gb": gb,
                 "ms": ms, "gflop_per_s": gflop / (ms / 1000)})
    print(f"{name} batch {batch_size}: {ms:.1f} ms, {gflop:.2f} GFLOP", flush=True)
  if trace:
    state = rtask.init_state(exp, tx, key)  # the timed calls donated the first one
    rows[-1]["trace"] = trace_step(step_fn, state, (batch, tables, key))
  return rows


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array: each step reuses its host memory
  logging.set_verbosity(logging.WARNING)
  rows = [r for b in FLAGS.batch_sizes
          for r in profile(int(b), FLAGS.config, FLAGS.override, FLAGS.repeats, FLAGS.trace)]
  machine = report.machine_description()
  print(f"\nMachine: {machine}; load average at the end {os.getloadavg()[0]:.1f}\n")
  print("| part | batch | items encoded | GFLOP | GB accessed | ms | GFLOP/s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['part']} | {r['batch_size']} | {r['items']} | {r['gflop']:.2f} | {r['gb']:.2f} | {r['ms']:.1f} | "
          f"{r['gflop_per_s']:.1f} |")
  for r in rows:
    if "trace" in r:
      t = r["trace"]
      top = ", ".join(f"{k} {v:.1f}" for k, v in list(t["op_ms_by_kind"].items())[:6])
      print(f"\nTrace, batch {r['batch_size']}: {t['ops_per_step']:.0f} compiled ops per step, "
            f"{t['op_ms_per_step']:.1f} ms of op time; ms by kind: {top}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"machine": machine, "jax": jax.__version__, "platform": platform.machine(),
                 "load_average": os.getloadavg(), "command": " ".join(["python"] + sys.argv), "rows": rows},
                f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
