"""The table of every config key with its value and meaning (`python -m frcnn_jax.config`)."""

import ml_collections

from frcnn_jax.config import defaults
from frcnn_jax.config import fields
from frcnn_jax.config import run as run_config


def describe(config: ml_collections.ConfigDict) -> str:
  """One line per key: `key  value  # meaning [role] [default: ...]`, from the declarations."""
  declared = defaults.sections()
  default = run_config.flatten(defaults.get_config())
  values = run_config.flatten(config)
  width = max(len(k) for k in values) + 2
  lines = []
  for key, value in values.items():
    field = fields.find(declared, key)
    note = field.metadata["help"] if field is not None else ""
    if field is not None and field.metadata["role"] != "fixed":
      note += f" [{field.metadata['role']}]"
    if key in default and default[key] != value:
      shown = repr(default[key])
      shown = shown if len(shown) <= 40 else shown[:37] + "..."
      note = (note + " " if note else "") + f"[default: {shown}]"
    lines.append(f"{key:<{width}}{value!r}" + (f"    # {note}" if note else ""))
  return "\n".join(lines)
