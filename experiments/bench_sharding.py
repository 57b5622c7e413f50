r"""A row-sharded item table on a fake multi-device CPU mesh: per-device memory, step time, traffic.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python experiments/bench_sharding.py --items=1000000 --dim=64 --steps=50 --meshes=8x1,1x8

The trainer's own pieces (rtask.init_state, make_train_step, sharding.pin_shardings, global_batch) on
a two-tower model whose item table has ``--items`` rows, trained with sampled softmax (1024 shared
negatives) on uniformly random histories and targets. Per mesh it records: the per-device bytes of
the compiled step (arguments, outputs, temporaries: XLA's memory analysis), the step time after
compilation, and the collectives in the step's HLO; and, for the table lookup alone, the collectives of
`sharded_take` (XLA's choice) and `shard_map_lookup` (the explicit all-to-all). Writes
experiments/results/bench/sharding_<machine>.json. Fake CPU devices share the host's cores, so step
times measure the program, not a speed-up.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mvhan_jax import losses
from mvhan_jax import report
from mvhan_jax import sharding
from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.data import pipeline
from mvhan_jax.features import FeatureSpec
from mvhan_jax.models.two_tower import TwoTower

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_integer("items", 1_000_000, "Item-table rows.")
flags.DEFINE_integer("dim", 64, "Embedding width.")
flags.DEFINE_integer("batch_size", 256, "Global batch.")
flags.DEFINE_integer("steps", 50, "Timed steps per mesh (after one compile step).")
flags.DEFINE_list("meshes", ["8x1", "1x8"], "data x model shapes; the table is split over 'model'.")
flags.DEFINE_string("out", None, "Output JSON (default experiments/results/bench/sharding_<machine>.json).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  n, d, bsz, maxlen = FLAGS.items, FLAGS.dim, FLAGS.batch_size, 20
  model = TwoTower(num_items=n, user_specs=(FeatureSpec("bucket", "categorical", 8),),
                   item_specs=(FeatureSpec("genre", "categorical", 20),),
                   dim=d, hidden=(128,))
  rng = np.random.default_rng(0)
  examples = 64 * bsz
  source = pipeline.ArraySource({
      "user": rng.integers(0, 1000, examples).astype(np.int32),
      "history": rng.integers(0, n, (examples, maxlen)).astype(np.int32),
      "history_len": rng.integers(1, maxlen + 1, examples).astype(np.int32),
      "target": rng.integers(0, n, examples).astype(np.int32)})
  tables = {"user": {"bucket": np.arange(1000, dtype=np.int32) % 8},
            "item": {"genre": rng.integers(0, 20, n).astype(np.int32)}}
  cfg = ml_collections.ConfigDict({"loss": {"kind": "sampled_softmax", "num_negatives": 1024, "logq": True,
                                            "remove_accidental_hits": True, "temperature": 0.1},
                                   "mesh": {"min_rows": 65536}})
  sampler = losses.make_sampler("uniform", np.ones(n), 0.75)
  exp = rtask.Experiment(cfg, None, None, source, {}, model, tables, sampler)
  ds = pipeline.train_batches(source, bsz, seed=0)
  results = {"command": "python " + " ".join(sys.argv), "machine": report.machine_description(),
             "items": n, "dim": d, "batch_size": bsz, "table_bytes": n * d * 4, "meshes": {}}
  for spec in FLAGS.meshes:
    data, mdl = (int(x) for x in spec.split("x"))
    mesh = sharding.make_mesh(data, mdl)
    tx = optax.adam(1e-3)
    t0 = time.perf_counter()
    state = rtask.init_state(exp, tx, jax.random.key(0), mesh)
    init_s = time.perf_counter() - t0
    step = sharding.pin_shardings(rtask.make_train_step(exp, tx), jax.tree.map(lambda x: x.sharding, state))
    tbl, key = sharding.put_replicated((tables, jax.random.key(1)), mesh)
    bs = sharding.batch_sharding(mesh, bsz)
    batch0 = sharding.global_batch(ds[0], bs)
    compiled = step.lower(state, batch0, tbl, key).compile()
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    t0 = time.perf_counter()
    state, m = step(state, batch0, tbl, key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    first_loss = float(m["loss"])
    t0 = time.perf_counter()
    for i in range(1, FLAGS.steps + 1):
      state, m = step(state, sharding.global_batch(ds[i], bs), tbl, key)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / FLAGS.steps
    emb = state.params["params"]["item_id_embed"]["embedding"]
    ids = jnp.asarray(ds[0]["target"])
    lookup = {}
    if mdl > 1:
      ids_sharded = jax.device_put(ids, sharding.batch_sharding(mesh))
      lookup["sharded_take"] = sharding.collective_counts(lambda t, i: sharding.sharded_take(t, i, mesh), emb, ids_sharded)
      lookup["shard_map_lookup"] = sharding.collective_counts(
          lambda t, i: sharding.shard_map_lookup(t, i, mesh, ("model",)), emb, ids)
      _, dropped = jax.jit(lambda t, i: sharding.shard_map_lookup(t, i, mesh, ("model",)))(emb, ids)
      lookup["shard_map_dropped_of_batch"] = int(dropped)
    results["meshes"][spec] = {
        "table_spec": str(emb.sharding.spec), "table_rows_per_device": emb.addressable_shards[0].data.shape[0],
        "per_device_bytes": {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
                             "temporaries": int(mem.temp_size_in_bytes)},
        "init_seconds": init_s, "first_step_seconds": compile_s, "step_seconds": step_s,
        "loss_first": first_loss, "loss_last": float(m["loss"]),
        "step_collectives": {k: len([ln for ln in text.splitlines() if f" {k}(" in ln or f" {k}-start(" in ln])
                             for k in ("all-to-all", "all-gather", "all-reduce", "reduce-scatter")},
        "lookup_collectives": lookup}
    print(spec, json.dumps(results["meshes"][spec], indent=1))
    del state, step, compiled
  out = FLAGS.out or os.path.join(ROOT, "experiments", "results", "bench",
                                  f"sharding_cpu_{platform.machine()}_{os.cpu_count()}cores.json")
  with open(out, "w") as f:
    json.dump(results, f, indent=2)
  print("wrote", out)


if __name__ == "__main__":
  app.run(main)
