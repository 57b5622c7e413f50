r"""Produces experiments/results/mvhan_<dataset>.md: MV-HAN against its baselines and ablations, in
the paper's shape (HR@50 and AUC for each sparse target type, retrieval restricted to that type).

  python experiments/mvhan_table.py --dataset=synthetic --seeds=0,1,2
  python experiments/mvhan_table.py --dataset=ml100k --seeds=0,1,2

Rows (every model trained once per seed; workdirs under --workdir_root, resumed / re-evaluated if
present):
  * MV-HAN: the paper's training (single-type batches source, target, source, target; negatives of
    the batch's type), shared user tower, shared content embeddings and FEL, a head per type.
  * the three Table 3 ablations: exclusive embeddings per type, one FEL per type, MLP instead of MHSA;
  * MV-DNN: shared user tower, per-type item towers, no attention (same training);
  * Two-tower, single type: one model per target type, trained on that type's examples only; its row
    reports each type from the model trained on it;
  * Two-tower, pooled: one model on all types' examples with negatives from all items.
Per-type metrics: test rows whose held-out item has type t, ranked among the items of type t the user
has not seen (HR@50, AUC = fraction of those candidates scored below the target). "pooled" columns:
all rows ranked among all items (the foundation protocol), where a per-type model does not apply.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from mvhan_jax import host_memory
from mvhan_jax import tasks
from mvhan_jax import configs
from mvhan_jax import report
from mvhan_jax import train
from mvhan_jax.tasks import retrieval as rtask

flags.DEFINE_enum("dataset", "synthetic", ["synthetic", "ml100k"], "Which dataset's table.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per model.")
flags.DEFINE_string("out", "", "Markdown file (default experiments/results/mvhan_<dataset>.md).")
flags.DEFINE_string("workdir_root", "runs/mvhan_table", "Where each run's workdir goes.")
flags.DEFINE_list("config_args", [], "Config args appended to every row's (as after ':' in --config=), e.g. light.")
flags.DEFINE_list("override", [], "Config field overrides of every run, e.g. num_epochs=4,model.dim=32.")
flags.DEFINE_list("rows", [], "Only these rows (by the names in ROWS); default all.")
FLAGS = flags.FLAGS

CONFIGS = {"synthetic": "experiments/configs/mvhan_synthetic.py", "ml100k": "experiments/configs/mvhan_ml100k.py"}
# Row name -> [(config args, the types this run reports: None = all)].
ROWS = {
    "MV-HAN": [("typed", None)],
    "MV-HAN, exclusive embeddings": [("typed,exclusive_embeddings", None)],
    "MV-HAN, one FEL per type": [("typed,fel_per_type", None)],
    "MV-HAN, MLP instead of MHSA": [("typed,mlp", None)],
    "MV-DNN": [("model=mv_dnn,typed", None)],
    "Two-tower, single type": [("model=two_tower,single=2", (2,)), ("model=two_tower,single=3", (3,))],
    "Two-tower, pooled": [("model=two_tower,pooled", None)],
}
POOLED = ("HR@10", "HR@50")


def run(args: str, seed: int) -> dict[str, float]:
  # One loss for every row: the sampled softmax the typed rows need (negatives of the batch's type).
  loss = "" if "softmax=" in args else ",softmax=sampled"
  cfg = configs.apply_overrides(configs.load_config(f"{CONFIGS[FLAGS.dataset]}:{args}{loss}"), FLAGS.override)
  cfg.seed = seed
  cfg.progress = False
  cfg.index.build = False
  workdir = os.path.join(FLAGS.workdir_root, FLAGS.dataset, args.replace(",", "_").replace("=", "-"), f"seed{seed}")
  return tasks.train_and_evaluate(cfg, workdir)["test"], cfg


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array: each step reuses its host memory
  logging.set_verbosity(logging.WARNING)
  rows, timing, names = {}, {}, None
  wanted = FLAGS.rows or list(ROWS)
  for row in wanted:
    for seed in map(int, FLAGS.seeds):
      merged, t0 = {}, time.time()
      for args, types in ROWS[row]:
        args = ",".join(filter(None, [args, *FLAGS.config_args]))
        res, cfg = run(args, seed)
        names = names or rtask.build_experiment(cfg).type_names
        for t, name in enumerate(names, start=1):
          if types is None or t in types:
            for m in ("HR@50", "AUC", "HR@10"):
              merged[f"{name} {m}"] = res[f"{name}/{m}"]
        for m in POOLED:
          merged[f"pooled {m}"] = res[m] if types is None else float("nan")
      for name in names:  # a per-type model reports only its own types: the others are n/a
        for m in ("HR@50", "AUC", "HR@10"):
          merged.setdefault(f"{name} {m}", float("nan"))
      for m in ("HR@50", "AUC"):
        vals = [merged.get(f"{n} {m}", np.nan) for n in names[1:]]
        merged[f"targets {m}"] = float(np.nanmean(vals))
      rows.setdefault(row, []).append(merged)
      timing.setdefault(row, []).append(time.time() - t0)
      print(f"{row} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in merged.items()), flush=True)
  targets = names[1:]
  metrics = [f"{n} {m}" for n in targets for m in ("HR@50", "AUC")] + ["targets HR@50", "targets AUC"]
  metrics += [f"{names[0]} HR@50"] + [f"pooled {m}" for m in POOLED]
  table = report.mean_std_table(rows, metrics)
  seeds = ",".join(FLAGS.seeds)
  flags_used = f" --dataset={FLAGS.dataset} --seeds={seeds}"
  flags_used += f" --config_args={','.join(FLAGS.config_args)}" if FLAGS.config_args else ""
  flags_used += f" --override={','.join(FLAGS.override)}" if FLAGS.override else ""
  flags_used += f" --rows='{','.join(FLAGS.rows)}'" if FLAGS.rows else ""
  out = FLAGS.out or f"experiments/results/mvhan_{FLAGS.dataset}.md"
  what = ("MovieLens-100k, content types by genre family (source: mainstream; targets: family, niche)"
          if FLAGS.dataset == "ml100k" else
          "Synthetic world, multi-type setting (source: article; targets: novel, short)")
  text = f"""# MV-HAN: {what}

Leave-one-out (the foundation protocol); test metrics of the best-by-validation checkpoint; mean ± std
over seeds {seeds}. `<type> HR@50` / `<type> AUC`: test users whose held-out item has that type, ranked
among the items of that type they have not seen (the paper's per-type retrieval; AUC = fraction of
those candidates scored below the target, ties half). `targets`: mean over the sparse target types.
`pooled`: all test users ranked among all items; n/a for the single-type models. Rows and training
regimes: see the docstring of experiments/mvhan_table.py.

{table}

Produced by:

```bash
python experiments/mvhan_table.py{flags_used} --out={out}
```

Machine: {report.machine_description()}. Wall time per seed of this invocation (a finished run is only
re-evaluated, so a rerun over existing workdirs shows evaluation time, not training time):
{"; ".join(f"{n}: {np.mean(t):.0f} s" for n, t in timing.items())}.
"""
  report.write_markdown(out, text)


if __name__ == "__main__":
  app.run(main)
