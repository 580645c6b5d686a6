"""Published processors: price per run and latency band (parallel-task-api.md section 6).

Money is integer micro-dollars everywhere in enrich, so sums never drift.
"""

from __future__ import annotations

from dataclasses import dataclass

MICROS_PER_USD = 1_000_000


@dataclass(frozen=True)
class Processor:
    name: str
    usd_per_1000: int
    latency_s: tuple[float, float]  # published band for this variant (standard or -fast)

    @property
    def price_micros(self) -> int:
        """Price of one run in micro-dollars (lite: $5 / 1000 runs = 5,000 micro-USD)."""
        return self.usd_per_1000 * MICROS_PER_USD // 1000


_BASE: dict[str, tuple[int, tuple[float, float], tuple[float, float]]] = {
    # name: (USD per 1000 runs, standard latency band s, -fast latency band s)
    "lite": (5, (10, 60), (10, 20)),
    "base": (10, (15, 100), (15, 50)),
    "core": (25, (60, 300), (15, 100)),
    "core2x": (50, (60, 600), (15, 180)),
    "pro": (100, (120, 600), (30, 300)),
    "ultra": (300, (300, 1500), (60, 600)),
    "ultra2x": (600, (300, 3000), (60, 1200)),
    "ultra4x": (1200, (300, 5400), (60, 2400)),
    "ultra8x": (2400, (300, 7200), (60, 3600)),
}

PROCESSORS: dict[str, Processor] = {}
for _name, (_usd, _std, _fast) in _BASE.items():
    PROCESSORS[_name] = Processor(_name, _usd, _std)
    PROCESSORS[f"{_name}-fast"] = Processor(f"{_name}-fast", _usd, _fast)


def get_processor(name: str) -> Processor | None:
    """The processor called `name`, or None when the API would answer 403 for it."""
    return PROCESSORS.get(name)


def usd(micros: int) -> str:
    """Format micro-dollars for people: `usd(2_515_000)` -> '$2.52'."""
    return f"${micros / MICROS_PER_USD:,.2f}"


_TIERS = list(_BASE)


def tier(name: str) -> int:
    """Position of a processor on the price ladder (lite=0 … ultra8x=8); `-fast` shares its tier.

    Strength in enrich means price: a tier costs strictly more than the one below it.

    >>> tier("lite"), tier("core-fast"), tier("ultra8x")
    (0, 2, 8)

    Raises KeyError for an unknown name (validate with get_processor first).
    """
    return _TIERS.index(name.removesuffix("-fast"))


def strength(name: str) -> tuple[int, int]:
    """Sort key from weakest to strongest: (tier, 1 for the standard variant, 0 for `-fast`).

    The standard variant wins a tie with its `-fast` twin because `-fast` trades some
    freshness for speed (same price). Unknown names sort below everything (`(-1, 0)`).

    >>> sorted(["core", "lite", "core-fast"], key=strength)
    ['lite', 'core-fast', 'core']
    """
    if name not in PROCESSORS:
        return (-1, 0)
    return (tier(name), 0 if name.endswith("-fast") else 1)
