r"""The listwise re-ranker of a retriever's top-100 (issue 18): rows beside 'Retrieval only'.

  python experiments/rerank_listwise.py --seeds=0,1,2
  python experiments/rerank_listwise.py --dataset=ml1m --seeds=0 \
      --retrieval_workdir=runs/ml1m_table/experiments_configs_two_tower_ml100k.py_recency,dataset=ml1m/seed0

Stage 1: the frozen retrieval model of --retrieval_workdir (recency two-tower, best-by-validation
checkpoint; trained with --retrieval_config when the workdir has no results.json) returns each
query's exact top-N unseen items. Stage 2: `mvhan_jax.ranking.listwise` re-orders them.
Re-ranker training lists (--train_on): 'valid' (default) = the validation queries (history = the
training sequence, target = the validation item) with the retriever's top-N, the number of epochs
chosen by --folds-fold cross-validation over them, then one fit on all; 'prefixes' = training-sequence
prefixes (`rerank.training_queries`, subsampled to --max_train_queries), early stopping on the
re-ranked validation lists' NDCG@10 (the retriever is overfit on its own training prefixes: recall@100
0.86 there vs 0.60 on test, and this re-ranker learns to trust it too much; kept as a reference row).
By default only lists whose positive was retrieved are trained on (--append_missing appends it).
Test (history = training sequence + validation item) once. A test item outside the top-N is a miss
for every row.

Writes the section 'listwise-<dataset>-<train_on>' of --out (experiments/results/retrieve_then_rank.md; the
rest of the file is kept) and the per-seed metrics to <--cache_dir>/<dataset>-<train_on>.json (a row already
there for a seed is not retrained; delete the file to recompute). ML-100k: ~30 s per run (5 rows x
3 seeds ~8 min); ML-1M ~100 s per run, on the loaded 2-core machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from mvhan_jax import evaluation
from mvhan_jax import host_memory
from mvhan_jax import report
from mvhan_jax import tables
from mvhan_jax import tasks
from mvhan_jax.configs import load_config
from mvhan_jax.ranking import candidates as retrieval_candidates
from mvhan_jax.ranking import listwise
from mvhan_jax.ranking import rerank

flags.DEFINE_enum("dataset", "ml100k", ["ml100k", "ml1m"], "MovieLens-100k or -1M.")
flags.DEFINE_string("retrieval_config", "experiments/configs/two_tower_ml100k.py:recency",
                    "Retrieval config (',dataset=ml1m' is appended for --dataset=ml1m).")
flags.DEFINE_string("retrieval_workdir", "runs/rtr_retrieval", "Trained retrieval workdir (trained if missing).")
flags.DEFINE_list("seeds", ["0"], "Re-ranker seeds.")
flags.DEFINE_list("rows", ["full", "retrieval", "retrieval_counts", "retrieval_attention", "no_retrieval"],
                  "Rows (feature groups) to train: keys of ROWS.")
flags.DEFINE_integer("candidates", 100, "Retrieved candidates per query.")
flags.DEFINE_enum("train_on", "valid", ["valid", "prefixes"],
                  "Re-ranker training queries: 'valid' (the validation queries; epochs by --folds-fold "
                  "cross-validation over them, then one fit on all) or 'prefixes' (training-sequence "
                  "prefixes, early stopping on the validation queries).")
flags.DEFINE_integer("folds", 5, "Cross-validation folds (--train_on=valid).")
flags.DEFINE_integer("max_train_queries", 40000, "Training prefixes sampled (0: all).")
flags.DEFINE_integer("min_history", 3, "Shortest training prefix.")
flags.DEFINE_bool("append_missing", False,
                  "Train also on queries whose positive the retriever missed (appended to the list); "
                  "default: only queries with the positive among the candidates.")
flags.DEFINE_integer("epochs", 15, "Most training epochs.")
flags.DEFINE_integer("batch_size", 64, "Lists per step.")
flags.DEFINE_integer("evals_per_epoch", 2, "Validations per epoch (early stopping, best parameters).")
flags.DEFINE_integer("patience", 3, "Validations without a better NDCG@10 before stopping.")
flags.DEFINE_string("out", "experiments/results/retrieve_then_rank.md", "Markdown file (a section is written).")
flags.DEFINE_string("cache_dir", "runs/rerank_listwise", "Per-seed metrics cache.")
FLAGS = flags.FLAGS

FULL = ("retrieval", "transition", "popularity", "attention")
ROWS = {  # key -> (row label, feature groups)
    "full": ("Retrieval + listwise re-ranker", FULL),
    "retrieval": ("Retrieval + listwise re-ranker, retrieval features only", ("retrieval",)),
    "retrieval_counts": ("Retrieval + listwise re-ranker, retrieval + transitions + popularity",
                         ("retrieval", "transition", "popularity")),
    "retrieval_attention": ("Retrieval + listwise re-ranker, retrieval + target attention", ("retrieval", "attention")),
    "no_retrieval": ("Retrieval + listwise re-ranker, without the retrieval features",
                     ("transition", "popularity", "attention")),
}


def metrics_of(positions: np.ndarray, n: int) -> dict[str, float]:
  m = evaluation.leave_one_out_metrics(positions, (10,))
  found = positions < n
  return {"HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"], f"Recall@{n}": float(np.mean(found)),
          "candidate AUC": rerank.candidate_auc(positions[found], n)}


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array: each step reuses its host memory
  logging.set_verbosity(logging.WARNING)
  arg = FLAGS.retrieval_config + (",dataset=ml1m" if FLAGS.dataset == "ml1m" else "")
  rcfg = load_config(arg)
  rcfg.progress = False
  if not os.path.exists(os.path.join(FLAGS.retrieval_workdir, "results.json")):
    tasks.train_and_evaluate(rcfg, FLAGS.retrieval_workdir)
  with open(os.path.join(FLAGS.retrieval_workdir, "results.json")) as f:
    rtest = json.load(f)["test"]
  n = FLAGS.candidates
  t0 = time.time()
  exp, params, items = retrieval_candidates.load_retrieval(rcfg, FLAGS.retrieval_workdir)
  temperature = float(rcfg.loss.temperature)
  split = exp.split
  counts = listwise.CountFeatures(split.train_sequences, split.num_items)
  cfg0 = listwise.TrainConfig()
  lists = {}
  queries = {"valid": exp.eval_sets["valid"], "test": exp.eval_sets["test"]}
  if FLAGS.train_on == "prefixes":
    queries["train"] = rerank.training_queries(split, rcfg.maxlen, FLAGS.max_train_queries, FLAGS.min_history)
  for name, q in queries.items():
    got = rerank.retrieved_lists(exp, params, items, q, n, add_missing=name == "train" and FLAGS.append_missing)
    lists[name] = listwise.build_lists(got, counts, q.user, q.history, q.history_len, temperature=temperature,
                                       num_candidates=n, maxlen=cfg0.maxlen)
  source = lists["train"] if FLAGS.train_on == "prefixes" else lists["valid"]
  train_recall = float(np.mean(source.label < n))
  if not FLAGS.append_missing:
    source = source.take(np.flatnonzero(source.label < n))
  print(f"candidate lists in {time.time() - t0:.0f} s: {len(source)} training lists from {FLAGS.train_on} "
        f"(retriever recall@{n} on those queries {train_recall:.3f}), {len(lists['valid'])} valid, "
        f"{len(lists['test'])} test")

  cache_path = os.path.join(FLAGS.cache_dir, f"{FLAGS.dataset}-{FLAGS.train_on}.json")
  cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
  base = {s: metrics_of(l.label.astype(np.int64), n) for s, l in (("valid", lists["valid"]), ("test", lists["test"]))}
  rows = {"Retrieval only": [base["test"]]}
  valid_rows = {"Retrieval only": [base["valid"]]}
  for key in FLAGS.rows:
    label, groups = ROWS[key]
    for seed in FLAGS.seeds:
      ck = f"{key}/seed{seed}"
      if ck not in cache:
        cfg = listwise.TrainConfig(groups=groups, seed=int(seed), epochs=FLAGS.epochs, patience=FLAGS.patience,
                                   batch_size=FLAGS.batch_size)
        log = lambda s, k=ck: print(f"[{k}] {s}", flush=True)  # noqa: E731
        t = time.time()
        out = {}
        if FLAGS.train_on == "prefixes":
          cfg.eval_every = max(len(source) // cfg.batch_size // FLAGS.evals_per_epoch, 1)
          model, best, hist = listwise.train(cfg, source, lists["valid"], items, log=log)
          out["best_step"] = max(hist, key=lambda h: h[1])[0]
          splits = ("valid", "test")
        else:
          epochs, curve = listwise.cross_validate(cfg, source, items, FLAGS.folds, log=log)
          log(f"mean held-out NDCG@10 per epoch {np.round(curve, 4).tolist()}: {epochs} epochs")
          model, best, _ = listwise.train(dataclasses.replace(cfg, epochs=epochs, patience=0), source, None, items,
                                          log=log)
          out["best_step"] = epochs
          out["cv_curve"] = curve.tolist()
          splits = ("test",)
        for s in splits:
          l = lists[s]
          scores = listwise.score_lists(model, best, l, items)
          out[s] = metrics_of(listwise.reranked_positions(l.candidates, scores, l.label), n)
        out["seconds"] = time.time() - t
        cache[ck] = out
        os.makedirs(FLAGS.cache_dir, exist_ok=True)
        with open(cache_path, "w") as f:
          json.dump(cache, f, indent=1)
      rows.setdefault(label, []).append(cache[ck]["test"])
      if "valid" in cache[ck]:
        valid_rows.setdefault(label, []).append(cache[ck]["valid"])
  metrics = ["HR@10", "NDCG@10", f"Recall@{n}", "candidate AUC"]
  table = tables.mean_std_table(rows, metrics)
  vtable = tables.mean_std_table(valid_rows, ["HR@10", "NDCG@10", "candidate AUC"])
  seconds = [cache[f"{k}/seed{s}"]["seconds"] for k in FLAGS.rows for s in FLAGS.seeds]
  steps = {ROWS[k][0]: [cache[f"{k}/seed{s}"]["best_step"] for s in FLAGS.seeds] for k in FLAGS.rows}
  name = {"ml100k": "MovieLens-100k", "ml1m": "MovieLens-1M"}[FLAGS.dataset]
  seeds = ",".join(FLAGS.seeds)
  extra = "" if FLAGS.dataset == "ml100k" else " --dataset=ml1m"
  kept = "" if FLAGS.append_missing else (f" Only queries whose positive is among the retrieved {n} are "
                                            "training lists (the others are misses whatever the order).")
  if FLAGS.train_on == "valid":
    training = (f"Training lists: the {len(lists['valid'])} validation queries (history = the training sequence, "
                f"target = the validation item; retriever recall@{n} {train_recall:.3f}; {len(source)} lists)."
                f"{kept} Epochs (<= {FLAGS.epochs}) chosen by {FLAGS.folds}-fold cross-validation over these queries "
                "(mean held-out NDCG@10 after each epoch), then one fit on all of them.")
    curves = {ROWS[k][0]: np.mean([cache[f"{k}/seed{s}"]["cv_curve"] for s in FLAGS.seeds], 0) for k in FLAGS.rows}
    selection = ("Cross-validation (held-out NDCG@10 over the validation lists with the positive retrieved, "
                 "after 0 (= the retrieval order), 1, 2, ... epochs; mean over folds and seeds):\n\n" +
                 "\n".join(f"- {k}: {' '.join(f'{x:.4f}' for x in v)}" for k, v in curves.items()) +
                 f"\n\nEpochs chosen per seed: {'; '.join(f'{k}: {v}' for k, v in steps.items())}. "
                 f"Time per run (cross-validation + fit) {np.mean(seconds):.0f} s (mean) on this machine.")
    folds_seeded = ", folds"
  else:
    training = (f"Training lists: {len(lists['train'])} training-sequence prefixes (history >= {FLAGS.min_history}; "
                f"retriever recall@{n} on them {train_recall:.3f}; {len(source)} lists).{kept} <= {FLAGS.epochs} "
                f"epochs, {FLAGS.evals_per_epoch} validations per epoch, best by validation NDCG@10 "
                f"(patience {FLAGS.patience}).")
    selection = (f"Validation (the early-stopping split, same rows):\n\n{vtable}\n\nBest step per seed: "
                 f"{'; '.join(f'{k}: {v}' for k, v in steps.items())}. Time per run {np.mean(seconds):.0f} s (mean).")
    folds_seeded = ""
  body = f"""## Listwise re-ranker of the top-{n} ({name}, trained on {FLAGS.train_on}, issue 18)

