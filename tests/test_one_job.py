"""One job, one projection: export, review apply and status open the job its run recorded.

Over loopback HTTP against the emulator, through the CLI as a user runs it.
"""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path
from typing import Any

import polars as pl

from enrich.journal import Journal
from tests.conftest import ROOT, run_enrich, write_config

FIELDS = {"headquarters_location": "string", "founded_year": "integer"}
GATE = '\n[gate.fields.headquarters_location]\naccept = ["high", "medium"]\n'


def _job(tmp_path: Path, base_url: str, out: str = "out.csv", extra: str = GATE) -> Path:
    src = tmp_path / "in.csv"
    if not src.exists():
        src.write_text((ROOT / "data/companies.csv").read_text(encoding="utf-8"), encoding="utf-8")
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / out,
        key=["company"],
        columns=["company", "website"],
        fields=FIELDS,
    )
    text = cfg.read_text().replace("[emulator]", f'[api]\nbase_url = "{base_url}"\n\n[emulator]')
    cfg.write_text(text + extra)
    return cfg


def _lines(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _write(rows: list[dict[str, str]], path: Path) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _cells(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    df = pl.read_csv(path, infer_schema=False) if path.suffix == ".csv" else pl.read_parquet(path)
    return {
        (r["company"], f): (str(r[f"{f}__decision"]), "" if r[f] is None else str(r[f]))
        for r in df.iter_rows(named=True)
        for f in FIELDS
    }


def _reviewed(tmp_path: Path, cfg: Path, review: Path, *flags: str) -> tuple[Path, dict[str, str]]:
    lines = _lines(review)
    year = next(r for r in lines if r["field"] == "founded_year")
    filled = [dict(year, verdict="correct", corrected_value="1901", reviewer="ana")]
    filled += [dict(r, verdict="accept", reviewer="ana") for r in lines if r is not year][:3]
    path = _write(filled, tmp_path / "reviewed.csv")
    r = run_enrich("review", "apply", str(cfg), str(path), *flags)
    assert r.returncode == 0, r.stderr
    return path, year


def test_export_from_the_journal_alone_keeps_verdicts_and_gate(tmp_path: Path, emulator: Any) -> None:
    """`enrich export JOURNAL --output F` projects what the run wrote: human verdicts and per-field gate rules."""
    emu = emulator(hard_rate=0.5, seed=11, time_scale=0.0)
    cfg = _job(tmp_path, emu.base_url)
    assert run_enrich("run", str(cfg)).returncode == 0
    _reviewed(tmp_path, cfg, tmp_path / "out.review.csv")
    written = _cells(tmp_path / "out.csv")
    assert any(d == "human_corrected" for d, _ in written.values())
    journal = tmp_path / "out.csv.journal.sqlite"
    for name in ("again.csv", "again.parquet"):
        r = run_enrich("export", str(journal), "--output", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        assert _cells(tmp_path / name) == written, name
    changed = tmp_path / "changed.toml"  # the same job with another gate: noted, the recorded gate is used
    changed.write_text(cfg.read_text().replace(GATE, ""))
    r = run_enrich("export", str(journal), "--config", str(changed), "--output", str(tmp_path / "noted.csv"))
    assert r.returncode == 0 and "differs" in r.stderr and "gate" in r.stderr, r.stderr
    assert _cells(tmp_path / "noted.csv") == written
    r = run_enrich("export", str(journal), "--basis", str(tmp_path / "basis.csv"))
    assert r.returncode == 0, r.stderr
    basis = {(x["company"], x["field"]): x["decision"] for x in _lines(tmp_path / "basis.csv")}
    assert {k: written[k][0] for k in basis} == basis
    r = run_enrich("status", str(journal))
    assert r.returncode == 0 and str(tmp_path / "out.csv") in r.stdout, r.stdout


def test_review_apply_goes_to_the_job_it_came_from(tmp_path: Path, emulator: Any) -> None:
    """A job run with --output alt: review apply with the same flags changes that job only; a review
    file of another job is refused (exit 2) and changes nothing."""
    emu = emulator(hard_rate=0.5, seed=11, time_scale=0.0)
    cfg = _job(tmp_path, emu.base_url)
    assert run_enrich("run", str(cfg)).returncode == 0
    alt = tmp_path / "alt" / "alt.csv"
    assert run_enrich("run", str(cfg), "--output", str(alt)).returncode == 0
    main_before = (tmp_path / "out.csv").read_bytes()
    reviewed, year = _reviewed(tmp_path, cfg, tmp_path / "alt" / "alt.review.csv", "--output", str(alt))
    assert (tmp_path / "out.csv").read_bytes() == main_before  # the other job is untouched
    assert _cells(alt)[(year["company"], "founded_year")] == ("human_corrected", "1901")

    # the alt job's review file applied to the default job: its runs are not that job's runs
    r = run_enrich("review", "apply", str(cfg), str(reviewed))
    assert r.returncode == 2 and "another job" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "out.csv").read_bytes() == main_before

    # by journal, without the flags, also works
    r = run_enrich("review", "apply", str(alt) + ".journal.sqlite", str(reviewed))
    assert r.returncode == 0, r.stderr

    j = Journal.open(Path(str(alt) + ".journal.sqlite"), readonly=True)
    rows = j.conn.execute("SELECT verdict, previous_json FROM verdicts").fetchall()
    j.close()
    assert rows and all(p is not None for _v, p in rows)
    first = json.loads(rows[0][1])
    assert {"value", "confidence", "processor", "decision"} <= set(first)


def test_accept_beside_an_edited_value_is_refused(tmp_path: Path, emulator: Any) -> None:
    """Editing the value cell and writing accept would accept the original silently: refused, nothing applied."""
    emu = emulator(hard_rate=0.5, seed=11, time_scale=0.0)
    cfg = _job(tmp_path, emu.base_url)
    assert run_enrich("run", str(cfg)).returncode == 0
    line = next(r for r in _lines(tmp_path / "out.review.csv") if r["field"] == "headquarters_location")
    before = (tmp_path / "out.csv").read_bytes()
    path = _write([dict(line, value="Somewhere Else, XX", verdict="accept")], tmp_path / "edited.csv")
    r = run_enrich("review", "apply", str(cfg), str(path))
    assert r.returncode == 2 and "edited" in r.stderr and "use correct" in r.stderr, r.stderr
    assert (tmp_path / "out.csv").read_bytes() == before


def test_a_correction_beyond_int64_is_refused_and_an_old_one_cannot_break_the_job(
    tmp_path: Path, emulator: Any
) -> None:
    """2**63 as a corrected integer: refused by review apply (exit 2); one stored by an older enrich is
    skipped, and every later rewrite and run still works."""
    emu = emulator(hard_rate=0.5, seed=11, time_scale=0.0)
    cfg = _job(tmp_path, emu.base_url, out="out.parquet")
    assert run_enrich("run", str(cfg)).returncode == 0
    year = next(r for r in _lines(tmp_path / "out.review.csv") if r["field"] == "founded_year")
    path = _write([dict(year, verdict="correct", corrected_value=str(2**63))], tmp_path / "big.csv")
    r = run_enrich("review", "apply", str(cfg), str(path))
    assert r.returncode == 2 and "64-bit" in r.stderr and "Traceback" not in r.stderr, r.stderr

    j = Journal.open(tmp_path / "out.parquet.journal.sqlite")
    j.add_verdicts([(json.dumps([year["company"]]), "founded_year", "correct", str(2**63), "old", "", None, None)], 0.0)
    j.close()
    for args in (("run", str(cfg)), ("export", str(cfg), "--output", str(tmp_path / "x.parquet"))):
        r = run_enrich(*args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
    assert _cells(tmp_path / "out.parquet")[(year["company"], "founded_year")][0] != "human_corrected"


def _companies_csv_job(tmp_path: Path) -> Path:
    """The bundled companies researched into out.csv, on an emulator answering at once."""
    src = tmp_path / "in.csv"
    src.write_text((ROOT / "data/companies.csv").read_text(encoding="utf-8"), encoding="utf-8")
    return write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.csv",
        key=["company"],
        columns=["company", "website"],
        emulator="time_scale = 0",
    )


def test_a_real_run_after_an_emulated_one_is_told_what_to_change_and_that_works(tmp_path: Path, emulator: Any) -> None:
    """A run without --emulator on an emulated job's journal is refused (exit 2) naming --output, and that runs."""
    cfg = _companies_csv_job(tmp_path)
    assert run_enrich("run", str(cfg), "--emulator").returncode == 0
    server = emulator(time_scale=0.0)  # another server: to this command, the real API
    r = run_enrich("run", str(cfg), "--base-url", server.base_url)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "holds emulated results" in r.stderr and "--output" in r.stderr, r.stderr
    r = run_enrich("run", str(cfg), "--base-url", server.base_url, "--output", str(tmp_path / "real.csv"))
    assert r.returncode == 0, r.stderr


def test_the_note_on_a_changed_config_gives_the_run_command_that_applies_it(tmp_path: Path) -> None:
    """A config changed after `run --output X --emulator`: the note names that command, and it runs (exit 0)."""
    cfg = _companies_csv_job(tmp_path)
    alt = str(tmp_path / "alt.csv")
    assert run_enrich("run", str(cfg), "--output", alt, "--emulator").returncode == 0
    cfg.write_text(cfg.read_text() + GATE)  # a projection setting changes
    r = run_enrich("review", "apply", str(cfg), str(tmp_path / "alt.review.csv"), "--output", alt)
    assert r.returncode == 0 and "differs from the job recorded" in r.stderr, r.stderr
    command = r.stderr.split("last run. `")[1].split("`")[0]
    assert command == shlex.join(["enrich", "run", str(cfg), "--output", alt, "--emulator"]), r.stderr
    assert run_enrich(*shlex.split(command)[1:]).returncode == 0
