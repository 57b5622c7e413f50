"""Results tables (one row per model, mean ± std over seeds) and the evaluation plots of workdirs."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from typing import Any, Mapping, Sequence

import numpy as np

from mvhan_jax.tables import mean_std_table  # noqa: F401  (the table scripts' entry point)


def write_markdown(path: str, text: str) -> None:
  """Writes a results file (creating its folder) and echoes it, as every table script does."""
  import os  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  print(text)


_SECTION = re.compile(r"<!-- begin (\S+) -->\n.*?<!-- end \1 -->\n", re.S)


def write_section(path: str, name: str, body: str) -> None:
  """Replaces (or appends) the block ``<!-- begin name -->`` ... ``<!-- end name -->`` of a results
  file, so that a second script can own part of a table file another script writes."""
  block = f"<!-- begin {name} -->\n{body.rstrip()}\n<!-- end {name} -->\n"
  text = open(path).read() if os.path.exists(path) else ""
  found = [m for m in _SECTION.finditer(text) if m.group(1) == name]
  if found:
    text = text[:found[0].start()] + block + text[found[0].end():]
  else:
    text = text.rstrip("\n") + ("\n\n" if text else "") + block
  write_markdown(path, text)


def kept_sections(path: str) -> str:
  """The ``write_section`` blocks of an existing results file (for a script that rewrites the file
  around them), each preceded by a blank line; '' when there are none."""
  if not os.path.exists(path):
    return ""
  return "".join("\n" + m.group(0) for m in _SECTION.finditer(open(path).read()))


def kept_rows(path: str, names: Sequence[str]) -> dict[str, str]:
  """The table lines ``| name | ...`` of an existing results file for each of ``names`` found there,
  so that a table script rerunning some rows keeps the others as an earlier run of it wrote them."""
  if not os.path.exists(path):
    return {}
  wanted, found = set(names), {}
  for line in open(path).read().splitlines():
    cells = line.split("|")
    if line.startswith("| ") and len(cells) > 2 and cells[1].strip() in wanted:
      found.setdefault(cells[1].strip(), line)
  return found


def merge_rows(table: str, kept: Mapping[str, str], order: Sequence[str]) -> str:
  """``table`` (a `mean_std_table`) with the ``kept`` lines added, every row in ``order``."""
  lines = table.rstrip("\n").splitlines()
  head, body = lines[:2], {line.split("|")[1].strip(): line for line in lines[2:]}
  body.update({k: v for k, v in kept.items() if k not in body})
  return "\n".join(head + [body[name] for name in order if name in body])


def xla_cost(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled function (``jax.jit(f).lower(*args).compile()``):
  {'flops', 'bytes_accessed'}, NaN where the backend reports none (some return a list of one dict)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  return {"flops": float(ca.get("flops", float("nan"))), "bytes_accessed": float(ca.get("bytes accessed", float("nan")))}


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else ''. Two VMs of
  one cloud type may run on different CPUs: benchmark figures name the one they came from."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.partition(":")[2].strip()
  except OSError:
    pass
  return platform.processor()


def machine_description() -> str:
  import os  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  cpu = cpu_model()
  return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores{f' ({cpu})' if cpu else ''}, "
          f"jax {jax.__version__} on {dev.platform} ({dev.device_kind})")


# --------------------------------------------------------------------------------------------------
# Evaluation plots: the data behind each figure (pure NumPy, tested), then the figures.
#
# Figures are `matplotlib.figure.Figure` objects built without pyplot: no global figure state and no
# GUI backend, so they render headless (PNG through Agg) and display in a notebook with `display(fig)`.
# --------------------------------------------------------------------------------------------------
HR_KS = tuple(range(1, 101))
ANN_KS = (1, 5, 10, 20, 50, 100)
TRAINING_METRICS = ("train/loss", "valid/HR@10", "valid/NDCG@10", "valid/HR@50",
                    "valid/targets/HR@50", "valid/targets/AUC")
TABLE_METRICS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR", "AUC", "targets/HR@50", "targets/AUC")


def hr_curve(ranks, ks: Sequence[int] = HR_KS) -> np.ndarray:
  """HR@K for each K in ``ks`` from 0-based target ranks int [Q]: the fraction of rank < K, [len(ks)]."""
  ranks = np.asarray(ranks)
  if ranks.ndim != 1 or not ranks.size or ranks.min() < 0:
    raise ValueError(f"ranks must be a non-empty int [Q] of 0-based ranks, got shape {ranks.shape}")
  # A rank r is a hit for every K > r: the cumulative histogram of the ranks, read at K - 1.
  ks = np.asarray(ks)
  counts = np.bincount(np.minimum(ranks, ks.max()), minlength=ks.max() + 1)
  return np.cumsum(counts)[ks - 1] / len(ranks)


def read_curves(rows_or_workdir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The series of a metrics log: name -> (steps int [N], values float [N]) in step order.

  ``rows_or_workdir``: a workdir (its ``metrics.jsonl``) or the parsed rows ``{"step": s, name: v}``.
  A train row and an eval row may share a step; a name written twice at one step keeps the last value.
  """
  if isinstance(rows_or_workdir, (str, os.PathLike)):
    from mvhan_jax.metrics_writer import read_metrics  # pylint: disable=import-outside-toplevel
    rows = read_metrics(rows_or_workdir)
  else:
    rows = list(rows_or_workdir)
  series: dict[str, dict[int, float]] = {}
  for row in rows:
    step = int(row["step"])
    for name, value in row.items():
      if name != "step":
        series.setdefault(name, {})[step] = float(value)
  return {name: (np.array(sorted(v), np.int64), np.array([v[s] for s in sorted(v)], np.float64))
          for name, v in series.items()}


