"""Sharding on a device mesh: big embedding tables split by rows, the batch split over 'data'.

One mesh with named axes ``('data', 'model')`` built from ``config.mesh``; every array is placed by
logical-axis rules (never by hand-picked devices):

  parameter path  --(config.mesh.shard_tables, min_rows)-->  logical axes ('vocab', 'embed') or none
  logical axes    --(logical_rules)-->                        mesh axes: 'vocab' -> config.mesh.table_axes
                                                                         'batch' -> 'data'

So an item table of 10^7 rows is split by rows over 'model' (or over every device with
``table_axes=('data', 'model')``) while the MLPs and the small feature tables stay replicated. The
optimizer state follows its parameter (Adam's ``mu``/``nu`` have the parameter's path as a suffix).

Why Auto axis types: ``jax.make_mesh`` defaults to Explicit axes, under which ``jnp.take`` on a
row-sharded table and matmuls between differently sharded operands raise unless every op names its
output sharding. With Auto axes the models stay sharding-agnostic and XLA's partitioner inserts the
collectives; the shardings of parameters, optimizer state and batch are fixed at the jit boundary.

Two lookups of a row-sharded table:
  * `sharded_take`: ``jnp.take`` under ``jit``, the result constrained to the batch sharding; the
    partitioner chooses the communication (what the models get without any change).
  * `shard_map_lookup`: the explicit all-to-all lookup (bucketise ids by owner shard, all-to-all,
    local gather, all-to-all back) with a fixed per-peer capacity and a count of dropped ids, for
    when the traffic must be bounded: each device sends ``shards * capacity`` ids and receives as
    many rows, whatever the batch's popularity skew.

Global in-batch negatives: `global_in_batch_softmax_loss` all-gathers the candidates over 'data' and
offsets each device's labels by its position on that axis; it equals the single-device loss on the
concatenated batch (tests/test_sharding.py).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mvhan_jax import configs

MESH_AXES = ("data", "model")


# --------------------------------------------------------------------------------------------------
# Config and mesh
# --------------------------------------------------------------------------------------------------
def default_mesh_config() -> ml_collections.ConfigDict:
  """The ``config.mesh`` block; a config without one gets these values (pure data parallelism).

  data, model: mesh shape; one of them may be -1 (all remaining devices).
  table_axes: mesh axes that split a sharded table's rows: ('model',) or ('data', 'model') (every
    device holds 1/N of the rows).
  shard_tables: regex over parameter paths ('item_id_embed/embedding'); matching 2-D parameters
    with >= min_rows rows (and a row count divisible by the shard count) are row-sharded, the rest
    replicated.
  """
  c = ml_collections.ConfigDict()
  c.data = -1
  c.model = 1
  c.table_axes = ("model",)
  c.shard_tables = r"_embed/embedding$"
  c.min_rows = 65536
  return c


def mesh_config(config) -> ml_collections.ConfigDict:
  """``config.mesh`` with the defaults filled in (configs written before the mesh block still work)."""
  c = default_mesh_config()
  user = config.get("mesh") if hasattr(config, "get") else None
  if user:
    for k, v in user.items():
      if k not in c:
        raise configs.ConfigError(f"config.mesh.{k} is unknown: use one of {sorted(c)}")
      c[k] = ((v,) if isinstance(v, str) else tuple(v)) if k == "table_axes" else v
  for a in c.table_axes:
    if a not in MESH_AXES:
      raise configs.ConfigError(f"config.mesh.table_axes={tuple(c.table_axes)!r} names {a!r}: use axes of {MESH_AXES}")
  return c


def check_mesh(config) -> tuple[int, int]:
  """``config.mesh`` against this job's devices, before any work (what `mesh_from_config` would
  refuse later): the (data, model) shape, or a `configs.ConfigError` naming the field."""
  c = mesh_config(config)
  return mesh_shape(c.data, c.model, jax.device_count())


def check_batches(config, batch_sizes: dict[str, int]) -> None:
  """Each global batch (``{'train.batch_size': 32}``: the field and its value) against the mesh's
  data axis and the process count, as `batch_sharding` checks it when training starts."""
  data, _ = check_mesh(config)
  for name, size in batch_sizes.items():
    if size % data:
      raise configs.ConfigError(f"config.{name}={size} does not split over the mesh's data axis of {data} devices: "
                                f"use a multiple of {data} (or change config.mesh.data)")
    if size % jax.process_count():
      raise configs.ConfigError(f"config.{name}={size} does not split over {jax.process_count()} processes: "
                                f"use a multiple of {jax.process_count()}")


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
  """Resolves a -1 in (data, model) against ``num_devices``; `configs.ConfigError` (a ValueError)
  naming the field if impossible."""
  if data == -1 and model == -1:
    raise configs.ConfigError("config.mesh.data and config.mesh.model are both -1: set at most one to -1")
  if model == -1:
    if data < 1 or num_devices % data:
      raise configs.ConfigError(f"config.mesh.data={data} does not divide the {num_devices} devices: pick a divisor")
    model = num_devices // data
  if data == -1:
    if model < 1 or num_devices % model:
      raise configs.ConfigError(f"config.mesh.model={model} does not divide the {num_devices} devices: pick a divisor")
    data = num_devices // model
  if data * model != num_devices:
    raise configs.ConfigError(f"config.mesh.data={data} x config.mesh.model={model} != {num_devices} devices: "
                              "make the product equal the device count, or set one of them to -1")
  return data, model


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh with Auto axis types over ``devices`` (default: every device)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, model, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def mesh_from_config(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  c = mesh_config(config)
  return make_mesh(c.data, c.model, devices)


# --------------------------------------------------------------------------------------------------
# Logical-axis rules
# --------------------------------------------------------------------------------------------------
def logical_rules(table_axes: Sequence[str] = ("model",)) -> tuple[tuple[str, Any], ...]:
  """Logical axis -> mesh axes (None: replicated). 'vocab' is a table's row axis."""
  axes = tuple(table_axes)
  return (("batch", "data"), ("vocab", axes[0] if len(axes) == 1 else axes), ("embed", None))


