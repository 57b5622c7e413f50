"""Shared fixtures."""

import os
import sys

import pytest


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """``gs://`` paths without credentials: epath's real routing and fsspec backend, with gcsfs's
  filesystem replaced by fsspec's in-memory one (registered under the 'gcs' protocol).

  epath takes no ``memory://`` URI (only gs, s3, az, hf), so this is the closest stand-in for a
  bucket. Like GCS, the fake refuses appends (gcsfs would silently overwrite instead). It does not
  emulate GCS's lack of empty directories or gcsfs itself (credentials, retries, consistency).
  The test runs in ``tmp_path`` as its cwd, so a ``gs://`` path misread as local would create
  ``tmp_path / "gs:"``, which the fixture rejects at teardown. Yields the filesystem class (its
  ``store`` maps 'bucket/key' to the files written).
  """
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  from etils.epath import gpath  # pylint: disable=import-outside-toplevel
  from fsspec.implementations.memory import MemoryFileSystem  # pylint: disable=import-outside-toplevel
  from fsspec.utils import stringify_path  # pylint: disable=import-outside-toplevel

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""  # keys are 'bucket/key', as gcsfs's, so epath's glob re-prefixes them right
    store = {}  # fresh per test: MemoryFileSystem's are class-wide
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
      path = stringify_path(path)
      for prefix in ("gs://", "gcs://"):
        path = path.removeprefix(prefix)
      return path.strip("/")

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise NotImplementedError(f"{path}: GCS objects cannot be appended to")
      return super()._open(path, mode, **kwargs)

  monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, "gcs", FakeGCS)  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # TF would route gs:// to gfile
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  monkeypatch.chdir(tmp_path)
  yield FakeGCS
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  assert not (tmp_path / "gs:").exists(), "a gs:// path was written as a local one"


@pytest.fixture(scope="session")
def sasrec_workdir(tmp_path_factory):
  """A finished 40-step SASRec (full softmax) run on MovieLens-100k (smoke), read-only for the tests:
  the warm-start source of tests/test_warm_start.py and a workdir for tests/test_paired_compare.py."""
  from mvhan_jax import tasks  # pylint: disable=import-outside-toplevel
  from mvhan_jax.configs import apply_overrides, load_config  # pylint: disable=import-outside-toplevel
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs",
                        "sasrec_ml100k.py")
  workdir = str(tmp_path_factory.mktemp("sasrec"))
  cfg = apply_overrides(load_config(f"{config}:smoke,softmax=full"),
                        ["total_steps=40", "eval_every_steps=20", "index.build=False"])
  tasks.train_and_evaluate(cfg, workdir)
  return workdir
