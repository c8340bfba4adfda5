"""Error bars: intervals for rates, and paired comparisons of the same items before and after an edit.

Every figure the project reports is a count out of n (refusals out of 39 prompts, correct answers out
of 1,000 questions), and n is small enough that the interval matters as much as the point: 4/39 is
anywhere from 4% to 24%. When the original and the edited model answer the *same* items, the two
rates are correlated, and a paired analysis is much sharper than comparing two independent intervals:
only the items that changed (gained or lost) carry information about the change.

Closed forms only (`math`), no SciPy: the methods are a few lines each.

- `wilson`: the Wilson score interval, good coverage even at 0/n and n/n (Wald collapses there).
- `paired`: difference of paired proportions with Newcombe's (1998) method 10 interval and the exact
  McNemar test.
- `ratio_interval`: retention (after / before on the same items) with the Bonett-Price (2006) hybrid
  Wilson score interval.
- `median_interval`: a median (answer lengths) with the distribution-free order-statistic interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import AbliterateError

Z95 = 1.959963984540054  # standard normal quantile at 0.975


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (Wilson 1927); (0, 1) when n = 0 (nothing known)."""
    if not 0 <= k <= n:
        raise AbliterateError(f"a count must lie between 0 and n; got {k} out of {n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 or k = n one limit is exactly 0 or 1; rounding may leave it a hair outside.
    return max(0.0, centre - half), min(1.0, centre + half)


def _pct(x: float, digits: int) -> str:
    return f"{100 * x:.{digits}f}"


@dataclass(frozen=True)
class Rate:
    """A count out of n, with its Wilson 95% interval."""

    count: int
    n: int

    def __post_init__(self):
        if not 0 <= self.count <= self.n:
            raise AbliterateError(f"a rate needs 0 <= count <= n; got {self.count}/{self.n}")

    @property
    def value(self) -> float:
        return self.count / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.count, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"count": self.count, "n": self.n, "rate": round(self.value, 4) if self.n else None,
                "ci95": [round(lo, 4), round(hi, 4)]}

    def __str__(self) -> str:
        if not self.n:
            return "0/0"
        digits = 0 if self.n < 1000 else 1  # a whole percent is below the noise of fewer than 1,000 items
        lo, hi = self.interval
        return f"{self.count}/{self.n} ({_pct(self.value, digits)}%; 95% CI {_pct(lo, digits)}-{_pct(hi, digits)}%)"


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of `gained` out of the discordant pairs at 1/2.

    The concordant pairs carry no information about the change, so only the m = gained + lost discordant
    ones are tested; under no change each is a fair coin. Two-sided by doubling the smaller tail (the
    binomial at 1/2 is symmetric, so this equals SciPy's `binomtest`); 1 when nothing changed.
    """
    m = gained + lost
    if m == 0:
        return 1.0
    term = tail = 1  # C(m, 0); exact integers, so no underflow even at m ~ 1e4 (2**-m is below float range)
    for i in range(min(gained, lost)):
        term = term * (m - i) // (i + 1)  # C(m, i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**m)


def _phi(both: int, first: int, second: int, neither: int) -> float:
    """Newcombe's correlation estimate between the two marginal proportions, continuity-corrected toward 0
    when positive (as in Newcombe 1998, method 10, and Fagerland et al. 2014)."""
    n = both + first + second + neither
    prod = (both + first) * (second + neither) * (both + second) * (first + neither)
    if prod == 0:
        return 0.0
    a = both * neither - first * second
    if a > n / 2:
        return (a - n / 2) / math.sqrt(prod)
    return 0.0 if a >= 0 else a / math.sqrt(prod)


def newcombe_paired(both: int, first: int, second: int, neither: int, z: float = Z95) -> tuple[float, float]:
    """95% interval for p1 - p2 from a paired 2x2 table, Newcombe (1998) method 10 ("square and add").

    p1 = (both + first) / n and p2 = (both + second) / n; `first` counts the items positive only in the
    first measurement. Each marginal gets its Wilson interval; the distances from the estimates to the
    limits are combined as for a difference of correlated variables, with phi the estimated correlation.
    Unlike the Wald interval it stays inside [-1, 1] and does not collapse to a point when no pair is
    discordant. Newcombe found its coverage close to nominal; Fagerland, Lydersen & Laake (2014,
    Stat Med 33:2850) recommend it for paired differences.
    """
    n = both + first + second + neither
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (both + first) / n, (both + second) / n
    l1, u1 = wilson(both + first, n, z)
    l2, u2 = wilson(both + second, n, z)
    phi = _phi(both, first, second, neither)
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lo), min(1.0, hi)


def ratio_interval(both: int, first: int, second: int, z: float = Z95) -> tuple[float, float]:
    """95% interval for p1 / p2 from a paired 2x2 table: the Bonett-Price (2006) hybrid Wilson score interval.

    p1 = (both + first) / n, p2 = (both + second) / n (n cancels: pairs negative in both do not enter).
    Wilson intervals for the two marginals, over the n* = both + first + second informative pairs and with
    z scaled down for their correlation, are divided limit by limit. Chosen over the delta method on the
    log ratio because that one collapses to a point when no pair is discordant (edit = identity would
    claim retention exactly 1, no uncertainty), and over a bootstrap because it is closed-form and exact
    to reproduce. Fagerland, Lydersen & Laake (2014) recommend it for paired ratios. (0, inf) when p2 = 0.
    """
    n_star, n1, n2 = both + first + second, both + first, both + second
    if n2 == 0:
        return 0.0, math.inf
    a = math.sqrt((first + second + 2) / ((n1 + 1) * (n2 + 1)))
    b = math.sqrt((1 - (n1 + 1) / (n_star + 2)) / (n1 + 1))
    c = math.sqrt((1 - (n2 + 1) / (n_star + 2)) / (n2 + 1))
    zz = a / (b + c) * z

    def limits(k: int) -> tuple[float, float]:
        root = zz * math.sqrt(zz * zz + 4 * k * (1 - k / n_star))
        return (2 * k + zz * zz - root) / (2 * (n_star + zz * zz)), (2 * k + zz * zz + root) / (2 * (n_star + zz * zz))

    l1, u1 = limits(n1)
    l2, u2 = limits(n2)
    return l1 / u2, (u1 / l2 if l2 > 0 else math.inf)


@dataclass(frozen=True)
class Paired:
    """Two binary outcomes on the same n items: a (before) and b (after)."""

    n: int
    both: int  # true in a and b
    gained: int  # true in b only
    lost: int  # true in a only
    neither: int

    @property
    def before(self) -> Rate:
        return Rate(self.both + self.lost, self.n)

    @property
    def after(self) -> Rate:
        return Rate(self.both + self.gained, self.n)

    @property
    def difference(self) -> float:
        """b - a, in proportion of items."""
        return (self.gained - self.lost) / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """Newcombe (1998) method 10 interval for the difference b - a."""
        return newcombe_paired(self.both, self.gained, self.lost, self.neither)

    @property
    def p_value(self) -> float:
        """Exact McNemar test of no change."""
        return mcnemar_exact(self.gained, self.lost)

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05

    @property
    def ratio(self) -> float:
        """b / a, e.g. retention of accuracy; nan when a is never true."""
        k = self.both + self.lost
        return (self.both + self.gained) / k if k else math.nan

    @property
    def ratio_interval(self) -> tuple[float, float]:
        """Bonett-Price (2006) interval for b / a."""
        return ratio_interval(self.both, self.gained, self.lost)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"n": self.n, "gained": self.gained, "lost": self.lost, "difference": round(self.difference, 4),
                "difference_ci95": [round(lo, 4), round(hi, 4)], "mcnemar_p": float(f"{self.p_value:.4g}"),
                "significant": self.significant}

    def __str__(self) -> str:
        lo, hi = self.interval
        return (f"{self.difference:+.1%} (95% CI {lo:+.1%} to {hi:+.1%}; {self.gained} gained, {self.lost} lost "
                f"of {self.n}; McNemar p = {self.p_value:.3g})")


def paired(a: list[bool], b: list[bool]) -> Paired:
    """Compare outcomes a (before) and b (after) of the same items, item by item."""
    if len(a) != len(b):
        raise AbliterateError(f"paired outcomes need one pair per item; got {len(a)} before and {len(b)} after")
    both = sum(1 for x, y in zip(a, b) if x and y)
    gained = sum(1 for x, y in zip(a, b) if y and not x)
    lost = sum(1 for x, y in zip(a, b) if x and not y)
    return Paired(len(a), both, gained, lost, len(a) - both - gained - lost)


def median(values: list[float]) -> float:
    """The sample median (the mean of the two middle values when n is even); nan when there are none."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return math.nan
    return float(xs[n // 2]) if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free interval for the median: the k-th smallest and k-th largest values, k the largest with
    coverage 1 - 2 P(B < k) >= `level`, B ~ Binomial(n, 1/2) (the count of values below the true median; e.g.
    Conover 1999, sec. 3.2). Exact for any continuous distribution, no shape assumed: answer lengths are skewed
    and capped. None when n < 6: even (min, max) covers less than 95% then (1 - 2/2**5 = 94%)."""
    xs = sorted(values)
    n = len(xs)
    tail, k = 0, 0  # tail = 2**n P(B <= k - 1)
    while k < n and 2 * (tail + math.comb(n, k)) <= (1 - level) * 2**n:
        tail += math.comb(n, k)
        k += 1
    if k == 0:
        return None
    return float(xs[k - 1]), float(xs[n - k])
