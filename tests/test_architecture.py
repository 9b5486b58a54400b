"""The package's import graph: no circle anywhere, and `ops/` free of Flax, config and data."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "frcnn_jax"
# What `frcnn_jax/ops/` may not import: pure jax.numpy functions (docs/architecture.md).
OPS_FORBIDDEN = ("flax", "ml_collections", "frcnn_jax.config", "frcnn_jax.data",
                 "frcnn_jax.models", "frcnn_jax.training")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
  """Every module `path` imports, at any depth of its code (a function's import counts)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        child = f"{node.module}.{alias.name}"
        found.add(child if child in known else node.module)
  return found


def graph() -> dict[str, set[str]]:
  """{module: the package's modules it imports}."""
  known = set(modules())
  return {name: {m for m in imports_of(path, known) if m in known and m != name}
          for name, path in modules().items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, on_stack, stack, found = {}, {}, set(), [], []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in sorted(edges[node]):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(edges):
    if node not in index:
      visit(node)
  return found


def test_the_cycle_finder_finds_cycles():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
  assert cycles(graph()) == []


def test_ops_import_neither_flax_nor_config_nor_data():
  known = set(modules())
  for name, path in modules().items():
    if name.startswith("frcnn_jax.ops"):
      bad = [m for m in imports_of(path, known)
             if any(m == f or m.startswith(f + ".") for f in OPS_FORBIDDEN)]
      assert not bad, f"{name} imports {bad}"


def test_the_package_root_holds_commands_only():
  """Libraries live in subpackages named after their concept; the root keeps the commands."""
  root_modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
  for stem in root_modules:
    assert 'if __name__ == "__main__":' in (PACKAGE / f"{stem}.py").read_text(), stem
