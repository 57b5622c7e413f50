"""The config vocabulary: every experiments/configs file's args, configs.parse_args / sibling / apply_overrides."""

from __future__ import annotations

import ast
import glob
import os
import re

import ml_collections
import pytest

from mvhan_jax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "experiments", "configs")
CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))

# Each file's args with an example value (None: a flag), chosen to differ from the default so that a
# silently ignored arg shows up as an unchanged config. Must list exactly the file's ARGS.
_MIND = {"model": "comirec_sa", "K": "2", "power": "2.0", "axis": "behaviours", "smoke": None, "recency": None}
_ML1M = {"dataset": "ml1m"}  # MovieLens configs only
_MULTITOWER = {"extractor": "comirec_sa", "K": "2", "tower": "single", "readout": "argmax", "score": "lse",
               "lse_t": "0.5", "repel": "infonce", "lam": "0.3", "margin": "0.1", "protocol": "comirec",
               "epochs": "3", "smoke": None}
_MVHAN = {"model": "mv_dnn", "typed": None, "pooled": None, "single": "2", "light": None,
          "exclusive_embeddings": None, "fel_per_type": None, "mlp": None, "learn_temperature": None,
          "smoke": None, "tokens": "5", "steps": "3000"}
_SEMINAR = {"nopretrain": None, "no_next": None, "no_align": None, "no_rel": None, "attention": "pq",
            "eval_attention": "pq", "freeze": None}
EXAMPLES = {
    "two_tower_ml100k": {"recency": None, "smoke": None, **_ML1M},
    "two_tower_synthetic": {"recency": None, "smoke": None},
    "hinet_ml100k": {"model": "ple", "negatives": "retrieval", "no_san": None, "no_specific": None,
                     "shared_tower": None, "smoke": None},
    "hinet_synthetic": {"model": "star", "no_san": None, "no_specific": None, "shared_tower": None, "smoke": None},
    "interactions": {"model": "mind", "smoke": None},
    "mind_ml100k": {**_MIND, **_ML1M},
    "mind_synthetic": {**_MIND, "model": "two_tower"},
    "mind_synthetic_1m": _MIND,
    "multitower_ml100k": {**_MULTITOWER, **_ML1M},
    "multitower_synthetic": {**_MULTITOWER, "protocol": "comirec"},
    "mvhan_ml100k": {**_MVHAN, **_ML1M, "softmax": "sampled", "behaviour": "causal", "sasrec_paths": None,
                     "gate": None, "head_lr": "0.1", "head_wd": "1.0", "sasrec_init": "frozen",
                     "sasrec_lr": "0.1,sasrec_init=tuned"},  # sasrec_lr= needs a tuned SASRec part
    "mvhan_synthetic": {**{k: v for k, v in _MVHAN.items() if k != "steps"}, "softmax": "sampled"},
    "sasrec_ml100k": {"blocks": "2", "heads": "2", "dim": "32", "dropout": "0.5", "maxlen": "200", "norm": "post",
                      "positions": "recency", "loss": "last", "examples": "prefixes", "temperature": "0.05",
                      "softmax": "full", "steps": "2000", "smoke": None, **_ML1M},
    "seminar_ml100k": {**_SEMINAR, **_ML1M},
    "seminar_synthetic": {**_SEMINAR, "smoke": None},
}
# Examples that name the default on purpose (the arg exists to say it explicitly).
SAME_AS_DEFAULT = {("mvhan_ml100k", "pooled"), ("mvhan_synthetic", "typed"), ("mvhan_synthetic", "softmax"), ("multitower_synthetic", "protocol")}


def _load(name: str, arg: str = "") -> ml_collections.ConfigDict:
  return configs.load_config(os.path.join(CONFIG_DIR, f"{name}.py") + (f":{arg}" if arg else ""))


def _module(name: str):
  return configs.sibling(os.path.join(CONFIG_DIR, f"{name}.py"), name)


def test_every_config_file_has_examples():
  assert sorted(EXAMPLES) == CONFIG_FILES
  for name in CONFIG_FILES:
    known = {a.rstrip("=") for a in _module(name).ARGS}
    assert set(EXAMPLES[name]) == known, name
    for arg, value in EXAMPLES[name].items():  # flags and valued args as ARGS declares them
      assert (arg + "=" in _module(name).ARGS) == (value is not None), (name, arg)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_loads_with_no_args_and_each_arg(name):
  default = _load(name).to_dict()
  for arg, value in EXAMPLES[name].items():
    cfg = _load(name, arg if value is None else f"{arg}={value}")
    if (name, arg) not in SAME_AS_DEFAULT:
      assert cfg.to_dict() != default, f"{name}.py:{arg} left the config unchanged"


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_rejects_a_typo(name):
  with pytest.raises(ValueError, match=rf"{name}\.py.*'smok'.*known:.*smoke" if "smoke" in EXAMPLES[name]
                     else rf"{name}\.py.*'smok'.*known:"):
    _load(name, "smok")
  with pytest.raises(ValueError, match=rf"{name}\.py.*'modle=x'"):
    _load(name, "modle=x")


