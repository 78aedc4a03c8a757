"""Small statistics for the findings, pure Python (no numpy, no torch): means with Student-t intervals over
seeds, Pearson and Spearman correlations with Fisher-z intervals, and where a trajectory crosses a task level.

With three seeds a t interval is wide (t = 4.30 at 2 degrees of freedom): that is the honest width, and the
findings say "no clear difference" when it spans zero rather than read a ranking into noise.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, the normal 1.96 is close enough.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float  # 95% CI; equal to mean when n == 1 (no spread to estimate)
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def text(self, spec: str = ".3g") -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "-"
        if self.n == 1:
            return f"{self.mean:{spec}} (n 1)"
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]


def mean_ci(values) -> Estimate:
    """Mean and its 95% t interval over the finite values (seeds)."""
    vals = finite(values)
    n = len(vals)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    m = statistics.fmean(vals)
    if n == 1:
        return Estimate(m, m, m, 1)
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * statistics.stdev(vals) / math.sqrt(n)
    return Estimate(m, m - half, m + half, n)


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean rank), 1-based."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 2 or statistics.pstdev(x) == 0 or statistics.pstdev(y) == 0:
        return math.nan
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


@dataclass(frozen=True)
class Correlation:
    pearson: float
    pearson_ci: tuple[float, float]
    spearman: float
    spearman_ci: tuple[float, float]
    n: int


def correlation(x, y) -> Correlation:
    """Pearson r and Spearman rho of paired finite values, each with a Fisher-z 95% interval (n > 3)."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if a is not None and b is not None
             and math.isfinite(a) and math.isfinite(b)]
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    r, rho = pearson(xs, ys), pearson(ranks(xs), ranks(ys))
    return Correlation(r, fisher_ci(r, len(pairs)), rho, fisher_ci(rho, len(pairs)), len(pairs))


def fisher_ci(r: float, n: int) -> tuple[float, float]:
    if n <= 3 or math.isnan(r):
        return (math.nan, math.nan)
    if abs(r) >= 1:
        return (r, r)
    z, se = math.atanh(r), 1.96 / math.sqrt(n - 3)
    return (math.tanh(z - se), math.tanh(z + se))


def crossing(points: list[tuple[float, float, float]], level: float) -> float | None:
    """points: (step, task, retention) in step order, both axes oriented (higher is better). The retention where
    the task score first reaches `level`, linearly interpolated between the two checkpoints around the crossing;
    None when the trajectory never reaches it."""
    prev = None
    for step, task, ret in points:
        if task >= level:
            if prev is None or prev[1] >= level:
                return ret
            f = (level - prev[1]) / (task - prev[1])
            return prev[2] + f * (ret - prev[2])
        prev = (step, task, ret)
    return None


def evenly(items: list, k: int) -> list:
    """k items evenly spaced over the list, the last one always included (all of them when k >= len)."""
    if k >= len(items):
        return list(items)
    if k == 1:
        return [items[-1]]
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]
