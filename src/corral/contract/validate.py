"""Walk a decoded JSON value against a shape, reporting the first problem the way MXC does:
in document order, nested errors before the missing fields of their parent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from corral.contract.shapes import AnyJson, Arr, Bool, Enum, Int, Obj, Shape, Str
from corral.errors import ErrorCode, ValidationError


class JsonObject(dict[str, Any]):
    """A decoded JSON object that remembers the first key it saw twice."""

    duplicate: str | None = None


def fail(
    path: str, message: str, rule: str, code: ErrorCode = ErrorCode.MALFORMED_REQUEST
) -> NoReturn:
    where = path or "request"
    raise ValidationError(f"{where}: {message}", code=code, details={"path": path, "rule": rule})


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return "string " + (repr(value) if len(value) <= 40 else repr(value[:40]) + "...")
    if isinstance(value, list):
        return "an array"
    if isinstance(value, tuple):
        return "a tuple (pass a list)"
    return "an object"


def check(value: object, shape: Shape, path: str) -> None:
    """Raise ValidationError at the first place ``value`` does not fit ``shape``."""
    if isinstance(shape, AnyJson):
        return
    if value is None:
        fail(path, "null is not allowed; omit the field to use its default", "null")
    if isinstance(shape, Obj):
        _check_object(value, shape, path)
    elif isinstance(shape, Str):
        _check_string(value, shape, path)
    elif isinstance(shape, Int):
        _check_int(value, shape, path)
    elif isinstance(shape, Bool):
        if not isinstance(value, bool):
            fail(path, f"expected true or false, got {describe(value)}", "type")
    elif isinstance(shape, Enum):
        _check_enum(value, shape, path)
    else:
        _check_array(value, shape, path)


def _check_object(value: object, shape: Obj, path: str) -> None:
    if not isinstance(value, Mapping):
        fail(path, f"expected an object, got {describe(value)}", "type")
    duplicate = getattr(value, "duplicate", None)
    if duplicate is not None:
        fail(
            join(path, duplicate),
            f"the field '{duplicate}' appears more than once; keep one",
            "duplicate_key",
        )
    fields = shape.fields
    for key, item in value.items():
        if not isinstance(key, str):
            fail(path, f"field names must be strings, got {describe(key)}", "type")
        field_shape = fields.get(key)
        if field_shape is None:
            _unknown_field(key, shape, path)
        check(item, field_shape, join(path, key))
    for name in sorted(shape.required):
        if name not in value:
            fail(join(path, name), f"the required field '{name}' is missing; add it", "required")


def _unknown_field(key: str, shape: Obj, path: str) -> NoReturn:
    import difflib  # only on this error path: keeps the import cost off the fast path

    known = sorted(shape.fields)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    fail(
        join(path, key),
        f"unknown field '{key}'{hint}; expected one of: {', '.join(known)}. "
        "Remove it or correct its spelling",
        "unknown_field",
    )


def _check_string(value: object, shape: Str, path: str) -> None:
    if not isinstance(value, str):
        fail(path, f"expected a string, got {describe(value)}", "type")
    if shape.non_empty and not value:
        fail(path, "must not be empty", "empty")
    regex = shape.regex
    if regex is not None and not regex.search(value):
        fail(path, f"{describe(value)} is not {shape.hint}", "pattern")
    if value in shape.forbidden:
        fail(path, f"{value!r} is reserved and cannot be used here", "reserved")


def _check_int(value: object, shape: Int, path: str) -> None:
    span = f"an integer from {shape.minimum} to {shape.maximum}"
    if isinstance(value, float) and value.is_integer():
        # JSON Schema counts 80.0 as an integer; MXC (serde) does not, and neither do we.
        fail(
            path,
            f"expected {span} without a decimal point, got {describe(value)}",
            "integral_float",
        )
    if isinstance(value, bool) or not isinstance(value, int):
        fail(path, f"expected {span}, got {describe(value)}", "type")
    if not shape.minimum <= value <= shape.maximum:
        fail(path, f"{value} is out of range; expected {span}", "range")


def _check_enum(value: object, shape: Enum, path: str) -> None:
    if not isinstance(value, str):
        fail(path, f"expected one of {_choices(shape)}, got {describe(value)}", "type")
    if value not in shape.values:
        fail(
            path,
            f"unknown value {value!r}; expected one of {_choices(shape)}",
            "enum",
            ErrorCode(shape.error_code),
        )


def _choices(shape: Enum) -> str:
    return ", ".join(repr(v) for v in shape.values)


def _check_array(value: object, shape: Arr, path: str) -> None:
    if not isinstance(value, list):
        fail(path, f"expected an array, got {describe(value)}", "type")
    if shape.non_empty and not value:
        fail(
            path,
            "an empty array matches nothing; omit the field to match all, or list entries",
            "empty",
        )
    for index, item in enumerate(value):
        check(item, shape.item, f"{path}[{index}]")
