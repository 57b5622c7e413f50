r"""Multi-tower multi-interest model on the synthetic world whose users have 1..4 known interests
(ComiRec protocol), the world of experiments/configs/mind_synthetic.py.

Launch:
  mvhan-train --config=experiments/configs/multitower_synthetic.py --workdir=runs/mt_synth
  python experiments/multitower_table.py     # the ablation and the cold-start experiment

Arguments: as experiments/configs/multitower_ml100k.py (extractor=, K=, tower=, readout=, score=,
lse_t=, repel=, lam=, margin=, epochs=, smoke); the protocol is always ComiRec's.
"""

import ml_collections

from mvhan_jax import configs

_mt = configs.sibling(__file__, "multitower_ml100k")
ARGS = tuple(a for a in _mt.ARGS if a != "dataset=")  # dataset=: MovieLens only


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  if args.get("protocol", "comirec") != "comirec":
    raise configs.ConfigError("multitower_synthetic.py: the synthetic world is evaluated with protocol=comirec only")
  c = configs.sibling(__file__, "mind_synthetic").get_config(_mt.mind_args(args))
  if "epochs" in args:
    c.num_epochs = configs.number_arg(args, "epochs", None, __file__)
  return _mt.apply_args(c, args)
