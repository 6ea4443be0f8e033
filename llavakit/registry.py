"""Exact-name registries, one per plug-in kind (timm style).

Names are matched exactly; a duplicate registration raises; an unknown name raises `InputError`
listing the valid names.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from exact names to factories of one plug-in kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise InputError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