def pca_2d(*arrays) -> tuple[list[np.ndarray], np.ndarray]:
  """Projects the rows of all ``arrays`` ([N_i, D] each) on the top two principal axes of their union.

  One joint projection, so users and items share the map. Returns the coordinates [N_i, 2] of each
  array and the fraction of the variance each axis explains [2]. Each axis is signed so that its
  largest-magnitude loading is positive (as scikit-learn's svd_flip), making the map deterministic.
  """
  mats = [np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1]) for a in arrays]
  x = np.concatenate(mats)
  if x.shape[0] < 2:
    raise ValueError(f"pca_2d needs at least two rows in total, got {x.shape[0]}")
  x = x - x.mean(axis=0)
  _, s, vt = np.linalg.svd(x, full_matrices=False)
  axes = vt[:2]
  axes = axes * np.sign(axes[np.arange(len(axes)), np.argmax(np.abs(axes), axis=1)])[:, None]
  total = float((s ** 2).sum())
  explained = (s[:2] ** 2) / total if total > 0 else np.zeros(len(axes))
  if axes.shape[0] < 2:  # one-dimensional vectors: the second axis is empty
    axes = np.concatenate([axes, np.zeros_like(axes)])
    explained = np.concatenate([explained, [0.0]])
  out, start = [], 0
  for m in mats:
    out.append(x[start:start + len(m)] @ axes.T)
    start += len(m)
  return out, explained


def ann_recall_curve(index, users, items, ks: Sequence[int] = ANN_KS, user_mask=None) -> tuple[np.ndarray, np.ndarray]:
  """Recall@K of ``index`` against exact top-K search, for each K (capped at the catalogue size).

  users: [Q, D] (or [Q, K, D] with ``user_mask``); items: the indexed vectors [I, D]. Exact top-K
  for every K is the prefix of one exact top-max(K) (ties broken by item id); the index is searched
  at each K. Returns (ks int [n], recall float [n]).
  """
  from mvhan_jax import evaluation  # pylint: disable=import-outside-toplevel
  from mvhan_jax import retrieval  # pylint: disable=import-outside-toplevel
  ks = np.array(sorted({min(int(k), len(items)) for k in ks}))
  _, exact = evaluation.exact_topk(users, items, int(ks.max()), query_mask=user_mask)
  recall = []
  for k in ks:
    approx, _ = index.search(users, int(k), query_mask=user_mask)
    recall.append(retrieval.ann_recall(approx, exact[:, :k]))
  return ks, np.array(recall)


