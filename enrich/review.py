"""The human review round trip: `<output stem>.review.csv` out, verdicts back in.

`write_review` exports one line per (row, field) whose decision is `review` or still
`rejected`, with the evidence a reviewer needs, and four empty columns to fill in:

    <key columns…>, field, value, confidence, processor, reasoning, citations, run_id,
    verdict, corrected_value, reviewer, note

- `value` and `corrected_value` share one encoding: text as is, anything else as JSON
  (`1998`, `true`, `["Ann", "Bob"]`); an empty cell is no value.
- `citations` is a JSON array, one citation per line: `{"url", "title", "excerpt"}` with
  the first excerpt only.
- `verdict` is accept | correct | reject (any case); blank = not reviewed yet.
- Every text cell is formula-guarded: a `'` is put before text starting with = + - @ tab CR
  NUL or `'` (numbers excepted). `read_review` strips exactly that one `'` again, so keys and
  values survive the round trip, also after a spreadsheet dropped the `'`.

`read_review` is all-or-nothing: any problem raises InputError naming the file, the line
of the first problem and how many more there are; nothing is applied from a bad file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from enrich.errors import ConfigError, InputError
from enrich.files import INT64_MAX, INT64_MIN, NUMERIC, atomic_write, encode_cell, guard, unguard
from enrich.gate import FieldAnswer, MergedRow, Verdict
from enrich.spec import main_type

EVIDENCE_COLUMNS = ("field", "value", "confidence", "processor", "reasoning", "citations", "run_id")
VERDICT_COLUMNS = ("verdict", "corrected_value", "reviewer", "note")
REQUIRED_COLUMNS = ("field", "verdict", "corrected_value")  # reviewers may delete the others
VERDICTS = ("accept", "correct", "reject")
TO_REVIEW = ("review", "rejected")


def review_columns(key_columns: Sequence[str]) -> list[str]:
    """The header; raises ConfigError when a key column clashes with a review column (check it in preflight)."""
    fixed = (*EVIDENCE_COLUMNS, *VERDICT_COLUMNS)
    if clash := [k for k in key_columns if k in fixed]:
        raise ConfigError(f"key column {clash[0]!r} has the name of a review-file column; rename it in the input")
    if len(set(key_columns)) != len(key_columns):
        raise ConfigError("key columns repeat a name")
    return [*key_columns, *fixed]


def encode_citations(entries: Iterable[Mapping[str, Any] | None]) -> str:
    """Citations of basis entries as a JSON array, one `{"url", "title", "excerpt"}` per line."""
    items = []
    for entry in entries:
        for c in (entry or {}).get("citations") or []:
            if isinstance(c, Mapping) and c.get("url"):
                excerpts = c.get("excerpts") or []
                first = excerpts[0] if isinstance(excerpts, list) and excerpts else None
                items.append(
                    json.dumps({"url": str(c["url"]), "title": c.get("title"), "excerpt": first}, ensure_ascii=False)
                )
    return "[" + ",\n".join(items) + "]" if items else ""


def _evidence(answer: FieldAnswer) -> tuple[str, str]:
    """(reasoning, citations) of an answer; element entries stand in when the field has none."""
    entries = [answer.basis] if answer.basis else list(answer.elements)
    reasons = [str(e.get("reasoning") or "") for e in entries]
    if answer.basis is None and len(entries) > 1:
        reasons = [f"[{i}] {r}" for i, r in enumerate(reasons)]
    return "\n".join(r for r in reasons if r), encode_citations(entries)


def to_review(row: MergedRow) -> Iterator[tuple[str, FieldAnswer]]:
    """(field, answer) of every line `row` contributes to the review file: decision review or rejected."""
    return ((name, answer) for name, answer in row.fields.items() if answer.decision in TO_REVIEW)


def confidence_cell(answer: FieldAnswer) -> str:
    """An answer's confidence as the review file shows it: a label, or a number's repr."""
    return answer.confidence if isinstance(answer.confidence, str) else repr(answer.confidence)


def review_lines(row: MergedRow, n_keys: int) -> Iterator[list[str]]:
    """The unguarded cells of every line `row` contributes to the review file."""
    if len(row.key) != n_keys:
        raise ValueError(f"row key {row.key!r} does not have {n_keys} values")
    for name, answer in to_review(row):
        reasoning, citations = _evidence(answer)
        yield [
            *row.key,
            name,
            encode_cell(answer.value),
            confidence_cell(answer),
            answer.processor or "",
            reasoning,
            citations,
            answer.run_id or "",
            "",
            "",
            "",
            "",
        ]


def write_review(
    path: Path, rows: Iterable[MergedRow], key_columns: Sequence[str], *, formula_guard: bool = True
) -> int:
    """Write the review file atomically (UTF-8, streamed row by row); return the number of lines.

    Raises ConfigError when a key column clashes with a review column name.
    """
    n = len(key_columns)
    return write_review_cells(
        path, (cells for row in rows for cells in review_lines(row, n)), key_columns, formula_guard=formula_guard
    )


def write_review_cells(
    path: Path, lines: Iterable[list[str]], key_columns: Sequence[str], *, formula_guard: bool = True
) -> int:
    """Write already-built review lines (from `review_lines`) atomically; return how many."""
    header = review_columns(key_columns)
    count = 0

    def write(fp: Any) -> None:
        nonlocal count
        text = io.TextIOWrapper(fp, encoding="utf-8", newline="")
        out = csv.writer(text, lineterminator="\r\n")  # RFC 4180; with "\n" a lone \r in a cell is left unquoted
        out.writerow([guard(h) if formula_guard else h for h in header])
        for cells in lines:
            out.writerow([guard(c) if formula_guard else c for c in cells])
            count += 1
        text.flush()
        text.detach()

    atomic_write(Path(path), write)
    return count


def _kind_nullable(schema: Mapping[str, Any]) -> tuple[str, bool]:
    """(spec.main_type, may it be null?) of a field schema."""
    kind = schema.get("type", "string")
    return main_type(dict(schema)), kind == "null" or (isinstance(kind, list) and "null" in kind)


def fits(value: Any, schema: Mapping[str, Any], where: str = "value") -> str | None:
    """Why `value` does not fit the JSON schema (types, items, properties, enum), or None.

    >>> fits([1, "x"], {"type": "array", "items": {"type": "integer"}})
    'value[1] is not an integer'
    """
    kind, nullable = _kind_nullable(schema)
    if value is None:
        return None if nullable else f"{where} is null"
    checks = {
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    if not checks.get(kind, lambda v: True)(value):
        return f"{where} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    if kind == "integer" and not INT64_MIN <= value <= INT64_MAX:
        return f"{where} is beyond the 64-bit integer range an output column can hold"
    enum = schema.get("enum")
    if isinstance(enum, list) and value not in enum:
        return f"{where} is not one of {', '.join(json.dumps(e) for e in enum if e is not None)}"
    if kind == "array" and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            if (problem := fits(item, schema["items"], f"{where}[{i}]")) is not None:
                return problem
    if kind == "object" and isinstance(schema.get("properties"), Mapping):
        props = schema["properties"]
        if extra := [k for k in value if k not in props]:
            return f"{where} has unknown key {extra[0]!r}"
        for k, sub in props.items():
            if k not in value:
                return f"{where} lacks key {k!r}"
            if (problem := fits(value[k], sub, f"{where}.{k}")) is not None:
                return problem
    return None


def parse_value(text: str, schema: Mapping[str, Any]) -> Any:
    """Read a corrected value typed by a reviewer; raises ValueError saying why it does not fit.

    >>> parse_value("1998", {"type": ["integer", "null"]}), parse_value('["a"]', {"type": "array"})
    (1998, ['a'])
    """
    kind, _ = _kind_nullable(schema)
    if kind == "string":
        value: Any = text
    elif kind == "integer" and re.fullmatch(r"\s*[+-]?\d+\s*", text):
        value = int(text)
    elif kind == "number" and NUMERIC.match(text.strip()):
        value = float(text) if any(c in text for c in ".eE") else int(text)
    elif kind == "boolean" and text.strip().casefold() in ("true", "false"):
        value = text.strip().casefold() == "true"
    elif kind in ("array", "object"):
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"corrected_value is not valid JSON for a field of type {kind}") from None
    else:
        raise ValueError(f"corrected_value {text!r} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind}")
    if (problem := fits(value, schema, "corrected_value")) is not None:
        raise ValueError(problem)
    return value


def read_review(
    path: Path,
    key_columns: Sequence[str],
    fields_schema: Mapping[str, Mapping[str, Any]],
    known_keys: Container[tuple[str, ...]],
) -> list[Verdict]:
    """The verdicts of a filled-in review file, in file order; lines with a blank verdict are skipped.

    Checks: header has the key columns and field/verdict/corrected_value; then every line as
    `check_verdicts` does. Raises InputError(file, line, problem) and returns nothing when any line
    is bad. The file is UTF-8 CSV separated by `,`, `;` or tab (whichever splits the header into its
    columns); a workbook or another encoding is refused saying how to save it.
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(name, f"cannot read review file: {exc.strerror or exc}") from None
    raw = _review_text(name, data)
    return check_verdicts(name, _review_cells(name, raw, key_columns), key_columns, fields_schema, known_keys)


