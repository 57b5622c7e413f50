"""ANN retrieval benchmark: ScaNN vs exact JAX top-k vs hnswlib / faiss, recall@10 vs queries/s.

Run (defaults: both sources, 3 ScaNN trees, hnswlib M=16/32, faiss; 40+ min on 2 cores):
  python experiments/bench_ann.py
The recorded 10^6 run (two commands, one JSON; about 20 + 12 min on a loaded 2-core VM):
  python experiments/bench_ann.py --sources=world --hnsw_m=16,32 --hnsw_ef=40,80,160,320 \
    --leaf_fracs=0.005,0.01,0.02 --reorders=40,100
  python experiments/bench_ann.py --sources=gaussian --scann_leaves=2000 --int8=0 \
    --leaf_fracs=0.02,0.04,0.08,0.16 --reorders=100,250 --hnsw_m=16 --hnsw_ef=80,160,320,640 \
    --single_thread=0 --faiss=0
Small run (a couple of minutes):
  python experiments/bench_ann.py --num_items=100000 --num_queries=5000 --hnsw_m=16

Three item sources, each --num_items x --dim float32:
  world      the synthetic world's item latents (`make_skeleton` + `generate_item_block`, with
             d_latent = --dim so no projection is needed): unit topic vectors + N(0, 0.5^2 / d)
             noise, topics drawn from the world's Dirichlet topic prior.
  gaussian   control: 1,000 centres ~ N(0, I / d) with Zipf(1.1) cluster sizes + N(0, 0.7^2 / d).
  trained    a trained MIND's item vectors and its users' interests (--trained_config,
             --trained_workdir; default experiments/configs/mind_synthetic_1m.py, whose docstring
             has the training command): queries are real model outputs, not generated.
Queries (--num_queries; world and gaussian): user-like vectors, a Dirichlet mixture of 1-4 topic / centre vectors +
noise; and multi-interest queries [Q, K = 4, D] with a mask (1-4 live interests, each a topic
vector + noise) merged by max score (`retrieval.merge_interests`).

Recall@10 is measured against `evaluation.exact_topk` on the first --recall_queries queries;
queries/s on all --num_queries (best of --repeats runs, which removes most interference from
other processes). Every library gets the same threads (--threads, default: all cores):
ScaNN `search_batched_parallel` after `set_num_threads`, hnswlib `set_num_threads`, faiss
`omp_set_num_threads`, XLA's default thread pool for JAX. ScaNN's single-threaded
`search_batched` is reported too. Multi-interest queries/s count users (all their interests and
the merge). Writes experiments/results/bench/ann_<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from importlib import metadata

import numpy as np

from mvhan_jax import evaluation, retrieval
from mvhan_jax.data import synthetic

_K = 10
_MAX_INTERESTS = 4


def _load() -> str:
  return "load %.1f/%.1f/%.1f" % os.getloadavg()


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')} {_load()}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------


def world_items(num_items: int, dim: int, num_topics: int, seed: int):
  """Synthetic-world item latents float32 [N, dim], topic vectors [T, dim], topic prior [T]."""
  cfg = synthetic.WorldConfig(num_users=10, num_items=num_items, num_topics=num_topics,
                              d_latent=dim, text_dim=dim, image_dim=dim, seed=seed)
  sk = synthetic.make_skeleton(cfg)
  out = np.empty((num_items, dim), np.float32)
  bs = cfg.item_block_size
  for start in range(0, num_items, bs):  # block by block: the text / image views stay small
    stop = min(start + bs, num_items)
    out[start:stop] = synthetic.generate_item_block(sk, start, stop)["latent"]
  return out, sk.topic_vectors, sk.topic_prior


def gaussian_items(num_items: int, dim: int, num_centres: int, seed: int):
  """Clustered Gaussian control float32 [N, dim] with Zipf cluster sizes; centres, their prior."""
  rng = np.random.default_rng(seed)
  centres = (rng.standard_normal((num_centres, dim)) / np.sqrt(dim)).astype(np.float32)
  prior = 1.0 / np.arange(1, num_centres + 1) ** 1.1
  prior /= prior.sum()
  out = np.empty((num_items, dim), np.float32)
  for start in range(0, num_items, 1 << 17):
    stop = min(start + (1 << 17), num_items)
    c = rng.choice(num_centres, size=stop - start, p=prior)
    out[start:stop] = centres[c] + (0.7 / np.sqrt(dim)) * rng.standard_normal((stop - start, dim))
  return out, centres, prior


def trained_vectors(config_path: str, workdir: str, num_queries: int, seed: int):
  """Item vectors [N, D] and queries of a trained multi-interest model (its best checkpoint).

  Multi-interest queries: the model's [Q, K, D] interests and live mask for the validation and
  test users (the first ``num_queries``); single queries: ``num_queries`` live interests of those
  users drawn at random (each one a query a serving system issues).
  """
  from mvhan_jax import configs, train  # pylint: disable=g-import-not-at-top
  exp = rtask.build_experiment(configs.load_config(config_path))
  params, step = rtask.restore_params(workdir, exp)
  items = rtask.encode_items(exp, params)
  vecs, masks = [], []
  for split in ("valid", "test"):
    v, m = rtask.encode_users(exp, params, exp.eval_sets[split])
    if m is None:
      raise ValueError(f"--trained_workdir={workdir!r} holds a single-vector model: the benchmark "
                       "needs a multi-interest one (e.g. experiments/configs/mind_synthetic_1m.py)")
    vecs.append(v)
    masks.append(m)
  multi, mask = np.concatenate(vecs)[:num_queries], np.concatenate(masks)[:num_queries]
  if multi.shape[1] != _MAX_INTERESTS:
    raise ValueError(f"the trained model has K = {multi.shape[1]} interests; the benchmark uses "
                     f"{_MAX_INTERESTS}")
  live = multi[mask]
  single = live[np.random.default_rng(seed).permutation(len(live))[:num_queries]]
  _log(f"trained vectors from {workdir} (step {step}): {items.shape[0]:,} items, "
       f"{len(multi):,} users, {mask.sum(1).mean():.2f} live interests per user")
  return (np.ascontiguousarray(items, np.float32), np.ascontiguousarray(single, np.float32),
          np.ascontiguousarray(multi, np.float32), mask)


def user_queries(topics: np.ndarray, prior: np.ndarray, num_queries: int, seed: int):
  """User-like queries float32 [Q, D] and multi-interest queries [Q, 4, D] + mask [Q, 4].

  A user has 1-4 interests drawn from the topic prior; the single-vector query is a
  Dirichlet-weighted mixture of them + noise, the multi-interest query one noisy vector per
  interest (what MIND / ComiRec would output).
  """
  rng = np.random.default_rng(seed)
  t, d = topics.shape
  n_int = rng.integers(1, _MAX_INTERESTS + 1, num_queries)
  mask = np.arange(_MAX_INTERESTS)[None, :] < n_int[:, None]
  interests = rng.choice(t, size=(num_queries, _MAX_INTERESTS), p=prior)
  w = rng.dirichlet(np.ones(_MAX_INTERESTS), num_queries) * mask
  w /= w.sum(axis=1, keepdims=True)
  noise = 0.3 / np.sqrt(d)
  single = (np.einsum("qk,qkd->qd", w, topics[interests])
            + noise * rng.standard_normal((num_queries, d))).astype(np.float32)
  multi = (topics[interests]
           + noise * rng.standard_normal((num_queries, _MAX_INTERESTS, d))).astype(np.float32)
  return single, multi, mask


# ---------------------------------------------------------------------------
# Timing helpers.
# ---------------------------------------------------------------------------


def best_time(fn, repeats: int) -> float:
  """Fastest of `repeats` calls (after one warm-up call)."""
  fn()
  best = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def dir_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def multi_search(flat_search, multi, mask):
  """Searches the live interests [M, D] with flat_search -> (ids, scores) [M, k]; merges."""
  q = multi.shape[0]
  live = np.ascontiguousarray(multi[mask])
  ids, scores = flat_search(live)
  full_i = np.full((q, _MAX_INTERESTS, _K), -1, np.int32)
  full_s = np.full((q, _MAX_INTERESTS, _K), -np.inf, np.float32)
  full_i[mask], full_s[mask] = ids, scores
  return retrieval.merge_interests(full_i, full_s, mask, _K)[0]


# ---------------------------------------------------------------------------
# Backends. Each returns rows: dict(method, setting, recall, qps, ...).
# ---------------------------------------------------------------------------


def bench_exact(items, single, multi, mask, gt_n, args):
  """Ground truth on the first gt_n queries and exact queries/s on --exact_queries."""
  qc = min(args.exact_queries, gt_n)
  t0 = time.perf_counter()
  _, gt_single = evaluation.exact_topk(single[:gt_n], items, _K, query_chunk=qc)
  gt_s_time = time.perf_counter() - t0
  n_t = qc
  t = best_time(lambda: evaluation.exact_topk(single[:n_t], items, _K, query_chunk=qc), 1)
  rows = [dict(method="exact (JAX matmul + top-k)", setting=f"query_chunk={qc}", kind="single",
               recall=1.0, qps=n_t / t, qps_1thread=None, note=f"timed on {n_t} queries; "
               f"ground truth for {gt_n} took {gt_s_time:.1f}s incl. compile")]
  _log(f"exact single: {n_t / t:.0f} q/s")
  qcm = max(1, qc // 4)  # K = 4 interests: keep the score block the same size
  _, gt_multi = evaluation.exact_topk(multi[:gt_n], items, _K, query_mask=mask[:gt_n],
                                      query_chunk=qcm)
  t = best_time(lambda: evaluation.exact_topk(multi[:qcm], items, _K, query_mask=mask[:qcm],
                                              query_chunk=qcm), 1)
  rows.append(dict(method="exact (JAX matmul + top-k)", setting=f"query_chunk={qcm}",
                   kind="multi", recall=1.0, qps=qcm / t, qps_1thread=None,
                   note=f"timed on {qcm} users x 4 interests (masked ones still scored)"))
  _log(f"exact multi: {qcm / t:.0f} users/s")
  return gt_single, gt_multi, rows


def scann_settings(num_leaves: int, args):
  """(leaves_to_search, reorder_k) pairs: a curve from fast to accurate."""
  return [(max(1, int(round(num_leaves * f))), r) for f in args.leaf_fracs for r in args.reorders]


def bench_scann(items, single, multi, mask, gt_single, gt_multi, args):
  import scann  # pylint: disable=g-import-not-at-top
  rows = []
  gt_n = gt_single.shape[0]
  variants = []
  for leaves in args.scann_leaves:
    variants.append((f"tree {leaves}", leaves, {}, scann.ReorderType.FLOAT32))
  if args.int8:
    # int8 re-ordering rows are 64 B (one cache line) instead of 256 B: the reorder step is
    # bound by random memory reads (see the profile), so this attacks its cost directly.
    leaves = args.scann_leaves[0]
    variants.append((f"tree {leaves} + int8 reorder", leaves, {}, scann.ReorderType.INT8))
  if args.soar:
    leaves = args.scann_leaves[0]
    variants.append((f"tree {leaves} + SOAR", leaves,
                     dict(soar_lambda=1.5, overretrieve_factor=2.0), scann.ReorderType.FLOAT32))
  for name, leaves, extra, reorder_type in variants:
    _log(f"scann build {name}")
    t0 = time.perf_counter()
    builder = scann.scann_ops_pybind.builder(items, _K, "dot_product")
    builder = builder.tree(num_leaves=leaves, num_leaves_to_search=max(1, leaves // 20),
                           training_sample_size=min(len(items), 250_000), **extra)
    builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2,
                               training_sample_size=min(len(items), 250_000))
    searcher = builder.reorder(200, quantize=reorder_type).set_n_training_threads(
        args.threads).build()
    build_s = time.perf_counter() - t0
    tmp = tempfile.mkdtemp(prefix="bench_scann_")
    try:
      searcher.serialize(tmp, relative_path=True)
      size = dir_bytes(tmp)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    searcher.set_num_threads(args.threads)
    _log(f"scann {name}: build {build_s:.1f}s, {size / 2**20:.0f} MiB")

    for lts, reorder in scann_settings(leaves, args):
      def par(q, lts=lts, reorder=reorder):
        return searcher.search_batched_parallel(q, _K, reorder, lts, batch_size=args.batch)

      def ser(q, lts=lts, reorder=reorder):
        return searcher.search_batched(q, _K, reorder, lts)

      rec = retrieval.ann_recall(par(single[:gt_n])[0], gt_single)
      t_par = best_time(lambda: par(single), args.repeats)
      t_ser = best_time(lambda: ser(single), 1) if args.single_thread else None
      setting = f"leaves_to_search={lts}, reorder={reorder}"
      rows.append(dict(method=f"ScaNN {name}", setting=setting, kind="single", recall=rec,
                       qps=len(single) / t_par,
                       qps_1thread=len(single) / t_ser if t_ser else None,
                       build_s=build_s, index_bytes=size))
      mrec = retrieval.ann_recall(
          multi_search(lambda q: par(q), multi[:gt_n], mask[:gt_n]), gt_multi)
      t_m = best_time(lambda: multi_search(lambda q: par(q), multi, mask), args.repeats)
      rows.append(dict(method=f"ScaNN {name}", setting=setting, kind="multi", recall=mrec,
                       qps=len(multi) / t_m, qps_1thread=None, build_s=build_s,
                       index_bytes=size))
      one = f" (1 thread {len(single) / t_ser:.0f})" if t_ser else ""
      _log(f"  {setting}: recall {rec:.4f} {len(single) / t_par:.0f} q/s{one}; "
           f"multi {mrec:.4f} {len(multi) / t_m:.0f} u/s")

    if args.profile:
      rows += profile_scann(searcher, name, leaves, single, args)
    del searcher
  return rows


def profile_scann(searcher, name, leaves, single, args):
  """Splits the cost of a search: tree (centroid scoring), AH scoring, reorder.

  Differences of throughputs of crippled searches: 1 leaf and no reorder ~ the tree; then more
  leaves (AH scoring of their points); then reorder (exact float scoring of the candidates).
  Single-threaded, so the numbers are per-core costs in microseconds per query.
  """
  rows = []
  q = single
  def us(lts, reorder):
    t = best_time(lambda: searcher.search_batched(q, _K, reorder, lts), args.repeats)
    return 1e6 * t / len(q)
  lts = max(1, int(round(leaves * 0.03)))
  tree = us(1, _K)
  ah = us(lts, _K)
  full = us(lts, 200)
  rows.append(dict(method=f"ScaNN {name} profile", kind="profile",
                   setting=f"leaves_to_search={lts}, reorder=200 (1 thread)",
                   tree_us=tree, ah_us=ah - tree, reorder_us=full - ah, total_us=full))
  _log(f"  profile {name} @ {lts} leaves: tree {tree:.1f} us, AH {ah - tree:.1f} us, "
       f"reorder(200) {full - ah:.1f} us per query per core")
  return rows


def bench_hnswlib(items, single, multi, mask, gt_single, gt_multi, args):
  import hnswlib  # pylint: disable=g-import-not-at-top
  rows = []
  gt_n = gt_single.shape[0]
  for m in args.hnsw_m:
    _log(f"hnswlib build M={m}")
    index = hnswlib.Index(space="ip", dim=items.shape[1])
    t0 = time.perf_counter()
    index.init_index(max_elements=len(items), ef_construction=200, M=m)
    index.set_num_threads(args.threads)
    index.add_items(items, np.arange(len(items)))
    build_s = time.perf_counter() - t0
    path = tempfile.mktemp(prefix="bench_hnsw_")
    try:
      index.save_index(path)
      size = dir_bytes(path)
    finally:
      if os.path.exists(path):
        os.remove(path)
    _log(f"hnswlib M={m}: build {build_s:.1f}s, {size / 2**20:.0f} MiB")
    for ef in args.hnsw_ef:
      index.set_ef(max(ef, _K))

      def search(q):
        ids, dist = index.knn_query(q, k=_K, num_threads=args.threads)
        return ids.astype(np.int32), (1.0 - dist).astype(np.float32)  # 'ip' distance = 1 - <q, x>

      rec = retrieval.ann_recall(search(single[:gt_n])[0], gt_single)
      t = best_time(lambda: search(single), args.repeats)
      rows.append(dict(method=f"hnswlib M={m}", setting=f"ef={ef}", kind="single", recall=rec,
                       qps=len(single) / t, qps_1thread=None, build_s=build_s,
                       index_bytes=size))
      mrec = retrieval.ann_recall(multi_search(search, multi[:gt_n], mask[:gt_n]), gt_multi)
      t_m = best_time(lambda: multi_search(search, multi, mask), args.repeats)
      rows.append(dict(method=f"hnswlib M={m}", setting=f"ef={ef}", kind="multi", recall=mrec,
                       qps=len(multi) / t_m, qps_1thread=None, build_s=build_s,
                       index_bytes=size))
      _log(f"  ef={ef}: recall {rec:.4f} {len(single) / t:.0f} q/s; multi {mrec:.4f} "
           f"{len(multi) / t_m:.0f} u/s")
    del index
  return rows


def bench_faiss(items, single, gt_single, args):
  """faiss IVF + 4-bit PQ fast-scan + exact refine: the closest faiss analogue of ScaNN."""
  import faiss  # pylint: disable=g-import-not-at-top
  faiss.omp_set_num_threads(args.threads)
  n, d = items.shape
  nlist = args.scann_leaves[0]
  spec = f"IVF{nlist},PQ{d // 2}x4fs,RFlat"
  _log(f"faiss build {spec}")
  t0 = time.perf_counter()
  index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
  rng = np.random.default_rng(0)
  index.train(items[rng.choice(n, min(n, 250_000), replace=False)])
  index.add(items)
  build_s = time.perf_counter() - t0
  path = tempfile.mktemp(prefix="bench_faiss_")
  try:
    faiss.write_index(index, path)
    size = dir_bytes(path)
  finally:
    if os.path.exists(path):
      os.remove(path)
  _log(f"faiss: build {build_s:.1f}s, {size / 2**20:.0f} MiB")
  ivf = faiss.extract_index_ivf(index)
  refine = faiss.downcast_index(index)
  rows = []
  gt_n = gt_single.shape[0]
  for frac in (0.02, 0.03, 0.05, 0.08):
    nprobe = max(1, int(round(nlist * frac)))
    for k_factor in (4, 10):  # re-ordered candidates = k_factor * k
      ivf.nprobe = nprobe
      refine.k_factor = k_factor
      rec = retrieval.ann_recall(index.search(single[:gt_n], _K)[1], gt_single)
      t = best_time(lambda: index.search(single, _K), args.repeats)
      rows.append(dict(method=f"faiss {spec}", setting=f"nprobe={nprobe}, k_factor={k_factor}",
                       kind="single", recall=rec, qps=len(single) / t, qps_1thread=None,
                       build_s=build_s, index_bytes=size))
      _log(f"  nprobe={nprobe} k_factor={k_factor}: recall {rec:.4f} {len(single) / t:.0f} q/s")
  return rows


# ---------------------------------------------------------------------------
# Summary.
# ---------------------------------------------------------------------------


def qps_at_recall(rows, recall):
  """Queries/s of `rows` at `recall`, linear along their Pareto front; None if not reached."""
  front, best = [], -1.0
  for r in sorted(rows, key=lambda r: (-r["qps"], -r["recall"])):
    if r["recall"] > best:
      front.append((r["recall"], r["qps"]))
      best = r["recall"]
  if not front or front[-1][0] < recall:
    return None
  if recall <= front[0][0]:
    return front[0][1]
  for (r0, q0), (r1, q1) in zip(front, front[1:]):
    if r0 < recall <= r1:
      return q0 + (q1 - q0) * (recall - r0) / (r1 - r0)
  return None


def summarise(source, rows, target_recall, target_qps):
  out = {}
  for kind in ("single", "multi"):
    sc = [r for r in rows if r["kind"] == kind and r["method"].startswith("ScaNN")
          and "profile" not in r["method"]]
    hn = [r for r in rows if r["kind"] == kind and r["method"].startswith("hnswlib")]
    ok = [r for r in sc if r["recall"] >= target_recall]
    best = max(ok, key=lambda r: r["qps"]) if ok else max(sc, key=lambda r: r["recall"],
                                                           default=None)
    if best is None:
      continue
    h = qps_at_recall(hn, best["recall"]) if hn else None
    out[kind] = dict(best_scann=best, reached=bool(ok), hnswlib_qps_at_same_recall=h,
                     speedup_vs_hnswlib=(best["qps"] / h) if h else None,
                     meets_target=bool(ok) and best["qps"] >= target_qps
                     and (h is None or best["qps"] >= 3 * h))
  return out


def markdown(results) -> str:
  lines = []
  for src in results["sources"]:
    lines.append(f"\n### {src['name']} ({src['num_items']:,} x {src['dim']}, "
                 f"{src['num_queries']:,} queries, recall on {src['recall_queries']:,})\n")
    lines.append("| method | setting | queries | recall@10 | queries/s (threads) | q/s 1 thread "
                 "| build s | index MiB |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in src["rows"]:
      if r["kind"] == "profile":
        continue
      one = "" if r.get("qps_1thread") is None else f"{r['qps_1thread']:,.0f}"
      build = "" if r.get("build_s") is None else f"{r['build_s']:.0f}"
      size = "" if r.get("index_bytes") is None else f"{r['index_bytes'] / 2**20:.0f}"
      lines.append(f"| {r['method']} | {r['setting']} | {r['kind']} | {r['recall']:.4f} | "
                   f"{r['qps']:,.0f} | {one} | {build} | {size} |")
    for r in src["rows"]:
      if r["kind"] == "profile":
        lines.append(f"\nProfile {r['method']} {r['setting']}: tree {r['tree_us']:.1f} us, "
                     f"AH {r['ah_us']:.1f} us, reorder {r['reorder_us']:.1f} us per query "
                     f"per core (total {r['total_us']:.1f}).")
    for kind, s in src["summary"].items():
      b = s["best_scann"]
      h = s["hnswlib_qps_at_same_recall"]
      hnsw = "not reached" if h is None else f"{h:,.0f} q/s (x{b['qps'] / h:.1f})"
      which = "fastest ScaNN at recall >= 0.95" if s["reached"] else "closest ScaNN (max recall)"
      lines.append(
          f"\n**{kind}**: {which}: {b['method']} {b['setting']}: recall "
          f"{b['recall']:.4f}, {b['qps']:,.0f} q/s; hnswlib at that recall: {hnsw}; "
          f"target met: {s['meets_target']}")
    t = src.get("autotune")
    if t and "error" in t:
      lines.append(f"\n**autotune** (target recall@10 {t['target_recall']}): {t['error']}")
    elif t:
      c = t["config"]
      lines.append(
          f"\n**autotune** (target recall@10 {t['target_recall']}, multi-interest users, "
          f"{len(t['curve'])} settings, {t['tune_s']:.0f} s): {c['num_leaves']} leaves, search "
          f"{c['num_leaves_to_search']}, reorder {c['reorder_k']}: recall {t['recall']:.4f} "
          f"(accepted with margin {t['margin']:.4f}), {t['queries_per_s']:,.0f} users/s on one "
          f"thread, build {t['build_time_s']:.0f} s, index {t['index_bytes'] / 2**20:.0f} MiB")
  return "\n".join(lines)


def bench_autotune(items, multi, mask, args) -> dict:
  """retrieval.autotune on the multi-interest queries: the chosen setting, build time, index size."""
  grid = [retrieval.IndexConfig(num_leaves=nl, num_leaves_to_search=max(1, int(round(nl * f))),
                                reorder_k=r)
          for nl in args.scann_leaves for f in args.leaf_fracs for r in args.reorders]
  n = args.recall_queries
  _log(f"autotune target {args.autotune}: {len(grid)} settings, {n} users")
  t0 = time.perf_counter()
  try:
    res = retrieval.autotune(items, multi[:n], args.autotune, _K, candidates=grid,
                             query_mask=mask[:n], repeats=args.repeats)
  except ValueError as e:  # no setting of the grid reaches the target: keep the other results
    _log(f"autotune: {e}")
    return {"target_recall": args.autotune, "error": str(e), "tune_s": time.perf_counter() - t0}
  out = res.as_dict()
  out["tune_s"] = time.perf_counter() - t0
  _log(f"autotune chose {out['config']}: recall {res.recall:.4f} (margin {res.margin:.4f}), "
       f"{res.queries_per_s:,.0f} users/s 1 thread, build {res.build_time_s:.0f} s, "
       f"{res.index_bytes / 2**20:.0f} MiB; tuning took {out['tune_s']:.0f} s")
  return out


def machine_info(threads: int) -> dict:
  model = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  versions = {}
  for pkg in ("jax", "jaxlib", "numpy", "scann", "hnswlib", "faiss-cpu"):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = None
  return dict(host=socket.gethostname(), cpu_model=model, cores=os.cpu_count(),
              cores_usable=len(os.sched_getaffinity(0)), threads=threads,
              python=platform.python_version(), versions=versions)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--num_items", type=int, default=1_000_000)
  p.add_argument("--num_queries", type=int, default=10_000)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--recall_queries", type=int, default=2000,
                 help="queries with exact ground truth (recall is measured on these)")
  p.add_argument("--exact_queries", type=int, default=1000,
                 help="queries the exact JAX search is timed on")
  p.add_argument("--sources", default="world,gaussian")
  p.add_argument("--world_topics", type=int, default=200)
  p.add_argument("--trained_config", default="experiments/configs/mind_synthetic_1m.py",
                 help="source 'trained': the config of the trained model")
  p.add_argument("--trained_workdir", default="runs/mind_synth_1m",
                 help="source 'trained': its workdir (train it with mvhan-train first)")
  p.add_argument("--scann_leaves", default=None,
                 help="comma list of tree sizes (default sqrt(n) and 2 sqrt(n))")
  p.add_argument("--leaf_fracs", default="0.005,0.01,0.02,0.04,0.08",
                 help="leaves_to_search as fractions of num_leaves")
  p.add_argument("--reorders", default="40,100,250", help="reorder_k values")
  p.add_argument("--single_thread", type=int, default=1,
                 help="also time ScaNN's single-threaded search_batched per setting")
  p.add_argument("--int8", type=int, default=1, help="also build a tree with int8 reorder")
  p.add_argument("--soar", type=int, default=0, help="also build a SOAR-spilled tree")
  p.add_argument("--hnsw_m", default="16,32")
  p.add_argument("--hnsw_ef", default="40,80,160,320,640")
  p.add_argument("--faiss", type=int, default=1)
  p.add_argument("--profile", type=int, default=1)
  p.add_argument("--autotune", type=float, default=0.0,
                 help="also run retrieval.autotune for this recall@10 target on the multi-interest "
                      "queries (grid: --scann_leaves x --leaf_fracs x --reorders); 0 = off")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--batch", type=int, default=256, help="ScaNN parallel batch size")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--machine", default=None, help="name in the output file (default: host)")
  p.add_argument("--out_dir", default=os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench")))
  args = p.parse_args()
  root = int(round(np.sqrt(args.num_items)))
  args.scann_leaves = ([int(x) for x in args.scann_leaves.split(",")] if args.scann_leaves
                       else [root, 2 * root])
  args.leaf_fracs = [float(x) for x in args.leaf_fracs.split(",")]
  args.reorders = [int(x) for x in args.reorders.split(",")]
  args.hnsw_m = [int(x) for x in args.hnsw_m.split(",") if x]
  args.hnsw_ef = [int(x) for x in args.hnsw_ef.split(",") if x]
  if args.recall_queries > args.num_queries:
    args.recall_queries = args.num_queries

  results = dict(command=" ".join(["python"] + sys.argv), machine=machine_info(args.threads),
                 args={k: v for k, v in vars(args).items()}, started=time.strftime("%F %T"),
                 load_start=os.getloadavg(), sources=[])
  for src in args.sources.split(","):
    _log(f"source {src}: {args.num_items} x {args.dim}")
    if src == "trained":
      items, single, multi, mask = trained_vectors(args.trained_config, args.trained_workdir,
                                                   args.num_queries, args.seed + 1)
      if items.shape != (args.num_items, args.dim):
        raise ValueError(f"the trained model has {items.shape[0]} x {items.shape[1]} item vectors: "
                         f"pass --num_items={items.shape[0]} --dim={items.shape[1]}")
    else:
      if src == "world":
        items, topics, prior = world_items(args.num_items, args.dim, args.world_topics, args.seed)
      elif src == "gaussian":
        items, topics, prior = gaussian_items(args.num_items, args.dim, 1000, args.seed)
      else:
        raise ValueError(f"--sources: unknown source {src!r}; use world, gaussian and/or trained")
      single, multi, mask = user_queries(topics, prior, args.num_queries, args.seed + 1)
    gt_n = args.recall_queries
    gt_single, gt_multi, rows = bench_exact(items, single, multi, mask, gt_n, args)
    rows += bench_scann(items, single, multi, mask, gt_single, gt_multi, args)
    if args.hnsw_m:
      rows += bench_hnswlib(items, single, multi, mask, gt_single, gt_multi, args)
    if args.faiss:
      rows += bench_faiss(items, single, gt_single, args)
    tuned = bench_autotune(items, multi, mask, args) if args.autotune else None
    results["sources"].append(dict(autotune=tuned,
        name=src, command=results["command"], machine=results["machine"],
        load_start=results["load_start"], num_items=args.num_items, dim=args.dim,
        num_queries=args.num_queries,
        recall_queries=gt_n, rows=rows, load_end=os.getloadavg(),
        summary=summarise(src, rows, 0.95, 25_000)))
    del items
  results["load_end"] = os.getloadavg()
  md = markdown(results)
  print(md)
  os.makedirs(args.out_dir, exist_ok=True)
  machine = args.machine or socket.gethostname()
  path = os.path.join(args.out_dir, f"ann_{machine}.json")
  if os.path.exists(path):
    # Runs of different sources (e.g. the two halves of the full benchmark) share one file:
    # keep the other sources' results, each with its own command, machine and load.
    with open(path) as f:
      old = json.load(f)
    if old.get("args", {}).get("num_items") == args.num_items:
      mine = {s["name"] for s in results["sources"]}
      results["sources"] = [s for s in old.get("sources", []) if s["name"] not in mine] + \
          results["sources"]
  with open(path, "w") as f:
    json.dump(results, f, indent=1, default=float)
  _log(f"wrote {path}")


if __name__ == "__main__":
  main()
