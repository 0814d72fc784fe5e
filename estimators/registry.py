"""Name → object registries (timm-style ``register`` / ``get`` / ``names``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


class UnknownNameError(ValueError):
    """Raised for a name, parameter or value that does not exist; the message lists what does."""


class Registry:
    """A mapping from names to registered objects, with errors that list the known names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
