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
flags.DEFINE_list("fused_subspaces", ["8"], "Sub-spaces of the fused-key PQ (codes of sum_j w_j k_j).")
flags.DEFINE_list("rescore", ["64", "128", "256"],
                  "Candidates R re-scored exactly after the PQ selection (rescored paths).")
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
flags.DEFINE_string("out_suffix", "", "Appended to the JSON name (e.g. _b4 for another batch).")
FLAGS = flags.FLAGS


def make_source(rng, m, d, num_clusters):
  centres = (rng.standard_normal((num_clusters, m, d)) / np.sqrt(d)).astype(np.float32)
  prior = 1.0 / np.arange(1, num_clusters + 1) ** 1.1
  return centres, prior / prior.sum()


def draw_keys(rng, centres, prior, n):
  _, m, d = centres.shape
  c = rng.choice(len(prior), size=n, p=prior)
  return (centres[c] + (0.5 / np.sqrt(d)) * rng.standard_normal((n, m, d))).astype(np.float32)


def interleaved_times(fns, repeats):
  """Median seconds per call of every fn in ``fns`` (name -> zero-arg callable), the calls
  interleaved round-robin so that a load change on a shared machine hits every path alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile + warm
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def cost(jitted, *args):
  """XLA's cost analysis of the compiled step: (GFLOP, MB accessed)."""
  try:
    ca = report.xla_cost(jitted.lower(*args).compile())
    return ca["flops"] / 1e9, ca["bytes_accessed"] / 1e6
  except Exception:  # pylint: disable=broad-except
    return float("nan"), float("nan")


