"""MV-HAN through the shared trainer on real MovieLens-100k with content types: single-type batches,
negatives of the batch's type, per-type evaluation, learned temperature."""

import json
import os

import jax
import numpy as np
import pytest

from mvhan_jax import tasks
from mvhan_jax import train

from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.configs import load_config
from mvhan_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "mvhan_ml100k.py")


def _config(args: str):
  return load_config(f"{CONFIG}:{args}")


@pytest.fixture(scope="module")
def typed_exp():
  return rtask.build_experiment(_config("smoke,typed"))


def test_typed_batches_follow_the_schedule_and_carry_their_type(typed_exp):
  ds = rtask.train_dataset(typed_exp, 64, seed=0)
  item_type = typed_exp.item_type
  for step in range(8):
    batch = ds[step]
    want = (1, 2, 1, 3)[step % 4]
    assert set(item_type[batch["target"]].tolist()) == {want}
    assert set(batch["content_type"].tolist()) == {want}
  # An epoch is measured in the scheduled types' examples (all three here).
  assert rtask.num_train_examples(typed_exp) == len(typed_exp.train_source)


def test_target_type_step_trains_the_shared_parts_not_the_source_head(typed_exp):
  """One real trainer step on a 'family' batch (type 2), negatives drawn among family items only:
  the shared content FEL and the family head move; the mainstream (type 1) and niche heads do not.
  A trainer that drew negatives from all items would push gradient into every head."""
  cfg = typed_exp.config
  tx = train.make_optimizer(cfg.optimizer, 100)
  state = rtask.init_state(typed_exp, tx, jax.random.key(0))
  before = jax.tree.map(np.asarray, state.params)
  step = rtask.make_train_step(typed_exp, tx)
  ds = rtask.train_dataset(typed_exp, 64, seed=0)
  for i in (1, 5):  # two 'family' steps: the warmup schedule's learning rate is 0 at step 0
    batch = ds[i]
    assert set(batch["content_type"].tolist()) == {2}
    state, metrics = step(state, batch, typed_exp.tables, jax.random.key(1))
  p0, p1 = before["params"], jax.tree.map(np.asarray, state.params)["params"]
  leaves0 = jax.tree_util.tree_leaves_with_path(p0["content_heads"])
  leaves1 = jax.tree.leaves(p1["content_heads"])
  assert leaves0
  for (path, a), b in zip(leaves0, leaves1):
    delta = np.abs(b - a).reshape(a.shape[0], -1).max(axis=1)  # per type (leading axis T)
    # Type 2 (index 1) moved by Adam steps (~lr each); types 1 and 3 only by weight decay (lr*wd*|w|).
    assert delta[1] > 100 * max(delta[0], delta[2]), (path, delta)
  fel_delta = max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(p0["content_fel"]), jax.tree.leaves(p1["content_fel"])))
  assert fel_delta > 1e-6
  assert np.isfinite(float(metrics["loss"]))


def test_per_type_negatives_need_a_schedule_and_content_types():
  cfg = _config("smoke,softmax=sampled")
  cfg.loss.negatives_per_type = True
  with pytest.raises(ValueError, match="type_schedule"):
    rtask.build_experiment(cfg)
  cfg = load_config(os.path.join(ROOT, "experiments", "configs", "two_tower_ml100k.py") + ":smoke")
  cfg.eval_per_type = True
  with pytest.raises(ValueError, match="content_types"):
    rtask.build_experiment(cfg)
  cfg = _config("smoke")  # pooled: the full softmax, which ranks every type
  cfg.loss.negatives_per_type = True
  with pytest.raises(ValueError, match="full_softmax"):
    rtask.check_config(cfg)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mvhan_smoke"))
  cfg = _config("smoke,typed,learn_temperature")
  results = tasks.train_and_evaluate(cfg, workdir)
  return workdir, results


def test_smoke_run_learns_and_reports_per_type_metrics(smoke_run):
  workdir, results = smoke_run
  test = results["test"]
  for name in ("mainstream", "family", "niche"):
    assert test[f"{name}/queries"] > 0
    assert 0.0 <= test[f"{name}/HR@50"] <= 1.0
  assert test["mainstream/queries"] + test["family/queries"] + test["niche/queries"] == 943
  # A learning signal: per-type AUC well above a random scorer's 0.5 after 120 steps.
  assert test["targets/AUC"] > 0.6, test
  assert test["targets/HR@50"] == pytest.approx(np.mean([test["family/HR@50"], test["niche/HR@50"]]))


def test_learned_temperature_moves_and_is_logged(smoke_run):
  workdir, _ = smoke_run
  temps = [json.loads(line).get("train/temperature") for line in open(os.path.join(workdir, "metrics.jsonl"))]
  temps = [t for t in temps if t is not None]
  assert len(temps) >= 3
  assert abs(temps[-1] - 0.1) > 1e-3  # initialised at 0.1 and trained


