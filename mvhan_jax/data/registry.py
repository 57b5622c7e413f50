"""Dataset registry: ``config.dataset.name`` -> an InteractionData and its training source."""

from __future__ import annotations

from mvhan_jax.data import protocol
from mvhan_jax.data.pipeline import ArraySource
from mvhan_jax.data.types import InteractionData

DATASETS = ("movielens_100k", "synthetic")


def load_dataset(config) -> InteractionData:
  name = config.dataset.name
  if name == "movielens_100k":
    from mvhan_jax.data import movielens  # pylint: disable=import-outside-toplevel
    data = movielens.load_movielens_100k(config.dataset.get("data_dir"))
    scheme = config.dataset.get("content_types")
    if scheme:  # MV-HAN's content types: the item feature 'type' (see data/multitype.py)
      from mvhan_jax.data import multitype  # pylint: disable=import-outside-toplevel
      if scheme not in multitype.MOVIELENS_TYPE_SCHEMES:
        raise ValueError(f"config.dataset.content_types={scheme!r} is unknown: use one of "
                         f"{sorted(multitype.MOVIELENS_TYPE_SCHEMES)} or None")
      data, _ = multitype.add_movielens_content_types(data, scheme)
    return data
  if name == "synthetic":
    from mvhan_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    world = synthetic.generate_world(synthetic.WorldConfig(**config.dataset.world.to_dict()))
    return world.to_interaction_data(config.dataset.get("content_type"))
  raise ValueError(f"config.dataset.name={name!r} is unknown: choose one of {DATASETS}")


def content_type_names(config, data: InteractionData) -> tuple[str, ...] | None:
  """Names of content types 1..T (type t at position t - 1), or None for an untyped dataset."""
  if "type" not in data.item_features:
    return None
  if config.dataset.name == "movielens_100k":
    from mvhan_jax.data import multitype  # pylint: disable=import-outside-toplevel
    return multitype.MOVIELENS_TYPE_SCHEMES[config.dataset.content_types]
  if config.dataset.name == "synthetic":
    from mvhan_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    types = synthetic.WorldConfig(**config.dataset.world.to_dict()).types
    return tuple(t.name for t in types)
  return tuple(f"type{t}" for t in range(1, int(data.item_features["type"].max()) + 1))


def train_source(config, data: InteractionData, split):
  """The random-access source of training examples for ``split``.

  MovieLens-100k leave-one-out reads the TFDS ArrayRecord files (built once under the data dir);
  other datasets and protocols build the same examples in memory. ``config.train_examples='windows'``
  (SASRec's all-positions training): `protocol.training_windows`, in memory.
  """
  if config.get("train_examples", "prefixes") == "windows":
    # SASRec's all-positions training: each item predicted once per epoch (protocol.training_windows).
    return ArraySource(protocol.training_windows(split.train_sequences, config.maxlen))
  if config.dataset.name == "movielens_100k" and config.protocol == "leave_one_out":
    from mvhan_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.movielens_train_source(config.dataset.get("data_dir"), config.maxlen)
  if config.protocol == "comirec":
    return ArraySource(protocol.comirec_training_examples(split.train_sequences, config.maxlen))
  return ArraySource(protocol.training_examples(split.train_sequences, config.maxlen))
