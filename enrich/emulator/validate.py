"""Request validation rules of the real Task API (parallel-task-api.md sections 3.1 and 4).

Each check raises `Invalid(status, message)`; warnings that the real service reports on the
run (not as errors) are returned as `Warning` dicts.
"""

from __future__ import annotations

import json
from typing import Any

from enrich.processors import PROCESSORS

UNSUPPORTED_KEYWORDS = frozenset(
    ["contains", "format", "maxContains", "maxItems", "maxLength", "maxProperties", "maximum", "minContains", "minItems", "minLength", "minimum", "minProperties", "multipleOf", "pattern", "patternProperties", "propertyNames", "uniqueItems", "unevaluatedItems", "unevaluatedProperties"]
)
RESERVED_FIELD_NAMES = frozenset(
    ["citations", "confidence", "evidence", "reasoning", "source", "sources", "source_urls"]
)
MAX_DEPTH = 5
MAX_PROPERTIES = 100
MAX_ENUM_VALUES = 500
MAX_SPEC_CHARS = 15_000
MAX_SPEC_AND_INPUT_CHARS = 25_000
MAX_METADATA_KEY = 16
MAX_METADATA_VALUE = 512


class Invalid(Exception):
    def __init__(self, status: int, message: str, loc: list[Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.loc = status, message, loc or ["body"]


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def normalize_output_schema(spec: dict[str, Any] | None) -> dict[str, Any]:
    """Return the output schema as a dict with `type` json|text|auto (a bare string is text)."""
    if spec is None:
        return {"type": "auto"}
    out = spec.get("output_schema")
    if isinstance(out, str):
        return {"type": "text", "description": out}
    if not isinstance(out, dict):
        raise Invalid(422, "task_spec.output_schema must be a string or an object", ["body", "task_spec"])
    kind = out.get("type") or ("json" if "json_schema" in out else None)
    if kind not in ("json", "text", "auto"):
        raise Invalid(422, f"task_spec.output_schema.type must be json, text or auto, not {kind!r}")
    return {**out, "type": kind}


def _walk(node: Any, depth: int, counts: dict[str, int], path: str) -> None:
    if not isinstance(node, dict):
        return
    bad = UNSUPPORTED_KEYWORDS.intersection(node)
    if bad:
        raise Invalid(422, f"unsupported JSON Schema keyword(s) {sorted(bad)} at {path or 'root'}")
    if "enum" in node:
        values = node["enum"] if isinstance(node["enum"], list) else []
        if len(values) > MAX_ENUM_VALUES:
            raise Invalid(422, f"enum at {path} has {len(values)} values (max {MAX_ENUM_VALUES})")
        if len(values) > 250 and sum(len(str(v)) for v in values) > 7_500:
            raise Invalid(422, f"enum at {path}: total string length over 7,500 characters")
    props = node.get("properties")
    if isinstance(props, dict):
        if depth > MAX_DEPTH:
            raise Invalid(422, f"schema nesting deeper than {MAX_DEPTH} levels at {path}")
        counts["properties"] += len(props)
        for name, child in props.items():
            _walk(child, depth + 1, counts, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], depth, counts, f"{path}[]")
    for key in ("anyOf", "oneOf", "allOf"):
        for child in node.get(key) or []:
            _walk(child, depth, counts, path)
    for child in (node.get("$defs") or node.get("definitions") or {}).values():
        _walk(child, depth, counts, path)


def validate_json_schema(schema: Any) -> list[dict[str, Any]]:
    """Check a json output schema; return the run warnings the real service would attach."""
    if not isinstance(schema, dict):
        raise Invalid(422, "json_schema must be an object")
    if "anyOf" in schema:
        raise Invalid(422, "the root of json_schema cannot be anyOf")
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise Invalid(422, "the root of json_schema must be type 'object' with 'properties'")
    counts = {"properties": 0}
    _walk(schema, 1, counts, "")
    if counts["properties"] > MAX_PROPERTIES:
        raise Invalid(422, f"json_schema has {counts['properties']} properties (max {MAX_PROPERTIES})")
    warnings = []
    props = schema["properties"]
    missing = sorted(set(props) - set(schema.get("required") or []))
    if missing:
        warnings.append(_warning(f"properties not in 'required': {missing}; use ['type','null'] for optional"))
    if schema.get("additionalProperties", True) is not False:
        warnings.append(_warning("additionalProperties should be false"))
    reserved = sorted(RESERVED_FIELD_NAMES.intersection(props))
    if reserved:
        warnings.append(_warning(f"field names {reserved} duplicate the basis; rename them"))
    return warnings


def _warning(message: str) -> dict[str, Any]:
    return {"type": "spec_validation_warning", "message": message, "detail": None}


def validate_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise Invalid(422, "metadata must be an object", ["body", "metadata"])
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise Invalid(422, f"metadata key {key[:20]!r} longer than {MAX_METADATA_KEY} characters")
        if isinstance(value, bool | int | float):
            continue
        if not isinstance(value, str):
            raise Invalid(422, f"metadata value for {key!r} must be a string, number or boolean")
        if len(value) > MAX_METADATA_VALUE:
            raise Invalid(422, f"metadata value for {key!r} longer than {MAX_METADATA_VALUE} characters")


def validate_run_input(body: Any, default_spec: dict[str, Any] | None = None) -> tuple[dict[str, Any], list]:
    """Validate one TaskRunInput; return (effective task_spec or None, warnings).

    Order mirrors the real service: shape (422), processor (403), spec rules (422), sizes (422).
    """
    if not isinstance(body, dict):
        raise Invalid(422, "request body must be a JSON object")
    if "input" not in body or not isinstance(body["input"], str | dict):
        raise Invalid(422, "'input' is required and must be a string or an object", ["body", "input"])
    processor = body.get("processor")
    if not isinstance(processor, str):
        raise Invalid(422, "'processor' is required", ["body", "processor"])
    if processor not in PROCESSORS:
        raise Invalid(403, f"Invalid processor: {processor!r}")
    validate_metadata(body.get("metadata"))
    spec = body.get("task_spec") or default_spec
    warnings: list[dict[str, Any]] = []
    if spec is not None:
        if not isinstance(spec, dict) or "output_schema" not in spec:
            raise Invalid(422, "task_spec.output_schema is required", ["body", "task_spec"])
        out = normalize_output_schema(spec)
        if out["type"] == "json":
            warnings = validate_json_schema(out.get("json_schema"))
        spec_chars = len(_dumps(spec))
        if spec_chars > MAX_SPEC_CHARS:
            raise Invalid(422, f"task spec is {spec_chars} characters (max {MAX_SPEC_CHARS})")
        total = spec_chars + len(_dumps(body["input"]))
        if total > MAX_SPEC_AND_INPUT_CHARS:
            raise Invalid(422, f"task spec + input is {total} characters (max {MAX_SPEC_AND_INPUT_CHARS})")
    return spec, warnings
