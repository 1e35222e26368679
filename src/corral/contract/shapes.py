"""Declarative wire shapes: one description drives both the validator and the JSON Schema.

A shape says what JSON value is structurally acceptable (types, required and known
fields, enums, integer ranges, non-empty strings and arrays). Rules that need the whole
request or real parsing (CIDR host bits, backend sections, proxy URLs) live in
``corral.contract.semantics`` and are listed in ``SEMANTIC_RULES``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping


class Str:
    __slots__ = ("forbidden", "hint", "non_empty", "pattern", "regex")

    def __init__(
        self,
        *,
        non_empty: bool = False,
        pattern: str | None = None,  # anchored; Python and ECMA-262 compatible
        hint: str = "",  # what the pattern means, for messages
        forbidden: tuple[str, ...] = (),  # reserved values
    ) -> None:
        self.non_empty = non_empty
        self.pattern = pattern
        self.hint = hint
        self.forbidden = forbidden
        self.regex = re.compile(pattern) if pattern else None


class Int:
    __slots__ = ("maximum", "minimum")

    def __init__(self, minimum: int, maximum: int) -> None:
        self.minimum = minimum
        self.maximum = maximum


class Bool:
    __slots__ = ()


class Enum:
    __slots__ = ("error_code", "values")

    def __init__(self, values: tuple[str, ...], error_code: str = "malformed_request") -> None:
        self.values = values
        self.error_code = error_code  # an ErrorCode value: what an unknown value means


class Arr:
    __slots__ = ("item", "non_empty")

    def __init__(self, item: Shape, *, non_empty: bool = False) -> None:
        self.item = item
        self.non_empty = non_empty


class Obj:
    __slots__ = ("fields", "name", "required")

    def __init__(
        self, fields: Mapping[str, Shape], required: frozenset[str], name: str = ""
    ) -> None:
        self.fields = fields
        self.required = required
        self.name = name  # a named shape becomes one reusable definition in the JSON Schema


class AnyJson:
    """Any JSON value, null included (MXC's ``_comment``)."""

    __slots__ = ()


Shape = Str | Int | Bool | Enum | Arr | Obj | AnyJson


def obj(fields: Mapping[str, Shape], *required: str, name: str = "") -> Obj:
    return Obj(dict(fields), frozenset(required), name)


def with_fields(base: Obj, fields: Mapping[str, Shape], *required: str) -> Obj:
    return Obj({**base.fields, **fields}, base.required | frozenset(required))


def without_fields(base: Obj, *names: str) -> Obj:
    return Obj({k: v for k, v in base.fields.items() if k not in names}, base.required - set(names))


U16_NONZERO = Int(1, 65535)
U32 = Int(0, 2**32 - 1)
U64 = Int(0, 2**64 - 1)
STR = Str()
BOOL = Bool()
STR_LIST = Arr(STR)
ACTION = Enum(("allow", "deny"))
