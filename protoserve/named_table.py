"""A table of entries registered once by name and looked up by name: the family registries (one per
side of the torch line) and the data-set table are NamedTables."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class NamedTable(dict[str, T], Generic[T]):
    """name -> entry; `register` refuses a name twice, `lookup` names the known entries on a miss."""

    def __init__(self, kind: str, error: type[Exception] = KeyError):
        super().__init__()
        self.kind, self.error = kind, error

    def register(self, name: str, entry: T) -> T:
        if name in self:
            raise self.error(f"{self.kind} {name!r} is registered twice")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise self.error(f"unknown {self.kind} {name!r} (known: {', '.join(self)})") from None
