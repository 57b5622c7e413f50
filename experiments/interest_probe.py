r"""Why a multi-interest model does or does not beat its single-vector twin: a probe of trained workdirs.

For each seed's best checkpoint of a multi-interest model (MIND, ComiRec, multi-tower) it measures,
on the test users (mvhan_jax/interest_stats.py):

  live interests         mean K'_u (MIND's dynamic count)
  pairwise cosine        mean cosine between a user's live interests (1 = collapsed onto one vector)
  owners of the top-50   how many distinct interests own at least one item of the merged top-50
  HR@10 (union)          the served readout: max over interests, full ranking, history masked
  newest item's interest the interest that owns the user's newest history item: how often it also
                         owns the target, and HR@10 when it alone is served (needs no target)
  HR@10 (target's own interest)  each user scored with the single interest closest to the target:
                         an optimistic reference (it uses the target to pick), which says whether the
                         interests hold the target at all; its gap to the union is what the K
                         interests lose by sharing the top-10 slots
  bonus                  the union with beta added to the newest item's interest's scores (beta from
                         {0, .02, .05, .1, .2, .5} by validation HR@10): a serving change, no retraining
  by history diversity   HR@10 of both models for users in the terciles of distinct genres in the
                         history window (where several interests should pay most)

  python experiments/interest_probe.py \
      --config=experiments/configs/mind_ml100k.py:model=mind,dataset=ml1m \
      --workdir=runs/ml1m_table/<mind>/seed0 --workdir=runs/ml1m_table/<mind>/seed1 \
      --single_config=experiments/configs/mind_ml100k.py:model=mind,K=1,dataset=ml1m \
      --single_workdir=runs/ml1m_table/<mind1>/seed0 --single_workdir=runs/ml1m_table/<mind1>/seed1

Prints a markdown table (mean ± std over the seeds); --out writes it, with the command, as the block
--section of a results file.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import numpy as np

from mvhan_jax import configs
from mvhan_jax import errors
from mvhan_jax import evaluation
from mvhan_jax import interest_stats
from mvhan_jax import report
from mvhan_jax.ranking import candidates
from mvhan_jax.tasks import retrieval as rtask

flags.DEFINE_string("config", None, "The multi-interest workdirs' config (path[:args]).", required=True)
flags.DEFINE_multi_string("workdir", None, "A trained multi-interest workdir; repeat the flag, one per seed "
                          "(a list flag would split the table scripts' workdir names at their commas).",
                          required=True)
flags.DEFINE_string("single_config", None, "Optional: the single-vector twin's config.")
flags.DEFINE_multi_string("single_workdir", [], "A workdir of the twin; repeat the flag, one per seed.")
flags.DEFINE_string("diversity_field", "genres", "Multi-valued item field whose distinct values in the "
                    "history window measure a user's diversity ('' to skip).")
flags.DEFINE_string("out", "", "Write the table, with the command, into this markdown file as the block "
                    "--section (replaced when present, so table scripts that rewrite the file keep it).")
flags.DEFINE_string("section", "interest_probe", "Name of the block in --out.")
FLAGS = flags.FLAGS


def history_diversity(eval_set, field: np.ndarray) -> np.ndarray:
  """Distinct non-zero values of a multi-valued item field over each history window, int [Q]."""
  out = np.zeros(len(eval_set.history_len), np.int64)
  for q, (h, n) in enumerate(zip(eval_set.history, eval_set.history_len)):
    values = field[h[:n]].reshape(-1)
    out[q] = len(np.unique(values[values > 0]))
  return out


def terciles(x: np.ndarray) -> np.ndarray:
  """0 / 1 / 2: the lower, middle and upper third of x (cut at its 1/3 and 2/3 quantiles)."""
  lo, hi = np.quantile(x, [1 / 3, 2 / 3])
  return np.where(x <= lo, 0, np.where(x <= hi, 1, 2))


BONUSES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)


def _with_bonus(users, mask, items, recent, beta):
  """Scores <u_k, v> + beta [k = recent] as inner products: a bias column on users, ones on items."""
  bias = np.zeros(users.shape[:2] + (1,), users.dtype)
  bias[np.arange(len(recent)), recent, 0] = beta
  return np.concatenate([users, bias], -1), np.concatenate([items, np.ones((len(items), 1), items.dtype)], -1)


def newest_owner(eval_set, users, mask, items) -> np.ndarray:
  """The live interest that owns each user's newest history item, int [Q]: a choice needing no target."""
  last = np.asarray(eval_set.history)[np.arange(len(users)), np.asarray(eval_set.history_len) - 1]
  return interest_stats.owner(users, mask, items, last.reshape(-1, 1))[:, 0]


def bonus_curve(eval_set, split: str, users, mask, items, recent, bonuses=BONUSES) -> dict[float, float]:
  """HR@10 of the union readout with each of ``bonuses`` added to the newest item's interest."""
  ev = evaluation.LeaveOneOutEvaluator(eval_set, split=split)
  return {b: float(ev.per_user(*_with_bonus(users, mask, items, recent, b), user_mask=mask)["HR@10"].mean())
          for b in bonuses}


