"""Typed per-object storage for plugins (after pytest's ``Stash``).

A plugin keeps what it computed for a session, a transaction or a message
under a :class:`StashKey` it owns, so two plugins cannot collide on a name
and a type checker knows what comes back::

    VERIFIED = StashKey[asyncio.Task[Result]]()
    task = message.stash.get(VERIFIED, None)
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

__all__ = ["Stash", "StashKey"]

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key; its identity is the key, its type parameter the value's type."""

    __slots__ = ()


class Stash:
    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return self._data[key]  # type: ignore[no-any-return]

    def get(self, key: StashKey[T], default: D) -> T | D:
        return self._data.get(key, default)  # type: ignore[no-any-return]

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return self._data.setdefault(key, default)  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __delitem__(self, key: StashKey[Any]) -> None:
        del self._data[key]

    def __len__(self) -> int:
        return len(self._data)
