"""Dataset registry: ``config.dataset.name`` -> an InteractionData and its training source."""

from __future__ import annotations

import collections

from mvhan_jax import configs
from mvhan_jax.data import protocol
from mvhan_jax.data.pipeline import ArraySource
from mvhan_jax.data.types import InteractionData

MOVIELENS = tuple(configs.MOVIELENS_DATASETS.values())  # the loaders: movielens.LOADERS
DATASETS = MOVIELENS + ("synthetic", "interactions")


def log_folder(config, quiet: bool = True) -> str:
  """The converted folder of an interaction log (``config.dataset.name='interactions'``), converting it
  first when missing (`mvhan_jax.data.logs`)."""
  from mvhan_jax.data import logs  # pylint: disable=import-outside-toplevel
  spec = logs.spec_from_config(config)
  engine = config.dataset.get("engine") or "local"
  if engine == "beam":
    import functools  # pylint: disable=import-outside-toplevel
    from mvhan_jax.data import beam_ingest  # pylint: disable=import-outside-toplevel
    run = functools.partial(beam_ingest.convert_beam, pipeline_args=str(config.dataset.get("beam_args") or "").split())
  elif engine == "local":
    run = logs.convert_local
  else:
    raise logs.LogError(f"config.dataset.engine={engine!r} is unknown: use 'local' (this machine) or 'beam' "
                        "(an Apache Beam pipeline)")
  return logs.convert(spec, config.dataset.get("data_dir"), engine=run, quiet=quiet)


def load_dataset(config) -> InteractionData:
  name = config.dataset.name
  if name in MOVIELENS:
    from mvhan_jax.data import movielens  # pylint: disable=import-outside-toplevel
    data = movielens.LOADERS[name](config.dataset.get("data_dir"))
    scheme = config.dataset.get("content_types")
    if scheme:  # MV-HAN's content types: the item feature 'type' (see data/multitype.py)
      from mvhan_jax.data import multitype  # pylint: disable=import-outside-toplevel
      if scheme not in multitype.MOVIELENS_TYPE_SCHEMES:
        raise ValueError(f"config.dataset.content_types={scheme!r} is unknown: use one of "
                         f"{sorted(multitype.MOVIELENS_TYPE_SCHEMES)} or None")
      data, _ = multitype.add_movielens_content_types(data, scheme)
    return data
  if name == "interactions":
    import dataclasses  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from mvhan_jax.data import logs  # pylint: disable=import-outside-toplevel
    data = logs.load(log_folder(config, quiet=False))
    if "type" not in data.item_features and config.model.get("name") in ("mvhan", "mv_dnn"):
      # MV-HAN without a type column (config.dataset.item_features.type): one content type, 'all'.
      data = dataclasses.replace(data, item_features={**data.item_features, "type": np.ones((data.num_items,), np.int32)},
                                 vocab={**data.vocab, "type": 2})
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
  if config.dataset.name in MOVIELENS:
    from mvhan_jax.data import multitype  # pylint: disable=import-outside-toplevel
    return multitype.MOVIELENS_TYPE_SCHEMES[config.dataset.content_types]
  if config.dataset.name == "synthetic":
    from mvhan_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    types = synthetic.WorldConfig(**config.dataset.world.to_dict()).types
    return tuple(t.name for t in types)
  if config.dataset.name == "interactions":
    from mvhan_jax.data import logs  # pylint: disable=import-outside-toplevel
    names = logs.read_manifest(log_folder(config)).get("type_names")
    if names:
      return tuple(names)
    return ("all",) if data.vocab.get("type") == 2 else tuple(f"type{t}" for t in range(1, data.vocab["type"]))
  return tuple(f"type{t}" for t in range(1, int(data.item_features["type"].max()) + 1))


def train_source(config, data: InteractionData, split):
  """The random-access source of training examples for ``split``.

  MovieLens-100k leave-one-out reads the TFDS ArrayRecord files (built once under the data dir);
  other datasets and protocols build the same examples in memory (MovieLens-1M's leave-one-out
  examples once per process and (data_dir, maxlen): 982k examples, ~200 MB at maxlen 50); an
  interaction log reads its ArrayRecord shards (`logs.ShardedExamples`). ``config.train_examples='windows'``
  (SASRec's all-positions training): `protocol.training_windows`, in memory.
  """
  if config.get("train_examples", "prefixes") == "windows":
    # SASRec's all-positions training: each item predicted once per epoch (protocol.training_windows).
    return ArraySource(protocol.training_windows(split.train_sequences, config.maxlen))
  if config.dataset.name == "movielens_100k" and config.protocol == "leave_one_out":
    from mvhan_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.movielens_train_source(config.dataset.get("data_dir"), config.maxlen)
  if config.dataset.name == "interactions" and config.protocol == "leave_one_out":
    from mvhan_jax.data import logs  # pylint: disable=import-outside-toplevel
    shards = logs.ShardedExamples(log_folder(config))
    # Examples that fit config.dataset.in_memory_mb are read once, sequentially, into memory (batches are
    # then one gather); larger sets are read per batch from the shards (~30k examples/s on 2 cores).
    if shards.nbytes() <= float(config.dataset.get("in_memory_mb", 2048)) * 2**20:
      return ArraySource(shards.load_all())
    return shards
  if config.dataset.name == "movielens_1m" and config.protocol == "leave_one_out":
    from mvhan_jax.data import movielens  # pylint: disable=import-outside-toplevel
    key = (config.dataset.get("data_dir") or movielens.default_data_dir(), config.maxlen)
    if key not in _ML1M_SOURCES:
      while len(_ML1M_SOURCES) >= 2:
        _ML1M_SOURCES.popitem(last=False)
      _ML1M_SOURCES[key] = ArraySource(protocol.training_examples(split.train_sequences, config.maxlen))
    _ML1M_SOURCES.move_to_end(key)
    return _ML1M_SOURCES[key]
  if config.protocol == "comirec":
    return ArraySource(protocol.comirec_training_examples(split.train_sequences, config.maxlen))
  return ArraySource(protocol.training_examples(split.train_sequences, config.maxlen))


# MovieLens-1M leave-one-out training sources by (data_dir, maxlen): the split is a pure function of
# the verified files (content types do not change it), so a table script's rows share one copy.
_ML1M_SOURCES: collections.OrderedDict = collections.OrderedDict()