def _review_cells(name: str, raw: str, key_columns: Sequence[str]) -> Iterator[tuple[int, Mapping[str, str] | str]]:
    """(first line, the line's unguarded cells by column) of each data line of a review file's text, or (line,
    problem) for a line that cannot be read; InputError for a bad header."""
    # a spreadsheet set to a language that writes decimal commas saves CSV with ';' (even "CSV UTF-8")
    sep = _separator(raw, [*key_columns, *REQUIRED_COLUMNS])
    reader = csv.reader(io.StringIO(raw, newline=""), strict=True, delimiter=sep)
    limit = csv.field_size_limit(max(len(raw), 1 << 17))  # no cell is longer than the file it is in
    try:
        header = [unguard(h) for h in next(reader, [])]
        missing = [c for c in (*key_columns, *REQUIRED_COLUMNS) if c not in header]
        if missing or len(set(header)) != len(header):
            why = f"missing column {missing[0]!r}" if missing else "a column name repeats"
            raise InputError(name, f"header: {why}; expected {', '.join(review_columns(key_columns))}", line=1)
        at = {h: i for i, h in enumerate(header)}
        line = reader.line_num + 1
        for cells in reader:
            start, line = line, reader.line_num + 1
            if len(cells) > len(header):
                yield start, f"{len(cells)} cells but the header has {len(header)}"
                continue
            yield start, {h: unguard(cells[i]) if i < len(cells) else "" for h, i in at.items()}
    except csv.Error as exc:
        yield reader.line_num, f"malformed CSV: {exc}"
    finally:
        csv.field_size_limit(limit)


