"""SEMINAR's modules (arXiv 2407.10714): the shared (query, item) embedder, the pretraining search
unit (PSU) and the downstream two-stage model (GSU top-K + ESU target attention + MLP).

Shapes: B batch, L history length, C candidates per row, M modalities, d = ``dim``, Q query length,
H heads, K top-K positions, dh = ``head_dim``.

Embedder (paper Sec. "multi-modal (query, item) pair"):
  e_m(i)   = modality m embedding of item i: m = 0 a learned id table, m >= 1 Dense(d) of the
             item's fixed vector (text, image / genre)                                   [.., M, d]
  w        = softmax(gate_logits) [M]: one learned gate for all items. A per-item gate would break
             the factorised multi-modal score sum_i sum_j w_i w_j <q_i, k_j> that PQ needs.
  item(i)  = sum_m w_m e_m(i)
  query    = masked mean of the keyword embeddings (0 = padding)                          [.., d]
  pair key = alpha * query + (1 - alpha) * e_m(i) per modality for a search event, e_m(i) for a
             browsing event (no query: the item embedding alone, not alpha * 0 + ...), so that
             sum_m w_m key_m = alpha * query + (1 - alpha) * item (weights sum to 1).
Downstream (TWIN-style, GSU and ESU share the per-head query projection W_h):
  GSU: score_h(l) = sum_i sum_j w_i w_j <W_h e_i(target), key_j(l)> over the whole history, top-K
       positions per head (`mvhan_jax.models.pq`: exact, or from the PQ codes of the history's
       items and keywords, see `SeminarModel`; by default the PQ scores pick ``pq_candidates``
       positions and their exact scores the top-K). The selection is not differentiable
       (stop-gradient on its scores).
  ESU: target attention over the K positions with the exact score / sqrt(d), values V_h pair(l).
  out: MLP(128, 64, 1) of [item(target), ESU heads] -> a logit per candidate.
Candidates of one row are folded into the head axis of the pq functions ([B, C * H, ...]) so a
history's keys are computed once for all its candidates.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvhan_jax.features import DataSpec
from mvhan_jax.models import pq

ATTENTION = ("exact", "pq")
# How attention='pq' scores the history (``SeminarModel.pq_scoring``): 'rescored' = the 'decoded'
# PQ scores select ``pq_candidates`` positions per query, whose exact scores pick the top-K;
# 'decoded' / 'lut' = PQ scores of the quantised keys (dot products with decoded keys / table
# look-ups, equal up to rounding); 'sdc' = the paper's symmetric form, queries quantised too
# (centroid-centroid tables).
PQ_SCORING = ("rescored", "decoded", "lut", "sdc")


class Embedder(nn.Module):
  """Shared by the PSU and the downstream model (the downstream restores it from the PSU)."""

  num_items: int
  num_keywords: int
  dim: int
  modality_keys: tuple[str, ...]  # the tables of the non-id modalities, in modality order
  alpha: float = 0.5

  @property
  def num_modalities(self) -> int:
    return 1 + len(self.modality_keys)

  def setup(self):
    init = nn.initializers.normal(self.dim ** -0.5)
    self.item_embed = nn.Embed(self.num_items, self.dim, embedding_init=init)
    self.keyword_embed = nn.Embed(max(self.num_keywords, 1), self.dim, embedding_init=init)
    self.projections = [nn.Dense(self.dim, name=f"proj_{k}") for k in self.modality_keys]
    self.gate_logits = self.param("gate_logits", nn.initializers.zeros, (self.num_modalities,))

  def gate(self):
    """w [M]: softmax over modalities."""
    return jax.nn.softmax(self.gate_logits)

  def modalities(self, items, tables):
    """items int [...] -> [..., M, d]."""
    views = [self.item_embed(items)]
    for key, proj in zip(self.modality_keys, self.projections):
      views.append(proj(jnp.take(tables[key], items, axis=0)))
    return jnp.stack(views, axis=-2)

  def query(self, query_ids, keyword_table=None):
    """query_ids int [..., Q] -> (mean keyword embedding [..., d], has_query bool [...]).

    ``keyword_table`` [V, d] replaces the learned keyword table (the PQ-decoded one)."""
    mask = query_ids > 0
    table = self.keyword_embed.embedding if keyword_table is None else keyword_table
    emb = jnp.take(table, query_ids, axis=0) * mask[..., None]
    n = mask.sum(-1)
    return emb.sum(-2) / jnp.maximum(n, 1)[..., None], n > 0

  def catalogue(self, tables):
    """The vectors PQ quantises: every item's modalities [N, M, d] and the keyword table [V, d]."""
    return self.modalities(jnp.arange(self.num_items), tables), self.keyword_embed.embedding

  def pair_keys(self, modal, query, has_query):
    """Per-modality pair keys [..., M, d] (see the module docstring)."""
    mixed = self.alpha * query[..., None, :] + (1.0 - self.alpha) * modal
    return jnp.where(has_query[..., None, None], mixed, modal)

  def fuse(self, x):
    """[..., M, d] -> [..., d] with the gate weights."""
    return jnp.einsum("...md,m->...d", x, self.gate())

  def __call__(self, items, query_ids, tables):
    modal = self.modalities(items, tables)
    q, has_q = self.query(query_ids)
    return self.pair_keys(modal, q, has_q), self.gate()


