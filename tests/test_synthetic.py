"""Tests of the synthetic world: determinism, streaming, and that the known truth is in the data."""

import dataclasses
import os

import numpy as np
import pytest

from mvhan_jax.data import synthetic as syn
from mvhan_jax.data.synthetic import (ContentTypeSpec, WorldConfig, decode_record, encode_record,
                                      generate_world, read_shards, write_world)
from mvhan_jax.data.types import InteractionData

# Small block sizes so even tiny worlds span several random-stream blocks.
SMALL = WorldConfig(num_users=150, num_items=1200, num_topics=12, min_events=5, max_events=30,
                    item_block_size=500, user_block_size=64, seed=11)


@pytest.fixture(scope="module")
def world():
  """A medium-small world with enough events per user for statistical checks."""
  cfg = WorldConfig(num_users=600, num_items=4000, num_topics=30, min_events=150, max_events=250,
                    interest_persistence=0.5, noise_fraction=0.1, seed=5)
  return generate_world(cfg)


def _assert_same(a, b, where):
  assert set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=f"{where}[{k!r}]")


# ------------------------------------------------------------------------------------ determinism

def test_same_seed_same_world_other_seed_differs():
  a, b = generate_world(SMALL), generate_world(SMALL)
  for part in ("items", "users", "events"):
    _assert_same(getattr(a, part), getattr(b, part), part)
  c = generate_world(dataclasses.replace(SMALL, seed=12))
  assert not np.array_equal(a.events["item"][:100], c.events["item"][:100])
  assert not np.allclose(a.items["latent"], c.items["latent"])


@pytest.mark.parametrize("shard_size", [7, 1000])
def test_streamed_world_equals_in_memory(tmp_path, shard_size):
  mem = generate_world(SMALL)
  out = str(tmp_path / f"w{shard_size}")
  meta = write_world(SMALL, out, shard_size=shard_size)
  assert meta["num_events"] == mem.num_events
  assert len(meta["shards"]["items"]) == -(-SMALL.num_items // shard_size)

  items = read_shards(out, "items")
  assert len(items) == SMALL.num_items
  for i in range(SMALL.num_items):
    rec = items[i]
    assert rec.pop("item") == i and rec.pop("topic") == mem.item_topic[i]
    assert rec.pop("type_index") == mem.item_type[i]
    _assert_same(rec, {k: v[i] for k, v in mem.items.items()}, f"item {i}")

  users, events = read_shards(out, "users"), read_shards(out, "events")
  assert len(users) == len(events) == SMALL.num_users
  for u in range(SMALL.num_users):
    ur = users[u]
    k = len(ur["interests"])
    np.testing.assert_array_equal(ur["interests"], mem.users["interests"][u, :k])
    assert (mem.users["interests"][u, k:] == -1).all()
    np.testing.assert_array_equal(ur["interest_weights"], mem.users["interest_weights"][u, :k])
    assert all(ur[f] == mem.users[f][u] for f in syn.PROFILE_FIELDS)
    er = events[u]
    assert er.pop("user") == u
    expect = mem.user_events(u)
    expect.pop("user")
    _assert_same(er, expect, f"events of user {u}")

  truth = mem.ground_truth()
  for name in ("item_latent", "item_topic", "item_rank", "user_interests", "text_rotation"):
    np.testing.assert_array_equal(np.load(os.path.join(out, "truth", name + ".npy")), truth[name])
  cfg, _ = syn.load_meta(out)
  assert cfg == SMALL


def test_grain_reads_shards(tmp_path):
  import grain
  write_world(SMALL, str(tmp_path), shard_size=50)
  ds = grain.MapDataset.source(read_shards(str(tmp_path), "events"))
  assert len(ds) == SMALL.num_users and ds[3]["user"] == 3
  raw = grain.MapDataset.source(read_shards(str(tmp_path), "items").raw).map(decode_record)
  assert raw[17]["item"] == 17 and raw[17]["text"].shape == (SMALL.text_dim,)
  with pytest.raises(ValueError, match="kind"):
    read_shards(str(tmp_path), "clicks")


def test_record_roundtrip_keeps_dtype_and_shape():
  rec = {"a": np.arange(6, dtype=np.int8).reshape(2, 3), "b": np.zeros((0, 5), np.float32),
         "c": np.array(7, np.int64), "d": np.float32(1.5), "e": 3, "f": "x",
         "g": np.arange(6.0).reshape(2, 3).T}  # non-contiguous
  out = decode_record(encode_record(rec))
  for k in ("a", "b", "c", "g"):
    assert out[k].dtype == rec[k].dtype and out[k].shape == rec[k].shape
    np.testing.assert_array_equal(out[k], rec[k])
  assert out["d"] == 1.5 and out["e"] == 3 and out["f"] == "x"
  out["a"][0, 0] = 9  # decoded arrays are writable
  with pytest.raises(TypeError, match="encode_record"):
    encode_record({"x": object()})


# ----------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("change, field", [
    (dict(types=(ContentTypeSpec("a", 0.5, 1.0, ()), ContentTypeSpec("b", 0.4, 0.0, ()))),
     "item_share must sum to 1"),
    (dict(types=(ContentTypeSpec("a", 1.0, 1.0, ("colour",)),)), "unknown fields"),
    (dict(num_items=10), "num_items"),
    (dict(max_interests=100), "max_interests"),
    (dict(min_events=10, max_events=5), "max_events"),
    (dict(text_dim=8), "text_dim"),
    (dict(noise_fraction=1.5), "noise_fraction"),
])
def test_config_validation_names_the_field(change, field):
  with pytest.raises(ValueError, match=field):
    WorldConfig(**change)


