"""Config keys declared once, as dataclass fields: default, meaning, role and allowed values.

A config section is a dataclass (a frozen settings class, or a Flax module whose attributes are
its settings) whose fields made with `setting(...)` are its keys. From that one declaration
come the section's defaults (`section`), the checked settings object built from a config
(`build`), the help printed by `python -m frcnn_jax.config` and what a run folder lets a
later command change (`ROLES`).
"""

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import ml_collections

# What a key's value may do after training (frcnn_jax/config/run.py):
ROLES = (
    "fixed",      # shapes the network or its decoding: may not change
    "test",       # test-time computation or eval data: may change, recorded as an override
    "local",      # where data lives, parallelism, speed: cannot change a result
    "training",   # used only while training: a later command ignores it
)


class ConfigError(ValueError):
  """A config key or value is invalid; the message names the key."""


def setting(default: Any, help: str, *, role: str = "fixed",  # pylint: disable=redefined-builtin
            choices: tuple[Any, ...] | None = None, minimum: float | None = None,
            above: float | None = None, maximum: float | None = None,
            type: type | None = None,  # pylint: disable=redefined-builtin
            check: Callable[[Any], str] | None = None) -> Any:
  """A dataclass field that is a config key.

  Args:
    default: the value when the config does not set it (immutable: tuples, not lists).
    help: one line that says what the key means (shown by `python -m frcnn_jax.config`).
    role: one of `ROLES`.
    choices: the allowed values.
    minimum / above / maximum: bounds (>= minimum, > above, <= maximum) of a number, or of
      every number of a tuple.
    type: the value's type when `default` is None (the key may be None).
    check: returns a message when the whole value is wrong ("" when it is fine).

  Returns:
    A `dataclasses.field` carrying the declaration in its metadata.
  """
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")
  if isinstance(default, (list, dict, set)):
    raise TypeError(f"a setting's default must be immutable, got {default!r}")
  return dataclasses.field(default=default, metadata={
      "help": help, "role": role, "choices": choices, "minimum": minimum, "above": above,
      "maximum": maximum, "type": type, "check": check})


def declared(cls: type) -> tuple[dataclasses.Field, ...]:
  """The fields of `cls` that are config keys (made with `setting`), in declaration order."""
  return tuple(f for f in dataclasses.fields(cls) if "help" in f.metadata)


def section(cls: type) -> ml_collections.ConfigDict:
  """The config section of `cls`: each declared key with its default."""
  node = ml_collections.ConfigDict()
  for f in declared(cls):
    node[f.name] = (ml_collections.config_dict.placeholder(f.metadata["type"])
                    if f.default is None else f.default)
  return node


def _numbers(value: Any) -> list[float]:
  if isinstance(value, (tuple, list)):
    return [x for v in value for x in _numbers(v)]
  return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def checked(f: dataclasses.Field, key: str, value: Any) -> Any:
  """`value` of the declared field `f`, with lists as tuples and ints as floats where the
  default is a float (or a tuple of floats).

  Raises:
    ConfigError: naming `key`, when the value is outside the declaration.
  """
  meta = f.metadata
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(f.default, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if (isinstance(f.default, tuple) and f.default and isinstance(value, tuple)
      and all(isinstance(x, float) for x in f.default)
      and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
    value = tuple(float(x) for x in value)
  if value is None:
    if f.default is not None:
      raise ConfigError(f"config key {key!r} may not be None")
    return value
  if meta["choices"] is not None and value not in meta["choices"]:
    raise ConfigError(f"config key {key!r} must be one of {meta['choices']}, got {value!r}")
  for number in _numbers(value):
    if meta["minimum"] is not None and number < meta["minimum"]:
      raise ConfigError(f"config key {key!r} must be >= {meta['minimum']}, got {value!r}")
    if meta["above"] is not None and number <= meta["above"]:
      raise ConfigError(f"config key {key!r} must be > {meta['above']}, got {value!r}")
    if meta["maximum"] is not None and number > meta["maximum"]:
      raise ConfigError(f"config key {key!r} must be <= {meta['maximum']}, got {value!r}")
  if meta["check"] is not None:
    problem = meta["check"](value)
    if problem:
      raise ConfigError(f"config key {key!r} {problem}, got {value!r}")
  return value


def build(cls: type, node: Mapping[str, Any], prefix: str, **extra: Any) -> Any:
  """`cls(**checked values of node, **extra)`: a section turned into its settings object.

  Args:
    cls: the declaring dataclass.
    node: the config section (a ConfigDict or a mapping).
    prefix: the section's dotted path, for messages ("rpn", "model.vgg16").
    **extra: arguments of `cls` that are not config keys.

  Raises:
    ConfigError: a key of `node` is not declared, or a value is outside its declaration.
  """
  fields = {f.name: f for f in declared(cls)}
  unknown = sorted(set(node.keys()) - set(fields))
  if unknown:
    raise ConfigError(f"unknown config key(s) in {prefix!r}: {unknown}; "
                      f"{prefix} takes {sorted(fields)}")
  values = {name: checked(f, f"{prefix}.{name}", node[name] if name in node else f.default)
            for name, f in fields.items()}
  return cls(**values, **extra)


def own_keys(node: Mapping[str, Any]) -> dict[str, Any]:
  """A section's own keys, without its subsections (the plug-ins' sections under it)."""
  return {k: v for k, v in node.items() if not isinstance(v, (ml_collections.ConfigDict, dict))}


def find(sections: Mapping[str, type], key: str) -> dataclasses.Field | None:
  """The declared field of a dotted `key` among `sections` ({dotted prefix: class})."""
  prefix, _, name = key.rpartition(".")
  cls = sections.get(prefix)
  if cls is None:
    return None
  return next((f for f in declared(cls) if f.name == name), None)