def leaves_recall_curve(index, users, items, k: int = 10, user_mask=None,
                        leaves: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, str] | None:
  """Recall@k against exact search over ScaNN's ``leaves_to_search``.

  Uses the tree of ``index`` when it has one; otherwise (small catalogues are indexed without a
  tree) a k-means tree of round(sqrt(I)) leaves is built over ``items`` for the sweep. Returns
  (leaves int [n], recall float [n], a note saying which tree), or None without ScaNN.
  """
  import dataclasses  # pylint: disable=import-outside-toplevel
  import math  # pylint: disable=import-outside-toplevel
  from mvhan_jax import evaluation  # pylint: disable=import-outside-toplevel
  from mvhan_jax import retrieval  # pylint: disable=import-outside-toplevel
  if retrieval._import_scann() is None:  # pylint: disable=protected-access
    return None
  n = len(items)
  if isinstance(index, retrieval.ScannIndex) and index.config.num_leaves:
    tree, note = index, f"saved index, {index.config.num_leaves} leaves"
  else:
    num_leaves = max(2, int(round(math.sqrt(n))))
    if n < 2 * num_leaves:
      return None
    tree = retrieval.build_index(items, retrieval.IndexConfig.for_size(n, num_leaves=num_leaves, num_leaves_to_search=1))
    note = f"{num_leaves}-leaf tree built for the sweep (saved index: no tree)"
  total = tree.config.num_leaves
  if leaves is None:
    leaves = sorted({min(2 ** i, total) for i in range(int(math.log2(total)) + 2)})
  k = min(k, n)
  _, exact = evaluation.exact_topk(users, items, k, query_mask=user_mask)
  recall = []
  for nl in leaves:
    probe = retrieval.ScannIndex(tree.searcher, dataclasses.replace(tree.config, num_leaves_to_search=int(nl)),
                                 tree.num_items, tree.dim)
    approx, _ = probe.search(users, k, query_mask=user_mask)
    recall.append(retrieval.ann_recall(approx, exact))
  return np.asarray(leaves), np.array(recall), note


