"""Prints every config key with its value and meaning.

Usage:

  python -m frcnn_jax.config experiments/shapes.py [--config.key=value ...]
  python -m frcnn_jax.config runs/shapes          # a run's config.json

One line per key: the dotted key, its value, and the comment that explains it in
frcnn_jax/defaults.py; keys whose value differs from the default show the default too.
"""

import inspect
import io
import os
import sys
import tokenize

import ml_collections

from frcnn_jax import config_flags
from frcnn_jax import defaults
from frcnn_jax import run_config


def key_comments() -> dict[str, str]:
  """{dotted key: comment} from the `c.section.key = value  # comment` lines of defaults.py.

  A comment continued on the next lines (comment-only lines indented past the statements) is
  joined.
  """
  source = inspect.getsource(defaults)
  comment_at = {}      # line number -> (column, text) of the line's comment
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comment_at[token.start[0]] = (token.start[1], token.string.lstrip("#").strip())
  comments: dict[str, str] = {}
  key = None
  for number, line in enumerate(source.splitlines(), 1):
    stripped = line.strip()
    if stripped.startswith("c.") and "=" in stripped:
      key = stripped[2:].split("=", 1)[0].strip()
      if number in comment_at:
        comments[key] = comment_at[number][1]
    elif key and stripped.startswith("#") and comment_at[number][0] > 2 and key in comments:
      comments[key] += " " + comment_at[number][1]
    else:
      key = None
  return comments


def describe(config: ml_collections.ConfigDict) -> str:
  """The table of every key: `key  value  # comment [default: ...]`."""
  comments = key_comments()
  default = run_config.flatten(defaults.get_config())
  values = run_config.flatten(config)
  width = max(len(k) for k in values) + 2
  lines = []
  for key, value in values.items():
    note = comments.get(key, "")
    if key in default and default[key] != value:
      shown = repr(default[key])
      shown = shown if len(shown) <= 40 else shown[:37] + "..."
      note = (note + " " if note else "") + f"[default: {shown}]"
    lines.append(f"{key:<{width}}{value!r}" + (f"    # {note}" if note else ""))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) < 1 or argv[0] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if argv else 2)
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
  print(describe(config))


def _literal(text: str):
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


if __name__ == "__main__":
  main(sys.argv[1:])
