r"""Produces experiments/results/hinet_ml100k.md and hinet_synthetic.md: multi-scenario multi-task ranking.

  python experiments/hinet_table.py --datasets=synthetic,ml100k --seeds=0,1,2

For each dataset, every model (HiNet, shared-bottom, MMoE, PLE, STAR) and every HiNet ablation (no
SAN, no scenario-specific experts, CGC replaced by a shared tower) is trained once per seed
(workdirs under --workdir_root; a finished workdir is only re-evaluated) and the test AUC / GAUC of
the best-by-validation checkpoint are reported per scenario and task, mean ± std over seeds.
``--override=num_epochs=3,dataset.num_negatives=2`` overrides config fields of every run.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from mvhan_jax import host_memory
from mvhan_jax import tasks
from mvhan_jax import configs
from mvhan_jax import report
from mvhan_jax.ranking import data as ranking_data
from mvhan_jax.tasks import ranking as ranking_train
from mvhan_jax import train as train_loop
from mvhan_jax.ranking import candidates

flags.DEFINE_list("datasets", ["synthetic", "ml100k"], "Which tables: ml100k, synthetic.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per model.")
flags.DEFINE_list("override", [], "Config field overrides of every run, e.g. num_epochs=3,dataset.num_negatives=2.")
flags.DEFINE_list("rows", [], "Only these model / ablation rows (names as in the tables); default all.")
flags.DEFINE_string("workdir_root", "runs/hinet_table", "Where each run's workdir goes.")
flags.DEFINE_string("out_dir", "experiments/results", "Where the markdown files go.")
FLAGS = flags.FLAGS

CONFIGS = {"ml100k": "experiments/configs/hinet_ml100k.py", "synthetic": "experiments/configs/hinet_synthetic.py"}
MODELS = {"HiNet": "model=hinet", "Shared-bottom": "model=shared_bottom", "MMoE": "model=mmoe",
          "PLE": "model=ple", "STAR": "model=star"}
ABLATIONS = {"HiNet": "model=hinet", "HiNet w/o SAN": "model=hinet,no_san",
             "HiNet w/o scenario-specific experts": "model=hinet,no_specific",
             "HiNet, CGC -> shared tower": "model=hinet,shared_tower"}
TASKS = (("ctr", "CTR"), ("ctcvr", "CTCVR"))
# Ground-truth scorers of the synthetic world (`RankingData.oracles`), as table rows.
ORACLES = {"true": "Oracle (true probabilities)", "rich_scenario": "Oracle, {rich}'s functions everywhere"}


def _config(dataset: str, args: str, seed: int):
  cfg = configs.apply_overrides(configs.load_config(f"{CONFIGS[dataset]}:{args}"), FLAGS.override)
  cfg.seed = seed
  return cfg


def _row_metrics(test: dict, scenarios, sparse) -> dict[str, float]:
  """Flattened test metrics named '<task> <scenario> <AUC|GAUC>' plus the sparse-scenario means."""
  out = {}
  for task, label in TASKS:
    for metric in ("AUC", "GAUC"):
      for sc in ("all",) + tuple(scenarios):
        out[f"{label} {sc} {metric}"] = test[f"{task}/{metric}/{sc}"]
      out[f"{label} sparse-mean {metric}"] = float(np.mean([test[f"{task}/{metric}/{sc}"] for sc in sparse]))
  return out


def _run_rows(dataset: str, rows: dict[str, str], data, cache: dict) -> dict[str, list[dict]]:
  out = {}
  for name, args in rows.items():
    if FLAGS.rows and name not in FLAGS.rows:
      continue
    out[name] = []
    for seed in map(int, FLAGS.seeds):
      key = (args, seed)
      if key not in cache:
        cfg = _config(dataset, args, seed)
        workdir = os.path.join(FLAGS.workdir_root, dataset, args.replace(",", "_").replace("=", "-"), f"seed{seed}")
        cache[key] = tasks.train_and_evaluate(cfg, workdir, data=data)
        print(f"{dataset} {name} seed {seed}: CTR AUC {cache[key]['test']['ctr/AUC/all']:.4f}", flush=True)
      out[name].append(cache[key])
  return out


def _verdict(rows: dict[str, list[dict]], scenarios, sparse) -> str:
  """Which model has the best mean test AUC on each sparse (scenario, task)."""
  lines, wins, total = [], 0, 0
  if "HiNet" not in rows or len(rows) < 2:
    return "Not computed: the table lacks HiNet or every baseline."
  for task, label in TASKS:
    for sc in sparse:
      means = {m: float(np.mean([r["test"][f"{task}/AUC/{sc}"] for r in runs])) for m, runs in rows.items()}
      best = max(means, key=means.get)
      best_base = max((m for m in means if m != "HiNet"), key=means.get)
      gap = means["HiNet"] - means[best_base]
      total += 1
      wins += best == "HiNet"
      lines.append(f"- {label} AUC, {sc}: best {best} ({means[best]:.4f}); HiNet - best baseline "
                   f"({best_base}) = {gap:+.4f}")
  head = (f"HiNet has the best mean test AUC on {wins} of the {total} sparse (scenario, task) cells.")
  return head + "\n" + "\n".join(lines)


def write_dataset(dataset: str) -> None:
  cfg0 = _config(dataset, "model=hinet", 0)
  data = ranking_data.load_ranking_data(cfg0, candidates.negative_pool(cfg0))
  scenarios = data.scenario_names
  sparse = scenarios[1:]
  cache: dict = {}
  models = _run_rows(dataset, MODELS, data, cache)
  ablations = _run_rows(dataset, ABLATIONS, data, cache)
  flat = {m: [_row_metrics(r["test"], scenarios, sparse) for r in runs] for m, runs in models.items()}
  flat_ab = {m: [_row_metrics(r["test"], scenarios, sparse) for r in runs] for m, runs in ablations.items()}
  oracle_rows = {label.format(rich=scenarios[0]): [_row_metrics(ranking_train.evaluate_predictions(
      data.splits["test"], data.oracles[key]["test"], scenarios), scenarios, sparse)]
                 for key, label in ORACLES.items() if key in data.oracles}
  flat = {**oracle_rows, **flat}
  flat_ab = {**oracle_rows, **flat_ab}
  summary = data.summary()
  counts = "\n".join(f"| {split} | " + " | ".join(
      f"{summary[split]['impressions'][s]:,} / {summary[split]['clicks'][s]:,} / {summary[split]['ctcvr'][s]:,}"
      for s in range(len(scenarios))) + " |" for split in ("train", "valid", "test"))
  sections = []
  for _, label in TASKS:
    for metric in ("AUC", "GAUC"):
      cols = [f"{label} {sc} {metric}" for sc in ("all",) + tuple(scenarios)] + [f"{label} sparse-mean {metric}"]
      sections.append(f"### {label} {metric} (test)\n\n" + report.mean_std_table(flat, cols))
  training = "\n".join(
      f"| {m} | {np.mean([r['best_step'] for r in runs]):.0f} | {runs[0]['final_step']} | "
      f"{', '.join(str(r['best_step']) for r in runs)} |" for m, runs in {**models, **ablations}.items())
  ab_cols = [f"{label} {sc} AUC" for _, label in TASKS for sc in ("all", "sparse-mean")] + \
            [f"{label} sparse-mean GAUC" for _, label in TASKS]
  seeds = ",".join(FLAGS.seeds)
  override = f" --override={','.join(FLAGS.override)}" if FLAGS.override else ""
  override += f" --rows='{','.join(FLAGS.rows)}'" if FLAGS.rows else ""
  oracle_note = "" if not oracle_rows else f"""
