"""mvhan_jax.workdir and its users on a local folder and on a bucket (``gs://``, see conftest's
`fake_gcs`: epath's fsspec backend over an in-memory filesystem)."""

import os

import numpy as np
import pytest

from mvhan_jax import report
from mvhan_jax import retrieval
from mvhan_jax import workdir
from mvhan_jax.metrics_writer import MetricsWriter, read_metrics

BUCKET_RUN = "gs://bkt/runs/x"


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  """A workdir that does not exist yet: a local folder, or a gs:// URI on the fake bucket."""
  if request.param == "local":
    return str(tmp_path / "run")
  request.getfixturevalue("fake_gcs")
  return BUCKET_RUN


def _stored(fake_gcs) -> set[str]:
  return set(fake_gcs.store)


def test_json_and_text_round_trip(root):
  p = workdir.path(root) / "sub" / "results.json"
  assert not workdir.exists(p)
  workdir.write_json(p, {"test": {"HR@10": 0.5}, "step": 3})
  assert workdir.exists(p)
  assert workdir.read_json(p) == {"test": {"HR@10": 0.5}, "step": 3}
  workdir.write_text(p.with_name("config.json"), "{}")  # overwrite-safe sibling
  workdir.write_text(p, "[1]")
  assert workdir.read_json(p) == [1]
  assert sorted(c.name for c in p.parent.iterdir()) == ["config.json", "results.json"]  # no temp files


def test_files_land_in_the_bucket_not_in_a_local_gs_folder(fake_gcs, tmp_path):
  workdir.makedirs(BUCKET_RUN)
  workdir.write_json(f"{BUCKET_RUN}/config.json", {"a": 1})
  assert _stored(fake_gcs) == {"bkt/runs/x/config.json"}
  assert workdir.is_local(str(tmp_path)) and not workdir.is_local(BUCKET_RUN)
  assert os.listdir(tmp_path) == []  # the cwd: no 'gs:' folder (conftest checks it too)


def test_absolute_keeps_uris(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(workdir.absolute("run/ckpt")) == os.path.join(os.getcwd(), "run", "ckpt")
  assert os.fspath(workdir.absolute(f"{BUCKET_RUN}/best")) == f"{BUCKET_RUN}/best"


def test_an_unknown_scheme_is_an_error_not_a_local_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="memory://"):
    workdir.path("memory://b/x")
  assert os.listdir(tmp_path) == []


def test_fake_bucket_refuses_appends(fake_gcs):
  # What makes the MetricsWriter test below meaningful: gcsfs cannot append either.
  p = workdir.path(BUCKET_RUN) / "log"
  p.write_text("a\n")
  with pytest.raises(NotImplementedError):
    with p.open("a") as f:
      f.write("b\n")


def test_copy_tree_and_staging_both_ways(fake_gcs, tmp_path):
  src = tmp_path / "src"
  (src / "deep").mkdir(parents=True)
  (src / "a.txt").write_text("a")
  (src / "deep" / "b.bin").write_bytes(b"\x00\x01")
  workdir.copy_tree(str(src), BUCKET_RUN)
  assert _stored(fake_gcs) == {"bkt/runs/x/a.txt", "bkt/runs/x/deep/b.bin"}
  with workdir.local_dir_to_read(BUCKET_RUN) as local:
    assert workdir.is_local(local) and not local.startswith(str(tmp_path))
    assert open(os.path.join(local, "deep", "b.bin"), "rb").read() == b"\x00\x01"
  assert not os.path.exists(local)  # the staging copy is gone

  with workdir.local_dir_to_write(f"{BUCKET_RUN}/out") as local:
    with open(os.path.join(local, "f"), "w") as f:
      f.write("written locally")
  assert workdir.read_text(f"{BUCKET_RUN}/out/f") == "written locally"
  assert not os.path.exists(local)

  with pytest.raises(RuntimeError):  # a failed write copies nothing
    with workdir.local_dir_to_write(f"{BUCKET_RUN}/failed") as local:
      open(os.path.join(local, "half"), "w").close()
      raise RuntimeError
  assert not workdir.exists(f"{BUCKET_RUN}/failed/half")

  back = tmp_path / "back"
  workdir.copy_tree(BUCKET_RUN, str(back))
  assert (back / "deep" / "b.bin").read_bytes() == b"\x00\x01" and (back / "out" / "f").exists()


def test_local_staging_is_the_folder_itself(tmp_path):
  d = str(tmp_path / "idx")
  with workdir.local_dir_to_write(d) as local:
    assert local == d and os.path.isdir(d)
  with workdir.local_dir_to_read(d) as local:
    assert local == d


