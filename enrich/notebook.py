"""The notebook / Python API: `enrich_frame(df, config) -> DataFrame`.

Same pipeline and journal semantics as `enrich run` (it calls `job.run_job`): resume after an
interruption without paying again, budget, exactly-once. The columns the task reads (its key and
input columns) are written to a Parquet file beside the journal, the job runs, and the researched
columns are added to the frame given: its own columns come back exactly as they were (same values,
dtypes and, for pandas, index), polars in, polars out; pandas in, pandas out. Works inside a
running event loop (Jupyter); progress uses `tqdm.auto`.

Errors raise the error tree's exceptions (errors.py), never `SystemExit`; they speak of the frame
(row position, index label) and of this function's keyword arguments. An interrupt (a Jupyter
kernel interrupt, Ctrl-C) stops sending at once, records what is in flight, and raises
KeyboardInterrupt; calling again with the same frame resumes without paying twice for a row.

    import polars as pl, enrich
    df = pl.DataFrame({"company": ["Apple", "Microsoft"]})
    out = enrich.enrich_frame(df, "configs/companies.toml", emulator=True)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from enrich import preflight
from enrich.config import RunConfig, build_task_spec, config_from_mapping, digest, output_fields, read_config_file
from enrich.errors import EXIT_INTERRUPTED, ConfigError, InputError, OutputError, python_caller
from enrich.files import atomic_write
from enrich.flatten import output_columns
from enrich.job import run_job
from enrich.read import check_columns

DEFAULT_DIR = Path(".enrich")  # where a frame's journal lives when none is given (stable across calls)


def _config(config: Any, overrides: dict[str, Any]) -> RunConfig:
    """A path, a mapping or a RunConfig; `[input] path` and `[output]` may be left out."""
    if isinstance(config, RunConfig):
        data = config.model_dump(mode="json", exclude_none=True)
        data.pop("source", None)
        return config_from_mapping(data, overrides, str(config.source or "<RunConfig>"))
    if isinstance(config, str | os.PathLike):
        return config_from_mapping(read_config_file(Path(config)), overrides, str(config))
    if isinstance(config, dict):
        return config_from_mapping(config, overrides, "<dict>")
    raise ConfigError(f"config must be a path, a dict or a RunConfig, not {type(config).__name__}")


class _Rows:
    """Names a row of the caller's frame: its 0-based position and, for pandas, its index label."""

    def __init__(self, df: Any, is_pandas: bool):
        self.index = df.index if is_pandas else None

    def where(self, pos: int) -> str:
        if self.index is None:
            return f"row {pos}"
        return f"row {pos} (index {self.index[pos]!r})"

    def error(self, exc: InputError) -> InputError:
        """`exc`, raised about the frame's Parquet copy (whose rows count from 1), told of the frame instead."""
        where = "the frame" if exc.line is None else f"the frame, {self.where(exc.line - 1)}"
        return InputError(where, exc.reason, column=exc.column)


def _task_frame(df: Any, cfg: RunConfig, rows: _Rows, is_pandas: bool) -> pl.DataFrame:
    """The columns the job reads, as polars, after the header and key checks `enrich run` makes, worded for a frame."""
    columns = list(df.columns)
    if bad := [c for c in columns if not isinstance(c, str)]:
        raise InputError("the frame", f"column names must be strings, not {type(bad[0]).__name__} ({bad[0]!r})")
    required = list(dict.fromkeys([*cfg.input.key, *cfg.input.input_columns]))
    forbidden = {c[0] for c in output_columns(output_fields(build_task_spec(cfg)), True)}
    try:
        check_columns("the frame", columns, required, forbidden)  # every column: the output adds columns beside them
    except InputError as exc:
        raise InputError("the frame", exc.reason, column=exc.column) from None
    try:
        task = pl.from_pandas(df[required]) if is_pandas else df.select(required)
    except Exception as exc:  # pyarrow/polars conversion errors have no common base
        raise InputError("the frame", f"the columns {required} cannot be converted to Arrow: {exc}") from None
    key = cfg.input.key
    # rows whose key is null or blank are refused by the job itself (key_problem), worded by row
    usable = pl.all_horizontal(
        pl.col(k).is_not_null() & (pl.col(k).cast(pl.String).str.strip_chars() != "")
        if task.schema[k] in (pl.String, pl.Categorical, pl.Enum)
        else pl.col(k).is_not_null()
        for k in key
    )
    keyed = task.select(key).with_row_index("_enrich_pos").filter(usable)
    dups = keyed.group_by(key).agg(pl.col("_enrich_pos").sort()).filter(pl.col("_enrich_pos").list.len() > 1)
    if dups.height:  # the job would refuse it too, naming lines of its Parquet copy: name the frame's rows
        dup = dups.sort(pl.col("_enrich_pos").list.get(1)).row(0, named=True)
        first, second = dup["_enrich_pos"][0], dup["_enrich_pos"][1]
        raise InputError(
            f"the frame, {rows.where(second)}",
            f"duplicate key {[dup[k] for k in key]} in column(s) {key} (first at {rows.where(first)}); "
            "keys must be unique",
        )
    return task


