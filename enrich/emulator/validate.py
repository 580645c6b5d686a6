"""Request validation of the emulated Task API (parallel-task-api.md sections 3.1 and 4).

The rules themselves live in `enrich/spec.py`, shared with the config loader; this module
turns a broken rule into the HTTP answer the real service gives. Each check raises
`Invalid(status, message)`; warnings that the real service reports on the run (not as
errors) are returned as `Warning` dicts.
"""

from __future__ import annotations

from typing import Any

from enrich import spec as rules
from enrich.processors import PROCESSORS


class Invalid(Exception):
    """An API error answer: HTTP `status`, the message, and the request location (`loc`)."""

    def __init__(self, status: int, message: str, loc: list[Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.loc = status, message, loc or ["body"]


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


def validate_json_schema(schema: Any) -> list[dict[str, Any]]:
    """Check a json output schema (422 if the API would refuse it); return the run warnings."""
    if (problem := rules.schema_problem(schema)) is not None:
        raise Invalid(422, problem)
    return [_warning(text) for text in rules.schema_warnings(schema)]


def _warning(message: str) -> dict[str, Any]:
    return {"type": "spec_validation_warning", "message": message, "detail": None}


def validate_metadata(metadata: Any) -> None:
    """422 for run or group metadata the API would refuse."""
    if (problem := rules.metadata_problem(metadata)) is not None:
        raise Invalid(422, problem, ["body", "metadata"] if not isinstance(metadata, dict) else None)


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
    spec: Any = body.get("task_spec") or default_spec
    warnings: list[dict[str, Any]] = []
    if spec is not None:
        if not isinstance(spec, dict) or "output_schema" not in spec:
            raise Invalid(422, "task_spec.output_schema is required", ["body", "task_spec"])
        out = normalize_output_schema(spec)
        if out["type"] == "json":
            warnings = validate_json_schema(out.get("json_schema"))
        problem = rules.size_problem(rules.json_chars(spec), rules.json_chars(body["input"]))
        if problem is not None:
            raise Invalid(422, problem)
    return spec, warnings
