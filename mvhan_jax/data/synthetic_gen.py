"""A seeded synthetic recommendation world whose ground truth is known.

The world (all sizes from `WorldConfig`; T topics, d = d_latent, C types, S scenarios):
- T unit topic vectors in R^d with a Dirichlet popularity prior over topics.
- Items: one content type and one topic each; latent = topic vector + noise; a popularity rank
  within their (type, topic) group (Zipf); type-specific fields (`KNOWN_ITEM_FIELDS`); "text" and
  "image" vectors = two differently rotated noisy views of the latent vector.
- Users: 1..K interest topics (drawn by topic popularity, without replacement) with Dirichlet
  weights, slot 0 = the largest weight (the primary interest); profile fields (age, gender, region)
  that follow the primary interest with probability `profile_strength`.
- Exposure events, time-ordered per user: an interest slot is redrawn by weight with probability
  1 - `interest_persistence` (a new session, long time gap), else kept (short gap); with
  probability `noise_fraction` the topic is uniform random instead (slot -1). Then a type by
  `interaction_share`, a scenario by p(scenario | type), an item of that (type, topic) by Zipf
  popularity, a query for search events, a click with probability depending on the user-item
  affinity and scenario, and a conversion given the click.

Affinity(u, i) = max over u's interests k of cos(topic_vector[k], latent[i]).

Randomness: every piece draws from its own stream ``default_rng([seed, purpose, block])``, so a
block of items or users is generated identically in memory (`generate_world`) or streamed to disk
(`write_world` in `synthetic_io.py`) with any shard size.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from mvhan_jax.data.synthetic_config import KNOWN_ITEM_FIELDS, WorldConfig
from mvhan_jax.data.types import InteractionData

__all__ = ["SyntheticWorld", "WorldSkeleton", "generate_world", "make_skeleton", "true_probabilities",
           "generate_item_block", "generate_user_block", "item_vocab", "user_vocab", "PROFILE_FIELDS"]

PROFILE_FIELDS = ("age", "gender", "region")

# Stream purposes: the second entry of every seed list.
_GLOBAL, _SKELETON, _ITEMS, _USERS = 0, 1, 2, 3


def _rng(cfg: WorldConfig, purpose: int, block: int = 0) -> np.random.Generator:
  return np.random.default_rng([cfg.seed, purpose, block])


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
  """A uniformly random orthogonal matrix [n, n] (QR with the sign fix)."""
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return (q * np.sign(np.diag(r))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WorldSkeleton:
  """Everything global: small tables plus the per-item type / topic / popularity rank.

  Shapes: T topics, N items, C types, S scenarios, G = C * T groups (group g = type * T + topic).
  """

  config: WorldConfig
  topic_vectors: np.ndarray     # float32 [T, d], unit rows
  topic_prior: np.ndarray       # float64 [T], topic popularity (sums to 1)
  topic_category: np.ndarray    # int32 [T] in [0, num_categories)
  topic_genre: np.ndarray       # int32 [T] in [0, num_genres)
  topic_age: np.ndarray         # int32 [T] preferred age bucket in [0, num_age_buckets)
  topic_gender: np.ndarray      # float64 [T] p(gender = 2 | primary topic)
  topic_region: np.ndarray      # int32 [T] preferred region in [0, num_regions)
  text_rotation: np.ndarray     # float32 [text_dim, text_dim], orthogonal
  image_rotation: np.ndarray    # float32 [image_dim, image_dim], orthogonal
  scenario_vectors: np.ndarray  # float32 [S, d], unit rows: scenario-specific conversion taste
  scenario_given_type: np.ndarray  # float64 [C, S], rows sum to 1 (0 rows for types without events)
  item_type: np.ndarray         # int8 [N] in [0, C)
  item_topic: np.ndarray        # int32 [N] in [0, T)
  item_rank: np.ndarray         # int32 [N] popularity rank within the item's group (0 = top)
  group_offsets: np.ndarray     # int64 [G + 1]
  items_by_group: np.ndarray    # int32 [N], group g's items by rank at [offsets[g], offsets[g+1])
  zipf_prefix: np.ndarray       # float64 [max group size + 1], prefix sums of (r + 1)^-s

  def topic_keywords(self, topic: int) -> np.ndarray:
    """The keyword ids a query about ``topic`` may contain: int32 [keywords_per_topic]."""
    k = self.config.keywords_per_topic
    return np.arange(1 + topic * k, 1 + (topic + 1) * k, dtype=np.int32)

  def topic_tags(self, topic: int) -> np.ndarray:
    """The tag ids of ``topic`` (items may also get a `field_noise` share of random tags)."""
    k = self.config.tags_per_topic
    return np.arange(1 + topic * k, 1 + (topic + 1) * k, dtype=np.int32)


def make_skeleton(cfg: WorldConfig) -> WorldSkeleton:
  """Global tables (stream ``[seed, 0]``) and the item skeleton (stream ``[seed, 1]``).

  Memory is O(N) small ints (about 30 bytes per item at peak), fine for 10^7 items.
  """
  T, d, C, S, N = cfg.num_topics, cfg.d_latent, len(cfg.types), len(cfg.scenarios), cfg.num_items
  g = _rng(cfg, _GLOBAL)
  tv = g.standard_normal((T, d))
  tv /= np.linalg.norm(tv, axis=1, keepdims=True)
  prior = g.dirichlet(np.full(T, cfg.topic_concentration))
  # Dirichlet with small concentration can underflow to exact zeros; keep every topic reachable.
  prior = np.maximum(prior, 1e-12)
  prior /= prior.sum()
  topic_category = g.integers(0, cfg.num_categories, T).astype(np.int32)
  topic_genre = g.integers(0, cfg.num_genres, T).astype(np.int32)
  topic_age = g.integers(0, cfg.num_age_buckets, T).astype(np.int32)
  topic_gender = g.beta(0.5, 0.5, T)  # skewed towards 0 or 1 so gender carries signal
  topic_region = g.integers(0, cfg.num_regions, T).astype(np.int32)
  text_rot = _orthogonal(g, cfg.text_dim)
  image_rot = _orthogonal(g, cfg.image_dim)
  sv = g.standard_normal((S, d))
  sv /= np.linalg.norm(sv, axis=1, keepdims=True)
  sgt = np.array([[s.type_weights.get(t.name, 0.0) for s in cfg.scenarios] for t in cfg.types],
                 dtype=np.float64)
  tot = sgt.sum(axis=1, keepdims=True)
  sgt = np.divide(sgt, tot, out=np.zeros_like(sgt), where=tot > 0)

  # Item skeleton. The first C*T items (in a random order) cover every (type, topic) group once,
  # so group sampling never hits an empty group; the rest draw type by item_share and topic
  # uniformly.
  k = _rng(cfg, _SKELETON)
  G = C * T
  grp = np.empty(N, dtype=np.int32)
  grp[:G] = np.arange(G, dtype=np.int32)
  type_p = np.array([t.item_share for t in cfg.types])
  rest = N - G
  grp[G:] = (k.choice(C, size=rest, p=type_p).astype(np.int32) * T
             + k.integers(0, T, rest, dtype=np.int32))
  grp = grp[k.permutation(N)]
  # Popularity rank within a group: a random order, so ids carry no popularity information.
  key = k.random(N)
  order = np.lexsort((key, grp)).astype(np.int32)
  del key
  counts = np.bincount(grp, minlength=G)
  offsets = np.zeros(G + 1, dtype=np.int64)
  np.cumsum(counts, out=offsets[1:])
  rank = np.empty(N, dtype=np.int32)
  rank[order] = (np.arange(N, dtype=np.int64) - offsets[grp[order]]).astype(np.int32)
  ranks = np.arange(1, counts.max() + 1, dtype=np.float64)
  zipf_prefix = np.concatenate([[0.0], np.cumsum(ranks ** -cfg.zipf_exponent)])
  return WorldSkeleton(
      config=cfg, topic_vectors=tv.astype(np.float32), topic_prior=prior,
      topic_category=topic_category, topic_genre=topic_genre, topic_age=topic_age,
      topic_gender=topic_gender, topic_region=topic_region, text_rotation=text_rot,
      image_rotation=image_rot, scenario_vectors=sv.astype(np.float32), scenario_given_type=sgt,
      item_type=(grp // T).astype(np.int8), item_topic=(grp % T).astype(np.int32), item_rank=rank,
      group_offsets=offsets, items_by_group=order, zipf_prefix=zipf_prefix)


def item_vocab(cfg: WorldConfig) -> dict[str, int]:
  """Vocab sizes of the integer item features (id 0 = unknown / padding everywhere)."""
  T = cfg.num_topics
  return {"type": len(cfg.types) + 1, "category": cfg.num_categories + 1,
          "tags": T * cfg.tags_per_topic + 1, "author": T * cfg.authors_per_topic + 1,
          "genre": cfg.num_genres + 1, "word_count": cfg.num_buckets + 1,
          "duration": cfg.num_buckets + 1}


def user_vocab(cfg: WorldConfig) -> dict[str, int]:
  return {"age": cfg.num_age_buckets + 1, "gender": 3, "region": cfg.num_regions + 1}


def generate_item_block(sk: WorldSkeleton, start: int, stop: int) -> dict[str, np.ndarray]:
  """Items ``[start, stop)`` (one block, stream ``[seed, 2, start // item_block_size]``).

  Returns (B = stop - start): 'latent' f32 [B, d], 'quality' f32 [B], 'text' f32 [B, text_dim],
  'image' f32 [B, image_dim], 'type' int32 [B] (1-based; 0 never occurs), and every field of
  `KNOWN_ITEM_FIELDS` (int32 [B] or [B, max_tags] for 'tags', 0 where the type lacks the field).
  """
  cfg = sk.config
  bs = cfg.item_block_size
  if start % bs or not (start < stop <= min(start + bs, cfg.num_items)):
    raise ValueError(f"item block [{start}, {stop}) must start on a multiple of item_block_size="
                     f"{bs} and stay inside one block and the catalog")
  r = _rng(cfg, _ITEMS, start // bs)
  B, d, T = stop - start, cfg.d_latent, cfg.num_topics
  topic = sk.item_topic[start:stop]
  typ = sk.item_type[start:stop].astype(np.int32)
  # Every draw below happens for every item regardless of its type, in a fixed order, so the
  # stream stays aligned whatever the schema.
  latent = sk.topic_vectors[topic] + (cfg.item_noise / np.sqrt(d)) * r.standard_normal((B, d))
  latent = latent.astype(np.float32)
  quality = r.standard_normal(B).astype(np.float32)
  text = latent @ sk.text_rotation[:, :d].T + cfg.view_noise * r.standard_normal((B, cfg.text_dim))
  image = latent @ sk.image_rotation[:, :d].T + cfg.view_noise * r.standard_normal((B, cfg.image_dim))

  def noisy(table, vocab):  # topical value, or uniform random with prob field_noise; 1-based
    return np.where(r.random(B) < cfg.field_noise, r.integers(0, vocab, B), table[topic]) + 1

  fields = {"category": noisy(sk.topic_category, cfg.num_categories)}
  # Tags: 1..max_tags distinct tags of the topic (a random permutation's prefix), 0-padded.
  tpt = cfg.tags_per_topic
  pick = np.argsort(r.random((B, tpt)), axis=1)[:, :cfg.max_tags]
  tags = 1 + topic[:, None] * tpt + pick
  rand_tags = r.integers(1, T * tpt + 1, (B, cfg.max_tags))
  tags = np.where(r.random((B, cfg.max_tags)) < cfg.field_noise, rand_tags, tags)
  n_tags = r.integers(1, cfg.max_tags + 1, B)
  tags[np.arange(cfg.max_tags)[None, :] >= n_tags[:, None]] = 0
  fields["tags"] = tags
  fields["author"] = 1 + topic * cfg.authors_per_topic + r.integers(0, cfg.authors_per_topic, B)
  fields["genre"] = noisy(sk.topic_genre, cfg.num_genres)
  fields["word_count"] = r.integers(1, cfg.num_buckets + 1, B)
  fields["duration"] = r.integers(1, cfg.num_buckets + 1, B)
  has = np.array([[f in t.fields for f in KNOWN_ITEM_FIELDS] for t in cfg.types])  # [C, F]
  out = {"latent": latent, "quality": quality, "text": text.astype(np.float32),
         "image": image.astype(np.float32), "type": typ + 1}
  for j, f in enumerate(KNOWN_ITEM_FIELDS):
    mask = has[typ, j]
    v = fields[f].astype(np.int32)
    out[f] = np.where(mask[:, None] if v.ndim == 2 else mask, v, 0).astype(np.int32)
  return out


def affinity(sk: WorldSkeleton, interests: np.ndarray, latent: np.ndarray) -> np.ndarray:
  """max_k cos(topic_vector[interests[:, k]], latent): interests int [B, K] (-1 pad), latent
  f32 [B, d] -> f32 [B]."""
  tv = sk.topic_vectors[np.maximum(interests, 0)]                         # [B, K, d]
  cos = np.einsum("bkd,bd->bk", tv, latent) / np.linalg.norm(latent, axis=1, keepdims=True)
  return np.where(interests >= 0, cos, -np.inf).max(axis=1).astype(np.float32)


def true_probabilities(sk: WorldSkeleton, scenario: np.ndarray, aff: np.ndarray, latent: np.ndarray,
                       quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The ground truth of an exposure: (p(click), p(conversion | click)), each f64 [E].

  ``scenario`` int [E], ``aff`` f32 [E] (`affinity`), ``latent`` f32 [E, d] and ``quality`` f32 [E]
  of the exposed items. Logits as in `ScenarioSpec`; ``<scenario_vector, latent>`` uses the unit
  scenario vector and the normalised item latent (a cosine).
  """
  s_arr = sk.config.scenarios
  spec = np.einsum("ed,ed->e", sk.scenario_vectors[scenario], latent) / np.linalg.norm(latent, axis=1)
  p_click = _sigmoid(np.array([s.click_bias for s in s_arr])[scenario]
                     + np.array([s.click_slope for s in s_arr])[scenario] * aff
                     + np.array([s.click_specific for s in s_arr])[scenario] * spec)
  p_conv = _sigmoid(np.array([s.conv_bias for s in s_arr])[scenario]
                    + np.array([s.conv_shared for s in s_arr])[scenario] * (quality + aff)
                    + np.array([s.conv_specific for s in s_arr])[scenario] * spec)
  return p_click, p_conv


def generate_user_block(sk: WorldSkeleton, start: int, stop: int, item_latent: np.ndarray,
                        item_quality: np.ndarray) -> dict[str, np.ndarray]:
  """Users ``[start, stop)`` and their events (stream ``[seed, 3, start // user_block_size]``).

  ``item_latent`` f32 [N, d] and ``item_quality`` f32 [N] are the whole catalog's (clicks and
  conversions depend on them). Returns (B users, E events of this block, in user then time order):
  users: 'interests' int32 [B, K] (-1 pad, slot 0 = largest weight), 'interest_weights' f32 [B, K]
  (0 pad, rows sum to 1), 'age' / 'gender' / 'region' int32 [B] (1-based), 'num_events' int64 [B];
  events: 'user' int32 [E] (global ids), 'item' int32 [E], 'timestamp' int64 [E] (seconds,
  strictly increasing per user), 'scenario' int8 [E], 'click' int8 [E], 'conversion' int8 [E]
  (only where click), 'query' int32 [E, max_query_len] (0 pad; all 0 = browsing event),
  'interest_slot' int8 [E] (the interest that produced the event, -1 = noise), 'affinity' f32 [E].
  """
  cfg = sk.config
  bs = cfg.user_block_size
  if start % bs or not (start < stop <= min(start + bs, cfg.num_users)):
    raise ValueError(f"user block [{start}, {stop}) must start on a multiple of user_block_size="
                     f"{bs} and stay inside one block and the user set")
  r = _rng(cfg, _USERS, start // bs)
  B, T, K, C = stop - start, cfg.num_topics, cfg.max_interests, len(cfg.types)

  # Interests: Gumbel-top-K = K draws without replacement by topic popularity.
  n_int = r.integers(1, K + 1, B)
  keys = np.log(sk.topic_prior)[None, :] + r.gumbel(size=(B, T))
  top = np.argpartition(-keys, K - 1, axis=1)[:, :K] if K < T else np.argsort(-keys, axis=1)
  live = np.arange(K)[None, :] < n_int[:, None]
  w = np.where(live, r.gamma(cfg.interest_concentration, size=(B, K)), 0.0)
  w /= w.sum(axis=1, keepdims=True)
  order = np.argsort(-w, axis=1, kind="stable")   # slot 0 = primary interest
  interests = np.where(live, top, -1)
  interests = np.take_along_axis(interests, order, axis=1).astype(np.int32)
  w = np.take_along_axis(w, order, axis=1)
  primary = interests[:, 0]

  # Profile: follows the primary interest with prob profile_strength, else uniform.
  follow = r.random((B, 3)) < cfg.profile_strength
  age = np.where(follow[:, 0], sk.topic_age[primary], r.integers(0, cfg.num_age_buckets, B)) + 1
  gender = np.where(follow[:, 1], r.random(B) < sk.topic_gender[primary], r.random(B) < 0.5) + 1
  region = np.where(follow[:, 2], sk.topic_region[primary], r.integers(0, cfg.num_regions, B)) + 1

  # Events: flat over the block, users contiguous.
  n_ev = r.integers(cfg.min_events, cfg.max_events + 1, B)
  E = int(n_ev.sum())
  first = np.zeros(B + 1, dtype=np.int64)
  np.cumsum(n_ev, out=first[1:])
  eu = np.repeat(np.arange(B), n_ev)
  # Interest chain: a fresh slot (by weight) at every switch, carried forward otherwise; the chain
  # starts in its stationary distribution (the weights), so weights = long-run topic shares.
  cw = np.cumsum(w, axis=1)
  fresh = (r.random(E)[:, None] > cw[eu]).sum(axis=1)
  fresh = np.minimum(fresh, n_int[eu] - 1)  # float round-off at the top of the cumsum
  switch = r.random(E) >= cfg.interest_persistence
  switch[first[:-1]] = True
  last = np.maximum.accumulate(np.where(switch, np.arange(E), 0))
  slot = fresh[last]
  noise = r.random(E) < cfg.noise_fraction
  topic = np.where(noise, r.integers(0, T, E), interests[eu, slot])
  slot = np.where(noise, -1, slot).astype(np.int8)

  type_cum = np.cumsum([t.interaction_share for t in cfg.types])
  typ = np.minimum(np.searchsorted(type_cum, r.random(E) * type_cum[-1], side="right"), C - 1)
  sc_cum = np.cumsum(sk.scenario_given_type, axis=1)[typ]          # [E, S]
  scen = np.minimum((r.random(E)[:, None] >= sc_cum).sum(axis=1), len(cfg.scenarios) - 1)
  grp = typ * T + topic
  lo, n_g = sk.group_offsets[grp], sk.group_offsets[grp + 1] - sk.group_offsets[grp]
  rank = np.searchsorted(sk.zipf_prefix, r.random(E) * sk.zipf_prefix[n_g], side="right") - 1
  item = sk.items_by_group[lo + np.minimum(rank, n_g - 1)]

  t0 = r.integers(0, cfg.time_span_s, B)
  gap = 1 + np.floor(np.where(switch, r.exponential(cfg.new_session_gap_s, E),
                              r.exponential(cfg.session_gap_s, E))).astype(np.int64)
  gap[first[:-1]] = 0
  ts = np.cumsum(gap)
  ts = ts - ts[first[:-1]][eu] + t0[eu]

  s_arr = cfg.scenarios
  search = r.random(E) < np.array([s.search_rate for s in s_arr])[scen]
  qlen = r.integers(1, cfg.max_query_len + 1, E)
  query = 1 + topic[:, None] * cfg.keywords_per_topic + r.integers(
      0, cfg.keywords_per_topic, (E, cfg.max_query_len))
  query[(np.arange(cfg.max_query_len)[None, :] >= qlen[:, None]) | ~search[:, None]] = 0

  lat = item_latent[item]
  aff = affinity(sk, interests[eu], lat)
  p_click, p_conv = true_probabilities(sk, scen, aff, lat, item_quality[item])
  click = r.random(E) < p_click
  conv = click & (r.random(E) < p_conv)
  return {
      "interests": interests, "interest_weights": w.astype(np.float32),
      "age": age.astype(np.int32), "gender": gender.astype(np.int32),
      "region": region.astype(np.int32), "num_events": n_ev.astype(np.int64),
      "user": (start + eu).astype(np.int32), "item": item.astype(np.int32),
      "timestamp": ts.astype(np.int64), "scenario": scen.astype(np.int8),
      "click": click.astype(np.int8), "conversion": conv.astype(np.int8),
      "query": query.astype(np.int32), "interest_slot": slot, "affinity": aff,
  }


USER_BLOCK_KEYS = ("interests", "interest_weights", "age", "gender", "region", "num_events")
EVENT_KEYS = ("user", "item", "timestamp", "scenario", "click", "conversion", "query",
              "interest_slot", "affinity")
ITEM_BLOCK_KEYS = ("latent", "quality", "text", "image", "type") + KNOWN_ITEM_FIELDS


@dataclasses.dataclass(frozen=True)
class SyntheticWorld:
  """A whole world in memory. N items, U users, E exposure events (sorted by user, then time).

  Ground truth lives in ``skeleton`` (topic vectors, rotations, item type / topic / rank) and in
  ``items['latent' | 'quality']``, ``users['interests' | 'interest_weights']``.
  ``items``: see `generate_item_block` (arrays over N). ``users``: the user keys of
  `generate_user_block` (arrays over U). ``events``: its event keys (arrays over E);
  ``event_offsets`` int64 [U + 1]: user u's events are ``[event_offsets[u], event_offsets[u+1])``.
  """

  config: WorldConfig
  skeleton: WorldSkeleton
  items: Mapping[str, np.ndarray]
  users: Mapping[str, np.ndarray]
  events: Mapping[str, np.ndarray]
  event_offsets: np.ndarray

  @property
  def num_events(self) -> int:
    return int(self.event_offsets[-1])

  @property
  def item_type(self) -> np.ndarray:
    """int8 [N], 0-based index into ``config.types``."""
    return self.skeleton.item_type

  @property
  def item_topic(self) -> np.ndarray:
    """int32 [N]."""
    return self.skeleton.item_topic

  @property
  def text_vectors(self) -> np.ndarray:
    """float32 [N, text_dim]; latent ~= (text_rotation.T @ text)[:d_latent]."""
    return self.items["text"]

  @property
  def image_vectors(self) -> np.ndarray:
    """float32 [N, image_dim]; latent ~= (image_rotation.T @ image)[:d_latent]."""
    return self.items["image"]

  @property
  def queries(self) -> np.ndarray:
    """int32 [E, max_query_len]; keyword ids (0 pad), an all-zero row is a browsing event."""
    return self.events["query"]

  def exposures(self) -> dict[str, np.ndarray]:
    """The exposure log, one row per event: user, item, timestamp, scenario, click, conversion,
    query (all [E] except query [E, Q]) and 'type' int8 [E] (0-based content type)."""
    keys = ("user", "item", "timestamp", "scenario", "click", "conversion", "query")
    out = {k: self.events[k] for k in keys}
    out["type"] = self.item_type[self.events["item"]]
    return out

  def ground_truth(self) -> dict[str, np.ndarray]:
    """True interests (topic ids [U, K], -1 pad; weights [U, K]), item topic / type / latent /
    popularity rank / quality, topic vectors, view rotations, scenario conversion vectors."""
    sk = self.skeleton
    return {"user_interests": self.users["interests"],
            "user_interest_weights": self.users["interest_weights"],
            "item_topic": sk.item_topic, "item_type": sk.item_type, "item_rank": sk.item_rank,
            "item_latent": self.items["latent"], "item_quality": self.items["quality"],
            "topic_vectors": sk.topic_vectors, "topic_prior": sk.topic_prior,
            "text_rotation": sk.text_rotation, "image_rotation": sk.image_rotation,
            "scenario_vectors": sk.scenario_vectors}

  def user_events(self, user: int) -> dict[str, np.ndarray]:
    """One user's events (each event key sliced), time-ordered."""
    a, b = self.event_offsets[user], self.event_offsets[user + 1]
    return {k: v[a:b] for k, v in self.events.items()}

  def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """True affinity of (user, item) pairs: int [B], int [B] -> f32 [B] in [-1, 1]."""
    return affinity(self.skeleton, self.users["interests"][users], self.items["latent"][items])

  def type_index(self, content_type: str) -> int:
    names = self.config.type_names
    if content_type not in names:
      raise ValueError(f"content_type {content_type!r} is not one of the world's types {names}")
    return names.index(content_type)

  def items_of_type(self, content_type: str) -> np.ndarray:
    """Global ids (int32 [N_c], ascending) of one type's items; the restricted
    `to_interaction_data(content_type)` view's item j is global item ``items_of_type(c)[j]``."""
    return np.flatnonzero(self.item_type == self.type_index(content_type)).astype(np.int32)

  def to_interaction_data(self, content_type: str | None = None,
                          clicks_only: bool = True) -> InteractionData:
    """The retrieval view: user profile features, item features, (clicked) interactions.

    Item features: 'type' (1-based type index), every `KNOWN_ITEM_FIELDS` field (0 where the
    type lacks it), 'text' and 'image' (dense). User features: age, gender, region.
    ``content_type``: keep only that type's items (re-indexed densely, see `items_of_type`) and
    interactions; all users stay. ``clicks_only``: interactions are clicked exposures (implicit
    positives); False keeps every exposure and puts the click label in ``rating``.
    """
    ev = self.events
    keep = ev["click"].astype(bool) if clicks_only else np.ones(self.num_events, bool)
    item_ids = np.arange(self.config.num_items, dtype=np.int32)
    name = "synthetic"
    if content_type is not None:
      c = self.type_index(content_type)
      item_ids = self.items_of_type(content_type)
      keep &= self.item_type[ev["item"]] == c
      name = f"synthetic/{content_type}"
    local = np.full(self.config.num_items, -1, dtype=np.int32)
    local[item_ids] = np.arange(len(item_ids), dtype=np.int32)
    feats = {k: self.items[k][item_ids] for k in ("type",) + KNOWN_ITEM_FIELDS + ("text", "image")}
    return InteractionData(
        name=name, num_users=self.config.num_users, num_items=len(item_ids),
        user_features={k: self.users[k] for k in PROFILE_FIELDS},
        item_features=feats, vocab={**item_vocab(self.config), **user_vocab(self.config)},
        user=ev["user"][keep], item=local[ev["item"][keep]], timestamp=ev["timestamp"][keep],
        rating=None if clicks_only else ev["click"][keep].astype(np.float32))


def generate_world(cfg: WorldConfig) -> SyntheticWorld:
  """Generates the whole world in memory (for small worlds; see `write_world` for big ones)."""
  sk = make_skeleton(cfg)
  blocks = [generate_item_block(sk, a, min(a + cfg.item_block_size, cfg.num_items))
            for a in range(0, cfg.num_items, cfg.item_block_size)]
  items = {k: np.concatenate([b[k] for b in blocks]) for k in ITEM_BLOCK_KEYS}
  del blocks
  ublocks = [generate_user_block(sk, a, min(a + cfg.user_block_size, cfg.num_users),
                                 items["latent"], items["quality"])
             for a in range(0, cfg.num_users, cfg.user_block_size)]
  users = {k: np.concatenate([b[k] for b in ublocks]) for k in USER_BLOCK_KEYS}
  events = {k: np.concatenate([b[k] for b in ublocks]) for k in EVENT_KEYS}
  offsets = np.zeros(cfg.num_users + 1, dtype=np.int64)
  np.cumsum(users["num_events"], out=offsets[1:])
  return SyntheticWorld(cfg, sk, items, users, events, offsets)

