r"""Two-tower baseline on a synthetic world (known ground truth), leave-one-out full ranking.

Launch:
  mvhan-train --config=experiments/configs/two_tower_synthetic.py --workdir=runs/tt_synth
  mvhan-train --config=experiments/configs/two_tower_synthetic.py:smoke --workdir=runs/tt_synth_smoke

Arguments after ':' as two_tower_ml100k.py ('recency', 'smoke').

The world's scalar parameters are config fields (``--config.dataset.world.num_items=20000``); content
types and scenarios keep the generator's defaults (one rich source type, two sparse target types).
"""

import ml_collections

from mvhan_jax import configs

_base = configs.sibling(__file__, "two_tower_ml100k")
ARGS = tuple(a for a in _base.ARGS if a != "dataset=")  # dataset=: MovieLens only


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  c = _base.get_config(configs.format_args(args))
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "synthetic"
  c.dataset.content_type = ml_collections.FieldReference(None, field_type=str)
  c.dataset.world = ml_collections.ConfigDict(dict(
      num_users=2000, num_items=5000, num_topics=50, max_interests=4, min_events=20, max_events=60, seed=0))
  c.num_epochs = 10
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  if "smoke" in args:
    c.dataset.world.num_users = 600
    c.dataset.world.num_items = 1500
    c.dataset.world.num_topics = 20
    c.total_steps = 150
    c.batch_size = 128
    c.eval_every_steps = 75
  return c