Retriever: `{arg}`, workdir `{FLAGS.retrieval_workdir}` (frozen; its own full-ranking test HR@10
{rtest['HR@10']:.4f}, NDCG@10 {rtest['NDCG@10']:.4f}). Re-ranker: `mvhan_jax/ranking/listwise.py`,
score = a * retrieval logit + MLP(features), softmax cross-entropy over each query's list. Features
(groups): retrieval (logit u.v/{temperature:g}, logit minus the list's best, log rank), transitions
(first-order Markov counts T[h_k, c] / r[h_k] and log1p T[h_k, c] of the 3 most recent items, training
sequences only, leave-user-out), popularity (log training count, leave-user-out), target attention
(candidate over the last {cfg0.maxlen} items, frozen retriever item vectors + learned recency embeddings;
cosines to the 3 most recent items). {training} Adam lr {cfg0.lr:g}, batch {FLAGS.batch_size} lists.
Seeds: {seeds} (re-ranker initialisation, order{folds_seeded}; one retriever). Test (evaluated once), all
{len(lists['test'])} users:

{table}

{selection}

```bash
python experiments/rerank_listwise.py{extra} --retrieval_workdir={FLAGS.retrieval_workdir} --train_on={FLAGS.train_on} --seeds={seeds} --rows={','.join(FLAGS.rows)}
```
"""
  report.write_section(FLAGS.out, f"listwise-{FLAGS.dataset}-{FLAGS.train_on}", body)


if __name__ == "__main__":
  app.run(main)
