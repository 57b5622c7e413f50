r"""Training throughput of each retrieval model: compile time and examples/s of the jitted train step.

  python experiments/bench_train.py --models=two_tower,mind,mind_1,comirec_dr,comirec_sa --batch_sizes=128,1024
  python experiments/bench_train.py --models= --table_rows=10000,100000,1000000   # step vs table size

MovieLens-100k training examples at maxlen 50, d = 64, K = 4 interests, sampled softmax with 1024
shared negatives (MV-HAN / MV-DNN: 256, their configs' value). Ranking models (hinet, shared_bottom,
mmoe, ple, star): MovieLens-100k impressions of experiments/configs/hinet_ml100k.py at its sizes. The input pipeline is included (Grain batches from memory with prefetch), so the
number is what a training run sees. Prints a table and writes experiments/results/bench/train_<machine>.json.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax

from mvhan_jax import configs
from mvhan_jax import host_memory
from mvhan_jax import report
from mvhan_jax import train
from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "two_tower": "two_tower_ml100k.py",
    "mind": "mind_ml100k.py:model=mind",
    "mind_1": "mind_ml100k.py:model=mind,K=1",
    "comirec_dr": "mind_ml100k.py:model=comirec_dr",
    "comirec_sa": "mind_ml100k.py:model=comirec_sa",
    "mvhan": "mvhan_ml100k.py:softmax=sampled",  # the step of the bench tables (256 negatives)
    "mvhan_k5": "mvhan_ml100k.py:softmax=sampled,tokens=5",  # 5 behaviour tokens instead of 20
    "mv_dnn": "mvhan_ml100k.py:model=mv_dnn,softmax=sampled",
    "multitower": "multitower_ml100k.py",
}
# Ranking models (HiNet and its baselines): their own trainer, MovieLens-100k impressions, 4 scenarios.
RANKING_CONFIGS = {name: f"hinet_ml100k.py:model={name}" for name in ("hinet", "shared_bottom", "mmoe", "ple", "star")}
flags.DEFINE_list("models", list(CONFIGS) + list(RANKING_CONFIGS),
                  f"Models to time: {sorted(CONFIGS) + sorted(RANKING_CONFIGS)}.")
flags.DEFINE_list("batch_sizes", ["128", "1024"], "Batch sizes.")
flags.DEFINE_integer("steps", 50, "Timed steps after the compile step.")
flags.DEFINE_list("table_rows", [], "Also time a two-tower step against the item-table size: rows, e.g. "
                  "10000,100000,1000000 (random ids, batch 256, 1,024 negatives), dense AdamW vs lazy rows.")
flags.DEFINE_string("out_dir", "experiments/results/bench", "Where the JSON goes.")
flags.DEFINE_bool("cost_analysis", False, "Also report XLA's cost analysis of each compiled step "
                  "(GFLOP and GB accessed per step).")
flags.DEFINE_string("json_suffix", "", "Appended to the JSON file's name (train_<machine><suffix>.json), "
                    "so that a partial run does not replace the full table's file.")
flags.DEFINE_list("override", [], "Config field overrides of every retrieval model, e.g. model.num_behaviour_tokens=5.")
FLAGS = flags.FLAGS


def load_config(name: str):
  if name in RANKING_CONFIGS:
    return configs.load_config(os.path.join(ROOT, "experiments", "configs", RANKING_CONFIGS[name]))
  if name not in CONFIGS:
    raise ValueError(f"--models: unknown model {name!r}; choose from {sorted(CONFIGS) + sorted(RANKING_CONFIGS)}")
  cfg = configs.load_config(os.path.join(ROOT, "experiments", "configs", CONFIGS[name]))
  cfg.model.dim = 64
  cfg.maxlen = 50
  return configs.apply_overrides(cfg, FLAGS.override)


def bench(name: str, batch_size: int) -> dict:
  cfg = load_config(name)
  cfg.batch_size = batch_size
  if name in RANKING_CONFIGS:
    from mvhan_jax.tasks import ranking as ranking_train  # pylint: disable=import-outside-toplevel
    exp = ranking_train.build_ranking_experiment(cfg)
    trainer = ranking_train
  else:
    exp = rtask.build_experiment(cfg)
    trainer = rtask  # the task module: init_state(exp, tx, rng), make_train_step(exp, tx)
  tx = train.make_optimizer(cfg.optimizer, 10_000)
  key = jax.random.key(0)
  state = trainer.init_state(exp, tx, key)
  step_fn = trainer.make_train_step(exp, tx)
  batches = pipeline.iterate(pipeline.train_batches(exp.train_source, batch_size, seed=0), 0, prefetch=2)
  t0 = time.perf_counter()
  state, metrics = step_fn(state, next(batches), exp.tables, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  t0 = time.perf_counter()
  for _ in range(FLAGS.steps):
    # As the training loop: the batch on the device, and ready before the step when host memory is
    # reused (host_memory.ready: a CPU step with ready inputs runs on this thread, in the kept arena).
    state, metrics = step_fn(state, host_memory.ready(jax.device_put(next(batches))), exp.tables, key)
  jax.block_until_ready(metrics)
  dt = time.perf_counter() - t0
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  row = {"model": name, "batch_size": batch_size, "compile_plus_first_step_s": compile_s,
         "examples_per_s": FLAGS.steps * batch_size / dt, "step_ms": 1000 * dt / FLAGS.steps,
         # Page faults and kernel time per step: fresh pages for each step's buffers (host_memory.py).
         "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / FLAGS.steps,
         "system_ms_per_step": 1000 * (r1.ru_stime - r0.ru_stime) / FLAGS.steps,
         "params": sum(x.size for x in jax.tree.leaves(state.params))}
  if FLAGS.cost_analysis:
    cost = report.xla_cost(step_fn.lower(state, next(batches), exp.tables, key).compile())
    row["gflop_per_step"] = cost["flops"] / 1e9
    row["gb_accessed_per_step"] = cost["bytes_accessed"] / 1e9
    row["achieved_gflop_per_s"] = row["gflop_per_step"] / (dt / FLAGS.steps)
  return row


def bench_table_size(rows: int, optimizer: str, steps: int = 20, batch_size: int = 256) -> dict:
  """Two-tower train step (d = 64, history 20) with an item table of ``rows`` rows: dense AdamW
  (the whole table, both moments and a dense gradient every step) vs `sparse.SparseTableAdamW`."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mvhan_jax import losses  # pylint: disable=import-outside-toplevel
  from mvhan_jax.features import FeatureSpec  # pylint: disable=import-outside-toplevel
  from mvhan_jax.models.two_tower import TwoTower  # pylint: disable=import-outside-toplevel
  model = TwoTower(num_items=rows, user_specs=(FeatureSpec("bucket", "categorical", 8),),
                   item_specs=(FeatureSpec("genre", "categorical", 20),), dim=64, hidden=(128,))
  rng = np.random.default_rng(0)
  n_ex = (steps + 1) * batch_size
  source = pipeline.ArraySource({
      "user": rng.integers(0, 1000, n_ex).astype(np.int32),
      "history": rng.integers(0, rows, (n_ex, 20)).astype(np.int32),
      "history_len": rng.integers(1, 21, n_ex).astype(np.int32),
      "target": rng.integers(0, rows, n_ex).astype(np.int32)})
  tables = {"user": {"bucket": jax.numpy.asarray(np.arange(1000, dtype=np.int32) % 8)},
            "item": {"genre": jax.numpy.asarray(rng.integers(0, 20, rows).astype(np.int32))}}
  cfg = ml_collections.ConfigDict({
      "loss": {"kind": "sampled_softmax", "num_negatives": 1024, "logq": True, "remove_accidental_hits": True,
               "temperature": 0.1},
      "optimizer": {"lr": 1e-3, "weight_decay": 1e-4, "schedule": "constant", "warmup_steps": 1,
                    "final_lr_fraction": 1.0, "grad_clip": 1.0,
                    "sparse_min_rows": 1 if optimizer == "sparse" else 0}})
  exp = rtask.Experiment(cfg, None, None, source, {}, model, tables, losses.make_sampler("uniform", np.ones(rows), 0.75))
  tx = train.make_optimizer(cfg.optimizer, 10_000)
  key = jax.random.key(0)
  state = rtask.init_state(exp, tx, key)
  step_fn = rtask.make_train_step(exp, tx)
  ds = pipeline.train_batches(source, batch_size, seed=0)
  batches = [ds[i] for i in range(steps + 1)]
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batches[0], tables, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  c0, t0 = time.process_time(), time.perf_counter()
  for b in batches[1:]:
    state, metrics = step_fn(state, b, tables, key)
  jax.block_until_ready(metrics)
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  return {"model": "two_tower", "table_rows": rows, "optimizer": optimizer, "batch_size": batch_size,
          "compile_plus_first_step_s": compile_s, "step_ms": 1000 * dt / steps, "cpu_ms_per_step": 1000 * cpu / steps,
          "examples_per_s": steps * batch_size / dt}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  memory = host_memory.configure()
  rows = [bench(m, int(b)) for m in FLAGS.models for b in FLAGS.batch_sizes]
  table_rows = [bench_table_size(int(n), opt) for n in FLAGS.table_rows for opt in ("dense", "sparse")]
  machine = report.machine_description()
  print(f"\nMachine: {machine}\n")
  print(f"Host memory: {memory}\n")
  print("| model | batch | examples/s | step ms | faults / step | system ms / step | compile + first step s | params | "
        "GFLOP / step | GB / step | GFLOP/s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    cost = (f"{r['gflop_per_step']:.2f} | {r['gb_accessed_per_step']:.2f} | {r['achieved_gflop_per_s']:.1f}"
            if "gflop_per_step" in r else " | | ")
    print(f"| {r['model']} | {r['batch_size']} | {r['examples_per_s']:,.0f} | {r['step_ms']:.1f} | "
          f"{r['minor_faults_per_step']:,.0f} | {r['system_ms_per_step']:.1f} | "
          f"{r['compile_plus_first_step_s']:.1f} | {r['params']:,} | {cost} |")
  if table_rows:
    print("\n| item-table rows | optimizer | step ms | CPU ms / step | examples/s | compile + first step s |")
    print("|---|---|---|---|---|---|")
    for r in table_rows:
      print(f"| {r['table_rows']:,} | {r['optimizer']} | {r['step_ms']:.1f} | {r['cpu_ms_per_step']:.1f} | "
            f"{r['examples_per_s']:,.0f} | {r['compile_plus_first_step_s']:.1f} |")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  tag = f"{jax.devices()[0].platform}_{platform.machine()}_{os.cpu_count()}cores"
  with open(os.path.join(FLAGS.out_dir, f"train_{tag}{FLAGS.json_suffix}.json"), "w") as f:
    json.dump({"machine": machine, "jax": jax.__version__, "load_average": os.getloadavg(), "host_memory": memory,
               "command": " ".join(["python"] + sys.argv), "rows": rows, "table_rows": table_rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
