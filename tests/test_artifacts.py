"""Saved artifacts carry what they were made from and a checksum, and loading checks both.

Checkpoints, the ScaNN index and the MovieLens TFDS cache; every failure is one sentence (an
`errors.UserError`) that says what does not match and what to do. One two-tower smoke run is trained
once; each test damages a copy of it.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from mvhan_jax import errors
from mvhan_jax import modes
from mvhan_jax import retrieval
from mvhan_jax import tasks
from mvhan_jax import train
from mvhan_jax.configs import load_config
from mvhan_jax.tasks import retrieval as rtask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "two_tower_ml100k.py")
BEST_STEP = 120  # the smoke run: 120 steps, evaluations at 60 and 120, latest checkpoints 100 and 120


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, task, workdir) of a finished two-tower smoke run with its index; tests copy it."""
  cfg = load_config(f"{CONFIG}:smoke")
  workdir = str(tmp_path_factory.mktemp("run"))
  task = tasks.build_task(cfg)
  results = train.train_and_evaluate(task, workdir)
  assert results["best_step"] == BEST_STEP and os.path.isdir(os.path.join(workdir, "checkpoints", "100"))
  return cfg, task, workdir


def _copy(workdir, tmp_path) -> str:
  out = str(tmp_path / "copy")
  shutil.copytree(workdir, out)
  return out


def _garble(path, n=800):
  """``n`` random bytes written over the middle of ``path``, keeping its size."""
  data = bytearray(open(path, "rb").read())
  start = max(0, len(data) // 2 - n // 2)
  data[start:start + n] = np.random.default_rng(0).integers(0, 256, min(n, len(data)), dtype=np.uint8).tobytes()
  with open(path, "wb") as f:
    f.write(data)


def _largest_array_file(step_dir) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  return max(files, key=os.path.getsize)


def _damage(step_dir, kind):
  if kind == "garbled":
    _garble(_largest_array_file(step_dir))
  elif kind == "truncated":
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  elif kind == "no_metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif kind == "no_state":
    shutil.rmtree(os.path.join(step_dir, "state"))
  else:
    raise ValueError(kind)


def _one_sentence(excinfo) -> str:
  message = str(excinfo.value)
  assert isinstance(excinfo.value, errors.UserError), type(excinfo.value)
  assert "\n" not in message and len(message) < 600, message
  return message


# --------------------------------------------------------------------------------------------------
# What is recorded
# --------------------------------------------------------------------------------------------------
def test_config_hash_ignores_paths_logging_and_topology_but_not_seeds_or_the_model():
  from mvhan_jax import artifacts  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = load_config(f"{CONFIG}:smoke")
  h = artifacts.config_hash(cfg)
  # config.json round trip (tuples become lists): the same hash, so a workdir's own config matches.
  assert artifacts.config_hash(ml_collections.ConfigDict(json.loads(cfg.to_json_best_effort()))) == h
  for field, value in [("dataset.data_dir", "/elsewhere"), ("progress", True), ("log_every_steps", 7),
                       ("mesh.data", 2), ("index.backend", "exact"), ("checkpoint_every_steps", 5),
                       ("fail_at_step", 3), ("tensorboard", False), ("total_steps", 60),
                       ("eval_every_steps", 7)]:
    other = cfg.copy_and_resolve_references()
    *path, leaf = field.split(".")
    node = other
    for p in path:
      node = node[p]
    node[leaf] = value
    assert artifacts.config_hash(other) == h, field
  for field, value in [("seed", 1), ("model.dim", 64), ("optimizer.lr", 3e-3), ("batch_size", 128)]:
    other = cfg.copy_and_resolve_references()
    *path, leaf = field.split(".")
    node = other
    for p in path:
      node = node[p]
    node[leaf] = value
    assert artifacts.config_hash(other) != h, field


def test_checkpoints_and_index_record_what_they_were_made_from(run):
  from mvhan_jax import artifacts  # pylint: disable=import-outside-toplevel
  cfg, task, workdir = run
  for sub in ("best", "checkpoints"):
    with open(os.path.join(workdir, sub, str(BEST_STEP), "meta", "metadata")) as f:
      stamp = json.load(f)["artifact"]
    assert stamp["model"] == "two_tower" and stamp["task"] == "retrieval" and stamp["step"] == BEST_STEP
    assert stamp["config_hash"] == artifacts.config_hash(cfg)
    assert stamp["checksum"].startswith("sha256:")
  with open(os.path.join(workdir, "best", str(BEST_STEP), "meta", "metadata")) as f:
    best = json.load(f)["artifact"]
  assert best["leaves"]["params/item_id_embed/embedding"] == [[task.exp.data.num_items, cfg.model.dim], "float32"]
  with open(os.path.join(workdir, "index", "index.json")) as f:
    index = json.load(f)
  assert (index["step"], index["num_items"], index["dim"]) == (BEST_STEP, 1682, cfg.model.dim)
  assert index["metadata"]["model"] == "two_tower" and index["metadata"]["config_hash"] == best["config_hash"]
  assert index["metadata"]["checkpoint_checksum"] == best["checksum"]
  assert "hashed_dataset.npy" in index["files"]


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["garbled", "truncated", "no_state"])
def test_eval_of_a_damaged_best_checkpoint_says_so(run, tmp_path, kind):
  """800 random bytes inside the best checkpoint's array file used to change the test metrics
  silently; a truncated file or a missing item gave orbax tracebacks."""
  cfg, _, workdir = run
  workdir = _copy(workdir, tmp_path)
  _damage(os.path.join(workdir, "best", str(BEST_STEP)), kind)
  with pytest.raises(errors.UserError) as excinfo:
    modes.run("eval", cfg, workdir)
  message = _one_sentence(excinfo)
  assert os.path.join(workdir, "best", str(BEST_STEP)) in message and "damaged" in message
  assert "retrain" in message


