r"""Multi-interest retrieval on a synthetic world whose users have 1..4 known interests, ComiRec protocol.

Launch:
  mvhan-train --config=experiments/configs/mind_synthetic.py:model=mind,K=4 --workdir=runs/mind_synth
  python experiments/synthetic_interest_table.py     # the whole comparison table

Arguments: as experiments/configs/mind_ml100k.py (model=, K=, power=, axis=, smoke), plus model=two_tower.
Every scalar field of `WorldConfig` is a field of config.dataset.world (the generator's default unless
set here), so ``--config.dataset.world.zipf_exponent=0.8`` or a table script's
``--override=dataset.world.zipf_exponent=0.8`` reaches it.
"""

import dataclasses

import ml_collections

from mvhan_jax import configs
from mvhan_jax.data import synthetic_config

_mind = configs.sibling(__file__, "mind_ml100k")
ARGS = tuple(a for a in _mind.ARGS if a != "dataset=")  # model= also takes two_tower here; dataset= is MovieLens only


def world_defaults() -> dict:
  """Every scalar field of `WorldConfig` at its default: each one is then a config field that
  ``--config.dataset.world.<name>=`` and the table scripts' ``--override`` can set."""
  return {f.name: f.default for f in dataclasses.fields(synthetic_config.WorldConfig)
          if isinstance(f.default, (int, float))}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  if args.get("model") == "two_tower":
    c = configs.sibling(__file__, "two_tower_ml100k").get_config("smoke" if "smoke" in args else None)
  else:
    c = _mind.get_config(configs.format_args(args))
  c.loss.sampler = "log_uniform"  # every row of the synthetic tables uses the same sampler
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "synthetic"
  c.dataset.content_type = ml_collections.FieldReference(None, field_type=str)
  # Sessions switch interest often (persistence 0.3) so a user's history mixes all their interests.
  c.dataset.world = ml_collections.ConfigDict({**world_defaults(), **dict(
      num_users=4000, num_items=4000, num_topics=40, max_interests=4, min_events=40, max_events=80,
      interest_persistence=0.3, seed=0)})
  c.protocol = "comirec"
  c.select_metric = "Recall@50"
  c.maxlen = 50
  c.num_epochs = 8
  c.eval_every_steps = 300
  c.checkpoint_every_steps = 300
  if "smoke" in args:
    c.dataset.world.num_users = 800
    c.dataset.world.num_items = 1200
    c.dataset.world.num_topics = 20
    c.total_steps = 150
    c.batch_size = 128
    c.eval_every_steps = 75
  return c
