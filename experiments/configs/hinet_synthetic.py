r"""HiNet and its baselines on the synthetic world's multi-scenario exposure log (CTR and CTCVR).

Launch:
  python -m mvhan_jax.ranking.main --config=experiments/configs/hinet_synthetic.py --workdir=runs/hinet_syn
  python -m mvhan_jax.ranking.main --config=experiments/configs/hinet_synthetic.py:model=mmoe --workdir=runs/mmoe_syn

Arguments after ':' as in hinet_ml100k.py: 'model=NAME' (hinet | shared_bottom | mmoe | ple | star),
'no_san', 'no_specific', 'shared_tower', 'smoke'.
World: 2,000 users, 3,000 items, the default content types and scenarios of
mvhan_jax/data/synthetic_config.py ('feed' data-rich, 'reading' and 'video' sparse, each with its own
click curve and its own conversion taste vector); ~80k exposures, the last 20% of each user's
exposures are test, the 10% before them validation. Ground truth: mvhan_jax/ranking/data.py.
Expected result (2-core CPU, ~1 minute per run): test CTR AUC ~0.7 (the click is a noisy Bernoulli
of the true affinity, so the ceiling is well below 1); per-scenario numbers in
experiments/results/hinet_synthetic.md.
"""

import os

import ml_collections

from mvhan_jax.configs import config_module

_ml_config = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hinet_ml100k.py")).get_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = _ml_config(arg)
  c.maxlen = 20
  d = ml_collections.ConfigDict()
  d.name = "synthetic"
  d.world = ml_collections.ConfigDict({"num_users": 2000, "num_items": 3000, "seed": 0})
  d.valid_fraction = 0.1
  d.test_fraction = 0.2
  c.dataset = d
  args = set((arg or "").split(","))
  if "smoke" not in args:
    c.num_epochs = 2
    c.batch_size = 512
  else:
    c.dataset.world.num_users = 300
    c.dataset.world.num_items = 500
  return c
