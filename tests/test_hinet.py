"""HiNet, its layers, the masked multi-scenario loss, AUC / GAUC, and a short real training run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvhan_jax import tasks
from mvhan_jax.configs import load_config
from mvhan_jax.data import synthetic
from mvhan_jax.features import DataSpec, FeatureSpec
from mvhan_jax.ranking import candidates
from mvhan_jax.ranking import data as ranking_data
from mvhan_jax.ranking import layers
from mvhan_jax.ranking import metrics
from mvhan_jax.ranking import models
from mvhan_jax.tasks import ranking as ranking_train
from mvhan_jax import train as train_loop


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_mlp(x, p, g, depth, linear_out=False):
  """Expert g of a StackedMLP, by hand."""
  for layer in range(depth):
    x = x @ np.asarray(p[f"kernel_{layer}"][g]) + np.asarray(p[f"bias_{layer}"][g])
    if not (linear_out and layer == depth - 1):
      x = np.maximum(x, 0)
  return x


def test_sei_matches_numpy_loop_over_groups():
  x = jax.random.normal(jax.random.key(0), (5, 6))
  sei = layers.SEI(num_groups=3, num_sub_experts=4, hidden=(7, 3))
  params = jax.jit(sei.init)(jax.random.key(1), x)["params"]
  out = np.asarray(jax.jit(sei.apply)({"params": params}, x))
  assert out.shape == (5, 3, 3)
  xn = np.asarray(x)
  sub, gate = params["sub_experts"], params["gate"]
  for g in range(3):
    gates = _np_softmax(xn @ np.asarray(gate["kernel_0"][g]) + np.asarray(gate["bias_0"][g]))   # [B, K]
    experts = np.stack([_np_mlp(xn, sub, g * 4 + k, 2) for k in range(4)], axis=1)            # [B, K, D]
    np.testing.assert_allclose(out[:, g], np.einsum("bk,bkd->bd", gates, experts), rtol=1e-5, atol=1e-6)
    assert np.allclose(gates.sum(1), 1.0)


def test_scenario_attention_excludes_own_scenario():
  rng = np.random.default_rng(0)
  weights = _np_softmax(rng.normal(size=(4, 3))).astype(np.float32)
  experts = rng.normal(size=(4, 3, 5)).astype(np.float32)
  scenario = np.array([0, 1, 2, 1])
  out = np.asarray(layers.scenario_attention(jnp.asarray(weights), jnp.asarray(experts), jnp.asarray(scenario)))
  for b in range(4):
    want = sum(weights[b, j] * experts[b, j] for j in range(3) if j != scenario[b])
    np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-6)
  # The own scenario's expert has no influence at all.
  moved = experts.copy()
  moved[np.arange(4), scenario] += 100.0
  np.testing.assert_allclose(
      np.asarray(layers.scenario_attention(jnp.asarray(weights), jnp.asarray(moved), jnp.asarray(scenario))), out,
      rtol=1e-5, atol=1e-5)

  # The module: a = softmax(MLP(emb)), every row a distribution over scenarios.
  san = layers.ScenarioAttention(num_scenarios=3, hidden=(4,))
  emb = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  p = san.init(jax.random.key(0), emb, jnp.asarray(experts), jnp.asarray(scenario))["params"]
  got, a = san.apply({"params": p}, emb, jnp.asarray(experts), jnp.asarray(scenario))
  h = np.maximum(np.asarray(emb) @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"]), 0)
  want_a = _np_softmax(h @ np.asarray(p["Dense_1"]["kernel"]) + np.asarray(p["Dense_1"]["bias"]))
  np.testing.assert_allclose(np.asarray(a), want_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got), np.asarray(layers.scenario_attention(a, jnp.asarray(experts),
                                                                                     jnp.asarray(scenario))), rtol=1e-6)


@pytest.mark.parametrize("final", [True, False])
def test_cgc_gates_match_numpy(final):
  x = jax.random.normal(jax.random.key(2), (4, 6))
  cgc = layers.CGC(num_heads=3, num_specific=2, num_shared=2, hidden=(5, 3), final=final)
  params = jax.jit(cgc.init)(jax.random.key(3), x)["params"]
  got = jax.jit(cgc.apply)({"params": params}, x)
  heads = np.asarray(got if final else got[0])
  xn = np.asarray(x)
  shared = [_np_mlp(xn, params["shared"], e, 2) for e in range(2)]
  specific = [_np_mlp(xn, params["specific"], e, 2) for e in range(6)]
  for h in range(3):
    gate = _np_softmax(xn @ np.asarray(params["gate"]["kernel_0"][h]) + np.asarray(params["gate"]["bias_0"][h]))
    candidates = np.stack(specific[2 * h:2 * h + 2] + shared, axis=1)      # own 2, then the 2 shared
    np.testing.assert_allclose(heads[:, h], np.einsum("be,bed->bd", gate, candidates), rtol=1e-5, atol=1e-6)
  if not final:
    g = params["shared_gate"]
    gate = _np_softmax(xn @ np.asarray(g["kernel_0"][0]) + np.asarray(g["bias_0"][0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.einsum("be,bed->bd", gate, np.stack(specific + shared, 1)),
                               rtol=1e-5, atol=1e-6)


SPECS = dict(user_specs=(FeatureSpec("age", "categorical", 5),),
             item_specs=(FeatureSpec("genres", "multi", 4),), num_users=6, num_items=9, num_scenarios=3)


def _tiny_batch(scenario):
  b = len(scenario)
  r = np.random.default_rng(0)
  batch = {"user": r.integers(0, 6, b).astype(np.int32), "item": r.integers(0, 9, b).astype(np.int32),
           "scenario": np.asarray(scenario, np.int32), "history": r.integers(0, 9, (b, 4)).astype(np.int32),
           "history_len": r.integers(0, 5, b).astype(np.int32),
           "click": (r.random(b) < 0.5).astype(np.float32), "ctcvr": (r.random(b) < 0.3).astype(np.float32)}
  tables = {"user": {"age": jnp.asarray(r.integers(0, 5, 6), jnp.int32)},
            "item": {"genres": jnp.asarray(r.integers(0, 4, (9, 2)), jnp.int32)}}
  return batch, tables


def _grads(model, batch, tables):
  params = jax.jit(model.init)(jax.random.key(0), batch, tables)

  def loss(p):
    return ranking_train.masked_ranking_loss(model.apply(p, batch, tables), batch, (1.0, 1.0))[0]

  return jax.jit(jax.grad(loss))(params)["params"]


def _rows(a, rows):
  return float(np.abs(np.asarray(a)[list(rows)]).max())


def test_masked_loss_gives_other_scenarios_zero_gradient():
  # Every sample in scenario 1 (not 0, so that selecting expert 0 for everyone would be caught).
  batch, tables = _tiny_batch([1, 1, 1, 1, 1])
  t = len(models.TASKS)
  own_heads, other_heads = range(t, 2 * t), [*range(0, t), *range(2 * t, 3 * t)]   # head = scenario * T + task
  for use_san in (True, False):
    g = _grads(models.HiNet(**SPECS, embed_dim=4, sei_hidden=(6, 4), expert_hidden=(6, 4), tower_hidden=(3,),
                            num_sub_experts=2, use_san=use_san), batch, tables)
    towers, cgc = g["towers"], g["cgc"]
    assert _rows(towers["kernel_0"], other_heads) == 0.0 and _rows(towers["kernel_1"], other_heads) == 0.0
    assert _rows(cgc["gate"]["kernel_0"], other_heads) == 0.0
    specific_other = [h * 2 + k for h in other_heads for k in range(2)]   # 2 CGC experts per head
    assert _rows(cgc["specific"]["kernel_0"], specific_other) == 0.0
    assert _rows(towers["kernel_0"], own_heads) > 0 and _rows(cgc["gate"]["kernel_0"], own_heads) > 0
    sei = g["sei_specific"]["sub_experts"]["kernel_0"]            # [S*K, in, h]: 2 sub-experts per scenario
    if use_san:   # the SAN reads the other scenarios' experts: they do learn from scenario 1's samples
      assert _rows(sei, [0, 1, 4, 5]) > 0
    else:
      assert _rows(sei, [0, 1, 4, 5]) == 0.0 and _rows(sei, [2, 3]) > 0
  g = _grads(models.STARModel(**SPECS, embed_dim=4, expert_hidden=(6, 4), tower_hidden=(3,)), batch, tables)
  assert _rows(g["star"]["specific_kernel_0"], [0, 2]) == 0.0 and _rows(g["star"]["specific_kernel_0"], [1]) > 0
  assert _rows(g["towers"]["kernel_0"], other_heads) == 0.0


def test_masked_loss_equals_own_head_bce():
  batch, _ = _tiny_batch([0, 2, 1, 2, 0])
  logits = np.random.default_rng(1).normal(size=(5, 3, 2)).astype(np.float32)
  loss, per_head = ranking_train.masked_ranking_loss(jnp.asarray(logits), batch, (1.0, 0.5))
  sig = 1 / (1 + np.exp(-logits.astype(np.float64)))
  total, per = 0.0, np.zeros((3, 2))
  for b, s in enumerate(batch["scenario"]):
    p_ctr, p_ctcvr = sig[b, s, 0], sig[b, s, 0] * sig[b, s, 1]        # ESMM: pCTCVR = pCTR * pCVR
    y1, y2 = batch["click"][b], batch["ctcvr"][b]
    l1 = -(y1 * np.log(p_ctr) + (1 - y1) * np.log(1 - p_ctr))
    l2 = -(y2 * np.log(p_ctcvr) + (1 - y2) * np.log(1 - p_ctcvr))
    total += l1 + 0.5 * l2
    per[s] += (l1, l2)
  np.testing.assert_allclose(float(loss), total / 5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(per_head), per / np.bincount(batch["scenario"])[:, None], rtol=1e-5)


def test_ctcvr_is_ctr_times_cvr():
  batch, tables = _tiny_batch([0, 1, 2, 1])
  model = models.SharedBottom(**SPECS, embed_dim=4, expert_hidden=(6, 4), tower_hidden=(3,))
  params = jax.jit(model.init)(jax.random.key(0), batch, tables)
  p = jax.jit(lambda q: models.predict(model, q, batch, tables))(params)
  np.testing.assert_allclose(np.asarray(p["ctcvr"]), np.asarray(p["ctr"]) * np.asarray(p["cvr"]), rtol=1e-6)
  logits = np.asarray(model.apply(params, batch, tables))
  own = logits[np.arange(4), batch["scenario"]]
  np.testing.assert_allclose(np.asarray(p["ctr"]), 1 / (1 + np.exp(-own[:, 0])), rtol=1e-5)


def test_every_model_builds_from_config():
  batch, tables = _tiny_batch([0, 1, 2])

  spec = DataSpec(name="tiny", num_users=6, num_items=9, user_specs=SPECS["user_specs"],
                  item_specs=SPECS["item_specs"], scenario_names=("a", "b", "c"))

  for name in models.MODELS:
    cfg = load_config(f"experiments/configs/hinet_ml100k.py:model={name}").model
    model = models.build_ranking_model(cfg, spec)
    # Shapes only (tracing, no compilation): the layers' values are checked by the tests above.
    logits = jax.eval_shape(lambda b, t: model.apply(model.init(jax.random.key(0), b, t), b, t), batch, tables)
    assert logits.shape == (3, 3, 2), name
  with pytest.raises(ValueError, match="model=hinet"):
    load_config("experiments/configs/hinet_ml100k.py:model=mmoe,no_san")


def test_auc_and_gauc_hand_computed():
  labels = np.array([1, 0, 1, 0, 0])
  scores = np.array([0.9, 0.8, 0.3, 0.3, 0.1])
  # Positive 0.9 beats all 3 negatives; positive 0.3 beats 0.1, ties 0.3 (1/2), loses to 0.8.
  assert metrics.auc(labels, scores) == pytest.approx(4.5 / 6)
  assert np.isnan(metrics.auc([1, 1], [0.2, 0.3]))
  # User 0: AUC 1/2 over 3 impressions; user 1: AUC 1 over 2; user 2 has no positive: skipped.
  labels = np.array([1, 0, 0, 1, 0, 0])
  scores = np.array([0.9, 0.8, 0.95, 0.3, 0.1, 0.5])
  users = np.array([0, 0, 0, 1, 1, 2])
  assert metrics.gauc(labels, scores, users) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)


def test_synthetic_histories_hold_only_earlier_clicks():
  # Two users; user 0: items 5 (click), 6 (no), 7 (click), 8; user 1: 1 (click), 2.
  user = np.array([0, 0, 0, 0, 1, 1])
  item = np.array([5, 6, 7, 8, 1, 2])
  click = np.array([1, 0, 1, 1, 1, 0])
  hist, hlen = ranking_data.click_histories(user, item, click, np.array([0, 4, 6]), maxlen=1)
  np.testing.assert_array_equal(hlen, [0, 1, 1, 1, 0, 1])
  np.testing.assert_array_equal(hist[:, 0], [0, 5, 5, 7, 0, 1])


@pytest.fixture(scope="module")
def synthetic_smoke():
  cfg = load_config("experiments/configs/hinet_synthetic.py:smoke")
  return cfg, ranking_data.load_ranking_data(cfg)


def test_synthetic_oracle_is_the_generating_probability(synthetic_smoke):
  cfg, data = synthetic_smoke
  world = synthetic.generate_world(ranking_data.world_config(cfg.dataset.world.to_dict()))
  specs = world.config.scenarios
  assert [s.click_specific for s in specs] == [0.0, 3.0, 3.0]
  vectors, latent, quality = world.skeleton.scenario_vectors, world.items["latent"], world.items["quality"]
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  for split in ranking_data.SPLITS:
    rows, oracle = data.splits[split], data.oracles["true"][split]
    for r in np.random.default_rng(0).choice(len(rows["user"]), 40, replace=False):
      u, i, s = int(rows["user"][r]), int(rows["item"][r]), int(rows["scenario"][r])
      spec = specs[s]
      # Affinity by hand: the best cosine between the user's interest topics and the item.
      topics = world.users["interests"][u]
      tv = world.skeleton.topic_vectors[topics[topics >= 0]]
      aff = np.max(tv @ latent[i]) / np.linalg.norm(latent[i])
      taste = vectors[s] @ latent[i] / np.linalg.norm(latent[i])
      p_click = sigmoid(spec.click_bias + spec.click_slope * aff + spec.click_specific * taste)
      p_conv = sigmoid(spec.conv_bias + spec.conv_shared * (quality[i] + aff) + spec.conv_specific * taste)
      assert oracle["ctr"][r] == pytest.approx(p_click, rel=1e-4)
      assert oracle["ctcvr"][r] == pytest.approx(p_click * p_conv, rel=1e-4)
  # The rich-scenario oracle is the truth on the rich scenario only.
  rich, true, sc = (np.concatenate(x) for x in zip(*[
      (data.oracles["rich_scenario"][s]["ctr"], data.oracles["true"][s]["ctr"], data.splits[s]["scenario"])
      for s in ranking_data.SPLITS]))
  np.testing.assert_array_equal(rich[sc == 0], true[sc == 0])
  assert np.mean(np.abs(rich[sc > 0] - true[sc > 0])) > 0.05


def test_world_config_names_bad_scenario_field():
  good = {"num_users": 50, "num_items": 500, "scenarios": ({"name": "only", "type_weights": {"article": 1.0, "novel": 1.0, "short": 1.0}},)}
  assert ranking_data.world_config(good).scenarios[0].name == "only"
  bad = {"scenarios": ({"name": "only", "type_weights": {"article": 1.0}, "click_slop": 2.0},)}
  with pytest.raises(ValueError, match=r"config.dataset.world.scenarios\[0\].*click_slop"):
    ranking_data.world_config(bad)


def test_pool_negatives_have_no_future_leak():
  # User 0 rates 0..4 in time order (train 0, 1, 2; valid 3; test 4), user 1 rates 5..9.
  from mvhan_jax.data.types import InteractionData  # pylint: disable=import-outside-toplevel
  data = InteractionData("tiny", 2, 12, {"occupation": np.array([1, 2], np.int32)}, {}, {"occupation": 22},
                         user=np.repeat(np.arange(2), 5).astype(np.int32), item=np.arange(10, dtype=np.int32),
                         timestamp=np.arange(10, dtype=np.int64), rating=np.full(10, 5.0, np.float32))
  table = np.full((2, 4), -1, np.int32)
  table[0, :2] = [4, 1]      # user 0: its own test item and a training item
  table[1, :2] = [10, 11]
  calls = []

  def pool(users, history, history_len):
    calls.append((users.copy(), history_len.copy()))
    return table[users]

  d = ranking_data.movielens_ranking(data, maxlen=5, num_negatives=1, eval_negatives=1, negative_pool=pool)
  # One call per split, with every impression's own history: training rows at every time point.
  assert [len(u) for u, _ in calls] == [6, 2, 2]
  np.testing.assert_array_equal(np.sort(calls[0][1]), [0, 0, 1, 1, 2, 2])
  train = d.splits["train"]
  neg = train["click"] == 0
  # At training time the test item is an unknown future: it is a legitimate (and here the only)
  # negative; the training item 1 never is.
  assert set(train["item"][neg & (train["user"] == 0)].tolist()) == {4}
  assert set(train["item"][neg & (train["user"] == 1)].tolist()) <= {10, 11}
  # Evaluation negatives are true non-interactions: user 0's pool has none left, so they fall back
  # to popularity sampling among items user 0 never rated.
  for split in ("valid", "test"):
    s = d.splits[split]
    items = s["item"][(s["click"] == 0) & (s["user"] == 0)]
    assert len(items) == 1 and items[0] >= 5


def test_retrieval_negatives_come_from_the_caller(tmp_path):
  # ranking.data loads no model: the retrieval pool is computed by ranking.candidates and passed in.
  hard = load_config("experiments/configs/hinet_ml100k.py:negatives=retrieval")
  hard.dataset.retrieval_workdir = str(tmp_path / "untrained")
  with pytest.raises(ValueError, match=r"negative_pool=mvhan_jax\.ranking\.candidates\.negative_pool"):
    ranking_data.load_ranking_data(hard)
  with pytest.raises(FileNotFoundError, match="retrieval_workdir"):
    candidates.negative_pool(hard)
  popularity = load_config("experiments/configs/hinet_ml100k.py")
  assert candidates.negative_pool(popularity) is None
  with pytest.raises(ValueError, match="pass no negative_pool"):
    ranking_data.load_ranking_data(popularity, lambda users, history, history_len: None)
  popularity.dataset.negatives = "hardest"
  for load in (candidates.negative_pool, ranking_data.load_ranking_data):
    with pytest.raises(ValueError, match="config.dataset.negatives='hardest'"):
      load(popularity)


@pytest.fixture(scope="module")
def movielens_smoke():
  cfg = load_config("experiments/configs/hinet_ml100k.py:smoke")
  cfg.total_steps = 240  # 60 steps leave CTR AUC at chance (0.47); 240 reach ~0.68
  cfg.optimizer.lr = 5e-3
  cfg.optimizer.warmup_steps = 10
  cfg.batch_size = 512
  cfg.eval_every_steps = 240
  return cfg, ranking_data.load_ranking_data(cfg)


def test_movielens_ranking_split_has_no_future_leak(movielens_smoke):
  _, data = movielens_smoke
  train, test = data.splits["train"], data.splits["test"]
  assert data.num_scenarios == 4 and data.summary()["test"]["clicks"] == [704, 72, 79, 88]
  # A user's test item is never a training positive, nor in any training history of that user.
  pos = train["click"] > 0
  test_pos = test["click"] > 0
  train_pairs = set(zip(train["user"][pos].tolist(), train["item"][pos].tolist()))
  assert not any((u, i) in train_pairs for u, i in zip(test["user"][test_pos].tolist(), test["item"][test_pos].tolist()))
  first = {u: i for u, i in zip(test["user"][test_pos].tolist(), test["item"][test_pos].tolist())}
  for r in np.flatnonzero(pos)[:5000]:
    assert first[int(train["user"][r])] not in train["history"][r, :train["history_len"][r]]


def test_training_learns_and_resumes_exactly(movielens_smoke, tmp_path):
  cfg, data = movielens_smoke
  full = tasks.train_and_evaluate(cfg, str(tmp_path / "full"), data=data)
  # Real MovieLens, 240 steps: both tasks well above chance on the held-out test items.
  assert full["test"]["ctr/AUC/all"] > 0.6 and full["test"]["ctcvr/AUC/all"] > 0.6
  assert full["test"]["ctr/GAUC/all"] > 0.6

  cut = cfg.copy_and_resolve_references()
  cut.stop_at_step = 120
  assert tasks.train_and_evaluate(cut, str(tmp_path / "cut"), data=data) is None
  resumed = tasks.train_and_evaluate(cfg, str(tmp_path / "cut"), data=data)
  exp = ranking_train.build_ranking_experiment(cfg, data)
  a, _ = ranking_train.restore_params(str(tmp_path / "full"), exp, "latest")
  b, _ = ranking_train.restore_params(str(tmp_path / "cut"), exp, "latest")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert resumed["test"] == full["test"]


def test_rerank_positions_and_candidate_auc():
  from mvhan_jax.ranking import rerank  # pylint: disable=import-outside-toplevel
  candidates = np.array([[7, 3, 5, 9], [1, 2, 4, 6], [8, 0, -1, -1]])
  targets = np.array([5, 9, 0])
  # Retrieval order: target at position 2, absent (= 4, a miss), at position 1.
  np.testing.assert_array_equal(rerank.target_positions(candidates, targets), [2, 4, 1])
  scores = np.array([[0.1, 0.2, 0.9, 0.3], [0.4, 0.3, 0.2, 0.1], [0.5, 0.5, -np.inf, -np.inf]])
  reranked = rerank.rerank(candidates, scores)
  np.testing.assert_array_equal(reranked[0], [5, 9, 3, 7])
  np.testing.assert_array_equal(reranked[2, :2], [8, 0])       # a tie keeps the retrieval order
  np.testing.assert_array_equal(rerank.target_positions(reranked, targets), [0, 4, 1])
  # AUC of the target against the other 3 candidates: position 0 -> 1, position 1 -> 2/3.
  assert rerank.candidate_auc(np.array([0, 1]), 4) == pytest.approx((1 + 2 / 3) / 2)
