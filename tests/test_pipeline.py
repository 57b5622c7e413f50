"""Input pipeline: epoch coverage, determinism, sharding, resumption, and the TFDS round trip."""

import os
import shutil

import grain
import numpy as np
import pytest

from mvhan_jax.data import movielens, pipeline, protocol, tfds_movielens


def _toy(n=10):
  # 'target' doubles as the example id; 'history' lets us check rows stay aligned across fields.
  return pipeline.ArraySource({"target": np.arange(n, dtype=np.int32),
                               "history": (np.arange(n, dtype=np.int32)[:, None] * 10 + np.arange(3)).astype(np.int32)})


def test_epoch_covers_every_example_once_and_epochs_differ():
  ds = pipeline.train_batches(_toy(10), batch_size=3, seed=7, num_epochs=4, shard_index=0, shard_count=1)
  assert isinstance(ds, grain.MapDataset)
  assert ds.steps_per_epoch == 3 and len(ds) == 12  # 10 // 3; the 10th example is dropped each epoch
  orders = []
  for e in range(4):
    ids = np.concatenate([ds[e * 3 + b]["target"] for b in range(3)])
    assert len(ids) == 9 and len(set(ids.tolist())) == 9  # no example twice within an epoch
    orders.append(ids.tolist())
    batch = ds[e * 3]
    np.testing.assert_array_equal(batch["history"], batch["target"][:, None] * 10 + np.arange(3))
    assert batch["target"].dtype == np.int32
  assert len({tuple(o) for o in orders}) == 4  # every epoch a different order
  # With drop-remainder, over epochs each example is still seen (the dropped one changes).
  assert set(sum(orders, [])) == set(range(10))
  with pytest.raises(IndexError):
    ds[12]


def test_batch_is_a_pure_function_of_seed_and_step():
  a = pipeline.train_batches(_toy(50), batch_size=4, seed=3, shard_index=0, shard_count=1)
  b = pipeline.train_batches(_toy(50), batch_size=4, seed=3, shard_index=0, shard_count=1)
  steps = [37, 0, 12, 36, 1000, 11]  # any access order, across epochs
  for s in steps:
    np.testing.assert_array_equal(a[s]["target"], b[s]["target"])
  for s in reversed(steps):
    np.testing.assert_array_equal(a[s]["target"], b[s]["target"])
  # Epoch e uses default_rng([seed, e]): step 13 is batch 1 of epoch 1 (12 steps per epoch).
  want = np.random.default_rng([3, 1]).permutation(50)[4:8]
  np.testing.assert_array_equal(a[13]["target"], want)
  c = pipeline.train_batches(_toy(50), batch_size=4, seed=4, shard_index=0, shard_count=1)
  assert not np.array_equal(a[0]["target"], c[0]["target"])
  assert len(a) > 10**12  # num_epochs=None is endless


def test_shards_partition_the_global_batch():
  src = _toy(40)
  glob = pipeline.train_batches(src, batch_size=8, seed=1, shard_index=0, shard_count=1)
  shards = [pipeline.train_batches(src, batch_size=8, seed=1, shard_index=k, shard_count=4) for k in range(4)]
  for step in (0, 4, 5, 9):  # 5 steps per epoch: steps 5 and 9 are in epoch 1
    parts = [s[step]["target"] for s in shards]
    assert all(len(p) == 2 for p in parts)
    assert len(set(np.concatenate(parts).tolist())) == 8  # disjoint
    np.testing.assert_array_equal(np.concatenate(parts), glob[step]["target"])  # union = global batch
  with pytest.raises(ValueError, match="divisible by shard_count=3"):
    pipeline.train_batches(src, batch_size=8, seed=1, shard_index=0, shard_count=3)
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.train_batches(src, batch_size=8, seed=1, shard_index=4, shard_count=4)


def test_default_shard_is_this_process():
  ds = pipeline.train_batches(_toy(10), batch_size=2, seed=0)
  assert (ds.shard_index, ds.shard_count) == (0, 1)  # single-process test run