def test_full_softmax_step_loss_is_the_cross_entropy_over_every_item():
  """The pooled default's step (config.loss.kind='full_softmax'): its reported loss is recomputed from
  the model's own encoders: every item's vector, cosine / temperature, cross-entropy at the target."""
  cfg = _config("smoke")
  assert cfg.loss.kind == "full_softmax" and cfg.model.dropout == 0.0  # dropout off: deterministic
  exp = rtask.build_experiment(cfg)
  tx = train.make_optimizer(cfg.optimizer, 10)
  state = rtask.init_state(exp, tx, jax.random.key(0))
  params = jax.tree_util.tree_map(np.asarray, state.params)  # the step donates its state
  batch = next(pipeline.iterate(rtask.train_dataset(exp, 32, seed=0)))
  _, metrics = rtask.make_train_step(exp, tx)(state, batch, exp.tables, jax.random.key(1))
  model = exp.model
  users = np.asarray(model.apply(params, batch, exp.tables, method=model.encode_users), np.float64)
  items = np.asarray(model.apply(params, np.arange(exp.data.num_items), exp.tables, method=model.encode_items),
                     np.float64)
  logits = users @ items.T / cfg.loss.temperature
  top = logits.max(axis=1)
  ce = top + np.log(np.exp(logits - top[:, None]).sum(axis=1)) - logits[np.arange(len(users)), batch["target"]]
  np.testing.assert_allclose(float(metrics["loss"]), ce.mean(), rtol=1e-4)
  assert float(metrics["batch_acc"]) == np.mean(logits.argmax(axis=1) == batch["target"])


def test_full_softmax_is_refused_where_it_is_not_wired():
  cfg = load_config(os.path.join(ROOT, "experiments", "configs", "multitower_ml100k.py") + ":smoke")
  cfg.loss.kind = "full_softmax"  # multi-tower trains with its serving score over sampled candidates
  with pytest.raises(ValueError, match="full_softmax.*sampled_softmax"):
    rtask.build_experiment(cfg)


def test_all_positions_loss_needs_the_causal_behaviour_encoder():
  cfg = _config("smoke")
  cfg.loss.positions = "all"
  with pytest.raises(ValueError, match="behaviour_encoder='causal'"):
    rtask.build_experiment(cfg)
  cfg = _config("smoke,behaviour=causal")
  assert cfg.loss.positions == "all" and cfg.train_examples == "windows"
  exp = rtask.build_experiment(cfg)
  assert exp.model.encodes_positions
  with pytest.raises(ValueError, match="behaviour=causal applies to model=mvhan"):
    _config("smoke,model=mv_dnn,behaviour=causal")
  with pytest.raises(ValueError, match="excludes 'typed'"):
    _config("smoke,typed,behaviour=causal")


def test_pooled_two_tower_on_typed_data_uses_all_items_as_negatives():
  cfg = _config("smoke,model=two_tower")
  exp = rtask.build_experiment(cfg)
  assert exp.type_samplers is None and exp.examples_by_type is None
  batch = next(pipeline.iterate(rtask.train_dataset(exp, 256, seed=0)))
  assert "content_type" not in batch
  # Mixed-type batches (a typed schedule would give exactly one type) ...
  assert len(set(exp.item_type[batch["target"]].tolist())) >= 2
  # ... and one proposal over the whole catalogue: every type has items the sampler can draw.
  probs = np.asarray(exp.sampler.probs)
  for t in (1, 2, 3):
    assert probs[exp.item_type == t].sum() > 0


def test_one_index_over_all_types_and_one_per_type(smoke_run):
  """Serving: the global index, and per-type indexes whose results are all of their type (global ids)."""
  from mvhan_jax import retrieval  # pylint: disable=import-outside-toplevel
  workdir, results = smoke_run
  per_type = results["index"]["types"]
  assert sorted(per_type) == ["family", "mainstream", "niche"]
  assert per_type["family"]["items"] == 131 and per_type["niche"]["items"] == 141
  exp = rtask.build_experiment(_config("smoke,typed,learn_temperature"))
  params, _ = rtask.restore_params(workdir, exp, "best")
  users, _ = rtask.encode_users(exp, params, exp.eval_sets["test"], rows=np.arange(50))
  for t, name in enumerate(("mainstream", "family", "niche"), start=1):
    index = retrieval.load_index(os.path.join(workdir, "index", "types", name))
    ids, _ = index.search(users, 10)
    assert (exp.item_type[ids] == t).all()
    assert per_type[name]["ann_recall@10"] > 0.9