# --------------------------------------------------------------------------------------------------
# A workdir's evaluation data
# --------------------------------------------------------------------------------------------------
def load_workdir(workdir: str, config=None, data_dir: str | None = None):
  """(config, exp, params, step) of a workdir written by ``mvhan-train --mode=train``.

  The config is read from ``<workdir>/config.json`` unless given; ``data_dir`` points the dataset
  cache elsewhere (e.g. a workdir trained on another machine). Parameters: the best checkpoint.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  from mvhan_jax.tasks import retrieval as rtask  # pylint: disable=import-outside-toplevel
  from mvhan_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  if config is None:
    path = workdir_lib.path(workdir) / "config.json"
    if not path.exists():
      raise FileNotFoundError(f"{path} not found: pass a workdir written by mvhan-train --mode=train "
                              "(or the run's config as config=)")
    config = ml_collections.ConfigDict(workdir_lib.read_json(path))
  if data_dir is not None:
    with config.unlocked():
      config.dataset.data_dir = data_dir
  exp = rtask.build_experiment(config)
  params, step = rtask.restore_params(workdir, exp, "best")
  return config, exp, params, step


@dataclasses.dataclass
class RunData:
  """Everything the plots show about one workdir (see `collect_run`)."""
  name: str
  workdir: str
  results: dict                             # 'valid' / 'test' -> metrics of the best checkpoint
  best_step: int
  curves: dict                              # read_curves(workdir)
  ranks: np.ndarray | None = None           # 0-based test target ranks [Q] (leave-one-out)
  type_names: tuple[str, ...] | None = None
  user_xy: np.ndarray | None = None         # PCA map of test users [Qs, 2] and items [Is, 2]
  item_xy: np.ndarray | None = None
  item_type: np.ndarray | None = None       # types of the mapped items [Is] (1..T) or None
  explained: np.ndarray | None = None       # variance fraction of the two map axes
  user_label: str = "users (test)"          # what a user point is (one per interest when multi-interest)
  ann: tuple | None = None                  # (ks, recall) of the saved index vs exact
  ann_leaves: tuple | None = None           # (leaves, recall@10, note) or None


def collect_run(workdir: str, name: str | None = None, *, loaded=None, evaluate: bool | None = None,
                ann: bool = True, leaves: bool = True, max_points: int = 3000,
                data_dir: str | None = None) -> RunData:
  """Evaluates a workdir and computes the data of every plot.

  loaded: ``load_workdir``'s tuple when the caller has it (the CLI after training), else loaded here.
  evaluate: True re-evaluates the best checkpoint on valid and test; False reads ``results.json``;
  None (default) reads it when present. ann / leaves: ANN recall of ``<workdir>/index`` over K and
  over leaves_to_search (skipped without an index). max_points: users and items drawn (seeded) on the
  2-D map.
  """
  from mvhan_jax import evaluation  # pylint: disable=import-outside-toplevel
  from mvhan_jax import retrieval  # pylint: disable=import-outside-toplevel
  from mvhan_jax.tasks import retrieval as rtask  # pylint: disable=import-outside-toplevel
  from mvhan_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  config, exp, params, step = loaded if loaded is not None else load_workdir(workdir, data_dir=data_dir)
  name = name or f"{config.model.name}: {os.path.basename(os.path.normpath(os.fspath(workdir)))}"
  results_path = workdir_lib.path(workdir) / "results.json"
  if evaluate is None:
    evaluate = not results_path.exists()
  if evaluate:
    results = {split: rtask.evaluate(exp, params, split) for split in ("valid", "test")}
  else:
    saved = workdir_lib.read_json(results_path)
    results = {split: saved[split] for split in ("valid", "test")}
  run = RunData(name=name, workdir=workdir, results=results, best_step=int(step), curves=read_curves(workdir),
                type_names=tuple(exp.type_names) if exp.type_names else None)

  test = exp.eval_sets["test"]
  users, mask = rtask.encode_users(exp, params, test)
  items = rtask.encode_items(exp, params)
  if config.protocol == "leave_one_out":
    run.ranks = evaluation.target_ranks(users, items, test.targets, query_mask=mask,
                                        exclude_indptr=test.exclude_indptr, exclude_indices=test.exclude_indices)
  rng = np.random.default_rng(0)
  flat_users = users[mask] if mask is not None else users  # every live interest is a point
  u_rows = np.sort(rng.choice(len(flat_users), min(max_points, len(flat_users)), replace=False))
  i_rows = np.sort(rng.choice(len(items), min(max_points, len(items)), replace=False))
  (run.user_xy, run.item_xy), run.explained = pca_2d(flat_users[u_rows], items[i_rows])
  if mask is not None:
    run.user_label = "user interests (test)"
  if exp.item_type is not None:
    run.item_type = np.asarray(exp.item_type)[i_rows]
  index_dir = workdir_lib.path(workdir) / "index"
  if (ann or leaves) and (index_dir / "index.json").exists():
    index = retrieval.load_index(index_dir)
    if ann:
      run.ann = ann_recall_curve(index, users, items, user_mask=mask)
    if leaves:
      run.ann_leaves = leaves_recall_curve(index, users, items, user_mask=mask)
  return run


def metrics_table(runs: Sequence[RunData], metrics: Sequence[str] | None = None) -> str:
  """Markdown table, one row per (run, split): the valid and test metrics of each best checkpoint.

  Default columns: those of `TABLE_METRICS` that some run reports ("n/a" where a run lacks one).
  """
  if metrics is None:
    metrics = [m for m in TABLE_METRICS if any(m in r.results["test"] for r in runs)]
  rows = {f"{r.name} ({split})": [{m: r.results[split].get(m, float("nan")) for m in metrics}]
          for r in runs for split in ("valid", "test")}
  return mean_std_table(rows, metrics)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def _figure(nrows: int = 1, ncols: int = 1, size=(6.4, 4.4)):
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def plot_hr_curves(curves: Mapping[str, np.ndarray], ks: Sequence[int] = HR_KS, title: str = "Test HR@K") -> Any:
  """HR@K against K, one line per model. ``curves``: model name -> HR@K [len(ks)] (see `hr_curve`)."""
  fig, axes = _figure()
  ax = axes[0, 0]
  for name, hr in curves.items():
    ax.plot(ks, hr, label=f"{name} (HR@10 {hr[list(ks).index(10)]:.3f})" if 10 in ks else name)
  ax.set(xlabel="K (cut-off)", ylabel="HR@K (fraction of targets in the top K)", title=title,
         xlim=(min(ks), max(ks)), ylim=(0, None))
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize="small")
  return fig


def plot_training_curves(runs: Mapping[str, Mapping[str, tuple]], metrics: Sequence[str] | None = None) -> Any:
  """One panel per metric against the training step, one line per run.

  ``runs``: run name -> `read_curves` output. ``metrics``: the series to draw (default: those of
  `TRAINING_METRICS` that some run logged).
  """
  if metrics is None:
    metrics = [m for m in TRAINING_METRICS if any(m in c for c in runs.values())]
  if not metrics:
    raise ValueError("no metric to plot: the runs' metrics.jsonl hold none of "
                     f"{list(TRAINING_METRICS)}; pass metrics= explicitly")
  ncols = min(3, len(metrics))
  nrows = -(-len(metrics) // ncols)
  fig, axes = _figure(nrows, ncols, size=(4.6, 3.4))
  for ax, metric in zip(axes.flat, metrics):
    for name, curves in runs.items():
      if metric in curves:
        steps, values = curves[metric]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
    ax.set(xlabel="training step", ylabel=metric.split("/", 1)[-1], title=metric)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(metrics):]:
    ax.set_visible(False)
  axes.flat[0].legend(fontsize="small")
  return fig


def plot_per_type(results: Mapping[str, Mapping[str, float]], type_names: Sequence[str],
                  metrics: Sequence[str] = ("HR@50", "AUC"), title: str = "Test metrics per content type") -> Any:
  """Grouped bars: for each metric a panel, for each content type a group, one bar per model.

  ``results``: model name -> metrics dict with '{type}/{metric}' keys (`tasks.retrieval.evaluate` with
  ``config.eval_per_type``); a model without a key gets no bar.
  """
  fig, axes = _figure(1, len(metrics), size=(1.6 + 1.3 * len(type_names), 4.0))
  width = 0.8 / max(len(results), 1)
  x = np.arange(len(type_names))
  for ax, metric in zip(axes.flat, metrics):
    for j, (name, res) in enumerate(results.items()):
      vals = np.array([res.get(f"{t}/{metric}", np.nan) for t in type_names], np.float64)
      bars = ax.bar(x - 0.4 + width * (j + 0.5), vals, width, label=name)
      ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=1)
    ax.set_xticks(x, type_names)
    ax.set(xlabel="content type (ranking restricted to the type)", ylabel=metric, title=metric,
           ylim=(0, 1.05 if metric == "AUC" else None))
    if metric == "AUC":
      ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.grid(axis="y", alpha=0.3)
  axes.flat[0].legend(fontsize="small")
  fig.suptitle(title)
  return fig


def plot_ann_recall(curves: Mapping[str, tuple], leaves: Mapping[str, tuple] | None = None) -> Any:
  """ANN recall against exact search: over K (``curves``: name -> (ks, recall)) and, when given,
  over ScaNN's leaves_to_search (``leaves``: name -> (leaves, recall@10, note))."""
  leaves = {k: v for k, v in (leaves or {}).items() if v is not None}
  fig, axes = _figure(1, 2 if leaves else 1, size=(5.6, 4.0))
  ax = axes[0, 0]
  for name, (ks, recall) in curves.items():
    ax.plot(ks, recall, marker="o", label=name)
  ax.set_xscale("log")
  ax.set(xlabel="K", ylabel="recall@K = |ANN top-K ∩ exact top-K| / K", title="Saved ANN index vs exact top-K",
         ylim=(0, 1.02))
  ax.xaxis.set_major_formatter("{x:g}")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize="small", loc="lower left")
  if leaves:
    ax = axes[0, 1]
    notes = []
    for name, (nl, recall, note) in leaves.items():
      ax.plot(nl, recall, marker="o", label=name)
      notes.append(note)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter("{x:g}")
    ax.set(xlabel="leaves_to_search", ylabel="recall@10 vs exact",
           title="ScaNN recall@10 over leaves searched\n" + "; ".join(dict.fromkeys(notes)), ylim=(0, 1.02))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small", loc="lower right")
  return fig


