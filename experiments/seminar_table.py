r"""SEMINAR ablations: experiments/results/seminar_synthetic.md (or seminar_ml100k.md / seminar_ml1m.md with
--dataset=ml100k / ml1m, which also write the SEMINAR section of experiments/results/ml100k.md / ml1m.md).

  python experiments/seminar_table.py --seeds=0,1,2
  python experiments/seminar_table.py --dataset=ml100k --seeds=0,1,2 --rows=psu,nopretrain
  python experiments/seminar_table.py --dataset=ml1m --seeds=0,1,2 --rows=psu,nopretrain
  python experiments/seminar_table.py --seeds=0 --rows=psu --override=train.num_epochs=1

Rows (config arguments of experiments/configs/seminar_<dataset>.py): no pretraining; PSU
pretraining (all three objectives); PSU without each objective in turn; exact vs PQ GSU top-K at
finetuning x at inference (two trainings, each served with both attentions, see RUNS). Each run's
workdir is under --workdir_root: a finished run with the same config is read from its
results.json (--reevaluate re-evaluates it), an interrupted one resumes, so the script can be
stopped and rerun. Test metrics of the best-by-validation (sampled NDCG@10) checkpoint; plain
columns = ranked against every item with the history excluded, "sampled" = against 99 random
unseen items (the paper's protocol, biased upwards)."""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging

from mvhan_jax import host_memory
from mvhan_jax import tasks
from mvhan_jax import configs
from mvhan_jax import report
from mvhan_jax.seminar import data as sdata
from mvhan_jax.tasks import seminar as strain
from mvhan_jax import train as train_loop

flags.DEFINE_enum("dataset", "synthetic", ["synthetic", "ml100k", "ml1m"], "Which world.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per row.")
flags.DEFINE_list("rows", [], "Row keys to run (default: all); see ROWS.")
flags.DEFINE_list("override", [], "Config field overrides of every run, e.g. train.num_epochs=1.")
flags.DEFINE_string("out", "", "Markdown file (default experiments/results/seminar_<dataset>.md).")
flags.DEFINE_string("workdir_root", "runs/seminar_table", "Where each run's workdir goes.")
flags.DEFINE_bool("reevaluate", False, "Re-evaluate finished workdirs instead of reading their results.json.")
flags.DEFINE_string("movielens_section", "auto",
                    "With --dataset=ml100k / ml1m: also write the SEMINAR section of this file ('auto': "
                    "experiments/results/<dataset>.md; '' = no).")
FLAGS = flags.FLAGS

# Training runs: key -> config arguments. The exact and PQ runs' final evaluation serves the best
# checkpoint with both GSU attentions (`eval.extra_attentions`), so the four exact / PQ cells come
# from two trainings; the PQ run restores the PSU of the 'psu' run of the same seed (the same
# pretraining config and seed give the same checkpoint) instead of pretraining again.
RUNS = {
    "nopretrain": "nopretrain",
    "psu": "",
    "no_next": "no_next",
    "no_align": "no_align",
    "no_rel": "no_rel",
    "pq": "attention=pq",
}
SHARE_PSU = {"pq": "psu"}
# Table rows: key -> (row name, run key, inference attention ('' = the run's own)).
ROWS = {
    "nopretrain": ("SEMINAR, no pretraining", "nopretrain", ""),
    "psu": ("SEMINAR, PSU pretraining (next + align + relevance)", "psu", ""),
    "no_next": ("PSU without next-pair prediction", "no_next", ""),
    "no_align": ("PSU without multi-modal alignment", "no_align", ""),
    "no_rel": ("PSU without query-item relevance", "no_rel", ""),
    "exact_pq": ("PSU, exact top-K at finetuning, PQ at inference", "psu", "pq"),
    "pq_pq": ("PSU, PQ top-K at finetuning and inference", "pq", ""),
    "pq_exact": ("PSU, PQ top-K at finetuning, exact at inference", "pq", "exact"),
}
METRICS = ("full/HR@10", "full/NDCG@10", "full/HR@50", "full/NDCG@50", "full/MRR",
           "sampled/HR@10", "sampled/NDCG@10", "sampled/MRR")
HEADERS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR", "sampled HR@10", "sampled NDCG@10", "sampled MRR")


def write_movielens_section(path, rows, keys, cmd, num_items):
  """The SEMINAR block of experiments/results/ml100k.md or ml1m.md (their other rows are not rerun)."""
  names = [ROWS[k][0] for k in keys if ROWS[k][1] in ("psu", "nopretrain") and not ROWS[k][2]]
  table = report.mean_std_table({n: rows[n] for n in names}, HEADERS)
  body = f"""## SEMINAR (target-aware ranking model, `mvhan_jax/seminar/`)

The same protocol and users; each of the {num_items:,} items is scored as SEMINAR's target (one GSU/ESU pass
per user x item), the user's history excluded, the target never. "sampled": against the paper's 99
random unseen items (biased upwards; not comparable with the rows above). Test metrics of the
best-by-validation (sampled NDCG@10) checkpoint. Config: experiments/configs/seminar_ml100k.py
(`:dataset=ml1m` on MovieLens-1M; its docstring says why its negatives and training targets differ from the synthetic world's).

{table}

Produced by (its own workdirs; the rows above are not rerun):

```bash
{cmd}
```

Machine: {report.machine_description()}. Run times (and any ablation rows run):
experiments/results/seminar_{FLAGS.dataset}.md.
"""
  report.write_section(path, "seminar", body)


