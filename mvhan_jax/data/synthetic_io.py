"""Streams a synthetic world to ArrayRecord shards and reads it back (Grain-compatible).

Layout of ``out_dir`` (all record kinds in id order across shards):
  meta.json                              config, counts, vocab, shard file names
  items-00000-of-00004.array_record ...  one record per item: 'item', 'topic', 'type_index'
                                         (0-based) + the `generate_item_block` keys, row i
  users-*.array_record                   one record per user: 'user', 'interests' int32 [k],
                                         'interest_weights' f32 [k] (k live interests), profile
  events-*.array_record                  one record per user: 'user' + that user's time-ordered
                                         event arrays (`generate_user_block` event keys)
  truth/*.npy                            ground truth (see `write_world`)
Records are msgpack dicts of scalars and small numpy arrays (`encode_record` / `decode_record`).
"""

from __future__ import annotations

import json
import os
import time

import msgpack
import numpy as np
from array_record.python import array_record_module

from mvhan_jax.data import synthetic_gen as syn
from mvhan_jax.data.synthetic_config import WorldConfig

__all__ = ["encode_record", "decode_record", "write_world", "read_shards", "ShardSource", "load_meta",
           "RECORD_KINDS"]

RECORD_KINDS = ("items", "users", "events")
_ND_EXT = 1  # msgpack extension code for numpy arrays
# ArrayRecord options: group_size 1 makes every record its own chunk, so random access (what
# Grain does) decodes one record instead of a whole group.
# Snappy: the float vectors do not compress, so brotli / zstd only cost time (~3x the whole
# item write), while snappy is nearly free and still shrinks the mostly-zero query arrays.
DEFAULT_OPTIONS = "group_size:1,snappy"


def _default(obj):
  if isinstance(obj, np.ndarray):
    # Payload: [len(dtype.str)] dtype.str [ndim] shape (uint32 little-endian each) raw bytes.
    # Hand-rolled instead of a nested packb: encoding is the writer's bottleneck.
    # (tobytes is C order whatever the layout; ascontiguousarray would turn 0-d into 1-d.)
    arr = obj
    dt = arr.dtype.str.encode()
    head = bytes((len(dt),)) + dt + bytes((arr.ndim,)) + np.asarray(arr.shape, "<u4").tobytes()
    return msgpack.ExtType(_ND_EXT, head + arr.tobytes())
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f"encode_record: cannot serialise {type(obj).__name__}; use numpy arrays, "
                  "numpy scalars or Python scalars / str / bytes")


def _ext_hook(code, data):
  if code != _ND_EXT:
    return msgpack.ExtType(code, data)
  n = data[0]
  dtype = np.dtype(data[1:1 + n].decode())
  ndim = data[1 + n]
  shape = np.frombuffer(data, "<u4", ndim, 2 + n)
  # Copy: frombuffer views the message bytes read-only.
  return np.frombuffer(data, dtype, offset=2 + n + 4 * ndim).reshape(tuple(shape.tolist())).copy()


def encode_record(record: dict) -> bytes:
  """dict of scalars / numpy arrays -> bytes (arrays keep dtype and shape exactly)."""
  return msgpack.packb(record, default=_default, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  """Inverse of `encode_record`; arrays come back as writable numpy arrays."""
  return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False)


