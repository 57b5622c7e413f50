r"""Is run A better than run B, or is the gap test-set noise? A paired per-user comparison.

Seed means hide how noisy a leave-one-out metric is on a small test set: HR@10 near 0.2 over 943
ML-100k users has a binomial standard error of about 0.013. Two models evaluated on the same users
are paired, though: most users are hit (or missed) by both, and only the discordant users carry the
difference. For each pair of workdirs (A's seed s against B's seed s) this evaluates the best
checkpoints on the same split, per user (the evaluator of the run's protocol, history masked), and
prints for each metric the two means, A - B, its bootstrap standard error and 95% interval over
resampled users (`mvhan_jax.evaluation.paired_bootstrap`), a two-sided bootstrap p, and per pair
the difference and the discordant users (A only / B only: for HR@k, users only one run hits).

  python experiments/paired_compare.py \
      --a=runs/ml100k_table/<mv-han>/seed0 --a=runs/ml100k_table/<mv-han>/seed1 \
      --b=runs/ml100k_table/<sasrec>/seed0 --b=runs/ml100k_table/<sasrec>/seed1

Each workdir's config is read from its config.json (`mvhan_jax.report.load_workdir`). What it
measures: the users are resampled, the trained runs are fixed, so the interval is the test-set
sampling noise of these runs' difference, not the spread of retraining (the seed means give that).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

from mvhan_jax import evaluation
from mvhan_jax import host_memory
from mvhan_jax import report
from mvhan_jax.tasks import retrieval as rtask

FLAGS = flags.FLAGS


def _define_flags():
  # Repeated flags, not lists: the table scripts' workdir names hold commas.
  flags.DEFINE_multi_string("a", None, "A workdir of run A (repeat the flag, one per seed).", required=True)
  flags.DEFINE_multi_string("b", None, "A workdir of run B, paired with --a by position (repeat).", required=True)
  flags.DEFINE_string("split", "test", "'valid' or 'test'.")
  flags.DEFINE_list("metrics", ["HR@10", "NDCG@10", "HR@50"], "Per-user metrics to compare.")
  flags.DEFINE_integer("resamples", 10_000, "Bootstrap resamples of the users.")


def per_user(workdir: str, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The best checkpoint's per-user metrics on ``split`` and the split's targets (to check pairing)."""
  _, exp, params, _ = report.load_workdir(workdir)
  users, mask = rtask.encode_users(exp, params, exp.eval_sets[split])
  per = rtask._evaluator(exp, split).per_user(users, rtask.encode_items(exp, params), user_mask=mask)  # pylint: disable=protected-access
  return per, np.asarray(exp.eval_sets[split].targets)


def compare(a_dirs, b_dirs, split: str, metrics, resamples: int) -> str:
  """The markdown table of A against B (see the module docstring)."""
  if len(a_dirs) != len(b_dirs):
    raise ValueError(f"--a has {len(a_dirs)} workdirs and --b {len(b_dirs)}: give one B per A (paired by seed)")
  a_runs, b_runs = [], []
  for wa, wb in zip(a_dirs, b_dirs):
    (pa, ta), (pb, tb) = per_user(wa, split), per_user(wb, split)
    if ta.shape != tb.shape or not np.array_equal(ta, tb):
      raise ValueError(f"{wa} and {wb} were not evaluated on the same {split} users and targets: "
                       "compare runs of the same dataset and protocol")
    missing = [m for m in metrics if m not in pa or m not in pb]
    if missing:
      raise ValueError(f"metrics {missing} are not per-user metrics of this protocol; it has {sorted(pa)}")
    a_runs.append(pa)
    b_runs.append(pb)
  lines = [f"| metric | A | B | A - B | std err | 95% interval | p (two-sided) | per pair A - B | per pair A only / B only |",
           "|---|---|---|---|---|---|---|---|---|"]
  for m in metrics:
    r = evaluation.paired_bootstrap(np.stack([p[m] for p in a_runs]), np.stack([p[m] for p in b_runs]),
                                    resamples=resamples)
    lines.append(f"| {m} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | {r['std_err']:.4f} | "
                 f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {r['p_two_sided']:.3f} | "
                 + ", ".join(f"{x:+.4f}" for x in r["per_pair"]) + " | "
                 + ", ".join(f"{x} / {y}" for x, y in zip(r["a_only"], r["b_only"])) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array
  logging.set_verbosity(logging.WARNING)
  try:
    print(compare(FLAGS.a, FLAGS.b, FLAGS.split, FLAGS.metrics, FLAGS.resamples))
  except (ValueError, FileNotFoundError) as e:  # a workdir without config.json: load_workdir names it
    sys.exit(f"paired_compare.py: {e}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
