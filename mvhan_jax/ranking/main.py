r"""Command line for the ranking trainer.

  python -m mvhan_jax.ranking.main --config=experiments/configs/hinet_ml100k.py --workdir=runs/hinet_ml
  python -m mvhan_jax.ranking.main --config=experiments/configs/hinet_synthetic.py:model=star --workdir=runs/star_syn

Rerunning with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Ranking config file (path[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from mvhan_jax.ranking import train  # pylint: disable=import-outside-toplevel
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if results:
    for split in ("valid", "test"):
      print(split, "  ".join(f"{k} {v:.4f}" for k, v in sorted(results[split].items()) if "/all" in k))


if __name__ == "__main__":
  app.run(main)
