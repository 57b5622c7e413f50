r"""SEMINAR on the synthetic world's lifelong (query, item) sequences (PSU pretraining + GSU/ESU).

Launch:
  mvhan-train --config=experiments/configs/seminar_synthetic.py --workdir=runs/seminar_syn
  mvhan-train --config=experiments/configs/seminar_synthetic.py:attention=pq --workdir=runs/s_pq

Arguments after ':' (comma-separated):
  'nopretrain'            no PSU pretraining (embedder from its random init)
  'no_next' | 'no_align' | 'no_rel'   drop one PSU objective (its weight set to 0)
  'attention=exact|pq'    GSU top-K at finetuning; 'eval_attention=exact|pq' at inference
                          (default: the same as at finetuning)
  'freeze'                keep the pretrained embedder fixed during finetuning
  'smoke'                 a tiny world and a few steps (tests)
World (`mvhan_jax.data.synthetic_config.WorldConfig`): 200 users with 1,000 to 2,000 events each
(~300k events; ~17% search events with 1-5 keywords, the rest browsing), 1,000 items with id, text
(32-d) and image (32-d) views, 50 topics. maxlen 1,024, d 32, 4 heads, top-K 32, 4 sampled
negatives per target (uniform: `train.negatives`), 16 training targets per user, 3 epochs. Every
user is evaluated.
Expected (2-core CPU): ~1.5-2 minutes per exact-attention run on a quiet machine (PSU ~25 s,
finetuning ~40 s, final evaluation ~30 s; 3-3.5 minutes when the cores are shared); PQ finetuning
(`attention=pq`) costs ~1.8x an exact step on CPU (the catalogue's 3,000 item vectors and 1,001
keywords are PQ-encoded every step; encoding the 32 x 1,024 x 3 history keys instead cost 13x) plus
~10-20 s of k-means per codebook refresh (step 0 and each evaluation). Results:
experiments/results/seminar_synthetic.md (experiments/seminar_table.py --seeds=0,1,2).
"""

import ml_collections

from mvhan_jax import configs

# seminar_ml100k.py takes the same arguments but 'smoke'.
ARGS = ("nopretrain", "no_next", "no_align", "no_rel", "attention=", "eval_attention=", "freeze", "smoke")


def base_config() -> ml_collections.ConfigDict:
  """Everything but the dataset (shared with seminar_ml100k.py)."""
  c = ml_collections.ConfigDict()
  c.task = "seminar"
  c.seed = 0
  c.maxlen = 1024
  c.model = ml_collections.ConfigDict(dict(
      dim=32, alpha=0.5, heads=4, top_k=32, head_dim=16, mlp=(128, 64),
      attention="exact", eval_attention="",
      pq_scoring="decoded", pq_candidates=128, pq_subspaces=8, pq_centroids=256, pq_train_vectors=8192,
      pq_iters=10))
  c.pretrain = ml_collections.ConfigDict(dict(
      enabled=True, checkpoint="", freeze=False, window=64, windows_per_user=16, batch_size=16,
      num_epochs=1, total_steps=0, lr=1e-3, tau=0.05, w_next=1.0, w_align=0.1, w_rel=1.0,
      stop_at_step=-1))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=32, num_negatives=4, negatives="uniform", negative_power=0.75, targets_per_user=16,
      min_history=16, num_epochs=3, total_steps=0, eval_every_steps=0))
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-3, schedule="constant", warmup_steps=10, final_lr_fraction=0.0, weight_decay=0.0,
      grad_clip=1.0))
  c.eval = ml_collections.ConfigDict(dict(user_chunk=16, item_chunk=250, full_corpus_valid=False,
                                          extra_attentions=()))
  c.select_metric = "sampled/NDCG@10"
  c.log_every_steps = 25
  c.checkpoint_every_steps = 100
  c.stop_at_step = -1
  c.tensorboard = False
  return c


def apply_args(c: ml_collections.ConfigDict, args: dict[str, str]) -> None:
  """The model / pretraining arguments (every one of ARGS but 'smoke', which each file applies)."""
  if "attention" in args:
    c.model.attention = args["attention"]
  if "eval_attention" in args:
    c.model.eval_attention = args["eval_attention"]
  if "nopretrain" in args:
    c.pretrain.enabled = False
  for objective in ("next", "align", "rel"):
    if "no_" + objective in args:
      c.pretrain["w_" + objective] = 0.0
  if "freeze" in args:
    c.pretrain.freeze = True


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  d = ml_collections.ConfigDict()
  d.name = "synthetic"
  d.data_seed = 0
  d.clicks_only = False
  d.world = ml_collections.ConfigDict(dict(num_users=200, num_items=1000, num_topics=50,
                                           min_events=1000, max_events=2000, seed=0))
  c.dataset = d
  args = configs.parse_args(arg, ARGS, __file__)
  apply_args(c, args)
  if "smoke" in args:
    d.world.update(num_users=40, num_items=600, min_events=60, max_events=120)
    c.maxlen = 64
    c.model.top_k = 8
    c.model.pq_train_vectors = 512
    c.model.pq_iters = 3
    c.pretrain.update(window=16, windows_per_user=4, batch_size=16, num_epochs=1)
    c.train.update(batch_size=16, targets_per_user=4, min_history=4, num_epochs=1)
    c.eval.update(user_chunk=8, item_chunk=200)
    c.log_every_steps = 5
    c.checkpoint_every_steps = 5
  return c
