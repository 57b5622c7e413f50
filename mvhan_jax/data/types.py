"""The one in-memory dataset type every model, protocol and trainer consumes.

Conventions (all datasets follow them, so models need no per-dataset code):
- Users are ``0..num_users-1`` and items ``0..num_items-1`` (dense, 0-based).
- A feature is a named array whose leading axis is the user or item index:
  * categorical  ``int32 [N]``     values in ``[0, vocab)``; value 0 means "unknown".
  * multi-valued ``int32 [N, M]``  values in ``[0, vocab)``; value 0 is padding, pooled by a
    masked mean (an all-padding row pools to zeros).
  * dense        ``float32 [N, F]`` a fixed vector (e.g. a pretrained text vector).
  The kind is read off the dtype and rank (`mvhan_jax.features.feature_specs`); ``vocab`` holds the
  size of every integer feature.
- Interactions are parallel arrays ``user``, ``item``, ``timestamp`` (and optional ``rating``);
  every row is one implicit interaction.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import numpy as np

from mvhan_jax import features


@dataclasses.dataclass(frozen=True)
class InteractionData:
  """Users, items, their features and the interaction log of one dataset."""

  name: str
  num_users: int
  num_items: int
  user_features: Mapping[str, np.ndarray]
  item_features: Mapping[str, np.ndarray]
  vocab: Mapping[str, int]
  user: np.ndarray       # int32 [N]
  item: np.ndarray       # int32 [N]
  timestamp: np.ndarray  # int64 [N]
  rating: np.ndarray | None = None  # float32 [N]
  item_titles: tuple[str, ...] | None = None  # display names, for `recommend`

  def __post_init__(self):
    n = len(self.user)
    for field in ("item", "timestamp"):
      if len(getattr(self, field)) != n:
        raise ValueError(f"interactions: {field!r} has {len(getattr(self, field))} rows, 'user' has {n}")
    if n and (self.user.min() < 0 or self.user.max() >= self.num_users):
      raise ValueError(f"interactions: user ids must lie in [0, {self.num_users})")
    if n and (self.item.min() < 0 or self.item.max() >= self.num_items):
      raise ValueError(f"interactions: item ids must lie in [0, {self.num_items})")
    for name, arr in self.user_features.items():
      if len(arr) != self.num_users:
        raise ValueError(f"user feature {name!r} has {len(arr)} rows, expected num_users={self.num_users}")
    for name, arr in self.item_features.items():
      if len(arr) != self.num_items:
        raise ValueError(f"item feature {name!r} has {len(arr)} rows, expected num_items={self.num_items}")
    _ = self.spec  # validates every feature against the conventions (kinds, vocab ranges)

  @functools.cached_property
  def spec(self) -> features.DataSpec:
    """What models are built from (`mvhan_jax.features.DataSpec`)."""
    return features.data_spec(self.name, self.num_users, self.num_items, self.user_features,
                              self.item_features, self.vocab)
