r"""SEMINAR ablations: experiments/results/seminar_synthetic.md (or seminar_ml100k.md with --dataset=ml100k).

  python experiments/seminar_table.py --seeds=0,1,2
  python experiments/seminar_table.py --dataset=ml100k --seeds=0,1,2 --rows=psu,nopretrain
  python experiments/seminar_table.py --seeds=0 --rows=psu --extra=train.num_epochs=1

Rows (config arguments of experiments/configs/seminar_<dataset>.py): no pretraining; PSU
pretraining (all three objectives); PSU without each objective in turn; exact vs PQ GSU top-K at
finetuning x at inference. Each run's workdir is under --workdir_root (finished runs are only
re-evaluated, interrupted ones resume). Test metrics of the best-by-validation (sampled NDCG@10)
checkpoint; "full" = ranked against every item with the history excluded, "sampled" = against 99
random unseen items (the paper's protocol, biased upwards).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mvhan_jax import report  # noqa: E402
from mvhan_jax.configs import load_config  # noqa: E402
from mvhan_jax.seminar import data as sdata  # noqa: E402
from mvhan_jax.seminar import train as strain  # noqa: E402

flags.DEFINE_enum("dataset", "synthetic", ["synthetic", "ml100k"], "Which world.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per row.")
flags.DEFINE_list("rows", [], "Row keys to run (default: all); see ROWS.")
flags.DEFINE_list("extra", [], "Config overrides field=value applied to every run, e.g. train.num_epochs=1.")
flags.DEFINE_string("out", "", "Markdown file (default experiments/results/seminar_<dataset>.md).")
flags.DEFINE_string("workdir_root", "runs/seminar_table", "Where each run's workdir goes.")
FLAGS = flags.FLAGS

# key -> (row name, config arguments)
ROWS = {
    "nopretrain": ("SEMINAR, no pretraining", "nopretrain"),
    "psu": ("SEMINAR, PSU pretraining (next + align + relevance)", ""),
    "no_next": ("PSU without next-pair prediction", "no_next"),
    "no_align": ("PSU without multi-modal alignment", "no_align"),
    "no_rel": ("PSU without query-item relevance", "no_rel"),
    "exact_pq": ("PSU, exact top-K at finetuning, PQ at inference", "eval_attention=pq"),
    "pq_pq": ("PSU, PQ top-K at finetuning and inference", "attention=pq"),
    "pq_exact": ("PSU, PQ top-K at finetuning, exact at inference", "attention=pq,eval_attention=exact"),
}
METRICS = ("full/HR@10", "full/NDCG@10", "sampled/HR@10", "sampled/NDCG@10", "sampled/MRR")
HEADERS = ("HR@10 (full)", "NDCG@10 (full)", "HR@10 (sampled, 99 neg.)", "NDCG@10 (sampled, 99 neg.)",
           "MRR (sampled, 99 neg.)")


def _override(cfg, item: str):
  field, _, value = item.partition("=")
  *path, name = field.split(".")
  node = cfg
  for p in path:
    node = node[p]
  old = node[name]
  node[name] = type(old)(value) if old is not None and not isinstance(old, bool) else (value == "True" if isinstance(old, bool) else value)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  conf = f"experiments/configs/seminar_{FLAGS.dataset if FLAGS.dataset == 'synthetic' else 'ml100k'}.py"
  keys = FLAGS.rows or list(ROWS)
  unknown = set(keys) - set(ROWS)
  if unknown:
    raise ValueError(f"--rows: unknown {sorted(unknown)}; known {list(ROWS)}")
  rows, timing, data = {}, {}, None
  for key in keys:
    name, args = ROWS[key]
    rows[name] = []
    for seed in map(int, FLAGS.seeds):
      cfg = load_config(f"{conf}:{args}" if args else conf)
      cfg.seed = seed
      for item in FLAGS.extra:
        _override(cfg, item)
      data = data or sdata.load_data(cfg)  # the world depends on dataset.* only, never on the row
      workdir = os.path.join(FLAGS.workdir_root, FLAGS.dataset, key, f"seed{seed}")
      res = strain.train_and_evaluate(cfg, workdir, data)
      rows[name].append({h: res["test"][m] for m, h in zip(METRICS, HEADERS)})
      timing.setdefault(name, []).append(res["seconds"]["total"])
      print(f"{name} seed {seed}: {rows[name][-1]} ({res['seconds']['total']:.0f} s)", flush=True)
  table = report.mean_std_table(rows, HEADERS)
  seeds = ",".join(FLAGS.seeds)
  out = FLAGS.out or f"experiments/results/seminar_{FLAGS.dataset}.md"
  cmd = f"python experiments/seminar_table.py --dataset={FLAGS.dataset} --seeds={seeds}" + (
      f" --rows={','.join(keys)}" if FLAGS.rows else "") + (f" --extra={','.join(FLAGS.extra)}" if FLAGS.extra else "")
  secs = ", ".join(f"{n}: {sum(t) / len(t):.0f} s" for n, t in timing.items())
  text = f"""# SEMINAR ({FLAGS.dataset}), leave-one-out

Protocol: per user, events in time order; the last event's item is the test target, the one before
the validation target. "full": the target ranked against every item of the catalogue (each scored
as the model's target), the user's history excluded, ties pessimistic. "sampled": against 99 random
items the user never interacted with (the SEMINAR paper's protocol; biased upwards). Test metrics
of the best-by-validation (sampled NDCG@10) checkpoint; mean ± std (sample std) over seeds {seeds}.
Config: {conf} (its docstring has the world / data sizes).

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
