"""The job config: one TOML file validated by pydantic, plus command-line overrides.

Relative paths resolve against the current directory (where `make` runs). Secrets never
come from here: an `api_key` anywhere in the file is rejected. The task spec sent to the API
is built here, following the real schema rules: every property required and nullable,
`additionalProperties: false`, the instruction as the schema description.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from enrich.errors import ConfigError
from enrich.processors import PROCESSORS

FieldType = Literal["string", "integer", "number", "boolean", "array", "object"]
DEFAULT_BASE_URL = "https://api.parallel.ai"
XLSX_SUFFIXES = (".xlsx",)
OUTPUT_SUFFIXES = (".csv", ".parquet", ".pq", *XLSX_SUFFIXES)


def output_format_problem(path: Path) -> str | None:
    """Why `path` cannot be an output file, or None: `output_format_problem(Path('a.json'))` -> '... .json ...'.

    The format follows the extension; anything else is refused rather than silently written as CSV.
    """
    suffix = path.suffix.lower()
    if suffix in OUTPUT_SUFFIXES:
        return None
    return (f"unsupported output extension {suffix or '(none)'!r} in {path.name}; "
            f"use one of {', '.join(OUTPUT_SUFFIXES)}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    sheet: str | int | None = None            # .xlsx only: sheet name, or 1-based position; default the first
    columns: list[str] | None = None          # sent as the task input; default: the key columns
    encoding: str = "utf-8"
    max_cell_bytes: int = Field(default=1 << 20, gt=0)

    @property
    def input_columns(self) -> list[str]:
        return self.columns or list(self.key)

    @model_validator(mode="after")
    def _sheet(self) -> InputConfig:
        if isinstance(self.sheet, int) and (isinstance(self.sheet, bool) or self.sheet < 1):
            raise ValueError("sheet is a sheet name or a 1-based position (1 = the first sheet)")
        if self.sheet is not None and self.path.suffix.lower() not in XLSX_SUFFIXES:
            raise ValueError(f"sheet is only meaningful for .xlsx input, not {self.path.name}")
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

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.processor not in PROCESSORS:
            raise ValueError(f"unknown processor {self.processor!r}; choose one of {', '.join(PROCESSORS)}")
        if bool(self.output) == bool(self.output_schema):
            raise ValueError("give exactly one of [task.output.<field>] tables or task.output_schema")
        return self


class OutputConfig(_Strict):
    path: Path
    reasoning: bool = False
    formula_guard: bool = True

    @model_validator(mode="after")
    def _format(self) -> OutputConfig:
        # refused here, at config load, so an unknown extension stops the job before anything is sent
        if (problem := output_format_problem(self.path)) is not None:
            raise ValueError(problem)
        return self


class LimitsConfig(_Strict):
    max_in_flight: int = Field(default=500, gt=0)
    requests_per_minute: int = Field(default=1800, gt=0)
    budget_usd: float | None = Field(default=None, ge=0)
    row_timeout_s: float = Field(default=3600, gt=0)
    batch_size: int = Field(default=1000, gt=0, le=1000)
    request_timeout_s: float = Field(default=30, gt=0)
    reconcile_grace_s: float = Field(default=60, ge=0)
    max_attempts: int = Field(default=6, gt=0)


class EmulatorSection(_Strict):
    knowledge: Path | None = None
    knowledge_key: str = "company"
    time_scale: float = Field(default=0.01, ge=0)
    seed: int = 0
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    rate_limit: int = Field(default=2000, ge=0)
    faults: str = ""


class ApiSection(_Strict):
    base_url: str | None = None


class RunConfig(_Strict):
    input: InputConfig
    task: TaskConfig
    output: OutputConfig
    limits: LimitsConfig = LimitsConfig()
    emulator: EmulatorSection = EmulatorSection()
    api: ApiSection = ApiSection()
    journal: Path | None = None
    source: Path | None = None   # the config file, for messages

    @property
    def journal_path(self) -> Path:
        if self.journal:
            return self.journal
        out = self.output.path
        return out.with_name(out.name.split(".")[0] + ".journal.sqlite")

    @property
    def budget_micros(self) -> int | None:
        b = self.limits.budget_usd
        return None if b is None else round(b * 1_000_000)


def _find_api_key(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}" if path else k
            if k.lower().replace("-", "_") in ("api_key", "apikey", "x_api_key"):
                return here
            if (found := _find_api_key(v, here)) is not None:
                return found
    return None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a TOML config; `overrides` maps dotted keys ('limits.budget_usd') to values.

    Raises ConfigError naming the file and the key path of the first problem.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if (where := _find_api_key(data)) is not None:
        raise ConfigError(f"{path}: {where}: API keys never go in config files; set PARALLEL_API_KEY instead")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    data["source"] = str(path)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise ConfigError(f"{path}: {loc}: {err['msg']}") from None
    build_task_spec(cfg)  # validates an output_schema file early
    return cfg


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
    """The `task_spec` sent with every run (a json output schema obeying the API's rules)."""
    from enrich.emulator.validate import Invalid, validate_json_schema

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
    try:
        validate_json_schema(schema)
    except Invalid as exc:
        raise ConfigError(f"{cfg.source}: task output schema: {exc.message}") from None
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
    """What a result depends on besides the row input: spec, processor and run options."""
    t = cfg.task
    return digest([task_spec, t.processor, t.source_policy, t.metadata, t.previous_interaction_id])
