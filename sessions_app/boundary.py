"""The input boundary: what every REST, gateway and WebSocket entry checks before anything else.

One module for the three transports, so a hostile input is refused the same way everywhere:

- JSON is parsed with a depth limit (Python's parser recurses, and `"[" * 50000` would raise
  `RecursionError`), and without the `NaN`/`Infinity` literals that are not JSON.
- Strings are valid Unicode without NUL: a lone surrogate (`"\\ud800"`) cannot be encoded
  for the database or a provider, and PostgreSQL text cannot hold NUL.
- Numbers: integers fit a signed 64-bit column, floats are finite; query-string integers are
  range-checked by name.

Each refusal is an `InputRefused` (a `BadInput`, 400) whose message names the field; each
transport answers it in its own error shape. The checks cost next to nothing on ordinary
input: numbers are checked as the parser meets them, and scans of the raw body at C speed
decide whether the parsed value needs walking at all (only when the body holds an escaped
NUL or surrogate, or more brackets than the depth limit).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from sessions_app.errors import BadInput

MAX_DEPTH = 32
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

NOT_JSON = "The body is not valid JSON."
TOO_DEEP = "The JSON nests deeper than {limit} levels."
NOT_A_NUMBER = "NaN and Infinity are not JSON numbers."
LONE_SURROGATE = "{where} holds a lone surrogate (U+D800 to U+DFFF); send valid Unicode text."
NUL_CHARACTER = "{where} holds a NUL character, which is not allowed."
INT_OUT_OF_RANGE = "{where} is out of range ({low} to {high})."
NOT_AN_INTEGER = "{where} must be a whole number from {low} to {high}."

# In raw JSON a NUL or a surrogate can only arrive escaped: raw control characters are invalid
# JSON, and UTF-8 cannot encode a surrogate. Bodies without such an escape (nearly all) skip the
# walk over their strings. A valid surrogate pair (an emoji escaped by `ensure_ascii`) matches
# too and is then let through by the walk, which sees the joined character.
_ESCAPES_BYTES = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
_ESCAPES_TEXT = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")
NUMBER_OUT_OF_RANGE = "A number in the body is out of range ({low} to {high})."


class InputRefused(BadInput):
    """Input refused at the boundary, before anything is read from or written to the database."""

    code = "bad_request"


def _refuse_constant(name: str):
    raise InputRefused(NOT_A_NUMBER)


def _int(text: str) -> int:
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise InputRefused(NUMBER_OUT_OF_RANGE.format(low=INT_MIN, high=INT_MAX))
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as infinity
        raise InputRefused(NOT_A_NUMBER)
    return value


# One decoder for every call: json.loads with hooks would build a new one (and its scanner) each time.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_int, parse_float=_float)


def load_json(raw: bytes | bytearray | str) -> Any:
    """Parse a JSON document within the boundary's limits; raise `InputRefused` otherwise.

    Numbers are checked as the parser meets them; strings and depth by a walk over the parsed
    value, only when a scan of the raw text says they could be wrong.
    """
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass") if isinstance(raw, bytes | bytearray) else raw
        data = _DECODER.decode(text)
    except RecursionError:
        raise InputRefused(TOO_DEEP.format(limit=MAX_DEPTH)) from None
    except (ValueError, UnicodeDecodeError):
        raise InputRefused(NOT_JSON) from None
    if isinstance(raw, str):
        escapes = "\\u" in raw and _ESCAPES_TEXT.search(raw) is not None
        brackets = raw.count("[") + raw.count("{")
    else:
        escapes = b"\\u" in raw and _ESCAPES_BYTES.search(raw) is not None
        brackets = raw.count(b"[") + raw.count(b"{")
    if escapes:
        check_value(data)
    elif brackets > MAX_DEPTH:
        check_depth(data)
    return data


def check_depth(data: Any) -> None:
    """Refuse containers nested deeper than MAX_DEPTH: a walk over containers only, a level at a time."""
    level, depth = ([data] if type(data) is dict or type(data) is list else []), 1
    while level:
        if depth > MAX_DEPTH:
            raise InputRefused(TOO_DEEP.format(limit=MAX_DEPTH))
        below = []
        for value in level:
            for item in value.values() if type(value) is dict else value:
                if type(item) is dict or type(item) is list:
                    below.append(item)
        level, depth = below, depth + 1


def _where(path: tuple) -> str:
    parts: list[str] = []
    while path:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "body" + "".join(reversed(parts))


def check_value(data: Any) -> None:
    """Walk a parsed value: depth, strings (keys too) and numbers; raise `InputRefused` naming the field."""
    stack: list[tuple[Any, int, tuple]] = [(data, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if _BAD_CHARACTER.search(value):
                _refuse_text(value, _where(path))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:
                raise InputRefused(INT_OUT_OF_RANGE.format(where=_where(path), low=INT_MIN, high=INT_MAX))
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InputRefused(NOT_A_NUMBER)
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise InputRefused(TOO_DEEP.format(limit=MAX_DEPTH))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and _BAD_CHARACTER.search(key):
                    _refuse_text(key, _where(path) + " (a key)")
                stack.append((item, depth + 1, (path, key)))


def _refuse_text(value: str, where: str) -> None:
    if "\x00" in value:
        raise InputRefused(NUL_CHARACTER.format(where=where))
    raise InputRefused(LONE_SURROGATE.format(where=where))


def check_text(value: str, where: str) -> str:
    """A string from a query string, a path or a form: refused if it holds NUL or a lone surrogate."""
    if _BAD_CHARACTER.search(value):
        _refuse_text(value, where)
    return value


def check_query(query: Mapping) -> None:
    """Every key and value of a query string (a `QueryDict`)."""
    for key, values in query.lists():
        check_text(key, f"query parameter {key[:40]!r}")
        for value in values:
            check_text(value, f"query parameter {key[:40]!r}")


def int_param(raw: str, where: str, *, low: int, high: int, message: str | None = None) -> int:
    """A whole number from a query string, within [low, high]."""
    refusal = message or NOT_AN_INTEGER.format(where=where, low=low, high=high)
    text = raw.strip()
    # int() would also take "1_000", " 7 " and a 4,300-digit number: a query integer is plain digits.
    if not re.fullmatch(r"[+-]?\d{1,19}", text):
        raise InputRefused(refusal)
    value = int(text)
    if not low <= value <= high:
        raise InputRefused(refusal)
    return value
