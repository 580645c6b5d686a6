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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from enrich.errors import ConfigError
from enrich.processors import PROCESSORS
from enrich.spec import FieldType, schema_problem

DEFAULT_BASE_URL = "https://api.parallel.ai"


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
    columns: list[str] | None = None          # sent as the task input; default: the key columns
    encoding: str = "utf-8"
    max_cell_bytes: int = Field(default=1 << 20, gt=0)

    @property
    def input_columns(self) -> list[str]:
        return self.columns or list(self.key)


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
            raise ValueError("give exactly one of [task.output.<field>] tables or task.output_schema")
        return self


class OutputConfig(_Strict):
    path: Path
    reasoning: bool = False
    formula_guard: bool = True


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
        "int_type": f"must be an integer (got {got})", "int_parsing": f"must be an integer (got {got})",
        "int_from_float": f"must be a whole number (got {got})",
        "float_type": f"must be a number (got {got})", "float_parsing": f"must be a number (got {got})",
        "bool_type": f"must be true or false (got {got})", "bool_parsing": f"must be true or false (got {got})",
        "string_type": f"must be a string (got {got})", "path_type": f"must be a path string (got {got})",
        "list_type": f"must be a list (got {got})", "too_short": "must not be empty",
        "dict_type": f"must be a table (got {got})", "model_type": f"must be a table (got {got})",
        "model_attributes_type": f"must be a table (got {got})",
    }
    if kind in fixed:
        return fixed[kind]
    bounds = {"greater_than": ("greater than", "gt"), "greater_than_equal": ("at least", "ge"),
              "less_than": ("less than", "lt"), "less_than_equal": ("at most", "le")}
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)} (got {got})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {got})"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    msg = str(err.get("msg", "is invalid"))
    return msg.replace("Input should be", "must be").replace("Value error, ", "")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None,
                flags: Mapping[str, str] | None = None) -> RunConfig:
    """Read and validate a TOML config; `overrides` maps dotted keys ('limits.budget_usd') to values.

    `flags` maps the same dotted keys to the command-line flag that set them ('--budget'), so a
    bad flag value is reported under the flag's name, not the config file's. Raises ConfigError
    naming the file (or flag) and the key path of the first problem.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if (where := _find_api_key(data)) is not None:
        raise ConfigError(f"{path}: {where}: API keys never go in config files; set PARALLEL_API_KEY instead")
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
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        flag = next((f for dotted, f in given.items() if loc == dotted or loc.startswith(dotted + ".")), None)
        raise ConfigError(f"{flag or f'{path}: {loc}'}: {plain_message(err)}") from None
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
    """What a result depends on besides the row input: spec, processor and run options."""
    t = cfg.task
    return digest([task_spec, t.processor, t.source_policy, t.metadata, t.previous_interaction_id])
