"""The package's import graph, read from the source (every import statement, lazy ones included):
no circles, inference never reaches training, and only `tasks/` reads `config.task`."""

import ast
import os
import re

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flowseg_jax")
TRAINING = {"flowseg_jax.train", "flowseg_jax.train_step", "flowseg_jax.train_state"}
# Modules that inference and evaluation are built from: none may import training code.
INFERENCE_SIDE = (
  "flowseg_jax.inference",
  "flowseg_jax.evaluate",
  "flowseg_jax.predict",
  "flowseg_jax.pretrained",
  "flowseg_jax.export",
  "flowseg_jax.serving",
  "flowseg_jax.tasks",
  "flowseg_jax.evaluators",
  "flowseg_jax.models",
  "flowseg_jax.data",
  "flowseg_jax.run",
)


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3]
        name = rel.replace(os.sep, ".").removesuffix(".__init__")
        out[name] = os.path.join(root, f)
  return out


def _imports(path: str, module: str, known: set[str]) -> set[str]:
  """The package modules `module` imports anywhere in its file (a `from X import y` of a
  submodule y counts as importing X.y)."""
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name in known)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.add(sub if sub in known else base)
  return {m for m in out if m in known and m != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(p, m, set(modules)) for m, p in modules.items()}


def _reach(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for nxt in graph[todo.pop()]:
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_no_import_circles(graph):
  circles = sorted(m for m in graph if m in _reach(graph, m))
  assert not circles, f"modules on an import circle: {circles}"


def test_graph_sees_lazy_imports(graph):
  # The checker itself: a function-level import is an edge (tasks.prompted imports
  # tasks.prompts inside a method).
  assert "flowseg_jax.tasks.prompts" in graph["flowseg_jax.tasks.prompted"]


@pytest.mark.parametrize("side", INFERENCE_SIDE)
def test_inference_side_never_imports_training(graph, side):
  for module in (m for m in graph if m == side or m.startswith(side + ".")):
    reached = _reach(graph, module) & TRAINING
    assert not reached, f"{module} imports training code: {sorted(reached)}"


def test_only_tasks_read_config_task():
  pattern = re.compile(r"config\.task\b(?!\s*=[^=])|\.get\(\"task\"|task\.name\s*[=!]=")  # reads
  offenders = []
  for module, path in _modules().items():
    if module.startswith("flowseg_jax.tasks"):
      continue
    for i, line in enumerate(open(path), 1):
      code = line.split("#", 1)[0]
      if pattern.search(code):
        offenders.append(f"{module}:{i}: {line.strip()}")
  assert not offenders, "\n".join(offenders)
