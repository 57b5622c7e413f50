"""Mixed precision for the retrieval loss (``config.compute_dtype``) without low-precision scatters.

Why. The first bfloat16 forward pass cast every float parameter, embedding tables included, before
the model ran. The gradient of ``take(table_bf16, ids)`` is then a bfloat16 scatter-add of the
batch's [B*L, D] rows into a zero [I, D] bfloat16 buffer, and with Zipf-distributed ids most rows
land on a few popular items. On a GPU a scatter-add is done with atomics; bfloat16 atomics are
emulated (compare-and-swap loops on 32-bit words) and serialise on hot rows, so that one op grew
linearly with the batch and made every bfloat16 step slower than float32 (up to 150x on an H100 at
batch 8,192, experiments/results/bench/README.md; `experiments/diagnose_bf16.py` times the ops).

What this module does instead:
  * `compute_cast`: every float parameter is cast to the compute dtype except the `nn.Embed` tables
    (leaf name 'embedding'), which stay float32.
  * `float32_gathers`: inside it, ``nn.Embed.__call__`` gathers float32 rows and casts only the
    gathered rows, and `take_rows` / `take_along_axis` (gathers of computed arrays: MIND's
    catalogue embedding indexed by the history, MV-HAN's per-type outputs) do the same. The cast's transpose is a convert of the [B*L, D] row
    cotangents to float32, so the scatter-add into the table is a float32 one (native atomics).
  * Feature tables (``tables``, not parameters) are left float32: they get no gradient, so no
    scatter; the models already cast the gathered slices they use (dense fields go through
    ``astype(float32)``, masks through ``astype(emb.dtype)``), so casting whole tables bought nothing
    and cost a pass over each table every step (and a float32 -> bfloat16 -> float32 round trip of
    dense features).
Master weights, gradients, scores and losses stay float32, as before.

Use in a retrieval train step (the loss takes ``(params, batch, tables, rng)``)::

    loss_fn = precision.mixed_precision(_loss_fn, compute_dtype)

`CastingModel` applies the same policy around a model's ``apply``, so that a step built with
``compute_dtype='float32'`` runs the fixed bfloat16 forward (benchmarks and tests use it to compare
both castings without editing the step). `low_precision_scatters` lists the bfloat16 / float16
scatters of a traced function (tests assert there are none).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable

import flax.linen as nn
import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def compute_dtype(name) -> jnp.dtype:
  """``config.compute_dtype`` -> a dtype; anything but float32 / bfloat16 / float16 is refused."""
  try:
    dt = jnp.dtype(name)
  except TypeError:
    dt = None
  if dt is None or dt.name not in COMPUTE_DTYPES:
    raise ValueError(f"config.compute_dtype={name!r}: use 'float32', 'bfloat16' or 'float16'")
  return dt


def _is_float(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def is_embedding_table(path: tuple) -> bool:
  """A parameter's key path (`jax.tree_util` keys or plain names) ends at an `nn.Embed` table
  (flax names that parameter 'embedding')."""
  if not path:
    return False
  last = path[-1]
  return getattr(last, "key", last) == "embedding"


def compute_cast(params, tables, dtype):
  """(params, tables) for the forward pass in ``dtype``: every float parameter cast except the
  `nn.Embed` tables; feature tables returned unchanged (see the module docstring). Run the model
  inside `float32_gathers` so that the tables' rows are cast after the gather."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return params, tables
  cast = jax.tree_util.tree_map_with_path(
      lambda p, v: v.astype(dtype) if _is_float(v) and not is_embedding_table(p) else v, params)
  return cast, tables


# --------------------------------------------------------------------------------------------------
# Gathers in float32, rows cast after
# --------------------------------------------------------------------------------------------------
_state = threading.local()  # trace-time only: the compute dtype of the innermost float32_gathers


def active_dtype() -> jnp.dtype | None:
  """The compute dtype of the enclosing `float32_gathers`, or None outside one."""
  stack = getattr(_state, "stack", ())
  return stack[-1] if stack else None


def cast_rows(rows: jax.Array) -> jax.Array:
  """Gathered float rows cast to the active compute dtype (unchanged outside `float32_gathers`)."""
  dt = active_dtype()
  if dt is None or not _is_float(rows) or rows.dtype == dt:
    return rows
  return rows.astype(dt)


def take_rows(x: jax.Array, ids: jax.Array) -> jax.Array:
  """``x[ids]`` (rows along axis 0). Inside `float32_gathers`, a low-precision ``x`` is gathered in
  float32 and the rows cast back, so the gradient's scatter-add into ``x`` is a float32 one (the
  extra converts touch ``x`` once and the gathered rows once, no scatter)."""
  if active_dtype() is None or not _is_float(x) or x.dtype not in _LOW:
    return x[ids]
  return x.astype(jnp.float32)[ids].astype(x.dtype)