def check_verdicts(
    name: str,
    lines: Iterable[tuple[int | None, Mapping[str, str] | str]],
    key_columns: Sequence[str],
    fields_schema: Mapping[str, Mapping[str, Any]],
    known_keys: Container[tuple[str, ...]],
) -> list[Verdict]:
    """The verdicts of review lines, each given as (line number, its cells by review-file column) or (line, the
    problem found reading it): the one validation of verdicts, for a review file and the review page alike.

    Checks: every reviewed line names a known key and output field; verdict is accept|correct|reject;
    `correct` needs a corrected value that fits the field's JSON type, the others must leave it blank;
    one verdict per (row, field). A line with a blank verdict and corrected value is skipped. Raises
    InputError(name, line, problem) for the first problem (and says how many more) and returns nothing
    when any line is bad.
    """
    problems: list[tuple[int | None, str]] = []
    verdicts: list[Verdict] = []
    seen: dict[tuple[tuple[str, ...], str], int | None] = {}
    for start, cell in lines:
        if isinstance(cell, str):
            problems.append((start, cell))
            continue
        verdict_text = cell["verdict"].strip().casefold()
        if not verdict_text and not cell["corrected_value"]:
            continue
        problem, verdict = _check_line(cell, key_columns, fields_schema, known_keys, verdict_text, start)
        if problem is None and verdict is not None:
            where = (verdict.key, verdict.field)
            if where in seen:
                problem = f"second verdict for {verdict.field!r} of this row (first on line {seen[where]})"
            else:
                seen[where] = start
                verdicts.append(verdict)
        if problem is not None:
            problems.append((start, problem))
    if problems:
        first_line, reason = problems[0]
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise InputError(name, reason + more, line=first_line)
    return verdicts


