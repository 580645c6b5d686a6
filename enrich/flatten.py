"""Pure: one raw `{run, output}` result -> flat output columns.

For each top-level output field F: `F` (nested objects flattened as `F.child`), then
`F__confidence` (the API's string: high/medium/low, "" or null, as given), `F__citations`
(list of URLs) and, when asked, `F__reasoning`. Lists stay lists (Parquet list columns;
the CSV writer turns them into JSON arrays).
"""

from __future__ import annotations

import json
from typing import Any

from enrich.files import INT64_MAX, INT64_MIN
from enrich.spec import main_type

META_COLUMNS = ("_enrich_status", "_enrich_error", "_enrich_run_id", "_enrich_latency_s")  # after every field


def value_columns(name: str, schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(column, schema) for a field's value; objects expand to `name.child` columns."""
    if main_type(schema) == "object" and isinstance(schema.get("properties"), dict):
        out = []
        for child, sub in schema["properties"].items():
            out.extend(value_columns(f"{name}.{child}", sub if isinstance(sub, dict) else {}))
        return out
    return [(name, schema)]


Column = tuple[str, str, Any, str, str]  # (name, kind, schema, field, role)


def output_columns(fields: dict[str, dict[str, Any]], reasoning: bool) -> list[Column]:
    """Every output column in order: (name, kind, schema, field, role).

    kind is a JSON type or 'citations'; role is value | confidence | citations | reasoning.
    """
    cols: list[Column] = []
    for name, schema in fields.items():
        for col, sub in value_columns(name, schema):
            cols.append((col, main_type(sub), sub, name, "value"))
        cols.append((f"{name}__confidence", "string", None, name, "confidence"))
        cols.append((f"{name}__citations", "citations", None, name, "citations"))
        if reasoning:
            cols.append((f"{name}__reasoning", "string", None, name, "reasoning"))
        cols.append((f"{name}__decision", "string", None, name, "decision"))  # decide.py: the gate's verdict
        cols.append((f"{name}__processor", "string", None, name, "processor"))  # whose answer is kept, or human
    return cols


def coerce(value: Any, kind: str, schema: dict[str, Any] | None = None) -> Any:
    """Best-effort cast of an API value to its column type; None when it cannot be cast.

    >>> coerce("1998", "integer"), coerce(3, "string"), coerce("x", "number")
    (1998, '3', None)
    """
    if value is None:
        return None
    try:
        if kind == "integer":
            if isinstance(value, bool):
                return int(value)
            if isinstance(value, float) and not value.is_integer():
                return None
            number = int(value) if not isinstance(value, str) else int(value.strip())
            return number if INT64_MIN <= number <= INT64_MAX else None  # an int64 column cannot hold it
        if kind == "number":
            return float(value)
        if kind == "boolean":
            if isinstance(value, bool):
                return value
            low = str(value).strip().casefold()
            return True if low == "true" else False if low == "false" else None
        if kind == "array":
            items = (schema or {}).get("items") or {}
            if not isinstance(value, list):
                return None
            ik = main_type(items)
            if ik == "object":  # kept as objects: each file format encodes them once (write.py)
                return [v if isinstance(v, dict) else None for v in value]
            return [coerce(v, ik, items) for v in value]
    except (TypeError, ValueError, OverflowError):
        return None
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def _dig(content: Any, dotted: str) -> Any:
    node = content
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def flatten(
    result: dict[str, Any] | None,
    fields: dict[str, dict[str, Any]],
    reasoning: bool,
    columns: list[Column] | None = None,
) -> dict[str, Any]:
    """Flat column -> value for one row (all columns present; None where there is nothing)."""
    columns = columns if columns is not None else output_columns(fields, reasoning)
    out: dict[str, Any] = dict.fromkeys(c[0] for c in columns)
    output = (result or {}).get("output") if isinstance(result, dict) else None
    if not isinstance(output, dict):
        return out
    content = output.get("content")
    if output.get("type") == "text" or isinstance(content, str):
        content = {"output": content}
    basis: dict[str, dict[str, Any]] = {}
    for entry in output.get("basis") or []:
        if isinstance(entry, dict) and isinstance(entry.get("field"), str):
            basis.setdefault(entry["field"], entry)
    for col, kind, schema, field, role in columns:
        if role == "value":
            out[col] = coerce(_dig(content, col), kind, schema)
            continue
        entry = basis.get(field)
        if entry is None or role in ("decision", "processor"):
            continue
        if role == "confidence":
            conf = entry.get("confidence")
            out[col] = conf if conf is None else str(conf)
        elif role == "citations":
            cites = entry.get("citations") or []
            out[col] = [str(c["url"]) for c in cites if isinstance(c, dict) and c.get("url")]
        elif role == "reasoning":
            r = entry.get("reasoning")
            out[col] = r if r is None else str(r)
    return out
