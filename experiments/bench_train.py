r"""Training throughput of each retrieval model: compile time and examples/s of the jitted train step.

  python experiments/bench_train.py --models=two_tower,mind,mind_1,comirec_dr,comirec_sa --batch_sizes=128,1024

MovieLens-100k training examples at maxlen 50, d = 64, K = 4 interests, sampled softmax with 1024
shared negatives. The input pipeline is included (Grain batches from memory with prefetch), so the
number is what a training run sees. Prints a table and writes experiments/results/bench/train_<machine>.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mvhan_jax import configs  # noqa: E402
from mvhan_jax import report  # noqa: E402
from mvhan_jax import train  # noqa: E402
from mvhan_jax.data import pipeline  # noqa: E402

CONFIGS = {
    "two_tower": "two_tower_ml100k.py",
    "mind": "mind_ml100k.py:model=mind",
    "mind_1": "mind_ml100k.py:model=mind,K=1",
    "comirec_dr": "mind_ml100k.py:model=comirec_dr",
    "comirec_sa": "mind_ml100k.py:model=comirec_sa",
    "mvhan": "mvhan_ml100k.py",
    "mv_dnn": "mvhan_ml100k.py:model=mv_dnn",
}
flags.DEFINE_list("models", list(CONFIGS), f"Models to time: {sorted(CONFIGS)}.")
flags.DEFINE_list("batch_sizes", ["128", "1024"], "Batch sizes.")
flags.DEFINE_integer("steps", 50, "Timed steps after the compile step.")
flags.DEFINE_string("out_dir", "experiments/results/bench", "Where the JSON goes.")
FLAGS = flags.FLAGS


def load_config(name: str):
  if name not in CONFIGS:
    raise ValueError(f"--models: unknown model {name!r}; choose from {sorted(CONFIGS)}")
  cfg = configs.load_config(os.path.join(ROOT, "experiments", "configs", CONFIGS[name]))
  cfg.model.dim = 64
  cfg.maxlen = 50
  return cfg


def bench(name: str, batch_size: int) -> dict:
  cfg = load_config(name)
  cfg.batch_size = batch_size
  exp = train.build_experiment(cfg)
  tx = train.make_optimizer(cfg.optimizer, 10_000)
  key = jax.random.key(0)
  state = train.init_state(exp, tx, key)
  step_fn = train.make_train_step(exp, tx)
  batches = pipeline.iterate(pipeline.train_batches(exp.train_source, batch_size, seed=0), 0, prefetch=2)
  t0 = time.perf_counter()
  state, metrics = step_fn(state, next(batches), exp.tables, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, metrics = step_fn(state, next(batches), exp.tables, key)
  jax.block_until_ready(metrics)
  dt = time.perf_counter() - t0
  return {"model": name, "batch_size": batch_size, "compile_plus_first_step_s": compile_s,
          "examples_per_s": FLAGS.steps * batch_size / dt, "step_ms": 1000 * dt / FLAGS.steps,
          "params": sum(x.size for x in jax.tree.leaves(state.params))}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = [bench(m, int(b)) for m in FLAGS.models for b in FLAGS.batch_sizes]
  machine = report.machine_description()
  print(f"\nMachine: {machine}\n")
  print("| model | batch | examples/s | step ms | compile + first step s | params |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['batch_size']} | {r['examples_per_s']:,.0f} | {r['step_ms']:.1f} | "
          f"{r['compile_plus_first_step_s']:.1f} | {r['params']:,} |")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  tag = f"{jax.devices()[0].platform}_{platform.machine()}_{os.cpu_count()}cores"
  with open(os.path.join(FLAGS.out_dir, f"train_{tag}.json"), "w") as f:
    json.dump({"machine": machine, "jax": jax.__version__, "command": " ".join(["python"] + sys.argv), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
