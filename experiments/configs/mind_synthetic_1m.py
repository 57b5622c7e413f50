r"""MIND (K = 4) on a synthetic world with 10^6 items: trained item and multi-interest user vectors
for the ANN benchmark (experiments/bench_ann.py --sources=trained).

Launch (world generation, 6,000 steps, two evaluations over 10^6 items, the ScaNN index):
  mvhan-train --config=experiments/configs/mind_synthetic_1m.py --workdir=runs/mind_synth_1m
  python experiments/bench_ann.py --sources=trained --trained_workdir=runs/mind_synth_1m

World: 100,000 users with 40-80 exposures each (about 6M events, half of them clicks), 10^6 items
over 200 topics and the default content types, item popularity Zipf within each (type, topic)
group, so most items are clicked a handful of times or never and their vectors lean on the
category / tag / author embeddings MIND averages with the id embedding. ComiRec protocol (users
8:1:1); 10,000 test and 10,000 validation users give the benchmark's queries.

Arguments after ':' as experiments/configs/mind_ml100k.py; 'smoke' shrinks the world for tests.
"""

import ml_collections

from mvhan_jax import configs

_base = configs.sibling(__file__, "mind_synthetic")
ARGS = _base.ARGS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  c = _base.get_config(configs.format_args({"model": "mind", "K": "4", **args}))
  if "smoke" in args:
    return c
  c.dataset.world.update(dict(num_users=100_000, num_items=1_000_000, num_topics=200,
                              min_events=40, max_events=80))
  c.batch_size = 256
  c.num_epochs = 1
  c.total_steps = 6000
  c.eval_every_steps = 3000
  c.checkpoint_every_steps = 500
  # Lazy row updates of the 10^6-row id table (mvhan_jax/sparse.py): with dense AdamW the update of
  # the whole table is ~25x the rest of the step on CPU.
  c.optimizer.sparse_min_rows = 65536
  return c
