"""config.py [gate], [escalate] and the new [limits] keys: validation names the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from enrich.config import GateConfig, check_gate_fields, check_max_processor, load_config
from enrich.errors import ConfigError

BASE = (
    '[input]\npath="a.csv"\nkey=["k"]\n[task]\nprocessor="lite"\n[task.output.x]\ntype="string"\n'
    '[task.output.y]\ntype="integer"\n[output]\npath="o.csv"\n'
)


def load(tmp_path: Path, extra: str, **overrides: object) -> object:
    path = tmp_path / "job.toml"
    path.write_text(BASE + extra)
    return load_config(path, dict(overrides) or None)


def test_defaults_and_full_sections(tmp_path: Path) -> None:
    """All new sections parse; absent ones give the default gate and no escalation."""
    cfg = load(tmp_path, "")
    assert cfg.gate.rule("x").accept == ["high"] and cfg.escalate is None and cfg.ladder == ["lite"]
    cfg = load(
        tmp_path,
        '[gate]\naccept=["high","medium"]\nreview=[]\nreject=["low","none"]\naccept_at=0.9\n'
        'review_at=0.6\n[gate.fields.y]\nreview=["medium"]\n'
        '[escalate]\nprocessors=["core","pro"]\non=["rejected","review"]\nmax_rows=100\n'
        '[limits]\ndaily_budget_usd=12.5\nspend_ledger="spend.sqlite"\nmax_processor="pro-fast"\n',
    )
    assert cfg.gate.rule("y").accept == ["high"] and cfg.gate.rule("y").review == ["medium"]
    assert cfg.gate.rule("x").accept == ["high", "medium"]
    assert cfg.ladder == ["lite", "core", "pro"] and cfg.escalate.max_rows == 100
    assert cfg.limits.daily_budget_micros == 12_500_000 and cfg.limits.spend_ledger == Path("spend.sqlite")


@pytest.mark.parametrize(
    "extra,where",
    [
        ('[gate]\naccept=["high"]\nreview=["high","medium"]\n', "[gate]: confidence 'high' is in both"),
        ('[gate]\nreject=["low"]\n', "'none' is in none of accept, review, reject"),
        ('[gate]\naccept=["medium"]\nreview=["high"]\n', "accept must only hold confidences above those in review"),
        ('[gate]\naccept=["high","low"]\nreview=["medium"]\nreject=["none"]\n', "accept must only hold"),
        ('[gate]\naccept=["top"]\n', "[gate] accept[0]"),
        ("[gate]\naccept_at=0.5\nreview_at=0.7\n", "review_at must not be above accept_at"),
        ("[gate]\nbogus=1\n", "[gate] bogus"),
        (
            '[gate.fields.x]\naccept=["high","medium","low"]\nreject=["low"]\n',
            "[gate.fields.x]: confidence 'low' is in both",
        ),
        ('[gate.fields.zzz]\naccept=["high"]\n', "[gate.fields.zzz]: not an output field; output fields are x, y"),
        (
            '[escalate]\nprocessors=["lite"]\n',
            "[escalate] processors[0]: 'lite' is not on a higher price tier than 'lite'",
        ),
        ('[escalate]\nprocessors=["lite-fast"]\n', "not on a higher price tier"),
        ('[escalate]\nprocessors=["core","base"]\n', "[escalate] processors[1]: 'base' is not on a higher price tier"),
        ('[escalate]\nprocessors=["turbo"]\n', "unknown processor 'turbo'"),
        ("[escalate]\nprocessors=[]\n", "[escalate] processors: must not be empty"),
        ('[escalate]\nprocessors=["core"]\non=[]\n', '[escalate] on: must be ["rejected"], ["review"] or'),
        ('[escalate]\nprocessors=["core"]\non=["review","review"]\n', '[escalate] on: must be ["rejected"]'),
        ('[escalate]\nprocessors=["core"]\non=["accepted"]\n', "[escalate] on[0]"),
        (
            '[gate]\naccept=["high","medium"]\nreview=[]\n[escalate]\nprocessors=["core"]\non=["review"]\n',
            '[escalate] on: ["review"] never makes a row climb: [gate] sends no confidence to review',
        ),
        ('[escalate]\nprocessors=["core"]\nmax_rows=0\n', "[escalate] max_rows"),
        ('[limits]\nmax_processor="warp"\n', "unknown processor 'warp'"),
        ("[limits]\ndaily_budget_usd=-1\n", "[limits] daily_budget_usd"),
        (
            '[limits]\nmax_processor="base"\n[escalate]\nprocessors=["core"]\n',
            "[escalate] processors[0]: 'core' is above [limits] max_processor = 'base'",
        ),
    ],
)
def test_bad_sections(tmp_path: Path, extra: str, where: str) -> None:
    """Each bad value is refused with the file and the key path in the message."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    assert str(info.value).startswith(str(tmp_path / "job.toml")) and where in str(info.value)


def test_escalating_on_review_needs_a_rule_that_sends_a_confidence_to_review(tmp_path: Path) -> None:
    """`on = ["review"]` with no review level anywhere is refused (above); one field's review level is enough."""
    gate = '[gate]\naccept=["high","medium"]\nreview=[]\n[gate.fields.x]\naccept=["high"]\nreview=["medium"]\n'
    cfg = load(tmp_path, gate + '[escalate]\nprocessors=["core"]\non=["review"]\n')
    assert cfg.escalate is not None and cfg.escalate.on == ["review"]


def test_max_processor_checks_overridden_task_processor(tmp_path: Path) -> None:
    """A --processor override above the cap is refused; the cap compares price tiers."""
    with pytest.raises(
        ConfigError, match=re.escape("[task] processor: 'pro' is above [limits] max_processor = 'core'")
    ):
        load(tmp_path, '[limits]\nmax_processor="core"\n', **{"task.processor": "pro"})
    cfg = load(tmp_path, '[limits]\nmax_processor="core"\n', **{"task.processor": "core-fast"})
    check_max_processor(cfg)  # same tier: allowed
    cfg.limits.max_processor = "lite"
    with pytest.raises(ConfigError, match=re.escape("[task] processor")):
        check_max_processor(cfg)


def test_check_gate_fields_direct(tmp_path: Path) -> None:
    """check_gate_fields works against any field set (e.g. a spec loaded from a schema file)."""
    cfg = load(tmp_path, '[gate.fields.x]\naccept=["high","medium"]\n')
    check_gate_fields(cfg, {"x": {}})
    with pytest.raises(ConfigError, match=re.escape("[gate.fields.x]: not an output field")):
        check_gate_fields(cfg, {"other": {}})


def test_override_semantics() -> None:
    """Lists given in an override are exact; the others lose the levels the given ones claim."""
    g = GateConfig(fields={"a": {"review": ["medium", "low"]}, "b": {"accept_at": 0.7}})
    assert (g.rule("a").accept, g.rule("a").review, g.rule("a").reject) == (["high"], ["medium", "low"], ["none"])
    assert g.rule("b").accept_at == 0.7 and g.rule("b").review == ["medium"]
