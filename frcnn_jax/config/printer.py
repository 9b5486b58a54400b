"""The table of every config key with its value and meaning (`python -m frcnn_jax.config`).

Usage:

  python -m frcnn_jax.config experiments/shapes.py [--config.key=value ...]
  python -m frcnn_jax.config runs/shapes          # a run's config.json

One line per key: the dotted key, its value, and the comment that explains it in
frcnn_jax/config/defaults.py; keys whose value differs from the default show the default too.
"""

import inspect
import io
import tokenize

import ml_collections

from frcnn_jax.config import defaults
from frcnn_jax.config import run as run_config


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
