"""Answers from a knowledge table instead of the web.

A run's input (a string, or an object) is matched to one row of the table by the key
column, after normalising case, whitespace and punctuation. Each output-schema property is
filled from the column with the same normalised name ("Headquarters Location" <->
`headquarters_location`), coerced to the property's type (an array from `a; b`, or from a cell
holding a JSON array, such as an array of objects), with a basis entry that cites the
row's `source_url` (or a stable `.invalid` URL naming the entity, so emulated evidence can
never be mistaken for a real web page).

Processor-dependent quality. Some (row, field) cells are *hard*: they need at least a given
processor tier (lite < base < core < core2x < pro < ultra < ultra2x < ultra4x < ultra8x; a
`-fast` variant has its base tier). A cell is hard when

- the table names its tier in a column `<field>__tier` (e.g. `founded_year__tier` = `core`;
  `lite` marks a cell as easy for every processor; an empty cell falls through), or
- `--hard-rate X` draws it: a share X of (row, field) pairs, picked by a hash of
  (seed, row key, field), each with a required tier drawn the same way (mostly base or core,
  some pro, a few ultra).

A processor at or above the required tier answers `high`, and right. One tier short answers
`medium` (sometimes `low`), and is wrong in a share of those cells (`WRONG_ONE_SHORT`): a
plausible other value, the same column of another row of the table; two or more tiers short
answer `low`, half of those cells come back null and half of the rest are wrong. The table
itself stays the truth, so a test can score every answer. Every draw is a hash of the seed and
the cell, so the same row gets the same grade (and the same wrong value) from the same processor
in any run, any order. `<field>__tier` columns are never answered as fields.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from enrich.spec import main_type

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_INT = re.compile(r"-?\d+")
_NUM = re.compile(r"-?\d+(?:\.\d+)?")
DEFAULT_KNOWLEDGE = Path(__file__).resolve().parent.parent / "data" / "companies_knowledge.csv"
TIERS = ("lite", "base", "core", "core2x", "pro", "ultra", "ultra2x", "ultra4x", "ultra8x")
TIER_SUFFIX = "__tier"
HARD_TIERS = (("base", 0.4), ("core", 0.35), ("pro", 0.2), ("ultra", 0.05))  # required tier of a drawn hard cell
WRONG_ONE_SHORT = 0.25  # share of one-tier-short answers that are wrong (another row's value)
WRONG_FAR_SHORT = 0.5  # share of the kept two-or-more-short answers that are wrong


def tier_rank(processor: str) -> int:
    """Rank of a processor's tier: `tier_rank("core-fast")` -> 2 (lite is 0)."""
    return TIERS.index(processor.removesuffix("-fast"))