def _seeded(config, workdir: str):
  """The config with the seed its workdir was trained with (one --config serves every seed)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise app.UsageError(f"--workdir={workdir}: no config.json there; train it first (mvhan-train --mode=train)")
  with open(path, encoding="utf-8") as f:
    seed = json.load(f).get("seed", config.seed)
  config = config.copy_and_resolve_references()
  config.seed = seed
  return config


def probe_multi(config, workdir: str, tercile: np.ndarray | None) -> dict[str, float]:
  exp, params, items = candidates.load_retrieval(_seeded(config, workdir), workdir)
  test = exp.eval_sets["test"]
  users, mask = rtask.encode_users(exp, params, test)
  if mask is None:
    raise app.UsageError(f"--config {FLAGS.config!r}: {exp.config.model.name} gives one vector per user; "
                         "probe a multi-interest model (mind, comirec_sa, comirec_dr, multitower)")
  evaluator = evaluation.LeaveOneOutEvaluator(test, split="test")
  union = evaluator.per_user(users, items, user_mask=mask)
  own = interest_stats.owner(users, mask, items, np.asarray(test.targets).reshape(-1, 1))[:, 0]
  oracle = evaluator.per_user(users[np.arange(len(own)), own], items)
  _, top = evaluation.exact_topk(users, items, 50, query_mask=mask, exclude_indptr=test.exclude_indptr,
                                 exclude_indices=test.exclude_indices)
  recent = newest_owner(test, users, mask, items)
  recent_hr = evaluator.per_user(users[np.arange(len(recent)), recent], items)
  # The bonus is picked by validation HR@10, then applied to the test users.
  valid = exp.eval_sets["valid"]
  v_users, v_mask = rtask.encode_users(exp, params, valid)
  v_curve = bonus_curve(valid, "valid", v_users, v_mask, items, newest_owner(valid, v_users, v_mask, items))
  beta = max(BONUSES, key=lambda b: v_curve[b])
  bonus_hr = bonus_curve(test, "test", users, mask, items, recent, (beta,))[beta]
  out = {
      "live interests": float(mask.sum(1).mean()),
      "pairwise cosine": float(np.nanmean(interest_stats.live_pairwise_cosine(users, mask))),
      "owners of the top-50": float(interest_stats.owners_in_topk(users, mask, items, top).mean()),
      "HR@10 (union)": float(union["HR@10"].mean()),
      "HR@10 (target's own interest)": float(oracle["HR@10"].mean()),
      "target owned by the newest item's interest": float((own == recent).mean()),
      "HR@10 (newest item's interest alone)": float(recent_hr["HR@10"].mean()),
      "bonus of the newest item's interest (picked on valid)": beta,
      "HR@10 (union, that bonus)": bonus_hr,
  }
  if tercile is not None:
    for b, (v, _) in interest_stats.bucket_means(union["HR@10"], tercile).items():
      out[f"HR@10, diversity tercile {b + 1}"] = v
  return out


def probe_single(config, workdir: str, tercile: np.ndarray | None) -> dict[str, float]:
  exp, params, items = candidates.load_retrieval(_seeded(config, workdir), workdir)
  test = exp.eval_sets["test"]
  users, mask = rtask.encode_users(exp, params, test)
  per = evaluation.LeaveOneOutEvaluator(test, split="test").per_user(users, items, user_mask=mask)
  out = {"HR@10 (union)": float(per["HR@10"].mean())}
  if tercile is not None:
    for b, (v, _) in interest_stats.bucket_means(per["HR@10"], tercile).items():
      out[f"HR@10, diversity tercile {b + 1}"] = v
  return out


def fmt(values: list[float]) -> str:
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def main(argv):
  del argv
  config = configs.load_config(FLAGS.config)
  exp = rtask.build_experiment(config)
  test = exp.eval_sets["test"]
  tercile, cuts = None, ""
  field = FLAGS.diversity_field
  if field:
    if field not in exp.tables["item"]:
      raise app.UsageError(f"--diversity_field={field!r}: the dataset's item fields are "
                           f"{sorted(exp.tables['item'])}; name a multi-valued one or pass ''")
    div = history_diversity(test, np.asarray(exp.tables["item"][field]))
    tercile = terciles(div)
    cuts = ", ".join(f"tercile {b + 1}: {div[tercile == b].min()}-{div[tercile == b].max()} distinct "
                     f"{field} ({(tercile == b).sum()} users)" for b in range(3))
  multi = [probe_multi(config, w, tercile) for w in FLAGS.workdir]
  single = []
  if FLAGS.single_config:
    single_config = configs.load_config(FLAGS.single_config)
    single = [probe_single(single_config, w, tercile) for w in FLAGS.single_workdir]
  rows = list(multi[0])
  lines = [f"Probe of `{FLAGS.config}` ({len(multi)} seed(s))"
           + (f" against `{FLAGS.single_config}` ({len(single)} seed(s))" if single else "") + ".",
           f"History diversity: {cuts}." if cuts else "", "",
           "| quantity | multi-interest | single vector |", "|---|---|---|"]
  for r in rows:
    lines.append(f"| {r} | {fmt([m[r] for m in multi])} | {fmt([s[r] for s in single if r in s])} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if FLAGS.out:
    command = ["python experiments/interest_probe.py", f"--config={FLAGS.config}"]
    command += [f"--workdir={w}" for w in FLAGS.workdir]
    if FLAGS.single_config:
      command += [f"--single_config={FLAGS.single_config}"] + [f"--single_workdir={w}" for w in FLAGS.single_workdir]
    command += [f"--out={FLAGS.out}", f"--section={FLAGS.section}"]
    report.write_section(FLAGS.out, FLAGS.section,
                         text + "\n```bash\n" + " \\\n    ".join(command) + "\n```\n")


def _main(argv):
  try:
    main(argv)
  except errors.UserError as e:  # a missing checkpoint, a config that does not load: one line
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(_main)