The oracle rows are not models: they score the test impressions with the world's true
probabilities (the ceiling: clicks and conversions are Bernoulli draws, so even the truth is far from
AUC 1), and with the data-rich scenario '{scenarios[0]}''s functions for every scenario (the best a
model that ignores the scenario can do; its gap to the truth on the sparse scenarios is what
scenario-aware modelling can win).
"""
  title = {"ml100k": "MovieLens-100k (4 occupation-group scenarios)",
           "synthetic": "synthetic world (3 scenarios)"}[dataset]
  text = f"""# HiNet and baselines: multi-scenario multi-task ranking on the {title}

Test AUC and GAUC (per-user AUC weighted by the user's impressions, users with both classes) of
the best-by-validation checkpoint (validation mean of the CTR and CTCVR AUCs), per scenario and
task, mean ± std (sample std) over seeds {seeds}. CTR: click (MovieLens: interaction vs sampled
non-interaction); CTCVR: click AND conversion (MovieLens: rating >= 4), scored by
pCTR * pCVR over every impression (ESMM). Scenario '{scenarios[0]}' is the data-rich one;
"sparse-mean" averages the others ({", ".join(sparse)}). Data, split and ground truth:
mvhan_jax/ranking/data.py; configs: {CONFIGS[dataset]}.
{oracle_note}
Impressions / clicks / CTCVR positives per scenario ({", ".join(scenarios)}):

| split | {" | ".join(scenarios)} |
|---{"|---" * len(scenarios)}|
{counts}

{chr(10).join(s + chr(10) for s in sections)}
### Ablation (test)

{report.mean_std_table(flat_ab, ab_cols)}

### Training length

Step of the best validation checkpoint (evaluated every epoch) out of the run's steps; a best step
equal to the last one in most seeds would mean more epochs could still help.

| model | mean best step | steps | best step per seed |
|---|---|---|---|
{training}

### Does HiNet win on the sparse scenarios?

{_verdict(models, scenarios, sparse)}

Produced by:

```bash
python experiments/hinet_table.py --datasets={dataset} --seeds={seeds}{override}
```

Machine: {report.machine_description()}.
"""
  report.write_markdown(os.path.join(FLAGS.out_dir, f"hinet_{dataset}.md"), text)


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array: each step reuses its host memory
  logging.set_verbosity(logging.WARNING)
  for dataset in FLAGS.datasets:
    if dataset not in CONFIGS:
      raise ValueError(f"--datasets: {dataset!r} is unknown, use {sorted(CONFIGS)}")
    write_dataset(dataset)


if __name__ == "__main__":
  app.run(main)
