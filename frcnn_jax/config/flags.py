"""Config files and `--config.key=value` overrides, with errors that name the bad key.

Every entry point (`python -m frcnn_jax.train`, `... .evaluate`, sweeps) takes
`--config experiments/X.py` (a file whose `get_config()` returns a locked ConfigDict) and any
number of `--config.section.key=value` overrides (ml_collections config flags; values are
parsed to the type of the default). A misspelt key, a value of the wrong type or a value
outside its allowed set stops the program at start with a message naming the key. Without
`--config`, a `--workdir` holding a run's `config.json` supplies it (frcnn_jax/config/run.py).
`parse_flags` also answers `--help` (exit code 0) and keeps known console noise out.
"""

import difflib
import importlib.util
import logging
import os
import sys
import textwrap
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from frcnn_jax.config import defaults
from frcnn_jax.config import fields
from frcnn_jax.runtime import console
from frcnn_jax.runtime import parallel

ConfigError = fields.ConfigError


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """Defines `--config` (a config file) on `flag_values` and returns its holder."""
  return config_flags.DEFINE_config_file(
      "config", None,
      "Experiment config file (experiments/*.py defining get_config()); override any key "
      "with --config.section.key=value, e.g. --config.train.num_steps=100.",
      flag_values=flag_values, lock_config=True)


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --coordinator_address, --num_processes and --process_id.

  They are the arguments of `frcnn_jax.runtime.parallel.initialize_distributed` (multi-process runs
  outside auto-detected clusters), for the commands that may run on several hosts; a
  combination that does not fit is a usage error when the flags are parsed.
  """
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for "
                      "jax.distributed.initialize (multi-process runs outside auto-detected "
                      "clusters).", flag_values=flag_values)
  flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).",
                       flag_values=flag_values)

  def fits(values: dict[str, Any]) -> bool:
    try:
      parallel.check_distributed_args(values["coordinator_address"], values["num_processes"],
                                      values["process_id"])
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
    return True
  flags.register_multi_flags_validator(("coordinator_address", "num_processes", "process_id"),
                                       fits, flag_values=flag_values)


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
  """Returns a message if `dotted` is not a key of `config`, else None.

  Ours, not ml_collections': its suggestion covers only the last part of the key and its
  locked-config error prints the whole section; this one suggests the full dotted key, at any
  depth, on one line.
  """
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

  Pass as `app.run(main, flags_parser=parse_flags)`. Besides absl's parsing:
  * `--help` (`-h`) prints the command's usage with `--config` and exits 0;
  * without `--config`, a `--workdir` holding a run's `config.json` supplies the config
    (`frcnn_jax/config/run.py`), overrides included; with neither, a one-line error;
  * a tuple key given twice as a whole tuple (`--config.anchors.sizes=(16,32)` then
    `=(64,128)`) takes the last one (ml_collections would concatenate them); one element per
    flag (`--config.data.voc_tfds.years=2007 --config.data.voc_tfds.years=2012`) still builds a
    tuple;
  * orbax INFO records and other known-harmless console noise are filtered (`quiet_logs`);
  * log records reach the console as plain lines, without absl's prefix
    (`console.use_plain_log_lines`).
  """
  argv = list(argv)
  if any(arg in ("--help", "-h", "-?", "--helpshort") for arg in argv[1:]):
    print(usage(flag_values))
    sys.exit(0)
  quiet_logs()
  console.use_plain_log_lines()
  if "config" in flag_values:
    argv = _last_tuple_wins(argv)
    argv = _config_from_workdir(argv)
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
      defaults.validate(flag_values["config"].value)
    except (ConfigError, OSError) as e:  # OSError: the config file failed to load
      sys.exit(f"error: {e}")
  return remaining


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=v` / `--name v` in argv (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _config_from_workdir(argv: list[str]) -> list[str]:
  """Adds `--config=<run_config.py>:WORKDIR` when no --config is given and WORKDIR has a run.

  Exits with a message when there is neither (naming the --workdir that holds no run: missing
  folder, or no config.json in it); a --config file that does not exist exits too.
  """
  from frcnn_jax.config import run as run_config  # pylint: disable=g-import-not-at-top

  path = _flag_value(argv, "config")
  if path is not None:
    file_path = path.partition(":")[0]
    if not os.path.isfile(file_path):
      sys.exit(f"error: config file {file_path!r} does not exist (--config names an "
               "experiments/*.py file)")
    return argv
  workdir = _flag_value(argv, "workdir")
  if workdir and run_config.config_path(workdir).is_file():
    try:
      run_config.read(workdir)
    except run_config.RunConfigError as e:
      sys.exit(f"error: {e}")
    return argv[:1] + [f"--config={os.path.abspath(run_config.__file__)}:{workdir}"] + argv[1:]
  if not workdir:
    sys.exit("error: --config is required (no --workdir with a run's config.json was given): "
             "give an experiment file, e.g. --config experiments/shapes.py\n"
             "Run with --help for usage.")
  why = ("the folder does not exist" if not os.path.isdir(os.path.expanduser(workdir))
         else f"{run_config.config_path(workdir)} does not exist")
  sys.exit(f"error: --workdir {workdir} holds no run: {why}. Give the folder of a training run "
           "(it holds config.json and checkpoints/), or an experiment file with --config, e.g. "
           "--config experiments/shapes.py\nRun with --help for usage.")


def _last_tuple_wins(argv: list[str]) -> list[str]:
  """Keeps only the last `--config.key=value` of a key given more than once as a whole tuple.

  ml_collections joins the values of a repeated tuple flag into one tuple (`=1 =2` -> (1, 2));
  given as whole tuples (`=(16,32) =(64,128)`) that would silently concatenate them.
  """
  values: dict[str, list[int]] = {}
  for i, arg in enumerate(argv):
    if arg.startswith("--config.") and "=" in arg:
      values.setdefault(arg.split("=", 1)[0], []).append(i)
  drop = set()
  for key, positions in values.items():
    whole = [argv[i].split("=", 1)[1].strip()[:1] in ("(", "[") for i in positions]
    if len(positions) > 1 and any(whole):
      drop.update(positions[:-1])
  return [arg for i, arg in enumerate(argv) if i not in drop]


class _QuietFilter(logging.Filter):
  """Drops log records that say nothing a user can act on.

  Orbax's INFO records (about 200 per shapes run, 30 per evaluation), its warnings about the
  read-only checkpoint manager that evaluation opens on purpose, and JAX's note that it found
  no TPU library when it probes the backends on a CPU or GPU machine. Orbax's other warnings
  and all errors pass.
  """

  _HARMLESS = ("CheckpointManagerOptions.read_only=True", "Given directory is read only",
               "could not be restored. Please provide a `CheckpointHandlerRegistry`")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
      return True
    path = record.pathname
    if f"{os.sep}orbax{os.sep}" in path:
      return record.levelno >= logging.WARNING and not any(
          h in record.getMessage() for h in self._HARMLESS)
    if path.endswith("xla_bridge.py") and record.levelno < logging.WARNING:
      return not record.getMessage().startswith("Unable to initialize backend")
    return True


def quiet_logs() -> None:
  """Installs `_QuietFilter` on absl's handler and on the root logger's handlers (idempotent)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  handlers = [absl_logging.get_absl_handler(), *logging.getLogger().handlers]
  for handler in handlers:
    if not any(isinstance(f, _QuietFilter) for f in handler.filters):
      handler.addFilter(_QuietFilter())


def usage(flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """The command's usage: its module docstring, its flags, `--config` and the overrides."""
  main = sys.modules.get("__main__")
  doc = ((getattr(main, "__doc__", None) or "").strip() + "\n") if main else ""
  names = {f.name for f in flag_values.get_flags_for_module(sys.argv[0])}
  if main is not None and getattr(main, "__file__", None):
    names |= {f.name for f in flag_values.get_flags_for_module(main.__file__)}
  names |= {f.name for f in flag_values.get_flags_for_module(__name__)} - {"config"}
  entries = []
  if "config" in flag_values:
    entries.append(("--config", "Experiment config file (experiments/X.py[:arg]). Optional when "
                    "--workdir holds a run's config.json: the run's config is then used "
                    "(frcnn_jax/config/run.py)."))
    entries.append(("--config.KEY=VALUE", "Override one config key, e.g. "
                    "--config.train.num_steps=100. Every key with its value and meaning: "
                    "python -m frcnn_jax.config experiments/X.py"))
  for name in sorted(names):
    flag = flag_values[name]
    default = "" if flag.default is None else f" (default: {flag.default_as_str})"
    entries.append((f"--{name}", f"{flag.help}{default}"))
  lines = [doc, "flags:"]
  for name, text in entries:
    lines.append(textwrap.fill(f"{name}: {text}", width=100, initial_indent="  ",
                               subsequent_indent="      "))
  return "\n".join(lines)


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
  defaults.validate(config)
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
  """Sets dotted keys in place, type-checked against the existing values.

  One key at a time through `ConfigDict.update_from_flattened_dict`, so that an error names
  the key: ml_collections walks the dotted path, type-checks the value against the locked
  config (a placeholder against its declared type) and turns a list into a tuple and an int
  into a float where the default is one. Checked here first: the key exists (`_missing_key`),
  a bool and a non-bool never stand for each other (no config key takes both a bool and a number),
  and None does not replace a value (ml_collections accepts both: bool is an int, and None
  overrides anything).

  Raises:
    ConfigError: unknown key, or a value of the wrong type (the message names the key).
  """
  for key, value in overrides.items():
    missing = _missing_key(config, key)
    if missing:
      raise ConfigError(missing)
    current = config[key]   # ConfigDict reads a dotted key
    if isinstance(current, bool) != isinstance(value, bool) or (
        current is not None and value is None):
      expected = "a value that is not a bool" if current is None else type(current).__name__
      raise ConfigError(f"config key {key!r} expects {expected}, got {value!r} "
                        f"({type(value).__name__})")
    try:
      config.update_from_flattened_dict({key: value})
    except (KeyError, TypeError, ValueError) as e:
      reason = str(e).strip("'\"")
      raise ConfigError(f"config key {key!r}: {reason}") from e
