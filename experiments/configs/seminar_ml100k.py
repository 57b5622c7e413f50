r"""SEMINAR on MovieLens-100k (leave-one-out): no queries, modalities id / title text / genres.

Launch:
  python -m mvhan_jax.seminar.main --config=experiments/configs/seminar_ml100k.py --workdir=runs/seminar_ml

Arguments after ':' as in seminar_synthetic.py ('nopretrain', 'no_next', 'no_align', 'no_rel',
'attention=exact|pq', 'eval_attention=exact|pq', 'freeze').
Data (`mvhan_jax.seminar.data.movielens_data`): every rating an event (browsing only: the
query-item relevance objective has no rows and contributes 0); text = mean of fixed random vectors
of the hashed title words (4,096 buckets, 32-d); the genre multi-hot vector takes the image slot.
maxlen 200 (the median user has ~65 ratings, the largest 735), top-K 32. Every one of the 943 users
is evaluated against all 1,682 items (full) and against 99 random unseen items (sampled).
"""

import os

import ml_collections

from mvhan_jax.configs import config_module

_syn = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "seminar_synthetic.py"))


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
  c.train.targets_per_user = 16
  c.train.min_history = 4
  c.train.num_epochs = 2
  c.eval.item_chunk = 841
  _syn.apply_args(c, arg)
  return c
