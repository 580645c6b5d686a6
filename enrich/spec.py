"""The Task API's rules for task specs, in one place (parallel-task-api.md sections 3.1 and 4).

Both sides of the wire use this module: `config.py` checks a job's output schema before
anything is paid for, and the emulator (`emulator/validate.py`) answers 422 for the same
reasons the real service does. Keeping one copy means the tool and its emulator cannot drift
apart on what a valid spec is.

Everything here is pure. Checks return a one-line problem (or None, or a list of warning
texts) instead of raising, so each caller wraps it in its own error: `ConfigError` for the
CLI, an HTTP 422 for the emulator.
"""

from __future__ import annotations

import json
from typing import Any, Literal

# JSON Schema type names the API accepts in `type` (a name or a list of names).
JSON_TYPES = frozenset(["string", "integer", "number", "boolean", "array", "object", "null"])
# What a `[task.output.<field>]` table may declare; nullability is added by config.py.
FieldType = Literal["string", "integer", "number", "boolean", "array", "object"]

UNSUPPORTED_KEYWORDS = frozenset(
    [
        "contains",
        "format",
        "maxContains",
        "maxItems",
        "maxLength",
        "maxProperties",
        "maximum",
        "minContains",
        "minItems",
        "minLength",
        "minimum",
        "minProperties",
        "multipleOf",
        "pattern",
        "patternProperties",
        "propertyNames",
        "uniqueItems",
        "unevaluatedItems",
        "unevaluatedProperties",
    ]
)
# Field names the basis already covers: the API accepts them with a warning.
RESERVED_FIELD_NAMES = frozenset(
    ["citations", "confidence", "evidence", "reasoning", "source", "sources", "source_urls"]
)
MAX_DEPTH = 5
MAX_PROPERTIES = 100
MAX_ENUM_VALUES = 500
LONG_ENUM_VALUES = 250  # above this many values, the enum's total string length is capped...
MAX_LONG_ENUM_CHARS = 7_500  # ...at this many characters
MAX_SPEC_CHARS = 15_000
MAX_SPEC_AND_INPUT_CHARS = 25_000
MAX_METADATA_KEY = 16
MAX_METADATA_VALUE = 512


def json_chars(value: Any) -> int:
    """Length of `value` as compact JSON, the measure the API's size limits use.

    >>> json_chars({"a": [1, 2]})
    11
    """
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))


def main_type(schema: Any) -> str:
    """The one JSON type a column of this schema holds: the first non-null type, else 'string'.

    >>> main_type({"type": ["integer", "null"]}), main_type({"anyOf": [{"type": "null"}, {"type": "number"}]})
    ('integer', 'number')
    >>> main_type({}), main_type(None)
    ('string', 'string')
    """
    if not isinstance(schema, dict):
        return "string"
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind is None and isinstance(schema.get("anyOf"), list):
        kinds = [main_type(s) for s in schema["anyOf"] if isinstance(s, dict) and s.get("type") != "null"]
        kind = kinds[0] if kinds else None
    return str(kind) if kind else "string"


def _type_problem(kind: Any, where: str, in_union: bool) -> str | None:
    """Why a `type` value is not one the API accepts (unknown name, or null standing alone)."""
    names = kind if isinstance(kind, list) else [kind]
    if not names or not all(isinstance(n, str) for n in names):
        return f"{where}: 'type' must be a type name or a list of them"
    unknown = [n for n in names if n not in JSON_TYPES]
    if unknown:
        return (
            f"{where}: unknown type {unknown[0]!r}; use one of "
            f"{', '.join(sorted(JSON_TYPES - {'null'}))} (add 'null' in a list for optional values)"
        )
    if not in_union and all(n == "null" for n in names):
        return f'{where}: a property cannot be only \'null\'; use ["<type>", "null"] for an optional value'
    return None


