r"""MV-HAN (and its baselines) on MovieLens-100k with content types, leave-one-out full ranking.

Content types (config.dataset.content_types, see mvhan_jax/data/multitype.py): 'genre_family' splits
the 1,682 movies into mainstream (type 1, the source: 1,410 items / 84.8k ratings), family (type 2:
Children's or Animation, 131 items / 7.9k) and niche (type 3: Documentary, Fantasy, Film-Noir, Musical,
Western, 141 items / 7.3k): real genres, and sparse on the target side as MV-HAN's target types are.

Launch:
  mvhan-train --config=experiments/configs/mvhan_ml100k.py --workdir=runs/mvhan
  mvhan-train --config=experiments/configs/mvhan_ml100k.py:typed --workdir=runs/mvhan_typed
  mvhan-train --config=experiments/configs/mvhan_ml100k.py:model=mv_dnn,typed --workdir=runs/mvdnn

Arguments after ':' (comma-separated key=value or flags):
  model=mvhan|mv_dnn|two_tower   the model (two_tower: the pooled single-tower baseline)
  pooled                         the default: batches over all types, negatives from all items
  typed                          the paper's training: single-type batches on the schedule
                                 (1, 2, 1, 3) = source, target, source, target, and negatives of the
                                 batch's type
  single=<t>                     a model trained on type t's examples only (schedule (t,), negatives of
                                 type t): the paper's single-type baseline with model=two_tower
  exclusive_embeddings           ablation: content embeddings per type (model=mvhan)
  fel_per_type                   ablation: one content FEL per type (model=mvhan)
  mlp                            ablation: residual MLP instead of MHSA in the FEL (model=mvhan)
  learn_temperature              a learned score temperature instead of the fixed 0.1
  softmax=full|sampled           the loss: cross-entropy over every item (the default for pooled
                                 batches, config.loss.kind='full_softmax') or the sampled softmax over
                                 256 popularity^0.75 negatives with logQ (the default, and the only
                                 choice, under 'typed' / 'single=', whose negatives are of one type)
  light                          a 4x cheaper model for many-run tables: d = 32, one FEL block, MRL 128,
                                 10 behaviour tokens, 128 negatives (experiments/mvhan_table.py)
  tokens=<K>                     the K most recent behaviours given as tokens (default 20; 5 halves the
                                 training step at batch 1,024 at the same ML-100k test HR@10 / NDCG@10,
                                 experiments/results/bench/README.md)
  smoke                          a few steps of a small model, for tests
  dataset=ml100k|ml1m            MovieLens-1M (same genre-family rule): configs.set_movielens_dataset
  behaviour=tokens|causal        the user tower's behaviour input: the paper's pooled history + 20
                                 recent behaviours as field tokens (default), or 'causal': one token,
                                 a causal self-attention encoder over the history (SASRec's block,
                                 model.behaviour_encoder), trained at every history position on
                                 SASRec's windows with SASRec's full-softmax budget (batch 128, 4,000
                                 steps, evaluated every 400)
  sasrec_paths                   behaviour=causal (implied) with SASRec's direct paths around the FEL
                                 and the MLP heads (the best causal setting of mvhan_quality.md): no
                                 user-id field, dropout 0.2, the FEL output at the newest position
                                 read out (model.last_token_readout) and each item's id row added to
                                 its type head's output (model.item_id_residual)
  gate                           behaviour=causal (implied) starting as SASRec: user vector = the
                                 encoder's state + g_u * the FEL/MLP head, item vector = its id row +
                                 g_i * its type head, scalar gates learned from 0 (model.sasrec_gate)
  head_lr=<x>, head_wd=<w>       gate (implied) with its gated heads (GATED_HEADS) trained at the
                                 learning rate x the others' and with decoupled weight decay w
                                 (defaults 1 and 1e-4, config.optimizer.group_*)
  sasrec_init=frozen|tuned       gate (implied) on a trained SASRec: the SASRec part (id table,
                                 positions, causal block, norm) loaded from the best checkpoint of
                                 the table's SASRec (full softmax) run of the same seed
                                 (SASREC_WORKDIRS, config.warm_start, mvhan_jax/warm_start.py) and
                                 kept fixed ('frozen') or trained on ('tuned'); train that run first:
                                 python experiments/ml100k_table.py --models=sasrec_full (ml1m_table.py
                                 on ML-1M, its 12,000-step row), or set --config.warm_start.workdir
  sasrec_lr=<x>                  sasrec_init=tuned with the loaded SASRec part (SASREC_PART) trained at
                                 the learning rate x the heads' (config.optimizer.group_*); excludes
                                 head_lr= / head_wd=
  steps=<int>                    a fixed number of training steps instead of epochs, evaluated every
                                 steps/10 (behaviour=causal: default 4,000, SASRec's ML-100k budget;
                                 SASRec's ML-1M one is 12,000)
Every run also reports per-type metrics with the ranking restricted to the target's type
('valid/family/HR@50', 'valid/niche/AUC', ...) and their mean over the target types ('targets/...').
Expected result: experiments/results/mvhan_ml100k.md (the paper-shape rows, sampled softmax) and,
for the default configuration (full softmax), test HR@10 0.171 ± 0.008 / NDCG@10 0.091 ± 0.004 /
HR@50 0.445 ± 0.005 in ml100k.md (softmax=sampled: 0.162 / 0.084 / 0.446). behaviour=causal, seed
0: 0.173 / 0.091 / 0.430; with --config.model.user_id_token=False --config.model.dropout=0.2
--config.model.last_token_readout=True: 0.180 / 0.095 / 0.466 (experiments/results/mvhan_quality.md).
sasrec_paths,gate (3 seeds, ml100k.md): 0.197 ± 0.005 / 0.107 ± 0.001 / 0.465 ± 0.010.
sasrec_paths,gate,steps=12000,dataset=ml1m (seed 0, ml1m.md): 0.302 / 0.181 / 0.557 (SASRec at the
same budget: 0.283 / 0.165 / 0.532).
"""

