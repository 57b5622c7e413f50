"""Product quantisation for SEMINAR's approximate attention (mvhan_jax/models/pq.py)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvhan_jax.models import pq

RTOL = 1e-5


def _close(a, b, rtol=RTOL):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.abs(b).max(), 1e-12)
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


def _clustered(seed, n, dim, num_centres, spread=0.3):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_centres, dim)).astype(np.float32)
  labels = rng.integers(0, num_centres, n)
  x = centres[labels] + spread * rng.standard_normal((n, dim)).astype(np.float32)
  return x.astype(np.float32), centres, labels


# ------------------------------------------------------------------------------------------------
# k-means.
# ------------------------------------------------------------------------------------------------


def test_kmeans_recovers_separated_clusters_and_reduces_error():
  rng = np.random.default_rng(0)
  centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [5, 20], [20, 5]], np.float32)
  x = (centres[rng.integers(0, 6, 600)] + 0.2 * rng.standard_normal((600, 2))).astype(np.float32)
  key = jax.random.key(3)
  for init in ("kmeans++", "random"):
    start = pq.kmeans(key, x, 6, iters=0, init=init)
    final = pq.kmeans(key, x, 6, iters=15, init=init)
    assert final.shape == (6, 2)
    assert float(pq.kmeans_error(x, final)) <= float(pq.kmeans_error(x, start)) + 1e-6
  # k-means++ seeding finds all 6 centres: each has a centroid within 0.1 (noise 0.2 / sqrt(100
  # points)), one-to-one. (Lloyd from a random init may stay in a local optimum: not asserted.)
  final = pq.kmeans(key, x, 6, iters=15)
  dist = np.linalg.norm(np.asarray(final)[:, None] - centres[None], axis=-1)
  assert sorted(dist.argmin(axis=1).tolist()) == list(range(6))
  assert dist.min(axis=1).max() < 0.1
  # Deterministic given the key.
  np.testing.assert_array_equal(pq.kmeans(key, x, 6, iters=5), pq.kmeans(key, x, 6, iters=5))
  # This random init puts two seeds in one cluster (4 of 6 centres covered): Lloyd halves the error.
  bad = pq.kmeans(jax.random.key(1), x, 6, iters=0, init="random")
  assert len(set(np.linalg.norm(np.asarray(bad)[:, None] - centres[None], axis=-1).argmin(1))) < 6
  assert (float(pq.kmeans_error(x, pq.kmeans(jax.random.key(1), x, 6, 15, "random")))
          < 0.6 * float(pq.kmeans_error(x, bad)))


def test_kmeans_reseeds_empty_clusters():
  # 3 distinct points, 50 copies each: a random init that picks two copies of the same point leaves
  # a cluster empty forever unless it is re-seeded.
  pts = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], np.float32)
  x = np.repeat(pts, 50, axis=0)
  for seed in range(20):
    init = np.asarray(pq.kmeans(jax.random.key(seed), x, 3, iters=0, init="random"))
    if len({tuple(r) for r in init}) < 3:
      break
  else:
    pytest.skip("no seed with a duplicated initial centroid")
  final = np.asarray(pq.kmeans(jax.random.key(seed), x, 3, iters=5, init="random"))
  assert {tuple(r) for r in final} == {tuple(r) for r in pts}


def test_kmeans_rejects_too_few_points():
  with pytest.raises(ValueError, match="num_centroids"):
    pq.kmeans(jax.random.key(0), np.zeros((10, 2), np.float32), 16)


# ------------------------------------------------------------------------------------------------
# PQ codebooks, encode / decode.
# ------------------------------------------------------------------------------------------------


def test_pq_error_shrinks_with_more_subspaces():
  x, _, _ = _clustered(1, 800, 16, 40, spread=0.5)
  errors = []
  for c in (1, 2, 4, 8):
    cb = pq.train_pq(jax.random.key(0), x, c, num_centroids=16, iters=8)
    assert cb.shape == (c, 16, 16 // c)
    codes = pq.encode(cb, x)
    assert codes.shape == (800, c) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    errors.append(float(jnp.mean(jnp.sum((pq.decode(cb, codes) - x) ** 2, axis=-1))))
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.5 * errors[0], errors


def test_encode_is_nearest_centroid_and_chunking_is_invisible():
  x, _, _ = _clustered(2, 333, 8, 5)
  cb = pq.train_pq(jax.random.key(1), x, 2, num_centroids=8, iters=3)
  codes = np.asarray(pq.encode(cb, x, chunk=None))
  np.testing.assert_array_equal(codes, pq.encode(cb, x, chunk=50))  # 333 = 6 * 50 + 33
  np.testing.assert_array_equal(codes.reshape(3, 111, 2), pq.encode(cb, x.reshape(3, 111, 8)))
  cbn = np.asarray(cb)
  for c in range(2):  # NumPy reference: argmin of squared distance per sub-space
    d2 = ((x[:, None, 4 * c:4 * c + 4] - cbn[c][None]) ** 2).sum(-1)
    assert (codes[:, c] == d2.argmin(-1)).mean() > 0.99  # ties / rounding only
  np.testing.assert_array_equal(np.asarray(pq.decode(cb, codes))[:, 4:], cbn[1][codes[:, 1]])


def test_bad_subspace_count_raises():
  x = np.zeros((300, 10), np.float32)
  with pytest.raises(ValueError, match="num_subspaces"):
    pq.train_pq(jax.random.key(0), x, 4, num_centroids=8)
  cb = jnp.zeros((4, 8, 2))
  with pytest.raises(ValueError, match="num_subspaces"):
    pq.query_lut(cb, jnp.zeros((3, 10)))
  with pytest.raises(ValueError, match="num_subspaces"):
    pq.encode(cb, jnp.zeros((3, 10)))


# ------------------------------------------------------------------------------------------------
# Table scores.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_pq():
  x, _, _ = _clustered(3, 600, 16, 12)
  cb = pq.train_pq(jax.random.key(2), x, 4, num_centroids=32, iters=5)
  return x, cb, pq.encode(cb, x)


def test_lut_scores_equal_decoded_dot_products(single_pq):
  x, cb, codes = single_pq
  q = jax.random.normal(jax.random.key(5), (2, 3, 16))
  lut = pq.query_lut(cb, q)
  assert lut.shape == (2, 3, 4, 32)
  keys = codes.reshape(2, 1, 300, 4)  # per-batch sequences, broadcast over the 3 queries
  ref = jnp.einsum("bhd,bld->bhl", q, pq.decode(cb, codes).reshape(2, 300, 16))
  for chunk in (None, 64, 300, 1000):
    got = pq.lut_scores(lut, keys, chunk=chunk)
    assert got.shape == (2, 3, 300)
    _close(got, ref)
  _close(pq.lut_scores(lut, keys.astype(jnp.uint8), chunk=64), ref)  # uint8 storage
  _close(jax.jit(pq.lut_scores, static_argnames="chunk")(lut, keys, chunk=64), ref)
  # Hand-computed look-up: one position, one query.
  lut_np, codes_np = np.asarray(lut), np.asarray(codes)
  assert np.isclose(float(got[1, 2, 7]), sum(lut_np[1, 2, c, codes_np[307, c]] for c in range(4)),
                    rtol=1e-6)


def test_sdc_scores_equal_decoded_decoded(single_pq):
  x, cb, codes = single_pq
  tables = pq.centroid_tables(cb, cb)
  assert tables.shape == (4, 32, 32)
  q_codes = pq.encode(cb, jax.random.normal(jax.random.key(6), (5, 16)))  # [5, C]
  got = pq.sdc_scores(tables, q_codes, codes[None], chunk=128)  # [5, 600]
  ref = pq.decode(cb, q_codes) @ pq.decode(cb, codes).T
  assert got.shape == (5, 600)
  _close(got, ref)


# ------------------------------------------------------------------------------------------------
# Multi-modal scores.
# ------------------------------------------------------------------------------------------------

B, H, L, M, D, C, K = 2, 4, 150, 3, 16, 4, 32


@pytest.fixture(scope="module")
def multimodal():
  rng = np.random.default_rng(7)
  keys = np.stack([_clustered(10 + m, B * L, D, 10)[0] for m in range(M)], axis=1)  # [B*L, M, D]
  q = rng.standard_normal((B, H, M, D)).astype(np.float32)
  w = np.array([0.5, 0.3, 0.2], np.float32)
  cbs = pq.train_multimodal_pq(jax.random.key(3), keys, C, num_centroids=K, iters=5)
  keys = keys.reshape(B, L, M, D)
  return q, keys, w, cbs, pq.multimodal_encode(cbs, keys)


def test_multimodal_exact_matches_numpy_loop(multimodal):
  q, keys, w, _, _ = multimodal
  ref = np.zeros((B, H, L))
  for b, h, l in itertools.product(range(B), range(H), range(L)):
    ref[b, h, l] = sum(w[i] * w[j] * q[b, h, i] @ keys[b, l, j] for i in range(M) for j in range(M))
  _close(pq.multimodal_exact_scores(q, keys, w), ref)


def test_multimodal_pq_equals_exact_on_decoded_keys(multimodal):
  q, keys, w, cbs, codes = multimodal
  assert cbs.shape == (M, C, K, D // C) and codes.shape == (B, L, M, C)
  decoded = pq.multimodal_decode(cbs, codes)
  ref = pq.multimodal_exact_scores(q, decoded, w)
  for chunk in (None, 64):
    _close(pq.multimodal_pq_scores(q, codes, cbs, w, chunk=chunk), ref)
  # The paper's O(M^2 C) form with quantised queries: decoded queries against decoded keys.
  q_codes = pq.multimodal_encode(cbs, q)
  tables = pq.multimodal_centroid_tables(cbs)
  assert tables.shape == (M, M, C, K, K)
  _close(pq.multimodal_sdc_scores(tables, q_codes, codes, w, chunk=64),
         pq.multimodal_exact_scores(pq.multimodal_decode(cbs, q_codes), decoded, w))
  # And PQ is an approximation of the real keys, not something unrelated.
  exact = np.asarray(pq.multimodal_exact_scores(q, keys, w)).ravel()
  approx = np.asarray(ref).ravel()
  assert np.corrcoef(exact, approx)[0, 1] > 0.9


def test_pair_pq_scores_equal_exact_on_decoded_pair_keys(multimodal):
  """SEMINAR's pair keys from catalogue codes: alpha * mean(decoded keywords) + (1 - alpha) *
  decoded item for a search event, the decoded item for a browsing one; checked against a NumPy
  loop over positions, and the look-ups against a hand sum for one position."""
  q, keys, w, cbs, codes = multimodal
  rng = np.random.default_rng(11)
  nq, alpha = 3, 0.4
  kw_vecs, _, _ = _clustered(20, 200, D, 8)
  kw_cb = pq.train_pq(jax.random.key(4), kw_vecs, C, num_centroids=K, iters=5)
  kw_codes = np.asarray(pq.encode(kw_cb, kw_vecs[rng.integers(0, 200, (B, L, nq))]))  # [B, L, Q, C]
  kmask = rng.random((B, L, nq)) < 0.4
  kmask[:, :10] = False                                       # browsing events
  got = np.asarray(pq.pair_pq_scores(q, codes, kw_codes, kmask, cbs, kw_cb, w, alpha, chunk=64))
  item_dec = np.asarray(pq.multimodal_decode(cbs, codes))     # [B, L, M, D]
  kw_dec = np.asarray(pq.decode(kw_cb, kw_codes))             # [B, L, Q, D]
  ref = np.zeros((B, H, L))
  for b, l in itertools.product(range(B), range(L)):
    n = kmask[b, l].sum()
    key = item_dec[b, l]
    if n:
      key = alpha * kw_dec[b, l][kmask[b, l]].mean(0)[None] + (1 - alpha) * key
    for h in range(H):
      ref[b, h, l] = sum(w[i] * w[j] * q[b, h, i] @ key[j] for i in range(M) for j in range(M))
  assert kmask[:, 10:].any(-1).mean() > 0.5 and not kmask[:, :10].any()
  _close(got, ref)
  # One search position by hand from the tables: item look-ups weighted by w_j, keyword look-ups
  # averaged over the live keywords.
  b, h = 1, 2
  l = int(np.flatnonzero(kmask[b].any(-1))[0])
  qw = np.einsum("md,m->d", q[b, h], w)
  cb, kcb = np.asarray(cbs), np.asarray(kw_cb)
  s = D // C
  item = sum(w[j] * qw[c * s:(c + 1) * s] @ cb[j, c, codes[b, l, j, c]] for j in range(M) for c in range(C))
  live = np.flatnonzero(kmask[b, l])
  query = np.mean([sum(qw[c * s:(c + 1) * s] @ kcb[c, kw_codes[b, l, t, c]] for c in range(C)) for t in live])
  assert np.isclose(got[b, h, l], (1 - alpha) * item + alpha * query, rtol=1e-5)


def test_multimodal_weights_shape_checked(multimodal):
  q, keys, _, _, _ = multimodal
  with pytest.raises(ValueError, match="w"):
    pq.multimodal_exact_scores(q, keys, np.ones(2, np.float32))


# ------------------------------------------------------------------------------------------------
# Top-K positions and gather.
# ------------------------------------------------------------------------------------------------


def test_topk_positions_masks_and_valid_flags():
  rng = np.random.default_rng(0)
  scores = rng.standard_normal((3, 2, 20)).astype(np.float32)
  scores[0, :, 5] = 100.0  # a masked position with the best score must still lose
  lengths = np.array([20, 12, 3])
  mask = np.arange(20)[None] < lengths[:, None]
  mask[0, 5] = False
  idx, valid = pq.topk_positions(scores, mask, 5)
  assert idx.shape == valid.shape == (3, 2, 5) and idx.dtype == jnp.int32 and valid.dtype == bool
  idx, valid = np.asarray(idx), np.asarray(valid)
  for b, h in itertools.product(range(3), range(2)):
    live = np.flatnonzero(mask[b])
    want = live[np.argsort(-scores[b, h, live], kind="stable")][:5]
    np.testing.assert_array_equal(idx[b, h, :len(want)], want)
    np.testing.assert_array_equal(valid[b, h], np.arange(5) < len(want))
    assert mask[b, idx[b, h][valid[b, h]]].all()
  assert 5 not in idx[0]
  with pytest.raises(ValueError, match="k=30"):
    pq.topk_positions(scores, mask, 30)


def test_exact_and_pq_topk_share_interface_and_gather(multimodal):
  q, keys, w, cbs, codes = multimodal
  mask = np.arange(L)[None] < np.array([[L], [20]])
  e_idx, e_valid = pq.exact_topk(q, keys, w, mask, 32)
  p_idx, p_valid = jax.jit(pq.pq_topk, static_argnames=("k", "chunk"))(
      q, codes, cbs, w, mask, k=32, chunk=64)
  assert e_idx.shape == p_idx.shape == (B, H, 32)
  np.testing.assert_array_equal(e_valid, p_valid)
  assert int(np.asarray(e_valid)[1].sum(-1).max()) == 20
  assert (np.asarray(p_idx)[1][np.asarray(p_valid)[1]] < 20).all()
  # On well-clustered keys PQ finds most of the exact top-K.
  assert pq.recall_at_k(np.asarray(p_idx)[0], np.asarray(e_idx)[0]) > 0.6
  g = pq.gather_topk(keys, e_idx)
  assert g.shape == (B, H, 32, M, D)
  np.testing.assert_array_equal(np.asarray(g)[1, 2, 3], keys[1, int(e_idx[1, 2, 3])])


def test_recall_at_k():
  assert pq.recall_at_k(np.array([[1, 2, 3, 4]]), np.array([[4, 3, 9, 8]])) == 0.5
  assert pq.recall_at_k(np.array([[1, 2, 3, 4]]), np.array([[4, 3, 9, 8]]),
                        np.array([[True, True, False, False]])) == 1.0


# ------------------------------------------------------------------------------------------------
# Symmetric (centroid-centroid) scores and the re-scored PQ top-K.
# ------------------------------------------------------------------------------------------------


def test_multimodal_sdc_scores_equal_hand_computed_centroid_products():
  """Tiny example: every score is sum_{i,j,c} w_i w_j <centroid(i, c, qcode), centroid(j, c, kcode)>,
  the dot products written out by hand from the codebooks."""
  rng = np.random.default_rng(0)
  m, c, k, s, b, h, length = 2, 2, 3, 2, 1, 2, 4
  cbs = rng.standard_normal((m, c, k, s)).astype(np.float32)
  w = np.array([0.7, 0.3], np.float32)
  q_codes = rng.integers(0, k, (b, h, m, c))
  k_codes = rng.integers(0, k, (b, length, m, c))
  tables = np.asarray(pq.multimodal_centroid_tables(cbs))
  assert tables.shape == (m, m, c, k, k)
  assert np.isclose(tables[1, 0, 1, 2, 0], cbs[1, 1, 2] @ cbs[0, 1, 0])
  got = np.asarray(pq.multimodal_sdc_scores(tables, q_codes, k_codes, w, chunk=3))
  for hh, l in itertools.product(range(h), range(length)):
    want = sum(w[i] * w[j] * float(cbs[i, cc, q_codes[0, hh, i, cc]] @ cbs[j, cc, k_codes[0, l, j, cc]])
               for i in range(m) for j in range(m) for cc in range(c))
    assert np.isclose(got[0, hh, l], want, rtol=1e-5, atol=1e-6)


def test_pair_sdc_scores_equal_pair_pq_scores_of_decoded_queries(multimodal):
  q, _, w, cbs, codes = multimodal
  rng = np.random.default_rng(12)
  nq, alpha = 2, 0.3
  kw_vecs, _, _ = _clustered(21, 200, D, 8)
  kw_cb = pq.train_pq(jax.random.key(5), kw_vecs, C, num_centroids=K, iters=3)
  kw_codes = np.asarray(pq.encode(kw_cb, kw_vecs[rng.integers(0, 200, (B, L, nq))]))
  kmask = rng.random((B, L, nq)) < 0.5
  q_codes = pq.multimodal_encode(cbs, q)
  got = pq.pair_sdc_scores(q_codes, codes, kw_codes, kmask, cbs, kw_cb, w, alpha, chunk=64)
  ref = pq.pair_pq_scores(pq.multimodal_decode(cbs, q_codes), codes, kw_codes, kmask, cbs, kw_cb, w, alpha)
  _close(got, ref)


def _rescored_reference(approx, exact, mask, k, r):
  """NumPy: per row, the r best live positions by approx (ties: lower index), then their k best by
  exact; slots past the live count are invalid."""
  bsz, heads, length = approx.shape
  idx = np.zeros((bsz, heads, k), np.int64)
  valid = np.zeros((bsz, heads, k), bool)
  for b, h in itertools.product(range(bsz), range(heads)):
    live = np.flatnonzero(mask[b])
    cand = live[np.argsort(-approx[b, h, live], kind="stable")][:r]
    top = cand[np.argsort(-exact[b, h, cand], kind="stable")][:k]
    idx[b, h, :len(top)] = top
    valid[b, h, :len(top)] = True
  return idx, valid


def test_rescored_topk_equals_numpy_reference_and_is_exact_with_every_candidate(multimodal):
  q, keys, w, cbs, codes = multimodal
  mask = np.arange(L)[None] < np.array([[L], [40]])
  approx = np.asarray(pq.multimodal_pq_scores(q, codes, cbs, w))
  kw = np.einsum("blmd,m->bld", keys, w)
  qw = np.einsum("bhmd,m->bhd", q, w)
  exact = np.einsum("bhd,bld->bhl", qw, kw)
  _close(pq.fused_exact_scores(q, kw, w), exact)
  _close(pq.multimodal_exact_scores(q, keys, w), exact)
  fn = jax.jit(lambda a, m_, r: pq.rescored_topk(a, m_, 8, r, lambda c: pq.fused_candidate_scores(qw, kw, c)),
               static_argnums=2)
  for r in (8, 20, 64):
    idx, valid = fn(approx, mask, r)
    want_idx, want_valid = _rescored_reference(approx, exact, mask, 8, r)
    np.testing.assert_array_equal(np.asarray(valid), want_valid)
    np.testing.assert_array_equal(np.where(want_valid, np.asarray(idx), -1), np.where(want_valid, want_idx, -1))
  # The candidate scores are the exact fused dot products of the gathered positions.
  cand = np.array([[[0, 5, 149]] * H, [[3, 3, 7]] * H], np.int32)
  _close(pq.fused_candidate_scores(qw, kw, cand), np.take_along_axis(exact, cand, -1))
  # Every key a candidate (R = L, or more): the exact top-K, recall 1.0, whatever approx says.
  e_idx, e_valid = pq.exact_topk(q, keys, w, mask, 32)
  noise = np.random.default_rng(1).standard_normal(approx.shape).astype(np.float32)
  for r in (L, 10 * L):
    idx, valid = pq.rescored_topk(noise, mask, 32, r, lambda c: pq.fused_candidate_scores(qw, kw, c))
    np.testing.assert_array_equal(np.asarray(valid), np.asarray(e_valid))
    assert pq.recall_at_k(np.asarray(idx), np.asarray(e_idx), np.asarray(e_valid)) == 1.0
  # And re-scoring a few PQ candidates recovers more of the exact top-K than the PQ top-K itself.
  p_idx, _ = pq.pq_topk(q, codes, cbs, w, mask, 32)
  r_idx, _ = pq.rescored_topk(approx, mask, 32, 64, lambda c: pq.fused_candidate_scores(qw, kw, c))
  assert (pq.recall_at_k(np.asarray(r_idx)[0], np.asarray(e_idx)[0])
          > pq.recall_at_k(np.asarray(p_idx)[0], np.asarray(e_idx)[0]))