@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterate_resumes_at_any_step(prefetch):
  ds = pipeline.train_batches(_toy(30), batch_size=4, seed=5, num_epochs=3, shard_index=0, shard_count=1)
  got = list(pipeline.iterate(ds, start_step=9, prefetch=prefetch))
  assert len(got) == len(ds) - 9
  for k, batch in enumerate(got):
    np.testing.assert_array_equal(batch["target"], ds[9 + k]["target"])


# ---- The TFDS ArrayRecord dataset on the real data. ---------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
  try:
    movielens.load_movielens_100k()
  except RuntimeError as e:
    pytest.skip(f"MovieLens-100k unavailable: {e}")
  root = str(tmp_path_factory.mktemp("mvhan_data"))
  shutil.copytree(os.path.join(movielens.default_data_dir(), "ml-100k"), os.path.join(root, "ml-100k"))
  maxlen = 20
  src = tfds_movielens.data_source(root, maxlen)
  split = protocol.leave_one_out(movielens.load_movielens_100k(root))
  return root, maxlen, src, protocol.training_examples(split.train_sequences, maxlen)


def test_tfds_records_equal_training_examples(built):
  root, maxlen, src, ex = built
  assert os.path.isdir(os.path.join(root, "tfds", tfds_movielens.NAME, f"maxlen_{maxlen}"))
  files = os.listdir(os.path.join(root, "tfds", tfds_movielens.NAME, f"maxlen_{maxlen}", "1.0.0"))
  assert any(".array_record-" in f for f in files)
  assert len(src) == len(ex["target"])
  # TFDS' own decoder, on a spread of records (it is slow, so not all of them).
  idx = np.random.default_rng(0).choice(len(src), 300, replace=False).tolist() + [0, len(src) - 1]
  for i, rec in zip(idx, src.__getitems__(idx)):
    for k in ex:
      np.testing.assert_array_equal(np.asarray(rec[k]), ex[k][i], err_msg=f"record {i} field {k}")
  # The whole split through the batched in-memory load.
  arrays = pipeline.load_arrays(src)
  assert arrays.keys() == ex.keys()
  for k in ex:
    np.testing.assert_array_equal(arrays[k], ex[k], err_msg=k)
    assert arrays[k].dtype == ex[k].dtype == np.int32


def test_movielens_train_source_and_tfds_batches_agree(built):
  root, maxlen, src, ex = built
  mem = pipeline.movielens_train_source(root, maxlen)  # opens the already built dataset
  assert len(mem) == len(ex["target"]) and mem.arrays["history"].shape[1] == maxlen
  a = pipeline.train_batches(mem, 64, seed=2, shard_index=0, shard_count=1)
  b = pipeline.train_batches(src, 64, seed=2, shard_index=0, shard_count=1)  # straight from TFDS
  for step in (0, a.steps_per_epoch + 3):
    x, y = a[step], b[step]
    for k in ex:
      np.testing.assert_array_equal(x[k], y[k])
      assert x[k].dtype == y[k].dtype == np.int32


def test_processes_that_find_the_cache_missing_together_build_it_once(tmp_path):
  # Without the cache lock the second finisher's rename onto the first's folder fails (FileExistsError).
  try:
    movielens.load_movielens_100k()
  except RuntimeError as e:
    pytest.skip(f"MovieLens-100k unavailable: {e}")
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = str(tmp_path)
  shutil.copytree(os.path.join(movielens.default_data_dir(), "ml-100k"), os.path.join(root, "ml-100k"))
  code = ("import sys; from mvhan_jax.data import pipeline; "
          "print(len(pipeline.movielens_train_source(sys.argv[1], 20)))")
  procs = [subprocess.Popen([sys.executable, "-c", code, root], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  want = len(protocol.training_examples(protocol.leave_one_out(movielens.load_movielens_100k(root)).train_sequences,
                                        20)["target"])
  assert [int(out.split()[-1]) for out, _ in outs] == [want, want]
