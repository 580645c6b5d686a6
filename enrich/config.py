"""The job config: one TOML file validated by pydantic, plus command-line overrides.

Relative paths resolve against the current directory (where `make` runs). Secrets never
come from here: an `api_key` anywhere in the file is rejected. The task spec sent to the API
is built here, following the real schema rules: every property required and nullable,
`additionalProperties: false`, the instruction as the schema description.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from enrich.errors import ConfigError
from enrich.files import OUTPUT_SUFFIXES, XLSX_SUFFIXES, journal_path
from enrich.processors import PROCESSORS, tier
from enrich.spec import FieldType, schema_problem
from enrich.storage import ModeSetting

DEFAULT_BASE_URL = "https://api.parallel.ai"
EMULATOR_KEY = "emulator-local-key"  # the key an --emulator run sends (the emulator takes any key)


def output_format_problem(path: Path) -> str | None:
    """Why `path` cannot be an output file, or None: `output_format_problem(Path('a.json'))` -> '... .json ...'.

    The format follows the extension; anything else is refused rather than silently written as CSV.
    """
    suffix = path.suffix.lower()
    if suffix in OUTPUT_SUFFIXES:
        return None
    return (
        f"unsupported output extension {suffix or '(none)'!r} in {path.name}; use one of {', '.join(OUTPUT_SUFFIXES)}"
    )


class _Strict(BaseModel):
    # inf/nan are never meaningful settings (`--budget inf` would disable the budget silently)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FieldSpec(_Strict):
    """One output field: `type`, optional `description`, `items` for arrays, `properties` for objects."""

    type: FieldType = "string"
    description: str | None = None
    items: FieldSpec | None = None
    properties: dict[str, FieldSpec] | None = None
    enum: list[str] | None = None

    @model_validator(mode="after")
    def _shape(self) -> FieldSpec:
        if self.type == "object" and not self.properties:
            raise ValueError("an object field needs `properties`")
        return self


class InputConfig(_Strict):
    path: Path
    key: list[str] = Field(min_length=1)
    sheet: str | int | None = None  # .xlsx only: sheet name, or 1-based position; default the first
    columns: list[str] | None = None  # sent as the task input; default: the key columns
    encoding: str = "utf-8"
    max_cell_bytes: int = Field(default=1 << 20, gt=0)
    # rows whose task input (the columns sent), spec and processor are identical share one run
    dedupe: bool = True
    where: str | None = None  # a polars SQL expression: only matching rows are researched (others: skipped)

    @property
    def input_columns(self) -> list[str]:
        return self.columns or list(self.key)

    @model_validator(mode="after")
    def _sheet(self) -> InputConfig:
        if isinstance(self.sheet, int) and (isinstance(self.sheet, bool) or self.sheet < 1):
            raise ValueError("sheet: must be a sheet name or a 1-based position (1 = the first sheet)")
        if self.sheet is not None and self.path.suffix.lower() not in XLSX_SUFFIXES:
            raise ValueError(f"sheet: only meaningful for .xlsx input, not {self.path.name}")
        return self


class TaskConfig(_Strict):
    processor: str = "lite-fast"
    instruction: str = "Research the entity described by the input and return verified facts."
    output: dict[str, FieldSpec] | None = None
    output_schema: Path | None = None
    source_policy: dict[str, Any] | None = None
    metadata: dict[str, str | int | float | bool] | None = None
    previous_interaction_id: str | None = None
    refresh_after_days: float | None = Field(default=None, gt=0)

    @field_validator("processor")
    @classmethod
    def _known_processor(cls, value: str) -> str:
        if value not in PROCESSORS:
            raise ValueError(f"unknown processor {value!r}; choose one of {', '.join(PROCESSORS)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if bool(self.output) == bool(self.output_schema):
            raise ValueError("give exactly one of [task.output.<field>] tables or [task] output_schema")
        return self


class OutputConfig(_Strict):
    path: Path
    reasoning: bool = False
    formula_guard: bool = True

    @field_validator("path")
    @classmethod
    def _format(cls, path: Path) -> Path:
        # refused here, at config load, so an unknown extension stops the job before anything is sent;
        # a path without one names a folder (a Parquet dataset, with --ray), which preflight checks per mode
        if path.suffix and (problem := output_format_problem(path)) is not None:
            raise ValueError(problem)
        return path


class LimitsConfig(_Strict):
    max_in_flight: int = Field(default=500, gt=0)
    requests_per_minute: int = Field(default=1800, gt=0)
    budget_usd: float | None = Field(default=None, ge=0)
    row_timeout_s: float = Field(default=3600, gt=0)
    batch_size: int = Field(default=1000, gt=0, le=1000)
    request_timeout_s: float = Field(default=30, gt=0)  # total deadline of a creating POST
    reconcile_grace_s: float = Field(default=60, gt=0)  # must exceed request_timeout_s
    max_attempts: int = Field(default=6, gt=0)  # rejections of a row itself before it is failed
    recheck_s: float = Field(default=5, gt=0, le=60)  # liveness watchdog period
    outage_give_up_s: float = Field(default=300, gt=0)  # no creating request succeeds this long: stop (exit 69)
    daily_budget_usd: float | None = Field(default=None, ge=0)  # per UTC day, across jobs sharing the ledger
    spend_ledger: Path | None = None  # file recording spend per UTC day (shared between jobs)
    max_processor: str | None = None  # refuse any processor (task or ladder) on a higher price tier
    journal_mode: ModeSetting = "auto"  # local (WAL) or network (rollback journal); auto detects (storage.py)

    @model_validator(mode="after")
    def _check_limits(self) -> LimitsConfig:
        if self.reconcile_grace_s <= self.request_timeout_s:
            raise ValueError(
                f"reconcile_grace_s ({self.reconcile_grace_s:g}) must be longer than request_timeout_s "
                f"({self.request_timeout_s:g}): a request still on its way could otherwise create a "
                "run after its row was declared never created"
            )
        if self.max_processor is not None and self.max_processor not in PROCESSORS:
            raise ValueError(
                f"max_processor: unknown processor {self.max_processor!r}; choose one of {', '.join(PROCESSORS)}"
            )
        return self

    @property
    def daily_budget_micros(self) -> int | None:
        b = self.daily_budget_usd
        return None if b is None else round(b * 1_000_000)


Level = Literal["high", "medium", "low", "none"]
LEVELS: tuple[Level, ...] = ("high", "medium", "low", "none")  # best first; "none" = null, "" or no basis
_LEVEL_RANK = {"high": 3, "medium": 2, "low": 1, "none": 0}
_LISTS = ("accept", "review", "reject")


class GateRule(_Strict):
    """How one field's confidence becomes a decision: accepted, review or rejected.

    Labels go by set membership. Numbers (not sent by the real API, which only sends labels;
    accepted because older write-ups use 0..1 scores) go by thresholds: `>= accept_at` is
    accepted, `>= review_at` is review, anything else rejected. The thresholds are an enrich
    invention; without them a number counts as "none".

    The lists must be disjoint, cover high/medium/low/none, and be ordered (every accepted
    level above every review level above every rejected one), so a better confidence never
    gets a worse decision. Example: `GateRule(accept=["high", "medium"], review=[], reject=["low", "none"])`.
    """

    accept: list[Level] = ["high"]
    review: list[Level] = ["medium"]
    reject: list[Level] = ["low", "none"]
    accept_at: float | None = Field(default=None, allow_inf_nan=False)
    review_at: float | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check_rule(self) -> GateRule:
        seen: dict[str, str] = {}
        for name in _LISTS:
            for level in getattr(self, name):
                if level in seen:
                    raise ValueError(f"confidence {level!r} is in both {seen[level]} and {name}")
                seen[level] = name
        if missing := [lv for lv in LEVELS if lv not in seen]:
            raise ValueError(f"confidence {', '.join(map(repr, missing))} is in none of accept, review, reject")
        ranks = [[_LEVEL_RANK[lv] for lv in getattr(self, n)] for n in _LISTS]
        for (hi_name, hi), (lo_name, lo) in (
            ((_LISTS[0], ranks[0]), (_LISTS[1], ranks[1])),
            ((_LISTS[1], ranks[1]), (_LISTS[2], ranks[2])),
            ((_LISTS[0], ranks[0]), (_LISTS[2], ranks[2])),
        ):
            if hi and lo and min(hi) <= max(lo):
                raise ValueError(f"{hi_name} must only hold confidences above those in {lo_name}")
        if self.accept_at is not None and self.review_at is not None and self.review_at > self.accept_at:
            raise ValueError("review_at must not be above accept_at")
        return self

    def decision_of_level(self, level: str) -> Literal["accepted", "review", "rejected"]:
        """'accepted' | 'review' | 'rejected' for a confidence label (high/medium/low/none)."""
        if level in self.accept:
            return "accepted"
        return "review" if level in self.review else "rejected"


class GateFieldOverride(_Strict):
    """`[gate.fields.<name>]`: any of GateRule's keys. A list given here is exact; a list not
    given keeps the base list minus the levels the given lists claim. Example: with the
    defaults, `accept = ["high", "medium"]` leaves review empty and reject = ["low", "none"].
    """

    accept: list[Level] | None = None
    review: list[Level] | None = None
    reject: list[Level] | None = None
    accept_at: float | None = Field(default=None, allow_inf_nan=False)
    review_at: float | None = Field(default=None, allow_inf_nan=False)


class GateConfig(GateRule):
    """`[gate]`: the default rule plus `[gate.fields.<name>]` overrides (see GateRule)."""

    fields: dict[str, GateFieldOverride] = {}
    _rules: dict[str, GateRule] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _resolve(self) -> GateConfig:
        base = GateRule(**{k: getattr(self, k) for k in GateRule.model_fields})
        rules: dict[str, GateRule] = {}
        for name, over in self.fields.items():
            given = over.model_dump(exclude_none=True)
            claimed = {lv for key in _LISTS for lv in given.get(key, [])}
            data = base.model_dump()
            for key in _LISTS:
                if key not in given:
                    data[key] = [lv for lv in data[key] if lv not in claimed]
            data.update(given)
            try:
                rules[name] = GateRule(**data)
            except ValidationError as exc:
                raise ValueError(f"fields.{name}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        self._rules = {"": base, **rules}
        return self

    def sends_to_review(self) -> bool:
        """Can any field's decision be `review` (a review level, or `review_at`, in the default rule or a field's)?"""
        rules = [self.rule(""), *(self.rule(f) for f in self.fields)]
        return any(r.review or r.review_at is not None for r in rules)

    def rule(self, field: str) -> GateRule:
        """The resolved rule for `field`; element entries (`founders.0`) use their array's rule."""
        rules: dict[str, GateRule] = self.__pydantic_private__["_rules"]  # type: ignore[index]  # per field per row
        return rules.get(field) or rules.get(field.split(".", 1)[0]) or rules[""]