def main(argv):
  del argv
  rng = np.random.default_rng(FLAGS.seed)
  b, h, m, d, k = FLAGS.batch_size, FLAGS.heads, FLAGS.modalities, FLAGS.dim, FLAGS.topk
  chunk = FLAGS.chunk or None
  centres, prior = make_source(rng, m, d, FLAGS.num_clusters)
  w = jnp.asarray(rng.dirichlet(np.ones(m)).astype(np.float32))
  train = draw_keys(rng, centres, prior, FLAGS.train_vectors)
  rescore = [int(r) for r in FLAGS.rescore]

  books = {}
  for c in map(int, FLAGS.subspaces):
    t0 = time.perf_counter()
    cbs = jax.block_until_ready(pq.train_multimodal_pq(jax.random.key(FLAGS.seed), train, c,
                                                       FLAGS.num_centroids, FLAGS.kmeans_iters))
    books[c] = (cbs, pq.multimodal_centroid_tables(cbs), time.perf_counter() - t0)
    print(f"C={c}: trained {m} x {c} codebooks on {FLAGS.train_vectors} keys in "
          f"{books[c][2]:.1f}s (incl. compile)", flush=True)
  fused_books = {}
  train_fused = np.einsum("nmd,m->nd", train, np.asarray(w))
  for c in map(int, FLAGS.fused_subspaces):
    t0 = time.perf_counter()
    cb = jax.block_until_ready(pq.train_pq(jax.random.key(FLAGS.seed), train_fused, c,
                                           FLAGS.num_centroids, FLAGS.kmeans_iters))
    fused_books[c] = (cb, time.perf_counter() - t0)
    print(f"fused C={c}: trained {c} codebooks of the fused keys in {fused_books[c][1]:.1f}s", flush=True)

  # Exact: one matmul with an M d contraction over the per-modality keys [B, L, M, d].
  exact_fn = jax.jit(lambda q, keys, mask: pq.exact_topk(q, keys, w, mask, k))
  # Exact with sum_j w_j k_j cached per position ([B, L, d], what a server would cache).
  fused_fn = jax.jit(lambda q, kw, mask: pq.topk_positions(pq.fused_exact_scores(q, kw, w), mask, k))
  topk_fn = jax.jit(lambda s, mask: pq.topk_positions(s, mask, k))  # the top-K alone (a floor)
  adc_fn = jax.jit(lambda q, codes, cbs, mask: pq.pq_topk(q, codes, cbs, w, mask, k, chunk))

  def sdc_topk(q, codes, cbs, tables, mask):
    q_codes = pq.multimodal_encode(cbs, q)  # in the timed step (a catalogue could cache them)
    return pq.topk_positions(pq.multimodal_sdc_scores(tables, q_codes, codes, w, chunk), mask, k)
  sdc_fn = jax.jit(sdc_topk)

  def adc_rescored(q, codes, cbs, kw, mask, r):
    approx = pq.multimodal_pq_scores(q, codes, cbs, w, chunk)
    qw = jnp.einsum("bhmd,m->bhd", q, w)
    return pq.rescored_topk(approx, mask, k, r, lambda cand: pq.fused_candidate_scores(qw, kw, cand))
  adc_r_fn = jax.jit(adc_rescored, static_argnums=5)

  def fpq_rescored(q, fcodes, cb, kw, mask, r):
    qw = jnp.einsum("bhmd,m->bhd", q, w)
    approx = pq.lut_scores(pq.query_lut(cb, qw), fcodes[:, None], chunk)
    if r <= k:
      return pq.topk_positions(approx, mask, k)
    return pq.rescored_topk(approx, mask, k, r, lambda cand: pq.fused_candidate_scores(qw, kw, cand))
  fpq_fn = jax.jit(fpq_rescored, static_argnums=5)

  rows = []
  for length in map(int, FLAGS.lengths):
    keys = draw_keys(rng, centres, prior, b * length).reshape(b, length, m, d)
    pick = rng.integers(0, length, (b, h))
    q = keys[np.arange(b)[:, None], pick] + (0.5 / np.sqrt(d)) * rng.standard_normal(
        (b, h, m, d)).astype(np.float32)
    lengths = rng.integers(length // 2, length + 1, b)  # ragged sequences: the mask matters
    mask = np.arange(length)[None] < lengths[:, None]
    keys_j, q_j, mask_j = jnp.asarray(keys), jnp.asarray(q), jnp.asarray(mask)
    kw_j = jnp.einsum("blmd,m->bld", keys_j, w)
    e_idx, e_valid = exact_fn(q_j, keys_j, mask_j)
    scores_j = pq.fused_exact_scores(q_j, kw_j, w)
    paths = {  # name -> (jitted, args, static r, C, bytes per position)
        "exact": (exact_fn, (q_j, keys_j, mask_j), None, 4 * m * d),
        "exact fused": (fused_fn, (q_j, kw_j, mask_j), None, 4 * d),
        "top-K only": (topk_fn, (scores_j, mask_j), None, 4 * h)}
    encode_s = {}
    for c, (cbs, tables, _) in books.items():
      t0 = time.perf_counter()
      codes = jax.block_until_ready(pq.multimodal_encode(cbs, keys_j).astype(jnp.uint8))
      encode_s[f"C={c}"] = time.perf_counter() - t0
      paths[f"ADC C={c}"] = (adc_fn, (q_j, codes, cbs, mask_j), None, m * c)
      paths[f"SDC C={c}"] = (sdc_fn, (q_j, codes, cbs, tables, mask_j), None, m * c)
      for r in rescore:
        paths[f"ADC C={c} + rescore {r}"] = (adc_r_fn, (q_j, codes, cbs, kw_j, mask_j, r), r,
                                             m * c + 4 * d)
    for c, (cb, _) in fused_books.items():
      t0 = time.perf_counter()
      fcodes = jax.block_until_ready(pq.encode(cb, kw_j).astype(jnp.uint8))
      encode_s[f"fused C={c}"] = time.perf_counter() - t0
      for r in [k] + rescore:
        name = f"fused-PQ C={c}" + (f" + rescore {r}" if r > k else "")
        paths[name] = (fpq_fn, (q_j, fcodes, cb, kw_j, mask_j, r), r, c + (4 * d if r > k else 0))

    def call(fn, args, r):
      return (lambda: fn(*args)) if r is None else (lambda: fn(*args[:-1], r))
    times = interleaved_times({n: call(fn, a, r) for n, (fn, a, r, _) in paths.items()}, FLAGS.repeats)
    t_exact, t_fused = times["exact"], times["exact fused"]
    for name, (fn, args, r, nbytes) in paths.items():
      if name == "top-K only":
        recall = float("nan")
      else:
        idx, _ = fn(*args) if r is None else fn(*args[:-1], r)
        recall = pq.recall_at_k(np.asarray(idx), np.asarray(e_idx), np.asarray(e_valid))
      gflop, mbytes = cost(fn, *args) if r is None else cost(jax.jit(lambda *a, f=fn, r=r: f(*a, r)), *args[:-1])
      row = dict(L=length, path=name, batch=b, recall_at_k=recall, ms=1e3 * times[name],
                 speedup_vs_exact=t_exact / times[name], speedup_vs_fused=t_fused / times[name],
                 xla_gflop=gflop, xla_mb_accessed=mbytes, bytes_per_position=nbytes)
      rows.append(row)
      print(f"L={length} {name:28s} recall@{k} {recall:.3f}  {row['ms']:8.2f} ms  "
            f"x{row['speedup_vs_exact']:.2f} vs exact, x{row['speedup_vs_fused']:.2f} vs fused  "
            f"XLA {gflop:.3f} GFLOP {mbytes:.1f} MB", flush=True)
    print(f"L={length} encode s: {encode_s}", flush=True)

  machine = report.machine_description()
  backend = jax.devices()[0].platform
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(f"\nMachine: {machine}; load average at the end {load}; B = {b}, H = {h}, M = {m}, d = {d}, "
        f"top-K = {k}, {FLAGS.num_centroids} centroids\n")
  print(f"| L | path | recall@{k} | ms | speed-up vs exact | vs exact fused | XLA GFLOP | XLA MB accessed | "
        "bytes/position |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    rec = "-" if np.isnan(r["recall_at_k"]) else f"{r['recall_at_k']:.3f}"
    print(f"| {r['L']} | {r['path']} | {rec} | {r['ms']:.2f} | {r['speedup_vs_exact']:.2f} | "
          f"{r['speedup_vs_fused']:.2f} | {r['xla_gflop']:.3f} | {r['xla_mb_accessed']:.1f} | "
          f"{r['bytes_per_position']} |")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  dev = jax.devices()[0].device_kind.replace(" ", "_")
  tag = f"{backend}_{platform.machine()}_{os.cpu_count()}cores" if backend == "cpu" else \
      f"{backend}_{dev}"
  path = os.path.join(FLAGS.out_dir, f"seminar_attention_{tag}{FLAGS.out_suffix}.json")
  with open(path, "w") as f:
    json.dump({"machine": machine, "backend": backend, "jax": jax.__version__,
               "numpy": np.__version__, "load_average_end": load,
               "command": " ".join(["python"] + sys.argv),
               "flags": {n: FLAGS[n].value for n in (
                   "lengths", "subspaces", "fused_subspaces", "rescore", "batch_size", "repeats",
                   "topk", "heads", "dim", "modalities", "num_centroids", "num_clusters",
                   "train_vectors", "kmeans_iters", "chunk", "seed")},
               "rows": rows}, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