def logical_to_spec(logical: Sequence[str | None], rules) -> P:
  table = dict(rules)
  return P(*[table.get(a) if a is not None else None for a in logical])


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _table_shards(mesh: Mesh, table_axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[a] for a in table_axes)


def _axes_fn(mesh: Mesh, mesh_cfg) -> Callable:
  pattern = re.compile(mesh_cfg.shard_tables) if mesh_cfg.shard_tables else None
  shards = _table_shards(mesh, mesh_cfg.table_axes)

  def axes(path, leaf) -> tuple:
    shape = getattr(leaf, "shape", ())
    name = _path_str(path)
    if pattern is not None and len(shape) == 2 and pattern.search(name) and shape[0] >= mesh_cfg.min_rows:
      if shape[0] % shards == 0:
        return ("vocab", "embed")
      if name.startswith("params/"):  # the optimizer state mirrors it: say it once
        logging.warning("%s: %d rows do not divide into %d shards (config.mesh.table_axes=%s); replicated. "
                        "Pad the table to a multiple of %d rows to shard it.", name, shape[0], shards,
                        tuple(mesh_cfg.table_axes), shards)
    return (None,) * len(shape)

  return axes


def logical_axes(tree, mesh: Mesh, mesh_cfg) -> list[tuple[str, tuple]]:
  """(path, logical axes) per leaf of ``tree`` (arrays or ShapeDtypeStructs): ('vocab', 'embed') for
  a table to shard, else a tuple of Nones (replicated)."""
  axes = _axes_fn(mesh, mesh_cfg)
  return [(_path_str(k), axes(k, v)) for k, v in jax.tree_util.tree_leaves_with_path(tree)]


def tree_shardings(tree, mesh: Mesh, mesh_cfg) -> Any:
  """NamedSharding per leaf of ``tree`` by the logical-axis rules (tables by rows, rest replicated)."""
  rules = logical_rules(mesh_cfg.table_axes)
  axes = _axes_fn(mesh, mesh_cfg)
  return jax.tree_util.tree_map_with_path(
      lambda k, v: NamedSharding(mesh, logical_to_spec(axes(k, v), rules)), tree)