class EscalateConfig(_Strict):
    """`[escalate]`: re-run rows whose fields are still rejected, in review, or either, on stronger processors.

    `processors` is the ladder after `task.processor`, each step on a strictly higher price
    tier than the one before. `on` names the decisions that make a row climb: `["rejected"]`,
    `["review"]` (where a weak tier's `low` rarely turns `high` a tier up, but its `medium` does;
    `enrich pilot` measures which holds on your rows) or both. `max_rows` caps how many rows one
    escalation step may send.
    """

    processors: list[str] = Field(min_length=1)
    on: list[Literal["rejected", "review"]] = ["rejected"]
    max_rows: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check_escalate(self) -> EscalateConfig:
        for p in self.processors:
            if p not in PROCESSORS:
                raise ValueError(f"processors: unknown processor {p!r}; choose one of {', '.join(PROCESSORS)}")
        if not self.on or len(set(self.on)) != len(self.on):
            raise ValueError('on: must be ["rejected"], ["review"] or ["rejected", "review"]')
        return self


class EmulatorSection(_Strict):
    knowledge: Path | None = None
    knowledge_key: str = "company"
    time_scale: float = Field(default=0.01, ge=0)
    seed: int = 0
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    rate_limit: int = Field(default=2000, ge=0)
    faults: str = ""
    behaviours: str = ""  # e.g. "cut,snapshots" or "all" (enrich/emulator/behaviours.py)
    hard_rate: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _known_behaviours(self) -> EmulatorSection:
        if not self.behaviours:  # the usual case: no need to import the emulator (uvicorn) to check nothing
            return self
        from enrich.emulator.behaviours import parse_behaviours  # lazy: the emulator package imports uvicorn

        try:
            parse_behaviours(self.behaviours)
        except ValueError as exc:  # it names the unknown behaviour
            raise ValueError(f"behaviours: {exc}") from None
        return self


