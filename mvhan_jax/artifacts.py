"""What a saved artifact was made from, and checksums: the records that loading checks.

Every artifact a run writes carries a *stamp*, and every load compares it before it trusts the bytes:

* checkpoints (`mvhan_jax.train`): the 'meta' JSON item holds ``meta['artifact']`` = task, model name,
  config hash (and the hashed fields themselves, so a mismatch can name them), step, the shape and
  dtype of every leaf, and a sha256 of the saved tree. Restoring checks task / model / config /
  shapes *before* orbax reads an array, then the checksum of what it read.
* the ANN index (`mvhan_jax.retrieval`): ``index.json`` holds the sha256 of every index file, and
  (`tasks/retrieval.build_and_save_index`) the model, config hash and checksum of the checkpoint the
  vectors came from, with the step, item count and dimension; serving compares them with the best
  checkpoint.
* the MovieLens TFDS cache (`data/tfds_movielens.train_arrays`): a sha256 of the decoded training
  arrays beside the ArrayRecord files; a cache that fails it is rebuilt with a warning.

The config hash is a sha256 of the config's JSON minus `IGNORED_FIELDS`: fields that change neither
the trained parameters nor what they are evaluated on, or that legitimately differ between two
invocations of one run: paths (a workdir or data cache moved to another machine), logging and
progress, test hooks, the checkpoint cadence, the training length and evaluation cadence (a run
extended with --config.total_steps, or served with the config's defaults after a shortened run, is
still one model of one dataset), the device mesh (a checkpoint restores across
topologies), the ANN index settings (`--mode=index` rebuilds it from the checkpoint) and evaluation
chunk sizes. Seeds are *kept*: ``seed`` changes the parameters (and, under the ComiRec protocol,
which users are held out) and ``dataset.data_seed`` the data, so a workdir is one seed's run and an
index or checkpoint of another seed is another run's. A field present on one side only (a field a
newer version of the code added, whose default keeps the old behaviour, the house rule for new
fields) is not a mismatch.

Failures are `errors.UserError`s (the CLI prints them as one line): `ArtifactMismatch` (made from
something else: say what, and use the matching config or another --workdir), `ArtifactDamaged` (the
bytes are not what was saved: delete or rebuild), `ArtifactMissing` (nothing saved yet).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from mvhan_jax import errors

FORMAT = 1
# Config fields (flattened 'a.b' names; a name covers its sub-fields) outside the config hash.
IGNORED_FIELDS = (
    "dataset.data_dir", "dataset.retrieval_workdir", "pretrain.checkpoint",  # paths
    "warm_start.workdir",
    "log_every_steps", "progress", "tensorboard", "prefetch",                # logging, input threads
    "fail_at_step", "stop_at_step", "pretrain.stop_at_step",                 # test hooks
    "checkpoint_every_steps",                                                # when to save, not what
    # How long to train and how often to evaluate: a run stopped, extended (--config.total_steps=...)
    # or served with the config's defaults after a shortened run is still the same model and data.
    "total_steps", "num_epochs", "eval_every_steps", "early_stopping_patience",
    "train.total_steps", "train.num_epochs", "train.eval_every_steps",
    "pretrain.total_steps", "pretrain.num_epochs",
    "mesh",                                                                  # topology
    "index",                                                                 # rebuilt by --mode=index
    "eval.user_chunk", "eval.item_chunk", "eval.extra_attentions",           # how / what else to report
)
# Above this many bytes a checkpoint is saved without a checksum (sha256 runs at ~1 GB/s on one core
# and a save must not stall the loop for seconds); the stamp says so. Override by environment.
CHECKSUM_MAX_BYTES = int(os.environ.get("MVHAN_CHECKSUM_MAX_BYTES", 1 << 30))


class ArtifactMismatch(errors.UserError, ValueError):
  """A saved artifact was made from another model, config, step or dataset than the one asked for."""


class ArtifactDamaged(errors.UserError, ValueError):
  """A saved artifact cannot be read, or its bytes differ from the checksum saved with them.

  ``reason``: what is wrong, without the advice (for callers that act on it themselves).
  """

  def __init__(self, message: str, reason: str | None = None):
    super().__init__(message)
    self.reason = reason or message


class ArtifactMissing(errors.UserError, FileNotFoundError):
  """No artifact where one is needed."""


# --------------------------------------------------------------------------------------------------
# Provenance: task, model, config hash
# --------------------------------------------------------------------------------------------------
def _ignored(key: str) -> bool:
  return any(key == f or key.startswith(f + ".") for f in IGNORED_FIELDS)


def config_fingerprint(config) -> dict[str, Any]:
  """The hashed fields of ``config`` as a flat {'a.b': JSON value} dict.

  Computed from the config's JSON (what ``<workdir>/config.json`` holds), so a config read back from
  that file has the same fingerprint as the one that wrote it (tuples and lists alike).
  """
  tree = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if isinstance(v, dict):
        walk(v, key + ".")
      elif not _ignored(key):
        flat[key] = v
  walk(tree, "")
  return flat


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(config) -> str:
  """16 hex digits of the sha256 of `config_fingerprint` (see the module docstring for what counts)."""
  return fingerprint_hash(config_fingerprint(config))


def model_name(config) -> str:
  model = config.get("model") if hasattr(config, "get") else None
  name = model.get("name") if model is not None and hasattr(model, "get") else None
  return name or task_name(config)


def task_name(config) -> str:
  return config.get("task", "retrieval") if hasattr(config, "get") else "retrieval"


def provenance(config) -> dict[str, Any]:
  """What an artifact made under ``config`` records of it."""
  fp = config_fingerprint(config)
  return {"task": task_name(config), "model": model_name(config), "config_hash": fingerprint_hash(fp), "config": fp}


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 40 else text[:37] + "..."


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 3) -> list[str]:
  """'key: A there, B here' for the fields both fingerprints hold with different values."""
  keys = sorted(k for k in saved.keys() & current.keys() if saved[k] != current[k])
  out = [f"{k} {_short(saved[k])} there, {_short(current[k])} here" for k in keys[:limit]]
  if len(keys) > limit:
    out.append(f"{len(keys) - limit} more")
  return out


def check_provenance(stamp: Mapping[str, Any], config, where: str, what: str, fix: str) -> None:
  """Raises `ArtifactMismatch` when ``stamp`` (an artifact's record) was not made under ``config``.

  where: the artifact's location; what: e.g. 'checkpoint (step 120)'; fix: the advice that ends the
  sentence.
  """
  want = provenance(config)
  if (stamp.get("task"), stamp.get("model")) != (want["task"], want["model"]):
    raise ArtifactMismatch(
        f"{where} holds a {stamp.get('model')} {what} ({stamp.get('task')} task, config {stamp.get('config_hash')}) "
        f"but this config builds {want['model']} ({want['task']} task): {fix}")
  if stamp.get("config_hash") == want["config_hash"] or "config" not in stamp:
    return
  diff = config_differences(stamp["config"], want["config"])
  if diff:
    raise ArtifactMismatch(f"{where} holds a {what} of another {want['model']} config ({'; '.join(diff)}): {fix}")


# --------------------------------------------------------------------------------------------------
# Trees: leaf signatures and checksums
# --------------------------------------------------------------------------------------------------
def _path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def leaf_signature(tree) -> dict[str, list]:
  """{leaf path: [shape, dtype name]} of a tree of arrays or ShapeDtypeStructs."""
  return {_path(p): [list(np.shape(x)), str(_dtype(x)) if _is_key(x) else str(np.dtype(_dtype(x)))]
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def signature_differences(saved: Mapping[str, list], target: Mapping[str, list], limit: int = 2) -> list[str]:
  """The leaves a checkpoint and a restore target disagree on (missing, extra, other shape or dtype)."""
  out = []
  for k in sorted(target.keys() - saved.keys())[:limit]:
    out.append(f"this config has {k} {target[k][0]}, the checkpoint has no such array")
  for k in sorted(saved.keys() - target.keys())[:limit]:
    out.append(f"the checkpoint has {k} {saved[k][0]}, this config none")
  for k in sorted(k for k in saved.keys() & target.keys() if list(saved[k]) != list(target[k]))[:limit]:
    out.append(f"{k} is {saved[k][0]} {saved[k][1]} there, {target[k][0]} {target[k][1]} here")
  return out[:limit]


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(_dtype(x), jax.dtypes.prng_key)


def _host_value(x) -> np.ndarray | None:
  """``x``'s whole value from this process alone, or None when part of it lives on other processes."""
  if isinstance(x, jax.Array):
    if _is_key(x):
      x = jax.random.key_data(x)
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return None
  return np.asarray(x)


def tree_checksum(tree, max_bytes: int | None = None) -> tuple[str | None, str | None]:
  """('sha256:<hex>', None) over every leaf (path, dtype, shape, bytes) in tree order, or (None, why).

  Skipped (no collective is ever run) when a leaf is split over several processes' devices, and
  above ``max_bytes`` (default `CHECKSUM_MAX_BYTES`).
  """
  max_bytes = CHECKSUM_MAX_BYTES if max_bytes is None else max_bytes
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  total = sum(int(np.prod(np.shape(x))) * np.dtype(_dtype(x)).itemsize for _, x in leaves if not _is_key(x))
  if total > max_bytes:
    return None, f"skipped: {total / 2**30:.1f} GiB exceeds the checksum budget (MVHAN_CHECKSUM_MAX_BYTES)"
  h = hashlib.sha256()
  for path, x in leaves:
    value = _host_value(x)
    if value is None:
      return None, "skipped: leaves are split over several processes"
    value = np.ascontiguousarray(value)
    h.update(f"{_path(path)}|{value.dtype.str}|{value.shape}".encode())
    h.update(value.reshape(-1).view(np.uint8))
  return "sha256:" + h.hexdigest(), None


def arrays_checksum(arrays: Mapping[str, np.ndarray]) -> str:
  """sha256 of named numpy arrays (name, dtype, shape, bytes; sorted by name)."""
  h = hashlib.sha256()
  for k in sorted(arrays):
    v = np.ascontiguousarray(arrays[k])
    h.update(f"{k}|{v.dtype.str}|{v.shape}".encode())
    h.update(v.reshape(-1).view(np.uint8))
  return "sha256:" + h.hexdigest()


def file_digests(directory, names: Iterable[str]) -> dict[str, str]:
  """{name: 'sha256:<hex>'} of files in ``directory`` (local or remote, through `mvhan_jax.workdir`)."""
  from mvhan_jax import workdir  # pylint: disable=import-outside-toplevel
  out = {}
  for name in sorted(names):
    h = hashlib.sha256()
    with (workdir.path(directory) / name).open("rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
    out[name] = "sha256:" + h.hexdigest()
  return out


def first_line(exc: BaseException, limit: int = 160) -> str:
  """``Type: first line of the message``, cut at ``limit`` characters (orbax errors dump whole specs)."""
  text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
  text = text if len(text) <= limit else text[: limit - 3] + "..."
  return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