def batch_sharding(mesh: Mesh, batch_size: int | None = None) -> NamedSharding:
  """Leading (batch) axis split over 'data', replicated over 'model'."""
  n = mesh.shape["data"]
  if batch_size is not None and batch_size % n:
    raise configs.ConfigError(f"config.batch_size={batch_size} does not split over the mesh's data axis of {n} "
                              f"devices: use a multiple of {n} (or change config.mesh.data)")
  if batch_size is not None and batch_size % jax.process_count():
    raise configs.ConfigError(f"config.batch_size={batch_size} does not split over {jax.process_count()} processes")
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --------------------------------------------------------------------------------------------------
# State initialised inside jit with its output shardings
# --------------------------------------------------------------------------------------------------
def init_sharded(init_fn: Callable, mesh: Mesh, mesh_cfg, *args):
  """``init_fn(*args)`` compiled with explicit ``out_shardings``: each shard is created on its device,
  so a sharded table is never materialised whole on one device.

  The shardings are given for every leaf (optimizer state included): under Auto axes a plain
  ``jit(tx.init)`` is free to leave the optimizer state on one device.
  Returns (state, shardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(abstract, mesh, mesh_cfg)
  args = put_replicated(args, mesh)
  return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


def abstract_with_shardings(tree, shardings) -> Any:
  """ShapeDtypeStructs carrying ``shardings``: an orbax restore target on the current mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def pin_shardings(step_fn: Callable, state_shardings, donate: bool = True) -> Callable:
  """Wraps a jitted ``step(state, *args) -> (state, aux)`` so the new state keeps ``state_shardings``
  (the partitioner may otherwise pick other layouts for the updated parameters and Adam moments)."""
  return jax.jit(lambda state, *args: step_fn(state, *args), out_shardings=(state_shardings, None),
                 donate_argnums=(0,) if donate else ())


# --------------------------------------------------------------------------------------------------
# Batches and host-side values
# --------------------------------------------------------------------------------------------------
def global_batch(local_batch, sharding: NamedSharding):
  """This process's rows of a global batch (a dict of numpy arrays) -> global jax.Arrays.

  Every process passes its own ``[B / processes, ...]`` rows (`pipeline.train_batches` shards by
  ``jax.process_index()``); the global batch is their concatenation in process order.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def put_replicated(tree, mesh: Mesh):
  """Host values (the same on every process; numpy, jax arrays or PRNG keys) -> arrays replicated
  over the mesh. Built per device from a host copy, since ``device_put`` refuses a sharding that
  spans other processes' devices."""
  sh = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

  return jax.tree.map(put, tree)


def host_local(tree):
  """Arrays spread over other processes' devices -> full numpy values on every process (a collective:
  every process must call it); a no-op for arrays this process can read whole."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(tree, tiled=True)


# --------------------------------------------------------------------------------------------------
# Lookups of row-sharded tables
# --------------------------------------------------------------------------------------------------
def sharded_take(table: jax.Array, ids: jax.Array, mesh: Mesh) -> jax.Array:
  """``table[ids]`` under jit with the result split over 'data' like ``ids``: [B, ...] -> [B, ..., D]."""
  out = jnp.take(table, ids, axis=0)
  spec = P("data", *([None] * (out.ndim - 1)))
  return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, spec))


def default_capacity(local_ids: int, shards: int, factor: float = 2.0) -> int:
  """Per-(sender, owner) bucket size: ``factor`` times the mean ids per owner, at least 1."""
  return max(1, int(math.ceil(factor * local_ids / shards)))


def shard_map_lookup(table: jax.Array, ids: jax.Array, mesh: Mesh, table_axes: Sequence[str] = ("model",),
                     capacity: int | None = None, capacity_factor: float = 2.0) -> tuple[jax.Array, jax.Array]:
  """Explicit all-to-all lookup of a table split by rows over ``table_axes``.

  ``ids`` [B] are split over every mesh axis (B divisible by the device count); each device:
    1. bucketises its ids by owner shard ``id // rows_per_shard``, up to ``capacity`` per owner
       (ids past the capacity are dropped: they get a zero vector and are counted);
    2. all-to-all over ``table_axes``: every shard receives the ids it owns from each peer;
    3. gathers them from its local rows;
    4. all-to-all back, and un-bucketises to the original positions.

  Args:
    table: [V, D], rows split over ``table_axes`` (V divisible by their size).
    ids: int [B] in [0, V).
    capacity: ids one device may send to one owner per call (default: `default_capacity`).
  Returns:
    (embeddings [B, D] split over all mesh axes, dropped: int32 scalar, ids dropped over all devices).
  """
  table_axes = tuple(table_axes)
  all_axes = tuple(mesh.axis_names)
  shards = _table_shards(mesh, table_axes)
  vocab, dim = table.shape
  if vocab % shards:
    raise ValueError(f"table of {vocab} rows does not split into {shards} shards over {table_axes}: pad it")
  if ids.shape[0] % mesh.size:
    raise ValueError(f"{ids.shape[0]} ids do not split over {mesh.size} devices: use a multiple of {mesh.size}")
  rows = vocab // shards
  local_n = ids.shape[0] // mesh.size
  cap = capacity or default_capacity(local_n, shards, capacity_factor)
  axis = table_axes[0] if len(table_axes) == 1 else table_axes

  def local(table_shard, local_ids):
    owner = local_ids // rows                                                  # [b]
    onehot = jax.nn.one_hot(owner, shards, dtype=jnp.int32)                    # [b, S]
    slot = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)         # rank within owner bucket
    kept = slot < cap
    send = jnp.full((shards, cap), -1, local_ids.dtype).at[owner, slot].set(local_ids, mode="drop")
    recv = jax.lax.all_to_all(send, axis, 0, 0)                               # [S, C]: ids I own
    me = jax.lax.axis_index(axis)
    valid = recv >= 0
    local_rows = jnp.where(valid, recv - me * rows, 0)
    found = jnp.where(valid[..., None], table_shard[local_rows], 0)            # [S, C, D]
    back = jax.lax.all_to_all(found, axis, 0, 0)                               # [S, C, D] by owner
    out = jnp.where(kept[:, None], back[owner, jnp.minimum(slot, cap - 1)], 0)
    dropped = jax.lax.psum(jnp.sum(~kept).astype(jnp.int32), all_axes)
    return out, dropped

  table_spec = P(axis, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(table_spec, P(all_axes)),
                       out_specs=(P(all_axes, None), P()))(table, ids)


def collective_counts(fn: Callable, *args) -> dict[str, int]:
  """Collective ops in the compiled HLO of ``jit(fn)(*args)``: the communication a step really does.

  An already jitted ``fn`` is lowered as it is, so after ``fn(*args)`` has run this is a cache hit,
  not a second compile."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  text = jitted.lower(*args).compile().as_text()
  ops = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
  return {op: len(re.findall(rf"^\s*(?:ROOT )?%\S+ = .*? {op}(?:-start)?\(", text, re.M)) for op in ops}