def take_along_axis(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
  """``jnp.take_along_axis``, in float32 for a low-precision ``x`` inside `float32_gathers` (as
  `take_rows`: its gradient is a scatter-add, which must not be a low-precision one)."""
  if active_dtype() is None or not _is_float(x) or x.dtype not in _LOW:
    return jnp.take_along_axis(x, idx, axis=axis)
  return jnp.take_along_axis(x.astype(jnp.float32), idx, axis=axis).astype(x.dtype)


def _embed_interceptor(next_fun, args, kwargs, context):
  if context.method_name != "__call__" or not isinstance(context.module, nn.Embed):
    return next_fun(*args, **kwargs)
  # The table is float32 here (compute_cast keeps it), so the gather and its transpose are float32;
  # only the rows leave in the compute dtype. next_fun keeps other interceptors in the chain.
  return cast_rows(next_fun(*args, **kwargs))


@contextlib.contextmanager
def float32_gathers(dtype):
  """Inside: ``nn.Embed.__call__`` returns float32-gathered rows cast to ``dtype``, and `take_rows`
  gathers low-precision arrays in float32. A no-op for float32. Trace-time state: enter it inside
  the function that is traced (the loss), not around ``jit``."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    yield
    return
  stack = getattr(_state, "stack", ())
  _state.stack = stack + (dtype,)
  try:
    with nn.intercept_methods(_embed_interceptor):
      yield
  finally:
    _state.stack = stack


def mixed_precision(loss_fn: Callable, dtype) -> Callable:
  """``loss_fn(params, batch, tables, rng)`` run with `compute_cast` and `float32_gathers` in
  ``dtype`` (float32: ``loss_fn`` itself). Gradients w.r.t. ``params`` are float32 (each cast's
  transpose converts them back)."""
  dtype = compute_dtype(dtype)
  if dtype == jnp.float32:
    return loss_fn

  @functools.wraps(loss_fn)
  def wrapped(params, batch, tables, rng):
    params, tables = compute_cast(params, tables, dtype)
    with float32_gathers(dtype):
      return loss_fn(params, batch, tables, rng)

  return wrapped


class CastingModel:
  """A model whose ``apply`` runs in ``dtype`` with this module's policy: parameters cast by
  `compute_cast`, lookups inside `float32_gathers`. Every other attribute is the wrapped model's.

  For comparisons without editing a train step: build the step with ``compute_dtype='float32'``
  (so it casts nothing) on an experiment whose model is ``CastingModel(exp.model, 'bfloat16')``;
  the step's own casts of user / item vectors to float32 keep scores and losses float32. Tables
  are left as they are, as `compute_cast` does. Not for ``init`` (parameters stay float32).
  """

  def __init__(self, model, dtype):
    self._model = model
    self._dtype = compute_dtype(dtype)

  def __getattr__(self, name):
    return getattr(self._model, name)

  def apply(self, variables, *args, **kwargs):
    variables, _ = compute_cast(variables, None, self._dtype)
    with float32_gathers(self._dtype):
      return self._model.apply(variables, *args, **kwargs)


# --------------------------------------------------------------------------------------------------
# Checking a traced function
# --------------------------------------------------------------------------------------------------
def _subjaxprs(params):
  find = getattr(jex_core, "jaxprs_in_params", None)
  if find is not None:
    return list(find(params))
  out = []  # a jax without jaxprs_in_params: look for (closed) jaxprs among the parameters
  for value in params.values():
    for x in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(x, "jaxpr", x)
      if hasattr(inner, "eqns"):
        out.append(inner)
  return out


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in _subjaxprs(eqn.params):
      yield from _eqns(sub)


def low_precision_scatters(closed_jaxpr) -> list[str]:
  """'primitive operand-type' of every scatter (any 'scatter*' primitive, nested jaxprs included)
  whose operand is bfloat16 or float16, e.g. the gradient of a gather from a bfloat16 array."""
  jaxpr = getattr(closed_jaxpr, "jaxpr", closed_jaxpr)
  out = []
  for eqn in _eqns(jaxpr):
    if eqn.primitive.name.startswith("scatter"):
      aval = eqn.invars[0].aval
      if getattr(aval, "dtype", None) in _LOW:
        out.append(f"{eqn.primitive.name} {aval.str_short()}")
  return out


def scatter_summary(closed_jaxpr) -> dict[str, int]:
  """{'scatter-add f32[1682,64]': count, ...} over every scatter of a traced function."""
  jaxpr = getattr(closed_jaxpr, "jaxpr", closed_jaxpr)
  out: dict[str, int] = {}
  for eqn in _eqns(jaxpr):
    if eqn.primitive.name.startswith("scatter"):
      key = f"{eqn.primitive.name} {eqn.invars[0].aval.str_short()}"
      out[key] = out.get(key, 0) + 1
  return out

