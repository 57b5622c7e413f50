"""What a model needs to know about its dataset, without the dataset: feature and data specs.

Models are built from a `DataSpec` (sizes, feature specs, scenario and modality names), never from
a dataset object, so that model code depends on neither the data package nor any dataset's arrays.
Every dataset type (`data.types.InteractionData`, `ranking.data.RankingData`,
`seminar.data.SeminarData`) exposes its spec as ``.spec``, built by `data_spec`.

Feature conventions (`feature_specs` reads a feature's kind off its array):
  * categorical  ``int32 [N]``     values in ``[0, vocab)``; value 0 means "unknown".
  * multi-valued ``int32 [N, M]``  values in ``[0, vocab)``; value 0 is padding.
  * dense        ``float32 [N, F]`` a fixed vector (e.g. a pretrained text vector).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """How a model embeds one feature: ``kind`` in {'categorical', 'multi', 'dense'}."""

  name: str
  kind: str
  size: int  # vocab size for categorical/multi, vector width for dense


def feature_specs(features: Mapping[str, np.ndarray], vocab: Mapping[str, int]) -> tuple[FeatureSpec, ...]:
  """Reads each feature's kind off its dtype and rank (see the module docstring)."""
  specs = []
  for name, arr in features.items():
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
      if arr.ndim != 2:
        raise ValueError(f"dense feature {name!r} must be float [N, F], got shape {arr.shape}")
      specs.append(FeatureSpec(name, "dense", int(arr.shape[1])))
    elif np.issubdtype(arr.dtype, np.integer):
      if name not in vocab:
        raise ValueError(f"integer feature {name!r} has no vocab size: add vocab[{name!r}]")
      if arr.ndim not in (1, 2):
        raise ValueError(f"integer feature {name!r} must be [N] or [N, M], got shape {arr.shape}")
      if arr.size and (arr.min() < 0 or arr.max() >= vocab[name]):
        raise ValueError(
            f"feature {name!r} has values in [{arr.min()}, {arr.max()}] outside [0, {vocab[name]}): "
            "fix the vocab size or the ids")
      specs.append(FeatureSpec(name, "categorical" if arr.ndim == 1 else "multi", int(vocab[name])))
    else:
      raise ValueError(f"feature {name!r} has unsupported dtype {arr.dtype}: use int32 or float32")
  return tuple(specs)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A dataset's shape as models see it. Fields a dataset kind lacks keep their empty default.

  Attributes:
    name: the dataset's name (for error messages).
    num_users, num_items: ids are ``0..num_users-1`` and ``0..num_items-1``.
    user_specs, item_specs: the user / item feature fields, in the dataset's order.
    scenario_names: multi-scenario ranking data: one name per scenario id.
    num_keywords: SEMINAR: size of the query keyword vocabulary (id 0 is padding).
    modality_names: SEMINAR: 'id' (a learned table) then one name per dense item vector, in the
      order of ``item_specs``.
  """

  name: str
  num_users: int
  num_items: int
  user_specs: tuple[FeatureSpec, ...] = ()
  item_specs: tuple[FeatureSpec, ...] = ()
  scenario_names: tuple[str, ...] = ()
  num_keywords: int = 0
  modality_names: tuple[str, ...] = ()

  @property
  def num_scenarios(self) -> int:
    return len(self.scenario_names)

  def item_spec(self, name: str) -> FeatureSpec | None:
    """The item field called ``name``, None when the dataset has none."""
    return next((s for s in self.item_specs if s.name == name), None)


def data_spec(name: str, num_users: int, num_items: int, user_features: Mapping[str, np.ndarray],
              item_features: Mapping[str, np.ndarray], vocab: Mapping[str, int], **extra) -> DataSpec:
  """The spec of a dataset with these feature arrays; ``extra``: the other `DataSpec` fields."""
  return DataSpec(name=name, num_users=int(num_users), num_items=int(num_items),
                  user_specs=feature_specs(user_features, vocab), item_specs=feature_specs(item_features, vocab),
                  **extra)
