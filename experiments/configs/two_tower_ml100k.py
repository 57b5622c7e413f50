r"""Two-tower (YouTube-DNN style) baseline on MovieLens-100k, leave-one-out full ranking.

Launch:
  mvhan-train --config=experiments/configs/two_tower_ml100k.py --workdir=/tmp/tt_ml100k
  mvhan-train --config=experiments/configs/two_tower_ml100k.py:smoke --workdir=/tmp/tt_smoke

Arguments after ':' (comma-separated): 'recency' (learned recency-weighted history pooling instead
of the mean), 'smoke' (120 steps of a small model, for tests), 'dataset=ml1m' (MovieLens-1M: a third
of the epochs, an evaluation every half epoch; `configs.set_movielens_dataset`).
Expected result (2-core CPU, ~3 minutes): test HR@10 ~0.12, HR@50 ~0.36 with mean pooling; see
experiments/results/ml100k.md for mean ± std over seeds and the command that produced it.
"""

import ml_collections

from mvhan_jax import configs

ARGS = ("recency", "smoke", "dataset=")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  c = ml_collections.ConfigDict()
  c.task = "retrieval"
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "movielens_100k"
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.protocol = "leave_one_out"
  c.maxlen = 50

  c.model = ml_collections.ConfigDict()
  c.model.name = "two_tower"
  c.model.dim = 64
  c.model.hidden = (256,)
  c.model.pooling = "mean"
  c.model.maxlen = c.get_ref("maxlen")
  c.model.normalize = True
  c.model.dropout = 0.0

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "sampled_softmax"   # or 'in_batch'
  c.loss.sampler = "popularity"     # 'uniform' | 'log_uniform' | 'popularity'
  c.loss.alpha = 0.75
  c.loss.num_negatives = 1024
  c.loss.logq = True
  c.loss.remove_accidental_hits = True
  c.loss.temperature = 0.1

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.optimizer.final_lr_fraction = 0.01
  c.optimizer.grad_clip = 1.0

  c.batch_size = 256
  c.num_epochs = 12
  c.total_steps = 0                 # > 0 overrides num_epochs
  c.log_every_steps = 50
  c.eval_every_steps = 380          # about one epoch
  c.checkpoint_every_steps = 380
  c.early_stopping_patience = 3     # evaluations without a better valid NDCG@10
  c.select_metric = "NDCG@10"
  c.prefetch = 2
  c.progress = True
  c.tensorboard = True
  c.fail_at_step = -1               # tests only: exit abruptly at this step, as a kill would

  c.index = ml_collections.ConfigDict()
  c.index.build = True
  c.index.backend = "scann"

  # Scale-out (mvhan_jax/sharding.py): mesh shape, and which tables are split by rows over which axes.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # -1: every device not used by 'model'
  c.mesh.model = 1
  c.mesh.table_axes = ("model",)    # or ("data", "model"): rows over every device
  c.mesh.shard_tables = r"_embed/embedding$"
  c.mesh.min_rows = 65536           # smaller tables stay replicated

  if "recency" in args:
    c.model.pooling = "recency"
  if "smoke" in args:
    c.total_steps = 120
    c.log_every_steps = 20
    c.eval_every_steps = 60
    c.checkpoint_every_steps = 20
    c.model.hidden = (64,)
    c.model.dim = 32
    c.loss.num_negatives = 256
    c.progress = False
  return configs.set_movielens_dataset(c, args.get("dataset"), __file__)
