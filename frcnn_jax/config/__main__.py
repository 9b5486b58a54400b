"""Prints every config key with its value and meaning.

Usage:

  python -m frcnn_jax.config experiments/shapes.py [--config.key=value ...]
  python -m frcnn_jax.config runs/shapes          # a run's config.json
  python -m frcnn_jax.config --upgrade runs/old   # convert a run folder's config.json whose
                                                  # keys predate the plug-in layout (the
                                                  # original is kept as config.legacy.json)
"""

import ast
import os
import sys

from frcnn_jax.config import flags as config_flags
from frcnn_jax.config import legacy
from frcnn_jax.config import printer
from frcnn_jax.config import run as run_config


def main(argv: list[str]) -> None:
  if len(argv) < 1 or argv[0] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if argv else 2)
  if argv[0] == "--upgrade":
    if len(argv) != 2:
      sys.exit("error: usage: python -m frcnn_jax.config --upgrade WORKDIR")
    try:
      renamed = run_config.upgrade_folder(argv[1])
    except (OSError, ValueError) as e:
      sys.exit(f"error: {e}")
    path = run_config.config_path(argv[1])
    print(f"{path}: {legacy.describe(renamed)}; the original is config.legacy.json" if renamed
          else f"{path} uses the current keys; nothing changed")
    return
  target, overrides = argv[0], {}
  try:
    if os.path.isdir(target):
      config = run_config.read(target)
      if config is None:
        sys.exit(f"error: {run_config.config_path(target)} does not exist")
    else:
      config = config_flags.load_config(target)
    for arg in argv[1:]:
      if not arg.startswith("--config.") or "=" not in arg:
        sys.exit(f"error: unexpected argument {arg!r} (expected --config.key=value)")
      key, value = arg[len("--config."):].split("=", 1)
      overrides[key] = _literal(value)
    config_flags.apply_overrides(config, overrides)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(printer.describe(config))


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


if __name__ == "__main__":
  main(sys.argv[1:])
