"""enrich_frame: the notebook / Python API, over loopback HTTP against the emulator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

import enrich
from enrich.errors import ConfigError
from tests.conftest import ROOT

CONFIG = {
    "input": {"key": ["company"], "columns": ["company"]},
    "task": {
        "processor": "lite-fast",
        "output": {"headquarters_location": {"type": "string"}, "founded_year": {"type": "integer"}},
    },
    "limits": {"reconcile_grace_s": 3, "request_timeout_s": 2},
}


def frame() -> pl.DataFrame:
    return pl.read_csv(ROOT / "data/companies.csv").with_columns(pl.lit(7).alias("rank"))


def runs(emu: Any) -> int:
    return len(httpx.get(emu.base_url + "/_emulator/ledger", timeout=10).json())


def test_polars_in_polars_out_and_resume(tmp_path: Path, emulator) -> None:
    """Right rows and columns; a budget stop then a second call finishes without paying twice."""
    emu = emulator(time_scale=0.0)
    journal = tmp_path / "nb.journal.sqlite"
    part = enrich.enrich_frame(
        frame(), CONFIG, journal=journal, base_url=emu.base_url, api_key="sk-nb-1234", budget_usd=0.1
    )  # 20 runs
    assert isinstance(part, pl.DataFrame) and part.height == 55
    assert (part["_enrich_status"] == "completed").sum() == 20 and runs(emu) == 20
    out = enrich.enrich_frame(frame(), CONFIG, journal=journal, base_url=emu.base_url, api_key="sk-nb-1234")
    assert runs(emu) == 55 and (out["_enrich_status"] == "completed").all()
    assert out["company"].to_list() == frame()["company"].to_list()
    assert out.schema["rank"] == frame().schema["rank"] and out.schema["founded_year"] == pl.Int64
    assert out.filter(pl.col("company") == "Apple")["headquarters_location"].item().startswith("Cupertino")
    again = enrich.enrich_frame(frame(), CONFIG, journal=journal, base_url=emu.base_url, api_key="sk-nb-1234")
    assert runs(emu) == 55 and again.equals(out)


def test_pandas_in_pandas_out(tmp_path: Path, emulator) -> None:
    """A pandas frame comes back as pandas with the researched columns."""
    pd = pytest.importorskip("pandas")
    emu = emulator(time_scale=0.0)
    out = enrich.enrich_frame(
        frame().head(5).to_pandas(), CONFIG, journal=tmp_path / "j.sqlite", base_url=emu.base_url, api_key="sk-nb-1234"
    )
    assert isinstance(out, pd.DataFrame) and len(out) == 5
    assert "headquarters_location__confidence" in out.columns and list(out["company"]) == list(frame()["company"][:5])


def test_inside_a_running_event_loop(tmp_path: Path) -> None:
    """Called from a coroutine (as in Jupyter) with the embedded emulator: no 'event loop is running' error."""

    async def cell() -> pl.DataFrame:
        return enrich.enrich_frame(frame().head(3), CONFIG, journal=tmp_path / "j.sqlite", emulator=True)

    out = asyncio.run(cell())
    assert out.height == 3 and (out["_enrich_status"] == "completed").all()


def test_errors_raise_the_error_tree(tmp_path: Path) -> None:
    """A bad config raises ConfigError (never SystemExit)."""
    with pytest.raises(ConfigError):
        enrich.enrich_frame(frame(), {"input": {"key": []}}, journal=tmp_path / "j.sqlite", emulator=True)
    with pytest.raises(ConfigError):
        enrich.enrich_frame([1, 2], CONFIG, journal=tmp_path / "j.sqlite", emulator=True)
