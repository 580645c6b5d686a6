"""`enrich init DATA`: write a commented starter config from a data file's columns, asking nothing.

The key is guessed as a column that is unique and never empty across the whole file
(identifier-like names first: id, ticker, symbol, domain, company, name...); only the key
and a few descriptive columns (website, domain, country...) are sent as task input, so
private columns stay local until someone decides otherwise. An existing config is never
overwritten. The result is accepted unchanged by `enrich plan` and `enrich run --emulator`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from enrich.errors import ConfigError, InputError
from enrich.files import OUTPUT_SUFFIXES, XLSX_SUFFIXES
from enrich.processors import PROCESSORS
from enrich.read import RESERVED_PREFIX, key_problem, open_table

DEFAULT_PROCESSOR = "lite-fast"
_KEY_HINTS = (
    "id",
    "key",
    "ticker",
    "symbol",
    "isin",
    "cik",
    "lei",
    "domain",
    "website",
    "url",
    "company",
    "organization",
    "organisation",
    "name",
    "title",
)
_CONTEXT_HINTS = (
    "website",
    "domain",
    "url",
    "homepage",
    "country",
    "city",
    "location",
    "sector",
    "industry",
    "company",
    "name",
    "ticker",
    "symbol",
    "exchange",
    "description",
)


def _rank(column: str, hints: tuple[str, ...]) -> int:
    low = column.casefold().replace(" ", "_")
    for i, hint in enumerate(hints):
        if low == hint or low.endswith(f"_{hint}") or low.startswith(f"{hint}_"):
            return i
    return len(hints)


def guess_key(columns: list[str], rows: list[list[Any]]) -> str | None:
    """The most identifier-like column whose values are all present and distinct, or None.

    >>> guess_key(["note", "ticker"], [["a", "X"], ["a", "Y"]])
    'ticker'
    """
    unique = []
    for j, c in enumerate(columns):
        seen: set[str] = set()
        ok = True
        for r in rows:
            v = r[j]
            k = json.dumps(v, default=str)
            if key_problem([v]) is not None or k in seen:
                ok = False
                break
            seen.add(k)
        if ok:
            unique.append(c)
    if not unique:
        return None
    return min(unique, key=lambda c: (_rank(c, _KEY_HINTS), columns.index(c)))


def _rel(path: Path) -> str:
    """Path as written into the config: relative to the current directory when below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def starter_config(data: Path, columns: list[str], rows: list[list[Any]], sheet: str | None = None) -> str:
    """The TOML text of a starter config for `data` (pure: no file access)."""
    key = guess_key(columns, rows)
    if key is None:
        raise InputError(
            str(data),
            "no column is unique and non-empty in every row, so none can be the key; "
            "add an id column and run `enrich init` again",
        )
    context = [c for c in columns if c != key and _rank(c, _CONTEXT_HINTS) < len(_CONTEXT_HINTS)][:3]
    sent = [key, *context]
    others = [c for c in columns if c not in sent]
    field = next(
        f
        for f in ("summary", "research_summary", "enrich_summary_text")
        if not any(c == f or c.startswith(f"{f}__") for c in columns)
    )
    suffix = data.suffix.lower() if data.suffix.lower() in OUTPUT_SUFFIXES else ".csv"
    out = Path("out") / f"{data.stem}.enriched{suffix}"
    price = PROCESSORS[DEFAULT_PROCESSOR].price_micros
    budget = max(1.0, math.ceil(len(rows) * price * 1.5 / 1e4) / 100)  # list price x 1.5, rounded up to cents
    q = json.dumps
    lines = [
        f"# Starter config written by `enrich init {_rel(data)}`. Edit freely; every option is explained in README.md.",
        "# Try it:  enrich plan <this file>            (rows, cost, duration; no API calls)",
        "#          enrich run <this file> --emulator  (offline, no key, no cost; results are EMULATED)",
        "",
        "[input]",
        f"path = {q(_rel(data))}",
        *(
            [f"sheet = {q(sheet)}                # the workbook sheet to read (name, or 1-based position)"]
            if sheet is not None
            else []
        ),
        f"key = [{q(key)}]{' ' * 8}# guessed: unique and non-empty in all {len(rows):,} rows; identifies a row across runs",
        f"columns = {q(sent)}   # ONLY these are sent to the API as the task input",
        *([f"# not sent: {', '.join(others)}"] if others else []),
        "",
        "[task]",
        f'processor = "{DEFAULT_PROCESSOR}"     # cheapest; see `enrich plan --processor core` for a stronger one',
        'instruction = "Research the entity described by the input and return verified facts about it."',
        "",
        "# One table per output column. Types: string, integer, number, boolean, array (with items), object.",
        f"[task.output.{field}]",
        'type = "string"',
        'description = "One sentence on what this entity is and does"',
        "",
        "# [task.output.founded_year]",
        '# type = "integer"',
        '# description = "Year the organisation was founded"',
        "",
        "[output]",
        f"path = {q(str(out))}   # .csv, .parquet or .xlsx; a JSON and an HTML report are written beside it",
        "reasoning = false                  # true adds <field>__reasoning columns",
        "",
        "[limits]",
        f"budget_usd = {budget}                # hard cap on spend for this job (about 1.5x the list-price estimate)",
        "",
    ]
    return "\n".join(lines)


def init_config(data: str | Path, config: str | Path | None = None) -> tuple[Path, list[str]]:
    """Write the starter config for `data` (default `<stem>.toml` here); return it and the commands to try next.

    Raises ConfigError when the config exists (never overwritten), InputError when the data is unusable.
    """
    data = Path(data)
    target = Path(config) if config else Path(f"{data.stem}.toml")
    if target.exists():
        raise ConfigError(f"{target} already exists; refusing to overwrite it (pass another path with --config)")
    info, batches = open_table(data, [], set())
    columns = list(info.columns)
    if any(c.startswith(RESERVED_PREFIX) for c in columns):
        raise InputError(info.path, f"columns starting with {RESERVED_PREFIX!r} are reserved for enrich's output")
    rows = [r.values for batch in batches for r in batch]
    sheet = str(info.path).rsplit(" [", 1)[1][:-1] if data.suffix.lower() in XLSX_SUFFIXES else None
    text = starter_config(data, columns, rows, sheet)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # O_EXCL: never clobber, even in a race
    with os.fdopen(fd, "w", encoding="utf-8") as fp:
        fp.write(text)
    shown = _rel(target)
    return target, [f"enrich plan {shown}", f"enrich run {shown} --emulator"]