def test_scenario_must_cover_every_type_with_events():
  with pytest.raises(ValueError, match="no scenario gives it weight"):
    WorldConfig(scenarios=(syn.ScenarioSpec("only", {"article": 1.0}),))


# ----------------------------------------------------------------------------- ground truth in data

@pytest.mark.parametrize("exponent", [0.7, 1.2])
def test_zipf_rank_frequency_slope(exponent):
  cfg = WorldConfig(num_users=300, num_items=2000, num_topics=2, max_interests=2,
                    min_events=80, max_events=120, zipf_exponent=exponent, seed=1)
  w = generate_world(cfg)
  items = w.events["item"]
  art = items[w.item_type[items] == 0]
  for topic in range(2):
    sel = art[w.item_topic[art] == topic]
    counts = np.bincount(w.skeleton.item_rank[sel], minlength=30)[:30]
    slope = np.polyfit(np.log(np.arange(1, 31)), np.log(counts + 0.5), 1)[0]
    assert abs(slope + exponent) < 0.15, (topic, slope, exponent)


def test_sequence_topics_come_from_interests(world):
  ev, cfg = world.events, world.config
  interests = world.users["interests"][ev["user"]]
  slot = ev["interest_slot"].astype(int)
  topic = world.item_topic[ev["item"]]
  live = slot >= 0
  # Every non-noise event's topic is exactly the interest that produced it.
  np.testing.assert_array_equal(topic[live], interests[live, slot[live]])
  assert abs((~live).mean() - cfg.noise_fraction) < 0.01
  outside = ~(topic[:, None] == interests).any(axis=1)
  assert outside.mean() <= cfg.noise_fraction and outside.mean() > 0.5 * cfg.noise_fraction
  clean = generate_world(dataclasses.replace(SMALL, noise_fraction=0.0))
  ci = clean.users["interests"][clean.events["user"]]
  assert (clean.item_topic[clean.events["item"]][:, None] == ci).any(axis=1).all()


def test_interest_weights_match_topic_frequencies(world):
  ev = world.events
  live = ev["interest_slot"] >= 0
  K = world.config.max_interests
  counts = np.zeros((world.config.num_users, K))
  np.add.at(counts, (ev["user"][live], ev["interest_slot"][live]), 1)
  emp = counts / counts.sum(axis=1, keepdims=True)
  w = world.users["interest_weights"]
  multi = (world.users["interests"] >= 0).sum(axis=1) > 1
  err = np.abs(emp - w)[multi].sum(axis=1).mean() / 2  # mean total-variation distance
  assert err < 0.08, err
  assert np.corrcoef(emp[multi].ravel(), w[multi].ravel())[0, 1] > 0.9


def test_interest_persistence_makes_sessions(world):
  ev, p = world.events, world.config.interest_persistence
  same_user = ev["user"][1:] == ev["user"][:-1]
  s = ev["interest_slot"]
  both = same_user & (s[1:] >= 0) & (s[:-1] >= 0)
  same = (s[1:] == s[:-1])[both].mean()
  w = world.users["interest_weights"][ev["user"][1:][both]]
  expected = p + (1 - p) * (w ** 2).sum(axis=1).mean()  # keep, or redraw the same slot
  assert abs(same - expected) < 0.03, (same, expected)
  gaps = np.diff(ev["timestamp"])[same_user]
  assert (gaps > 0).all(), "timestamps must increase within a user"
  switched = (s[1:] != s[:-1])[same_user]
  assert np.median(gaps[switched]) > 10 * np.median(gaps[~switched])


def test_type_shares(world):
  cfg = world.config
  ev_type = world.item_type[world.events["item"]]
  for c, t in enumerate(cfg.types):
    assert abs((ev_type == c).mean() - t.interaction_share) < 0.015, t.name
    assert abs((world.item_type == c).mean() - t.item_share) < 0.03, t.name
  # Scenarios have different type mixes: the sparse ones are mostly not articles.
  sc = world.events["scenario"]
  assert (ev_type[sc == 0] == 0).mean() > 0.8
  assert (ev_type[sc == 1] == 1).mean() > 0.5 and (ev_type[sc == 2] == 2).mean() > 0.5


def test_text_and_image_are_rotated_views(world):
  d, lat = world.config.d_latent, world.items["latent"]
  gt = world.ground_truth()

  def cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

  for vec, rot in ((world.text_vectors, gt["text_rotation"]),
                   (world.image_vectors, gt["image_rotation"])):
    np.testing.assert_allclose(rot.T @ rot, np.eye(len(rot)), atol=1e-5)
    c = cos(vec @ rot[:, :d], lat)
    assert c.mean() > 0.95 and np.quantile(c, 0.05) > 0.9
  # The views differ from each other and from the raw latent; the wrong rotation does not recover.
  assert np.abs(cos(world.text_vectors, world.image_vectors)).mean() < 0.4
  assert np.abs(cos(world.image_vectors @ gt["text_rotation"][:, :d], lat)).mean() < 0.4


