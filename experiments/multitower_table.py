r"""Produces experiments/results/multitower.md: the multi-tower multi-interest ablation and cold start.

  python experiments/multitower_table.py --seeds=0,1,2

Sections (``--sections``):
  ml100k_loo      MovieLens-100k, leave-one-out (experiments/configs/multitower_ml100k.py)
  ml100k_comirec  MovieLens-100k, ComiRec protocol (the same config with protocol=comirec)
  synthetic       the synthetic world with known interests (experiments/configs/multitower_synthetic.py)
  cold_start      the synthetic world with 10% of the items held out of training entirely
Rows of the ablation (``ROWS``): the single-tower MIND / ComiRec-SA models, and the multi-tower model
with the argmax training readout or train = serve scoring, repel off or on. Every run trains once per
seed (workdirs under --workdir_root; a finished workdir is only re-evaluated) and reports the test
metrics of the best-by-validation checkpoint, plus two diagnostics of the test users' interests:
  interest cos         mean over users with >= 2 live interests of the mean pairwise cosine between
                       their live interests (multitower.mean_pairwise_cosine);
  interests recovered  (synthetic) fraction of test users whose true interest topics are each matched by
                       a distinct live interest: the definition of experiments/synthetic_interest_table.py
                       (topic = mean of its items' vectors in the model's item space; each topic takes
                       the live interest of highest cosine; recovered when those are all different).
Cold start: the held-out items (a seeded 10% of the catalogue) are removed from every training sequence
and given zero probability under the negative sampler, so no gradient ever touches them; the model
trains a fixed number of epochs; HR@50 over the test users that have a held-out item among their
targets counts a hit when one of those items is in the user's top 50 (full ranking over all items,
history excluded). The multi-tower item tower scores them from their features (id embedding dropped,
models/multitower.py R3); the single-tower rows show what the single-tower models give them: MIND
averages an untrained id row with trained attribute embeddings, ComiRec-SA has only the untrained id
row (chance level).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mvhan_jax import host_memory
from mvhan_jax import tasks
from mvhan_jax import configs
from mvhan_jax import evaluation
from mvhan_jax import losses
from mvhan_jax import report
from mvhan_jax import train
from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.data import pipeline
from mvhan_jax.data import protocol
from mvhan_jax.data import synthetic
from mvhan_jax.models import multitower

flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per row.")
flags.DEFINE_list("sections", ["ml100k_loo", "ml100k_comirec", "synthetic", "cold_start"], "Sections to run.")
flags.DEFINE_string("out", "experiments/results/multitower.md", "Markdown file to write.")
flags.DEFINE_string("workdir_root", "runs/multitower", "Where each run's workdir goes.")
flags.DEFINE_list("config_args", [], "Config args appended to every row's (as after ':' in --config=), e.g. "
                  "epochs=6 or smoke.")
flags.DEFINE_list("override", [], "Config field overrides of every run, e.g. batch_size=512,model.repel_weight=0.3.")
flags.DEFINE_list("rows", [], "Only these row keys (default: all of ROWS).")
flags.DEFINE_float("cold_fraction", 0.1, "Fraction of items held out of training in the cold-start section.")
flags.DEFINE_integer("cold_epochs", 4, "Training epochs of the cold-start runs.")
flags.DEFINE_list("cold_rows", [], "Only these cold-start row keys (default: all of COLD_ROWS).")
flags.DEFINE_bool("cached_only", False, "Only collect runs whose metrics are cached (table_metrics.json in the "
                  "workdir); skip the others. Used to merge rows that ran as separate processes.")
FLAGS = flags.FLAGS

# Row key -> (row name, config args).
ROWS = {
    "mind": ("MIND (single tower, argmax readout)", "tower=single,extractor=mind"),
    "sa": ("ComiRec-SA (single tower, argmax readout)", "tower=single,extractor=comirec_sa"),
    "mt_argmax": ("Multi-tower MIND, argmax readout, no repel", "extractor=mind,readout=argmax,repel=none"),
    "mt_serve": ("Multi-tower MIND, train=serve, no repel", "extractor=mind,readout=serve,repel=none"),
    "mt_serve_repel": ("Multi-tower MIND, train=serve, hinge repel", "extractor=mind,readout=serve,repel=hinge"),
    "mt_serve_nce": ("Multi-tower MIND, train=serve, InfoNCE repel", "extractor=mind,readout=serve,repel=infonce"),
    "mt_sa_serve_repel": ("Multi-tower ComiRec-SA, train=serve, hinge repel",
                          "extractor=comirec_sa,readout=serve,repel=hinge"),
}
SECTIONS = {
    # name -> (title, config file, extra args, metrics)
    "ml100k_loo": ("MovieLens-100k, leave-one-out (943 users, full ranking over 1,682 items)",
                   "experiments/configs/multitower_ml100k.py", "",
                   ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR", "interest cos")),
    "ml100k_comirec": ("MovieLens-100k, ComiRec protocol (users split 8:1:1, last 20% of a held-out "
                       "user's sequence as targets)", "experiments/configs/multitower_ml100k.py",
                       "protocol=comirec", ("Recall@20", "Recall@50", "HR@20", "HR@50", "NDCG@50", "interest cos")),
    "synthetic": ("Synthetic world, ComiRec protocol (users with 1..4 known interest topics)",
                  "experiments/configs/multitower_synthetic.py", "",
                  ("Recall@20", "Recall@50", "HR@50", "NDCG@50", "interest cos", "interests recovered")),
}
COLD_ROWS = {
    "mt_serve_repel": ("Multi-tower MIND, train=serve, hinge repel (id dropped for unseen items)",
                       "extractor=mind,readout=serve,repel=hinge"),
    "mt_serve_repel_keepid": ("Multi-tower MIND, train=serve, hinge repel (untrained id rows kept)",
                              "extractor=mind,readout=serve,repel=hinge"),
    "mind": ("MIND (single tower: mean of an untrained id row and attribute embeddings)",
             "tower=single,extractor=mind"),
    "sa": ("ComiRec-SA (single tower: untrained id rows only)", "tower=single,extractor=comirec_sa"),
}
COLD_METRICS = ("cold HR@50", "cold Recall@50", "warm HR@50", "warm Recall@50")


def _spec(path: str, *args: str) -> str:
  return f"{path}:" + ",".join(a for a in args if a)


def _load(spec: str):
  return configs.apply_overrides(configs.load_config(spec), FLAGS.override)


def _override_key() -> str:
  """A workdir suffix naming --override: the metrics cache (table_metrics.json) ignores the config."""
  return "_" + "_".join(FLAGS.override).replace("=", "-").replace("/", "_") if FLAGS.override else ""


def _world(cfg):
  return synthetic.generate_world(synthetic.WorldConfig(**cfg.dataset.world.to_dict()))


def _load_cached(workdir: str) -> dict | None:
  path = os.path.join(workdir, "table_metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _save_cached(workdir: str, metrics: dict, seconds: float, info: dict | None = None) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "table_metrics.json"), "w") as f:
    json.dump({"metrics": {k: float(v) for k, v in metrics.items()}, "seconds": seconds, "info": info or {}}, f)


def run_section(name: str, seeds, timing) -> dict[str, list[dict]]:
  _, path, section_args, _ = SECTIONS[name]
  rows = {}
  for key in FLAGS.rows or ROWS:
    row_name, args = ROWS[key]
    spec = _spec(path, args, section_args, *FLAGS.config_args)
    for seed in seeds:
      cfg = _load(spec)
      cfg.seed = seed
      cfg.progress = False
      cfg.tensorboard = False
      cfg.index.build = False
      workdir = os.path.join(FLAGS.workdir_root, name,
                             spec.split(":")[1].replace(",", "_").replace("=", "-") + _override_key(), f"seed{seed}")
      cached = _load_cached(workdir)
      if cached is not None:
        rows.setdefault(row_name, []).append(cached["metrics"])
        timing.setdefault(f"{name}: {row_name}", []).append(cached["seconds"])
        continue
      if FLAGS.cached_only:
        continue
      t0 = time.time()
      res = dict(tasks.train_and_evaluate(cfg, workdir)["test"])
      exp = rtask.build_experiment(cfg)
      params, _ = rtask.restore_params(workdir, exp)
      test = exp.eval_sets["test"]
      users, mask = rtask.encode_users(exp, params, test)
      res["interest cos"] = multitower.mean_pairwise_cosine(users, mask)
      if name == "synthetic":
        truth = _world(cfg).ground_truth()
        res["interests recovered"] = evaluation.interests_recovered(
            users, mask, rtask.encode_items(exp, params), truth["item_topic"], truth["user_interests"], test.user)
      rows.setdefault(row_name, []).append(res)
      timing.setdefault(f"{name}: {row_name}", []).append(time.time() - t0)
      _save_cached(workdir, res, time.time() - t0)
      print(f"[{name}] {row_name} seed {seed}: {res} ({time.time() - t0:.0f} s)", flush=True)
  return rows


# --------------------------------------------------------------------------------------------------
# Cold start
# --------------------------------------------------------------------------------------------------
def hold_out_items(exp, fraction: float, seed: int):
  """Removes a seeded ``fraction`` of the items from training entirely (see the module docstring).

  Returns (the experiment with filtered training examples, sampler and the known-item table; the
  held-out item ids, sorted)."""
  n = exp.data.num_items
  held = np.sort(np.random.default_rng(1000 + seed).choice(n, int(round(fraction * n)), replace=False))
  is_held = np.zeros(n, bool)
  is_held[held] = True
  seqs = tuple(s[~is_held[s]] for s in exp.split.train_sequences)
  cfg = exp.config
  if cfg.protocol != "comirec":
    raise ValueError("the cold-start experiment uses the ComiRec protocol (config.protocol='comirec')")
  source = pipeline.ArraySource(protocol.comirec_training_examples(seqs, cfg.maxlen))
  counts = np.bincount(np.concatenate([s for s in seqs if len(s)]), minlength=n)
  base = losses.make_sampler(cfg.loss.sampler, counts, cfg.loss.get("alpha", 0.75))
  probs = np.where(is_held, 0.0, base.probs)
  sampler = losses.Sampler(base.name, (probs / probs.sum()).astype(np.float32))
  tables = {"user": exp.tables["user"],
            "item": {**exp.tables["item"], multitower.KNOWN_ITEMS_KEY: jnp.asarray((~is_held).astype(np.float32))}}
  return dataclasses.replace(exp, train_source=source, sampler=sampler, tables=tables), held


def cold_metrics(exp, params, held: np.ndarray, k: int = 50) -> dict[str, float]:
  """HR@k / Recall@k over the test users' held-out ('cold') targets and, separately, their other
  ('warm') targets; a user counts for a group when it has at least one target of that group."""
  test = exp.eval_sets["test"]
  users, mask = rtask.encode_users(exp, params, test)
  _, top = evaluation.exact_topk(users, rtask.encode_items(exp, params), k, query_mask=mask,
                                 exclude_indptr=test.exclude_indptr, exclude_indices=test.exclude_indices)
  top = np.asarray(top)
  out = {}
  for group in ("cold", "warm"):
    hits, recalls = [], []
    for q in range(len(test.user)):
      t = test.targets[q]
      t = t[t >= 0]
      t = t[np.isin(t, held) == (group == "cold")]
      if len(t) == 0:
        continue
      found = np.isin(t, top[q]).sum()
      hits.append(found > 0)
      recalls.append(found / len(t))
    out[f"{group} HR@{k}"] = float(np.mean(hits))
    out[f"{group} Recall@{k}"] = float(np.mean(recalls))
    out[f"{group} users"] = len(hits)
  return out


def run_cold_start(seeds, timing) -> tuple[dict[str, list[dict]], dict]:
  rows, info = {}, {}
  for key in FLAGS.cold_rows or COLD_ROWS:
    row_name, args = COLD_ROWS[key]
    for seed in seeds:
      workdir = os.path.join(FLAGS.workdir_root, "cold_start", key + _override_key(), f"seed{seed}")
      cached = _load_cached(workdir)
      if cached is not None:
        rows.setdefault(row_name, []).append(cached["metrics"])
        timing.setdefault(f"cold_start: {row_name}", []).append(cached["seconds"])
        info = cached["info"]
        continue
      if FLAGS.cached_only:
        continue
      t0 = time.time()
      cfg = _load(_spec("experiments/configs/multitower_synthetic.py", args, *FLAGS.config_args))
      cfg.seed = seed
      if key == "mt_serve_repel_keepid":
        cfg.model.drop_unseen_ids = False
      exp, held = hold_out_items(rtask.build_experiment(cfg), FLAGS.cold_fraction, seed)
      steps = cfg.get("total_steps") or FLAGS.cold_epochs * (len(exp.train_source) // cfg.batch_size)
      tx = train.make_optimizer(cfg.optimizer, steps)
      init_key, step_key = jax.random.split(jax.random.key(seed))
      state = rtask.init_state(exp, tx, init_key)
      train_step = rtask.make_train_step(exp, tx)
      batches = pipeline.iterate(pipeline.train_batches(exp.train_source, cfg.batch_size, seed=seed))
      for _ in range(steps):
        state, _ = train_step(state, next(batches), exp.tables, step_key)
      res = cold_metrics(exp, state.params, held)
      info = {"held": len(held), "items": exp.data.num_items, "steps": steps,
              "cold users": res.pop("cold users"), "warm users": res.pop("warm users")}
      rows.setdefault(row_name, []).append(res)
      timing.setdefault(f"cold_start: {row_name}", []).append(time.time() - t0)
      _save_cached(workdir, res, time.time() - t0, info)
      print(f"[cold_start] {row_name} seed {seed}: {res} {info} ({time.time() - t0:.0f} s)", flush=True)
  return rows, info


def main(argv):
  del argv
  host_memory.configure()  # before JAX's first array: each step reuses its host memory
  logging.set_verbosity(logging.WARNING)
  seeds = [int(s) for s in FLAGS.seeds]
  timing, parts = {}, []
  for name in FLAGS.sections:
    if name == "cold_start":
      rows, info = run_cold_start(seeds, timing)
      if not info:
        continue
      parts.append(f"""## Cold-start items (synthetic world)

