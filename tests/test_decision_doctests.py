"""The examples in the decision-layer docstrings run and stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "enrich.gate",
        "enrich.files",
        "enrich.flatten",
        "enrich.review",
        "enrich.audit",
        "enrich.spend",
        "enrich.processors",
        "enrich.errors",
        "enrich.client",
        "enrich.runmeta",
        "enrich.storage",
        "enrich.pilot",
        "enrich.job",
        "enrich.pilot_page",
    ],
)
def test_docstring_examples(module: str) -> None:
    """Every `>>>` example in the module gives the output shown."""
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
