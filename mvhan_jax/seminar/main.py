r"""Command line for SEMINAR (PSU pretraining, then finetuning and evaluation).

  python -m mvhan_jax.seminar.main --config=experiments/configs/seminar_synthetic.py --workdir=runs/seminar_syn
  python -m mvhan_jax.seminar.main --config=experiments/configs/seminar_ml100k.py --workdir=runs/seminar_ml

Rerunning with the same workdir resumes (pretraining and finetuning); a finished run only
re-evaluates its best checkpoint.
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "SEMINAR config file (path[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from mvhan_jax.seminar import train  # pylint: disable=import-outside-toplevel
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if results:
    for split in ("valid", "test"):
      print(split, "  ".join(f"{k} {v:.4f}" for k, v in sorted(results[split].items())))
    print("seconds", results["seconds"])


if __name__ == "__main__":
  app.run(main)