def embedder_from_config(cfg, spec: DataSpec) -> Embedder:
  """``spec``: `SeminarData.spec` (its modality_names[0] is the learned id table)."""
  return Embedder(num_items=spec.num_items, num_keywords=spec.num_keywords, dim=cfg.model.dim,
                  modality_keys=tuple(spec.modality_names[1:]), alpha=cfg.model.alpha)


class PSU(nn.Module):
  """Pretraining search unit: the embedder plus a next-pair predictor over a causal mean context.

  ``__call__(batch, neg_items, tables)`` with batch['history_item'] [B, L], ['history_query']
  [B, L, Q], neg_items int [B, L] (a random item per position) returns the tensors the three
  objectives need (`mvhan_jax.seminar.losses`).
  """

  embedder: Embedder

  @nn.compact
  def __call__(self, batch, neg_items, tables):
    emb = self.embedder
    items, queries = batch["history_item"], batch["history_query"]
    modal = emb.modalities(items, tables)                                   # [B, L, M, d]
    q, has_q = emb.query(queries)
    pair = emb.fuse(emb.pair_keys(modal, q, has_q))                         # [B, L, d]
    valid = jnp.arange(items.shape[1])[None, :] < batch["history_len"][:, None]
    w = valid.astype(pair.dtype)[..., None]
    ctx = jnp.cumsum(pair * w, axis=1) / jnp.maximum(jnp.cumsum(w, axis=1), 1.0)
    pred = nn.Dense(emb.dim, name="predictor")(ctx)
    neg_pair = emb.fuse(emb.pair_keys(emb.modalities(neg_items, tables), q, has_q))
    return {"modal": modal, "query": q, "has_query": has_q, "item": emb.fuse(modal), "pair": pair,
            "pred": pred, "neg_pair": neg_pair, "valid": valid}