def _cached_or_run(cfg, workdir, data):
  """results.json of a finished workdir with this exact config; else train (or resume) and evaluate."""
  res_path, cfg_path = os.path.join(workdir, "results.json"), os.path.join(workdir, "config.json")
  if not FLAGS.reevaluate and os.path.exists(res_path) and os.path.exists(cfg_path):
    with open(cfg_path) as f:
      same = json.load(f) == json.loads(cfg.to_json_best_effort())
    with open(res_path) as f:
      res = json.load(f)
    if same and all(a in res.get("test_by_attention", {}) for a in cfg.eval.extra_attentions):
      return res
  return tasks.train_and_evaluate(cfg, workdir, data=data)


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array: each step reuses its host memory
  logging.set_verbosity(logging.WARNING)
  conf = f"experiments/configs/seminar_{FLAGS.dataset if FLAGS.dataset == 'synthetic' else 'ml100k'}.py"
  base_args = "dataset=ml1m" if FLAGS.dataset == "ml1m" else ""
  keys = FLAGS.rows or list(ROWS)
  unknown = set(keys) - set(ROWS)
  if unknown:
    raise ValueError(f"--rows: unknown {sorted(unknown)}; known {list(ROWS)}")
  runs = [r for r in RUNS if any(ROWS[k][1] == r for k in keys)]
  extra = {r: tuple(sorted({ROWS[k][2] for k in keys if ROWS[k][1] == r and ROWS[k][2]})) for r in runs}
  results, timing, data = {}, {}, None
  for seed in map(int, FLAGS.seeds):  # seed-major: a complete one-seed table comes first
    for run in runs:                   # RUNS order: 'psu' before the 'pq' run that reuses its PSU
      args = ",".join(a for a in (base_args, RUNS[run]) if a)
      cfg = configs.load_config(f"{conf}:{args}" if args else conf)
      cfg.seed = seed
      configs.apply_overrides(cfg, FLAGS.override)
      cfg.eval.extra_attentions = extra[run]
      root = os.path.join(FLAGS.workdir_root, FLAGS.dataset)
      shared = os.path.join(root, SHARE_PSU.get(run, ""), f"seed{seed}", "psu", "final")
      if run in SHARE_PSU and os.path.isdir(shared) and cfg.pretrain.enabled and not cfg.pretrain.checkpoint:
        cfg.pretrain.checkpoint = shared
      data = data or sdata.load_data(cfg)  # the world depends on dataset.* only, never on the row
      res = _cached_or_run(cfg, os.path.join(root, run, f"seed{seed}"), data)
      results[run, seed] = res
      timing.setdefault(run, []).append(res["seconds"]["total"])
      print(f"{run} seed {seed}: test {res['test']} ({res['seconds']['total']:.0f} s)", flush=True)
  rows = {}
  for key in keys:
    name, run, att = ROWS[key]
    for seed in map(int, FLAGS.seeds):
      res = results[run, seed]
      test = res["test_by_attention"][att] if att else res["test"]
      rows.setdefault(name, []).append({h: test[m] for m, h in zip(METRICS, HEADERS)})
  table = report.mean_std_table(rows, HEADERS)
  seeds = ",".join(FLAGS.seeds)
  out = FLAGS.out or f"experiments/results/seminar_{FLAGS.dataset}.md"
  cmd = f"python experiments/seminar_table.py --dataset={FLAGS.dataset} --seeds={seeds}" + (
      f" --rows={','.join(keys)}" if FLAGS.rows else "") + (f" --override={','.join(FLAGS.override)}" if FLAGS.override else "")
  secs = ", ".join(f"{n}: {sum(t) / len(t):.0f} s" for n, t in timing.items())
  section = (f"experiments/results/{FLAGS.dataset}.md" if FLAGS.movielens_section == "auto"
             else FLAGS.movielens_section)
  if section and FLAGS.dataset != "synthetic":
    write_movielens_section(section, rows, keys, cmd, data.num_items)
  text = f"""# SEMINAR ({FLAGS.dataset}), leave-one-out

Protocol: per user, events in time order; the last event's item is the test target, the one before
the validation target. HR / NDCG / MRR: the target ranked against every item of the catalogue (each
scored as the model's target), the user's history excluded, ties pessimistic. "sampled": against 99 random
items the user never interacted with (the SEMINAR paper's protocol; biased upwards). Test metrics
of the best-by-validation (sampled NDCG@10) checkpoint; mean ± std (sample std) over seeds {seeds}.
Config: {conf}{':' + base_args if base_args else ''} (its docstring has the world / data sizes).

{table}

Produced by:

```bash
{cmd}
```

Machine: {report.machine_description()}. Mean seconds per run (pretraining + finetuning + final
evaluation): {secs}.
"""
  report.write_markdown(out, text)


if __name__ == "__main__":
  app.run(main)
