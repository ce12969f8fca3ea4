"""Hyper-parameter search spaces, declared beside each method as plain data.

A method's ``@register_method(..., search_space={...})`` maps some fields of its params
section to one of the dimensions below. The library only declares and checks them; the
orchestration layer (``tasks/tune.py``) turns them into Ray Tune distributions, so nothing
here imports Ray. ``unlearn tune --method M`` searches the space of M.

Only settings that change the unlearning step belong in a space: not the request, not the
store seeds, and not what a method's precomputed inputs depend on (``retain_multiple`` of the
matching methods sets the matching points the targets are computed for, once per request).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Union


@dataclass(frozen=True)
class LogUniform:
    """A float drawn log-uniformly from [low, high] (learning rates, small coefficients)."""

    low: float
    high: float

    def check(self) -> None:
        if not 0 < self.low < self.high:
            raise ValueError(f"LogUniform needs 0 < low < high, got [{self.low}, {self.high}]")

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high


@dataclass(frozen=True)
class Uniform:
    """A float drawn uniformly from [low, high]."""

    low: float
    high: float

    def check(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"Uniform needs low < high, got [{self.low}, {self.high}]")

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high


@dataclass(frozen=True)
class IntRange:
    """An integer drawn uniformly from low..high, both included (epochs, steps)."""

    low: int
    high: int

    def check(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"IntRange needs low <= high, got [{self.low}, {self.high}]")

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high


@dataclass(frozen=True)
class Choice:
    """One of a few values (batch sizes, modes)."""

    values: tuple[Any, ...]

    def check(self) -> None:
        if not self.values:
            raise ValueError("Choice needs at least one value")

    def contains(self, value: Any) -> bool:
        return value in self.values


Dimension = Union[LogUniform, Uniform, IntRange, Choice]  # noqa: UP007 (isinstance below)
SearchSpace = Mapping[str, Dimension]


def check_space(method: str, params_type: type, space: SearchSpace) -> dict[str, Dimension]:
    """A method's declared space, checked against its params section: every key a field of
    the section and every dimension well formed. Raises ValueError at registration, i.e. at
    import: a wrong declaration never reaches a run."""
    names = {f.name for f in fields(params_type)}
    out: dict[str, Dimension] = {}
    for key, dim in space.items():
        if key not in names:
            raise ValueError(f"search space of {method}: {key} is not a field of unlearn.{method}")
        if not isinstance(dim, (LogUniform, Uniform, IntRange, Choice)):
            raise ValueError(f"search space of {method}.{key}: {dim!r} is not a dimension")
        dim.check()
        out[key] = dim
    return out


def describe(space: SearchSpace) -> dict[str, str]:
    """One readable line per dimension (for logs, MLflow tags and ``unlearn methods``)."""
    out = {}
    for key, dim in space.items():
        if isinstance(dim, Choice):
            out[key] = "choice(" + ", ".join(str(v) for v in dim.values) + ")"
        else:
            out[key] = f"{type(dim).__name__.lower()}({dim.low}, {dim.high})"
    return out
