r"""Multi-tower multi-interest model on the synthetic world whose users have 1..4 known interests
(ComiRec protocol), the world of experiments/configs/mind_synthetic.py.

Launch:
  mvhan-train --config=experiments/configs/multitower_synthetic.py --workdir=runs/mt_synth
  python experiments/multitower_table.py     # the ablation and the cold-start experiment

Arguments: as experiments/configs/multitower_ml100k.py (extractor=, K=, tower=, readout=, score=,
lse_t=, repel=, lam=, margin=, epochs=, smoke); the protocol is always ComiRec's.
"""

import os

import ml_collections

from mvhan_jax.configs import config_module

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mt = config_module(os.path.join(_HERE, "multitower_ml100k.py"))
  args = mt.parse_args(arg)
  if args.get("protocol", "comirec") != "comirec":
    raise ValueError("multitower_synthetic.py: the synthetic world is evaluated with protocol=comirec only")
  extractor = mt._choice(args, "extractor", "mind", ("mind", "comirec_sa", "comirec_dr"))  # pylint: disable=protected-access
  synth = config_module(os.path.join(_HERE, "mind_synthetic.py"))
  c = synth.get_config(f"model={extractor},K={args.get('K', 4)}" + (",smoke" if "smoke" in args else ""))
  if "epochs" in args:
    c.num_epochs = int(args["epochs"])
  return mt.apply_args(c, args)
