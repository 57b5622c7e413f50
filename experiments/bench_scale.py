r"""The scale run: a 10^7 x 64 item table split by rows over 8 fake CPU devices, trained on the
synthetic world with 10^7 items streamed from its ArrayRecord shards.

  python experiments/gen_synthetic.py --num_items 10000000 --num_users 1000000 --num_topics 1000 \
      --out runs/scale/world_1e7
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python experiments/bench_scale.py --world=runs/scale/world_1e7 --steps=300 --mesh=8x1

Model and step are the trainer's own (a two-tower model, `rtask.init_state` (two jits with output
shardings: parameters, then the optimizer state), `train.make_optimizer`
(AdamW, clipping, cosine), `rtask.make_train_step`, `sharding.pin_shardings`, `sharding.global_batch`),
with sampled softmax over ``--num_negatives`` uniform shared negatives. The item-id table, its
AdamW moments and its gradient are split by rows over every device (``config.mesh.table_axes``); the
MLPs and the small feature tables are replicated.

Data: the world's `events` shards are read through Grain (`pipeline.train_batches` over a
random-access source, sharded by process, prefetched on a thread); user u's example is a random cut
of its clicked items (the last two clicks held out, as leave-one-out does): the history before the
cut (up to ``--maxlen``) and the clicked item at the cut. Side features: the items' content type
(``truth/item_type.npy``) and the users' age / gender / region (read once from the `users` shards and
cached beside the world as ``user_profile.npz``).

Memory: `memory_stats()` is not available for CPU devices, so per device it records (1) the bytes of
the state each device holds (sum of its `addressable_shards`), (2) XLA's memory analysis of the
compiled step (arguments, outputs, aliased, temporaries: the step's per-device peak is arguments +
outputs - aliased + temporaries), and for the whole process (all 8 fake devices live in it) the
resident set: peak (`getrusage`) and after init / compile / the steps. Step time: each step is timed
to completion (``block_until_ready``) after a separate compile and a first step; median and
percentiles. Writes experiments/results/bench/scale_<machine>.json and experiments/results/scale_out.md.
Fake CPU devices share the host's cores, so the step time measures this program on this machine, not
a speed-up; a loaded machine (see ``loadavg`` in the JSON) inflates it.
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
import jax
import ml_collections
import numpy as np

from mvhan_jax import losses
from mvhan_jax import report
from mvhan_jax import sharding
from mvhan_jax import train
from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.data import pipeline
from mvhan_jax.data import synthetic
from mvhan_jax.features import FeatureSpec
from mvhan_jax.models.two_tower import TwoTower

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("world", "runs/scale/world_1e7", "A world written by experiments/gen_synthetic.py.")
flags.DEFINE_integer("steps", 300, "Timed training steps (after the compile and one first step).")
flags.DEFINE_integer("batch_size", 256, "Global batch.")
flags.DEFINE_integer("num_negatives", 1024, "Shared sampled negatives per step.")
flags.DEFINE_integer("dim", 64, "Embedding width.")
flags.DEFINE_integer("hidden", 128, "MLP width of both towers.")
flags.DEFINE_integer("maxlen", 20, "History length.")
flags.DEFINE_string("mesh", "8x1", "data x model (the batch is split over data).")
flags.DEFINE_integer("sparse_min_rows", 0, "config.optimizer.sparse_min_rows: 0 = dense AdamW (every row every "
                     "step); e.g. 65536 = lazy row updates of the item table (mvhan_jax/sparse.py).")
flags.DEFINE_float("grad_clip", 1.0, "Global-norm gradient clipping (0: none), as config.optimizer.grad_clip.")
flags.DEFINE_list("table_axes", ["data", "model"], "Mesh axes splitting the item table's rows.")
flags.DEFINE_bool("compile_only", False, "Only compile the step against abstract state and print XLA's "
                  "per-device memory analysis (nothing of the table's size is allocated).")
flags.DEFINE_string("out", None, "Output JSON (default experiments/results/bench/scale_<machine>.json).")
flags.DEFINE_string("markdown", os.path.join(ROOT, "experiments", "results", "scale_out.md"),
                    "Results table ('' to skip).")
flags.DEFINE_string("markdown_from", None, "Only rewrite --markdown from this JSON of an earlier run.")
FLAGS = flags.FLAGS

GiB = 2**30


def rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return -1


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class ClickExamples:
  """Random-access next-click examples, one per user, read from the world's `events` shards.

  ``source[u]``: user u's clicked items in time order, the last two held out; the target is the
  click at a cut drawn from ``default_rng([seed, u])`` (at least one click before it), the history
  its up to ``maxlen`` predecessors, left-aligned. ``take(users)`` reads a batch in one batched
  ArrayRecord read.
  """

  def __init__(self, events, maxlen: int, seed: int = 0):
    self.events, self.maxlen, self.seed = events, maxlen, seed

  def __len__(self) -> int:
    return len(self.events)

  def _example(self, rec: dict) -> tuple[int, np.ndarray, int]:
    clicks = rec["item"][rec["click"].astype(bool)]
    n = len(clicks) - 2 if len(clicks) >= 4 else len(clicks)
    t = int(np.random.default_rng([self.seed, int(rec["user"])]).integers(1, n)) if n >= 2 else n - 1
    return int(clicks[t]), clicks[max(0, t - self.maxlen):t], int(rec["user"])

  def take(self, indices) -> dict[str, np.ndarray]:
    recs = self.events.__getitems__([int(i) for i in indices])
    b = len(recs)
    out = {"user": np.zeros(b, np.int32), "history": np.zeros((b, self.maxlen), np.int32),
           "history_len": np.zeros(b, np.int32), "target": np.zeros(b, np.int32)}
    for j, rec in enumerate(recs):
      target, hist, user = self._example(rec)
      out["user"][j], out["target"][j], out["history_len"][j] = user, target, len(hist)
      out["history"][j, :len(hist)] = hist
    return out

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.take([index]).items()}


def user_profile(world: str, fields=("age", "gender", "region"), chunk: int = 8192) -> dict[str, np.ndarray]:
  """The users' profile fields int32 [U], read once from the `users` shards and cached."""
  path = os.path.join(world, "user_profile.npz")
  if os.path.exists(path):
    with np.load(path) as z:
      return {k: z[k] for k in fields}
  users = synthetic.read_shards(world, "users")
  out = {k: np.zeros(len(users), np.int32) for k in fields}
  t0 = time.perf_counter()
  for start in range(0, len(users), chunk):
    for rec in users.__getitems__(list(range(start, min(start + chunk, len(users))))):
      for k in fields:
        out[k][rec["user"]] = rec[k]
  print(f"user profile: {len(users)} users in {time.perf_counter() - t0:.0f} s", flush=True)
  np.savez(path, **out)
  return out


