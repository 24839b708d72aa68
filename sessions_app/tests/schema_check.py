"""A small JSON Schema (2020-12 subset) check, so tests can hold real responses to openapi.json.

Supports $ref, allOf, oneOf, const, enum, type (with lists and null), properties, required,
additionalProperties: false, items, pattern, format (date-time, uuid, uri), minimum/maximum,
minLength/maxLength. In strict mode an object may carry no property the schema does not
document (looking through allOf), so the document cannot fall behind the code.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from pathlib import Path

OPENAPI_FILE = Path(__file__).resolve().parents[1] / "openapi.json"
SPEC = json.loads(OPENAPI_FILE.read_text())

_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        node = SPEC
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _documented(schema: dict) -> set[str]:
    schema = _resolve(schema)
    keys = set(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
        keys |= _documented(sub)
    return keys


def _format_ok(fmt: str, value: str) -> bool:
    try:
        if fmt == "date-time":
            parsed = datetime.fromisoformat(value)
            return parsed.tzinfo is not None
        if fmt == "uuid":
            uuid.UUID(value)
        if fmt == "uri":
            return value.startswith(("http://", "https://"))
    except ValueError:
        return False
    return True


def errors(instance, schema: dict, path: str = "$", strict: bool = True) -> list[str]:
    schema = _resolve(schema)
    out: list[str] = []
    for sub in schema.get("allOf", []):
        out += errors(instance, sub, path, strict=False)
    if "oneOf" in schema:
        matches = [sub for sub in schema["oneOf"] if not errors(instance, sub, path, strict)]
        if len(matches) != 1:
            out.append(f"{path}: matches {len(matches)} of oneOf, not exactly one")
    if "const" in schema and instance != schema["const"]:
        out.append(f"{path}: {instance!r} is not {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        out.append(f"{path}: {instance!r} not in {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](instance) for t in types):
            return [*out, f"{path}: {instance!r} is not of type {types}"]
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                out.append(f"{path}: missing required {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in instance:
                out += errors(instance[key], sub, f"{path}.{key}")
        documented = _documented(schema)
        if schema.get("additionalProperties") is False or (strict and documented):
            extra = set(instance) - documented
            if extra:
                out.append(f"{path}: undocumented properties {sorted(extra)}")
    if isinstance(instance, list) and "items" in schema:
        for index, item in enumerate(instance):
            out += errors(item, schema["items"], f"{path}[{index}]")
    if isinstance(instance, str):
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            out.append(f"{path}: {instance!r} does not match {schema['pattern']}")
        if "format" in schema and not _format_ok(schema["format"], instance):
            out.append(f"{path}: {instance!r} is not a {schema['format']}")
        if len(instance) < schema.get("minLength", 0) or len(instance) > schema.get("maxLength", 10**9):
            out.append(f"{path}: length {len(instance)} out of range")
    if _TYPES["number"](instance):
        if "minimum" in schema and instance < schema["minimum"]:
            out.append(f"{path}: {instance} < {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            out.append(f"{path}: {instance} > {schema['maximum']}")
    return out


def response_schema(path: str, method: str, status: int, content_type: str = "application/json") -> dict:
    operation = SPEC["paths"][path][method.lower()]
    return _resolve(operation["responses"][str(status)])["content"][content_type]["schema"]


def assert_matches(instance, path: str, method: str, status: int, content_type: str = "application/json") -> None:
    problems = errors(instance, response_schema(path, method, status, content_type))
    assert problems == [], f"{method} {path} {status} does not match openapi.json: {problems}"