def test_clicks_follow_affinity_and_conversions_follow_clicks(world):
  ev = world.events
  aff = world.affinity(ev["user"], ev["item"])
  np.testing.assert_allclose(aff, ev["affinity"], atol=1e-5)
  lo, hi = np.quantile(aff, [0.25, 0.75])
  assert ev["click"][aff >= hi].mean() > ev["click"][aff <= lo].mean() + 0.2
  assert (ev["conversion"] <= ev["click"]).all()
  clicked = ev["click"] == 1
  q = world.items["quality"][ev["item"][clicked]]
  assert np.corrcoef(q, ev["conversion"][clicked])[0, 1] > 0.1  # shared quality term
  # Scenario-specific conversion taste: conversion correlates with each scenario's own vector
  # more than with the other scenarios' vectors.
  lat = world.items["latent"][ev["item"]]
  sv = world.skeleton.scenario_vectors
  for s in range(len(world.config.scenarios)):
    m = clicked & (ev["scenario"] == s)
    corr = [np.corrcoef(lat[m] @ v, ev["conversion"][m])[0, 1] for v in sv]
    assert np.argmax(corr) == s, (s, corr)


def test_queries_use_the_item_topic_keywords(world):
  ev, cfg = world.events, world.config
  q = world.queries
  search = (q > 0).any(axis=1)
  topic = world.item_topic[ev["item"]]
  kpt = cfg.keywords_per_topic
  kw_topic = (q - 1) // kpt
  used = q > 0
  assert (kw_topic[used] == np.broadcast_to(topic[:, None], q.shape)[used]).all()
  assert set(world.skeleton.topic_keywords(int(topic[search][0]))) >= set(q[search][0][q[search][0] > 0])
  # Padding only at the end; 1..max_query_len keywords per search event.
  n = used.sum(1)
  assert (used == (np.arange(q.shape[1])[None] < n[:, None])).all()
  assert n[search].min() >= 1 and n.max() <= cfg.max_query_len
  for s, spec in enumerate(cfg.scenarios):
    assert abs(search[ev["scenario"] == s].mean() - spec.search_rate) < 0.05, spec.name


def _mutual_information(x, y):
  joint = np.zeros((x.max() + 1, y.max() + 1))
  np.add.at(joint, (x, y), 1)
  joint /= joint.sum()
  px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
  nz = joint > 0
  return float((joint[nz] * np.log(joint[nz] / (px @ py)[nz])).sum())


def test_profile_fields_follow_primary_interest(world):
  primary = world.users["interests"][:, 0]
  sk, cfg = world.skeleton, world.config
  rng = np.random.default_rng(0)
  for field, table in (("age", sk.topic_age), ("region", sk.topic_region)):
    v = world.users[field]
    mi = _mutual_information(primary, v)
    null = max(_mutual_information(rng.permutation(primary), v) for _ in range(10))
    assert mi > null + 0.3, (field, mi, null)
    # Direction: the value is the primary topic's preferred one far more often than chance.
    n = cfg.num_age_buckets if field == "age" else cfg.num_regions
    expected = cfg.profile_strength + (1 - cfg.profile_strength) / n
    assert abs((v == table[primary] + 1).mean() - expected) < 0.06, field
  g = world.users["gender"]
  p = sk.topic_gender[primary]
  assert g[p > 0.8].mean() - g[p < 0.2].mean() > 0.5  # gender 2 where the topic prefers it


def test_to_interaction_data_views(world):
  cfg = world.config
  full = world.to_interaction_data()
  assert isinstance(full, InteractionData) and full.num_items == cfg.num_items
  assert len(full.user) == world.events["click"].sum()
  kinds = {s.name: s.kind for s in full.spec.item_specs}
  assert kinds["type"] == "categorical" and kinds["tags"] == "multi" and kinds["text"] == "dense"
  np.testing.assert_array_equal(full.item_features["type"], world.item_type + 1)

  c = cfg.type_names.index("novel")
  nov = world.to_interaction_data("novel")
  ids = world.items_of_type("novel")
  assert nov.num_items == len(ids) == (world.item_type == c).sum()
  assert (nov.item_features["type"] == c + 1).all()
  assert (nov.item_features["tags"] == 0).all() and (nov.item_features["category"] == 0).all()
  assert (nov.item_features["genre"] > 0).all()
  np.testing.assert_array_equal(ids[nov.item], [i for i in world.events["item"][
      (world.events["click"] == 1) & (world.item_type[world.events["item"]] == c)]])
  everything = world.to_interaction_data(clicks_only=False)
  assert len(everything.user) == world.num_events
  np.testing.assert_array_equal(everything.rating, world.events["click"])
  with pytest.raises(ValueError, match="content_type"):
    world.to_interaction_data("podcast")
