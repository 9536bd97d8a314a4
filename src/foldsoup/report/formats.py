"""How numbers are written in summary.md, ship.json's statement and the console. Standard
library only: the Snakefile's onsuccess handler uses it through report.ship."""

from __future__ import annotations

import math
import numbers
from typing import Any

NOT_AVAILABLE = "n/a"  # this run cannot compute the value (e.g. fewer than 2 soups)


def is_missing(x: Any) -> bool:
    """None, NaN or infinite (numpy's floats included)."""
    return x is None or (isinstance(x, numbers.Real) and not math.isfinite(x))


def fmt_pct(fraction: Any) -> str:
    """0.98437 -> '98.44%'; NaN -> 'n/a'."""
    if is_missing(fraction):
        return NOT_AVAILABLE
    value = round(100.0 * float(fraction), 2)
    return f"{value + 0.0 if value else 0.0:.2f}%"  # never print "-0.00%"
