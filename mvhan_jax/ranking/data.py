"""Multi-scenario multi-task ranking data: MovieLens-100k and the synthetic world.

Every split is a dict of parallel arrays, one row per impression:
  ``user`` int32 [N], ``item`` int32 [N], ``scenario`` int32 [N] (0-based),
  ``history`` int32 [N, L] (left-aligned, 0-padded, masked by ``history_len`` int32 [N]),
  ``click`` float32 [N] (the CTR label), ``ctcvr`` float32 [N] (click AND conversion: the label of
  pCTCVR = pCTR * pCVR over the entire impression space, as in ESMM).
A row's history holds only items the user interacted with strictly before the impression.

MovieLens-100k (`movielens_ranking`):
- Scenarios: user occupation groups (one data-rich, three sparse; `ML_SCENARIOS`): 'core'
  (administrator, educator, engineer, librarian, other, programmer, student, writer: 704 users,
  ~76% of ratings), 'arts_media' (artist, entertainment, marketing: 72 users), 'health_law_business'
  (doctor, executive, healthcare, lawyer, salesman: 79 users), 'science_home_retired' (homemaker,
  none, retired, scientist, technician: 88 users).
- Time split: `protocol.leave_one_out` (per user by (timestamp, item id): last = test, second to last
  = validation, the rest = training). Training impressions: every training interaction (history =
  the interactions before it) plus ``num_negatives`` sampled non-interactions with the same history.
  Validation / test impressions: the held-out item plus ``eval_negatives`` sampled
  non-interactions, history = every earlier interaction (as the retrieval evaluation's).
- Tasks: click = interaction (1) vs sampled non-interaction (0); conversion = rating >= 4 given the
  interaction, so ctcvr = interaction AND rating >= 4.
- Negatives, drawn with probability ~ training popularity^alpha (uniform negatives make the click
  task a popularity test), once from ``data_seed`` so that every model and seed sees the same
  impressions. Training negatives: items outside the user's training sequence; the user's later
  validation and test items can be drawn (as at training time in production; excluding them would
  tell the model which items the user will interact with later, a future leak that grows with the
  share of the candidates a user's negatives cover: fatal with `candidates.candidate_pool`). Validation /
  test negatives: items the user never rated (true non-interactions).

Synthetic (`synthetic_ranking`): the exposure log of `mvhan_jax.data.synthetic` (its default
scenarios: 'feed', data-rich, mostly articles; 'reading', sparse, mostly novels; 'video', sparse,
mostly short contents). Ground truth (`synthetic_gen.true_probabilities`): p(click) =
sigmoid(click_bias_s + click_slope_s * affinity + click_specific_s * <scenario_vector_s, latent>),
p(conversion | click) = sigmoid(conv_bias_s + conv_shared_s * (quality + affinity) + conv_specific_s
* <scenario_vector_s, latent>): the affinity terms are shared by every scenario, the scenario-vector
terms are each scenario's own taste. Per user (events are time-ordered), the last ``test_fraction``
of exposures are test, the ``valid_fraction`` before them validation, the rest training; histories
are the user's earlier clicks. Two ground-truth scorers come with it (`RankingData.oracles`):
'true' (the generator's probabilities: the ceiling any model can reach) and 'rich_scenario' (every
impression scored with the first, data-rich scenario's functions: what a model that ignores the
scenario could reach at best, so the gap to 'true' is what scenario-specific modelling can win).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import numpy as np

from mvhan_jax import features
from mvhan_jax.data import protocol
from mvhan_jax.data import synthetic_gen
from mvhan_jax.data.types import InteractionData

SPLITS = ("train", "valid", "test")
# config.dataset.negatives of MovieLens (see `movielens_ranking` and `load_ranking_data`).
NEGATIVES = ("popularity", "retrieval")

# Scenario name -> GroupLens occupations (mvhan_jax.data.movielens.OCCUPATIONS).
ML_SCENARIOS = (
    ("core", ("administrator", "educator", "engineer", "librarian", "other", "programmer", "student", "writer")),
    ("arts_media", ("artist", "entertainment", "marketing")),
    ("health_law_business", ("doctor", "executive", "healthcare", "lawyer", "salesman")),
    ("science_home_retired", ("homemaker", "none", "retired", "scientist", "technician")),
)


@dataclasses.dataclass(frozen=True)
class RankingData:
  """A multi-scenario multi-task ranking dataset (see the module docstring for the split arrays)."""

  name: str
  num_users: int
  num_items: int
  scenario_names: tuple[str, ...]
  user_features: Mapping[str, np.ndarray]
  item_features: Mapping[str, np.ndarray]
  vocab: Mapping[str, int]
  splits: Mapping[str, Mapping[str, np.ndarray]]
  maxlen: int
  # Ground-truth scorers where the data has them (the synthetic world): name -> split -> task
  # ('ctr', 'cvr', 'ctcvr') -> probabilities [N] parallel to the split's rows (see `synthetic_ranking`).
  oracles: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]] = dataclasses.field(default_factory=dict)

  @property
  def num_scenarios(self) -> int:
    return len(self.scenario_names)

  @functools.cached_property
  def spec(self) -> features.DataSpec:
    """What ranking models are built from (`mvhan_jax.features.DataSpec`, with the scenario names)."""
    return features.data_spec(self.name, self.num_users, self.num_items, self.user_features,
                              self.item_features, self.vocab, scenario_names=tuple(self.scenario_names))

  def summary(self) -> dict[str, dict[str, list[float]]]:
    """Per split: impressions, clicks and ctcvr positives per scenario."""
    out = {}
    for name, s in self.splits.items():
      sc = s["scenario"]
      out[name] = {
          "impressions": np.bincount(sc, minlength=self.num_scenarios).tolist(),
          "clicks": np.bincount(sc, weights=s["click"], minlength=self.num_scenarios).astype(int).tolist(),
          "ctcvr": np.bincount(sc, weights=s["ctcvr"], minlength=self.num_scenarios).astype(int).tolist(),
      }
    return out


def _check(cfg_name: str, value, ok: bool, fix: str):
  if not ok:
    raise ValueError(f"config.dataset.{cfg_name}={value!r} is invalid: {fix}")


# --------------------------------------------------------------------------------------------------
# MovieLens-100k
# --------------------------------------------------------------------------------------------------
def movielens_scenarios(occupation: np.ndarray) -> np.ndarray:
  """int32 [U] scenario of every user from the 1-based occupation feature (see `ML_SCENARIOS`)."""
  from mvhan_jax.data.movielens import OCCUPATIONS  # pylint: disable=import-outside-toplevel
  table = np.zeros(len(OCCUPATIONS) + 1, np.int32)  # occupation 0 (unknown) -> 'core'
  for s, (_, occupations) in enumerate(ML_SCENARIOS):
    for o in occupations:
      table[OCCUPATIONS.index(o) + 1] = s
  return table[occupation]


def sample_non_interactions(rng: np.random.Generator, users: np.ndarray, num: int, probs: np.ndarray,
                            seen: np.ndarray) -> np.ndarray:
  """int32 [len(users), num] items drawn from ``probs`` with ``seen[user, item]`` False (rejection)."""
  out = rng.choice(len(probs), size=(len(users), num), p=probs)
  bad = seen[users[:, None], out]
  while bad.any():
    out[bad] = rng.choice(len(probs), size=int(bad.sum()), p=probs)
    bad = seen[users[:, None], out]
  return out.astype(np.int32)


def sample_from_pool(rng: np.random.Generator, users: np.ndarray, num: int, pool: np.ndarray, probs: np.ndarray,
                     seen: np.ndarray) -> np.ndarray:
  """int32 [len(users), num] distinct items drawn uniformly from each row's ``pool`` (int [len(users),
  P], -1 padded) among the items the user never interacted with (``seen`` False); where a row has
  fewer than ``num`` such items the rest come from ``probs`` (`sample_non_interactions`)."""
  ok = (pool >= 0) & ~seen[users[:, None], np.maximum(pool, 0)]
  keys = np.where(ok, rng.random(pool.shape), -1.0)
  pick = np.argsort(-keys, axis=1)[:, :num]                                # uniform without replacement
  out = np.take_along_axis(pool, pick, axis=1)
  short = np.take_along_axis(keys, pick, axis=1) < 0
  if short.any():
    fill = sample_non_interactions(rng, users, num, probs, seen)
    out = np.where(short, fill, out)
  return out.astype(np.int32)


def _with_negatives(rng, pos: dict[str, np.ndarray], num: int, probs, seen, pool=None) -> dict[str, np.ndarray]:
  """Positive rows followed by ``num`` negatives per positive (same user, history, scenario), drawn
  from ``probs`` or, when given, from ``pool(user, history, history_len)``'s rows (`sample_from_pool`)."""
  n = len(pos["user"])
  if pool is None:
    neg_items = sample_non_interactions(rng, pos["user"], num, probs, seen).reshape(-1)
  else:
    rows = pool(pos["user"], pos["history"], pos["history_len"])
    neg_items = sample_from_pool(rng, pos["user"], num, rows, probs, seen).reshape(-1)
  rep = np.repeat(np.arange(n), num)
  out = {}
  for k, v in pos.items():
    if k == "item":
      out[k] = np.concatenate([v, neg_items])
    elif k in ("click", "ctcvr"):
      out[k] = np.concatenate([v, np.zeros(n * num, np.float32)])
    else:
      out[k] = np.concatenate([v, v[rep]])
  return out