class SeminarModel(nn.Module):
  """The downstream model; ``__call__(batch, candidates, tables, codebooks, attention)`` -> logits
  [B, C]. ``codebooks`` [M + 1, C_pq, 256, d / C_pq] is used when ``attention == 'pq'``: rows
  0..M-1 quantise the item modalities, row M the keywords.

  PQ attention quantises the catalogue, not the sequence: the N items' modality vectors and the V
  keyword vectors are encoded once per call (N M + V vectors) and a position's codes are gathered
  by item / keyword id, as an index built offline over the item vectors would store them. A pair
  key is linear in its item and keyword vectors, so its PQ score is exact table look-ups of those
  codes (`pq.pair_pq_scores`). Encoding the B L M pair keys themselves instead costs B L / N times
  more (32x on the synthetic world; 4 s of a 4.3 s CPU step).
  """

  embedder: Embedder
  heads: int = 4
  top_k: int = 32
  head_dim: int = 16
  mlp: Sequence[int] = (128, 64)
  pq_scoring: str = "rescored"  # one of PQ_SCORING. 'lut': pq.pq_topk's table look-ups; 'decoded':
  # the same scores as exact dot products with the decoded keys (equal up to rounding; much faster
  # on CPU, where the [B, C * H, L, M * C_pq] gathers of the look-ups dominate the step);
  # 'rescored': 'decoded' selects pq_candidates positions, exact scores on those pick the top-K
  # (recall@32 of the exact top-K 0.93 instead of 0.65 in experiments/bench_seminar_attention.py);
  # 'sdc': queries quantised too, centroid-centroid tables (pq.pair_sdc_scores)
  pq_candidates: int = 128  # R, the PQ candidates re-scored exactly per query ('rescored')

  def setup(self):
    d = self.embedder.dim
    init = nn.initializers.normal(d ** -0.5)
    self.w_query = self.param("w_query", init, (self.heads, d, d))
    self.w_value = self.param("w_value", init, (self.heads, d, self.head_dim))
    self.hidden = [nn.Dense(n, name=f"mlp_{i}") for i, n in enumerate(self.mlp)]
    self.out = nn.Dense(1, name="mlp_out")

  def encode_history(self, batch, tables):
    """keys [B, L, M, d], fused pairs [B, L, d], mask [B, L]."""
    emb = self.embedder
    items = batch["history_item"]
    modal = emb.modalities(items, tables)
    q, has_q = emb.query(batch["history_query"])
    keys = emb.pair_keys(modal, q, has_q)
    mask = jnp.arange(items.shape[1])[None, :] < batch["history_len"][:, None]
    return keys, emb.fuse(keys), mask

  def pq_codes(self, codebooks, tables):
    """Catalogue codes: items [N, M, C_pq] and keywords [V, C_pq] (see the class docstring)."""
    m = self.embedder.num_modalities
    if codebooks.shape[0] != m + 1:
      raise ValueError(f"codebooks must be [M + 1 = {m + 1}, C, K, s] (item modalities, then keywords), "
                       f"got {codebooks.shape}: train them with train.train_codebooks")
    items, keywords = jax.lax.stop_gradient(self.embedder.catalogue(tables))
    return pq.multimodal_encode(codebooks[:m], items), pq.encode(codebooks[m], keywords)

  def pq_scores(self, q, batch, codebooks, tables):
    """GSU scores [B, N, L] of queries q [B, N, M, d] against the PQ codes of the history's pairs
    (``pq_scoring``: 'lut' table look-ups, 'decoded' dot products with decoded keys; equal up to
    rounding)."""
    m = self.embedder.num_modalities
    w = self.embedder.gate()
    item_codes, kw_codes = self.pq_codes(codebooks, tables)
    items, queries = batch["history_item"], batch["history_query"]
    if self.pq_scoring == "lut":
      return pq.pair_pq_scores(q, jnp.take(item_codes, items, axis=0), jnp.take(kw_codes, queries, axis=0),
                               queries > 0, codebooks[:m], codebooks[m], w, self.embedder.alpha)
    if self.pq_scoring == "sdc":
      return pq.pair_sdc_scores(pq.multimodal_encode(codebooks[:m], q), jnp.take(item_codes, items, axis=0),
                                jnp.take(kw_codes, queries, axis=0), queries > 0, codebooks[:m], codebooks[m],
                                w, self.embedder.alpha)
    if self.pq_scoring in ("decoded", "rescored"):  # 'rescored': these select the candidates
      modal = jnp.take(pq.multimodal_decode(codebooks[:m], item_codes), items, axis=0)
      qbar, has_q = self.embedder.query(queries, pq.decode(codebooks[m], kw_codes))
      return pq.multimodal_exact_scores(q, self.embedder.pair_keys(modal, qbar, has_q), w)
    raise ValueError(f"config.model.pq_scoring={self.pq_scoring!r} is unknown: use one of {PQ_SCORING}")

  def select(self, q, keys, mask, attention: str, batch=None, codebooks=None, tables=None):
    """GSU: (idx [B, N, K], valid [B, N, K]) for queries q [B, N, M, d] (N = C * H); the exact
    scores use the history keys [B, L, M, d], the PQ scores the codes of the batch's items and
    keywords."""
    k = min(self.top_k, keys.shape[1])
    q, keys = jax.lax.stop_gradient(q), jax.lax.stop_gradient(keys)
    w = jax.lax.stop_gradient(self.embedder.gate())
    if attention == "exact":
      return pq.exact_topk(q, keys, w, mask, k)
    if attention == "pq":
      if codebooks is None:
        raise ValueError("attention='pq' needs codebooks: train them with train.train_codebooks")
      approx = jax.lax.stop_gradient(self.pq_scores(q, batch, codebooks, tables))
      if self.pq_scoring == "rescored":  # exact scores of the PQ candidates only
        qw, fused = self.embedder.fuse(q), self.embedder.fuse(keys)
        return pq.rescored_topk(approx, mask, k, self.pq_candidates,
                                lambda cand: pq.fused_candidate_scores(qw, fused, cand))
      return pq.topk_positions(approx, mask, k)
    raise ValueError(f"config.model.attention={attention!r} is unknown: use one of {ATTENTION}")

  def __call__(self, batch, candidates, tables, codebooks=None, attention: str = "exact",
               return_selection: bool = False):
    emb = self.embedder
    b, c = candidates.shape
    h, d = self.heads, emb.dim
    keys, fused, mask = self.encode_history(batch, tables)
    target = emb.modalities(candidates, tables)                             # [B, C, M, d]
    qh = jnp.einsum("bcmd,hde->bchme", target, self.w_query)               # [B, C, H, M, d]
    qh = qh.reshape(b, c * h, target.shape[-2], d)
    idx, valid = self.select(qh, keys, mask, attention, batch, codebooks, tables)  # [B, CH, K]
    picked = pq.gather_topk(fused, idx)                                    # [B, CH, K, d]
    qf = emb.fuse(qh)                                                      # [B, CH, d]
    logits = jnp.einsum("bnd,bnkd->bnk", qf, picked) / jnp.sqrt(float(d))
    logits = jnp.where(valid, logits, -1e9)
    att = jax.nn.softmax(logits, axis=-1) * valid.any(-1, keepdims=True)
    k = idx.shape[-1]
    values = jnp.einsum("bchkd,hde->bchke", picked.reshape(b, c, h, k, d), self.w_value)
    esu = jnp.einsum("bchk,bchke->bche", att.reshape(b, c, h, k), values).reshape(b, c, h * self.head_dim)
    x = jnp.concatenate([emb.fuse(target), esu], axis=-1)
    for layer in self.hidden:
      x = nn.relu(layer(x))
    out = self.out(x)[..., 0]
    if return_selection:
      return out, (idx, valid)
    return out


def model_from_config(cfg, spec: DataSpec) -> SeminarModel:
  m = cfg.model
  return SeminarModel(embedder=embedder_from_config(cfg, spec), heads=m.heads, top_k=m.top_k,
                      head_dim=m.head_dim, mlp=tuple(m.mlp), pq_scoring=m.get("pq_scoring", "decoded"),
                      pq_candidates=m.get("pq_candidates", 128))
