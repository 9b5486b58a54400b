"""The commands in scripts/ are thin: no sys.path edits, no script importing another, no
other module's private names, each under 400 lines."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
NAMES = sorted(n for n in os.listdir(SCRIPTS) if n.endswith(".py"))
MAX_LINES = 400


def _tree(name: str) -> ast.Module:
  with open(os.path.join(SCRIPTS, name)) as f:
    return ast.parse(f.read(), name)


def test_there_are_scripts():
  assert "benchmark.py" in NAMES and "accelerator_check.py" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_script_is_short(name):
  with open(os.path.join(SCRIPTS, name)) as f:
    assert len(f.read().splitlines()) <= MAX_LINES, name


@pytest.mark.parametrize("name", NAMES)
def test_script_leaves_sys_path_alone(name):
  for node in ast.walk(_tree(name)):
    if isinstance(node, ast.Attribute) and node.attr == "path":
      assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), (
          f"{name}:{node.lineno} uses sys.path")


@pytest.mark.parametrize("name", NAMES)
def test_script_imports_no_other_script(name):
  others = {n[:-3] for n in NAMES}
  for node in ast.walk(_tree(name)):
    if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "spec_from_file_location":
      pytest.fail(f"{name}:{node.lineno} loads a file as a module")
    if isinstance(node, ast.Import):
      modules = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      modules = [node.module or ""] + [a.name for a in node.names if not node.module]
    else:
      continue
    for module in modules:
      assert module.split(".")[0] not in others, f"{name}:{node.lineno} imports {module}"


@pytest.mark.parametrize("name", NAMES)
def test_script_uses_no_private_names_of_other_modules(name):
  tree = _tree(name)
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
      if isinstance(node, ast.ImportFrom):
        assert not any(a.name.startswith("_") for a in node.names), (name, node.lineno)
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
        and node.value.id in imported and node.value.id != "os"):
      pytest.fail(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