def movielens_ranking(data: InteractionData, maxlen: int = 50, num_negatives: int = 2,
                      eval_negatives: int = 50, alpha: float = 0.75, data_seed: int = 0,
                      negative_pool: Callable[..., np.ndarray] | None = None) -> RankingData:
  """MovieLens-100k as a 4-scenario, 2-task ranking set (see the module docstring).

  ``negative_pool``: a function (users int [N], history int [N, maxlen], history_len int [N]) -> int
  [N, P] (-1 padded) of candidate items per impression, e.g. a retrieval model's top-P for that
  history (`candidates.candidate_pool`): every split's negatives are drawn uniformly from the
  impression's candidates instead of by popularity.
  """
  _check("num_negatives", num_negatives, num_negatives >= 1, "use >= 1 sampled non-interaction per interaction")
  _check("eval_negatives", eval_negatives, eval_negatives >= 1, "use >= 1 (AUC needs negatives)")
  if data.rating is None:
    raise ValueError(f"dataset {data.name!r} has no ratings: the conversion task needs them")
  split = protocol.leave_one_out(data)
  rating = np.zeros((data.num_users, data.num_items), np.float32)
  rating[data.user, data.item] = data.rating
  seen = np.zeros((data.num_users, data.num_items), bool)          # rated at any time
  seen[data.user, data.item] = True
  seen_train = np.zeros_like(seen)                                 # rated in the training sequence
  for u, seq in enumerate(split.train_sequences):
    seen_train[u, seq] = True
  user_scenario = movielens_scenarios(data.user_features["occupation"])
  counts = np.bincount(np.concatenate(split.train_sequences), minlength=data.num_items).astype(np.float64)
  probs = counts ** alpha
  probs /= probs.sum()
  rng = np.random.default_rng([data_seed, 7])

  ex = protocol.training_examples(split.train_sequences, maxlen, min_history=0)
  conv = (rating[ex["user"], ex["target"]] >= 4).astype(np.float32)
  train = {"user": ex["user"], "item": ex["target"], "scenario": user_scenario[ex["user"]],
           "history": ex["history"], "history_len": ex["history_len"],
           "click": np.ones(len(conv), np.float32), "ctcvr": conv}
  splits = {"train": _with_negatives(rng, train, num_negatives, probs, seen_train, negative_pool)}
  for name in ("valid", "test"):
    es = split.eval_set(name, maxlen)
    target = es.targets[:, 0]
    pos = {"user": es.user, "item": target, "scenario": user_scenario[es.user], "history": es.history,
           "history_len": es.history_len, "click": np.ones(len(target), np.float32),
           "ctcvr": (rating[es.user, target] >= 4).astype(np.float32)}
    splits[name] = _with_negatives(rng, pos, eval_negatives, probs, seen, negative_pool)
  return RankingData("ml-100k", data.num_users, data.num_items, tuple(n for n, _ in ML_SCENARIOS),
                     dict(data.user_features), dict(data.item_features), dict(data.vocab),
                     {k: _typed(v) for k, v in splits.items()}, maxlen)


