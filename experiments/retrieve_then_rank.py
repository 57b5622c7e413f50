r"""Produces experiments/results/retrieve_then_rank.md: retrieval alone vs retrieval + HiNet re-ranking.

  python experiments/retrieve_then_rank.py --retrieval_workdir=runs/rtr_retrieval

Stage 1: the retrieval model of --retrieval_workdir (trained with --retrieval_config first when the
workdir has no results.json) returns each MovieLens-100k leave-one-out test user's exact top-100
unseen items. Stage 2: HiNet (--ranking_config, trained into --ranking_workdir when missing; by
default the seed-0 HiNet workdir of experiments/hinet_table.py) re-orders them by pCTR or pCTCVR.
HR@10 / NDCG@10 of the test item; a test item outside the top-100 is a miss for every row.
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
from mvhan_jax import train as retrieval_train  # noqa: E402
from mvhan_jax.configs import load_config  # noqa: E402
from mvhan_jax.ranking import rerank  # noqa: E402
from mvhan_jax.ranking import train as ranking_train  # noqa: E402

flags.DEFINE_string("retrieval_config", "experiments/configs/two_tower_ml100k.py:recency", "Retrieval config.")
flags.DEFINE_string("retrieval_workdir", "runs/rtr_retrieval", "Trained retrieval workdir (trained if missing).")
flags.DEFINE_string("ranking_config", "experiments/configs/hinet_ml100k.py:model=hinet", "Ranking config.")
flags.DEFINE_string("ranking_workdir", "runs/hinet_table/ml100k/model-hinet/seed0",
                    "Trained ranking workdir (trained if missing).")
flags.DEFINE_integer("candidates", 100, "Retrieved candidates per user.")
flags.DEFINE_string("out", "experiments/results/retrieve_then_rank.md", "Markdown file to write.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rcfg = load_config(FLAGS.retrieval_config)
  rcfg.progress = False
  if not os.path.exists(os.path.join(FLAGS.retrieval_workdir, "results.json")):
    retrieval_train.train_and_evaluate(rcfg, FLAGS.retrieval_workdir)
  kcfg = load_config(FLAGS.ranking_config)
  if not os.path.exists(os.path.join(FLAGS.ranking_workdir, "results.json")):
    ranking_train.train_and_evaluate(kcfg, FLAGS.ranking_workdir)
  rows = rerank.retrieve_then_rank(rcfg, FLAGS.retrieval_workdir, kcfg, FLAGS.ranking_workdir, FLAGS.candidates)
  metrics = ["HR@10", "NDCG@10", f"Recall@{FLAGS.candidates}"] + [k for k in next(iter(rows.values())) if k.startswith("HR@10 ")]
  table = report.mean_std_table({name: [m] for name, m in rows.items()}, metrics)
  text = f"""# Retrieve then rank on MovieLens-100k (leave-one-out test users)

Stage 1: {FLAGS.retrieval_config} (workdir {FLAGS.retrieval_workdir}, best-by-validation
checkpoint) retrieves each test user's exact top-{FLAGS.candidates} unseen items. Stage 2: HiNet
({FLAGS.ranking_config}, workdir {FLAGS.ranking_workdir}) re-orders them by pCTR or by
pCTCVR = pCTR * pCVR (rating >= 4). All 943 test users; the test item is every user's last
interaction, never seen in training by either model. "HR@10 <scenario>": the occupation-group
scenarios of mvhan_jax/ranking/data.py. Single run (seed 0 of each model).

{table}

Produced by:

```bash
python experiments/retrieve_then_rank.py --retrieval_workdir={FLAGS.retrieval_workdir} --ranking_workdir={FLAGS.ranking_workdir}
```

Machine: {report.machine_description()}.
"""
  report.write_markdown(FLAGS.out, text)


if __name__ == "__main__":
  app.run(main)