{info['held']} of {info['items']} items ({FLAGS.cold_fraction:.0%}) held out of training entirely (not in
any training sequence, never a sampled negative); {info['steps']} training steps; test users with a
held-out target: {info['cold users']}, with another target: {info['warm users']}.

{report.mean_std_table(rows, COLD_METRICS)}
""")
      continue
    if name not in SECTIONS:
      raise ValueError(f"--sections: {name!r} is unknown; choose from {sorted(SECTIONS) + ['cold_start']}")
    title, _, _, metrics = SECTIONS[name]
    rows = run_section(name, seeds, timing)
    parts.append(f"## {title}\n\n{report.mean_std_table(rows, metrics)}\n")
  flags_used = f"--seeds={','.join(FLAGS.seeds)} --sections={','.join(FLAGS.sections)}"
  flags_used += f" --config_args={','.join(FLAGS.config_args)}" if FLAGS.config_args else ""
  flags_used += f" --override={','.join(FLAGS.override)}" if FLAGS.override else ""
  flags_used += f" --rows={','.join(FLAGS.rows)}" if FLAGS.rows else ""
  flags_used += f" --cold_epochs={FLAGS.cold_epochs}" if "cold_start" in FLAGS.sections else ""
  body = "\n".join(parts)
  text = f"""# Multi-tower multi-interest retrieval with user representation repel

Model: mvhan_jax/models/multitower.py (a reconstruction of arXiv 2403.05122 from its abstract; choices
R1-R6 in its docstring). Test metrics of the best-by-validation checkpoint, mean ± std (sample std)
over seeds {','.join(FLAGS.seeds)}; all rows use the log-uniform negative sampler with logQ. "interest cos":
mean pairwise cosine between a test user's live interests; "interests recovered": fraction of test
users whose true interests each get a distinct interest vector (see experiments/multitower_table.py).

{body}
Produced by:

```bash
python experiments/multitower_table.py {flags_used} --out={FLAGS.out}
```

Machine: {report.machine_description()}. Wall time per run:
{"; ".join(f"{n}: {np.mean(t):.0f} s" for n, t in timing.items())}.
"""
  report.write_markdown(FLAGS.out, text)


if __name__ == "__main__":
  app.run(main)
