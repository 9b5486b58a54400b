"""Named plug-ins (backbones, RoI heads, dataset sources) chosen by a config key."""

from collections.abc import Callable
from typing import Any


class Registry:
  """A name -> entry table that a config key selects from.

  Attributes:
    key: the config key that names the entry (for messages), e.g. "model.backbone".
  """

  def __init__(self, key: str):
    self.key = key
    self._entries: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    """Decorator: `@REGISTRY.register("name")` on a class adds it under `name`.

    Raises:
      ValueError: `name` is taken by another entry.
    """
    def add(entry: Any) -> Any:
      current = self._entries.get(name)
      if current is not None and current is not entry:
        raise ValueError(f"{self.key} {name!r} is registered already ({current!r})")
      self._entries[name] = entry
      return entry
    return add

  def unregister(self, name: str) -> None:
    """Removes `name` (a test's or a notebook's temporary entry); absent names are ignored."""
    self._entries.pop(name, None)

  def get(self, name: str) -> Any:
    """The entry registered as `name`.

    Raises:
      ValueError: naming the config key and the registered names.
    """
    if name not in self._entries:
      raise ValueError(f"{self.key}={name!r} is not registered; registered: {self.names()}")
    return self._entries[name]

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._entries))

  def items(self):
    return sorted(self._entries.items())