def enrich_frame(
    df: Any,
    config: Any,
    *,
    journal: str | Path | None = None,
    base_url: str | None = None,
    emulator: bool = False,
    api_key: str | None = None,
    budget_usd: float | None = None,
    retry_failed: bool = False,
    adopt: bool = False,
    fresh: bool = False,
) -> Any:
    """Enrich the rows of a polars or pandas DataFrame; return the enriched frame of the same kind.

    The result is `df` (its columns, dtypes, values and index unchanged, rows in the same order) with
    the researched and `_enrich_*` columns added. `journal` defaults to `.enrich/<job>.journal.sqlite`
    in the current directory, derived from the key columns and the task, so calling again with the
    same frame resumes instead of paying again. `retry_failed`, `adopt` and `fresh` are `enrich run`'s
    --retry-failed, --adopt and --fresh. Raises KeyboardInterrupt when interrupted (progress is kept),
    and the error that stopped the job early (AuthError, PaymentRequired, ApiUnavailable...).
    """
    with python_caller():
        return _enrich_frame(df, config, journal, base_url, emulator, api_key, budget_usd, retry_failed, adopt, fresh)


def _enrich_frame(
    df: Any,
    config: Any,
    journal: str | Path | None,
    base_url: str | None,
    emulator: bool,
    api_key: str | None,
    budget_usd: float | None,
    retry_failed: bool,
    adopt: bool,
    fresh: bool,
) -> Any:
    is_pandas = type(df).__module__.startswith("pandas") and hasattr(df, "columns")
    if not is_pandas and not isinstance(df, pl.DataFrame):
        raise ConfigError(f"enrich_frame needs a polars or pandas DataFrame, not {type(df).__name__}")
    probe = _config(config, {"input.path": "in.parquet", "output.path": "out.parquet"})
    rows = _Rows(df, is_pandas)
    task = _task_frame(df, probe, rows, is_pandas)
    job_id = digest([probe.input.key, probe.task.model_dump(mode="json")], 16)
    jpath = Path(journal) if journal else DEFAULT_DIR / f"{job_id}.journal.sqlite"
    jpath.parent.mkdir(parents=True, exist_ok=True)
    with _resumable(jpath):
        src = jpath.with_name(jpath.name + ".input.parquet")
        out = jpath.with_name(jpath.name + ".output.parquet")
        atomic_write(src, task.write_parquet)
        overrides: dict[str, Any] = {
            "input.path": str(src),
            "output.path": str(out),
            "journal": str(jpath),
            "api.base_url": base_url,
            "limits.budget_usd": budget_usd,
        }
        cfg = _config(config, overrides)
        key = preflight.EMULATOR_KEY if emulator else (api_key or preflight.resolve_api_key(os.environ, False))
        try:
            result = run_job(
                cfg,
                api_key=key,
                emulated=emulator,
                retry_failed=retry_failed,
                adopt=adopt,
                fresh=fresh,
                install_signals=False,
            )
        except InputError as exc:
            if exc.path != str(src):
                raise
            raise rows.error(exc) from None
        if result.exit_code == EXIT_INTERRUPTED:
            counts = result.report.get("status_counts", {})
            raise KeyboardInterrupt(
                f"enrich_frame interrupted: {counts.get('completed', 0)} of {result.report.get('rows', '?')} rows "
                f"completed; progress is kept in {jpath}: call enrich_frame again with the same frame and config "
                "to resume (no row is paid for twice)"
            )
        if result.error is not None:
            raise result.error
        return _combine(df, task, pl.read_parquet(out), is_pandas)


@contextlib.contextmanager
def _resumable(jpath: Path) -> Iterator[None]:
    """A KeyboardInterrupt outside the event loop (writing the frame's copy, seeding, the output write) says how to
    resume: the journal holds every result paid for. The loop's own interrupt carries its counts and passes as is."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if exc.args:
            raise
        raise KeyboardInterrupt(
            f"enrich_frame interrupted; progress is kept in {jpath}: call enrich_frame again with the same frame "
            "and config to resume (no row is paid for twice)"
        ) from None


def _combine(df: Any, task: pl.DataFrame, enriched: pl.DataFrame, is_pandas: bool) -> Any:
    """`df` with the columns the job added: the output holds one row per input row in input order (checked)."""
    if enriched.height != task.height or not enriched.select(task.columns).equals(task):
        raise OutputError(  # never hand back answers beside the wrong rows
            f"the job's output ({enriched.height} rows) does not line up with the frame ({task.height} rows); "
            "nothing was lost: call enrich_frame again"
        )
    added = enriched.select([c for c in enriched.columns if c not in task.columns])
    if not is_pandas:
        return df.hstack(added.get_columns())
    import pandas as pd  # the caller's own library: present whenever a pandas frame came in

    extra = added.to_pandas()
    extra.index = df.index
    return pd.concat([df, extra], axis=1)
