"""Sharding on a fake 8-device CPU mesh, and a 2-process multi-controller run on 127.0.0.1.

The pytest process has already initialised JAX with one CPU device, so the multi-device checks run
in one subprocess (this file run as a script, with ``--xla_force_host_platform_device_count=8``) that
writes its measurements to JSON; the tests below assert on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------
# The 8-device worker (runs in a subprocess)
# --------------------------------------------------------------------------------------------------
def _worker(out_path: str, ckpt_dir: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel

  from mvhan_jax import losses  # pylint: disable=import-outside-toplevel
  from mvhan_jax import sharding  # pylint: disable=import-outside-toplevel
  from mvhan_jax import train  # pylint: disable=import-outside-toplevel
  from mvhan_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from mvhan_jax.data.types import FeatureSpec  # pylint: disable=import-outside-toplevel
  from mvhan_jax.models.two_tower import TwoTower  # pylint: disable=import-outside-toplevel

  assert jax.device_count() == 8, jax.devices()
  res: dict = {}
  rng = np.random.default_rng(0)

  # Global in-batch negatives on (8, 1): per-device logits against the all-gathered candidates.
  mesh81 = sharding.make_mesh(8, 1)
  b, d = 32, 8
  q, p = rng.normal(size=(b, d)).astype(np.float32), rng.normal(size=(b, d)).astype(np.float32)
  ids = rng.integers(0, 12, size=b).astype(np.int32)  # duplicates across devices: accidental hits
  log_q = rng.normal(size=b).astype(np.float32)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh81))
  ref, _ = losses.in_batch_softmax_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(ids), jnp.asarray(log_q), 0.5)
  glob, labels = jax.jit(lambda q, p, i, lq: sharding.global_in_batch_softmax_loss(
      q, p, i, mesh81, pos_log_q=lq, temperature=0.5))(put(q), put(p), put(ids), put(log_q))
  local_only = []  # what each device would get without the all-gather (its own 4 rows as negatives)
  for k in range(8):
    sl = slice(4 * k, 4 * k + 4)
    local_only.append(np.asarray(losses.in_batch_softmax_loss(q[sl], p[sl], ids[sl], log_q[sl], 0.5)[0]))
  res["in_batch"] = {"ref": np.asarray(ref).tolist(), "global": np.asarray(glob).tolist(),
                     "labels": np.asarray(labels).tolist(), "local_only": np.concatenate(local_only).tolist(),
                     "loss_sharding": str(glob.sharding.spec)}

  # Row-sharded table, lookups under jit and by shard_map.
  table = rng.normal(size=(64, 4)).astype(np.float32)
  look = {}
  for shape, axes in (((2, 4), ("model",)), ((4, 2), ("data", "model")), ((1, 8), ("model",))):
    mesh = sharding.make_mesh(*shape)
    rules = sharding.logical_rules(axes)
    t = jax.device_put(table, NamedSharding(mesh, sharding.logical_to_spec(("vocab", "embed"), rules)))
    q_ids = rng.integers(0, 64, size=48).astype(np.int32)
    out = jax.jit(lambda t, i, mesh=mesh: sharding.sharded_take(t, i, mesh))(t, jax.device_put(q_ids, sharding.batch_sharding(mesh)))
    emb, dropped = sharding.shard_map_lookup(t, jnp.asarray(q_ids), mesh, axes, capacity=48)
    # All ids owned by shard 0: capacity 1 per (device, owner) keeps one id per device.
    skew = rng.integers(0, 64 // np.prod([mesh.shape[a] for a in axes]), size=48).astype(np.int32)
    emb_s, dropped_s = jax.jit(lambda t, i, mesh=mesh, axes=axes: sharding.shard_map_lookup(t, i, mesh, axes, capacity=1))(t, skew)
    look[f"{shape}/{'+'.join(axes)}"] = {
        "take_err": float(np.abs(np.asarray(out) - table[q_ids]).max()),
        "take_spec": str(out.sharding.spec), "table_shard_rows": t.addressable_shards[0].data.shape[0],
        "a2a_err": float(np.abs(np.asarray(emb) - table[q_ids]).max()), "a2a_dropped": int(dropped),
        "skew_dropped": int(dropped_s), "skew_expected_dropped": 48 - 8,
        "skew_kept_err": float(np.abs(np.asarray(emb_s)[::6] - table[skew[::6]]).max()),
        "skew_dropped_rows_zero": bool(np.all(np.delete(np.asarray(emb_s), np.s_[::6], axis=0) == 0)),
        "collectives": sharding.collective_counts(
            lambda t, i, mesh=mesh, axes=axes: sharding.shard_map_lookup(t, i, mesh, axes, capacity=48), t, q_ids),
    }
  res["lookup"] = look

  # Parameters and Adam state initialised inside jit with their shardings (table split over 'model').
  mesh24 = sharding.make_mesh(2, 4)
  mcfg = sharding.default_mesh_config()
  mcfg.min_rows = 256
  model = TwoTower(num_items=1024, user_specs=(FeatureSpec("age", "categorical", 3),),
                   item_specs=(FeatureSpec("genre", "categorical", 5),), dim=16, hidden=(32,))
  batch = {"user": np.zeros(4, np.int32), "history": np.zeros((4, 5), np.int32),
           "history_len": np.ones(4, np.int32), "target": np.arange(4, dtype=np.int32)}
  tables = {"user": {"age": np.arange(16, dtype=np.int32) % 3}, "item": {"genre": np.arange(1024, dtype=np.int32) % 5}}
  tx = optax.adam(1e-3)

  def init_fn(key, batch):
    params = model.init(key, batch, tables)
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  state, shardings = sharding.init_sharded(init_fn, mesh24, mcfg, jax.random.key(0), batch)
  specs = {jax.tree_util.keystr(k, simple=True, separator="/"): [str(v.sharding.spec), v.addressable_shards[0].data.shape[0]]
           for k, v in jax.tree_util.tree_leaves_with_path(state) if v.ndim == 2}
  # The per-device program of the sharded init, against the same init compiled for one device.
  import re  # pylint: disable=import-outside-toplevel
  hlo = {}
  for name, out_sh in (("sharded", shardings), ("one_device", None)):
    fn = jax.jit(init_fn, out_shardings=out_sh) if out_sh else jax.jit(init_fn)
    text = fn.lower(jax.random.key(0), batch).compile().as_text()
    hlo[name] = sorted({int(r) for r in re.findall(r"[uf]32\[(\d+),16\]", text)})
  res["init"] = {"specs": specs, "table_rows_in_hlo": hlo}

  # orbax: saved on 8 devices (table over all 8), restored into 4 devices and into 1.
  mcfg8 = sharding.default_mesh_config()
  mcfg8.min_rows, mcfg8.table_axes = 256, ("data", "model")
  state8, _ = sharding.init_sharded(init_fn, sharding.make_mesh(4, 2), mcfg8, jax.random.key(1), batch)
  mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(0, args=ocp.args.StandardSave(state8))
  mngr.wait_until_finished()
  restored = {}
  for n in (4, 1):
    mesh_n = sharding.make_mesh(-1, 1 if n == 1 else 2, devices=jax.devices()[:n])
    target = sharding.abstract_with_shardings(state8, sharding.tree_shardings(state8, mesh_n, mcfg8))
    back = mngr.restore(0, args=ocp.args.StandardRestore(target))
    emb = back.params["params"]["item_id_embed"]["embedding"]
    errs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
                                        if a.dtype != jax.dtypes.float0 else 0.0, state8, back))
    restored[n] = {"max_err": max(errs), "devices": len(emb.sharding.device_set),
                   "shard_rows": emb.addressable_shards[0].data.shape[0]}
  res["orbax"] = {"saved_devices": len(state8.params["params"]["item_id_embed"]["embedding"].sharding.device_set),
                  "restored": restored}

  # The trainer's own step (make_train_step + pin_shardings) on (8,1), (4,2), (2,4) against 1 device.
  cfg = ml_collections.ConfigDict({"loss": {"kind": "sampled_softmax", "num_negatives": 64, "logq": True,
                                            "remove_accidental_hits": True, "temperature": 0.1},
                                   "mesh": {"min_rows": 256}})
  n_items, bsz = 1024, 32
  seqs = rng.integers(0, n_items, size=(256, 6)).astype(np.int32)
  source = pipeline.ArraySource({"user": rng.integers(0, 16, size=256).astype(np.int32), "history": seqs[:, :5],
                                 "history_len": rng.integers(1, 6, size=256).astype(np.int32), "target": seqs[:, 5]})
  sampler = losses.make_sampler("popularity", np.bincount(seqs.ravel(), minlength=n_items), 0.75)
  exp = train.Experiment(cfg, None, None, source, {}, model, tables, sampler)
  step_batches = [source.take(np.arange(i * bsz, (i + 1) * bsz)) for i in range(3)]
  runs = {}
  for shape in ((1, 1), (8, 1), (4, 2), (2, 4)):
    mesh = sharding.make_mesh(*shape, devices=jax.devices()[:shape[0] * shape[1]])
    tx = optax.adam(3e-3)
    st = train.init_state(exp, tx, jax.random.key(0), mesh)
    step = sharding.pin_shardings(train.make_train_step(exp, tx), jax.tree.map(lambda x: x.sharding, st))
    tbl, key = sharding.put_replicated((tables, jax.random.key(1)), mesh)
    step_losses = []
    for bt in step_batches:
      st, m = step(st, sharding.global_batch(bt, sharding.batch_sharding(mesh, bsz)), tbl, key)
      step_losses.append(float(m["loss"]))
    emb = st.params["params"]["item_id_embed"]["embedding"]
    runs[str(shape)] = {"losses": step_losses, "params": [np.asarray(x).tolist() for x in jax.tree.leaves(st.params)],
                        "table_spec": str(emb.sharding.spec),
                        "mu_spec": str(st.opt_state[0].mu["params"]["item_id_embed"]["embedding"].sharding.spec)}
  base = runs.pop("(1, 1)")
  res["train_step"] = {k: {"loss_err": float(np.abs(np.subtract(v["losses"], base["losses"])).max()),
                           "param_err": max(float(np.abs(np.subtract(a, b)).max()) for a, b in zip(v["params"], base["params"])),
                           "table_spec": v["table_spec"], "mu_spec": v["mu_spec"]} for k, v in runs.items()}
  res["train_step_base_losses"] = base["losses"]
  with open(out_path, "w") as f:
    json.dump(res, f)


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("eight")
  out = tmp / "res.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, __file__, "worker", str(out), str(tmp / "ckpt")], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(out.read_text())


def test_global_in_batch_labels_line_up(eight):
  r = eight["in_batch"]
  # Equal to the single-device in-batch loss on the concatenated batch of 32 rows...
  np.testing.assert_allclose(r["global"], r["ref"], rtol=1e-5, atol=1e-5)
  assert r["labels"] == list(range(32))
  assert r["loss_sharding"] == "P('data',)"
  # ...and not the per-device loss with only the device's own 4 rows as negatives.
  assert np.abs(np.subtract(r["local_only"], r["ref"])).max() > 0.1


@pytest.mark.parametrize("key", ["(2, 4)/model", "(4, 2)/data+model", "(1, 8)/model"])
def test_sharded_lookups_equal_dense_take(eight, key):
  r = eight["lookup"][key]
  shards = {"(2, 4)/model": 4, "(4, 2)/data+model": 8, "(1, 8)/model": 8}[key]
  assert r["table_shard_rows"] == 64 // shards
  assert r["take_err"] == 0.0
  assert r["take_spec"] == ("P()" if key.startswith("(1,") else "P('data',)")  # a data axis of 1 is dropped
  assert r["a2a_err"] == 0.0 and r["a2a_dropped"] == 0
  assert r["collectives"]["all-to-all"] == 2  # ids out, rows back


@pytest.mark.parametrize("key", ["(2, 4)/model", "(4, 2)/data+model", "(1, 8)/model"])
def test_shard_map_lookup_counts_drops(eight, key):
  r = eight["lookup"][key]
  # 6 ids per device all owned by shard 0, capacity 1: 5 of every 6 are dropped (zero vectors).
  assert r["skew_dropped"] == r["skew_expected_dropped"] == 40
  assert r["skew_kept_err"] == 0.0 and r["skew_dropped_rows_zero"]


def test_params_and_adam_state_sharded_at_init(eight):
  r = eight["init"]
  specs = r["specs"]
  table = [k for k in specs if k.endswith("item_id_embed/embedding")]
  assert len(table) == 3, specs  # parameter, Adam mu, Adam nu
  for k in table:
    assert specs[k] == ["P('model', None)", 256], (k, specs[k])
  others = [v for k, v in specs.items() if k not in table]
  assert others and all(v[0] == "P(None, None)" for v in others), specs
  # Per device the init program only ever holds [256, 16] pieces (random bits, values) of the
  # [1024, 16] table; compiled for one device it builds the whole table.
  assert max(r["table_rows_in_hlo"]["sharded"]) == 256, r["table_rows_in_hlo"]
  assert max(r["table_rows_in_hlo"]["one_device"]) == 1024, r["table_rows_in_hlo"]


def test_checkpoint_restores_across_topologies(eight):
  r = eight["orbax"]
  assert r["saved_devices"] == 8
  assert r["restored"]["4"] == {"max_err": 0.0, "devices": 4, "shard_rows": 256}
  assert r["restored"]["1"] == {"max_err": 0.0, "devices": 1, "shard_rows": 1024}


@pytest.mark.parametrize("shape", ["(8, 1)", "(4, 2)", "(2, 4)"])
def test_train_step_on_meshes_matches_one_device(eight, shape):
  r = eight["train_step"][shape]
  base = eight["train_step_base_losses"]
  assert base[-1] < base[0]  # it trains
  assert r["loss_err"] < 1e-5 and r["param_err"] < 1e-5, r
  # Table and its Adam moments split by rows over 'model' (on (8, 1) one shard: the whole table).
  assert r["table_spec"] == r["mu_spec"] == "P('model', None)"


# --------------------------------------------------------------------------------------------------
# Two processes on 127.0.0.1 (jax.distributed over CPU), through the local launcher
# --------------------------------------------------------------------------------------------------
_MP_OVERRIDES = {"dataset.world.num_items": 1600, "total_steps": 12, "eval_every_steps": 12,
                 "checkpoint_every_steps": 6, "log_every_steps": 3, "index.build": False, "tensorboard": False,
                 "mesh.min_rows": 64}


def test_two_process_run_trains_and_writes_once(tmp_path):
  from mvhan_jax import train  # pylint: disable=import-outside-toplevel
  from mvhan_jax.configs import load_config  # pylint: disable=import-outside-toplevel
  from mvhan_jax.metrics_writer import read_metrics  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint import CheckpointManager  # pylint: disable=import-outside-toplevel

  spec = "experiments/configs/two_tower_synthetic.py:smoke"
  workdir = tmp_path / "w"
  overrides = [f"--config.{k}={v}" for k, v in _MP_OVERRIDES.items()]
  # The item table (1600 rows) split over all 4 devices of the 2 processes.
  overrides.append("--config.mesh.table_axes=('data','model')")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"), "--num_processes=2",
       "--devices_per_process=2", f"--log_dir={tmp_path / 'logs'}", "--", "-m", "mvhan_jax.main",
       f"--config={spec}", f"--workdir={workdir}", *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
  assert proc.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
  # Each process has 2 devices but both built the 4-device global mesh (their 201-row author table
  # does not split into 4 shards, and each says so).
  assert all("201 rows do not divide into 4 shards" in log for log in logs)
  rows = read_metrics(str(workdir))
  # Written once: one train row per logged step, one valid and one test row (process 1 writes nothing).
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == [3, 6, 9, 12]
  assert [r["step"] for r in rows if "valid/HR@10" in r] == [12]
  assert [r["step"] for r in rows if "test/HR@10" in r] == [12]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.5, losses
  assert CheckpointManager(str(workdir / "checkpoints")).all_steps() == [6, 12]
  # The checkpoint saved from 4 devices in 2 processes restores into this 1-device process and
  # reproduces the test metrics the 2-process job reported.
  cfg = load_config(spec)
  for k, v in _MP_OVERRIDES.items():
    node = cfg
    *path, leaf = k.split(".")
    for part in path:
      node = node[part]
    node[leaf] = v
  results = json.loads((workdir / "results.json").read_text())
  exp = train.build_experiment(cfg)
  params, step = train.restore_params(str(workdir), exp, "best")
  assert step == 12
  assert train.evaluate(exp, params, "test") == pytest.approx(results["test"], rel=1e-5)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  sys.path.insert(0, ROOT)
  _worker(sys.argv[2], sys.argv[3])
