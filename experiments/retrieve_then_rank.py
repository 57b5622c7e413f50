r"""Produces experiments/results/retrieve_then_rank.md: retrieval alone vs retrieval + HiNet re-ranking.

  python experiments/retrieve_then_rank.py

Stage 1: the retrieval model of --retrieval_workdir (trained with --retrieval_config first when the
workdir has no results.json) returns each MovieLens-100k leave-one-out test user's exact top-100
unseen items. Stage 2: HiNet re-orders them by pCTR or pCTCVR. Two rankers: the table's HiNet
(--ranking_config, trained into --ranking_workdir when missing; by default the seed-0 HiNet workdir of
experiments/hinet_table.py: popularity-sampled negatives), and the same HiNet trained with the
retrieval model's own candidates as negatives (--hard_ranking_config / --hard_ranking_workdir; the
distribution the re-ranker meets at serving time). HR@10 / NDCG@10 of the test item; a test item
outside the top-100 is a miss for every row.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging

from mvhan_jax import host_memory
from mvhan_jax import tasks
from mvhan_jax import report

from mvhan_jax.configs import load_config
from mvhan_jax.ranking import rerank
from mvhan_jax.tasks import ranking as ranking_train
from mvhan_jax import train as train_loop

flags.DEFINE_string("retrieval_config", "experiments/configs/two_tower_ml100k.py:recency", "Retrieval config.")
flags.DEFINE_string("retrieval_workdir", "runs/rtr_retrieval", "Trained retrieval workdir (trained if missing).")
flags.DEFINE_string("ranking_config", "experiments/configs/hinet_ml100k.py:model=hinet", "Ranking config.")
flags.DEFINE_string("ranking_workdir", "runs/hinet_table/ml100k/model-hinet/seed0",
                    "Trained ranking workdir (trained if missing).")
flags.DEFINE_string("hard_ranking_config", "experiments/configs/hinet_ml100k.py:model=hinet,negatives=retrieval",
                    "Ranking config trained on the retrieval model's candidates ('' to skip).")
flags.DEFINE_string("hard_ranking_workdir", "runs/rtr_hinet_retrieval_negatives",
                    "Its workdir (trained if missing).")
flags.DEFINE_integer("candidates", 100, "Retrieved candidates per user.")
flags.DEFINE_string("out", "experiments/results/retrieve_then_rank.md", "Markdown file to write.")
FLAGS = flags.FLAGS


def _ranker(config_arg: str, workdir: str):
  cfg = load_config(config_arg)
  if cfg.dataset.get("negatives") == "retrieval":
    cfg.dataset.retrieval_config = FLAGS.retrieval_config
    cfg.dataset.retrieval_workdir = FLAGS.retrieval_workdir
    cfg.dataset.pool_size = FLAGS.candidates
  if not os.path.exists(os.path.join(workdir, "results.json")):
    tasks.train_and_evaluate(cfg, workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    return cfg, json.load(f)


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array: each step reuses its host memory
  logging.set_verbosity(logging.WARNING)
  rcfg = load_config(FLAGS.retrieval_config)
  rcfg.progress = False
  if not os.path.exists(os.path.join(FLAGS.retrieval_workdir, "results.json")):
    tasks.train_and_evaluate(rcfg, FLAGS.retrieval_workdir)
  with open(os.path.join(FLAGS.retrieval_workdir, "results.json")) as f:
    retrieval_results = json.load(f)
  rankers, own = {}, {}
  for label, config_arg, workdir in (
      ("Retrieval + HiNet", FLAGS.ranking_config, FLAGS.ranking_workdir),
      ("Retrieval + HiNet trained on retrieval candidates", FLAGS.hard_ranking_config, FLAGS.hard_ranking_workdir)):
    if config_arg:
      cfg, results = _ranker(config_arg, workdir)
      rankers[label] = (cfg, workdir)
      own[label] = (config_arg, workdir, results["test"])
  rows = rerank.retrieve_then_rank(rcfg, FLAGS.retrieval_workdir, rankers, FLAGS.candidates)
  metrics = ["HR@10", "NDCG@10", f"Recall@{FLAGS.candidates}", "candidate AUC"] + \
            [k for k in next(iter(rows.values())) if k.startswith("HR@10 ")]
  table = report.mean_std_table({name: [m] for name, m in rows.items()}, metrics)
  rtest = retrieval_results.get("test", {})
  own_lines = "\n".join(
      f"| {label} | `{arg}` | {workdir} | {t['ctr/AUC/all']:.4f} | {t['ctr/GAUC/all']:.4f} | {t['ctcvr/AUC/all']:.4f} |"
      for label, (arg, workdir, t) in own.items())
  hard = f" --hard_ranking_workdir={FLAGS.hard_ranking_workdir}" if FLAGS.hard_ranking_config else " --hard_ranking_config=''"
  text = f"""# Retrieve then rank on MovieLens-100k (leave-one-out test users)

Stage 1: {FLAGS.retrieval_config} (workdir {FLAGS.retrieval_workdir}, best-by-validation
checkpoint; its own full-ranking test HR@10 {rtest.get('HR@10', float('nan')):.4f}) retrieves each
test user's exact top-{FLAGS.candidates} unseen items. Stage 2: HiNet re-orders them by pCTR or by
pCTCVR = pCTR * pCVR (rating >= 4). All 943 test users; the test item is every user's last
interaction, never seen in training by any model. "candidate AUC": mean over the users whose test
item is among the candidates of the AUC of the test item against the other {FLAGS.candidates - 1}
candidates (retrieval only: its rank by the retrieval score). "HR@10 <scenario>": the
occupation-group scenarios of mvhan_jax/ranking/data.py. Single run (seed 0 of each model).

{table}

The rankers, and their own test metrics (each held-out item against 50 negatives drawn as the
ranker's training negatives: by popularity, or from the retrieval candidates):

| ranker | config | workdir | CTR AUC | CTR GAUC | CTCVR AUC |
|---|---|---|---|---|---|
{own_lines}

Produced by:

```bash
python experiments/retrieve_then_rank.py --retrieval_workdir={FLAGS.retrieval_workdir} --ranking_workdir={FLAGS.ranking_workdir}{hard}
```

Machine: {report.machine_description()}.
"""
  # Sections other scripts own (experiments/rerank_listwise.py's listwise re-ranker rows) are kept.
  report.write_markdown(FLAGS.out, text + report.kept_sections(FLAGS.out))


if __name__ == "__main__":
  app.run(main)
