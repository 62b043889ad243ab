"""The machinery behind message declarations: typed fields checked on arrival.

A message is a keyword-only frozen dataclass. Its annotations are the wire
types; `checks` metadata adds value constraints. `validate()` runs in
`__post_init__`, so a message built locally is checked exactly like one that
arrived: a bad value never reaches a handler nor leaves a sender.

Supported annotations: str, int, float, bool, bytes, Any, None, X | None,
list[T], dict[str, T], Literal[...]. An int is accepted where a float is
declared (and stored as a float); a bool is never accepted as an int.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, ClassVar, Literal

from sllmd import names
from sllmd.errors import BadMessageError

Check = Callable[[Any], "str | None"]


def checked(*checks: Check, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with value checks, each returning an error text or None."""
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata={"checks": checks})
    return dataclasses.field(default=default, metadata={"checks": checks})


# --- reusable checks ------------------------------------------------------------------------
def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be >= {low}"


def in_range(low: float, high: float) -> Check:
    return lambda v: None if v is None or low <= v <= high else f"must be in [{low}, {high}]"


def max_len(n: int) -> Check:
    return lambda v: None if v is None or len(v) <= n else f"is longer than {n}"


def model_name(v: str) -> str | None:
    """Model names double as directory names in the store: the rule is sllmd.names'."""
    return names.problem(v)


def non_empty(v) -> str | None:
    return None if v is None or len(v) > 0 else "must not be empty"


# --- type checking --------------------------------------------------------------------------
def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_type(value: Any, tp: Any, where: str) -> Any:
    """Returns `value` (an int widened to float where declared) or raises BadMessageError."""
    if tp is Any:
        return value
    if tp is None or tp is type(None):
        if value is None:
            return None
        raise BadMessageError(f"{where}: expected nil, got {type(value).__name__}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return check_type(value, option, where)
            except BadMessageError as e:
                errors.append(str(e))
        raise BadMessageError(f"{where}: expected {_describe(tp)}, got {type(value).__name__}")
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str | int):
            return value
        choices = ", ".join(repr(a) for a in typing.get_args(tp))
        raise BadMessageError(f"{where}: must be one of {choices}, got {value!r:.40}")
    if origin is list:
        if not isinstance(value, list):
            raise BadMessageError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BadMessageError(f"{where}: expected a map, got {type(value).__name__}")
        key_tp, val_tp = typing.get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            check_type(k, key_tp, f"{where} key")
            out[k] = check_type(v, val_tp, f"{where}[{k!r:.40}]")
        return out
    if tp is float:
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool, bytes):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"unsupported wire type {tp!r} at {where}")
    raise BadMessageError(f"{where}: expected {_describe(tp)}, got {type(value).__name__}")


class Schema:
    """Fields, types and checks of one message class, computed once."""

    def __init__(self, cls: type):
        hints = typing.get_type_hints(cls)
        self.fields = [f for f in dataclasses.fields(cls) if f.init]
        self.types = {f.name: hints[f.name] for f in self.fields}
        self.required = {f.name for f in self.fields
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        self.none_defaults = {f.name for f in self.fields if f.default is None}
        self.checks = {f.name: f.metadata.get("checks", ()) for f in self.fields}


class Message:
    """Base of every message. Subclasses are declared with `@dataclass(frozen=True, kw_only=True)`."""

    TYPE: ClassVar[str] = ""
    _schema: ClassVar[Schema]

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def schema(cls) -> Schema:
        if "_schema" not in cls.__dict__:
            cls._schema = Schema(cls)
        return cls._schema

    def validate(self) -> None:
        schema = self.schema()
        where = self.TYPE or type(self).__name__
        for name, tp in schema.types.items():
            value = check_type(getattr(self, name), tp, f"{where}.{name}")
            object.__setattr__(self, name, value)
            for check in schema.checks[name]:
                problem = check(value)
                if problem:
                    raise BadMessageError(f"{where}.{name} {problem}")
        self.check()

    def check(self) -> None:
        """Constraints across fields; raise BadMessageError. Overridden where needed."""

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "Message":
        """Builds a message from a decoded map (without its "type" key): every field checked."""
        schema = cls.schema()
        unknown = set(fields) - set(schema.types)
        if unknown:
            raise BadMessageError(f"{cls.TYPE}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        missing = schema.required - set(fields)
        if missing:
            raise BadMessageError(f"{cls.TYPE}: missing field(s) {', '.join(sorted(missing))}")
        return cls(**fields)

    def to_fields(self) -> dict[str, Any]:
        """The wire map: "type" first, then "id", then the other fields; None-valued optionals left out."""
        schema = self.schema()
        out: dict[str, Any] = {"type": self.TYPE}
        for f in schema.fields:
            value = getattr(self, f.name)
            if value is None and f.name in schema.none_defaults:
                continue
            out[f.name] = value
        return out