def plot_embedding_map(user_xy, item_xy, item_type=None, type_names: Sequence[str] | None = None,
                       explained=None, title: str = "User and item vectors (PCA)",
                       user_label: str = "users (test)") -> Any:
  """Users and items on the first two principal axes (`pca_2d`); items coloured by content type."""
  fig, axes = _figure(size=(6.4, 5.2))
  ax = axes[0, 0]
  item_xy = np.asarray(item_xy)
  ax.scatter(*np.asarray(user_xy).T, s=6, marker="x", color="0.6", alpha=0.5, label=user_label)
  if item_type is None:
    ax.scatter(*item_xy.T, s=8, color="C0", alpha=0.7, label="items")
  else:
    item_type = np.asarray(item_type)
    for t in np.unique(item_type):
      name = type_names[t - 1] if type_names is not None and 1 <= t <= len(type_names) else f"type {t}"
      sel = item_type == t
      ax.scatter(*item_xy[sel].T, s=9, alpha=0.75, color=f"C{(t - 1) % 10}",
                 label=f"items: {name} ({int(sel.sum())})")
  ev = ("", "") if explained is None else tuple(f" ({100 * e:.0f}% of variance)" for e in explained)
  ax.set(xlabel=f"PC 1{ev[0]}", ylabel=f"PC 2{ev[1]}", title=title)
  ax.legend(fontsize="small", markerscale=2)
  return fig