def test_metrics_writer_log_survives_a_resume(root):
  w = MetricsWriter(root, tensorboard=False)
  w.truncate_after(0)  # a fresh run truncates a log that is not there
  w.write(10, {"train/loss": 3.0})
  w.write(20, {"train/loss": 2.0})
  w.write(30, {"train/loss": 9.0})  # lost: the run resumes from step 20
  w.close()
  w = MetricsWriter(root, tensorboard=False)  # the resumed process
  w.truncate_after(20)
  w.write(30, {"train/loss": 1.5})
  w.write(30, {"valid/HR@10": 0.25})
  w.close()
  assert read_metrics(root) == [{"step": 10, "train/loss": 3.0}, {"step": 20, "train/loss": 2.0},
                                {"step": 30, "train/loss": 1.5}, {"step": 30, "valid/HR@10": 0.25}]
  curves = report.read_curves(root)
  np.testing.assert_array_equal(curves["train/loss"][0], [10, 20, 30])
  # A log that a resumed writer only appends to (no truncation) keeps the earlier rows too.
  w = MetricsWriter(root, tensorboard=False)
  w.write(40, {"train/loss": 1.0})
  assert [r["step"] for r in read_metrics(root)] == [10, 20, 30, 30, 40]
  assert read_metrics(workdir.path(root) / "nowhere") == []


def test_metrics_writer_disabled_writes_nothing(root):
  w = MetricsWriter(root, enabled=False)
  w.truncate_after(0)
  w.write(1, {"a": 1.0})
  w.close()
  assert not workdir.exists(root)


def test_tensorboard_event_files_reach_the_workdir(root):
  pytest.importorskip("tensorboardX")
  w = MetricsWriter(root, tensorboard=True, tb_sync_s=3600)
  w.write(1, {"train/loss": 1.0})
  w.flush()
  tb = workdir.path(root) / "tb"
  events = [p for p in tb.iterdir() if p.name.startswith("events.out.tfevents")]
  assert len(events) == 1
  flushed = events[0].read_bytes()
  w.write(2, {"train/loss": 0.5})
  w.close()
  closed = events[0].read_bytes()
  assert len(closed) > len(flushed) > 0 and closed.startswith(flushed)


def _items(n=64, d=8, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_index_round_trip(root, backend):
  if backend == "scann" and retrieval._import_scann() is None:  # pylint: disable=protected-access
    pytest.skip("scann not importable here")
  items = _items()
  queries = _items(5, seed=1)
  cfg = retrieval.IndexConfig.for_size(len(items), backend=backend)
  index = retrieval.build_index(items, cfg)
  directory = f"{root}/index"
  index.save(directory, step=7, metadata={"model": "t"})
  assert workdir.exists(f"{directory}/index.json")
  loaded = retrieval.load_index(directory)
  assert type(loaded) is type(index) and loaded.step == 7 and loaded.metadata == {"model": "t"}
  for got, want in zip(loaded.search(queries, 5), index.search(queries, 5)):
    np.testing.assert_array_equal(got, want)
  # Per-type indexes: an id map next to the inner index's files.
  members = np.arange(3, 60, 2)
  sub = retrieval.SubsetIndex.build(items, members, retrieval.IndexConfig.for_size(len(members), backend=backend))
  sub.save(f"{root}/index_type1", step=7)
  sub_loaded = retrieval.load_index(f"{root}/index_type1")
  assert isinstance(sub_loaded, retrieval.SubsetIndex)
  np.testing.assert_array_equal(sub_loaded.item_ids, members)
  for got, want in zip(sub_loaded.search(queries, 5), sub.search(queries, 5)):
    np.testing.assert_array_equal(got, want)
  # A re-save over an existing index overwrites it.
  index.save(directory, step=8)
  assert retrieval.load_index(directory).step == 8


def test_index_files_are_in_the_bucket(fake_gcs):
  retrieval.ExactIndex(_items()).save(f"{BUCKET_RUN}/index", step=1)
  assert _stored(fake_gcs) == {"bkt/runs/x/index/index.json", "bkt/runs/x/index/items.npz"}
  with pytest.raises(FileNotFoundError, match="not a saved index"):
    retrieval.load_index(f"{BUCKET_RUN}/elsewhere")


def test_save_figures_writes_pngs_into_the_workdir(root):
  run = report.RunData(name="r", workdir=root, results={"valid": {}, "test": {}}, best_step=1,
                       curves={"train/loss": (np.array([1, 2]), np.array([1.0, 0.5]))},
                       ranks=np.array([0, 3, 50]))
  paths = report.save_figures(root, runs=[run])
  assert sorted(os.path.basename(p) for p in paths) == ["hr_curves.png", "training_curves.png"]
  for p in paths:
    assert p.startswith(str(root)) and workdir.path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
