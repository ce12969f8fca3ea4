"""Typed sections: what every section of a params file is built from.

A section (``train``, ``unlearn.scrub``, ...) is a frozen pydantic dataclass made by
:func:`section`. Its fields are declared, not hand-checked: strict scalar types
(:data:`Int`, :data:`Float`, :data:`Str`: no int for a bool, no bool for a number, no
string for a number except what ``float()`` reads, since YAML 1.1 reads ``1e-3`` as a
string), tuples (a YAML list becomes a tuple), ``Literal`` choices, ``X | None`` where null
is allowed, and constraints as ``Field(gt=0)``, ``Field(ge=0, le=1)``. Unknown keys are
refused. Validation runs on parsing *and* on construction (``TrainConfig(lr=-1)``,
:func:`replace`), and every failure becomes one :class:`ConfigError` line naming the full
dotted key and what it must be: ``train.lr: must be > 0, got -1``,
``unknown key train.lrr; valid keys of train: epochs, ...``,
``train.optimizer: 'adamw' is not one of 'adam', 'sgd'``.

This module imports nothing else from ``pipeline_lib``: every package that owns a section
(data, models, training, methods) builds on it, and :mod:`pipeline_lib.config` composes
those sections into the whole params file.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

__all__ = [
    "ConfigError",
    "Field",
    "Float",
    "Hint",
    "Int",
    "Str",
    "Bool",
    "flatten",
    "make_section",
    "parse_section",
    "replace",
    "section",
    "section_key",
    "to_dict",
]


class ConfigError(ValueError):
    """A parameter file, override or section value is malformed; the message names the key.

    ``key`` (optional) is the dotted key the message is about, relative to where the error
    is raised (a section's validator raising ``ConfigError("...", key="blocks")``); the
    translation of a validation error puts the section's own dotted path in front of it.
    """

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def _number_from_string(value: Any) -> Any:
    # YAML 1.1 reads "1e-3" (no dot) as a string: accept what float() accepts.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


#: An integer; a bool, a float or a string is refused.
Int = Annotated[int, Strict()]
#: A number (int or float, stored as float; a numeric string as YAML 1.1 writes "1e-3");
#: a bool is refused.
Float = Annotated[float, BeforeValidator(_number_from_string), Strict()]
#: A string; a number is refused.
Str = Annotated[str, Strict()]
#: true/false; 0/1 are refused.
Bool = Annotated[bool, Strict()]


@dataclasses.dataclass(frozen=True)
class Hint:
    """Field metadata: why a constraint holds, appended to its error message
    (``Annotated[Int, Field(ge=4), Hint("the noise floor splits the oracles in halves")]``)."""

    text: str


#: Unknown keys are refused; scalar strictness comes from the field types above, so that a
#: nested section may still be given as a mapping.
SECTION_CONFIG = ConfigDict(extra="forbid")

T = TypeVar("T")


@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field))
def section(key: str = "") -> Callable[[type[T]], type[T]]:
    """Class decorator: a frozen, validated section whose errors are named from ``key``
    (its dotted place in the params file, e.g. ``"train"``; a method's params get
    ``unlearn.<name>`` when the method registers). Construction validates too: a bad value
    raises :class:`ConfigError`."""

    def wrap(cls: type[T]) -> type[T]:
        out = pydantic_dataclass(cls, frozen=True, config=SECTION_CONFIG)
        out.__section_key__ = key  # type: ignore[attr-defined]
        init = out.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise _translate(exc, type(self), section_key(type(self))) from None

        out.__init__ = __init__  # type: ignore[method-assign]
        return out

    return wrap


def section_key(cls: type) -> str:
    """The dotted key a section class is known by in error messages ("" if none)."""
    return getattr(cls, "__section_key__", "")


def make_section(
    name: str,
    fields: list[tuple[str, Any, Any]],
    *,
    key: str,
    module: str,
    doc: str,
    namespace: dict[str, Any] | None = None,
) -> type:
    """A section class built at import time from ``(name, type, dataclasses.field(...))``
    triples: how a section composed from a registry (``unlearn``: one field per registered
    method) is made."""
    cls = dataclasses.make_dataclass(name, fields, namespace=dict(namespace or {}), frozen=True)
    cls.__module__ = module
    out = section(key)(cls)
    out.__doc__ = doc
    return out


# --------------------------------------------------------------------------- parsing


def parse_section(cls: type[T], data: Mapping[str, Any], prefix: str | None = None) -> T:
    """Build section ``cls`` from a mapping (nested sections as mappings), refusing unknown
    keys and bad values with a :class:`ConfigError` naming the dotted key. ``prefix`` is the
    section's dotted place (default: the key it was declared with)."""
    where = section_key(cls) if prefix is None else prefix
    if isinstance(data, Mapping) and not isinstance(data, dict):
        data = dict(data)
    validator = cls.__pydantic_validator__  # type: ignore[attr-defined]
    try:
        return validator.validate_python(data)
    except ValidationError as exc:
        raise _translate(exc, cls, where) from None


def replace(section_obj: T, **changes: Any) -> T:
    """A validated copy of a section with ``changes`` applied (sections are frozen)."""
    return dataclasses.replace(section_obj, **changes)  # type: ignore[type-var]


def to_dict(params: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(params))


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view (``train.lr``) used for tracking parameters."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(params) if not isinstance(params, dict) else params).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


# --------------------------------------------------------------------------- messages


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _dotted(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, str(part))
    return out


def _field_info(cls: type, loc: tuple[Any, ...]) -> tuple[type | None, Any]:
    """(section class holding the last field of ``loc``, its pydantic FieldInfo), following
    nested sections; (None, None) where ``loc`` leaves them (a tuple item)."""
    owner: Any = cls
    info = None
    for i, part in enumerate(loc):
        fields = getattr(owner, "__pydantic_fields__", None)
        if not isinstance(part, str) or fields is None or part not in fields:
            return None, None
        info = fields[part]
        if i < len(loc) - 1:
            owner = info.annotation
    return owner, info


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, int | float) and float(x).is_integer() else repr(x)


