"""Config files and `--config.key=value` overrides, with errors that name the bad key.

Every entry point (`python -m frcnn_jax.train`, `... .evaluate`, sweeps) takes
`--config experiments/X.py` (a file whose `get_config()` returns a locked ConfigDict) and any
number of `--config.section.key=value` overrides (ml_collections config flags; values are
parsed to the type of the default). A misspelt key, a value of the wrong type or a value
outside its allowed set stops the program at start with a message naming the key.
"""

import difflib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

# Allowed values of the string keys this project interprets (checked by `validate_config`).
CHOICES = {
    "data.name": ("shapes", "voc_tfds", "voc_folder", "coco_json"),
    "data.bad_input": ("skip", "error"),
    "model.input_norm": ("caffe", "torchvision"),
    "model.rpn_objectness": ("softmax", "sigmoid"),
    "model.roi_op": ("roi_pool", "roi_align"),
    "model.dtype": ("float32", "bfloat16"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("piecewise", "cosine"),
    "train.nonfinite": ("error", "skip"),
    "eval.metric": ("voc07", "voc12", "coco"),
}
# Keys that must be >= the given bound.
LOWER_BOUNDS = {
    "train.num_steps": 1, "train.batch_size": 1, "train.learning_rate": 0.0,
    "train.weight_decay": 0.0, "train.momentum": 0.0, "train.warmup_steps": 0,
    "train.grad_clip_norm": 0.0, "train.grad_accum_steps": 1, "train.checkpoint_every": 1,
    "train.keep_checkpoints": 1, "train.log_every": 1, "train.eval_every": 0,
    "eval.batch_size": 1, "model.width": 0.0, "model.fc_dim": 1,
}


class ConfigError(ValueError):
  """A config key or value is invalid; the message names the key."""


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """Defines `--config` (a config file) on `flag_values` and returns its holder."""
  return config_flags.DEFINE_config_file(
      "config", None,
      "Experiment config file (experiments/*.py defining get_config()); override any key "
      "with --config.section.key=value, e.g. --config.train.num_steps=100.",
      flag_values=flag_values, lock_config=True)


def get_config_path(flag: flags.Flag) -> str:
  """The value given to `--config` (`flags.FLAGS["config"]`): a file, maybe with `:argument`."""
  return config_flags.get_config_filename(flag)


def _override_keys(argv: Sequence[str]) -> list[str]:
  """Returns the dotted keys of the `--config.a.b=value` arguments in `argv`."""
  keys = []
  for arg in argv:
    if arg.startswith("--config."):
      keys.append(arg[len("--config."):].split("=", 1)[0])
  return keys


def _missing_key(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """Returns a message if `dotted` is not a key of `config`, else None."""
  node: Any = config
  walked = []
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      options = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, Mapping)) else []
      close = difflib.get_close_matches(part, options, n=1)
      hint = f" (did you mean {'.'.join(walked + close)!r}?)" if close else ""
      return f"unknown config key {dotted!r}{hint}"
    walked.append(part)
    node = node[part]
  return None


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` like absl, exiting with a one-line error naming a bad config key or value.

  Pass as `app.run(main, flags_parser=parse_flags)`.
  """
  try:
    remaining = flag_values(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nRun with --help for usage.")
  except (AttributeError, KeyError, TypeError) as e:
    message = str(e).strip("'\"")
    config = _load_quietly(argv)
    if config is not None:
      for key in _override_keys(argv):
        missing = _missing_key(config, key)
        if missing:
          message = missing
          break
    sys.exit(f"error: {message}\nRun with --help for usage.")
  if "config" in flag_values and flag_values["config"].value is not None:
    try:
      validate_config(flag_values["config"].value)
    except (ConfigError, OSError) as e:  # OSError: the config file failed to load
      sys.exit(f"error: {e}")
  return remaining


def _load_quietly(argv: Sequence[str]) -> ml_collections.ConfigDict | None:
  """Loads the `--config` file named in `argv`, or None if that fails."""
  for i, arg in enumerate(argv):
    path = None
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    if path:
      try:
        return load_config(path)
      except Exception:  # pylint: disable=broad-except  # only used to improve a message
        return None
  return None


def load_config(path: str, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file and applies dotted-key overrides.

  Args:
    path: a Python file defining `get_config()`; `file.py:arg` calls `get_config("arg")`.
    overrides: {"train.num_steps": 100, ...}.

  Returns:
    The locked, validated config.

  Raises:
    ConfigError: unknown key, wrong type or disallowed value (the message names the key).
    FileNotFoundError: `path` does not exist.
  """
  file_path, has_arg, arg = path.partition(":")
  module = load_module(file_path)
  config = module.get_config(arg) if has_arg else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return a ConfigDict, got {type(config)}")
  config.lock()
  apply_overrides(config, overrides or {})
  validate_config(config)
  return config


def load_module(path: str):
  """Imports a Python file by path (config and sweep files)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  name = "_frcnn_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets dotted keys in place, type-checked against the existing values."""
  for key, value in overrides.items():
    missing = _missing_key(config, key)
    if missing:
      raise ConfigError(missing)
    parent_key, _, leaf = key.rpartition(".")
    parent = config
    for part in parent_key.split(".") if parent_key else ():
      parent = parent[part]
    current = parent[leaf]
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(current, bool) != isinstance(value, bool) or (
        isinstance(current, (int, float)) and not isinstance(value, (int, float))):
      raise ConfigError(f"config key {key!r} expects {type(current).__name__}, got "
                        f"{value!r} ({type(value).__name__})")
    try:
      parent[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config key {key!r}: {e}") from e


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks value ranges and choices of the keys in `CHOICES` / `LOWER_BOUNDS`.

  Raises:
    ConfigError: naming the first bad key.
  """
  def get(key):
    node = config
    for part in key.split("."):
      if part not in node:
        return None
      node = node[part]
    return node

  for key, allowed in CHOICES.items():
    value = get(key)
    if value is not None and value not in allowed:
      raise ConfigError(f"config key {key!r} must be one of {allowed}, got {value!r}")
  for key, bound in LOWER_BOUNDS.items():
    value = get(key)
    if value is not None and value < bound:
      raise ConfigError(f"config key {key!r} must be >= {bound}, got {value!r}")
  momentum = get("train.momentum")
  if momentum is not None and momentum >= 1:
    raise ConfigError(f"config key 'train.momentum' must be < 1, got {momentum!r}")
  boundaries = get("train.lr_boundaries")
  if boundaries is not None and list(boundaries) != sorted(boundaries):
    raise ConfigError(f"config key 'train.lr_boundaries' must be ascending, got {boundaries}")
