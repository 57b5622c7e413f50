"""Row-sparse (lazy) AdamW for large embedding tables: a step costs O(rows the batch touches), not
O(rows in the table).

Why. With plain `jax.grad` + `optax.adamw`, the gradient of an [N, D] embedding table is a dense
[N, D] array (a zero fill plus a scatter-add of the batch's rows), and AdamW then reads and writes
the table, both moments and the gradient in full: about ten passes over 3 x N x D floats per step
whatever the batch. At N = 10^6 items, d = 64 that is most of a CPU train step (measured by
`experiments/bench_train.py --table_rows`); at 10^7 it is all of it. Industrial trainers (TF's
LazyAdam, TorchRec's fused row-wise optimizers) update only the rows a batch looks up.

How, without touching the models. Every large table is an `nn.Embed` (parameter name
'embedding'). During the loss, `flax.linen.intercept_methods` replaces each such lookup
``take(table, ids)`` by ``take(stop_gradient(table), ids) + delta``, where ``delta`` is a zero
array of the lookup's shape passed in as an argument: the gradient with respect to ``delta`` is the
gradient of every looked-up row (COO form: ids and [.., D] values), and no dense table gradient is
formed. Rows are then summed per unique id (`jnp.unique` with a static size: the number of
lookups), and AdamW is applied to those rows only, gathered from and scattered back into the table
and its two moments (donated, so in place).

Semantics (TF LazyAdam's): a row's moments and weight decay advance only on steps that look the row
up (with a zero gradient too, e.g. a masked padding id); bias correction uses the global step. When
every row is looked up at every step this is exactly `optax.adamw`; otherwise rows seen rarely keep
their momentum until they are seen again instead of drifting on it. Gradient clipping by global
norm is exact: the row gradients have the norm of the dense gradient.

Configuration: ``config.optimizer.sparse_min_rows`` (0 = off, the default): `nn.Embed` tables with at
least that many rows are updated this way; every other parameter gets `optax.adamw` as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

from mvhan_jax import precision

Path = tuple[str, ...]


def sparse_table_paths(params, min_rows: int) -> tuple[Path, ...]:
  """Flattened paths of the `nn.Embed` tables (leaf 'embedding', 2-D) with >= ``min_rows`` rows."""
  if min_rows <= 0:
    return ()
  flat = traverse_util.flatten_dict(params)
  return tuple(sorted(p for p, v in flat.items()
                      if p[-1] == "embedding" and len(v.shape) == 2 and v.shape[0] >= min_rows))


def split_params(params, paths: tuple[Path, ...]) -> tuple[Any, dict[Path, jax.Array]]:
  """(the params without the sparse tables, {path: table})."""
  flat = traverse_util.flatten_dict(params)
  dense = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in paths})
  return dense, {p: flat[p] for p in paths}


def merge_params(dense, tables: dict[Path, jax.Array]):
  flat = traverse_util.flatten_dict(dense)
  flat.update(tables)
  return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------------
# Row gradients of the looked-up rows, through an interceptor on nn.Embed
# --------------------------------------------------------------------------------------------------
def _embed_path(module: nn.Module) -> Path:
  return ("params",) + tuple(module.path) + ("embedding",)


def _intercepting(paths: tuple[Path, ...], on_lookup: Callable[[Path, jax.Array, jax.Array], jax.Array]):
  """An interceptor routing ``nn.Embed.__call__`` of the tables in ``paths`` to ``on_lookup``."""
  wanted = set(paths)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, nn.Embed)
        or _embed_path(module) not in wanted):
      return next_fun(*args, **kwargs)
    (ids,) = args
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError("nn.Embed input must be integer ids")
    # This interceptor answers the lookup itself, so a `precision.float32_gathers` entered inside it
    # never sees it: cast the (float32) rows here, as that one would.
    return precision.cast_rows(on_lookup(_embed_path(module), module.embedding, ids))

  return interceptor


def lookup_shapes(fn: Callable, paths: tuple[Path, ...], *args) -> list[tuple[Path, tuple[int, ...], Any]]:
  """(path, ids shape, rows dtype) of every lookup into ``paths`` that ``fn(*args)`` makes, in call
  order (abstract evaluation: nothing is computed)."""
  calls = []

  def record(path, table, ids):
    rows = jnp.take(table, ids, axis=0)
    calls.append((path, tuple(ids.shape), rows.dtype))
    return rows

  def run(*a):
    with nn.intercept_methods(_intercepting(paths, record)):
      return fn(*a)

  jax.eval_shape(run, *args)
  return calls


def with_row_deltas(fn: Callable, paths: tuple[Path, ...], calls) -> Callable:
  """``fn(*args)`` -> ``g(deltas, *args)``: the same function, with ``deltas[i]`` (zeros of lookup
  i's row shape) added to lookup i's rows and the tables' own gradient stopped. ``g`` returns
  ``(fn's output, [ids of lookup i])``, so ``jax.grad(g, has_aux=...)`` w.r.t. ``deltas`` gives the
  gradient of every looked-up row."""

  def g(deltas, *args):
    ids_seen = []

    def inject(path, table, ids):
      i = len(ids_seen)
      if i >= len(calls) or calls[i][0] != path or calls[i][1] != tuple(ids.shape):
        raise RuntimeError(f"lookup {i} into {'/'.join(path)} {tuple(ids.shape)} does not match the "
                           "recorded lookups: the loss must look tables up in a fixed order")
      ids_seen.append(ids)
      return jnp.take(jax.lax.stop_gradient(table), ids, axis=0) + deltas[i].astype(table.dtype)

    with nn.intercept_methods(_intercepting(paths, inject)):
      out = fn(*args)
    if len(ids_seen) != len(calls):
      raise RuntimeError(f"{len(ids_seen)} lookups, {len(calls)} recorded")
    return out, ids_seen

  return g


def row_gradients(calls, ids_list, delta_grads, path: Path, num_rows: int):
  """Per unique id of one table: (ids int32 [U], summed row gradients [U, D], valid bool [U]).

  U = the number of lookups into the table (static); unused slots have id ``num_rows`` (out of
  range: scatters drop them) and a zero gradient."""
  sel = [i for i, c in enumerate(calls) if c[0] == path]
  ids = jnp.concatenate([ids_list[i].reshape(-1) for i in sel]).astype(jnp.int32)
  grads = jnp.concatenate([delta_grads[i].reshape(-1, delta_grads[i].shape[-1]) for i in sel])
  # Out-of-range ids look up nothing (jnp.take fills) and must not be updated.
  ids = jnp.where((ids >= 0) & (ids < num_rows), ids, num_rows)
  size = ids.shape[0]
  uniq, inverse = jnp.unique(ids, size=size, fill_value=num_rows, return_inverse=True)
  summed = jax.ops.segment_sum(grads.astype(jnp.float32), inverse.reshape(-1), num_segments=size)
  valid = uniq < num_rows
  return uniq, jnp.where(valid[:, None], summed, 0.0), valid


def grads_by_rows(loss_fn: Callable, params, paths: tuple[Path, ...], *args):
  """Gradients of ``loss_fn(params, *args) -> (loss, aux)`` w.r.t. every parameter except the tables
  in ``paths``, and w.r.t. the rows of those tables that the loss looks up.

  Returns (aux, dense_grads, {path: (ids [U], row grads [U, D], valid [U])}): a dense table gradient
  would equal the row gradients scattered (added) at their ids.
  """
  dense, big = split_params(params, paths)

  def loss_of(dense_params, *a):
    return loss_fn(merge_params(dense_params, big), *a)

  calls = lookup_shapes(loss_of, paths, dense, *args)
  with_deltas = with_row_deltas(loss_of, paths, calls)
  deltas = [jnp.zeros(shape + (big[path].shape[1],), jnp.float32) for path, shape, _ in calls]

  def objective(dense_params, deltas):
    (loss, aux), ids = with_deltas(deltas, dense_params, *args)
    return loss, (aux, ids)

  (dense_grads, delta_grads), (aux, ids) = jax.grad(objective, argnums=(0, 1), has_aux=True)(dense, deltas)
  rows = {p: row_gradients(calls, ids, delta_grads, p, big[p].shape[0]) for p in paths}
  return aux, dense_grads, rows


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SparseTableAdamW:
  """AdamW with lazy row updates of the large `nn.Embed` tables (see the module docstring).

  ``init(params)`` gives {'dense': optax.adamw state of the other params, 'mu' / 'nu': zeros shaped
  like the sparse tables, under their parameter paths (so the sharding rules that split a table by
  rows split its moments the same way)}. The train step (`mvhan_jax.train.make_train_step`) calls
  ``update``.
  """

  learning_rate: Callable[[jax.Array], jax.Array]
  weight_decay: float
  grad_clip: float
  min_rows: int
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  @property
  def dense(self) -> optax.GradientTransformation:
    return optax.adamw(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)

  def paths(self, params) -> tuple[Path, ...]:
    return sparse_table_paths(params, self.min_rows)

  def init(self, params):
    paths = self.paths(params)
    dense, tables = split_params(params, paths)
    zeros = {p: jnp.zeros_like(t) for p, t in tables.items()}
    return {"dense": self.dense.init(dense), "mu": traverse_util.unflatten_dict(zeros) if zeros else {},
            "nu": traverse_util.unflatten_dict(dict(zeros)) if zeros else {}}

  def update(self, step, dense_grads, rows: dict[Path, tuple], opt_state, params):
    """One step. ``rows[path] = (ids [U], grads [U, D], valid [U])`` from `row_gradients`.

    Returns (new params, new opt_state, global gradient norm before clipping)."""
    paths = tuple(sorted(rows))
    dense, tables = split_params(params, paths)
    sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(dense_grads)) + sum(
        jnp.sum(jnp.square(r[1])) for r in rows.values())
    norm = jnp.sqrt(sq)
    scale = jnp.minimum(1.0, self.grad_clip / (norm + 1e-16)) if self.grad_clip else jnp.float32(1.0)
    dense_grads = jax.tree.map(lambda g: g * scale, dense_grads)
    updates, dense_state = self.dense.update(dense_grads, opt_state["dense"], dense)
    dense = optax.apply_updates(dense, updates)

    # Bias correction and learning rate by the global step, as optax.adamw (its count starts at 0).
    count = step.astype(jnp.float32) + 1.0
    lr = self.learning_rate(step)
    mu_flat = traverse_util.flatten_dict(opt_state["mu"]) if opt_state["mu"] else {}
    nu_flat = traverse_util.flatten_dict(opt_state["nu"]) if opt_state["nu"] else {}
    for p in paths:
      ids, g, valid = rows[p]
      g = g * scale
      table, mu, nu = tables[p], mu_flat[p], nu_flat[p]
      w = jnp.take(table, ids, axis=0, mode="fill", fill_value=0)
      m = self.b1 * jnp.take(mu, ids, axis=0, mode="fill", fill_value=0) + (1 - self.b1) * g
      v = self.b2 * jnp.take(nu, ids, axis=0, mode="fill", fill_value=0) + (1 - self.b2) * jnp.square(g)
      m_hat = m / (1 - self.b1 ** count)
      v_hat = v / (1 - self.b2 ** count)
      new_w = w - lr * (m_hat / (jnp.sqrt(v_hat) + self.eps) + self.weight_decay * w)
      keep = valid[:, None]
      # Padding slots carry id = num_rows: mode='drop' ignores them.
      tables[p] = table.at[ids].set(jnp.where(keep, new_w, w).astype(table.dtype), mode="drop")
      mu_flat[p] = mu.at[ids].set(jnp.where(keep, m, 0).astype(mu.dtype), mode="drop")
      nu_flat[p] = nu.at[ids].set(jnp.where(keep, v, 0).astype(nu.dtype), mode="drop")
    new_state = {"dense": dense_state,
                 "mu": traverse_util.unflatten_dict(mu_flat) if mu_flat else {},
                 "nu": traverse_util.unflatten_dict(nu_flat) if nu_flat else {}}
    return merge_params(dense, tables), new_state, norm
