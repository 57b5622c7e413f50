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
    return movielens.load_movielens_100k(config.dataset.get("data_dir"))
  if name == "synthetic":
    from mvhan_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    world = synthetic.generate_world(synthetic.WorldConfig(**config.dataset.world.to_dict()))
    return world.to_interaction_data(config.dataset.get("content_type"))
  raise ValueError(f"config.dataset.name={name!r} is unknown: choose one of {DATASETS}")


def train_source(config, data: InteractionData, split):
  """The random-access source of training examples for ``split``.

  MovieLens-100k leave-one-out reads the TFDS ArrayRecord files (built once under the data dir);
  other datasets and protocols build the same examples in memory.
  """
  if config.dataset.name == "movielens_100k" and config.protocol == "leave_one_out":
    from mvhan_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.movielens_train_source(config.dataset.get("data_dir"), config.maxlen)
  if config.protocol == "comirec":
    return ArraySource(protocol.comirec_training_examples(split.train_sequences, config.maxlen))
  return ArraySource(protocol.training_examples(split.train_sequences, config.maxlen))
