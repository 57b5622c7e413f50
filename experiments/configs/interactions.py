r"""Any retrieval model on an interaction log you bring: CSV, TSV or Parquet (optionally .gz), one file or
a glob of shards. Leave-one-out full ranking, as on MovieLens.

  mvhan-train --config=experiments/configs/interactions.py --workdir=runs/mylog \
    --config.dataset.path='logs/clicks-*.csv.gz' --config.dataset.user_column=member \
    --config.dataset.item_column=sku --config.dataset.time_column=clicked_at
  mvhan-train --config=experiments/configs/interactions.py --workdir=runs/mylog --mode=recommend --user=<raw id> ...

Arguments after ':' (comma-separated): model=<two_tower (default) | two_tower_recency | mind | mind1 |
comirec_sa | comirec_dr | multitower | mvhan | any other name of mvhan_jax.models.MODELS>, and 'smoke'
(a few steps of a small model). The model's hyper-parameters are those of its MovieLens-100k config.

The log (``--config.dataset.<field>``):
  path             a file or a glob of shards (.csv, .tsv, .parquet, each optionally .gz)
  user_column, item_column   raw ids of any type (integers sort numerically, others as text)
  time_column      epoch seconds, or ISO-8601 datetimes (2024-03-01T12:30:00, with or without a zone)
  rating_column    optional: kept as the interaction's rating
  min_events       users with fewer events are dropped (counted and printed); 3 is the least the
                   leave-one-out protocol can evaluate
Optional feature files, ``--config.dataset.item_features.<field>`` and ``user_features.<field>``:
  path, key        the file (or glob) and its column of raw ids as in the log
  categorical      comma-separated columns of one value each
  multi, separator columns of several values joined by `separator` (default '|'), e.g. genres
  dense            columns of float vectors (Parquet lists, or numbers separated by spaces)
  title            (items) a display name for --mode=recommend
  type             (items) MV-HAN's content type; without it MV-HAN sees one type
The conversion (mvhan_jax/data/logs.py) is cached under <data_dir>/logs/ and keyed by these fields
and the files' sizes and times; ``--config.dataset.engine=beam`` runs it as an Apache Beam pipeline
(``pip install 'mvhan_jax[beam]'``; Beam's own flags in ``--config.dataset.beam_args``). The raw-id
maps are copied into <workdir>/ids/. Evaluation and checkpoints happen once per epoch.
"""

import ml_collections

from mvhan_jax import configs

ARGS = ("model=", "smoke")

# model= -> (the MovieLens-100k config it takes its hyper-parameters from, that config's args)
BASES = {
    "two_tower": ("two_tower_ml100k", ""),
    "two_tower_recency": ("two_tower_ml100k", "recency"),
    "mind": ("mind_ml100k", "model=mind"),
    "mind1": ("mind_ml100k", "model=mind,K=1"),
    "comirec_sa": ("mind_ml100k", "model=comirec_sa"),
    "comirec_dr": ("mind_ml100k", "model=comirec_dr"),
    "multitower": ("multitower_ml100k", ""),
    "mvhan": ("mvhan_ml100k", "model=mvhan"),
    "mv_dnn": ("mvhan_ml100k", "model=mv_dnn"),
}


def _features() -> ml_collections.ConfigDict:
  f = ml_collections.ConfigDict()
  f.path = ""
  f.key = ""
  f.categorical = ""
  f.multi = ""
  f.separator = "|"
  f.max_values = 16
  f.dense = ""
  f.title = ""
  f.type = ""
  return f


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  model = args.get("model", "two_tower")
  smoke = "smoke" in args
  if model in BASES:
    base, base_args = BASES[model]
  else:  # another registered model: the two-tower's schedule, that model's name
    base, base_args = "two_tower_ml100k", ""
  base_args = ",".join(a for a in (base_args, "smoke" if smoke else "") if a)
  c = configs.sibling(__file__, base).get_config(base_args or None)
  if model not in BASES:
    c.model.name = model
  d = ml_collections.ConfigDict()
  d.name = "interactions"
  d.data_dir = ml_collections.FieldReference(None, field_type=str)
  d.path = ""
  d.user_column = ""
  d.item_column = ""
  d.time_column = ""
  d.rating_column = ""
  d.min_events = 3
  d.shards = 0          # ArrayRecord shards of training examples; 0: one per 2M log rows
  d.in_memory_mb = 2048  # training examples up to this size are loaded into memory, larger ones read per batch
  d.engine = "local"    # or 'beam'
  d.beam_args = ""      # e.g. '--runner=DataflowRunner --project=... --temp_location=gs://...'
  d.item_features = _features()
  d.user_features = _features()
  d.content_types = ml_collections.FieldReference(None, field_type=str)
  c.dataset = d
  # The log's size is unknown here: evaluate and checkpoint once per epoch.
  c.eval_every_steps = 0
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 200 if not smoke else 20
  c.eval_per_type = False
  c.type_schedule = ()
  c.loss.negatives_per_type = False
  if smoke:
    c.eval_every_steps = c.total_steps // 2
  return c
