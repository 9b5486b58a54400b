"""The default configuration (the paper's PASCAL VOC 2007 VGG16 setting) and its validation.

Every key is declared once, as a `setting` field of the class that uses it (`SECTIONS` and
the registered plug-ins' own sections); this module only assembles them. Every experiment file
in `experiments/` starts from `get_config()` and overrides what it changes. The returned
ConfigDict is locked, so a misspelt key fails at start instead of being silently ignored.
"""

import dataclasses

import ml_collections

from frcnn_jax.config import fields
from frcnn_jax.config.fields import setting
from frcnn_jax.data import settings as data_settings
from frcnn_jax.data.sources import base as source_base
from frcnn_jax.detection import settings as detection_settings
from frcnn_jax.models import faster_rcnn
from frcnn_jax.models.registry import BACKBONES
from frcnn_jax.models.registry import ROI_HEADS
from frcnn_jax.training import settings as training_settings


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """The top-level keys."""
  seed: int = setting(0, "seeds the initialisation, the data order and the samplers",
                      role="training")


# The fixed sections: {dotted path: declaring class}; "" is the top level.
SECTIONS = {
    "": RunSettings,
    "data": data_settings.DataSettings,
    "model": faster_rcnn.ModelSettings,
    **detection_settings.SECTIONS,
    "train": training_settings.TrainSettings,
    "eval": training_settings.EvalSettings,
    "alt_opt": training_settings.AltOptSettings,
}
# Where each registry's entries keep their own section: data.<name>, model.<name>.
PLUGINS = (("data", source_base.SOURCES), ("model", BACKBONES), ("model", ROI_HEADS))


def sections() -> dict[str, type]:
  """{dotted path: declaring class} of every section, the registered plug-ins' included."""
  found = dict(SECTIONS)
  for parent, plugins in PLUGINS:
    for name, cls in plugins.items():
      found[f"{parent}.{name}"] = cls
  return found


def get_config() -> ml_collections.ConfigDict:
  """The default configuration, locked against new keys."""
  c = ml_collections.ConfigDict()
  for path, cls in sections().items():
    node = c
    for part in path.split(".") if path else ():
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node.update(fields.section(cls))
  c.lock()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every key of every section against its declaration.

  Raises:
    fields.ConfigError: naming the first bad key (unknown keys included).
  """
  for path, cls in sections().items():
    node = config
    for part in path.split(".") if path else ():
      if part not in node:
        raise fields.ConfigError(f"config section {path!r} is missing")
      node = node[part]
    fields.build(cls, fields.own_keys(node), path or "config")
  for parent, plugins in PLUGINS:
    for name in config[parent].keys():
      value = config[parent][name]
      if isinstance(value, ml_collections.ConfigDict) and not _registered(parent, name):
        raise fields.ConfigError(f"config section '{parent}.{name}' belongs to no registered "
                                 f"{parent} part")
  if len(config.data.pad_hw) and len(config.data.canvases):
    raise fields.ConfigError("give data.canvases or data.pad_hw (one canvas), not both")


def used_record(record: dict) -> dict:
  """A config record (nested dicts, e.g. a run's config.json) without the sections of the
  plug-ins it does not select (`data.<other dataset>`, `model.<other backbone or head>`), so
  that comparing two runs' records ignores parts neither uses."""
  selected = {"data": {record.get("data", {}).get("name")},
              "model": {record.get("model", {}).get(k) for k in ("backbone", "roi_head")}}
  out = dict(record)
  for parent, plugins in PLUGINS:
    if isinstance(out.get(parent), dict):
      out[parent] = {k: v for k, v in out[parent].items()
                     if not (k in plugins.names() and k not in selected[parent])}
  return out


def _registered(parent: str, name: str) -> bool:
  return any(parent == p and name in plugins.names() for p, plugins in PLUGINS)