def _typed(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: (v.astype(np.float32) if k in ("click", "ctcvr") else v.astype(np.int32)) for k, v in split.items()}


# --------------------------------------------------------------------------------------------------
# Synthetic world
# --------------------------------------------------------------------------------------------------
def click_histories(user: np.ndarray, item: np.ndarray, click: np.ndarray, offsets: np.ndarray,
                    maxlen: int) -> tuple[np.ndarray, np.ndarray]:
  """Per event, the user's last ``maxlen`` clicked items strictly before it (events sorted by user,
  then time; user u's events are ``offsets[u]:offsets[u+1]``). Returns ([E, maxlen], [E])."""
  e = len(user)
  clicked = click.astype(bool)
  # Clicks strictly before each event within its user.
  before = np.cumsum(clicked) - clicked
  before = before - before[offsets[user]]
  flat = item[clicked].astype(np.int32)
  user_start = np.cumsum(np.concatenate([[0], np.bincount(user[clicked], minlength=len(offsets) - 1)]))[:-1]
  hlen = np.minimum(before, maxlen)
  idx = (user_start[user] + before - hlen)[:, None] + np.arange(maxlen)[None, :]
  valid = np.arange(maxlen)[None, :] < hlen[:, None]
  history = np.where(valid, flat[np.where(valid, idx, 0)] if len(flat) else 0, 0).astype(np.int32)
  return history.reshape(e, maxlen), hlen.astype(np.int32)