def test_a_checkpoint_of_another_model_or_config_is_refused_before_any_array_is_read(run, monkeypatch):
  """Evaluating a two-tower workdir with the MIND config used to end in an orbax tree-structure dump."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  _, _, workdir = run

  def no_array_restore(*args, **kwargs):
    raise AssertionError("orbax was asked to restore arrays before the provenance check")
  monkeypatch.setattr(ocp.args, "StandardRestore", no_array_restore)
  mind = load_config(os.path.join(ROOT, "experiments", "configs", "mind_ml100k.py:smoke"))
  with pytest.raises(errors.UserError) as excinfo:
    modes.run("eval", mind, workdir)
  message = _one_sentence(excinfo)
  assert "two_tower" in message and "mind" in message and "--workdir" in message
  assert os.path.join(workdir, "config.json") in message

  wider = load_config(f"{CONFIG}:smoke")
  wider.model.dim = 64
  with pytest.raises(errors.UserError) as excinfo:
    modes.run("eval", wider, workdir)
  message = _one_sentence(excinfo)
  assert "model.dim 32 there, 64 here" in message and "--workdir" in message


def test_a_checkpoint_saved_before_stamps_existed_still_loads(run, tmp_path):
  cfg, task, workdir = run
  workdir = _copy(workdir, tmp_path)
  path = os.path.join(workdir, "best", str(BEST_STEP), "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  meta.pop("artifact", None)  # (a guard of old workdirs, not a reproduction)
  with open(path, "w") as f:
    json.dump(meta, f)
  params, step = task.restore_best(workdir)
  assert step == BEST_STEP and jax.tree.leaves(params)


@pytest.mark.parametrize("kind", ["truncated", "no_metadata", "no_state"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(run, tmp_path, capsys, kind):
  """A damaged latest checkpoint used to block resuming; now the run continues from the previous one,
  replays the lost steps and ends where the undamaged run ended."""
  cfg, task, workdir = run
  clean = workdir
  workdir = _copy(workdir, tmp_path)
  _damage(os.path.join(workdir, "checkpoints", "120"), kind)
  stage = next(task.stages(workdir))
  state, meta = train.run_stage(stage, workdir)
  err = capsys.readouterr().err
  warning = next(line for line in err.splitlines() if line.startswith("warning:"))
  assert "step 100" in warning and "step 120" in warning, warning
  assert int(state.step) == 120 and meta["final_step"] == 120
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "damaged_120"))
  exp = task.exp
  want, _ = rtask.restore_params(clean, exp, "latest")
  got, step = rtask.restore_params(workdir, exp, "latest")
  assert step == 120
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_with_every_checkpoint_damaged_is_one_error(run, tmp_path):
  _, task, workdir = run
  workdir = _copy(workdir, tmp_path)
  for step in ("100", "120"):
    _damage(os.path.join(workdir, "checkpoints", step), "no_state")
  with pytest.raises(errors.UserError) as excinfo:
    train.run_stage(next(task.stages(workdir)), workdir)
  message = _one_sentence(excinfo)
  assert "120, 100" in message and os.path.join(workdir, "checkpoints") in message


# --------------------------------------------------------------------------------------------------
# The ScaNN index
# --------------------------------------------------------------------------------------------------
def _a_test_user(task) -> int:
  return int(task.exp.eval_sets["test"].user[5])


def test_an_index_of_an_older_step_is_refused(run, tmp_path):
  cfg, task, workdir = run
  workdir = _copy(workdir, tmp_path)
  template = rtask.abstract_state(task.exp, train.make_optimizer(cfg.optimizer, 1))
  state, _ = train.restore_checkpoint(train.checkpoint_manager(os.path.join(workdir, "checkpoints"), 2), 100, template)
  rtask.build_and_save_index(task.exp, state.params, 100, workdir)
  with pytest.raises(errors.UserError) as excinfo:
    modes.run("recommend", cfg, workdir, user=_a_test_user(task))
  message = _one_sentence(excinfo)
  assert "step 100" in message and "step 120" in message and "--mode=index" in message


@pytest.mark.parametrize("other", ["seed", "dim", "items"])
def test_an_index_of_another_run_is_refused(run, tmp_path, other):
  """An index directory copied from another run (another seed of the config, another model width,
  another catalogue) at the same step used to be served silently (or failed inside the search)."""
  cfg, task, workdir = run
  workdir = _copy(workdir, tmp_path)
  items, dim = (1000 if other == "items" else 1682), (16 if other == "dim" else cfg.model.dim)
  metadata = {"dataset": "movielens_100k", "model": "two_tower"}
  if other == "seed":
    from mvhan_jax import artifacts  # pylint: disable=import-outside-toplevel
    seed1 = cfg.copy_and_resolve_references()
    seed1.seed = 1
    metadata["config_hash"] = artifacts.config_hash(seed1)
  vectors = np.random.default_rng(1).normal(size=(items, dim)).astype(np.float32)
  shutil.rmtree(os.path.join(workdir, "index"))
  retrieval.ExactIndex(vectors).save(os.path.join(workdir, "index"), step=BEST_STEP, metadata=metadata)
  with pytest.raises(errors.UserError) as excinfo:
    modes.run("recommend", cfg, workdir, user=_a_test_user(task))
  message = _one_sentence(excinfo)
  assert {"seed": "config hash", "dim": "dimension 16", "items": "1000 items"}[other] in message
  assert "--mode=index" in message


def test_a_garbled_index_file_is_refused(run, tmp_path):
  """800 random bytes in the ScaNN index's hashed_dataset.npy used to change the top-10 silently."""
  cfg, task, workdir = run
  workdir = _copy(workdir, tmp_path)
  _garble(os.path.join(workdir, "index", "hashed_dataset.npy"))
  with pytest.raises(errors.UserError) as excinfo:
    modes.run("recommend", cfg, workdir, user=_a_test_user(task))
  message = _one_sentence(excinfo)
  assert "hashed_dataset.npy" in message and "--mode=index" in message


