"""The flags of `run` that say where a job lives and what overrides its config: one mapping, shared by the
CLI's parser and every command that opens a job (so `export --journal` means what `run --journal` means).

Also the argparse types for numeric flags. Imports nothing heavy: the CLI parses with it before deciding
whether to load the pipeline at all.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from enrich.config import RunConfig, load_config

# ---- flag types (argparse) -----------------------------------------------------------------


def finite_nonneg(text: str) -> float:
    """argparse type: a finite number >= 0 (`--budget inf` must not switch the budget off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    value = finite_nonneg(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text!r}")
    return value


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _whole(text, 1)


def nonneg_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _whole(text, 0)


def port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free port) to 65535."""
    value = nonneg_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, not {text!r}")
    return value


# config key -> the flag that overrides it, so a bad value is reported under the flag's name
FLAGS = {
    "input.path": "--input",
    "output.path": "--output",
    "journal": "--journal",
    "task.processor": "--processor",
    "limits.budget_usd": "--budget",
    "limits.max_in_flight": "--max-in-flight",
    "api.base_url": "--base-url",
    "limits.journal_mode": "--journal-mode",
    "cache.path": "--cache",
}


def load(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config, overrides(args), flags=FLAGS)
    if getattr(args, "no_cache", False):  # --no-cache: no results cache, even one the config names
        cfg.cache.path = None
    return cfg


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "input.path": args.input,
        "output.path": args.output,
        "journal": args.journal,
        "task.processor": args.processor,
        "limits.budget_usd": args.budget,
        "limits.max_in_flight": args.max_in_flight,
        "api.base_url": args.base_url,
        "limits.journal_mode": args.journal_mode,
        "cache.path": getattr(args, "cache", None),
    }


def locate(args: argparse.Namespace, output: bool = True) -> dict[str, Any]:
    return {"input.path": args.input, "output.path": args.output if output else None, "journal": args.journal}