def _review_text(name: str, data: bytes) -> str:
    """The review file's text; InputError with what to do for a workbook or a file not saved as UTF-8."""
    if data.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):  # a zip (.xlsx) or an OLE (.xls) file
        raise InputError(
            name,
            "this is an Excel workbook, not a CSV file: open it in Excel and use File > Save As > "
            "'CSV UTF-8 (Comma delimited) (*.csv)', then apply that .csv file",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        try:
            data.decode("cp1252")
            guess = "it looks saved as Windows-1252 (Excel's plain 'CSV (Comma delimited)')"
        except UnicodeDecodeError:
            guess = "it was saved in another encoding"
        raise InputError(
            name,
            f"not UTF-8 (byte 0x{data[exc.start]:02X} at offset {exc.start}): {guess}; save it again as "
            "'CSV UTF-8 (Comma delimited)' and apply that file",
            line=line,
        ) from None


def _separator(raw: str, required: Sequence[str]) -> str:
    """`,`, or the separator (`;` or tab) that splits the header into the required columns when commas do not.

    >>> _separator("company;field;verdict;corrected_value", ["company", "field"])
    ';'
    """
    first = raw.split("\n", 1)[0]
    for sep in (",", ";", "\t"):
        cells = next(csv.reader(io.StringIO(first, newline=""), delimiter=sep), [])
        if all(c in [unguard(h) for h in cells] for c in required):
            return sep
    return ","


def _check_line(
    cell: Mapping[str, str],
    key_columns: Sequence[str],
    fields_schema: Mapping[str, Mapping[str, Any]],
    known_keys: Container[tuple[str, ...]],
    verdict_text: str,
    line: int | None,
) -> tuple[str | None, Verdict | None]:
    key = tuple(cell[k] for k in key_columns)
    if key not in known_keys:
        shown = ", ".join(f"{k}={v!r}" for k, v in zip(key_columns, key, strict=True))
        return f"unknown row key {shown}", None
    field = cell["field"]
    if field not in fields_schema:
        return f"unknown field {field!r}; output fields are {', '.join(fields_schema)}", None
    if verdict_text not in VERDICTS:
        shown = cell["verdict"] or "(blank)"
        return f"verdict {shown!r} is not one of accept, correct, reject", None
    corrected: Any = None
    if verdict_text == "correct":
        if cell["corrected_value"] == "":
            return "verdict correct needs a corrected_value (use reject to clear a value)", None
        try:
            corrected = parse_value(cell["corrected_value"], fields_schema[field])
        except ValueError as exc:
            return f"field {field!r}: {exc}", None
    elif cell["corrected_value"] != "":
        return f"corrected_value given but verdict is {verdict_text!r}; use correct", None
    return None, Verdict(
        key=key,
        field=field,
        verdict=verdict_text,  # type: ignore[arg-type]  # one of VERDICTS, checked above
        corrected_value=corrected,
        reviewer=cell.get("reviewer", "").strip(),
        note=cell.get("note", ""),
        run_id=cell.get("run_id", "").strip() or None,
        line=line,
        value=cell.get("value"),
    )
