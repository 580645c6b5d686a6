"""A finished job's re-run answers from its journal (settled.py): the same lines as the full run, without
loading the pipeline; any change to what the answer depends on sends it back to the full run.

Over loopback against the emulator (a separate process, so every run sees the same server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CANARY_KEY, ROOT, run_enrich, write_config

# runs `enrich` in-process and reports whether the pipeline was loaded, as JSON on stdout's last line
PROBE = (
    "import json, sys\n"
    "from enrich.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(json.dumps({'code': code, 'pipeline': 'enrich.pipeline' in sys.modules, 'polars': 'polars' in sys.modules}))\n"
)


def _job(tmp_path: Path, base_url: str, extra: str = "") -> Path:
    src = tmp_path / "in.csv"
    if not src.exists():
        src.write_text("company\nApple\nMicrosoft\nNvidia\nAcme Widgets\n", encoding="utf-8")
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=src,
        output=tmp_path / "out.csv",
        key=["company"],
        columns=["company"],
        fields={"headquarters_location": "string", "founded_year": "integer"},
    )
    text = cfg.read_text().replace("[emulator]", f'[api]\nbase_url = "{base_url}"\n\n[emulator]')
    cfg.write_text(text + extra)
    return cfg


def probe(*args: str) -> tuple[dict[str, Any], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEL_", "ENRICH_"))}
    env["PARALLEL_API_KEY"] = CANARY_KEY
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert r.stdout.strip(), r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def written(folder: Path) -> dict[Path, int]:
    """The job's files (the journal's own -wal/-shm aside: SQLite manages those) and their mtimes."""
    return {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file() and ".journal.sqlite" not in p.name}


def test_rerun_of_a_finished_job_prints_the_full_runs_lines_without_the_pipeline(
    tmp_path: Path, emulator_process
) -> None:
    """Re-running a finished job: exit 0, exactly the lines a full no-op run prints, no pipeline loaded,
    no request sent, no file rewritten."""
    emu = emulator_process("--time-scale", "0")
    cfg = _job(tmp_path, emu.base_url)
    first = run_enrich("run", str(cfg))
    assert first.returncode == 0, first.stderr
    full, full_err = probe("run", str(cfg), "--retry-failed")  # a flag the shortcut leaves to the full run
    assert full == {"code": 0, "pipeline": True, "polars": True}
    files = written(tmp_path)
    requests = emu.stats()["total_requests"]
    fast, fast_err = probe("run", str(cfg))
    assert fast == {"code": 0, "pipeline": False, "polars": False}
    assert fast_err == full_err and "wrote 4 rows" in fast_err
    assert emu.stats()["total_requests"] == requests
    assert written(tmp_path) == files


def test_anything_the_answer_depends_on_sends_the_rerun_to_the_full_run(tmp_path: Path, emulator_process) -> None:
    """A new input row, a changed config, a deleted output, a review verdict, another key: each re-run
    does the work the change asks for (researches the row, rewrites the files), never the shortcut."""
    emu = emulator_process("--time-scale", "0")
    cfg = _job(tmp_path, emu.base_url)
    assert run_enrich("run", str(cfg)).returncode == 0
    assert probe("run", str(cfg))[0]["pipeline"] is False

    with (tmp_path / "in.csv").open("a", encoding="utf-8") as f:  # a new row: researched
        f.write("Amazon\n")
    done, _ = probe("run", str(cfg))
    assert done == {"code": 0, "pipeline": True, "polars": True}
    assert len(emu.ledger()) == 5
    assert probe("run", str(cfg))[0]["pipeline"] is False  # settled again

    (tmp_path / "out.csv").unlink()  # the output gone: written again
    assert probe("run", str(cfg))[0]["pipeline"] is True
    assert (tmp_path / "out.csv").exists()

    cfg.write_text(cfg.read_text() + '\n[gate.fields.headquarters_location]\naccept = ["high", "medium", "low"]\n')
    assert probe("run", str(cfg))[0]["pipeline"] is True  # another gate: the projection changes

    review = tmp_path / "out.review.csv"  # Acme Widgets is unknown to the emulator: its fields are rejected
    lines = review.read_text().splitlines()
    assert len(lines) > 1
    header, cells = lines[0].split(","), lines[1].split(",")
    cells[header.index("verdict")] = "reject"
    review.write_text("\n".join([lines[0], ",".join(cells)]) + "\n")
    assert run_enrich("review", "apply", str(cfg), str(review)).returncode == 0
    assert probe("run", str(cfg))[0]["pipeline"] is True  # a verdict since: the full run looks

    other = run_enrich("run", str(cfg), key="another-key-0123456789")  # another key: the journal's identity check
    assert other.returncode == 2 and "journal" in other.stderr
    assert len(emu.ledger()) == 5  # nothing was paid twice along the way


def test_a_job_that_refreshes_old_answers_is_never_answered_from_the_journal(tmp_path: Path, emulator_process) -> None:
    """With refresh_after_days, time alone changes what a re-run does: every re-run is a full run."""
    emu = emulator_process("--time-scale", "0")
    cfg = _job(tmp_path, emu.base_url)
    cfg.write_text(cfg.read_text().replace("[task]\n", "[task]\nrefresh_after_days = 30\n"))
    assert run_enrich("run", str(cfg)).returncode == 0, cfg.read_text()
    assert probe("run", str(cfg))[0]["pipeline"] is True


def test_a_deleted_review_file_is_written_again_by_the_rerun(tmp_path: Path, emulator_process) -> None:
    """Deleting the review file and running again writes it again, with the lines the summary names."""
    emu = emulator_process("--time-scale", "0")
    cfg = _job(tmp_path, emu.base_url)
    assert run_enrich("run", str(cfg)).returncode == 0
    review = tmp_path / "out.review.csv"
    lines = review.read_text(encoding="utf-8").splitlines()
    assert len(lines) > 1  # Acme Widgets is unknown to the emulator: its fields are rejected
    review.unlink()
    again = run_enrich("run", str(cfg))
    assert again.returncode == 0, again.stderr
    assert f"({len(lines) - 1} lines" in again.stderr
    assert review.read_text(encoding="utf-8").splitlines() == lines


def test_an_emulated_rerun_whose_knowledge_table_is_gone_is_refused_as_the_full_run_refuses_it(tmp_path: Path) -> None:
    """--emulator with its [emulator] knowledge file deleted since the job settled: exit 2 naming it, not 0."""
    knowledge = tmp_path / "knowledge.csv"
    knowledge.write_text((ROOT / "data" / "companies_knowledge.csv").read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "in.csv").write_text("company\nApple\nMicrosoft\n", encoding="utf-8")
    cfg = write_config(
        tmp_path / "job.toml",
        input_path=tmp_path / "in.csv",
        output=tmp_path / "out.csv",
        key=["company"],
        columns=["company"],
        emulator=f"knowledge = {json.dumps(str(knowledge))}\ntime_scale = 0",
    )
    assert run_enrich("run", str(cfg), "--emulator").returncode == 0
    assert probe("run", str(cfg), "--emulator")[0]["pipeline"] is False  # settled
    knowledge.unlink()
    again = run_enrich("run", str(cfg), "--emulator")
    assert again.returncode == 2 and "knowledge" in again.stderr and "file not found" in again.stderr, again.stderr


def test_a_full_run_never_imports_pandas(tmp_path: Path, emulator_process) -> None:
    """The CLI's Arrow conversions skip pyarrow's pandas probe: a whole run (parquet output too) leaves
    pandas unimported even where it is installed (it costs ~0.5 s of start-up)."""
    pytest.importorskip("pandas", reason="pandas is not installed: nothing to keep out")
    emu = emulator_process("--time-scale", "0")
    cfg = _job(tmp_path, emu.base_url)
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "out.csv"), str(tmp_path / "out.parquet")))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEL_", "ENRICH_"))}
    env["PARALLEL_API_KEY"] = CANARY_KEY
    code = "import sys\nfrom enrich.cli import main\nmain(sys.argv[1:])\nprint('pandas' in sys.modules)\n"
    r = subprocess.run([sys.executable, "-c", code, "run", str(cfg)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stderr
    assert (tmp_path / "out.parquet").exists()