def _rel(arg: str) -> str:
  """A command-line argument with this machine's repository path taken out."""
  return arg.replace(ROOT + os.sep, "").replace(os.getcwd() + os.sep, "")


def per_device_state_bytes(state) -> dict[int, int]:
  out: dict[int, int] = {}
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def main(argv):
  del argv
  if FLAGS.markdown_from:
    with open(FLAGS.markdown_from) as f, open(FLAGS.markdown, "w") as out:
      out.write(markdown(json.load(f), os.path.relpath(os.path.abspath(FLAGS.markdown_from), ROOT)))
    return
  world = FLAGS.world
  wcfg, meta = synthetic.load_meta(world)
  n_items, n_users = meta["num_items"], meta["num_users"]
  vocab = meta["vocab"]
  bsz, dim = FLAGS.batch_size, FLAGS.dim
  data, mdl = (int(x) for x in FLAGS.mesh.split("x"))
  t_start = time.perf_counter()

  events = synthetic.read_shards(world, "events")
  source = ClickExamples(events, FLAGS.maxlen)
  profile = user_profile(world)
  item_type = np.load(os.path.join(world, "truth", "item_type.npy")).astype(np.int32) + 1  # 1-based
  tables = {"user": profile, "item": {"type": item_type}}
  model = TwoTower(num_items=n_items, user_specs=tuple(FeatureSpec(k, "categorical", vocab[k]) for k in profile),
                   item_specs=(FeatureSpec("type", "categorical", vocab["type"]),),
                   dim=dim, hidden=(FLAGS.hidden,), maxlen=FLAGS.maxlen)
  total_steps = FLAGS.steps + 1
  cfg = ml_collections.ConfigDict({
      "loss": {"kind": "sampled_softmax", "num_negatives": FLAGS.num_negatives, "logq": True,
               "remove_accidental_hits": True, "temperature": 0.1},
      "optimizer": {"lr": 1e-3, "weight_decay": 1e-4, "schedule": "cosine", "warmup_steps": 20,
                    "final_lr_fraction": 0.01, "grad_clip": FLAGS.grad_clip,
                    "sparse_min_rows": FLAGS.sparse_min_rows},
      "mesh": {"data": data, "model": mdl, "table_axes": tuple(FLAGS.table_axes), "min_rows": 65536}})
  sampler = losses.make_sampler("uniform", np.ones(n_items), 0.75)
  exp = rtask.Experiment(cfg, None, None, source, {}, model, tables, sampler)
  mesh = sharding.mesh_from_config(cfg)
  tx = train.make_optimizer(cfg.optimizer, total_steps)
  ds = pipeline.train_batches(source, bsz, seed=0)
  bs = sharding.batch_sharding(mesh, bsz)
  tbl, key = sharding.put_replicated((tables, jax.random.key(1)), mesh)
  step = rtask.make_train_step(exp, tx)
  setup_s = time.perf_counter() - t_start
  rss = {"after_setup": rss_bytes()}

  res = {"command": "python " + " ".join(_rel(a) for a in sys.argv),
         "machine": report.machine_description(), "loadavg_start": os.getloadavg(),
         "world": {"num_items": n_items, "num_users": n_users, "num_events": meta["num_events"],
                   "num_topics": wcfg.num_topics},
         "items": n_items, "dim": dim, "batch_size": bsz, "num_negatives": FLAGS.num_negatives,
         "maxlen": FLAGS.maxlen, "hidden": FLAGS.hidden, "mesh": FLAGS.mesh, "table_axes": list(FLAGS.table_axes),
         "devices": jax.device_count(), "table_bytes": n_items * dim * 4,
         "optimizer": (f"lazy row updates (sparse_min_rows={FLAGS.sparse_min_rows})" if FLAGS.sparse_min_rows
                       else "dense AdamW"),
         "state_bytes_expected": 3 * n_items * dim * 4}
  print(json.dumps({k: res[k] for k in ("machine", "world", "mesh", "table_axes")}), flush=True)

  if FLAGS.compile_only:
    # The one-jit form of the state (abstract_state traces it; init_state splits it in two jits).
    init_fn = train.state_init_fn(rtask._params_init_fn(exp), tx)  # pylint: disable=protected-access
    init_args = sharding.put_replicated((jax.random.key(0), train.example_batch(source, 2)), mesh)
    state = rtask.abstract_state(exp, tx, mesh)
    init_mem = jax.jit(init_fn, out_shardings=jax.tree.map(lambda x: x.sharding, state)).lower(
        *init_args).compile().memory_analysis()
    print(json.dumps({"init_per_device_bytes": {"outputs": init_mem.output_size_in_bytes,
                                                "temporaries": init_mem.temp_size_in_bytes}}))
    step_pinned = sharding.pin_shardings(step, jax.tree.map(lambda x: x.sharding, state))
    batch0 = sharding.global_batch(ds[0], bs)
    t0 = time.perf_counter()
    compiled = step_pinned.lower(state, batch0, tbl, key).compile()
    mem = compiled.memory_analysis()
    print(json.dumps({"compile_seconds": time.perf_counter() - t0, "per_device_bytes": {
        "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes}, "rss_bytes": rss_bytes()}, indent=1))
    return

  # State created inside jit with its shardings: no device ever holds the whole table.
  t0 = time.perf_counter()
  state = rtask.init_state(exp, tx, jax.random.key(0), mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  rss["after_init"] = rss_bytes()
  emb = state.params["params"]["item_id_embed"]["embedding"]  # read now: the step donates the state
  table_spec, table_rows_per_device = str(emb.sharding.spec), emb.addressable_shards[0].data.shape[0]
  per_dev = per_device_state_bytes(state)
  step = sharding.pin_shardings(step, jax.tree.map(lambda x: x.sharding, state))

  batches = pipeline.iterate(ds, start_step=0, prefetch=2)
  batch0 = sharding.global_batch(next(batches), bs)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch0, tbl, key).compile()  # the same executable the calls below use
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  rss["after_compile"] = rss_bytes()
  t0 = time.perf_counter()
  state, m = step(state, batch0, tbl, key)
  jax.block_until_ready((state, m))
  first_step_s = time.perf_counter() - t0
  losses_seen = [float(m["loss"])]

  step_s, wait_s = [], []
  log_every = max(1, FLAGS.steps // 10)
  out = FLAGS.out or os.path.join(ROOT, "experiments", "results", "bench",
                                  f"scale_cpu_{platform.machine()}_{os.cpu_count()}cores.json")

  def write(steps_done: int, final: bool) -> None:
    """Results so far (every log interval, so a run stopped early still leaves its numbers)."""
    st = np.asarray(step_s)
    res.update({
        "table_spec": table_spec, "table_rows_per_device": table_rows_per_device,
        "state_bytes_per_device": {str(k): v for k, v in sorted(per_dev.items())},
        "state_bytes_total": int(sum(per_dev.values())),
        "device_memory_stats": jax.devices()[0].memory_stats(),  # None on CPU
        "compiled_step_per_device_bytes": {
            "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
            "peak_estimate": int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                                 + mem.temp_size_in_bytes)},
        "process_rss_bytes": {**rss, "now": rss_bytes(), "peak": peak_rss_bytes()},
        "seconds": {"setup": setup_s, "init": init_s, "compile": compile_s, "first_step": first_step_s,
                    "step_median": float(np.median(st)), "step_p10": float(np.percentile(st, 10)),
                    "step_p90": float(np.percentile(st, 90)), "step_mean": float(st.mean()),
                    "batch_wait_median": float(np.median(wait_s))},
        "steps": steps_done, "steps_planned": FLAGS.steps, "finished": final,
        "examples_per_sec_median": bsz / float(np.median(st)),
        "loss_first10": float(np.mean(losses_seen[:10])), "loss_last10": float(np.mean(losses_seen[-10:])),
        "loadavg_end": os.getloadavg()})
    with open(out, "w") as f:
      json.dump(res, f, indent=2)
    if FLAGS.markdown:
      with open(FLAGS.markdown, "w") as f:
        f.write(markdown(res, os.path.relpath(out, ROOT)))

  for i in range(1, FLAGS.steps + 1):
    t0 = time.perf_counter()
    batch = sharding.global_batch(next(batches), bs)
    t1 = time.perf_counter()
    state, m = step(state, batch, tbl, key)
    jax.block_until_ready((state, m))
    t2 = time.perf_counter()
    wait_s.append(t1 - t0)
    step_s.append(t2 - t1)
    losses_seen.append(float(m["loss"]))
    if i % log_every == 0 and i < FLAGS.steps:
      print(f"step {i}/{FLAGS.steps}: loss {np.mean(losses_seen[-log_every:]):.3f}, step {np.median(step_s[-log_every:]):.2f} s, "
            f"rss {rss_bytes() / GiB:.2f} GiB, peak {peak_rss_bytes() / GiB:.2f} GiB, load {os.getloadavg()[0]:.1f}",
            flush=True)
      write(i, final=False)
  rss["after_steps"] = rss_bytes()
  write(FLAGS.steps, final=True)
  print(json.dumps(res, indent=1))
  print("wrote", out, "and", FLAGS.markdown)


def markdown(r: dict, json_path: str) -> str:
  g = lambda b: f"{b / GiB:.2f} GiB"
  per_dev = list(r["state_bytes_per_device"].values())
  c = r["compiled_step_per_device_bytes"]
  s = r["seconds"]
  rss = r["process_rss_bytes"]
  load = max(r["loadavg_start"][0], r["loadavg_end"][0])
  return f"""# Scale-out: a 10^7-item table on 8 devices

{r['items']:,} x {r['dim']} float32 item table ({g(r['table_bytes'])}; with its two AdamW moments
{g(r['state_bytes_expected'])}) split by rows over {r['devices']} fake CPU devices (mesh {r['mesh']}, rows over
{tuple(r['table_axes'])}), trained {r['steps']} steps (batch {r['batch_size']}, {r['num_negatives']} shared negatives,
history {r['maxlen']}, optimizer: {r.get('optimizer', 'dense AdamW')}){'' if r['finished'] else f" (stopped early: {r['steps']} of {r['steps_planned']} planned steps)"} on the synthetic world with {r['world']['num_items']:,} items, {r['world']['num_users']:,} users
and {r['world']['num_events']:,} events, streamed from its ArrayRecord shards through Grain.

Command (the world first, once: `python experiments/gen_synthetic.py --num_items 10000000 --num_users 1000000
--num_topics 1000 --out runs/scale/world_1e7`):

```bash
XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
  {r['command']}
```

Machine: {r['machine']}; 1-minute load average {r['loadavg_start'][0]:.1f} at the start, {r['loadavg_end'][0]:.1f} at the end{' (measured under load: the machine is shared with other jobs)' if load > 2.5 else ''}.
Raw numbers: `{json_path}`.

| | per device | whole process (8 devices) |
|---|---|---|
| table rows | {r['table_rows_per_device']:,} of {r['items']:,} (`{r['table_spec']}`) | |
| state held (params + AdamW mu, nu; `addressable_shards`) | {g(min(per_dev))} - {g(max(per_dev))} | {g(r['state_bytes_total'])} |
| compiled step (XLA memory analysis): arguments / outputs / aliased / temporaries | {g(c['arguments'])} / {g(c['outputs'])} / {g(c['aliased'])} / {g(c['temporaries'])} | |
| compiled step peak (arguments + outputs - aliased + temporaries) | {g(c['peak_estimate'])} | {g(c['peak_estimate'] * r['devices'])} |
| resident set after init / compile / steps | | {g(rss['after_init'])} / {g(rss['after_compile'])} / {g(rss.get('after_steps', rss['now']))} |
| peak resident set (`getrusage`) | | {g(rss['peak'])} |

| init (sharded, in jit) | compile | first step | step median (p10 - p90) | examples/s | loss first 10 -> last 10 steps |
|---|---|---|---|---|---|
| {s['init']:.1f} s | {s['compile']:.1f} s | {s['first_step']:.1f} s | {s['step_median']:.2f} s ({s['step_p10']:.2f} - {s['step_p90']:.2f}) | {r['examples_per_sec_median']:.0f} | {r['loss_first10']:.3f} -> {r['loss_last10']:.3f} |

Per-device memory on CPU comes from the arrays and XLA's analysis (`memory_stats()` is unavailable
for CPU devices); the process's resident set holds all 8 devices plus the host side (feature tables
replicated per device, the world's readers, Python). {"With dense AdamW every step reads and writes the whole table and both moments (a batch's gradient touches few rows, but AdamW with weight decay updates every row; the gradient is a dense [rows, 64] buffer per device, XLA's temporaries above)" if not r.get('optimizer', 'dense').startswith('lazy') else "With lazy row updates a step gathers, updates and scatters back only the rows the batch looks up (targets, histories, shared negatives), in place in the donated table and moments; no table-sized gradient exists"}, on 2 cores shared by 8
fake devices.

Init: parameters, then AdamW state, in two jits with output shardings (`rtask.init_state`). One
jit (`train.state_init_fn`, what `train.abstract_state` traces) keeps the table's random-number temporaries live beside the moments: `--compile_only` prints its
per-device analysis (outputs 0.89 GiB + temporaries 0.89 GiB, 14.3 GiB over 8 devices), which did not
fit beside the machine's other jobs.
"""


if __name__ == "__main__":
  app.run(main)
