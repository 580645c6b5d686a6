"""Random flags, configs, keys and files into the CLI: only documented exit codes come out,
never a traceback, and an exit 2 (refused) never leaves a paid run in the emulator's ledger.

In-process (`enrich.cli.main`) for speed; an exception escaping `main` is the in-process
form of a traceback and fails the test. ENRICH_CLI_FUZZ_EXAMPLES raises the example count.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from enrich.cli import main
from enrich.job import EXIT_CODES
from tests.conftest import CANARY_KEY

DOCUMENTED_EXIT_CODES = set(EXIT_CODES)  # the README's table; the fuzz may reach any of them but nothing else
EXAMPLES = int(os.environ.get("ENRICH_CLI_FUZZ_EXAMPLES", "40"))

GOOD_CSV = "company,website\nApple,https://apple.com\nNvidia,https://nvidia.com\n"
INPUTS: dict[str, Any] = {
    "good.csv": GOOD_CSV,
    "dup_header.csv": "company,company\nA,B\n",
    "no_key.csv": "name\nA\n",
    "empty.csv": "",
    "utf16.csv": GOOD_CSV.encode("utf-16"),
    "ragged.csv": "company,website\nApple\n",
    "dup_key.csv": "company\nApple\nApple\n",
    "typed.parquet": pa.table(
        {
            "company": ["Apple", "Nvidia"],
            "d": pa.array([1, None], pa.duration("ns")),
            "m": pa.array([[("k", 1)], None], pa.map_(pa.string(), pa.int64())),
        }
    ),
    "binary_key.parquet": pa.table({"company": pa.array([b"Apple"], pa.binary())}),
    "corrupt.parquet": b"PAR1 not really",
    "missing.csv": None,
    "adir.csv": "DIR",
}
FIELD_NAMES = ["hq", "founded_year", "a", "a__confidence", "x.y", "_enrich_status", "citations", "É t", ""]
FIELD_TYPES = ["string", "integer", "number", "boolean", "array", "object", "strin", "null", 5, ["string", "null"]]
OUTPUTS = [
    "out.csv",
    "out.parquet",
    "out.txt",
    "out",
    "sub/out.csv",
    "good.csv",
    "out.journal.sqlite",
    "adir.csv",
    "file/out.csv",
    "/proc/enrich-fuzz.csv",
]
NUMBERS = [None, "0", "0.01", "100", "inf", "-inf", "nan", "-1", "1e400", "ten", ""]
COUNTS = [None, "1", "0", "-3", "x", "1.5", "100000"]
PROCESSORS = [None, "lite-fast", "base", "turbo", ""]
KEYS = [CANARY_KEY, CANARY_KEY + "\n", "", "   ", "sk-\u200bx", "sk-a\nb", "sk-\x07", "ключ", None]
EXTRAS = [
    "",
    "bogus = 1",
    "[limits]\nbudget_usd = inf",
    "api_key = 'x'",
    "[limits]\nmax_in_flight = 0",
    "[limits]\nbatch_size = 5000",
    "this is not toml",
    "[emulator]\nknowledge = 'nope.csv'",
]


@pytest.fixture(scope="module")
def api() -> Any:
    from enrich.emulator import EmulatorConfig, EmulatorServer

    with EmulatorServer(EmulatorConfig(time_scale=0)) as server:
        yield server


def _ledger_size(server: Any) -> int:
    return len(httpx.get(server.base_url + "/_emulator/ledger", timeout=10).json())


def _materialise(tmp: Path) -> None:
    for name, content in INPUTS.items():
        path = tmp / name
        if content is None:
            continue
        if content == "DIR":
            path.mkdir()
        elif isinstance(content, pa.Table):
            pq.write_table(content, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    (tmp / "file").write_text("a file, not a folder")


def _config_text(
    tmp: Path, src: str, out: str, fields: list[tuple[str, Any]], processor: str | None, extra: str, drop: str | None
) -> str:
    sections = {
        "input": f'[input]\npath = {json.dumps(str(tmp / src))}\nkey = ["company"]\n',
        "task": f"[task]\nprocessor = {json.dumps(processor or 'lite-fast')}\n",
        "output": f"[output]\npath = {json.dumps(out if out.startswith('/') else str(tmp / out))}\n",
        "limits": "[limits]\nreconcile_grace_s = 6\nrequest_timeout_s = 5\n",
    }
    for name, typ in fields:
        sections["task"] += f"\n[task.output.{json.dumps(name)}]\ntype = {json.dumps(typ)}\n"
        if typ == "object":
            sections["task"] += f'[task.output.{json.dumps(name)}.properties.y]\ntype = "string"\n'
    if drop:
        sections.pop(drop, None)
    return "\n".join([*sections.values(), extra, "[emulator]\ntime_scale = 0\n"])


# each dimension: its good value first, then the values worth trying
DIMENSIONS: dict[str, list[Any]] = {
    "src": list(INPUTS),
    "out": OUTPUTS,
    "fields": [
        [("hq", "string")],
        [],
        *[[("hq", "string"), (n, t)] for n in FIELD_NAMES for t in FIELD_TYPES[:1]],
        *[[("hq", t)] for t in FIELD_TYPES],
        [("x", "object"), ("x.y", "string")],
    ],
    "processor": PROCESSORS,
    "extra": EXTRAS,
    "drop": [None, "input", "task", "output"],
    "budget": NUMBERS,
    "max_in_flight": COUNTS,
    "flag_processor": PROCESSORS,
    "key": KEYS,
    "key_file": [None, "missing.key", "file", "adir.csv"],
    "emulated": [False, True],
    "journal": [None, "j.sqlite", "good.csv", "adir.csv", "file", "empty.csv"],
    "junk_flag": [None, "--dry-run", "--retry-failed", "--no-such-flag", "--budget"],
}


@st.composite
def jobs(draw: Any) -> dict[str, Any]:
    """A good job with one to three dimensions changed (so most examples get far enough to matter)."""
    changed = draw(st.sets(st.sampled_from(sorted(DIMENSIONS)), min_size=0, max_size=3))
    job = {dim: draw(st.sampled_from(values)) if dim in changed else values[0] for dim, values in DIMENSIONS.items()}
    return {"command": draw(st.sampled_from(["run", "run", "plan", "status", "export"])), **job}


def _argv(job: dict[str, Any], tmp: Path, cfg: Path, base_url: str) -> list[str]:
    if job["command"] == "status":
        return ["status", str(tmp / (job["journal"] or "j.sqlite")), *(["--json"] if job["emulated"] else [])]
    if job["command"] == "export":
        out = job["out"] if job["out"].startswith("/") else str(tmp / job["out"])
        return ["export", str(tmp / (job["journal"] or "j.sqlite")), "--output", out]
    argv = [job["command"], str(cfg)]
    for flag, value in (
        ("--budget", job["budget"]),
        ("--max-in-flight", job["max_in_flight"]),
        ("--processor", job["flag_processor"]),
    ):
        if value is not None:
            argv += [flag, value]
    if job["journal"]:
        argv += ["--journal", str(tmp / job["journal"])]
    argv += ["--emulator"] if job["emulated"] else ["--base-url", base_url]
    if job["junk_flag"]:
        argv.append(job["junk_flag"])
    return argv


def _invoke(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    err = io.StringIO()
    with (
        mock.patch.dict(os.environ, env, clear=True),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # anything escaping main() is a traceback for the user
            pytest.fail(f"enrich {argv} raised:\n{traceback.format_exc()}")
    return code, err.getvalue()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(job=jobs())
def test_cli_exit_codes_are_documented_and_refusals_cost_nothing(api: Any, job: dict[str, Any]) -> None:
    """Random job: exit code documented, no traceback, exit 2 leaves the ledger untouched."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _materialise(tmp)
        cfg = tmp / "job.toml"
        cfg.write_text(
            _config_text(tmp, job["src"], job["out"], job["fields"], job["processor"], job["extra"], job["drop"])
        )
        if job["command"] in ("status", "export") and job["journal"] in (None, "j.sqlite"):
            # a real journal to read: from a good run on the emulator
            good = tmp / "good.toml"
            good.write_text(_config_text(tmp, "good.csv", "seed.csv", [("hq", "string")], None, "", None))
            assert _invoke(["run", str(good), "--emulator", "--journal", str(tmp / "j.sqlite")], {})[0] == 0
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEL_", "ENRICH_"))}
        if job["key"] is not None:
            env["PARALLEL_API_KEY"] = job["key"]
        if job["key_file"]:
            key_file = tmp / job["key_file"]
            if key_file.exists():
                key_file.chmod(0o600)
            env["PARALLEL_API_KEY_FILE"] = str(key_file)
        before = _ledger_size(api)
        argv = _argv(job, tmp, cfg, api.base_url)
        code, err = _invoke(argv, env)
        event(f"{job['command']} exit {code}")
        assert code in DOCUMENTED_EXIT_CODES, (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            assert _ledger_size(api) == before, (argv, err)
            assert err.strip().startswith("enrich: error: ") and len(err.strip().splitlines()) == 1, (argv, err)
        for secret in ("CANARY", "\u200b", "ключ"):
            assert secret not in err, (argv, err)
