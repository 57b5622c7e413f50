r"""SEMINAR approximate attention: recall@K of the PQ top-K against the exact top-K, and the time of
the scoring + top-K step, exact vs PQ (mvhan_jax/models/pq.py).

  python experiments/bench_seminar_attention.py --batch_size=32 --repeats=5          # CPU, ~3 min
  python experiments/bench_seminar_attention.py --batch_size=256 --repeats=20        # accelerator

Setting (SEEDS section 4): M = 3 modalities, d = 64, 4 heads, top-K = 32, L in --lengths, PQ with C
in --subspaces sub-spaces of 256 centroids per modality. Keys come from a structured source, not
isotropic noise: per modality, a mixture of --num_clusters Gaussian centres ~ N(0, I / d) with
Zipf(1.1) cluster sizes + N(0, 0.5^2 / d) noise; the three modalities of one item share its cluster
(different centres per modality), as text / image / id views of one item would. Queries are a key
of the same sequence plus noise (so the top-K is peaked, as in target attention), one per head.
Codebooks are trained on --train_vectors keys drawn from the same source (one-off cost reported).

Timed step: scores [B, H, L] from q [B, H, M, d] and keys [B, L, M, d] (exact: fused-modality
matmul) or from codes [B, L, M, C] uint8 (PQ: weighted look-up table per query, M * C look-ups per
position), then masked top-K; "exact fused" is the exact path with sum_j w_j k_j precomputed per
position ([B, L, d], what a server would cache); jit, warm, median of --repeats calls with block_until_ready.
Writes experiments/results/bench/seminar_attention_<backend>_<machine>.json.
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
import numpy as np

from mvhan_jax import report
from mvhan_jax.models import pq

flags.DEFINE_list("lengths", ["1024", "2048", "8192"], "Sequence lengths L.")
flags.DEFINE_list("subspaces", ["8", "16"], "PQ sub-spaces C per modality (d = 64).")
flags.DEFINE_integer("batch_size", 32, "Batch B (sequences scored per step).")
flags.DEFINE_integer("repeats", 5, "Timed calls per setting (median reported).")
flags.DEFINE_integer("topk", 32, "Top-K positions.")
flags.DEFINE_integer("heads", 4, "Heads H.")
flags.DEFINE_integer("dim", 64, "Width d per modality.")
flags.DEFINE_integer("modalities", 3, "Modalities M.")
flags.DEFINE_integer("num_centroids", 256, "Centroids per sub-space.")
flags.DEFINE_integer("num_clusters", 1000, "Mixture centres of the key source.")
flags.DEFINE_integer("train_vectors", 20000, "Keys used to train the codebooks.")
flags.DEFINE_integer("kmeans_iters", 15, "Lloyd iterations.")
flags.DEFINE_integer("chunk", 1024, "Positions scored per chunk on the PQ path (0: no chunking).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("out_dir", "experiments/results/bench", "Where the JSON goes.")
FLAGS = flags.FLAGS


def make_source(rng, m, d, num_clusters):
  centres = (rng.standard_normal((num_clusters, m, d)) / np.sqrt(d)).astype(np.float32)
  prior = 1.0 / np.arange(1, num_clusters + 1) ** 1.1
  return centres, prior / prior.sum()


def draw_keys(rng, centres, prior, n):
  _, m, d = centres.shape
  c = rng.choice(len(prior), size=n, p=prior)
  return (centres[c] + (0.5 / np.sqrt(d)) * rng.standard_normal((n, m, d))).astype(np.float32)


def median_time(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv):
  del argv
  rng = np.random.default_rng(FLAGS.seed)
  b, h, m, d, k = FLAGS.batch_size, FLAGS.heads, FLAGS.modalities, FLAGS.dim, FLAGS.topk
  chunk = FLAGS.chunk or None
  centres, prior = make_source(rng, m, d, FLAGS.num_clusters)
  w = jnp.asarray(rng.dirichlet(np.ones(m)).astype(np.float32))
  train = draw_keys(rng, centres, prior, FLAGS.train_vectors)

  books = {}
  for c in map(int, FLAGS.subspaces):
    t0 = time.perf_counter()
    cbs = jax.block_until_ready(pq.train_multimodal_pq(jax.random.key(FLAGS.seed), train, c,
                                                       FLAGS.num_centroids, FLAGS.kmeans_iters))
    books[c] = (cbs, time.perf_counter() - t0)
    print(f"C={c}: trained {m} x {c} codebooks on {FLAGS.train_vectors} keys in "
          f"{books[c][1]:.1f}s (incl. compile)", flush=True)

  exact_fn = jax.jit(lambda q, keys, mask: pq.exact_topk(q, keys, w, mask, k))
  # Exact with the modality sum sum_j w_j k_j precomputed per position (what a server would cache):
  # 4 d bytes per position instead of 4 M d.
  fused_fn = jax.jit(lambda q, kw, mask: pq.topk_positions(
      jnp.einsum("bhd,bld->bhl", jnp.einsum("bhmd,m->bhd", q, w), kw), mask, k))
  pq_fn = jax.jit(lambda q, codes, cbs, mask: pq.pq_topk(q, codes, cbs, w, mask, k, chunk))
  rows = []
  for length in map(int, FLAGS.lengths):
    keys = draw_keys(rng, centres, prior, b * length).reshape(b, length, m, d)
    pick = rng.integers(0, length, (b, h))
    q = keys[np.arange(b)[:, None], pick] + (0.5 / np.sqrt(d)) * rng.standard_normal(
        (b, h, m, d)).astype(np.float32)
    lengths = rng.integers(length // 2, length + 1, b)  # ragged sequences: the mask matters
    mask = np.arange(length)[None] < lengths[:, None]
    keys_j, q_j, mask_j = jnp.asarray(keys), jnp.asarray(q), jnp.asarray(mask)
    e_idx, e_valid = exact_fn(q_j, keys_j, mask_j)
    t_exact = median_time(lambda: exact_fn(q_j, keys_j, mask_j), FLAGS.repeats)
    kw_j = jnp.einsum("blmd,m->bld", keys_j, w)
    t_fused = median_time(lambda: fused_fn(q_j, kw_j, mask_j), FLAGS.repeats)
    for c, (cbs, train_s) in books.items():
      t0 = time.perf_counter()
      codes = jax.block_until_ready(pq.multimodal_encode(cbs, keys_j).astype(jnp.uint8))
      encode_s = time.perf_counter() - t0
      p_idx, _ = pq_fn(q_j, codes, cbs, mask_j)
      t_pq = median_time(lambda: pq_fn(q_j, codes, cbs, mask_j), FLAGS.repeats)
      recall = pq.recall_at_k(np.asarray(p_idx), np.asarray(e_idx), np.asarray(e_valid))
      row = dict(L=length, C=c, batch=b, recall_at_k=recall, exact_ms=1e3 * t_exact,
                 pq_ms=1e3 * t_pq, speedup=t_exact / t_pq,
                 exact_fused_ms=1e3 * t_fused, speedup_vs_fused=t_fused / t_pq, train_s=train_s, encode_s=encode_s,
                 key_bytes_per_position=4 * m * d, code_bytes_per_position=m * c)
      rows.append(row)
      print(f"L={length} C={c}: recall@{k} {recall:.3f}, exact {row['exact_ms']:.2f} ms, "
            f"PQ {row['pq_ms']:.2f} ms, x{row['speedup']:.2f}, encode {encode_s:.2f}s", flush=True)

  machine = report.machine_description()
  backend = jax.devices()[0].platform
  print(f"\nMachine: {machine}; B = {b}, H = {h}, M = {m}, d = {d}, top-K = {k}, "
        f"{FLAGS.num_centroids} centroids\n")
  print(f"| L | C | recall@{k} | exact ms | exact fused ms | PQ ms | speed-up (vs fused) | "
        "bytes/position exact / fused / PQ | PQ train s | encode s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['L']} | {r['C']} | {r['recall_at_k']:.3f} | {r['exact_ms']:.2f} | "
          f"{r['exact_fused_ms']:.2f} | {r['pq_ms']:.2f} | {r['speedup']:.2f} "
          f"({r['speedup_vs_fused']:.2f}) | {r['key_bytes_per_position']} / {4 * d} / "
          f"{r['code_bytes_per_position']} | {r['train_s']:.1f} | {r['encode_s']:.2f} |")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  dev = jax.devices()[0].device_kind.replace(" ", "_")
  tag = f"{backend}_{platform.machine()}_{os.cpu_count()}cores" if backend == "cpu" else \
      f"{backend}_{dev}"
  path = os.path.join(FLAGS.out_dir, f"seminar_attention_{tag}.json")
  with open(path, "w") as f:
    json.dump({"machine": machine, "backend": backend, "jax": jax.__version__,
               "numpy": np.__version__, "command": " ".join(["python"] + sys.argv),
               "flags": {n: FLAGS[n].value for n in (
                   "lengths", "subspaces", "batch_size", "repeats", "topk", "heads", "dim",
                   "modalities", "num_centroids", "num_clusters", "train_vectors",
                   "kmeans_iters", "chunk", "seed")},
               "rows": rows}, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