class ApiSection(_Strict):
    base_url: str | None = None


class CacheSection(_Strict):
    """`[cache]`: a results cache shared across jobs (reuse.py), opt-in. `~` is expanded."""

    path: Path | None = None

    @field_validator("path")
    @classmethod
    def _home(cls, path: Path | None) -> Path | None:
        try:
            return None if path is None else path.expanduser()
        except RuntimeError:  # pathlib's answer to `~nosuchuser/...`: pydantic reports only a ValueError as invalid
            raise ValueError(f"cannot expand '~' in {str(path)!r} (no such user or home directory)") from None


class RunConfig(_Strict):
    input: InputConfig
    task: TaskConfig
    output: OutputConfig
    limits: LimitsConfig = LimitsConfig()
    emulator: EmulatorSection = EmulatorSection()
    api: ApiSection = ApiSection()
    cache: CacheSection = CacheSection()
    gate: GateConfig = GateConfig()
    escalate: EscalateConfig | None = None
    journal: Path | None = None
    source: Path | None = None  # the config file, for messages
    _task_spec: dict[str, Any] | None = PrivateAttr(default=None)  # built once (build_task_spec)

    @model_validator(mode="after")
    def _check_ladder(self) -> RunConfig:
        ladder = self.ladder
        for i, (lower, upper) in enumerate(itertools.pairwise(ladder)):
            if tier(upper) <= tier(lower):
                raise ValueError(
                    f"escalate.processors[{i}]: {upper!r} is not on a higher price tier than {lower!r}; "
                    "each step must be stronger than the one before"
                )
        if self.escalate is not None and "rejected" not in self.escalate.on and not self.gate.sends_to_review():
            raise ValueError(
                'escalate.on: ["review"] never makes a row climb: [gate] sends no confidence to review '
                '(review = []); use on = ["rejected"], or give [gate] review a level'
            )
        return self

    @property
    def ladder(self) -> list[str]:
        """task.processor, then the escalation steps (weakest first)."""
        return [self.task.processor, *(self.escalate.processors if self.escalate else [])]

    @property
    def journal_path(self) -> Path:
        if self.journal:
            return self.journal
        return journal_path(self.output.path)

    @property
    def budget_micros(self) -> int | None:
        b = self.limits.budget_usd
        return None if b is None else round(b * 1_000_000)


