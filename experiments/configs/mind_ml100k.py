r"""MIND and ComiRec-DR / ComiRec-SA on MovieLens-100k, leave-one-out full ranking.

Launch:
  mvhan-train --config=experiments/configs/mind_ml100k.py --workdir=runs/mind
  mvhan-train --config=experiments/configs/mind_ml100k.py:model=comirec_sa --workdir=runs/comirec_sa
  mvhan-train --config=experiments/configs/mind_ml100k.py:model=mind,K=1 --workdir=runs/mind1

Arguments after ':' (comma-separated key=value or flags):
  model=mind|comirec_dr|comirec_sa   the user tower (default mind)
  K=<int>                            number of interests (MIND: the maximum; K'_u is dynamic)
  power=<float>|hard                 label-aware attention power (MIND training readout)
  axis=interests|behaviours          routing softmax axis (MIND follows the paper: interests)
  smoke                              120 steps of a small model, for tests
  dataset=ml100k|ml1m                MovieLens-1M: see configs.set_movielens_dataset
  recency                            MIND: learned per-distance behaviour weights before routing
                                     (model.recency_weights; the paper's routing is order-blind)
Expected result: experiments/results/ml100k.md (mean ± std over 3 seeds).
"""

import ml_collections

from mvhan_jax import configs

ARGS = ("model=", "K=", "power=", "axis=", "smoke", "dataset=", "recency")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  c = configs.sibling(__file__, "two_tower_ml100k").get_config("smoke" if "smoke" in args else None)
  name = args.get("model", "mind")
  m = ml_collections.ConfigDict()
  m.name = name
  m.dim = c.model.dim
  m.hidden = c.model.hidden
  m.maxlen = c.get_ref("maxlen")
  m.normalize = True
  m.dropout = 0.0
  if "recency" in args and name != "mind":
    raise configs.ConfigError(f"config arg recency (learned recency weights before routing) is MIND's: "
                              f"use it with model=mind, not model={name}")
  m.recency_weights = "recency" in args
  m.num_interests = configs.number_arg(args, "K", 4, __file__)
  m.routing_iterations = 3
  m.routing_sigma = 1.0
  m.softmax_axis = args.get("axis", "interests")
  power = args.get("power", "hard")
  m.label_power = power if power == "hard" else float(power)
  c.model = m
  # The sampler: log-uniform over frequency-ranked ids (TF's LogUniformCandidateSampler), logQ.
  c.loss.sampler = "log_uniform"
  if name in ("comirec_dr",):
    c.optimizer.lr = 5e-3 if "smoke" not in args else c.optimizer.lr  # ComiRec's DR setting
  return configs.set_movielens_dataset(c, args.get("dataset"), __file__)
