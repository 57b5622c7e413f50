"""The package's import graph: no cycle, and models never depend on the data package.

The graph is read from the source with `ast` (nothing is imported), counting function-level imports
too: a lazy import hides a cycle from Python's import machinery but still ties the modules together.
"""

import ast
import pathlib

import pytest

PACKAGE = "mvhan_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
  """The package modules ``name`` imports, anywhere in its body.

  ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b`` (c is then
  an attribute of it). Importing a submodule also runs its parents' __init__, but those edges are
  left out: ``from mvhan_jax.models import mind`` inside mvhan_jax/models/__init__.py is the usual
  package layout, not a cycle worth reporting.
  """
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        # Relative import: strip `level` trailing parts (a package's own name counts as its level 1).
        anchor = name.split(".")
        anchor = anchor if is_package else anchor[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.add(sub if sub in modules else base)
  return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component with more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, comps = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        comps.append(comp)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return [_path_through(graph, set(c)) for c in comps]


def _path_through(graph, comp: set[str]) -> list[str]:
  """A concrete cycle inside one strongly connected component, for the failure message."""
  start = min(comp)
  prev, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & comp):
        if w == start:
          path = [v]
          while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
          return [start] + path[::-1][1:] + [start]
        if w not in prev:
          prev[w] = v
          nxt.append(w)
    frontier = nxt
  return sorted(comp)


def test_graph_sees_function_level_and_relative_imports():
  graph = _graph()
  # Sanity checks of the parser on imports known to exist, so an empty graph cannot pass.
  assert "mvhan_jax.models.mind" in graph["mvhan_jax.models"]
  assert "mvhan_jax.layers" in graph["mvhan_jax.models.two_tower"]
  assert "mvhan_jax.data.synthetic" in graph["mvhan_jax.ranking.data"]  # imported inside functions


def test_cycle_finder_finds_a_planted_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c", "a"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
  cycles = _cycles(_graph())
  assert not cycles, "import cycles (one per group of modules that import each other):\n" + "\n".join(
      " -> ".join(c) for c in cycles)


def _reachable(graph, start: str) -> dict[str, str]:
  """Every module ``start`` imports directly or through others -> the module that imports it."""
  via, frontier = {}, [start]
  while frontier:
    v = frontier.pop()
    for w in graph[v]:
      if w not in via and w != start:
        via[w] = v
        frontier.append(w)
  return via


def _violations(graph, sources, forbidden) -> dict[str, str]:
  """For each module of ``sources`` that reaches a ``forbidden`` one: the import chain to it."""
  bad = {}
  for name in sorted(graph):
    if not sources(name):
      continue
    via = _reachable(graph, name)
    for dep in sorted(via):
      if forbidden(dep):
        chain = [dep]
        while chain[-1] != name:
          chain.append(via[chain[-1]])
        bad[name] = " -> ".join(chain[::-1])
        break
  return bad


def _in(*packages):
  return lambda name: any(name == p or name.startswith(p + ".") for p in packages)


# The modules that define models: they take a `mvhan_jax.features.DataSpec`, never a dataset.
MODEL_MODULES = ("mvhan_jax.models", "mvhan_jax.ranking.models", "mvhan_jax.seminar.model")
DATA_MODULES = ("mvhan_jax.data", "mvhan_jax.ranking.data", "mvhan_jax.seminar.data")
# Trainers, entry points and whatever loads a trained model.
RUNNERS = ("mvhan_jax.train", "mvhan_jax.main", "mvhan_jax.ranking.train", "mvhan_jax.ranking.main",
           "mvhan_jax.ranking.rerank", "mvhan_jax.ranking.candidates", "mvhan_jax.seminar.train",
           "mvhan_jax.seminar.main")


@pytest.mark.parametrize("package", MODEL_MODULES)
def test_models_do_not_import_the_data_package(package):
  bad = _violations(_graph(), _in(package), _in("mvhan_jax.data"))
  assert not bad, f"model modules depend on the data package (take a features.DataSpec instead): {bad}"


def test_data_modules_import_no_model_and_no_trainer():
  bad = _violations(_graph(), _in(*DATA_MODULES), _in(*MODEL_MODULES, *RUNNERS))
  assert not bad, f"data modules depend on models or trainers (pass what they need as arguments): {bad}"
