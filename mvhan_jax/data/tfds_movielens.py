"""A TFDS builder for MovieLens-100k leave-one-out training examples, stored as ArrayRecord.

Building and reading need no TensorFlow (checked with tensorflow-datasets 4.9.10): the writer
serialises with TFDS' own protobuf example serializer, ``file_format='array_record'`` writes through
the ``array_record`` package, and `tfds.data_source` decodes with TFDS' numpy example parser. Three
details make it work here: the `DatasetInfo` is built directly (``dataset_info_from_configs`` would
look for metadata files next to the module), ``code_path`` is set explicitly (see the class), and
we read with `tfds.data_source`, never `tfds.load`.

The ``train`` split holds `protocol.training_examples(leave_one_out(data).train_sequences, maxlen)`
in exactly that order (``disable_shuffling``; the input pipeline shuffles), one record per example:
  user int32 [], history int32 [maxlen], history_len int32 [], target int32 [].
Builder configs are keyed by ``maxlen``: ``maxlen_20``, ``maxlen_50`` (default), ``maxlen_100``,
``maxlen_200``; any other value works through `builder(maxlen=...)` with an ad-hoc config.

`train_arrays` (what training reads) checks the decoded split against a sha256 recorded beside the
files when they were built, and rebuilds a cache that fails it, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mvhan_jax.data import locks, movielens, protocol

NAME = "mvhan_movielens100k_loo"
DEFAULT_MAXLEN = 50
REGISTERED_MAXLENS = (20, 50, 100, 200)


@dataclasses.dataclass
class MovielensLooConfig(tfds.core.BuilderConfig):
  """One config per history length."""

  maxlen: int = DEFAULT_MAXLEN


def _config(maxlen: int) -> MovielensLooConfig:
  return MovielensLooConfig(name=f"maxlen_{maxlen}", description=f"histories of the last {maxlen} items",
                            maxlen=maxlen)


class MvhanMovielens100kLoo(tfds.core.GeneratorBasedBuilder):
  """MovieLens-100k chronological leave-one-out training examples (see the module docstring)."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Leave-one-out training examples, ties in time broken by item id."}
  BUILDER_CONFIGS = [_config(m) for m in REGISTERED_MAXLENS]
  DEFAULT_CONFIG_NAME = f"maxlen_{DEFAULT_MAXLEN}"
  # TFDS derives `code_path` through `importlib_resources`, which this environment lacks (its
  # `isinstance(path, importlib_resources.abc.Traversable)` check raises ModuleNotFoundError for
  # any builder living in a package). The path only locates an optional checksums file.
  code_path = epath.Path(__file__)

  def __init__(self, *, raw_data_dir: str | None = None, **kwargs):
    # Where `load_movielens_100k` caches the raw files; only needed when generating.
    self._raw_data_dir = raw_data_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    maxlen = self.builder_config.maxlen
    return tfds.core.DatasetInfo(
        builder=self,
        description="MovieLens-100k leave-one-out next-item training examples.",
        features=tfds.features.FeaturesDict({
            "user": tfds.features.Scalar(np.int32),
            "history": tfds.features.Tensor(shape=(maxlen,), dtype=np.int32),
            "history_len": tfds.features.Scalar(np.int32),
            "target": tfds.features.Scalar(np.int32),
        }),
        homepage="https://grouplens.org/datasets/movielens/100k/",
        # Keep generation order so record i == training_examples(...)[i] (the pipeline shuffles).
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # `load_movielens_100k` obtains and verifies the raw files itself.
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    data = movielens.load_movielens_100k(self._raw_data_dir)
    split = protocol.leave_one_out(data)
    ex = protocol.training_examples(split.train_sequences, self.builder_config.maxlen)
    for k in range(len(ex["target"])):
      yield k, {name: arr[k] for name, arr in ex.items()}


def tfds_dir(data_dir: str | None = None) -> str:
  """``<data_dir>/tfds`` (data_dir defaults as in `movielens.default_data_dir`)."""
  return os.path.join(data_dir or movielens.default_data_dir(), "tfds")


def builder(data_dir: str | None = None, maxlen: int = DEFAULT_MAXLEN) -> MvhanMovielens100kLoo:
  """The builder for `maxlen`, writing ArrayRecord files under ``<data_dir>/tfds``."""
  if maxlen < 1:
    raise ValueError(f"maxlen must be >= 1, got {maxlen}")
  config = f"maxlen_{maxlen}" if maxlen in REGISTERED_MAXLENS else _config(maxlen)
  return MvhanMovielens100kLoo(config=config, data_dir=tfds_dir(data_dir), raw_data_dir=data_dir,
                               file_format="array_record")


def build(data_dir: str | None = None, maxlen: int = DEFAULT_MAXLEN) -> MvhanMovielens100kLoo:
  """Builds the dataset if it is not already prepared; returns its builder."""
  b = builder(data_dir, maxlen)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return b


def data_source(data_dir: str | None = None, maxlen: int = DEFAULT_MAXLEN, build_if_missing: bool = True):
  """The random-access ``train`` split (a TFDS ``ArrayRecordDataSource``), built if missing.

  Registered maxlens are opened with `tfds.data_source`; others through their builder
  (`tfds.data_source` can only name registered configs).
  """
  b = build(data_dir, maxlen) if build_if_missing else builder(data_dir, maxlen)
  if maxlen in REGISTERED_MAXLENS:
    return tfds.data_source(f"{NAME}/maxlen_{maxlen}", split="train", data_dir=tfds_dir(data_dir),
                            download=False)
  return b.as_data_source(split="train")


# The sha256 of the decoded training arrays, written beside the ArrayRecord files when they are built.
CHECKSUM_FILE = "mvhan_arrays.json"


def _reference_arrays(data_dir: str | None, maxlen: int) -> dict[str, np.ndarray]:
  """The training examples computed in memory from the raw files (what the cache must hold)."""
  data = movielens.load_movielens_100k(data_dir)
  return protocol.training_examples(protocol.leave_one_out(data).train_sequences, maxlen)


def _read_checked(data_dir: str | None, maxlen: int, load) -> tuple[dict[str, np.ndarray] | None, str | None]:
  """(arrays, None) when the cache reads and matches its checksum, else (None, what is wrong)."""
  from mvhan_jax import artifacts  # pylint: disable=import-outside-toplevel
  from mvhan_jax import workdir  # pylint: disable=import-outside-toplevel
  b = builder(data_dir, maxlen)
  if not b.is_prepared():  # a build's own failures (no raw files, no network) are not a damaged cache
    arrays = load(data_source(data_dir, maxlen))
  else:
    try:
      arrays = load(data_source(data_dir, maxlen))
    except Exception as e:  # pylint: disable=broad-except  # Riegeli: RuntimeError("Corrupted ..."), OSError...
      return None, f"cannot be read ({artifacts.first_line(e)})"
  record = epath.Path(b.data_dir) / CHECKSUM_FILE
  checksum = artifacts.arrays_checksum(arrays)
  if record.exists():
    try:
      saved = json.loads(record.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
      saved = None
    if saved != checksum:
      return None, f"does not match the checksum in {record}"
    return arrays, None
  # Built before checksums existed (or the record was lost): compare once with the examples the
  # raw files give, then record the checksum.
  want = _reference_arrays(data_dir, maxlen)
  if want.keys() != arrays.keys() or any(not np.array_equal(want[k], arrays[k]) for k in want):
    return None, "differs from the examples of the raw MovieLens files"
  workdir.write_json(record, {"sha256": checksum, "examples": int(len(arrays["target"])), "maxlen": maxlen})
  return arrays, None


def _cache_lock(data_dir: str | None, maxlen: int):
  """An exclusive cross-process lock on this maxlen's cache (`locks.exclusive`): without it, two
  processes that find the cache missing both build it, and the second's rename of its finished
  folder onto the first's fails (TFDS: ``FileExistsError``)."""
  return locks.exclusive(os.path.join(tfds_dir(data_dir), f".{NAME}.maxlen_{maxlen}.lock"))


def train_arrays(load, data_dir: str | None = None, maxlen: int = DEFAULT_MAXLEN) -> dict[str, np.ndarray]:
  """The ``train`` split as in-memory arrays, built if missing, checked against the sha256 recorded
  beside the cache when it was built. A cache that cannot be read or fails the check is deleted and
  rebuilt (~10 s, from the raw files) with a printed warning; the rebuilt one must pass, else the
  error names the folder to delete. Build, check and rebuild hold a lock on the cache, so processes
  started together build it once.

  load: reads a data source into arrays (`pipeline.load_arrays`, passed in: pipeline imports this).
  """
  with _cache_lock(data_dir, maxlen):
    return _train_arrays_unlocked(load, data_dir, maxlen)


def _train_arrays_unlocked(load, data_dir: str | None, maxlen: int) -> dict[str, np.ndarray]:
  from mvhan_jax import artifacts  # pylint: disable=import-outside-toplevel
  arrays, problem = _read_checked(data_dir, maxlen, load)
  if problem is None:
    return arrays
  folder = builder(data_dir, maxlen).data_dir
  print(f"warning: the MovieLens training-example cache {folder} {problem}: rebuilding it", file=sys.stderr,
        flush=True)
  shutil.rmtree(folder, ignore_errors=True)
  arrays, again = _read_checked(data_dir, maxlen, load)
  if again is not None:
    raise artifacts.ArtifactDamaged(f"the MovieLens training-example cache {folder} {again} even after a rebuild: "
                                    f"delete {folder} and check the raw files under "
                                    f"{os.path.join(data_dir or movielens.default_data_dir(), 'ml-100k')}")
  return arrays
