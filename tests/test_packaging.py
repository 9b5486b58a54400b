"""Every command runs after the README's main install (`pip install -e .`, no extras).

The test environment has the extras installed (TensorFlow brings many packages along), so
"it imports fine here" proves nothing. Instead each command runs in a subprocess in which every
installed package that `pip install -e .` would not install (neither a core dependency of
pyproject.toml nor something those require) cannot be imported: optional imports fall back as
they would in a fresh environment, required ones fail the command. `.ci/run` also runs the
commands in a fresh environment installed exactly like the README's main command.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import tomllib

from tests.evaluation.tiny_run import tiny_run  # noqa: F401  pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a module or script as __main__ with the top-level modules in argv[1] unimportable.
_BLOCKED_RUN = textwrap.dedent("""
    import importlib.abc, runpy, sys
    blocked_file, target, *args = sys.argv[1:]
    BLOCKED = set(open(blocked_file).read().split())

    class Hide(importlib.abc.MetaPathFinder):
      # A finder that does not see the blocked packages: they are simply not found.

      def __init__(self, finder):
        self.finder = finder

      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
          return None
        return self.finder.find_spec(name, path, target)

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
    sys.argv = [target, *args]
    if target.endswith(".py"):
      runpy.run_path(target, run_name="__main__")
    else:
      runpy.run_module(target, run_name="__main__", alter_sys=True)
    """)


def _name(requirement: str) -> str:
  return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()


def core_closure() -> set[str]:
  """The distributions `pip install -e .` installs: core dependencies and their own
  requirements (extras' requirements left out), normalised names."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  seen, stack = set(), [_name(r) for r in project["dependencies"]]
  while stack:
    name = stack.pop()
    if name in seen:
      continue
    seen.add(name)
    try:
      requirements = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    stack.extend(_name(r) for r in requirements if "extra ==" not in r)
  return seen


def _commands(tiny_run, tmp_path):
  from tests.evaluation.run_folder import run_folder  # pylint: disable=g-import-not-at-top
  workdir = run_folder(tiny_run, tmp_path)
  commands = [["frcnn_jax.export", "--workdir", str(workdir), "--output",
               str(tmp_path / "model.bin")]]
  for module in ("frcnn_jax.train", "frcnn_jax.evaluate", "frcnn_jax.detect", "frcnn_jax.sweep",
                 "frcnn_jax.config"):
    commands.append([module, "--help"])
  for script in ("benchmark.py", "visualize.py"):
    commands.append([os.path.join(ROOT, "scripts", script), "--help"])
  return commands


def not_installed_by_main_install() -> list[str]:
  """Top-level modules of installed distributions outside `core_closure()`."""
  closure = core_closure() | {"frcnn-jax", "pip", "setuptools", "wheel"}
  blocked = []
  for module, dists in importlib.metadata.packages_distributions().items():
    if module in sys.stdlib_module_names or module.startswith("_distutils"):
      continue
    if not any(_name(d) in closure for d in dists):
      blocked.append(module)
  return sorted(blocked)


def test_every_command_needs_only_the_main_install(tiny_run, tmp_path):
  blocked = not_installed_by_main_install()
  assert "tensorflow" in blocked and "flax" not in blocked   # the premise of this test
  blocked_file = tmp_path / "blocked.txt"
  blocked_file.write_text("\n".join(blocked))
  commands = _commands(tiny_run, tmp_path)
  procs = [subprocess.Popen([sys.executable, "-c", _BLOCKED_RUN, str(blocked_file), *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
           for command in commands]
  for command, proc in zip(commands, procs):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (command, err[-3000:])
  assert (tmp_path / "model.bin").exists()


def test_extras_are_declared():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  assert {"test", "prepare", "torch", "tensorboard"} <= set(extras)
  assert any(_name(r) == "tensorboard" for r in extras["tensorboard"])