# Combinations the tests and table scripts pass (their specs are built in code, so the scan below misses them).
COMBINATIONS = [
    ("mind_ml100k", "model=mind,smoke"), ("mind_synthetic", "model=two_tower,smoke"),
    ("mvhan_ml100k", "smoke,typed,learn_temperature"), ("mvhan_ml100k", "smoke,model=two_tower"),
    ("mvhan_ml100k", "model=two_tower,single=3,light"), ("mvhan_synthetic", "typed,fel_per_type,light"),
    ("mvhan_synthetic", "model=two_tower,pooled,light"), ("seminar_synthetic", "smoke,attention=pq"),
    ("multitower_ml100k", "extractor=comirec_sa,readout=serve,repel=hinge,protocol=comirec,epochs=4"),
    ("multitower_synthetic", "tower=single,extractor=mind,epochs=2"), ("hinet_synthetic", "model=hinet,shared_tower"),
    ("mind_synthetic_1m", "model=mind,K=4,smoke"), ("two_tower_synthetic", "recency,smoke"),
    ("two_tower_ml100k", "recency,dataset=ml1m"), ("mind_ml100k", "model=mind,K=1,dataset=ml1m"),
    ("mind_ml100k", "model=comirec_sa,dataset=ml1m"), ("mind_ml100k", "model=comirec_dr,dataset=ml1m"),
    ("mvhan_ml100k", "smoke,dataset=ml1m"), ("mind_ml100k", "model=mind,recency,dataset=ml1m"),
    ("mind_ml100k", "model=mind,K=1,recency,dataset=ml1m"),
]


@pytest.mark.parametrize("name,arg", COMBINATIONS)
def test_combinations_load(name, arg):
  assert _load(name, arg).to_dict() != _load(name).to_dict()


def test_mind_recency_is_refused_for_comirec():
  assert _load("mind_ml100k", "recency").model.recency_weights
  with pytest.raises(ValueError, match="recency.*use it with model=mind, not model=comirec_sa"):
    _load("mind_ml100k", "model=comirec_sa,recency")


def _documented_specs():
  """Every 'file.py:args' written in the docs, scripts, tests and launch files (f-string templates aside)."""
  paths = ["README.md", "WORKSPACE.md", *glob.glob("launch/*"), *glob.glob("experiments/**/*.py", recursive=True),
           *glob.glob("experiments/**/*.md", recursive=True), *glob.glob("experiments/*.sh"),
           *glob.glob("tests/*.py"), *glob.glob("mvhan_jax/**/*.py", recursive=True)]
  pattern = re.compile(r"(\w+)\.py:([A-Za-z0-9_=.,-]++)(?![{|<])")
  specs = set()
  for path in paths:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      for name, arg in pattern.findall(f.read()):
        if name in CONFIG_FILES:
          specs.add((name, arg.rstrip(".,")))
  return sorted(specs)


def test_documented_specs_load():
  specs = _documented_specs()
  assert ("two_tower_ml100k", "recency,smoke") in specs and ("hinet_ml100k", "model=hinet,negatives=retrieval") in specs
  for name, arg in specs:
    if (name, arg) == ("hinet_ml100k", "model=mmoe,no_san"):  # tests/test_hinet.py: the documented refusal
      with pytest.raises(ValueError, match="model=hinet"):
        _load(name, arg)
      continue
    _load(name, arg)


def test_parse_args():
  known = ("model=", "K=", "smoke")
  assert configs.parse_args("model=mind,K=4,smoke", known, "x.py") == {"model": "mind", "K": "4", "smoke": ""}
  assert configs.parse_args(None, known, "x.py") == {} == configs.parse_args("", known, "x.py")
  assert configs.format_args({"model": "mind", "smoke": ""}) == "model=mind,smoke"
  assert configs.parse_args(configs.format_args({"K": "1", "smoke": ""}), known, "x.py") == {"K": "1", "smoke": ""}
  for bad, match in (("smok", r"x\.py: unknown config arg\(s\) \['smok'\]; known: K=, model=, smoke"),
                     ("smoke=1", "'smoke' is a flag"), ("model", "'model' needs a value"),
                     ("K=1,K=2", "'K' given twice")):
    with pytest.raises(ValueError, match=match):
      configs.parse_args(bad, known, "/some/dir/x.py")


