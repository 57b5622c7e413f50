r"""What a trained retrieval model does with the order of the last few history items.

Evaluates a trained workdir's best checkpoint on the test queries with the histories perturbed (the
targets and the excluded items unchanged), so the drop from the 'as trained' row says how much of the
model's accuracy each part of the history carries:

  as trained        the real histories
  drop last item    the most recent item removed (the model sees the history one step earlier)
  last item only    nothing but the most recent item
  swap last two     the two most recent items exchanged
  shuffle last K    the K most recent items in a random order (K = --recent)
  shuffle older     everything before the K most recent items shuffled (the recent K kept in place)

A model that reads order as a Markov chain does loses most under 'drop last item' and 'swap last two';
a bag-of-items model loses nothing under the shuffles. The Markov chain baseline's own rows are given
for reference (it reads the last two items only).

  python experiments/order_probe.py --config=experiments/configs/mvhan_ml100k.py --workdir=runs/mvhan_ml100k
  python experiments/order_probe.py --config=experiments/configs/two_tower_ml100k.py --ties   # no workdir

--ties measures the protocol instead: how many test targets share their second with the validation
item (the protocol orders equal timestamps by item id), how many training transitions are such
same-second pairs, and the Markov chain and popularity with equal timestamps ordered at random.
"""

from __future__ import annotations

import dataclasses

from absl import app
from absl import flags
import numpy as np

from mvhan_jax import baselines
from mvhan_jax import evaluation
from mvhan_jax.data import protocol
from mvhan_jax import configs
from mvhan_jax import host_memory
from mvhan_jax.ranking import candidates as retrieval_candidates
from mvhan_jax.tasks import retrieval as rtask

flags.DEFINE_string("config", None, "The workdir's config (path[:args]).", required=True)
flags.DEFINE_string("workdir", None, "A trained retrieval workdir (not needed with --ties).")
flags.DEFINE_bool("ties", False, "Measure the same-second ties of the config's dataset instead.")
flags.DEFINE_list("override", [], "Config field overrides the workdir was trained with, e.g. loss.kind=full_softmax.")
flags.DEFINE_integer("recent", 5, "K for 'shuffle last K' / 'shuffle older'.")
flags.DEFINE_integer("seed", 0, "Shuffle seed.")
FLAGS = flags.FLAGS


def perturbations(history: np.ndarray, history_len: np.ndarray, k: int, seed: int) -> dict[str, tuple]:
  """name -> (history, history_len), left-aligned histories with the most recent at len-1."""
  rng = np.random.default_rng(seed)
  out = {"as trained": (history, history_len)}
  out["drop last item"] = (history, np.maximum(history_len - 1, 1))
  last_only = np.zeros_like(history)
  last_only[:, 0] = history[np.arange(len(history)), history_len - 1]
  out["last item only"] = (last_only, np.ones_like(history_len))
  swap, shuf_recent, shuf_old = history.copy(), history.copy(), history.copy()
  for q, n in enumerate(history_len):
    if n >= 2:
      swap[q, [n - 2, n - 1]] = swap[q, [n - 1, n - 2]]
    lo = max(n - k, 0)
    shuf_recent[q, lo:n] = rng.permutation(shuf_recent[q, lo:n])
    shuf_old[q, :lo] = rng.permutation(shuf_old[q, :lo])
  out["swap last two"] = (swap, history_len)
  out[f"shuffle last {k}"] = (shuf_recent, history_len)
  out[f"shuffle older (last {k} kept)"] = (shuf_old, history_len)
  return out


def tie_report(data, seed: int) -> None:
  """Same-second ties of a dataset and what ordering them at random does to the count baselines."""
  order = np.lexsort((data.item, data.timestamp, data.user))
  bounds = np.flatnonzero(np.diff(data.user[order])) + 1
  times = [t for t in np.split(data.timestamp[order], bounds) if len(t) >= 3]
  same_test = np.mean([t[-1] == t[-2] for t in times])
  same_pairs = np.concatenate([t[1:] == t[:-1] for t in times]).mean()
  print(f"test target in the validation item's second: {same_test:.3f} of users; "
        f"same-second pairs among consecutive events: {same_pairs:.3f}")
  jitter = np.random.default_rng(seed).integers(0, 1 << 20, len(data.item))
  shuffled = dataclasses.replace(data, timestamp=data.timestamp.astype(np.int64) * (1 << 20) + jitter)
  print("| equal timestamps ordered by | Markov chain HR@10 | NDCG@10 | popularity HR@10 |")
  print("|---|---|---|---|")
  for name, d in (("item id (the protocol)", data), ("a random draw", shuffled)):
    split = protocol.leave_one_out(d)
    test = split.eval_set("test", 50)
    markov = baselines.evaluate_markov_chain(split, test)
    pop = baselines.evaluate_popularity(split, test)
    print(f"| {name} | {markov['HR@10']:.4f} | {markov['NDCG@10']:.4f} | {pop['HR@10']:.4f} |", flush=True)


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array: each step reuses its host memory
  config = configs.apply_overrides(configs.load_config(FLAGS.config), FLAGS.override)
  if FLAGS.ties:
    tie_report(rtask.build_experiment(config).data, FLAGS.seed)
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir: give the trained workdir to probe (or --ties)")
  exp, params, items = retrieval_candidates.load_retrieval(config, FLAGS.workdir)
  test = exp.eval_sets["test"]
  evaluator = evaluation.LeaveOneOutEvaluator(test, split="test")
  print("| history given to the model | HR@10 | NDCG@10 | HR@50 | Markov chain HR@10 |")
  print("|---|---|---|---|---|")
  for name, (hist, hlen) in perturbations(test.history, test.history_len, FLAGS.recent, FLAGS.seed).items():
    q = dataclasses.replace(test, history=hist, history_len=hlen)
    users, mask = rtask.encode_users(exp, params, q)
    m = evaluator.evaluate(users, items, user_mask=mask)
    markov = baselines.evaluate_markov_chain(exp.split, q)
    print(f"| {name} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} | {m['HR@50']:.4f} | {markov['HR@10']:.4f} |",
          flush=True)


if __name__ == "__main__":
  app.run(main)
