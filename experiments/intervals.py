"""Paired differences between two variants of a sweep with a 95 % t interval over the seeds.

Each seed's pretraining and evaluation of a variant is paired with the same seed's run of the
baseline (same data order and initialisation seed), so the seed-to-seed spread that both share
cancels. With n paired seeds the interval is ``mean(d) ± t(0.975, n - 1) * sd(d) / sqrt(n)`` for
the per-seed differences d: the usual t interval, which assumes the differences are roughly normal
(with 3 seeds there is no way to check that; the interval is wide, t = 4.30).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Two-sided 95 % quantiles t(0.975, df) of Student's t distribution for df = 1..30 (standard tables).
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table up to 30 degrees of freedom, beyond it the Cornish-Fisher expansion
    around the normal quantile (error below 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


@dataclass(frozen=True)
class Interval:
    """The mean paired difference over ``seeds`` seeds and its 95 % t interval (None, None with
    one seed)."""

    difference: float
    low: float | None
    high: float | None
    seeds: int

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.difference

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired_interval(values: Mapping[str, float], base: Mapping[str, float]) -> Interval | None:
    """The difference ``values - base`` over the seeds both have (keys: seeds), with its 95 % t
    interval; None when they share no seed."""
    differences = [values[seed] - base[seed] for seed in values if seed in base]
    if not differences:
        return None
    mean = statistics.fmean(differences)
    if len(differences) == 1:
        return Interval(mean, None, None, 1)
    half = t_quantile_975(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return Interval(mean, mean - half, mean + half, len(differences))


def by_seed(runs: Sequence[Mapping[str, float]], seeds: Sequence[str], key: str) -> dict[str, float]:
    """{seed: value of ``key``} of the runs that logged it (``seeds`` aligned with ``runs``)."""
    return {seed: run[key] for seed, run in zip(seeds, runs, strict=True) if key in run}