def test_sibling():
  module = configs.sibling(os.path.join(CONFIG_DIR, "mind_ml100k.py"), "two_tower_ml100k")
  assert module.get_config("smoke").total_steps == 120
  with pytest.raises(FileNotFoundError, match="two_tower_ml100"):
    configs.sibling(os.path.join(CONFIG_DIR, "mind_ml100k.py"), "two_tower_ml100")


def test_apply_overrides_sets_nested_fields_with_their_types():
  cfg = _load("mind_synthetic")
  items = ["num_epochs=3", "optimizer.lr=1", "optimizer.weight_decay=1e-5", "model.hidden=(128", "64)",
           "model.normalize=False", "loss.sampler=uniform", "dataset.content_type=article",
           "dataset.world.zipf_exponent=0.8", "dataset.world.num_items=10000", "select_metric=3"]
  assert configs.apply_overrides(cfg, items) is cfg
  assert cfg.num_epochs == 3 and isinstance(cfg.num_epochs, int)
  assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
  assert cfg.optimizer.weight_decay == 1e-5
  assert cfg.model.hidden == (128, 64)
  assert cfg.model.normalize is False
  assert cfg.loss.sampler == "uniform"
  assert cfg.dataset.content_type == "article"
  assert cfg.dataset.world.zipf_exponent == 0.8 and cfg.dataset.world.num_items == 10000
  assert cfg.select_metric == "3"  # a string field keeps the text
  assert configs.apply_overrides(cfg, []) is cfg


@pytest.mark.parametrize("item,match", [
    ("model.dimm=3", r"model has no field 'dimm'; its fields: .*dim"),
    ("nope=1", r"the config has no field 'nope'"),
    ("dataset.world.zipf=1.0", r"dataset.world has no field 'zipf'"),
    ("seed.x=1", r"seed has no field 'x' \(seed is not a ConfigDict\)"),
    ("num_epochs=2.5", r"override 'num_epochs=2.5'.*int"),
    ("num_epochs", r"expected 'field.path=value'"),
])
def test_apply_overrides_rejects(item, match):
  with pytest.raises(ValueError, match=match):
    configs.apply_overrides(_load("mind_synthetic"), [item])


def test_scripts_share_the_override_flag_and_import_the_installed_package():
  for path in glob.glob(os.path.join(ROOT, "experiments", "*.py")):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    assert "sys.path.insert" not in text, path
    if path.endswith("_table.py"):
      assert 'flags.DEFINE_list("override"' in text and "configs.apply_overrides" in text, path
      assert not re.search(r'DEFINE_\w+\("(overrides|extra|world)"', text), path


def test_dataset_ml1m_schedule():
  c = _load("two_tower_ml100k", "dataset=ml1m")
  assert c.dataset.name == "movielens_1m" and c.num_epochs == 4
  assert c.eval_every_steps == c.checkpoint_every_steps == 1919  # half of ceil(982,089 / 256) = 3,837
  assert _load("mvhan_ml100k", "dataset=ml1m").num_epochs == 2
  assert _load("multitower_ml100k", "dataset=ml1m,epochs=3").num_epochs == 3  # epochs= still wins
  smoke = _load("mind_ml100k", "smoke,dataset=ml1m")
  assert smoke.total_steps == 120 and smoke.eval_every_steps == _load("mind_ml100k", "smoke").eval_every_steps
  assert _load("two_tower_ml100k", "dataset=ml100k").to_dict() == _load("two_tower_ml100k").to_dict()
  with pytest.raises(ValueError, match=r"mind_ml100k\.py: config arg dataset='ml20m' is unknown: use ml100k or ml1m"):
    _load("mind_ml100k", "dataset=ml20m")
  with pytest.raises(ValueError, match=r"'dataset=ml1m'.*known:"):
    _load("mind_synthetic", "dataset=ml1m")


