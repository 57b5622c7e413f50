r"""MV-HAN (and its baselines) on the synthetic world's multi-type setting, leave-one-out full ranking.

The world (mvhan_jax.data.synthetic, default content types): a rich source type 'article' (60% of
items, 80% of exposures; fields category, tags, author) and two sparse target types with their own
schemas, 'novel' (25% / 8%; genre, word_count) and 'short' (15% / 12%; duration, tags); every item
also has dense 'text' and 'image' vectors. Users' interest topics are shared across types, so what
the source type teaches about a user transfers to the targets, MV-HAN's premise.

Launch:
  mvhan-train --config=experiments/configs/mvhan_synthetic.py --workdir=runs/mvhan_syn
  mvhan-train --config=experiments/configs/mvhan_synthetic.py:model=two_tower,single=2 --workdir=runs/tt_novel

Arguments: as experiments/configs/mvhan_ml100k.py (model=, typed, single=, exclusive_embeddings,
fel_per_type, mlp, learn_temperature, softmax=, smoke); here 'typed' is the default and 'pooled' turns
it off, and softmax=sampled is the default whatever the batches.
Expected result: experiments/results/mvhan_synthetic.md.
"""

import ml_collections

from mvhan_jax import configs

_ml = configs.sibling(__file__, "mvhan_ml100k")
ARGS = tuple(a for a in _ml.ARGS if a not in (
    "dataset=", "behaviour=", "sasrec_paths", "gate", "steps=", "head_lr=", "head_wd=", "sasrec_init=",
    "sasrec_lr="))  # MovieLens only


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  pooled = "pooled" in args
  args.pop("pooled", None)
  if not pooled and "single" not in args:
    args["typed"] = ""
  # The sampled softmax whatever the batches (the synthetic tables were made with it); softmax=full
  # with 'pooled' ranks all 5,000 items per step.
  args.setdefault("softmax", "sampled")
  c = _ml.get_config(configs.format_args(args))
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "synthetic"
  c.dataset.content_type = ml_collections.FieldReference(None, field_type=str)
  c.dataset.world = ml_collections.ConfigDict(dict(
      num_users=3000, num_items=5000, num_topics=50, min_events=30, max_events=80, seed=0))
  c.num_epochs = 2
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  c.select_metric = "targets/HR@50"
  if "smoke" in args:
    c.dataset.world.update(num_users=600, num_items=1500, num_topics=20, min_events=20, max_events=60)
    c.total_steps = 60
    c.eval_every_steps = 30
  return c
