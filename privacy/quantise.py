"""The metric grid: every metric a site may send, its range, and the grid its value is
quantised to before it leaves (:func:`quantise`).

A quantised value carries at most a few decimal digits, never 8 arbitrary bytes:

- counts (``num-examples``, ``patients``): integers in ``[0, MAX_COUNT]``;
- flags (``refused``, ``noise-overridden``): 0 or 1; ``refusal-code``: one of
  :data:`privacy.egress.REFUSAL_CODES`;
- reals: :data:`SIGNIFICANT` significant decimal digits within a fixed range, magnitudes
  below :data:`TINY` are 0 (or ``TINY`` when rounded up). ε and δ are rounded up and σ
  down (a report never understates the privacy spent); losses and AUROC to nearest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal

from privacy import egress as K
from privacy.errors import RefusedError

SIGNIFICANT = 4
TINY = 1e-12
MAX_COUNT = 10_000_000
REFUSAL_CODES = K.REFUSAL_CODES


class OffGrid(RefusedError, ValueError):
    """A metric value outside its range or kind; the message names the key, never the value."""


@dataclass(frozen=True)
class Grid:
    """One metric's kind (``count``, ``flag``, ``code`` or ``real``), range and rounding."""

    kind: str
    lo: float = 0.0
    hi: float = 1.0
    rounding: str = ROUND_HALF_EVEN


GRID: dict[str, Grid] = {
    K.NUM_EXAMPLES: Grid("count", 0, MAX_COUNT),
    K.PATIENTS: Grid("count", 0, MAX_COUNT),
    K.REFUSED: Grid("flag"),
    K.NOISE_OVERRIDDEN: Grid("flag"),
    K.REFUSAL_CODE: Grid("code"),
    K.EPSILON: Grid("real", 0.0, 1000.0, ROUND_CEILING),
    K.DELTA: Grid("real", 0.0, 1.0, ROUND_CEILING),
    K.NOISE_MULTIPLIER: Grid("real", 0.0, 1000.0, ROUND_FLOOR),
    K.TRAIN_LOSS: Grid("real", 0.0, 1000.0),
    K.VAL_LOSS: Grid("real", 0.0, 1000.0),
    K.VAL_AUROC: Grid("real", 0.0, 1.0),
    **{key: Grid("real", 0.0, 1.0) for key in K.FINDING_AUROC},
}
assert set(GRID) == K.ALL_METRICS, "every whitelisted metric has a grid"


def significant(value: float, rounding: str = ROUND_HALF_EVEN, digits: int = SIGNIFICANT) -> float:
    """``value`` to ``digits`` significant decimal digits (``decimal`` rounding mode)."""
    if value == 0.0:
        return 0.0
    if abs(value) < TINY:
        up = rounding == ROUND_CEILING and value > 0 or rounding == ROUND_FLOOR and value < 0
        return math.copysign(TINY, value) if up else 0.0
    exact = Decimal(repr(float(value)))
    step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    return float(exact.quantize(step, rounding=rounding))


def quantise(key: str, value: object) -> int | float:
    """The value ``key`` leaves the site with; :class:`OffGrid` when it has no place on the grid."""
    grid = GRID.get(key)
    if grid is None:
        raise OffGrid(f"metric {key!r} is not whitelisted")
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise OffGrid(f"metric {key} is not a number")
    v = float(value)
    if not math.isfinite(v):
        raise OffGrid(f"metric {key} is not finite")
    if grid.kind in ("count", "flag", "code"):
        if not v.is_integer():
            raise OffGrid(f"metric {key} is not an integer")
        n = int(v)
        ok = {"count": grid.lo <= n <= grid.hi, "flag": n in (0, 1), "code": n in REFUSAL_CODES}[grid.kind]
        if not ok:
            raise OffGrid(f"metric {key} is outside its range")
        return n
    if not grid.lo <= v <= grid.hi:
        raise OffGrid(f"metric {key} is outside [{grid.lo:g}, {grid.hi:g}]")
    return min(grid.hi, max(grid.lo, significant(v, grid.rounding)))
