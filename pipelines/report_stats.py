"""The statistics of ``mixmae report``: intervals over validation images and over seeds,
paired differences between methods, and accuracy read off a curve at a FLOPs budget.

Two sources of noise, measured apart: Wilson's interval says how far a run's accuracy could
move on another draw of validation images of the same size; the t-interval across seeds
says how far a setting's mean accuracy could move with other seeds (initialisation, masks,
data order). A difference between methods is told from luck only by the second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

LEVEL = 0.95
WILSON_Z = 1.959964  # the normal quantile of LEVEL, two-sided


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation and Student-t interval of the mean of ``n`` values;
    ``std`` and the interval are None below two values, where spread is unmeasured."""

    n: int
    mean: Optional[float]
    std: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None

    @property
    def note(self) -> str:
        if self.n == 0:
            return "no value"
        return "one seed: no interval" if self.n == 1 else ""


def spread(values: Sequence[float]) -> Spread:
    """:class:`Spread` of ``values``: mean +- t(0.975, n-1) * std / sqrt(n)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return Spread(0, None)
    mean = math.fsum(values) / n
    if n == 1:
        return Spread(1, mean)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * std / math.sqrt(n)
    return Spread(n, mean, std, mean - half, mean + half)


def wilson_interval(accuracy: float, images: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson's interval of ``accuracy`` as a binomial proportion over ``images`` (none when
    the count is unknown: the accuracy itself at both ends)."""
    n, p = images, accuracy
    if n <= 0:
        return p, p
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def mean_by_seed(pairs: Sequence[tuple[int, float]]) -> dict[int, float]:
    """One value per seed: runs repeated with the same seed share initialisation, masks and
    data order, so they are one replicate, not several; their values are averaged."""
    values: dict[int, list[float]] = {}
    for seed, value in pairs:
        values.setdefault(seed, []).append(value)
    return {seed: math.fsum(v) / len(v) for seed, v in sorted(values.items())}


def verdict(first: str, second: str, differences: Spread) -> str:
    """``first`` above ``second`` when the whole interval of the mean paired difference
    (first - second) lies above 0, below it the other way, otherwise within noise."""
    if differences.n < 2:
        return "one seed: no verdict"
    if differences.low > 0:
        return f"{first} above {second}"
    if differences.high < 0:
        return f"{second} above {first}"
    return "within noise"


def interpolate_at(curve: Sequence[tuple[float, float]], flops: float) -> Optional[float]:
    """The value of ``curve`` ((FLOPs, value) points, FLOPs ascending) at ``flops``, linear in
    log FLOPs (accuracy grows about linearly in log compute); None outside the curve, which is
    never extrapolated: a run that stopped short has no value at a budget it did not reach."""
    if not curve or not curve[0][0] <= flops <= curve[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= flops <= x1:
            if x1 == x0:
                return y1
            share = (math.log(flops) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + share * (y1 - y0)
    return curve[0][1]  # a one-point curve, asked at its own FLOPs


def log_budgets(low: float, high: float, count: int = 4) -> list[float]:
    """``count`` budgets log-spaced from ``low`` to ``high``, both included; none for an empty range."""
    if not 0 < low < high:
        return []
    step = (math.log(high) - math.log(low)) / (count - 1)
    inner = [math.exp(math.log(low) + i * step) for i in range(1, count - 1)]
    return [low, *inner, high]