_BOUND = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}
_CTX = {
    "greater_than": "gt",
    "greater_than_equal": "ge",
    "less_than": "lt",
    "less_than_equal": "le",
}


def _range_message(error: dict[str, Any], info: Any) -> str:
    """``must be > 0`` or, when the field is bounded on both sides, ``must be in (0, 1]``;
    followed by the field's :class:`Hint` if any."""
    lower = upper = None
    hints = []
    for m in getattr(info, "metadata", None) or ():
        if isinstance(m, Gt | Ge):
            lower = m
        elif isinstance(m, Lt | Le):
            upper = m
        elif isinstance(m, Hint):
            hints.append(m.text)
    if lower is not None and upper is not None:
        lo = f"({_num(lower.gt)}" if isinstance(lower, Gt) else f"[{_num(lower.ge)}"
        hi = f"{_num(upper.lt)})" if isinstance(upper, Lt) else f"{_num(upper.le)}]"
        what = f"must be in {lo}, {hi}"
    else:
        kind = error["type"]
        what = f"must be {_BOUND[kind]} {_num(error['ctx'][_CTX[kind]])}"
    return what + "".join(f" ({h})" for h in hints)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _message(error: dict[str, Any], info: Any) -> str:
    """One validation error as today's wording, without the key."""
    kind, value = error["type"], error.get("input")
    if kind in _BOUND:
        return f"{_range_message(error, info)}, got {value!r}"
    if kind == "int_type":
        return f"expected an integer, got {value!r}"
    if kind == "float_type":
        return f"expected a number, got {value!r}"
    if kind == "string_type":
        return f"expected a string, got {value!r}"
    if kind == "bool_type":
        return f"expected true/false, got {value!r}"
    if kind in ("tuple_type", "list_type", "iterable_type"):
        return f"expected a list, got {_type_name(value)}"
    if kind in ("dataclass_type", "dict_type", "model_type", "dataclass_exact_type"):
        return f"expected a mapping, got {_type_name(value)}"
    if kind == "literal_error":
        expected = error["ctx"]["expected"]
        choices = ", ".join(expected.rsplit(" or ", 1)) if " or " in expected else expected
        return f"{value!r} is not one of {choices}"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    return f"{error['msg']}, got {value!r}"


def _valid_keys(cls: type, loc: tuple[Any, ...]) -> list[str]:
    owner = cls
    if loc:
        owner, info = _field_info(cls, loc)
        owner = getattr(info, "annotation", None)
    if owner is None or not dataclasses.is_dataclass(owner):
        return []
    return [f.name for f in dataclasses.fields(owner)]


def _translate(exc: ValidationError, cls: type, prefix: str) -> ConfigError:
    """The first problem of a pydantic validation error as one ConfigError line: unknown
    keys first (the likeliest cause: a typo), then the first bad value."""
    errors = exc.errors()
    unknown = [e for e in errors if e["type"] in ("unexpected_keyword_argument", "extra_forbidden")]
    if unknown:
        parent = tuple(unknown[0]["loc"][:-1])
        same = sorted(str(e["loc"][-1]) for e in unknown if tuple(e["loc"][:-1]) == parent)
        where = _dotted(prefix, parent)
        valid = _valid_keys(cls, parent)
        return ConfigError(
            f"unknown key {_join(where, same[0])}"
            + (f" (and {len(same) - 1} more)" if len(same) > 1 else "")
            + f"; valid keys{' of ' + where if where else ''}: {', '.join(valid)}"
        )
    error = errors[0]
    loc = tuple(error["loc"])
    inner = error.get("ctx", {}).get("error")
    if error["type"] == "value_error" and isinstance(inner, ConfigError) and inner.key:
        return ConfigError(f"{_join(_dotted(prefix, loc), inner.key)}: {inner}")
    key = _dotted(prefix, loc)
    _, info = _field_info(cls, loc)
    message = _message(error, info)
    return ConfigError(f"{key}: {message}" if key else message)
