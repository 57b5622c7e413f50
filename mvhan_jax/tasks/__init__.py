"""Tasks: the plug-ins of the training loop (`mvhan_jax.train`), one per kind of model.

A task is built from a config and supplies:
  stages(workdir)          the `train.Stage`s to run in order (a generator: a later stage may use
                           what an earlier one left in the workdir, e.g. SEMINAR's PSU parameters)
  finish(workdir, metas)   the results of the run: the best checkpoint on valid and test, and what
                           the model serves from (the ScaNN index)
  restore_best(workdir)    (tree, step) of the best checkpoint; evaluate(tree, split) its metrics
  format_results(results)  the table the CLI prints

``config.task`` names the task; a config without the field is retrieval. Building a task first runs
its ``check_config(config)`` (every field it reads, the mesh and the batch split, before any data is
loaded or any folder written): a bad value is a `configs.ConfigError` naming the field and the fix.
"""

from __future__ import annotations

from mvhan_jax import configs

TASKS = ("retrieval", "ranking", "seminar")


def task_name(config) -> str:
  name = config.get("task", "retrieval")
  if name not in TASKS:
    raise configs.ConfigError(f"config.task={name!r} is unknown: use one of {', '.join(TASKS)}")
  return name


def check_training(config) -> None:
  """What only training needs of the config, checked before the data is loaded: every global batch
  splits over the mesh's data axis and the processes (evaluating a trained model on another
  machine does not need it). The task's own ``check_config`` runs when it is built."""
  from mvhan_jax import sharding  # pylint: disable=import-outside-toplevel
  name = task_name(config)
  configs.check_task_fields(config, name)
  if name == "seminar":
    fields = ["train.batch_size"]
    if config.pretrain.enabled and not config.pretrain.checkpoint:
      fields.append("pretrain.batch_size")
  else:
    fields = ["batch_size"]
  sharding.check_batches(config, {f: configs.field(config, f) for f in fields})


def build_task(config, **kwargs):
  """The task object of ``config`` (``kwargs``: e.g. ``data=`` an already loaded dataset)."""
  name = task_name(config)
  if name == "ranking":
    from mvhan_jax.tasks import ranking  # pylint: disable=import-outside-toplevel
    return ranking.RankingTask(config, **kwargs)
  if name == "seminar":
    from mvhan_jax.tasks import seminar  # pylint: disable=import-outside-toplevel
    return seminar.SeminarTask(config, **kwargs)
  from mvhan_jax.tasks import retrieval  # pylint: disable=import-outside-toplevel
  return retrieval.RetrievalTask(config, **kwargs)


def train_and_evaluate(config, workdir, **kwargs):
  """`mvhan_jax.train.train_and_evaluate` of ``config``'s task (``kwargs`` go to the task)."""
  from mvhan_jax import train  # pylint: disable=import-outside-toplevel
  check_training(config)
  return train.train_and_evaluate(build_task(config, **kwargs), workdir)