def _walk(node: Any, depth: int, counts: dict[str, int], path: str, in_union: bool = False) -> str | None:
    if not isinstance(node, dict):
        return None
    where = path or "root"
    bad = UNSUPPORTED_KEYWORDS.intersection(node)
    if bad:
        return f"unsupported JSON Schema keyword(s) {sorted(bad)} at {where}"
    if "type" in node and (problem := _type_problem(node["type"], where, in_union)):
        return problem
    if "enum" in node:
        values = node["enum"] if isinstance(node["enum"], list) else []
        if len(values) > MAX_ENUM_VALUES:
            return f"enum at {where} has {len(values)} values (max {MAX_ENUM_VALUES})"
        if len(values) > LONG_ENUM_VALUES and sum(len(str(v)) for v in values) > MAX_LONG_ENUM_CHARS:
            return f"enum at {where}: total string length over {MAX_LONG_ENUM_CHARS:,} characters"
    props = node.get("properties")
    children: list[tuple[Any, int, str, bool]] = []
    if isinstance(props, dict):
        if depth > MAX_DEPTH:
            return f"schema nesting deeper than {MAX_DEPTH} levels at {where}"
        counts["properties"] += len(props)
        children += [(child, depth + 1, f"{path}.{name}" if path else name, False) for name, child in props.items()]
    if isinstance(node.get("items"), dict):
        children.append((node["items"], depth, f"{path}[]", False))
    for key in ("anyOf", "oneOf", "allOf"):
        children += [(child, depth, path, True) for child in node.get(key) or []]
    children += [(child, depth, path, False) for child in (node.get("$defs") or node.get("definitions") or {}).values()]
    for child, d, p, union in children:
        if (problem := _walk(child, d, counts, p, union)) is not None:
            return problem
    return None


def schema_problem(schema: Any) -> str | None:
    """Why the API would reject this `json_schema` with a 422, or None if it would accept it.

    >>> schema_problem({"type": "object", "properties": {"a": {"type": "strin"}}})[:24]
    "a: unknown type 'strin';"
    >>> schema_problem({"type": "object", "properties": {"a": {"type": ["string", "null"]}}}) is None
    True
    """
    if not isinstance(schema, dict):
        return "json_schema must be an object"
    if "anyOf" in schema:
        return "the root of json_schema cannot be anyOf"
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        return "the root of json_schema must be type 'object' with 'properties'"
    counts = {"properties": 0}
    if (problem := _walk(schema, 1, counts, "")) is not None:
        return problem
    if counts["properties"] > MAX_PROPERTIES:
        return f"json_schema has {counts['properties']} properties (max {MAX_PROPERTIES})"
    return None


def schema_warnings(schema: dict[str, Any]) -> list[str]:
    """The warnings the API attaches to a run for an accepted schema (not errors)."""
    warnings = []
    props = schema.get("properties") or {}
    missing = sorted(set(props) - set(schema.get("required") or []))
    if missing:
        warnings.append(f"properties not in 'required': {missing}; use ['type','null'] for optional")
    if schema.get("additionalProperties", True) is not False:
        warnings.append("additionalProperties should be false")
    reserved = sorted(RESERVED_FIELD_NAMES.intersection(props))
    if reserved:
        warnings.append(f"field names {reserved} duplicate the basis; rename them")
    return warnings


def metadata_problem(metadata: Any) -> str | None:
    """Why run metadata would be rejected (keys <= 16 chars, values <= 512 chars, scalars only)."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "metadata must be an object"
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            return f"metadata key {key[:20]!r} longer than {MAX_METADATA_KEY} characters"
        if isinstance(value, bool | int | float):
            continue
        if not isinstance(value, str):
            return f"metadata value for {key!r} must be a string, number or boolean"
        if len(value) > MAX_METADATA_VALUE:
            return f"metadata value for {key!r} longer than {MAX_METADATA_VALUE} characters"
    return None


def size_problem(spec_chars: int, input_chars: int) -> str | None:
    """Why a spec of `spec_chars` plus an input of `input_chars` (compact JSON) is too big, or None.

    >>> size_problem(100, 24_900) is None, size_problem(100, 24_901)
    (True, 'task spec + input is 25,001 characters (max 25,000)')
    """
    if spec_chars > MAX_SPEC_CHARS:
        return f"task spec is {spec_chars:,} characters (max {MAX_SPEC_CHARS:,})"
    if spec_chars + input_chars > MAX_SPEC_AND_INPUT_CHARS:
        return f"task spec + input is {spec_chars + input_chars:,} characters (max {MAX_SPEC_AND_INPUT_CHARS:,})"
    return None
