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

Errors. Every input is checked before any data is loaded or folder written. A failure the user can
fix (a `mvhan_jax.errors.UserError`: a bad flag, config file, config arg or field, an untrained
workdir, a damaged dataset copy) prints one line ``mvhan-train: <message>`` on stderr, naming the
flag, field or file and the fix, and exits with status 2; ``--verbosity=1`` prints its traceback
too. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mvhan_jax import errors
from mvhan_jax import host_memory  # defines --reuse_host_memory

config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, index and results (local or gs://...).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "index", "recommend", "plots"], "What to run.")
flags.DEFINE_string("data_dir", None, "Dataset cache directory (default: $MVHAN_DATA_DIR or ~/.cache/mvhan_jax).")
flags.DEFINE_string("user", None, "--mode=recommend: the user (MovieLens: the dense index, raw user id - 1; "
                    "an interaction log: the raw id as in the file).")
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
  host_memory.configure()  # before JAX's first array (--noreuse_host_memory: off)
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
  except train.Diverged as e:  # NaN / inf: stopped unsaved; the message says what to change, a traceback would hide it
    print(f"mvhan-train: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


class FlagError(errors.UserError, ValueError):
  """A command line absl or the config flag refuses: unknown flag, bad value, missing config file."""


def _exception_chain(e: BaseException) -> list[BaseException]:
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _flag_error(e: Exception, argv: list[str]) -> errors.UserError | None:
  """The user error behind a failed flag parse, or None for a bug (a config file that crashes)."""
  chain = _exception_chain(e)
  users = [x for x in chain if isinstance(x, errors.UserError)]
  if users:  # config_flags re-raises a config file's error as a copy holding the traceback: take the original
    return users[-1]
  if isinstance(e, flags.Error):
    if "Error whilst parsing config file" in str(e):  # the config file raised something not a UserError
      return None
    return FlagError(f"{' '.join(str(e).split())} (--helpshort lists the flags)")
  frames = traceback.extract_tb(e.__traceback__)
  if isinstance(e, (AttributeError, KeyError)) and any(f.filename.endswith("config_path.py") for f in frames):
    # --config.a.b=... naming a field the config does not have (ml_collections' own message spans lines).
    key = str(next((x.args[0] for x in reversed(chain) if isinstance(x, KeyError) and x.args), ""))
    given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    flag = next((a for a in given if key in a[len("--config."):].split(".")), "--config.<field>")
    guess = re.search(r'Did you mean "([^"]+)"', str(e))
    hint = f" (did you mean {guess.group(1)!r}?)" if guess else ""
    return FlagError(f"{flag}: the config has no field {key!r}{hint}: fix the name; the config file lists its fields")
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with what the user got wrong raised as a `UserError` (see `run`)."""
  try:
    rest = FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # sorted into user errors and bugs below
    user = _flag_error(e, argv)
    if user is None:
      raise
    raise user from None
  config = FLAGS["config"].value
  if type(config).__name__ == "_ErrorConfig":  # config_flags defers a missing file's error to first use
    path = config_flags.get_config_filename(FLAGS["config"])
    if not os.path.exists(path):
      raise FlagError(f"--config={path}: no such file (a relative path starts at the working directory {os.getcwd()})")
    config.lock()  # raises the deferred error itself
  return rest


def _verbosity(argv: list[str]) -> int:
  if FLAGS.is_parsed():
    return FLAGS.verbosity
  for i, a in enumerate(argv):  # the parse failed: read --verbosity / -v from the command line
    m = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", a)
    if m:
      value = m.group(1) or (argv[i + 1] if i + 1 < len(argv) else "")
      return int(value) if re.fullmatch(r"-?\d+", value) else 0
  return 0


def run(argv: list[str] | None = None):
  """The `mvhan-train` entry point: a `UserError` is one line on stderr and exit status 2 (its
  traceback too with --verbosity >= 1); any other exception keeps its traceback."""
  argv = list(sys.argv if argv is None else argv)
  logging.set_verbosity(logging.WARNING)
  try:
    app.run(main, argv=argv, flags_parser=_parse_flags)
  except errors.UserError as e:
    if _verbosity(argv) >= 1:
      traceback.print_exc()
    print(f"mvhan-train: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  run()
