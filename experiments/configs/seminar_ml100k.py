r"""SEMINAR on MovieLens-100k (leave-one-out): no queries, modalities id / title text / genres.

Launch:
  mvhan-train --config=experiments/configs/seminar_ml100k.py --workdir=runs/seminar_ml

Arguments after ':' as in seminar_synthetic.py ('nopretrain', 'no_next', 'no_align', 'no_rel',
'attention=exact|pq', 'eval_attention=exact|pq', 'freeze').
Data (`mvhan_jax.seminar.data.movielens_data`): every rating an event (browsing only: the
query-item relevance objective has no rows and contributes 0); text = mean of fixed random vectors
of the hashed title words (4,096 buckets, 32-d); the genre multi-hot vector takes the image slot.
maxlen 200 (the median user has ~65 ratings, the largest 735), top-K 32. Every one of the 943 users
is evaluated against all 1,682 items (full) and against 99 random unseen items (sampled).

Finetuning differs from the synthetic world's: every training event is a target (~93k examples,
not 16 per user), batch 128, 3 epochs, and the 4 negatives per target are drawn from
popularity^0.75 with the NCE correction (`mvhan_jax.tasks.seminar.nce_logits`: the score still
estimates log p(item | history), so it ranks the whole catalogue). Why: with uniform negatives, 16
targets per user and 2 epochs the model learned little beyond popularity (its mean item scores
have Spearman 0.93 with the item counts; uniform negatives are almost all long-tail items, so
nothing teaches it to order the popular head) and ordered the head worse than popularity itself:
full HR@10 0.036 vs popularity's 0.050. This config, seed 0: full HR@10 0.069, HR@50 0.239
(popularity 0.050 / 0.140); ~20 minutes per run on a loaded 2-core machine (final evaluation ~5
minutes). Results: the SEMINAR section of experiments/results/ml100k.md.

dataset=ml1m: MovieLens-1M (6,040 users, 3,706 items, 1.0M events: about 10x the events and 14x the
full-ranking (user, item) pairs); one finetuning epoch (~7,700 steps of 128) instead of 3, as the
retrieval configs divide their epochs on ML-1M; the same windows, model and evaluation.
"""

import ml_collections

from mvhan_jax import configs

_syn = configs.sibling(__file__, "seminar_synthetic")
# No smoke-sized MovieLens: tests use the synthetic world.
ARGS = tuple(a for a in _syn.ARGS if a != "smoke") + ("dataset=",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = _syn.base_config()
  d = ml_collections.ConfigDict()
  d.name = "movielens_100k"
  d.data_dir = None
  d.data_seed = 0
  d.text_buckets = 4096
  d.text_dim = 32
  c.dataset = d
  c.maxlen = 200
  c.pretrain.window = 64
  c.pretrain.windows_per_user = 8
  c.train.targets_per_user = 0
  c.train.min_history = 4
  c.train.batch_size = 128
  c.train.num_epochs = 3
  c.train.negatives = "popularity"
  c.eval.item_chunk = 841
  args = configs.parse_args(arg, ARGS, __file__)
  dataset = args.pop("dataset", "ml100k")
  if dataset not in configs.MOVIELENS_DATASETS:
    raise configs.ConfigError(f"seminar_ml100k.py: config arg dataset={dataset!r} is unknown: use "
                              f"{' or '.join(configs.MOVIELENS_DATASETS)}")
  d.name = configs.MOVIELENS_DATASETS[dataset]
  if dataset == "ml1m":
    c.train.num_epochs = 1
    c.eval.item_chunk = 1853  # 3,706 items in two calls
  _syn.apply_args(c, args)
  return c
