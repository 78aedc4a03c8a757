"""Typed, strict registries: register by name, fail on duplicates, suggest the nearest name on a miss.

The registries that config.py validates against (methods, probes, remedies) are made here, at the bottom of the house,
and name the package that fills them (`provider`, a module path imported on the first lookup). So config.py
reads a registry without importing the packages that register into it, and no import circle runs through it.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Generic, Iterator, TypeVar

from .errors import SftlabError

T = TypeVar("T")


class RegistryError(KeyError):
    """A registry used wrongly by code (a name registered twice): a bug, shown with its traceback."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class UnknownNameError(RegistryError, SftlabError):
    """A name that is not registered, usually typed by a user: the CLI prints it as one line."""


class Registry(Generic[T]):
    """A name -> object map for one kind of thing (methods, probes, losses)."""

    def __init__(self, kind: str, provider: str = "") -> None:
        self.kind = kind
        self.provider = provider  # module that registers the built-ins, imported on the first lookup
        self._items: dict[str, T] = {}
        self._provided = not provider

    def _provide(self) -> None:
        if not self._provided:
            importlib.import_module(self.provider)  # runs its register() calls; a no-op while it is importing
            self._provided = True

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise RegistryError(f"{self.kind} {name!r} is already registered; pick another name")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> T:
        """Remove `name` (tests that register their own things take them out again)."""
        self._provide()
        try:
            return self._items.pop(name)
        except KeyError:
            raise UnknownNameError(unknown_name_message(self.kind, name, self._items)) from None

    def get(self, name: str) -> T:
        self._provide()
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a config (a list, a mapping)
            raise UnknownNameError(unknown_name_message(self.kind, name, self._items)) from None

    def names(self) -> list[str]:
        self._provide()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._provide()
        try:
            return name in self._items
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def unknown_name_message(kind: str, name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (known: {', '.join(sorted(known))})"


# The registries config.py validates names and options against; their packages register into them.
METHODS: Registry[Any] = Registry("method", provider=f"{__package__}.methods")
PROBES: Registry[Any] = Registry("probe", provider=f"{__package__}.probes")
REMEDIES: Registry[Any] = Registry("remedy", provider=f"{__package__}.remedies")
