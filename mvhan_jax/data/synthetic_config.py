"""Configuration of the synthetic recommendation world (see `synthetic.py` for the generator).

Every knob that changes the world is a field here, so a config plus its seed names one world exactly.
Block sizes are part of that identity (each block of users / items draws from its own random
stream); shard sizes of the on-disk format are not.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

# Type-specific item fields the generator knows how to draw. Each content type lists a subset;
# an item of a type without the field gets 0 (= unknown / padding) there.
#   category  int32 [N]     coarse topic group (topic -> category map), 1-based
#   tags      int32 [N, M]  1..max_tags tags from the item's topic tag set, 0-padded
#   author    int32 [N]     an author specialised in the item's topic
#   genre     int32 [N]     coarse topic group (a different topic -> genre map)
#   word_count int32 [N]    bucket, independent of the topic
#   duration  int32 [N]     bucket, independent of the topic
KNOWN_ITEM_FIELDS = ("category", "tags", "author", "genre", "word_count", "duration")


@dataclasses.dataclass(frozen=True)
class ContentTypeSpec:
  """One content type.

  ``item_share``: fraction of the catalog of this type. ``interaction_share``: fraction of exposure
  events of this type (clicks follow approximately; scenario click rates modulate them).
  ``fields``: the type's feature schema, a subset of `KNOWN_ITEM_FIELDS`.
  """

  name: str
  item_share: float
  interaction_share: float
  fields: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ScenarioSpec:
  """One scenario (surface / channel) with its type mix and click / conversion behaviour.

  ``type_weights[type]`` sets p(scenario | type) after normalising over scenarios per type, so the
  global type shares stay what `ContentTypeSpec.interaction_share` says while each scenario gets
  its own mix. Click logit = ``click_bias + click_slope * affinity + click_specific *
  <scenario_vector, latent>``; conversion-given-click logit = ``conv_bias + conv_shared * (quality +
  affinity) + conv_specific * <scenario_vector, latent>``: the affinity / quality terms are shared
  across scenarios, the scenario-vector terms are this scenario's own taste (``click_specific``
  defaults to 0, a click curve shared in form by every scenario; with it > 0 scenarios also disagree
  on which items get clicked).
  ``search_rate``: fraction of this scenario's events that are search events (with a query).
  """

  name: str
  type_weights: Mapping[str, float]
  click_bias: float = -2.0
  click_slope: float = 4.0
  conv_bias: float = -1.5
  conv_shared: float = 1.0
  conv_specific: float = 1.5
  search_rate: float = 0.3
  click_specific: float = 0.0


def default_types() -> tuple[ContentTypeSpec, ...]:
  return (
      ContentTypeSpec("article", 0.6, 0.8, ("category", "tags", "author")),
      ContentTypeSpec("novel", 0.25, 0.08, ("genre", "word_count")),
      ContentTypeSpec("short", 0.15, 0.12, ("duration", "tags")),
  )


def default_scenarios() -> tuple[ScenarioSpec, ...]:
  return (
      # Data-rich main feed: nearly all articles, some of everything else.
      ScenarioSpec("feed", {"article": 0.9, "novel": 0.3, "short": 0.4}, -3.0, 4.0, -1.5, 1.0, 1.0, 0.1),
      # Sparse channels: one mostly-novel, one mostly-short, with their own click / conversion curves.
      ScenarioSpec("reading", {"article": 0.05, "novel": 0.7, "short": 0.0}, -3.5, 5.0, -1.0, 1.0, 2.0, 0.5),
      ScenarioSpec("video", {"article": 0.05, "novel": 0.0, "short": 0.6}, -2.5, 3.0, -2.0, 1.0, 2.0, 0.4),
  )


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """All parameters of one synthetic world. Defaults give a small world (fast to build)."""

  num_users: int = 1000
  num_items: int = 5000
  num_topics: int = 50
  max_interests: int = 4          # K: each user has 1..K interest topics
  d_latent: int = 16              # topic / item latent dimension
  types: tuple[ContentTypeSpec, ...] = dataclasses.field(default_factory=default_types)
  scenarios: tuple[ScenarioSpec, ...] = dataclasses.field(default_factory=default_scenarios)
  min_events: int = 20            # exposure events per user, uniform in [min_events, max_events]
  max_events: int = 60
  seed: int = 0

  # Behaviour.
  zipf_exponent: float = 1.1      # popularity within each (type, topic): p(rank r) ~ (r + 1)^-s
  topic_concentration: float = 1.0  # Dirichlet concentration of topic popularity (small = skewed)
  interest_concentration: float = 1.0  # Dirichlet concentration of a user's interest weights
  interest_persistence: float = 0.7  # p(keep the previous event's interest): sessions
  noise_fraction: float = 0.05    # p(an event's topic is uniform random instead of an interest)
  item_noise: float = 0.5         # item latent = topic vector + item_noise * N(0, I / d)
  profile_strength: float = 0.8   # p(a profile field follows the primary interest, else uniform)
  session_gap_s: float = 120.0    # mean gap between events of a session (seconds)
  new_session_gap_s: float = 86400.0  # mean gap when the interest switches (a new session)
  time_span_s: int = 180 * 86400  # users start uniformly in [0, time_span_s)

  # Features.
  num_categories: int = 20
  num_genres: int = 12
  tags_per_topic: int = 8
  max_tags: int = 3
  authors_per_topic: int = 10
  num_buckets: int = 8            # word_count and duration buckets
  field_noise: float = 0.05       # p(category / genre / tag is uniform random instead of topical)
  num_age_buckets: int = 7
  num_regions: int = 10

  # Search.
  keywords_per_topic: int = 20
  max_query_len: int = 5

  # Multi-modal views.
  text_dim: int = 32
  image_dim: int = 32
  view_noise: float = 0.05        # per-coordinate std of the noise added after rotation

  # Random-stream blocks (part of the world's identity; shard size is not).
  item_block_size: int = 65536
  user_block_size: int = 2048

  def __post_init__(self):
    def need(cond, field, msg):
      if not cond:
        raise ValueError(f"WorldConfig.{field}: {msg}")

    for f in ("num_users", "num_items", "num_topics", "max_interests", "d_latent", "min_events",
              "num_categories", "num_genres", "tags_per_topic", "max_tags", "authors_per_topic",
              "num_buckets", "num_age_buckets", "num_regions", "keywords_per_topic", "max_query_len",
              "text_dim", "image_dim", "item_block_size", "user_block_size", "time_span_s"):
      need(int(getattr(self, f)) >= 1, f, f"must be >= 1, got {getattr(self, f)}")
    need(self.max_events >= self.min_events, "max_events",
         f"must be >= min_events={self.min_events}, got {self.max_events}")
    need(self.max_interests <= self.num_topics, "max_interests",
         f"must be <= num_topics={self.num_topics}, got {self.max_interests}")
    need(self.max_tags <= self.tags_per_topic, "max_tags",
         f"must be <= tags_per_topic={self.tags_per_topic}, got {self.max_tags}")
    for f in ("interest_persistence", "noise_fraction", "profile_strength", "field_noise"):
      need(0.0 <= getattr(self, f) <= 1.0, f, f"must lie in [0, 1], got {getattr(self, f)}")
    for f in ("zipf_exponent", "item_noise", "view_noise", "session_gap_s", "new_session_gap_s"):
      need(getattr(self, f) >= 0.0, f, f"must be >= 0, got {getattr(self, f)}")
    for f in ("topic_concentration", "interest_concentration"):
      need(getattr(self, f) > 0.0, f, f"must be > 0, got {getattr(self, f)}")
    for f in ("text_dim", "image_dim"):
      need(getattr(self, f) >= self.d_latent, f,
           f"must be >= d_latent={self.d_latent} so the rotated view keeps the latent vector, "
           f"got {getattr(self, f)}")
    need(self.num_users < 2**31 and self.num_items < 2**31, "num_items", "ids must fit int32")

    # Types.
    need(len(self.types) >= 1, "types", "needs at least one ContentTypeSpec")
    names = [t.name for t in self.types]
    need(len(set(names)) == len(names), "types", f"names must be unique, got {names}")
    for share in ("item_share", "interaction_share"):
      vals = [getattr(t, share) for t in self.types]
      need(all(v >= 0 for v in vals), "types", f"every {share} must be >= 0, got {vals}")
      need(abs(sum(vals) - 1.0) < 1e-6, "types", f"{share} must sum to 1, got {vals} (sum {sum(vals)})")
    for t in self.types:
      need(t.item_share > 0 or t.interaction_share == 0, "types",
           f"type {t.name!r} has interaction_share > 0 but item_share 0: give it items")
      unknown = set(t.fields) - set(KNOWN_ITEM_FIELDS)
      need(not unknown, "types", f"type {t.name!r} has unknown fields {sorted(unknown)}; known: "
           f"{KNOWN_ITEM_FIELDS}")
    n_groups = len(self.types) * self.num_topics
    need(self.num_items >= n_groups, "num_items",
         f"must be >= len(types) * num_topics = {n_groups} so every (type, topic) has an item; "
         f"got {self.num_items}")

    # Scenarios.
    need(len(self.scenarios) >= 1, "scenarios", "needs at least one ScenarioSpec")
    need(len(self.scenarios) < 128, "scenarios", "at most 127 (stored as int8)")
    for s in self.scenarios:
      unknown = set(s.type_weights) - set(names)
      need(not unknown, "scenarios", f"scenario {s.name!r} weights unknown types {sorted(unknown)}; "
           f"types are {names}")
      need(all(w >= 0 for w in s.type_weights.values()), "scenarios",
           f"scenario {s.name!r} has a negative type weight")
      need(0.0 <= s.search_rate <= 1.0, "scenarios",
           f"scenario {s.name!r} search_rate must lie in [0, 1], got {s.search_rate}")
    for t in self.types:
      if t.interaction_share > 0:
        need(sum(s.type_weights.get(t.name, 0.0) for s in self.scenarios) > 0, "scenarios",
             f"type {t.name!r} has events but no scenario gives it weight: add it to a type_weights")

  @property
  def type_names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.types)

  def to_dict(self) -> dict:
    """JSON-ready dict (saved next to streamed worlds)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> "WorldConfig":
    d = dict(d)
    d["types"] = tuple(ContentTypeSpec(**{**t, "fields": tuple(t["fields"])}) for t in d["types"])
    d["scenarios"] = tuple(ScenarioSpec(**s) for s in d["scenarios"])
    return cls(**d)
