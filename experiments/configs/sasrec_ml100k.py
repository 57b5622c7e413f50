r"""SASRec (Kang & McAuley, ICDM 2018) on MovieLens-100k, leave-one-out full ranking: the reference
sequential baseline (mvhan_jax/models/sasrec.py), trained by the retrieval task like the two-tower
(sampled softmax over popularity^0.75 negatives with logQ, cosine scores / temperature).

Launch:
  mvhan-train --config=experiments/configs/sasrec_ml100k.py --workdir=runs/sasrec
  mvhan-train --config=experiments/configs/sasrec_ml100k.py:blocks=2,dropout=0.5 --workdir=runs/sasrec_b2
  mvhan-train --config=experiments/configs/sasrec_ml100k.py:smoke --workdir=/tmp/sasrec_smoke

Arguments after ':' (comma-separated):
  blocks=<int>          transformer blocks
  heads=<int>           attention heads
  dim=<int>             model width D
  dropout=<float>       dropout rate
  maxlen=<int>          history window L (also the positional table)
  norm=pre|post         layer norm before (the authors' code) or after each sub-layer
  positions=absolute|recency   positional index (models/sasrec.py)
  loss=last|all         train the output at the last position only, or at every position of the
                        history (SASRec's objective; config.loss.positions, tasks/retrieval.py)
  examples=prefixes|windows   training examples: every prefix (the library's default) or SASRec's
                        non-overlapping windows (protocol.training_windows; default with loss=all)
  temperature=<float>   softmax temperature of the cosine scores
  softmax=sampled|full  sampled softmax (1,024 popularity^0.75 negatives with logQ) or the full
                        cross-entropy over every item (config.loss.kind='full_softmax'; 4,000 steps)
  steps=<int>           training steps (default 1,000; 4,000 with softmax=full), evaluated every
                        tenth of them
  dataset=ml100k|ml1m   MovieLens-1M (configs.set_movielens_dataset; the step budget is kept)
  smoke                 a small model for 120 steps (tests)
Defaults (the best of the grid in experiments/results/sasrec_tuning.md by valid NDCG@10, which lists
its commands and every run's valid / test HR@10, NDCG@10, HR@50): dim 64, 1 pre-LN block, 1 head,
dropout 0.2, maxlen 50, absolute positions, the all-positions loss on 2,412 history windows, batch
128, 1,000 steps (~53 SASRec epochs), temperature 0.1, 1,024 popularity^0.75 negatives with logQ.
Expected result (seeds 0, 1, 2; 2-8 minutes per run on the shared 2-core CPU): test HR@10
0.158 ± 0.002, NDCG@10 0.083 ± 0.003, HR@50 0.403 ± 0.005 (valid HR@10 0.193); RecBole's SASRec on
this protocol: 0.157 / 0.085 / 0.412. With softmax=full (4,000 steps, 6-15 minutes per run): 0.211 ±
0.003 / 0.109 ± 0.002 / 0.468 ± 0.009 (ml100k.md).
"""

import ml_collections

from mvhan_jax import configs

ARGS = ("blocks=", "heads=", "dim=", "dropout=", "maxlen=", "norm=", "positions=", "loss=", "examples=",
        "temperature=", "softmax=", "steps=", "smoke", "dataset=")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  smoke = "smoke" in args
  c = configs.sibling(__file__, "two_tower_ml100k").get_config("smoke" if smoke else None)
  c.maxlen = configs.number_arg(args, "maxlen", 50, __file__)
  m = ml_collections.ConfigDict()
  m.name = "sasrec"
  m.dim = configs.number_arg(args, "dim", 32 if smoke else 64, __file__)
  m.num_blocks = configs.number_arg(args, "blocks", 1, __file__)
  m.num_heads = configs.number_arg(args, "heads", 1, __file__)
  m.maxlen = c.get_ref("maxlen")
  m.dropout = configs.number_arg(args, "dropout", 0.2, __file__, float)
  m.norm = args.get("norm", "pre")
  m.positions = args.get("positions", "absolute")
  m.normalize = True
  m.item_fields = False
  m.scale_embeddings = True
  c.model = m
  c.loss.positions = args.get("loss", "all")   # 'all' (SASRec's objective) | 'last'
  c.train_examples = args.get("examples", "windows" if c.loss.positions == "all" else "prefixes")
  if not smoke:
    # The tuning budget (experiments/results/sasrec_tuning.md): 1,000 steps, evaluated every 100.
    # Windows: 2,412 examples at maxlen 50 (18 steps of 128), so 1,000 steps are ~53 SASRec epochs.
    c.batch_size = 128 if c.train_examples == "windows" else 256
    c.total_steps = 1000
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    c.early_stopping_patience = 5
  softmax = args.get("softmax", "sampled")
  if softmax not in ("sampled", "full"):
    raise configs.ConfigError(f"sasrec_ml100k.py: softmax={softmax!r} is unknown: use 'sampled' or 'full'")
  if softmax == "full" and not smoke:
    # The full softmax keeps improving validation NDCG@10 past 1,000 steps: 0.108 at 1,000, 0.121 at
    # 2,000, 0.129 at 3,200 of 4,000 (experiments/results/sasrec_tuning.md).
    c.total_steps = 4000
    c.eval_every_steps = c.checkpoint_every_steps = 400
  configs.set_fixed_steps(c, args, __file__)
  c.loss.kind = "full_softmax" if softmax == "full" else "sampled_softmax"
  c.loss.temperature = configs.number_arg(args, "temperature", c.loss.temperature, __file__, float)
  return configs.set_movielens_dataset(c, args.get("dataset"), __file__)