def synthetic_ranking(world, maxlen: int = 20, valid_fraction: float = 0.1, test_fraction: float = 0.2,
                      item_fields: tuple[str, ...] = ("type", "category", "tags", "author", "genre",
                                                      "word_count", "duration")) -> RankingData:
  """The synthetic world's exposures as a multi-scenario CTR / CTCVR set (see the module docstring)."""
  _check("test_fraction", test_fraction, 0 < test_fraction < 1, "use a fraction in (0, 1)")
  _check("valid_fraction", valid_fraction, 0 < valid_fraction < 1 - test_fraction,
         "use a fraction in (0, 1 - test_fraction)")
  from mvhan_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  ev, offsets = world.events, world.event_offsets
  user, item = ev["user"].astype(np.int64), ev["item"].astype(np.int32)
  history, hlen = click_histories(user, item, ev["click"], offsets, maxlen)
  n = np.diff(offsets)
  pos = np.arange(len(user)) - offsets[user]              # position within the user's time order
  n_test = np.maximum(1, np.round(n * test_fraction)).astype(np.int64)[user]
  n_valid = np.maximum(1, np.round(n * valid_fraction)).astype(np.int64)[user]
  which = np.where(pos >= n[user] - n_test, 2, np.where(pos >= n[user] - n_test - n_valid, 1, 0))
  click = ev["click"].astype(np.float32)
  ctcvr = (ev["click"].astype(bool) & ev["conversion"].astype(bool)).astype(np.float32)
  scenario = ev["scenario"].astype(np.int32)
  full = {"user": user, "item": item, "scenario": scenario, "history": history,
          "history_len": hlen, "click": click, "ctcvr": ctcvr}
  splits = {name: _typed({k: v[which == s] for k, v in full.items()}) for s, name in enumerate(SPLITS)}
  oracles = {}
  latent, quality = world.items["latent"][item], world.items["quality"][item]
  for oname, sc in (("true", scenario), ("rich_scenario", np.zeros_like(scenario))):
    p_click, p_conv = synthetic_gen.true_probabilities(world.skeleton, sc, ev["affinity"], latent, quality)
    probs = {"ctr": p_click, "cvr": p_conv, "ctcvr": p_click * p_conv}
    oracles[oname] = {name: {k: v[which == s] for k, v in probs.items()} for s, name in enumerate(SPLITS)}
  cfg = world.config
  vocab = {**synthetic.item_vocab(cfg), **synthetic.user_vocab(cfg)}
  return RankingData("synthetic", cfg.num_users, cfg.num_items, tuple(s.name for s in cfg.scenarios),
                     {k: world.users[k] for k in synthetic.PROFILE_FIELDS},
                     {k: world.items[k] for k in item_fields}, vocab, splits, maxlen, oracles)


