"""config.py: validation errors name the file and key path; the task spec obeys the API's rules."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from enrich.config import build_task_spec, load_config
from enrich.emulator.validate import validate_json_schema
from enrich.errors import ConfigError
from tests.conftest import ROOT


def test_companies_config_builds_a_spec_without_warnings() -> None:
    cfg = load_config(ROOT / "configs/companies.toml")
    schema = build_task_spec(cfg)["output_schema"]["json_schema"]
    assert schema["description"] == cfg.task.instruction
    assert schema["additionalProperties"] is False and set(schema["required"]) == set(schema["properties"])
    assert all("null" in p["type"] for p in schema["properties"].values())
    assert schema["properties"]["founders"]["items"] == {"type": "string"}
    assert validate_json_schema(schema) == []


@pytest.mark.parametrize(
    "text,where",
    [
        (
            '[input]\npath="a.csv"\nkey=["k"]\n[task]\nprocessor="turbo"\n[task.output.x]\ntype="string"\n[output]\npath="o.csv"\n',
            "[task] processor: unknown processor 'turbo'",
        ),
        (
            '[input]\npath="a.csv"\nkey=[]\n[task]\n[task.output.x]\ntype="string"\n[output]\npath="o.csv"\n',
            "[input] key: must not be empty",
        ),
        (
            '[input]\npath="a.csv"\nkey=["k"]\n[task]\n[task.output.x]\ntype="strin"\n[output]\npath="o.csv"\n',
            "[task.output.x] type",
        ),
        (
            '[input]\npath="a.csv"\nkey=["k"]\n[task]\n[task.output.x]\ntype="string"\n[output]\npath="o.csv"\n'
            "[limits]\nmax_in_flight=0\n",
            "[limits] max_in_flight",
        ),
        (
            '[input]\npath="a.csv"\nkey=["k"]\n[task]\n[task.output.x]\ntype="string"\n[output]\npath="o.csv"\n'
            "[limits]\nbogus=1\n",
            "[limits] bogus",
        ),
        ('[input]\npath="a.csv"\nkey=["k"]\n[task]\napi_key="sk-123"\n', "[task] api_key: API keys never go in config"),
        ("[input\n", "not valid TOML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path)) and where in str(info.value)
    assert not any(w in str(info.value) for w in ("Input should", "Value error", "pydantic")), "pydantic wording leaked"


@pytest.mark.parametrize("name", ["companies.csv", "companies.parquet"])
def test_a_data_file_given_as_the_config_is_told_to_run_enrich_init(tmp_path: Path, name: str) -> None:
    """`enrich run data.csv` (the data where the config goes) says to write a config with `enrich init data.csv`."""
    data = tmp_path / name
    frame = pl.read_csv(ROOT / "data/companies.csv")
    frame.write_csv(data) if name.endswith(".csv") else frame.write_parquet(data)
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert (
        str(info.value)
        == f"{data}: a data file, not a TOML config; `enrich init {data}` writes a starter config from it"
    )


def test_output_schema_file_is_checked(tmp_path: Path) -> None:
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}}')
    path = tmp_path / "job.toml"
    path.write_text(f'[input]\npath="a.csv"\nkey=["k"]\n[task]\noutput_schema="{schema}"\n[output]\npath="o.csv"\n')
    with pytest.raises(ConfigError, match="unsupported JSON Schema keyword"):
        load_config(path)