def make_figures(runs: Sequence[RunData]) -> dict[str, Any]:
  """Every figure the data of ``runs`` supports: name -> Figure (the names are the PNG file names)."""
  figs = {}
  ranked = [r for r in runs if r.ranks is not None]
  if ranked:
    figs["hr_curves"] = plot_hr_curves({r.name: hr_curve(r.ranks) for r in ranked})
  if any(r.curves for r in runs):
    figs["training_curves"] = plot_training_curves({r.name: r.curves for r in runs if r.curves})
  typed = [r for r in runs if r.type_names]
  if typed:
    names = list(dict.fromkeys(t for r in typed for t in r.type_names))
    figs["per_type"] = plot_per_type({r.name: r.results["test"] for r in typed}, names)
  with_ann = [r for r in runs if r.ann is not None]
  if with_ann:
    figs["ann_recall"] = plot_ann_recall({r.name: r.ann for r in with_ann},
                                         {r.name: r.ann_leaves for r in with_ann})
  for i, r in enumerate(runs):
    if r.user_xy is not None:
      key = "embedding_map" if len(runs) == 1 else f"embedding_map_{i}"
      figs[key] = plot_embedding_map(r.user_xy, r.item_xy, r.item_type, r.type_names, r.explained,
                                     title=f"User and item vectors (PCA): {r.name}", user_label=r.user_label)
  return figs


