r"""The one command-line entry point, for every model: train, evaluate, index, recommend, plot.

  mvhan-train --config=experiments/configs/two_tower_ml100k.py --workdir=runs/tt
  mvhan-train --config=experiments/configs/hinet_ml100k.py:model=ple --workdir=runs/ple
  mvhan-train --config=experiments/configs/seminar_synthetic.py --workdir=runs/seminar
  mvhan-train --config=...:smoke --config.optimizer.lr=3e-3 --workdir=runs/tt --mode=eval
  mvhan-train --config=... --workdir=runs/tt --mode=recommend --user=42 --top_n=10
  mvhan-train --config=... --workdir=runs/tt --mode=plots --compare=runs/other,runs/third

--mode=train trains (resuming if the workdir has a checkpoint; SIGTERM saves and exits with status
143), evaluates the best-by-validation parameters on the test split and prints the results table;
a retrieval model also gets its ANN index built and saved and three example recommendations, and
with --plots (default) the evaluation figures are written as PNG into <workdir>/plots/ (what each
task can draw: mvhan_jax/report.py). The logic lives in mvhan_jax/modes.py.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, index and results (local or gs://...).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "index", "recommend", "plots"], "What to run.")
flags.DEFINE_string("data_dir", None, "Dataset cache directory (default: $MVHAN_DATA_DIR or ~/.cache/mvhan_jax).")
flags.DEFINE_integer("user", None, "Dense user index for --mode=recommend (MovieLens: raw user id - 1).")
flags.DEFINE_integer("top_n", 10, "Recommendations to print.")
flags.DEFINE_string("type", None, "--mode=recommend: retrieve only items of this content type (e.g. 'family').")
flags.DEFINE_integer("examples", 3, "Example users to print after --mode=train.")
flags.DEFINE_bool("plots", True, "--mode=train: also write the evaluation figures into <workdir>/plots/.")
flags.DEFINE_list("compare", [], "--mode=plots: more workdirs drawn beside --workdir.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs off TPU/SLURM/Kubernetes: host:port of process 0 "
                    "(or $MVHAN_COORDINATOR_ADDRESS); see mvhan_jax/distributed.py.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes (or $MVHAN_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index (or $MVHAN_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])

FLAGS = flags.FLAGS


def main(argv):
  del argv
  from mvhan_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, workdir=FLAGS.workdir)
  from mvhan_jax import modes  # pylint: disable=import-outside-toplevel
  from mvhan_jax import train  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  if FLAGS.data_dir:
    with config.unlocked():
      config.dataset.data_dir = FLAGS.data_dir
  try:
    modes.run(FLAGS.mode, config, FLAGS.workdir, user=FLAGS.user, top_n=FLAGS.top_n, content_type=FLAGS.type,
              examples=FLAGS.examples, plots=FLAGS.plots, compare=FLAGS.compare)
  except train.Preempted as e:
    print(f"mvhan-train: {e}", file=sys.stderr, flush=True)
    sys.exit(143)


def run():
  logging.set_verbosity(logging.WARNING)
  app.run(main)


if __name__ == "__main__":
  run()
