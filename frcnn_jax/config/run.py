"""The run folder decides: a trained run's config, read back from `WORKDIR/config.json`.

`train` writes the config it ran with to `WORKDIR/config.json`. `evaluate`, `detect`, `export`
and `scripts/visualize.py` take that config by default (`--config` is optional), so they build
the network the parameters were trained for. What a command may still change is split by key:

* test-time keys (role "test" in their declaration: test.*, eval.metric, the RPN's test-time
  top-n, the eval split, the test scale ...): allowed; each change is an *override*, recorded
  in the output's name and contents (`eval/test-<step>-<tag>.json` with an "overrides" field);
* local keys (role "local": where the data lives, worker counts, batch size): they do not
  change a result; taken from the command line, never from another config file;
* training-only keys (role "training": train.*, seed, the sampling of RPN / RoI targets ...):
  they cannot change a result either; the run's values are kept and a change is reported;
* every other key shapes the model or its decoding (role "fixed": the backbone's keys, the
  class names, roi.box_weights ...): a change is an error naming the key.

`--config FILE` is still accepted; its keys go through the same rules, compared with the
run's `config.json`. A workdir without `config.json` (made by hand or by an older version)
takes `--config` as is.

`python -m frcnn_jax.evaluate --workdir W --config.test.nms_threshold=0.4` works without a
config file: `config_flags.parse_flags` then loads this file as the config
(`--config=<this file>:W`, see `get_config`), so the usual override parsing applies.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import ml_collections

from frcnn_jax.config import defaults
from frcnn_jax.config import fields
from frcnn_jax.config import legacy
from frcnn_jax.runtime import atomic_io

CONFIG_FILE = "config.json"

class RunConfigError(ValueError):
  """The run's config cannot be read, or a command changes a key fixed by the run."""


def _allowed() -> str:
  return ", ".join(key for key in flatten(defaults.get_config()) if kind_of(key) == "test")


def kind_of(key: str) -> str:
  """The role of a dotted key (`fields.ROLES`): "fixed" (shapes the model: may not change),
  "test", "local" or "training"; from the key's declaration, "fixed" when undeclared."""
  field = fields.find(defaults.sections(), key)
  return field.metadata["role"] if field is not None else "fixed"


def flatten(config: ml_collections.ConfigDict | Mapping[str, Any], prefix: str = ""
            ) -> dict[str, Any]:
  """{dotted key: leaf value} of a (nested) config."""
  out = {}
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def as_tuple(value: Any) -> Any:
  """Lists (nested too) as tuples, so JSON values compare equal to config values."""
  if isinstance(value, (list, tuple)):
    return tuple(as_tuple(v) for v in value)
  return value