def _find_api_key(node: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    if isinstance(node, dict):
        for k, v in node.items():
            here = (*path, str(k))
            if str(k).lower().replace("-", "_") in ("api_key", "apikey", "x_api_key"):
                return here
            if (found := _find_api_key(v, here)) is not None:
                return found
    return None


def _shown(value: Any) -> str:
    """A short rendering of a rejected value for a message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def plain_message(err: ErrorDetails) -> str:
    """Say what a setting must be, in enrich's words rather than pydantic's ("Input should be...").

    >>> plain_message({"type": "greater_than", "loc": ("x",), "msg": "", "input": 0, "ctx": {"gt": 0}})
    'must be greater than 0 (got 0)'
    """
    kind, ctx, got = err["type"], err.get("ctx") or {}, _shown(err.get("input"))
    fixed = {
        "missing": "is required",
        "extra_forbidden": "is not a known setting (check the spelling)",
        "finite_number": f"must be a finite number (got {got})",
        "int_type": f"must be an integer (got {got})",
        "int_parsing": f"must be an integer (got {got})",
        "int_from_float": f"must be a whole number (got {got})",
        "float_type": f"must be a number (got {got})",
        "float_parsing": f"must be a number (got {got})",
        "bool_type": f"must be true or false (got {got})",
        "bool_parsing": f"must be true or false (got {got})",
        "string_type": f"must be a string (got {got})",
        "path_type": f"must be a path string (got {got})",
        "list_type": f"must be a list (got {got})",
        "too_short": "must not be empty",
        "dict_type": f"must be a table (got {got})",
        "model_type": f"must be a table (got {got})",
        "model_attributes_type": f"must be a table (got {got})",
    }
    if kind in fixed:
        return fixed[kind]
    bounds = {
        "greater_than": ("greater than", "gt"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "less_than_equal": ("at most", "le"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)} (got {got})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {got})"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    msg = str(err.get("msg", "is invalid"))
    return msg.replace("Input should be", "must be").replace("Value error, ", "")


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\])$")  # pydantic's name for the union member tried
_REL_PATH = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*): (.+)$", re.DOTALL)


def _located(err: ErrorDetails) -> tuple[tuple[str | int, ...], str]:
    """(key path, message) of a validation error; a validator's message that starts with a path relative
    to its table (`processors: ...`, `fields.x: ...`) has that path moved into the key path."""
    loc = tuple(err["loc"])
    if len(loc) > 1 and isinstance(loc[-1], str) and _UNION_TAG.match(loc[-1]):
        loc = loc[:-1]
    message = plain_message(err)
    if err["type"] == "value_error" and (m := _REL_PATH.match(message)):
        rel = tuple(int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"\[\d+\]|[^.\[\]]+", m.group(1)))
        loc, message = (*loc, *rel), m.group(2)
    return loc, message


def toml_path(loc: Sequence[str | int], data: Any = None, table: bool = False) -> str:
    """A key path as TOML spells it: the table in brackets, then the key (list positions from 0).

    `data` (the parsed file) tells a table from a key at the end of the path; `table` says it is one.

    >>> toml_path(("escalate", "processors", 0)), toml_path(("task", "output", "hq", "type"))
    ('[escalate] processors[0]', '[task.output.hq] type')
    >>> toml_path(("gate", "fields", "x"), {"gate": {"fields": {"x": {}}}}), toml_path(("bogus",))
    ('[gate.fields.x]', 'bogus')
    """

    def bare(part: str | int) -> str:
        text = str(part)
        return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else json.dumps(text)

    node = data
    for part in loc:
        node = node.get(part) if isinstance(node, dict) and not isinstance(part, int) else None
    if table or isinstance(node, dict):  # the path names a table
        return "[" + ".".join(bare(p) for p in loc) + "]"
    end = len(loc)
    while end > 1 and isinstance(loc[end - 1], int):
        end -= 1
    key = bare(loc[end - 1]) + "".join(f"[{i}]" for i in loc[end:])
    section = ".".join(bare(p) for p in loc[: end - 1])
    return f"[{section}] {key}" if section else key


def load_config(
    path: str | Path, overrides: dict[str, Any] | None = None, flags: Mapping[str, str] | None = None
) -> RunConfig:
    """Read and validate a TOML config; `overrides` maps dotted keys ('limits.budget_usd') to values.

    `flags` maps the same dotted keys to the command-line flag that set them ('--budget'), so a
    bad flag value is reported under the flag's name, not the config file's. Raises ConfigError
    naming the file (or flag) and the key path of the first problem.
    """
    return config_from_mapping(read_config_file(path), overrides, str(path), flags)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The TOML file as a mapping; ConfigError (one line, naming the file) when it cannot be read."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        if path.suffix.lower() in OUTPUT_SUFFIXES:  # the data file given where the config goes
            raise ConfigError(
                f"{path}: a data file, not a TOML config; `enrich init {path}` writes a starter config from it"
            ) from None
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def config_from_mapping(
    data: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    source: str = "<config>",
    flags: Mapping[str, str] | None = None,
    task_spec: dict[str, Any] | None = None,
) -> RunConfig:
    """Validate a config given as a mapping (the notebook API); same rules and messages as a file.

    `task_spec` is the spec a journal recorded (a job opened from its journal): used as is."""
    path = source
    data = copy.deepcopy(dict(data))
    if (where := _find_api_key(data)) is not None:
        raise ConfigError(
            f"{path}: {toml_path(where, data)}: API keys never go in config files; set PARALLEL_API_KEY instead"
        )
    given: dict[str, str] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {p}: must be a table")
        node[leaf] = value
        given[dotted] = (flags or {}).get(dotted, dotted)
    data["source"] = str(path)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key_path, message = _located(err)
        loc = ".".join(str(p) for p in key_path)
        flag = next((f for dotted, f in given.items() if loc == dotted or loc.startswith(dotted + ".")), None)
        at = flag or (f"{path}: {toml_path(key_path, data)}" if key_path else path)
        raise ConfigError(f"{at}: {message}") from None
    cfg._task_spec = task_spec
    check_max_processor(cfg)
    check_gate_fields(cfg, output_fields(build_task_spec(cfg)))  # also validates an output_schema file early
    return cfg


def check_max_processor(cfg: RunConfig) -> None:
    """Refuse a config whose processor or escalation ladder goes above `limits.max_processor`.

    The cap compares price tiers, so `max_processor = "core"` allows `core-fast` and refuses `pro`.
    Call it again after any override of `task.processor`. Raises ConfigError naming the key.
    """
    cap = cfg.limits.max_processor
    if cap is None:
        return
    for i, name in enumerate(cfg.ladder):
        if tier(name) > tier(cap):
            where = "[task] processor" if i == 0 else f"[escalate] processors[{i - 1}]"
            raise ConfigError(f"{cfg.source}: {where}: {name!r} is above [limits] max_processor = {cap!r}")


def check_gate_fields(cfg: RunConfig, fields: dict[str, Any]) -> None:
    """Refuse `[gate.fields.<name>]` tables that name no output field of the task spec.

    `fields` is `output_fields(build_task_spec(cfg))`. Raises ConfigError naming the table.
    """
    for name in cfg.gate.fields:
        if name not in fields:
            raise ConfigError(
                f"{cfg.source}: {toml_path(('gate', 'fields', name), table=True)}: not an output field; "
                f"output fields are {', '.join(fields) or '(none)'}"
            )


def _field_schema(spec: FieldSpec, nullable: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"type": [spec.type, "null"] if nullable else spec.type}
    if spec.description:
        out["description"] = spec.description
    if spec.enum:
        out["enum"] = [*spec.enum, None] if nullable else list(spec.enum)
    if spec.type == "array":
        out["items"] = _field_schema(spec.items or FieldSpec(type="string"), nullable=False)
    if spec.type == "object":
        props = spec.properties or {}
        out["properties"] = {k: _field_schema(v) for k, v in props.items()}
        out["required"] = list(props)
        out["additionalProperties"] = False
    return out


def build_task_spec(cfg: RunConfig) -> dict[str, Any]:
    """The `task_spec` sent with every run (a json output schema obeying the API's rules).

    Built once per config (an `output_schema` file is read once); a job opened from its journal
    carries the spec its run recorded, so it never depends on the schema file still being there.
    """
    if cfg._task_spec is None:
        cfg._task_spec = _build_task_spec(cfg)
    return cfg._task_spec


def _build_task_spec(cfg: RunConfig) -> dict[str, Any]:
    task = cfg.task
    if task.output_schema is not None:
        try:
            schema = json.loads(task.output_schema.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{cfg.source}: task.output_schema: cannot read {task.output_schema}: {exc}") from None
        if isinstance(schema, dict) and "json_schema" in schema:
            schema = schema["json_schema"]
        if isinstance(schema, dict):
            schema = {"description": task.instruction, **schema}
    else:
        props = task.output or {}
        schema = {
            "type": "object",
            "description": task.instruction,
            "properties": {name: _field_schema(f) for name, f in props.items()},
            "required": list(props),
            "additionalProperties": False,
        }
    if (problem := schema_problem(schema)) is not None:
        where = f"task.output_schema ({task.output_schema})" if task.output_schema else "task.output"
        raise ConfigError(f"{cfg.source}: {where}: {problem}")
    return {"output_schema": {"type": "json", "json_schema": schema}}


def output_fields(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Top-level output properties of a task spec, name -> JSON schema."""
    return dict(spec["output_schema"]["json_schema"]["properties"])


def canonical(obj: Any) -> str:
    """Deterministic JSON used for hashing (sorted keys, no spaces, dates as strings)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest(obj: Any, n: int = 32) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def spec_fingerprint(cfg: RunConfig, task_spec: dict[str, Any]) -> str:
    """What a result depends on besides the row input and the processor: spec and run options."""
    t = cfg.task
    return digest([task_spec, t.source_policy, t.metadata, t.previous_interaction_id])


def legacy_spec_fingerprint(cfg: RunConfig, task_spec: dict[str, Any]) -> str:
    """The schema-1 fingerprint (it included the processor), to rename it in old journals."""
    t = cfg.task
    return digest([task_spec, t.processor, t.source_policy, t.metadata, t.previous_interaction_id])
