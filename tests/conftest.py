"""Suite-wide settings: cheap XLA compiles, and the slow end-to-end tests first.

Most of the suite's time is XLA compiling many small programs; its backend optimisations cost
more compile time there than they save at run time, and the tests check values, not speed.
They are off for the tests and the processes they start (a test that sets XLA_FLAGS for a
child replaces them). A claim that holds only for XLA's default optimisation (a bitwise
equality that depends on its constant folding) is checked in a child with the default flags
(`DEFAULT_COMPILE_ENV`).

With `pytest -n 2` the workers take tests in collection order; the multi-process and
end-to-end runs (marked `slow`) at the end of the collection otherwise leave one worker busy
while the other idles. Starting them first lets the short tests fill in around them.
"""

import os

CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The flags before the cheap ones, kept in the environment: xdist's workers inherit the
# controller's environment, which this file has already changed.
os.environ.setdefault("FRCNN_TESTS_DEFAULT_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
DEFAULT_XLA_FLAGS = os.environ["FRCNN_TESTS_DEFAULT_XLA_FLAGS"]
DEFAULT_COMPILE_ENV = dict(os.environ, XLA_FLAGS=DEFAULT_XLA_FLAGS)
os.environ["XLA_FLAGS"] = f"{DEFAULT_XLA_FLAGS} {CHEAP_COMPILE}".strip()


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
