r"""What the gated heads of MV-HAN's `gate` setting (model.sasrec_gate) contribute to a trained model.

`gate` starts as SASRec: user vector = the causal state + g_u * the FEL/MLP head, item vector = its
id row + g_i * its type head, with the scalar gates g_u, g_i learned from 0. For the best-by-validation
and the latest checkpoint of a workdir this prints the two gates, how far the vectors have moved from
the SASRec part alone (mean cosine between each vector and the same model's vector with both gates
set to 0), and the validation and test metrics as trained and with the gates set to 0 (the trained
model with its content and profile heads switched off, nothing retrained).

  python experiments/gate_probe.py --config=experiments/configs/mvhan_ml100k.py:sasrec_paths,gate \
      --workdir=runs/ml100k_table/experiments_configs_mvhan_ml100k.py_sasrec_paths,gate/seed0
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging
import numpy as np

from mvhan_jax import configs
from mvhan_jax import host_memory
from mvhan_jax.tasks import retrieval as rtask

FLAGS = flags.FLAGS


def _define_flags():
  """Defined when run as a script only, so that tests can import the module beside other probes."""
  flags.DEFINE_string("config", None, "The run's config spec (file:args), as given to mvhan-train.", required=True)
  flags.DEFINE_string("workdir", None, "A finished or running workdir of that config.", required=True)
  flags.DEFINE_list("override", [], "Config overrides the run was given, e.g. seed=1.")
  flags.DEFINE_list("metrics", ["HR@10", "NDCG@10", "HR@50"], "Metrics to print.")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
  """Mean cosine of matching rows, over rows where both are non-zero."""
  na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
  live = (na > 0) & (nb > 0)
  return float(np.mean(np.sum(a[live] * b[live], -1) / (na[live] * nb[live])))


def gates_closed(params):
  """A copy of ``params`` with both gates set to 0 (the trained SASRec part alone); ``params`` unchanged."""
  inner = params["params"]
  if "user_gate" not in inner or "item_gate" not in inner:
    raise ValueError("the parameters have no user_gate / item_gate: not a model with model.sasrec_gate")
  return {**params, "params": {**inner, "user_gate": np.zeros_like(inner["user_gate"]),
                               "item_gate": np.zeros_like(inner["item_gate"])}}


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array: each step reuses its host memory
  logging.set_verbosity(logging.WARNING)
  cfg = configs.apply_overrides(configs.load_config(FLAGS.config), FLAGS.override)
  if not cfg.model.get("sasrec_gate", False):
    raise app.UsageError(f"--config={FLAGS.config} has no model.sasrec_gate: give a config with 'gate'")
  exp = rtask.build_experiment(cfg)
  header = ["checkpoint", "step", "g_u", "g_i", "cos users (valid)", "cos items"]
  for split in ("valid", "test"):
    header += [f"{split} {m}" for m in FLAGS.metrics] + [f"{split} {m}, gates 0" for m in FLAGS.metrics]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for which in ("best", "latest"):
    params, step = rtask.restore_params(FLAGS.workdir, exp, which)
    closed = gates_closed(params)
    g_u, g_i = float(params["params"]["user_gate"]), float(params["params"]["item_gate"])
    users, _ = rtask.encode_users(exp, params, exp.eval_sets["valid"])
    users0, _ = rtask.encode_users(exp, closed, exp.eval_sets["valid"])
    items, items0 = rtask.encode_items(exp, params), rtask.encode_items(exp, closed)
    row = [which, str(step), f"{g_u:.3f}", f"{g_i:.3f}", f"{_cosine(users, users0):.3f}", f"{_cosine(items, items0):.3f}"]
    for split in ("valid", "test"):
      trained, off = rtask.evaluate(exp, params, split), rtask.evaluate(exp, closed, split)
      row += [f"{trained[m]:.4f}" for m in FLAGS.metrics] + [f"{off[m]:.4f}" for m in FLAGS.metrics]
    print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
