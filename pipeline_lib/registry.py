"""Name registries: datasets, models, unlearning methods, corpora, keyed by the names used in
the params files.

A member registers itself in its own module (``@DATASETS.register("digits")`` on its loader,
``@register_method("scrub", ScrubParams, ...)`` on a method), so adding one touches only that
module, its test and the defaults in the params file. An unknown name raises an error that
lists the valid ones, both on lookup (:meth:`Registry.lookup`) and when a params file is
validated (:meth:`Registry.check`, used as a field validator of the ``name`` keys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pipeline_lib.schema import ConfigError

T = TypeVar("T")
F = TypeVar("F", bound=Callable)


class Registry(dict[str, T]):
    """An ordered ``{name: entry}`` mapping (registration order is the order of the
    members' sections and of reports) that refuses duplicates and explains unknown names.

    ``what`` names a member in messages ("unlearning method"), ``key`` is the params key
    that selects one ("data.name"; empty where the caller names it)."""

    def __init__(self, what: str, key: str = "") -> None:
        super().__init__()
        self.what = what
        self.key = key

    def valid(self) -> str:
        return ", ".join(sorted(self))

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a second member with the same name is an error."""
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = entry
        return entry

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register the decorated function itself under ``name``."""

        def deco(fn: F) -> F:
            self.add(name, fn)  # type: ignore[arg-type]
            return fn

        return deco

    def lookup(self, name: str) -> T:
        """The member called ``name``; an unknown name raises ConfigError listing the valid."""
        if name not in self:
            where = f"{self.key}: " if self.key else ""
            raise ConfigError(f"{where}unknown {self.what} {name!r}; valid: {self.valid()}")
        return self[name]

    def check(self, name: str) -> str:
        """Field validator of a params key naming a member: ``name`` itself, or a ValueError
        listing the valid names (the validation error names the key)."""
        if name not in self:
            raise ValueError(f"unknown name {name!r}; valid: {self.valid()}")
        return name