def _restore_type(key: str, value: Any, like: Any) -> Any:
  """A JSON value converted to the type of the default `like` (lists -> tuples, int -> float).

  Raises:
    RunConfigError: the value cannot have that type.
  """
  if isinstance(like, tuple):
    if not isinstance(value, list):
      raise RunConfigError(f"{key}: expected a list in JSON for a tuple, got {value!r}")
    return as_tuple(value)
  if isinstance(like, bool) or like is None:
    if like is not None and not isinstance(value, bool):
      raise RunConfigError(f"{key}: expected true/false, got {value!r}")
    return value
  if isinstance(like, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if isinstance(like, int) and isinstance(value, float) and value.is_integer():
    return int(value)
  if type(value) is not type(like):  # pylint: disable=unidiomatic-typecheck
    raise RunConfigError(f"{key}: expected {type(like).__name__}, got {value!r}")
  return value


def from_json(record: Mapping[str, Any], base: ml_collections.ConfigDict | None = None
              ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """Rebuilds a config from its `to_json_best_effort()` dict, with the defaults' types.

  Args:
    record: the parsed JSON.
    base: the config whose keys and types are filled in (default: `defaults.get_config()`);
      keys missing from `record` keep `base`'s values.

  Returns:
    (config, notes): the locked config and one note per key that is in only one of them.

  Raises:
    RunConfigError: a value of the wrong type for a key that shapes the model (a wrong type
      elsewhere is a note, and the default is used).
  """
  config = defaults.get_config() if base is None else base.copy_and_resolve_references()
  values = flatten(record)
  notes, missing, retyped = [], [], []
  with config.unlocked():
    for key, like in flatten(config).items():
      if key not in values:
        missing.append(f"{key}={like!r}")
        continue
      try:
        value = _restore_type(key, values[key], like)
      except RunConfigError:
        if kind_of(key) == "fixed":
          raise
        # A key whose type changed since the run (e.g. a flag that became a choice) and that
        # does not shape the model: this version's default is used.
        retyped.append(f"{key}={values[key]!r} (now {like!r})")
        continue
      parent = config
      *parents, leaf = key.split(".")
      for part in parents:
        parent = parent[part]
      parent[leaf] = value
  if retyped:
    notes.append("keys of the run's config whose type changed since, set to their defaults: "
                 + ", ".join(retyped))
  if missing:
    notes.append(f"keys missing from the run's config (an older version wrote it), set to "
                 f"their defaults: {', '.join(missing)}")
  unknown = sorted(set(values) - set(flatten(config)))
  if unknown:
    notes.append(f"keys of the run's config unknown to this version, ignored: {unknown}")
  config.lock()
  return config, notes


def config_path(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(os.path.expanduser(os.fspath(workdir))) / CONFIG_FILE


def read(workdir: str | os.PathLike) -> ml_collections.ConfigDict | None:
  """The run's config from `WORKDIR/config.json`; None when the file does not exist.

  Raises:
    RunConfigError: the file is unreadable or holds a value of the wrong type.
  """
  return _read(workdir)[0]


def _read(workdir) -> tuple[ml_collections.ConfigDict | None, list[str]]:
  path = config_path(workdir)
  if not path.is_file():
    return None, []
  record = _record(path)
  record, renamed = legacy.upgrade(record)
  try:
    config, notes = from_json(record)
  except RunConfigError as e:
    raise RunConfigError(f"{path}: {e}") from e
  if renamed:
    notes.insert(0, f"{path} uses config keys renamed since; read as {legacy.describe(renamed)} "
                 f"(convert the file once: python -m frcnn_jax.config --upgrade {workdir})")
  return config, notes


def _record(path: pathlib.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise RunConfigError(f"cannot read the run's config {path} ({e}); give --config "
                         "experiments/X.py (the file the run was trained with)") from e


def legacy_renames(workdir: str | os.PathLike) -> dict[str, str]:
  """{old key: new key} of a run folder whose config.json predates the current key layout
  ({} when it does not, or when there is no readable config.json)."""
  path = config_path(workdir)
  if not path.is_file():
    return {}
  try:
    return legacy.upgrade(_record(path))[1]
  except RunConfigError:
    return {}


def upgrade_folder(workdir: str | os.PathLike) -> dict[str, str]:
  """Rewrites WORKDIR/config.json with renamed keys, keeping the original as
  config.legacy.json (the user asked for it: `python -m frcnn_jax.config --upgrade`).

  Returns:
    {old key: new key}; {} when the file needed no change (nothing is written).

  Raises:
    RunConfigError: no readable config.json, or config.legacy.json exists already.
  """
  path = config_path(workdir)
  if not path.is_file():
    raise RunConfigError(f"{path} does not exist: {workdir} holds no run")
  original = path.read_bytes()
  record, renamed = legacy.upgrade(_record(path))
  if not renamed:
    return {}
  kept = path.with_name("config.legacy.json")
  if kept.exists():
    raise RunConfigError(f"{kept} exists already; move it away to upgrade {path} again")
  from_json(record)   # the converted record must read back
  with atomic_io.replacing(kept, "wb") as f:
    f.write(original)
  atomic_io.write_text(path, json.dumps(record, indent=2) + "\n")
  return renamed


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """The config file interface (`--config=<this file>:WORKDIR`): the run's config."""
  config = read(workdir)
  if config is None:
    raise FileNotFoundError(f"{config_path(workdir)} does not exist")
  return config


def is_run_config_flag(filename: str) -> bool:
  """Whether a `--config` value names this file (the run's config), not an experiment file."""
  path = filename.partition(":")[0]
  return os.path.realpath(path) == os.path.realpath(__file__)


@dataclasses.dataclass
class CommandConfig:
  """The config a command runs with, and how it differs from the run's.

  Attributes:
    config: the config to use.
    overrides: {key: value} of the test-time keys that differ from the run's config.
    source: where the config came from (the run's config.json or a --config file).
    notes: messages for the user (ignored training-only changes, missing keys).
  """
  config: ml_collections.ConfigDict
  overrides: dict[str, Any]
  source: str
  notes: list[str]


def resolve(workdir: str | os.PathLike, given: ml_collections.ConfigDict, *,
            from_file: bool, explicit: Iterable[str] = ()) -> CommandConfig:
  """Combines the run's config with a command's config (`--config` file and overrides).

  Args:
    workdir: the training run's folder.
    given: the command's config (a --config file with its overrides, or the run's config
      with the overrides when no file was given).
    from_file: `given` comes from a --config file (not from the run's config.json).
    explicit: the keys given as `--config.key=value` on the command line.

  Returns:
    The config to use; `overrides` holds every test-time key whose value differs from the run.

  Raises:
    RunConfigError: the run's config is unreadable, or a key that shapes the model differs
      (the message names the key and both values).
  """
  run, notes = _read(workdir)
  path = config_path(workdir)
  if run is None:
    return CommandConfig(given, {}, "--config (the run has no config.json)",
                         [f"{path} not found: using --config as the run's config"])
  explicit = set(explicit)
  config = run.copy_and_resolve_references()
  overrides = {}
  ignored = []
  given_values = flatten(given)
  run_values = flatten(run)
  for key in sorted(set(given_values) & set(run_values)):
    value, ran = given_values[key], run_values[key]
    if as_tuple(value) == as_tuple(ran):
      continue
    kind = kind_of(key)
    if kind == "fixed":
      raise RunConfigError(
          f"config key {key!r} is {value!r} here but the run was trained with {ran!r} "
          f"({path}): it fixes the network or its decoding, so it cannot change after "
          "training. Drop it (the run's config.json is used by default); only test-time keys "
          f"may change: {_allowed()}")
    if kind == "training":
      ignored.append(key)
      continue
    if kind == "local" and from_file and key not in explicit:
      continue
    parent = config
    *parents, leaf = key.split(".")
    for part in parents:
      parent = parent[part]
    parent[leaf] = value
    if kind == "test":
      overrides[key] = value
  if ignored:
    notes.append(f"training-only keys differ from the run's and are ignored: {ignored}")
  source = "--config file checked against " + str(path) if from_file else str(path)
  return CommandConfig(config, overrides, source, notes)


def _format(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(_format(v) for v in value)
  return str(value)


def override_tag(overrides: Mapping[str, Any], max_len: int = 64) -> str:
  """A short, file-name-safe tag of the overrides: "test.nms_threshold=0.4"; "" for none.

  Long tags become their first override plus a hash of all of them.
  """
  if not overrides:
    return ""
  parts = [f"{key}={_format(value)}" for key, value in sorted(overrides.items())]
  tag = re.sub(r"[^A-Za-z0-9_.=,+-]", "", "-".join(parts))
  if len(tag) > max_len:
    digest = hashlib.sha1(json.dumps(sorted((k, _format(v)) for k, v in overrides.items()))
                          .encode()).hexdigest()[:8]
    tag = re.sub(r"[^A-Za-z0-9_.=,+-]", "", parts[0])[:max_len - 9] + "-" + digest
  return tag


def free_stem(directory: str | os.PathLike, stem: str, suffixes: Iterable[str] = (".json", "")
              ) -> str:
  """`stem`, or `stem.2`, `stem.3` ...: the first for which no `directory/<stem><suffix>` exists.

  Used so that a command never writes over an earlier result.
  """
  directory = pathlib.Path(directory)
  suffixes = tuple(suffixes)
  candidate, n = stem, 1
  while any((directory / f"{candidate}{s}").exists() for s in suffixes):
    n += 1
    candidate = f"{stem}.{n}"
  return candidate


def from_flags(workdir: str | os.PathLike | None, flag_values=None) -> CommandConfig:
  """The command's config from the parsed `--config` flag (see `config_flags.parse_flags`).

  Args:
    workdir: the run folder (None: no run, the --config file as given).
    flag_values: absl FlagValues holding the `config` flag (default: absl's global FLAGS).

  Raises:
    RunConfigError: see `resolve`.
  """
  if flag_values is None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    flag_values = flags.FLAGS
  flag = flag_values["config"]
  from_file = not is_run_config_flag(flag.config_filename)
  if workdir is None:
    return CommandConfig(flag.value, {}, flag.config_filename, [])
  return resolve(workdir, flag.value, from_file=from_file, explicit=flag.override_values)