def test_a_garbage_index_json_is_one_sentence_naming_the_file(run, tmp_path):
  cfg, task, workdir = run
  workdir = _copy(workdir, tmp_path)
  with open(os.path.join(workdir, "index", "index.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(errors.UserError) as excinfo:
    modes.run("recommend", cfg, workdir, user=_a_test_user(task))
  message = _one_sentence(excinfo)
  assert os.path.join(workdir, "index", "index.json") in message and "--mode=index" in message


# --------------------------------------------------------------------------------------------------
# The MovieLens TFDS cache
# --------------------------------------------------------------------------------------------------
def test_a_damaged_dataset_cache_is_rebuilt_with_a_warning(tmp_path, capsys):
  """800 random bytes in the ArrayRecord file of the training examples used to end in a Riegeli
  RuntimeError traceback; now the cache is rebuilt (from the raw files) and says so."""
  from mvhan_jax.data import movielens  # pylint: disable=import-outside-toplevel
  from mvhan_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  movielens.load_movielens_100k()  # the raw files, fetched if this machine has none yet
  data_dir = str(tmp_path / "data")
  shutil.copytree(os.path.join(movielens.default_data_dir(), "ml-100k"), os.path.join(data_dir, "ml-100k"))
  maxlen = 20  # the smallest registered config: the quickest to build
  pipeline._cached_source.cache_clear()  # pylint: disable=protected-access
  want = pipeline.movielens_train_source(data_dir, maxlen).arrays
  folder = os.path.join(data_dir, "tfds", "mvhan_movielens100k_loo", f"maxlen_{maxlen}", "1.0.0")
  record = next(f for f in os.listdir(folder) if ".array_record" in f)
  _garble(os.path.join(folder, record))
  capsys.readouterr()
  pipeline._cached_source.cache_clear()  # pylint: disable=protected-access
  got = pipeline.movielens_train_source(data_dir, maxlen).arrays
  pipeline._cached_source.cache_clear()  # pylint: disable=protected-access
  err = capsys.readouterr().err
  assert "warning:" in err and folder in err and "rebuilding" in err, err
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(want[k], got[k])
  assert os.path.exists(os.path.join(folder, "mvhan_arrays.json"))
