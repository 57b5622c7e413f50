"""SEMINAR: the InfoNCE forms against hand-computed values, PSU learning signal, the pretrained
embedder restore and freeze, GSU top-K masking, exact and PQ scores, full-corpus ranks against brute
force, config checks, a kill -9 and resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvhan_jax import tasks
from mvhan_jax.configs import load_config
from mvhan_jax.models import pq
from mvhan_jax.seminar import data as sdata
from mvhan_jax.seminar import losses
from mvhan_jax.seminar import model as smodel
from mvhan_jax.tasks import seminar as strain
from mvhan_jax import train as train_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _cos(a, b):
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return a @ b.T


def test_info_nce_from_logits_hand_value():
  # Row 0: logits (2, 0, 0), label 0 -> -log(e^2 / (e^2 + 2)); row 1: (1, 1, 0) label 1 with
  # column 2 masked -> -log(1/2) = log 2; row 2 has weight 0.
  logits = jnp.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [5.0, -5.0, 0.0]])
  mask = jnp.array([[True, True, True], [True, True, False], [True, True, True]])
  got = losses.info_nce_from_logits(logits, jnp.array([0, 1, 1]), jnp.array([1.0, 1.0, 0.0]), mask)
  want = (-np.log(np.exp(2) / (np.exp(2) + 2)) + np.log(2)) / 2
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_alignment_is_symmetric_and_divides_by_tau():
  a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32)
  b = np.array([[1.0, 0.2], [0.3, 1.0], [-1.0, 1.0]], np.float32)
  tau = 0.05
  s = _cos(a, b) / tau                                         # divided, not multiplied, by tau
  fwd = -np.mean(np.diag(_np_log_softmax(s)))
  bwd = -np.mean(np.diag(_np_log_softmax(s.T)))
  valid = jnp.ones(3, bool)
  got = losses.symmetric_info_nce(jnp.asarray(a), jnp.asarray(b), tau, valid)
  np.testing.assert_allclose(float(got), 0.5 * (fwd + bwd), rtol=1e-5)
  swapped = losses.symmetric_info_nce(jnp.asarray(b), jnp.asarray(a), tau, valid)
  np.testing.assert_allclose(float(swapped), float(got), rtol=1e-6)
  # A multiplied-by-tau logit (the released code's bug) gives a different, near log(3) value.
  assert abs(float(got) - np.log(3)) > 0.5
  # Three modalities: the mean over the 3 pairs.
  c = np.array([[0.5, 1.0], [1.0, -1.0], [0.0, 1.0]], np.float32)
  modal = jnp.asarray(np.stack([a, b, c], 1))
  pairs = [losses.symmetric_info_nce(jnp.asarray(x), jnp.asarray(y), tau, valid) for x, y in ((a, b), (a, c), (b, c))]
  np.testing.assert_allclose(float(losses.alignment_loss(modal, tau, valid)), float(sum(pairs) / 3), rtol=1e-6)


def test_symmetric_info_nce_masks_padded_rows_in_both_directions():
  # Row 3 is padding (item 0's embedding in a window). It is neither an anchor nor a candidate in
  # either direction: the b -> a direction's candidates are the valid rows of a, not a row mask.
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 8)).astype(np.float32)
  b = rng.normal(size=(5, 8)).astype(np.float32)
  valid = np.array([True, True, True, False, True])
  ids = np.array([7, 8, 7, 0, 9])  # rows 0 and 2 are the same object: an accidental hit
  tau = 0.5

  def ref(a, b, ids):
    s = _cos(a, b) / tau
    keep = np.flatnonzero(valid)

    def direction(s):
      out = []
      for r in keep:
        cols = [c for c in keep if c == r or ids is None or ids[c] != ids[r]]
        out.append(-_np_log_softmax(s[r, cols])[cols.index(r)])
      return np.mean(out)

    return 0.5 * (direction(s) + direction(s.T))

  for id_arg in (None, ids):
    got = losses.symmetric_info_nce(jnp.asarray(a), jnp.asarray(b), tau, jnp.asarray(valid),
                                    None if id_arg is None else jnp.asarray(id_arg))
    np.testing.assert_allclose(float(got), ref(a, b, id_arg), rtol=1e-5)
    for x in (a, b):  # editing only the padded row of either view changes nothing
      x_saved = x[3].copy()
      x[3] = 10.0 * rng.normal(size=8)
      again = losses.symmetric_info_nce(jnp.asarray(a), jnp.asarray(b), tau, jnp.asarray(valid),
                                        None if id_arg is None else jnp.asarray(id_arg))
      np.testing.assert_allclose(float(again), float(got), rtol=1e-6)
      x[3] = x_saved


def test_relevance_loss_hand_value():
  # One sequence of 3 positions; position 0 and 2 are search events, position 1 is browsing.
  q = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], np.float32)  # row 1 is not a search event
  it = np.array([[1.0, 0.5], [0.0, 1.0], [1.0, 1.0]], np.float32)
  ids = np.array([[4, 5, 6]])
  tau = 0.1
  s = _cos(q, it) / tau
  want = -(_np_log_softmax(s[0])[0] + _np_log_softmax(s[2])[2]) / 2
  got = losses.relevance_loss(jnp.asarray(q[None]), jnp.asarray(it[None]), jnp.array([[True, False, True]]),
                              jnp.ones((1, 3), bool), jnp.asarray(ids), tau)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # The same item at another position is not a negative (accidental hit masked).
  ids2 = np.array([[4, 5, 4]])
  s_row0 = np.array([s[0, 0], s[0, 1]])
  want2 = -(_np_log_softmax(s_row0)[0] + _np_log_softmax(np.array([s[2, 1], s[2, 2]]))[1]) / 2
  got2 = losses.relevance_loss(jnp.asarray(q[None]), jnp.asarray(it[None]), jnp.array([[True, False, True]]),
                               jnp.ones((1, 3), bool), jnp.asarray(ids2), tau)
  np.testing.assert_allclose(float(got2), want2, rtol=1e-5)


def test_next_pair_loss_hand_value():
  pred = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], np.float32)
  pos = np.array([[[9.0, 9.0], [2.0, 0.0], [0.0, 3.0]]], np.float32)
  neg = np.array([[[9.0, 9.0], [-1.0, 0.0], [0.0, 1.0]]], np.float32)
  valid = np.array([[True, True, False]])  # only t = 0 has a valid successor
  sp = lambda x: np.log1p(np.exp(x))  # noqa: E731
  want = sp(-2.0) + sp(-1.0)            # -log sigmoid(<pred_0, pos_1>) - log(1 - sigmoid(<pred_0, neg_1>))
  got = losses.next_pair_loss(jnp.asarray(pred), jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(valid))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.fixture(scope="module")
def smoke():
  cfg = load_config("experiments/configs/seminar_synthetic.py:smoke")
  exp = strain.build_experiment(cfg)
  return cfg, exp


def test_data_split_and_windows(smoke):
  _, exp = smoke
  d = exp.data
  test = d.eval_queries["test"]
  valid = d.eval_queries["valid"]
  assert np.array_equal(test.end, d.offsets[1:][test.user] - 1)
  assert np.array_equal(valid.end, test.end - 1)
  # Training targets stay strictly before the validation event (no future leakage).
  src = sdata.finetune_source(d, 16, 4, 4, 0)
  assert np.all(src.end < d.train_end()[src.user])
  b = src.take(np.arange(3))
  for r in range(3):
    n = b["history_len"][r]
    np.testing.assert_array_equal(b["history_item"][r, :n], d.item[src.end[r] - n:src.end[r]])
    assert np.all(b["history_item"][r, n:] == 0)
  assert (d.query > 0).any() and not (d.query > 0).all()  # search and browsing events


def test_psu_pretraining_lowers_its_loss(smoke):
  cfg, exp = smoke
  src = sdata.psu_source(exp.data, 16, 4, 0)
  tx = strain._psu_optimizer(cfg, 40)
  state = strain._psu_init(exp, tx, jax.random.key(0), strain.example_batch(src, 2))
  step = strain.make_psu_step(exp, tx)
  batch = src.take(np.arange(16))
  neg = jnp.zeros_like(batch["history_item"])
  before = float(strain.psu_loss(exp.psu, state.params, batch, neg, exp.tables, cfg.pretrain)[0])
  for i in range(40):
    state, m = step(state, src.take(np.arange(16 * (i % 4), 16 * (i % 4) + 16)), exp.tables, jax.random.key(1))
  after = float(strain.psu_loss(exp.psu, state.params, batch, neg, exp.tables, cfg.pretrain)[0])
  assert after < before - 0.3, (before, after)


def test_restore_loads_pretrained_embedder_and_freeze_keeps_it(smoke, tmp_path):
  cfg, exp = smoke
  cfg = cfg.copy_and_resolve_references()
  cfg.pretrain.total_steps = 3
  cfg.pretrain.freeze = True
  exp = dataclasses.replace(exp, config=cfg)
  path = strain.pretrain(exp, str(tmp_path))
  emb = strain.load_pretrained_embedder(exp, path)
  src = sdata.finetune_source(exp.data, cfg.maxlen, 4, 4, 0)
  tx = strain.downstream_optimizer(cfg, 10)
  fresh = strain.init_state(exp, tx, jax.random.key(0), strain.example_batch(src, 2))
  state = strain.init_state(exp, tx, jax.random.key(0), strain.example_batch(src, 2), emb)
  for a, b in zip(jax.tree.leaves(emb), jax.tree.leaves(state.params["params"]["embedder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(fresh.params["params"]["embedder"]["item_embed"]["embedding"]),
                         np.asarray(emb["item_embed"]["embedding"]))
  step = strain.make_train_step(exp, tx)
  before = jax.tree.map(np.asarray, state.params)
  for i in range(3):
    state, _ = step(state, src.take(np.arange(16 * i, 16 * i + 16)), (exp.tables, exp.negatives), jax.random.key(2))
  for a, b in zip(jax.tree.leaves(before["params"]["embedder"]), jax.tree.leaves(state.params["params"]["embedder"])):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert not np.allclose(before["params"]["w_query"], np.asarray(state.params["params"]["w_query"]))


def test_topk_shapes_and_padding_never_attended(smoke):
  cfg, exp = smoke
  src = sdata.finetune_source(exp.data, cfg.maxlen, 4, 4, 0)
  tx = strain.downstream_optimizer(cfg, 10)
  state = strain.init_state(exp, tx, jax.random.key(0), strain.example_batch(src, 2))
  batch = src.take(np.arange(4))
  batch["history_len"] = np.array([3, 8, 20, 64], np.int32)   # 3 < top_k = 8
  cand = jnp.asarray(np.array([[1, 2, 3]] * 4, np.int32))
  logits, (idx, valid) = exp.model.apply(state.params, batch, cand, exp.tables, None, "exact", True)
  h, k = cfg.model.heads, cfg.model.top_k
  assert logits.shape == (4, 3) and idx.shape == (4, 3 * h, k) and valid.shape == (4, 3 * h, k)
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert np.array_equal(valid, idx < batch["history_len"][:, None, None])
  assert valid[0].sum(-1).max() == 3 and valid[1:].all()
  # Changing the padded positions' items and queries changes nothing.
  other = dict(batch)
  hi = batch["history_item"].copy()
  hi[0, 3:] = 7
  other["history_item"] = hi
  l2 = exp.model.apply(state.params, other, cand, exp.tables, None, "exact")
  np.testing.assert_allclose(np.asarray(l2), np.asarray(logits), rtol=1e-5, atol=1e-6)
  # The PQ path: same shapes and masks; its two scorings (table look-ups of the catalogue codes,
  # dot products with the decoded pair keys) give the same scores, close to the exact ones.
  cb = strain.train_codebooks(exp, state.params, jax.random.key(3))
  m, d = len(exp.data.modality_names), cfg.model.dim
  assert cb.shape == (m + 1, cfg.model.pq_subspaces, cfg.model.pq_centroids, d // cfg.model.pq_subspaces)
  lut_model = exp.model.clone(pq_scoring="lut")
  _, (i1, v1) = exp.model.apply(state.params, batch, cand, exp.tables, cb, "pq", True)
  _, (i2, v2) = lut_model.apply(state.params, batch, cand, exp.tables, cb, "pq", True)
  assert i1.shape == idx.shape and np.array_equal(np.asarray(v1), valid) and np.array_equal(np.asarray(v2), valid)
  q = jax.random.normal(jax.random.key(4), (4, 2, m, d))
  scores = {s: mdl.apply(state.params, q, batch, cb, exp.tables, method=type(mdl).pq_scores)
            for s, mdl in (("decoded", exp.model), ("lut", lut_model))}
  scale = float(jnp.abs(scores["decoded"]).max())
  np.testing.assert_allclose(np.asarray(scores["lut"]), np.asarray(scores["decoded"]), rtol=0, atol=1e-5 * scale)
  keys, _, _ = exp.model.apply(state.params, batch, exp.tables, method=type(exp.model).encode_history)
  w = state.params["params"]["embedder"]["gate_logits"]
  exact = pq.multimodal_exact_scores(q, keys, jax.nn.softmax(w))
  assert np.corrcoef(np.asarray(exact).ravel(), np.asarray(scores["decoded"]).ravel())[0, 1] > 0.95
  # 'sdc' (queries quantised too, centroid-centroid tables) = 'decoded' scores of the decoded queries.
  sdc_model = exp.model.clone(pq_scoring="sdc")
  sdc = sdc_model.apply(state.params, q, batch, cb, exp.tables, method=type(sdc_model).pq_scores)
  q_dec = pq.multimodal_decode(cb[:m], pq.multimodal_encode(cb[:m], q))
  ref = exp.model.apply(state.params, q_dec, batch, cb, exp.tables, method=type(exp.model).pq_scores)
  np.testing.assert_allclose(np.asarray(sdc), np.asarray(ref), rtol=0, atol=1e-5 * scale)
  _, (i3, v3) = sdc_model.apply(state.params, batch, cand, exp.tables, cb, "pq", True)
  assert np.array_equal(np.asarray(v3), valid)
  # 'rescored' (the module default): PQ candidates, exact scores on them. With every position a
  # candidate it is the exact selection; with fewer, the same valid slots and live positions only.
  assert smodel.SeminarModel.pq_scoring == "rescored"
  for r, must_equal in ((cfg.maxlen, True), (k, False)):
    res_model = exp.model.clone(pq_scoring="rescored", pq_candidates=r)
    _, (i4, v4) = res_model.apply(state.params, batch, cand, exp.tables, cb, "pq", True)
    assert np.array_equal(np.asarray(v4), valid)
    i4 = np.asarray(i4)
    assert (i4[v4] < np.broadcast_to(batch["history_len"][:, None, None], i4.shape)[v4]).all()
    if must_equal:
      assert pq.recall_at_k(i4, idx, valid) == 1.0


def test_full_corpus_ranks_equal_brute_force():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, (6, 12)).astype(np.float32)   # many ties
  targets = rng.integers(0, 12, 6)
  excl = [np.setdiff1d(rng.choice(12, 4, replace=False), [t]) for t in targets]
  indptr = np.concatenate([[0], np.cumsum([len(e) for e in excl])])
  got = strain.full_ranks(scores, targets, indptr, np.concatenate(excl))
  for q in range(6):
    others = [i for i in range(12) if i != targets[q] and i not in set(excl[q])]
    assert got[q] == sum(scores[q, i] >= scores[q, targets[q]] for i in others)


def test_non_finite_scores_are_refused_not_ranked_first(smoke):
  # A NaN target score compares false with every other score: counted as "#{s_i >= s_target}" it
  # would get rank 0 (HR = 1), which is how a diverged model used to look perfect.
  scores = np.array([[0.1, np.nan, 0.3], [0.2, 0.5, 0.1]], np.float32)
  with pytest.raises(ValueError, match="valid split: full-corpus scores hold 1 NaN or inf values \\(first in row 0\\)"):
    strain.full_ranks(scores, np.array([1, 0]), np.array([0, 0, 0]), np.array([], np.int32), split="valid")
  cfg, exp = smoke
  src = sdata.finetune_source(exp.data, cfg.maxlen, 4, 4, 0)
  state = strain.init_state(exp, strain.downstream_optimizer(cfg, 10), jax.random.key(0), strain.example_batch(src, 2))
  nan_params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                            state.params)
  with pytest.raises(ValueError, match="test split: sampled-candidate scores hold"):
    strain.evaluate(exp, nan_params, "test", "exact")


def test_evaluate_full_corpus_matches_scoring_every_item(smoke):
  cfg, exp = smoke
  src = sdata.finetune_source(exp.data, cfg.maxlen, 4, 4, 0)
  state = strain.init_state(exp, strain.downstream_optimizer(cfg, 10), jax.random.key(0), strain.example_batch(src, 2))
  m = strain.evaluate(exp, state.params, "test", "exact")
  eq = exp.data.eval_queries["test"]
  hist = sdata.windows(exp.data.item, exp.data.query, exp.data.offsets[eq.user], eq.end, cfg.maxlen)
  n_items = exp.data.num_items
  ranks = []
  for q in range(len(eq)):
    b = {k: v[q:q + 1] for k, v in hist.items()}
    s = np.asarray(exp.model.apply(state.params, b, jnp.arange(n_items)[None], exp.tables, None, "exact"))[0]
    ex = set(eq.exclude_indices[eq.exclude_indptr[q]:eq.exclude_indptr[q + 1]].tolist())
    t = eq.target[q]
    ranks.append(sum(s[i] >= s[t] - 1e-6 for i in range(n_items) if i != t and i not in ex))
  want_hr = np.mean(np.array(ranks) < 10)
  np.testing.assert_allclose(m["full/HR@10"], want_hr, atol=1.5 / len(eq))


def test_popularity_negatives_and_their_nce_correction(smoke):
  cfg, exp = smoke
  assert np.abs(np.asarray(exp.negatives["log_nq"])).max() < 1e-5          # uniform: no correction
  cfg = cfg.copy_and_resolve_references()
  cfg.train.negatives, cfg.train.negative_power = "popularity", 0.5
  pexp = strain.build_experiment(cfg, exp.data)
  d = exp.data
  counts = np.bincount(d.item[strain._training_events(d)], minlength=d.num_items)
  q = np.sqrt(counts + 1.0) / np.sqrt(counts + 1.0).sum()
  np.testing.assert_allclose(np.asarray(pexp.negatives["log_nq"]), np.log(d.num_items * q), rtol=1e-4, atol=1e-5)
  batch = {"target": jnp.zeros((50_000,), jnp.int32)}
  cand, valid = strain._candidates(batch, jax.random.key(0), pexp.negatives["cdf"], 4)
  freq = np.bincount(np.asarray(cand[:, 1:]).ravel(), minlength=d.num_items) / 200_000
  # Draws follow Q (L1 sampling noise ~0.04 here), not the uniform distribution.
  assert np.abs(freq - q).sum() < 0.08 < 0.5 * np.abs(freq - 1.0 / d.num_items).sum()
  assert np.array_equal(np.asarray(valid[:, 1:]), np.asarray(cand[:, 1:]) != 0)
  # The logit subtracts log(N Q(i)): a popular item's logit is lowered, a rare one's raised.
  log_nq = jnp.log(jnp.array([2.0, 0.5, 1.0]))
  got = strain.nce_logits(jnp.array([[1.0, 1.0, 1.0]]), jnp.array([[0, 1, 2]]), log_nq)
  np.testing.assert_allclose(np.asarray(got), [[1 - np.log(2), 1 + np.log(2), 1.0]], rtol=1e-6)


def test_results_section_survives_a_rewrite(tmp_path):
  from mvhan_jax import report  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "t.md")
  report.write_markdown(path, "# table\n\n| a |\n")
  report.write_section(path, "seminar", "## S\n\n| 1 |")
  report.write_section(path, "seminar", "## S\n\n| 2 |")              # replaced, not appended
  assert open(path).read() == "# table\n\n| a |\n\n<!-- begin seminar -->\n## S\n\n| 2 |\n<!-- end seminar -->\n"
  report.write_markdown(path, "# new table\n" + report.kept_sections(path))  # another script's rewrite
  assert open(path).read() == "# new table\n\n<!-- begin seminar -->\n## S\n\n| 2 |\n<!-- end seminar -->\n"
  assert report.kept_sections(str(tmp_path / "missing.md")) == ""


@pytest.mark.parametrize("field,value", [("model.attention", "approx"), ("model.top_k", 10_000),
                                          ("eval.extra_attentions", ("approx",)), ("train.negatives", "zipf"),
                                          ("model.pq_subspaces", 5), ("pretrain.tau", 0.0),
                                          ("train.num_negatives", 0), ("model.pq_scoring", "adc"),
                                          ("model.pq_candidates", 0)])
def test_bad_config_raises_naming_the_field(field, value):
  cfg = load_config("experiments/configs/seminar_synthetic.py:smoke")
  section, name = field.split(".")
  cfg[section][name] = value
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    strain.check_config(cfg)


def _finished_steps(path):
  """Steps of the finalised orbax checkpoints under path (in-flight ones carry a tmp suffix)."""
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def _run_until_killed(args, workdir, ckpt_dir, min_step):
  """Starts the CLI and sends SIGKILL once a checkpoint >= min_step has landed in ckpt_dir."""
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if any(s >= min_step for s in _finished_steps(os.path.join(workdir, ckpt_dir))):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  assert proc.wait() == -signal.SIGKILL, f"the run ended before it could be killed (rc {proc.returncode})"


def test_killed_run_resumes_to_identical_state(tmp_path):
  """A real kill -9 during PSU pretraining, another during PQ finetuning, then a resume: the final
  state (parameters, optimizer, PQ codebooks), the metrics logs and the results equal an
  uninterrupted run's."""
  overrides = {"pretrain.total_steps": 40, "train.total_steps": 60, "train.eval_every_steps": 30,
               "checkpoint_every_steps": 20, "log_every_steps": 5}
  arg = "smoke,attention=pq"
  cfg = load_config(f"experiments/configs/seminar_synthetic.py:{arg}")
  for k, v in overrides.items():
    node = cfg
    for p in k.split(".")[:-1]:
      node = node[p]
    node[k.split(".")[-1]] = v
  straight = str(tmp_path / "straight")
  want = tasks.train_and_evaluate(cfg, straight)

  killed = str(tmp_path / "killed")
  args = [sys.executable, "-m", "mvhan_jax.main", f"--config=experiments/configs/seminar_synthetic.py:{arg}",
          f"--workdir={killed}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  _run_until_killed(args, killed, "psu/checkpoints", 20)
  assert max(_finished_steps(os.path.join(killed, "psu", "checkpoints"))) < 40, "killed after pretraining: raise its steps"
  _run_until_killed(args, killed, "checkpoints", 20)   # resumes pretraining, killed in finetuning
  assert 40 in _finished_steps(os.path.join(killed, "psu", "checkpoints"))
  assert max(_finished_steps(os.path.join(killed, "checkpoints"))) < 60, "killed too late: raise train steps"
  got = tasks.train_and_evaluate(cfg, killed)

  exp = strain.build_experiment(cfg)
  src = sdata.finetune_source(exp.data, cfg.maxlen, 4, 4, 0)
  template = strain.init_state(exp, strain.downstream_optimizer(cfg, 60), jax.random.key(0), strain.example_batch(src, 2))
  states = []
  for wd in (straight, killed):
    mngr = train_loop.checkpoint_manager(os.path.join(wd, "checkpoints"), 2)
    assert mngr.latest_step() == 60
    states.append(train_loop.restore_checkpoint(mngr, 60, template)[0])
  assert float(jnp.abs(states[0].extra).max()) > 0          # PQ codebooks trained and compared
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for log in ("metrics.jsonl", "psu/metrics.jsonl"):
    rows = [[{k: v for k, v in json.loads(line).items() if not k.endswith("examples_per_sec")}  # timing
             for line in open(os.path.join(wd, log))] for wd in (straight, killed)]
    assert rows[0] == rows[1] and rows[0], log
  assert got["test"] == want["test"] and got["best_step"] == want["best_step"]
