"""Model registry: ``config.model.name`` -> a constructor taking (model_config, `features.DataSpec`)."""

from __future__ import annotations

from typing import Callable

from mvhan_jax.features import DataSpec
from mvhan_jax.models import mind
from mvhan_jax.models import mvhan
from mvhan_jax.models import multitower
from mvhan_jax.models import sasrec
from mvhan_jax.models import two_tower

MODELS: dict[str, Callable] = {
    "two_tower": two_tower.from_config,
    **mind.MODELS,
    **mvhan.MODELS,
    **multitower.MODELS,
    **sasrec.MODELS,
}


def build_model(model_config, spec: DataSpec):
  """``spec``: the dataset's `DataSpec` (``data.spec``)."""
  name = model_config.name
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r} is unknown: choose one of {sorted(MODELS)}")
  return MODELS[name](model_config, spec)