import ml_collections

from mvhan_jax import configs

ARGS = ("model=", "typed", "pooled", "single=", "light", "exclusive_embeddings", "fel_per_type", "mlp",
        "learn_temperature", "softmax=", "smoke", "dataset=", "behaviour=", "tokens=", "sasrec_paths",
        "gate", "steps=", "head_lr=", "head_wd=", "sasrec_init=", "sasrec_lr=")
# The parameters `gate` adds to SASRec's (the causal encoder, positions and the shared item-id table):
# the FELs, MLP heads, read-out, content and profile field embeddings, the user-id table and the gates.
# sasrec_init=: SASRec's parameter names (models/sasrec.py) -> the SASRec part of MV-HAN (models/mvhan.py).
SASREC_TO_MVHAN = ((r"^params/item_id_embed/", "params/content_embed/id_embed/"),
                   (r"^params/block_(\d+)/", r"params/causal_\1/"),
                   (r"^params/final_norm/", "params/causal_norm/"))
# The table scripts' SASRec (full softmax) workdir of each dataset; {seed} is config.seed.
SASREC_WORKDIRS = {
    "ml100k": "runs/ml100k_table/experiments_configs_sasrec_ml100k.py_softmax=full/seed{seed}",
    "ml1m": "runs/ml1m_table/experiments_configs_sasrec_ml100k.py_softmax=full,steps=12000,dataset=ml1m/seed{seed}",
}
# The parameters sasrec_init= loads (SASREC_TO_MVHAN's targets and the shared position table).
SASREC_PART = r"^params/(content_embed/id_embed|position_embed|causal_\d+|causal_norm)/"
GATED_HEADS = (r"(content_fel|content_heads|content_embed/fields|user_id_embed|user_fel|user_mlp|user_fields|"
               r"last_readout|user_gate|item_gate)")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_args(arg, ARGS, __file__)
  smoke = "smoke" in args
  name = args.get("model", "mvhan")
  c = configs.sibling(__file__, "two_tower_ml100k").get_config("smoke" if smoke else "recency")
  c.dataset.content_types = "genre_family"
  c.eval_per_type = True
  c.type_schedule = ()
  c.loss.negatives_per_type = False
  tokens = configs.number_arg(args, "tokens", None, __file__)  # None: the default of the model size
  if tokens is not None and (tokens < 0 or name == "two_tower"):
    raise configs.ConfigError(f"mvhan_ml100k.py: tokens={tokens} needs model=mvhan or mv_dnn and a value >= 0 "
                              "(0: no behaviour tokens)")
  if name == "two_tower":
    pass  # the foundation's two-tower (recency pooling), evaluated per type
  elif name in ("mvhan", "mv_dnn"):
    m = ml_collections.ConfigDict()
    m.name = name
    m.dim = 32 if smoke else 64
    m.num_heads = 2
    m.mrl_hidden = (64,) if smoke else (256,)
    m.num_behaviour_tokens = (8 if smoke else 20) if tokens is None else tokens
    m.normalize = True
    m.dropout = 0.0
    m.learn_temperature = "learn_temperature" in args
    m.init_temperature = c.loss.temperature
    m.tie_behaviour_embeddings = True  # False: the user tower's own id table for history items
    m.user_id_token = True             # False: no user-id field (profile + history only)
    m.last_token_readout = False       # True: + the FEL output at the most recent behaviour (SASRec's read-out)
    m.item_id_residual = False         # True: content vector = type head + the item's id embedding
    if name == "mvhan":
      m.fel_layers = 1 if smoke else 2
      m.share_embeddings = "exclusive_embeddings" not in args
      m.share_fel = "fel_per_type" not in args
      m.interaction = "mlp" if "mlp" in args else "mhsa"
    elif {"exclusive_embeddings", "fel_per_type", "mlp"} & set(args):
      raise configs.ConfigError("the sharing / interaction ablations apply to model=mvhan only (MV-DNN fixes them)")
    c.model = m
  else:
    raise configs.ConfigError(f"mvhan_ml100k.py: model={name!r} is unknown: use mvhan, mv_dnn or two_tower")
  head_args = {"head_lr", "head_wd"} & set(args)
  if head_args or "sasrec_init" in args:
    args["gate"] = ""  # head_lr= / head_wd= (the gated heads' optimizer) and sasrec_init= imply gate
  behaviour = args.get("behaviour", "causal" if {"sasrec_paths", "gate"} & set(args) else "tokens")
  if behaviour not in ("tokens", "causal"):
    raise configs.ConfigError(f"mvhan_ml100k.py: behaviour={behaviour!r} is unknown: use 'tokens' or 'causal'")
  for setting in ("sasrec_paths", "gate"):
    if behaviour != "causal" and setting in args:
      raise configs.ConfigError(f"mvhan_ml100k.py: {setting} is a setting of behaviour=causal, not of "
                                f"behaviour={behaviour}: drop one of them")
  if behaviour == "causal":
    if name != "mvhan":
      raise configs.ConfigError("mvhan_ml100k.py: behaviour=causal applies to model=mvhan only")
    if {"typed", "single"} & set(args):
      raise configs.ConfigError("mvhan_ml100k.py: behaviour=causal trains SASRec's windows over all types; it "
                                "excludes 'typed' and 'single=' (drop them, or drop behaviour=causal)")
    c.model.behaviour_encoder = "causal"
    c.model.maxlen = c.get_ref("maxlen")
    c.model.causal_blocks = 1      # SASRec's tuned encoder (experiments/results/sasrec_tuning.md)
    c.model.causal_heads = 1
    c.model.causal_dropout = 0.2
    c.loss.positions = "all"       # every history prefix against the item that followed it
    c.train_examples = "windows"
    if "sasrec_paths" in args:
      c.model.update(user_id_token=False, dropout=0.2, last_token_readout=True, item_id_residual=True)
    if "gate" in args:
      c.model.sasrec_gate = True
  if "sasrec_init" in args:
    init = args["sasrec_init"]
    if init not in ("frozen", "tuned"):
      raise configs.ConfigError(f"mvhan_ml100k.py: sasrec_init={init!r} is unknown: use 'frozen' or 'tuned'")
    c.warm_start = ml_collections.ConfigDict()
    c.warm_start.workdir = SASREC_WORKDIRS.get(args.get("dataset", "ml100k"), "") if not smoke else ""
    c.warm_start.rename = SASREC_TO_MVHAN
    c.warm_start.freeze = init == "frozen"
  if "sasrec_lr" in args:
    if args.get("sasrec_init") != "tuned" or head_args:
      raise configs.ConfigError("mvhan_ml100k.py: sasrec_lr= sets the learning rate of a tuned SASRec part: give "
                                "it with sasrec_init=tuned and without head_lr= / head_wd=")
    c.optimizer.group_pattern = SASREC_PART
    c.optimizer.group_lr_scale = configs.number_arg(args, "sasrec_lr", 1.0, __file__, float)
  if head_args:
    c.optimizer.group_pattern = GATED_HEADS
    c.optimizer.group_lr_scale = configs.number_arg(args, "head_lr", 1.0, __file__, float)
    c.optimizer.group_weight_decay = configs.number_arg(args, "head_wd", c.optimizer.weight_decay, __file__, float)
  if "typed" in args and "pooled" in args:
    raise configs.ConfigError("mvhan_ml100k.py: 'typed' and 'pooled' exclude each other; give one")
  if "typed" in args:
    c.type_schedule = (1, 2, 1, 3)
    c.loss.negatives_per_type = True
  if "single" in args:
    t = configs.number_arg(args, "single", None, __file__)
    c.type_schedule = (t,)
    c.loss.negatives_per_type = True
  # 256 negatives (of the batch's type under 'typed'): the content tower runs on every sampled item
  # each step, so this is its main cost (a step with 1,024 cost ~3x one with 256 on the 2-core CPU).
  c.loss.num_negatives = 128 if smoke else 256
  c.num_epochs = 6
  if "light" in args:
    c.loss.num_negatives = 128
    c.model.dim = 32
    if name != "two_tower":
      c.model.update(fel_layers=1 if name == "mvhan" else 0, mrl_hidden=(128,),
                     num_behaviour_tokens=10 if tokens is None else tokens)
    else:
      c.model.hidden = (128,)
  typed_negatives = c.loss.negatives_per_type
  softmax = args.get("softmax", "sampled" if typed_negatives else "full")
  if softmax not in ("full", "sampled"):
    raise configs.ConfigError(f"mvhan_ml100k.py: softmax={softmax!r} is unknown: use 'full' or 'sampled'")
  if softmax == "full" and typed_negatives:
    raise configs.ConfigError("mvhan_ml100k.py: softmax=full ranks every item whatever its type; 'typed' and "
                              "'single=' draw negatives of the batch's type: give softmax=sampled or drop them")
  if softmax == "full":
    # Every item is a negative (Klenitskiy & Vasilev, RecSys 2023): on ML-100k (3 seeds) it lifted
    # test HR@10 0.162 -> 0.171 and the model's use of the last item (experiments/order_probe.py).
    c.loss.kind = "full_softmax"
  c.select_metric = "NDCG@10"
  if behaviour == "causal" and not smoke:
    # SASRec's full-softmax budget (sasrec_ml100k.py:softmax=full), so the two compare at equal steps.
    c.batch_size = 128
    c.total_steps = 4000
    c.eval_every_steps = c.checkpoint_every_steps = 400
    c.early_stopping_patience = 5
  configs.set_fixed_steps(c, args, __file__)
  if smoke:
    c.batch_size = 64
  return configs.set_movielens_dataset(c, args.get("dataset"), __file__)