def test_numeric_config_arg_that_is_not_a_number_is_named():
  with pytest.raises(configs.ConfigError, match=r"mvhan_ml100k.py: config arg tokens='x' is not an integer"):
    _load("mvhan_ml100k", "tokens=x")
  with pytest.raises(configs.ConfigError, match=r"sasrec_ml100k.py: config arg dropout='high' is not a number"):
    _load("sasrec_ml100k", "dropout=high")
  with pytest.raises(configs.ConfigError, match=r"tokens=-1 needs model=mvhan or mv_dnn and a value >= 0"):
    _load("mvhan_ml100k", "tokens=-1")
  with pytest.raises(configs.ConfigError, match=r"tokens=5 needs model=mvhan or mv_dnn"):
    _load("mvhan_ml100k", "model=two_tower,tokens=5")
  assert _load("mvhan_ml100k", "tokens=5").model.num_behaviour_tokens == 5
  assert _load("mvhan_ml100k", "light,tokens=5").model.num_behaviour_tokens == 5
  assert _load("mvhan_ml100k", "light").model.num_behaviour_tokens == 10
  assert _load("sasrec_ml100k", "dropout=0.5").model.dropout == 0.5


def test_mvhan_sasrec_paths_and_steps():
  paths = _load("mvhan_ml100k", "sasrec_paths")
  assert paths.to_dict() == _load("mvhan_ml100k", "behaviour=causal,sasrec_paths").to_dict()
  causal = _load("mvhan_ml100k", "behaviour=causal")
  changed = {k for k in paths.model if paths.model[k] != causal.model[k]}
  assert changed == {"user_id_token", "dropout", "last_token_readout", "item_id_residual"}
  assert (paths.model.user_id_token, paths.model.dropout, paths.model.last_token_readout,
          paths.model.item_id_residual) == (False, 0.2, True, True)
  assert causal.total_steps == 4000 and causal.eval_every_steps == 400
  long = _load("mvhan_ml100k", "sasrec_paths,steps=12000,dataset=ml1m")
  assert (long.total_steps, long.eval_every_steps, long.checkpoint_every_steps) == (12000, 1200, 1200)
  assert long.dataset.name == "movielens_1m"
  with pytest.raises(configs.ConfigError, match=r"sasrec_paths is a setting of behaviour=causal, not of behaviour=tokens"):
    _load("mvhan_ml100k", "behaviour=tokens,sasrec_paths")
  gate = _load("mvhan_ml100k", "sasrec_paths,gate")
  assert gate.model.sasrec_gate and not paths.model.get("sasrec_gate", False) and gate.model.behaviour_encoder == "causal"
  with pytest.raises(configs.ConfigError, match=r"gate is a setting of behaviour=causal"):
    _load("mvhan_ml100k", "behaviour=tokens,gate")
  frozen = _load("mvhan_ml100k", "sasrec_paths,sasrec_init=frozen,steps=12000,dataset=ml1m")
  assert frozen.model.sasrec_gate and frozen.warm_start.freeze
  assert frozen.warm_start.workdir.startswith("runs/ml1m_table/") and frozen.warm_start.workdir.endswith("/seed{seed}")
  assert not _load("mvhan_ml100k", "sasrec_init=tuned").warm_start.freeze
  with pytest.raises(configs.ConfigError, match=r"sasrec_init='fixed' is unknown: use 'frozen' or 'tuned'"):
    _load("mvhan_ml100k", "sasrec_init=fixed")
  with pytest.raises(configs.ConfigError, match=r"steps=0 must be >= 1"):
    _load("mvhan_ml100k", "steps=0")
  with pytest.raises(configs.ConfigError, match=r"sasrec_ml100k.py: steps=0 must be >= 1"):
    _load("sasrec_ml100k", "steps=0")
  c = _load("sasrec_ml100k", "steps=2000")
  assert (c.total_steps, c.eval_every_steps, c.checkpoint_every_steps) == (2000, 200, 200)


@pytest.mark.parametrize("script", ["ml100k_table", "ml1m_table"])
def test_results_table_rows_name_configs_that_load(script):
  # Each row of the results-table scripts is a config spec (or None: no training); a spec that no
  # longer loads would fail only hours into a table run. Read from the script's source (importing it
  # would define its absl flags twice).
  tree = ast.parse(open(os.path.join(ROOT, "experiments", f"{script}.py")).read())
  models = next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "MODELS")
  names = [name for name, _ in models.values()]
  assert len(set(names)) == len(names), "two rows share a name"
  specs = [spec for _, spec in models.values() if spec is not None]
  assert specs
  for spec in specs:
    path, _, arg = spec.partition(":")
    cfg = configs.load_config(os.path.join(ROOT, path) + (f":{arg}" if arg else ""))
    assert cfg.dataset.name == ("movielens_1m" if script == "ml1m_table" else "movielens_100k"), spec