# --------------------------------------------------------------------------------------------------
# Global in-batch negatives
# --------------------------------------------------------------------------------------------------
_NEG_INF = -1e9


def global_in_batch_softmax_loss(query: jax.Array, pos_emb: jax.Array, pos_ids: jax.Array, mesh: Mesh,
                                 pos_log_q: jax.Array | None = None, temperature: float = 1.0):
  """In-batch softmax whose negatives are the positives of the *global* batch (every 'data' shard).

  Each device all-gathers the candidates [B, D] (and their ids, logQ) over 'data' and scores its
  own queries [B/d, D] against them; its labels are ``position * B/d + arange(B/d)``, where position
  is its index on 'data' (the order of the all-gather). Other rows with the same item are masked as
  accidental hits, as in `losses.in_batch_softmax_loss`, which this equals on the concatenated batch.

  Args:
    query, pos_emb: [B, D] split over 'data'; pos_ids: int [B]; pos_log_q: [B] or None.
  Returns:
    (loss [B] split over 'data', labels int [B]: each row's column in the gathered candidates).
  """
  has_q = pos_log_q is not None
  log_q = pos_log_q if has_q else jnp.zeros(pos_ids.shape, query.dtype)

  def local(q, p, ids, lq):
    b = q.shape[0]
    cand = jax.lax.all_gather(p, "data", tiled=True)                          # [B, D]
    cand_ids = jax.lax.all_gather(ids, "data", tiled=True)                    # [B]
    labels = jax.lax.axis_index("data") * b + jnp.arange(b)                   # [b]
    logits = q @ cand.T / temperature
    if has_q:
      logits = logits - jax.lax.all_gather(lq, "data", tiled=True)[None, :]
    hit = (ids[:, None] == cand_ids[None, :]) & (labels[:, None] != jnp.arange(cand.shape[0])[None, :])
    logits = jnp.where(hit, _NEG_INF, logits)
    pos = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - pos, labels

  spec = P("data")
  return jax.shard_map(local, mesh=mesh, in_specs=(P("data", None), P("data", None), spec, spec),
                       out_specs=(spec, spec))(query, pos_emb, pos_ids, log_q)