def save_figures(workdir: str, runs: Sequence[RunData] | None = None, out_dir: str | None = None,
                 dpi: int = 100, **collect_kwargs) -> list[str]:
  """Writes `make_figures` as PNG into ``out_dir`` (default ``<workdir>/plots``); returns the paths.

  runs: the runs to draw (default: ``collect_run(workdir, **collect_kwargs)`` alone).
  """
  from mvhan_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  runs = list(runs) if runs is not None else [collect_run(workdir, **collect_kwargs)]
  out = workdir_lib.makedirs(out_dir or workdir_lib.path(workdir) / "plots")
  paths = []
  for name, fig in make_figures(runs).items():
    path = out / f"{name}.png"
    # A file object, not a path: savefig would open() a gs:// path as a local one.
    with path.open("wb") as f:
      fig.savefig(f, format="png", dpi=dpi)
    paths.append(os.fspath(path))
  return paths


def plot_per_scenario(results: Mapping[str, Mapping[str, float]], scenario_names: Sequence[str],
                      metrics: Sequence[str] = ("ctr/AUC", "ctcvr/AUC")) -> Any:
  """Ranking: test AUC per scenario, one bar group per scenario, one bar per (run, metric).

  ``results``: run name -> test metrics with '{task}/AUC/{scenario}' keys (`tasks.ranking.evaluate`).
  """
  fig, axes = _figure(1, len(metrics), size=(5.2, 3.6))
  x = np.arange(len(scenario_names))
  width = 0.8 / max(len(results), 1)
  for ax, metric in zip(axes.flat, metrics):
    for i, (name, res) in enumerate(results.items()):
      vals = [res.get(f"{metric}/{s}", np.nan) for s in scenario_names]
      ax.bar(x + i * width, vals, width, label=name)
    ax.set_xticks(x + width * (len(results) - 1) / 2, scenario_names, rotation=30, ha="right")
    finite = [v for r in results.values() for s in scenario_names if np.isfinite(v := r.get(f"{metric}/{s}", np.nan))]
    if finite:
      ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.05))
    ax.set(ylabel=metric, title=f"Test {metric} per scenario")
    ax.grid(alpha=0.3, axis="y")
  axes.flat[0].legend(fontsize="small")
  return fig


def save_training_figures(workdir: str, compare: Sequence[str] = (), dpi: int = 100) -> list[str]:
  """The figures of a ranking or SEMINAR workdir (and ``compare`` workdirs) into <workdir>/plots:
  training curves (loss, the validation metrics the run logged) and, for ranking, test AUC per
  scenario. Reads metrics.jsonl and results.json only."""
  from mvhan_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  runs = {}
  results = {}
  for w in [workdir, *compare]:
    name = os.path.basename(os.path.normpath(os.fspath(w)))
    runs[name] = read_curves(workdir_lib.path(w))
    path = workdir_lib.path(w) / "results.json"
    if path.exists():
      results[name] = workdir_lib.read_json(path)
  metrics = [m for m in ("train/loss", "psu/loss", "valid/mean/AUC/all", "valid/ctr/AUC/all", "valid/ctcvr/AUC/all",
                         "valid/sampled/NDCG@10", "valid/full/NDCG@10", "valid/full/HR@10")
             if any(m in c for c in runs.values())]
  figs = {"training_curves": plot_training_curves(runs, metrics)}
  scenarios = next((r["scenarios"] for r in results.values() if "scenarios" in r), None)
  if scenarios:
    figs["per_scenario"] = plot_per_scenario({n: r["test"] for n, r in results.items() if "scenarios" in r}, scenarios)
  out_dir = workdir_lib.makedirs(workdir_lib.path(workdir) / "plots")
  paths = []
  for name, fig in figs.items():
    path = out_dir / f"{name}.png"
    with path.open("wb") as f:
      fig.savefig(f, dpi=dpi, format="png")
    paths.append(os.fspath(path))
  return paths