def world_config(world: Mapping):
  """``config.dataset.world`` (a dict of `WorldConfig` fields; 'types' / 'scenarios', when given,
  as sequences of `ContentTypeSpec` / `ScenarioSpec` field dicts) -> `WorldConfig`."""
  from mvhan_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  kw = dict(world)
  specs = {"types": synthetic.ContentTypeSpec, "scenarios": synthetic.ScenarioSpec}
  for key, cls in specs.items():
    if key in kw:
      fields = {f.name for f in dataclasses.fields(cls)}
      out = []
      for i, spec in enumerate(kw[key]):
        unknown = set(spec) - fields
        if unknown:
          raise ValueError(f"config.dataset.world.{key}[{i}] has unknown fields {sorted(unknown)}: "
                           f"use fields of {cls.__name__} {sorted(fields)}")
        spec = dict(spec)
        if "fields" in spec:
          spec["fields"] = tuple(spec["fields"])
        out.append(cls(**spec))
      kw[key] = tuple(out)
  return synthetic.WorldConfig(**kw)


def load_ranking_data(config, negative_pool: Callable[..., np.ndarray] | None = None) -> RankingData:
  """``config.dataset.name`` in {'movielens_100k', 'synthetic'} -> `RankingData`.

  ``negative_pool``: with MovieLens and ``config.dataset.negatives='retrieval'``, the retrieval
  model's candidate pool (see `movielens_ranking`), which the caller computes with
  `mvhan_jax.ranking.candidates.negative_pool(config)`: data modules load no model (no import of a
  trainer), so the pool comes in as an argument. None otherwise.
  """
  d = config.dataset
  if d.name == "movielens_100k":
    from mvhan_jax.data import movielens  # pylint: disable=import-outside-toplevel
    negatives = d.get("negatives", "popularity")
    if negatives not in NEGATIVES:
      raise ValueError(f"config.dataset.negatives={negatives!r} is unknown: use 'popularity' or 'retrieval'")
    if negatives == "retrieval" and negative_pool is None:
      raise ValueError("config.dataset.negatives='retrieval' needs the retrieval model's candidates: pass "
                       "negative_pool=mvhan_jax.ranking.candidates.negative_pool(config)")
    if negatives == "popularity" and negative_pool is not None:
      raise ValueError("config.dataset.negatives='popularity' samples by popularity: pass no negative_pool "
                       "or set config.dataset.negatives='retrieval'")
    return movielens_ranking(movielens.load_movielens_100k(d.get("data_dir")), config.maxlen,
                             d.num_negatives, d.eval_negatives, d.alpha, d.data_seed, negative_pool)
  if d.name == "synthetic":
    if negative_pool is not None:
      raise ValueError("the synthetic ranking data samples no negatives (its exposures are labelled): pass no "
                       "negative_pool")
    from mvhan_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    world = synthetic.generate_world(world_config(d.world.to_dict()))
    return synthetic_ranking(world, config.maxlen, d.valid_fraction, d.test_fraction)
  raise ValueError(f"config.dataset.name={d.name!r} is unknown: use 'movielens_100k' or 'synthetic'")
