"""A Ctrl-C while the `enrich` command is still starting (loading the CLI, parsing flags) ends it quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT


def test_ctrl_c_while_the_cli_loads_prints_one_line_not_a_traceback() -> None:
    """SIGINT at several moments of the first ~0.5 s: once enrich's code runs, never a traceback, and exit 75."""
    env = {**os.environ, "PARALLEL_API_KEY": "test-key"}
    seen = []
    for delay in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5):
        p = subprocess.Popen(
            [sys.executable, "-m", "enrich", "plan", "configs/companies.toml"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        enrich_dir = str(ROOT / "enrich")
        if "Traceback" in err and enrich_dir not in err:  # Python's own start-up (site, runpy), before enrich's code
            continue
        assert "Traceback" not in err, f"SIGINT after {delay} s:\n{err}"
        # killed by the signal before Python set up its handler, stopped with one line, or already finished
        assert p.returncode in (-signal.SIGINT, 75, 0), (delay, p.returncode, err)
        if p.returncode == 75:
            assert err.strip().splitlines()[-1] == "enrich: interrupted", err
        seen.append(p.returncode)
    assert 75 in seen, f"no signal came while enrich was loading: {seen}"