def _unit(*parts: object) -> float:
    """A uniform draw in [0, 1) that depends only on `parts` (stable across runs and processes)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Quality:
    """Which (row, field) cells are hard, and the confidence a processor earns on them."""

    def __init__(self, seed: int, hard_rate: float):
        if not 0 <= hard_rate <= 1:
            raise ValueError("hard rate must be within 0..1")
        self.seed, self.hard_rate = seed, hard_rate

    def required(self, row_id: str, field: str, cell_tier: str | None) -> int | None:
        """The tier rank a cell needs, or None when any processor answers it well."""
        if cell_tier:
            return tier_rank(cell_tier.strip().lower()) or None
        if self.hard_rate <= 0 or _unit(self.seed, "hard", row_id, field) >= self.hard_rate:
            return None
        x = _unit(self.seed, "tier", row_id, field)
        for name, weight in HARD_TIERS:
            if x < weight:
                return TIERS.index(name)
            x -= weight
        return TIERS.index(HARD_TIERS[-1][0])

    def grade(self, required: int, processor: str, row_id: str, field: str) -> tuple[str, bool, bool]:
        """(confidence, whether a value is given, whether that value is wrong) for a processor answering a
        hard cell."""
        rank = tier_rank(processor)
        gap = required - rank
        if gap <= 0:
            return "high", True, False
        u = _unit(self.seed, "grade", row_id, field, TIERS[rank])
        wrong = _unit(self.seed, "wrong", row_id, field, TIERS[rank])
        if gap == 1:
            return ("medium" if u < 0.7 else "low"), True, wrong < WRONG_ONE_SHORT
        return "low", u >= 0.5, u >= 0.5 and wrong < WRONG_FAR_SHORT


def norm_value(value: Any) -> str:
    """Matching form of a key value: `norm_value(" A.O.  Smith ")` -> 'a o smith'."""
    return _NON_ALNUM.sub(" ", str(value).casefold()).strip()


def norm_name(name: str) -> str:
    """Matching form of a column or property name: 'Headquarters Location' -> 'headquarters_location'."""
    return _NON_ALNUM.sub("_", name.casefold()).strip("_")


def _slug(text: str) -> str:
    return _NON_ALNUM.sub("-", text.casefold()).strip("-") or "entity"


class Knowledge:
    """An in-memory index of the knowledge table: normalised key -> row dict (all strings)."""

    def __init__(self, rows: list[dict[str, str]], key: str):
        self.key = key
        self.rows: dict[str, dict[str, str]] = {}
        self.columns: dict[str, str] = {}  # normalised name -> column name
        self.tier_columns: dict[str, str] = {}  # normalised field name -> its `<field>__tier` column
        for row in rows:
            for col in row:
                if col.endswith(TIER_SUFFIX):
                    self.tier_columns.setdefault(norm_name(col[: -len(TIER_SUFFIX)]), col)
                else:
                    self.columns.setdefault(norm_name(col), col)
            value = row.get(key)
            if value is not None and norm_value(value):
                self.rows.setdefault(norm_value(value), row)

    @classmethod
    def load(cls, path: str | Path | None, key: str) -> Knowledge:
        """Read a CSV (cells kept as strings) or Parquet table; raise ValueError if `key` is absent."""
        import polars as pl

        path = Path(path) if path else DEFAULT_KNOWLEDGE
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path)
            frame = frame.with_columns(pl.all().cast(pl.String))
        else:
            frame = pl.read_csv(path, infer_schema=False, encoding="utf8-lossy")
        if key not in frame.columns:
            raise ValueError(f"{path}: knowledge key column {key!r} not found (columns: {frame.columns})")
        for col in frame.columns:
            if col.endswith(TIER_SUFFIX):
                bad = {
                    v
                    for v in frame[col].drop_nulls().to_list()
                    if v.strip() and v.strip().lower().removesuffix("-fast") not in TIERS
                }
                if bad:
                    raise ValueError(
                        f"{path}: column {col!r} holds {sorted(bad)[:3]}; expected tiers {', '.join(TIERS)}"
                    )
        return cls(frame.to_dicts(), key)

    def match(self, run_input: str | dict[str, Any]) -> dict[str, str] | None:
        """The knowledge row for a run input, or None."""
        if isinstance(run_input, str):
            return self.rows.get(norm_value(run_input))
        wanted = norm_name(self.key)
        for name, value in run_input.items():
            if norm_name(name) == wanted and value is not None:
                return self.rows.get(norm_value(value))
        for value in run_input.values():
            if isinstance(value, str) and (row := self.rows.get(norm_value(value))):
                return row
        return None

    def entity(self, run_input: str | dict[str, Any], row: dict[str, str] | None) -> str:
        if row is not None:
            return str(row[self.key])
        if isinstance(run_input, str):
            return run_input[:80]
        first = next(iter(run_input.values()), "")
        return str(first)[:80]

    def _citation(self, entity: str, row: dict[str, str], column: str) -> dict[str, Any]:
        url = row.get(self.columns.get("source_url", ""), "") or f"https://knowledge.emulator.invalid/{_slug(entity)}"
        return {"url": url, "title": f"{entity} (emulator knowledge table)", "excerpts": [f"{column}: {row[column]}"]}

    def answer(
        self,
        run_input: str | dict[str, Any],
        output_schema: dict[str, Any],
        processor: str = "pro",
        quality: Quality | None = None,
    ) -> dict[str, Any]:
        """Build a TaskRunJsonOutput / TaskRunTextOutput for this input and normalised output schema.

        With `quality`, hard cells (module docstring) are graded for `processor`.
        """
        row = self.match(run_input)
        entity = self.entity(run_input, row)
        kind = output_schema["type"]
        grader = (quality, processor) if quality is not None and row is not None else None
        if kind == "json":
            return self._json_answer(entity, row, output_schema["json_schema"], grader)
        if kind == "auto" and row is not None:
            schema = {
                "type": "object",
                "properties": {
                    norm_name(c): {"type": "string"} for c in row if c != "source_url" and not c.endswith(TIER_SUFFIX)
                },
            }
            out = self._json_answer(entity, row, schema, grader)
            out["output_schema"] = schema
            return out
        return self._text_answer(entity, row)

    def _text_answer(self, entity: str, row: dict[str, str] | None) -> dict[str, Any]:
        if row is None:
            return {
                "type": "text",
                "content": f"No information was found about {entity!r}.",
                "basis": [
                    {
                        "field": "output",
                        "citations": [],
                        "confidence": "low",
                        "reasoning": f"No knowledge-table entry matches {entity!r}.",
                    }
                ],
            }
        facts = [
            f"{c}: {v}"
            for c, v in row.items()
            if v and c not in (self.key, "source_url") and not c.endswith(TIER_SUFFIX)
        ]
        content = f"{entity}. " + "; ".join(facts[:6]) + "."
        return {
            "type": "text",
            "content": content,
            "basis": [
                {
                    "field": "output",
                    "citations": [self._citation(entity, row, self.key)],
                    "confidence": "high",
                    "reasoning": f"Summarised from the knowledge-table row for {entity!r}.",
                }
            ],
        }

    def _json_answer(
        self, entity: str, row: dict[str, str] | None, schema: dict[str, Any], grader: tuple[Quality, str] | None = None
    ) -> dict[str, Any]:
        content: dict[str, Any] = {}
        basis: list[dict[str, Any]] = []
        for prop, sub in (schema.get("properties") or {}).items():
            value, column = self._fill(row, prop, sub if isinstance(sub, dict) else {})
            if grader is not None and row is not None and value is not None and column is not None:
                graded = self._grade(entity, row, prop, column, grader)
                if graded is not None:
                    entry, keep, wrong = graded
                    if keep and wrong:
                        value = self._wrong_value(row, prop, sub if isinstance(sub, dict) else {}, value, grader)
                        shown = json.dumps(value, ensure_ascii=False)  # its evidence says what it answers
                        entry["reasoning"] = f"Hard to establish for {entity!r}; one source found suggests {shown}."
                        for c in entry["citations"]:
                            c["excerpts"] = [f"{column}: {shown}"]
                    content[prop] = value if keep else None
                    basis.append(entry)
                    continue
            content[prop] = value
            if row is None:
                basis.append(
                    {
                        "field": prop,
                        "citations": [],
                        "confidence": "low",
                        "reasoning": f"No knowledge-table entry matches {entity!r}; the value is unknown.",
                    }
                )
            elif value is None or column is None:
                basis.append(
                    {
                        "field": prop,
                        "citations": [],
                        "confidence": "low",
                        "reasoning": f"The knowledge table has no value for {prop!r} of {entity!r}.",
                    }
                )
            else:
                basis.append(
                    {
                        "field": prop,
                        "citations": [self._citation(entity, row, column)],
                        "confidence": "high",
                        "reasoning": f"The knowledge-table row for {entity!r} gives {column} = {row[column]!r}.",
                    }
                )
        return {"type": "json", "content": content, "basis": basis}

    def _wrong_value(
        self, row: dict[str, str], prop: str, schema: dict[str, Any], right: Any, grader: tuple[Quality, str]
    ) -> Any:
        """A plausible wrong answer: the same property of another row (drawn from the seed and the cell), never
        the right value; the right one when no other row has a different value."""
        quality, processor = grader
        others = list(self.rows.values())
        start = int(_unit(quality.seed, "other", norm_value(row[self.key]), prop, processor) * len(others))
        for i in range(len(others)):
            other = others[(start + i) % len(others)]
            value, _ = self._fill(other, prop, schema)
            if value is not None and value != right:
                return value
        return right

    def _grade(
        self, entity: str, row: dict[str, str], prop: str, column: str, grader: tuple[Quality, str]
    ) -> tuple[dict[str, Any], bool, bool] | None:
        """(basis entry, give a value?, is it wrong?) for a hard cell answered by `processor`; None when it is
        easy."""
        quality, processor = grader
        row_id = norm_value(row[self.key])
        field = norm_name(prop)
        tier_col = self.tier_columns.get(field)
        required = quality.required(row_id, field, row.get(tier_col) if tier_col else None)
        if required is None:
            return None
        confidence, keep, wrong = quality.grade(required, processor, row_id, field)
        if confidence == "high":
            reasoning = f"The knowledge-table row for {entity!r} gives {column} = {row[column]!r}."
        elif keep:
            reasoning = (
                f"Hard to establish for {entity!r} ({TIERS[required]} tier or above needed); "
                f"the best source found suggests {row[column]!r}."
            )
        else:
            return (
                {
                    "field": prop,
                    "citations": [],
                    "confidence": "low",
                    "reasoning": f"{processor} could not establish {prop!r} for {entity!r} "
                    f"({TIERS[required]} tier or above needed).",
                },
                False,
                False,
            )
        return (
            {
                "field": prop,
                "citations": [self._citation(entity, row, column)],
                "confidence": confidence,
                "reasoning": reasoning,
            },
            True,
            wrong,
        )

    def _fill(self, row: dict[str, str] | None, prop: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
        """(value coerced to the schema type, source column) for one property."""
        if row is None:
            return None, None
        kind = main_type(schema)
        if kind == "object" and isinstance(schema.get("properties"), dict):
            nested = {}
            used = None
            for child, sub in schema["properties"].items():
                value, col = self._fill(row, f"{prop}_{child}", sub if isinstance(sub, dict) else {})
                if col is None:
                    value, col = self._fill(row, child, sub if isinstance(sub, dict) else {})
                nested[child] = value
                used = used or col
            return (nested if used else None), used
        column = self.columns.get(norm_name(prop))
        if column is None or row.get(column) in (None, ""):
            return None, None
        value = coerce(row[column], schema)
        return value, (column if value is not None else None)


def coerce(raw: str, schema: dict[str, Any]) -> Any:
    """Coerce a table cell to a JSON Schema type; None when it cannot be.

    >>> coerce("2013 (1888)", {"type": "integer"})
    2013
    >>> coerce("a; b", {"type": "array", "items": {"type": "string"}})
    ['a', 'b']

    A cell holding a JSON array answers an array field as written, so a table can hold arrays
    of objects:

    >>> coerce('[{"name": "Ann"}]', {"type": "array", "items": {"type": "object"}})
    [{'name': 'Ann'}]
    """
    kind = main_type(schema)
    text = str(raw).strip()
    if kind == "integer":
        m = _INT.search(text.replace(",", ""))
        return int(m.group()) if m else None
    if kind == "number":
        m = _NUM.search(text.replace(",", ""))
        return float(m.group()) if m else None
    if kind == "boolean":
        low = text.casefold()
        return True if low in ("true", "yes", "1", "y") else False if low in ("false", "no", "0", "n") else None
    if kind == "array":
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if isinstance(parsed, list):
                return parsed
        items: dict[str, Any] = schema["items"] if isinstance(schema.get("items"), dict) else {"type": "string"}
        parts = [p.strip() for p in re.split(r"[;|]", text) if p.strip()]
        return [v for v in (coerce(p, items) for p in parts) if v is not None]
    if "enum" in schema:
        for option in schema["enum"]:
            if str(option).casefold() == text.casefold():
                return option
        return None
    return text
