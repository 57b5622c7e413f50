r"""Multi-tower multi-interest model with user representation repel on MovieLens-100k.

Launch (leave-one-out, full ranking):
  mvhan-train --config=experiments/configs/multitower_ml100k.py --workdir=runs/mt
  mvhan-train --config=experiments/configs/multitower_ml100k.py:readout=argmax,repel=none --workdir=runs/mt_argmax
  mvhan-train --config=experiments/configs/multitower_ml100k.py:tower=single,extractor=comirec_sa --workdir=runs/sa
  mvhan-train --config=experiments/configs/multitower_ml100k.py:protocol=comirec --workdir=runs/mt_comirec

Arguments after ':' (comma-separated key=value or flags):
  extractor=mind|comirec_sa|comirec_dr   the user tower (default mind)
  K=<int>                                number of interests (default 4)
  tower=multi|single    multi: models/multitower.py; single: the plain MIND / ComiRec model of the
                        same extractor (experiments/configs/mind_ml100k.py), for the ablation
  readout=serve|argmax  train = serve (max over interests for every candidate) or the argmax readout
  score=max|lse         training score under readout=serve; lse_t=<float> its temperature
  repel=hinge|infonce|none   the repel regulariser; lam=<float> its weight, margin=<float> (hinge)
  protocol=leave_one_out|comirec         evaluation protocol (comirec: 8:1:1 users, Recall@50 selection)
  epochs=<int>          overrides config.num_epochs (the cosine schedule follows)
  smoke                 a few hundred steps of a small model, for tests
  dataset=ml100k|ml1m   MovieLens-1M: see configs.set_movielens_dataset (epochs= still wins)
Both towers use the log-uniform negative sampler with logQ (as the MIND configs).
Expected result: experiments/results/multitower.md (mean ± std over 3 seeds).
"""

import ml_collections

from mvhan_jax import configs

ARGS = ("extractor=", "K=", "tower=", "readout=", "score=", "lse_t=", "repel=", "lam=", "margin=", "protocol=",
        "epochs=", "smoke", "dataset=")


def _choice(args, key, default, allowed):
  value = args.get(key, default)
  if value not in allowed:
    raise configs.ConfigError(f"multitower config: {key}={value!r} is unknown: use one of {allowed}")
  return value


def apply_args(c: ml_collections.ConfigDict, args: dict[str, str]) -> ml_collections.ConfigDict:
  """Turns ``c`` (a MIND/ComiRec config of the right extractor) into the requested variant."""
  tower = _choice(args, "tower", "multi", ("multi", "single"))
  c.loss.sampler = "log_uniform"
  if tower == "single":
    return c
  m = c.model
  m.extractor = m.name
  m.name = "multitower"
  m.item_hidden = m.get("hidden", (256,))
  m.item_id = True
  m.drop_unseen_ids = True
  m.id_dropout = 0.0
  m.training = _choice(args, "readout", "serve", ("serve", "argmax"))
  m.score = _choice(args, "score", "max", ("max", "lse"))
  m.lse_temperature = configs.number_arg(args, "lse_t", 0.1, __file__, float)
  m.repel = _choice(args, "repel", "hinge", ("hinge", "infonce", "none"))
  m.repel_weight = configs.number_arg(args, "lam", 0.1, __file__, float)
  m.repel_margin = configs.number_arg(args, "margin", 0.0, __file__, float)
  m.repel_temperature = 0.1
  return c


def mind_args(args: dict[str, str]) -> str:
  """The MIND / ComiRec config args of the extractor ``args`` names."""
  extractor = _choice(args, "extractor", "mind", ("mind", "comirec_sa", "comirec_dr"))
  return configs.format_args({"model": extractor, "K": args.get("K", "4"), **({"smoke": ""} if "smoke" in args else {})})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  c = configs.sibling(__file__, "mind_ml100k").get_config(mind_args(args))
  protocol = _choice(args, "protocol", "leave_one_out", ("leave_one_out", "comirec"))
  if protocol == "comirec":
    c.protocol = "comirec"
    c.select_metric = "Recall@50"
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 300
  c = configs.set_movielens_dataset(c, args.get("dataset"), __file__)
  if "epochs" in args:
    c.num_epochs = configs.number_arg(args, "epochs", None, __file__)
  return apply_args(c, args)