class _ShardedWriter:
  """Writes ``total`` records to ceil(total / shard_size) files ``{kind}-i-of-n.array_record``."""

  def __init__(self, out_dir: str, kind: str, total: int, shard_size: int, options: str):
    self.num_shards = max(1, -(-total // shard_size))
    self.paths = [f"{kind}-{i:05d}-of-{self.num_shards:05d}.array_record"
                  for i in range(self.num_shards)]
    self.out_dir, self.shard_size, self.options = out_dir, shard_size, options
    self.count, self.writer = 0, None

  def write(self, data: bytes):
    if self.count % self.shard_size == 0:
      self.close()
      path = os.path.join(self.out_dir, self.paths[self.count // self.shard_size])
      self.writer = array_record_module.ArrayRecordWriter(path, self.options)
    self.writer.write(data)
    self.count += 1

  def close(self):
    if self.writer is not None:
      self.writer.close()
      self.writer = None


def _peak_rss_mib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def write_world(cfg: WorldConfig, out_dir: str, shard_size: int = 100_000,
                options: str = DEFAULT_OPTIONS, verbose: bool = False) -> dict:
  """Generates ``cfg``'s world block by block and writes it to ``out_dir``.

  Records equal `generate_world(cfg)` exactly, for any ``shard_size``. Memory: the skeleton
  (~30 B / item), the full item latent and quality (4 * (d + 1) B / item; clicks need them) and
  one block at a time. Ground truth under ``truth/``: topic_vectors, topic_prior, text_rotation,
  image_rotation, scenario_vectors, item_type, item_topic, item_rank, item_latent, item_quality,
  user_interests, user_interest_weights (shapes as in `SyntheticWorld.ground_truth`).
  Returns meta (also saved as meta.json) with timings, counts and peak RSS.
  """
  if shard_size < 1:
    raise ValueError(f"write_world: shard_size must be >= 1, got {shard_size}")
  t_start = time.perf_counter()
  os.makedirs(os.path.join(out_dir, "truth"), exist_ok=True)
  truth = lambda name: os.path.join(out_dir, "truth", name + ".npy")
  sk = syn.make_skeleton(cfg)
  for name in ("topic_vectors", "topic_prior", "text_rotation", "image_rotation",
               "scenario_vectors", "item_type", "item_topic", "item_rank"):
    np.save(truth(name), getattr(sk, name))
  N, U, d, K = cfg.num_items, cfg.num_users, cfg.d_latent, cfg.max_interests
  # Kept in RAM: every user block gathers rows of it at random (clicks depend on affinity).
  item_latent = np.empty((N, d), np.float32)
  item_quality = np.empty(N, np.float32)
  timings = {"skeleton_s": time.perf_counter() - t_start}

  t = time.perf_counter()
  w = _ShardedWriter(out_dir, "items", N, shard_size, options)
  for a in range(0, N, cfg.item_block_size):
    b = min(a + cfg.item_block_size, N)
    blk = syn.generate_item_block(sk, a, b)
    item_latent[a:b] = blk["latent"]
    item_quality[a:b] = blk["quality"]
    # 1-D columns become Python lists first: one vectorised conversion instead of a numpy
    # scalar per field per record through msgpack's fallback hook.
    cols = [(k, blk[k].tolist() if blk[k].ndim == 1 else blk[k]) for k in syn.ITEM_BLOCK_KEYS]
    topic, typ = sk.item_topic[a:b].tolist(), sk.item_type[a:b].tolist()
    for j in range(b - a):
      rec = {"item": a + j, "topic": topic[j], "type_index": typ[j]}
      for k, v in cols:
        rec[k] = v[j]
      w.write(encode_record(rec))
    if verbose:
      print(f"items {b}/{N} {time.perf_counter() - t:.1f}s rss {_peak_rss_mib():.0f} MiB", flush=True)
  w.close()
  np.save(truth("item_latent"), item_latent)
  np.save(truth("item_quality"), item_quality)
  timings["items_s"] = time.perf_counter() - t

  t = time.perf_counter()
  ui = np.lib.format.open_memmap(truth("user_interests"), "w+", np.int32, (U, K))
  uw = np.lib.format.open_memmap(truth("user_interest_weights"), "w+", np.float32, (U, K))
  wu = _ShardedWriter(out_dir, "users", U, shard_size, options)
  we = _ShardedWriter(out_dir, "events", U, shard_size, options)
  num_events = 0
  for a in range(0, U, cfg.user_block_size):
    b = min(a + cfg.user_block_size, U)
    blk = syn.generate_user_block(sk, a, b, item_latent, item_quality)
    ui[a:b], uw[a:b] = blk["interests"], blk["interest_weights"]
    off = np.concatenate([[0], np.cumsum(blk["num_events"])])
    for j in range(b - a):
      k = int((blk["interests"][j] >= 0).sum())
      wu.write(encode_record({
          "user": a + j, "interests": blk["interests"][j, :k],
          "interest_weights": blk["interest_weights"][j, :k],
          **{f: int(blk[f][j]) for f in syn.PROFILE_FIELDS}}))
      s, e = off[j], off[j + 1]
      rec = {"user": a + j}
      for key in syn.EVENT_KEYS[1:]:
        rec[key] = blk[key][s:e]
      we.write(encode_record(rec))
    num_events += int(off[-1])
    if verbose:
      print(f"users {b}/{U} {time.perf_counter() - t:.1f}s rss {_peak_rss_mib():.0f} MiB", flush=True)
  wu.close()
  we.close()
  ui.flush()
  uw.flush()
  del ui, uw
  timings["users_s"] = time.perf_counter() - t
  timings["total_s"] = time.perf_counter() - t_start

  meta = {"format": 1, "config": cfg.to_dict(), "num_items": N, "num_users": U,
          "num_events": num_events, "shards": {"items": w.paths, "users": wu.paths,
                                               "events": we.paths},
          "vocab": {**syn.item_vocab(cfg), **syn.user_vocab(cfg)}, "timings": timings,
          "peak_rss_mib": _peak_rss_mib()}
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


class ShardSource:
  """Random-access decoded records of one kind: ``len(src)``, ``src[i] -> dict``.

  Implements Grain's RandomAccessDataSource protocol, so ``grain.MapDataset.source(src)`` and
  ``grain.DataLoader(data_source=src, ...)`` work; ``raw`` is the underlying
  ``grain.sources.ArrayRecordDataSource`` (bytes records) for pipelines that decode in a map.
  """

  def __init__(self, paths: list[str]):
    import grain
    self.raw = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self.raw)

  def __getitem__(self, index: int) -> dict:
    return decode_record(self.raw[index])

  def __getitems__(self, indices) -> list[dict]:
    """Batched read (Grain uses it when present): ~10x cheaper per record than `__getitem__`."""
    return [decode_record(r) for r in self.raw.__getitems__(list(indices))]

  def __repr__(self):
    return f"ShardSource({len(self)} records)"


def read_shards(out_dir: str, kind: str) -> ShardSource:
  """Opens the shards of ``kind`` in {'items', 'users', 'events'} written by `write_world`."""
  if kind not in RECORD_KINDS:
    raise ValueError(f"read_shards: kind must be one of {RECORD_KINDS}, got {kind!r}")
  meta_path = os.path.join(out_dir, "meta.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"read_shards: {meta_path} not found; write the world with write_world")
  with open(meta_path) as f:
    meta = json.load(f)
  return ShardSource([os.path.join(out_dir, p) for p in meta["shards"][kind]])


def load_meta(out_dir: str) -> tuple[WorldConfig, dict]:
  """The config and meta dict of a streamed world."""
  with open(os.path.join(out_dir, "meta.json")) as f:
    meta = json.load(f)
  return WorldConfig.from_dict(meta["config"]), meta
