"""Intervals and paired tests against independently computed references, plus identities and edge cases.

Reference values were computed once, outside this project, with statsmodels 0.15.0 and SciPy 1.17.1
(installed in a scratch directory, not a dependency):
- Wilson: `statsmodels.stats.proportion.proportion_confint(k, n, method="wilson")`;
- McNemar: `statsmodels.stats.contingency_tables.mcnemar(table, exact=True).pvalue`, equal to
  `scipy.stats.binomtest(gained, gained + lost, 0.5).pvalue` in every case below;
- Newcombe: statsmodels 0.15 has no paired-difference interval, so the marginals' Wilson limits came from
  `proportion_confint` and were combined by Newcombe's (1998) method-10 formula in a scratch script;
- ratio: statsmodels' Tang/Nam score interval (`_confint_riskratio_paired_nam`), a different method that
  must agree with Bonett-Price closely at large n.
"""

from __future__ import annotations

import math
import random

import pytest
from conftest import FAST, run_cli

from abliterate.errors import AbliterateError
from abliterate.measure.stats import (
    Rate,
    mcnemar_exact,
    newcombe_paired,
    paired,
    ratio_interval,
    wilson,
)

# (k, n) -> statsmodels proportion_confint(method="wilson")
WILSON = {
    (4, 39): (0.04061331344668381, 0.23578854462856527),
    (0, 10): (0.0, 0.27753279986288926),
    (10, 10): (0.7224672001371106, 1.0),
    (450, 1000): (0.4194153840742968, 0.4809672917742588),
    (1, 2): (0.09453120573423068, 0.9054687942657693),
}

# (gained, lost) -> statsmodels mcnemar(exact=True).pvalue == scipy binomtest(...).pvalue
MCNEMAR = {
    (15, 5): 0.04138946533203125,
    (0, 7): 0.015625,
    (3, 3): 1.0,
    (40, 62): 0.037066767438560584,
    (1, 0): 1.0,
    (130, 170): 0.02418198247326274,
}

# (both, first only, second only, neither) -> Newcombe method 10 for p1 - p2 (scratch script, see above).
# The first two are the paired examples of Fagerland, Lydersen & Laake (Bentur 2009 and Cavo 2012 data).
NEWCOMBE = {
    (1, 1, 7, 12): (-0.506920226686141, -0.025559124164859837),
    (59, 6, 16, 80): (-0.11862119563870999, -0.004625113933050061),
    (10, 15, 5, 20): (0.025838416549251064, 0.35693657165919257),
    (400, 40, 62, 498): (-0.041785412534631645, -0.0021649452407171525),
}

# (both, first only, second only, neither) -> statsmodels _confint_riskratio_paired_nam, ratio p1 / p2
NAM_RATIO = {
    (400, 40, 62, 498): (0.9101358063129754, 0.9950389451785329),
    (59, 6, 16, 80): (0.7475790590229959, 0.9876149285961321),
}


@pytest.mark.parametrize("kn", list(WILSON))
def test_wilson_matches_statsmodels(kn):
    assert wilson(*kn) == pytest.approx(WILSON[kn], abs=1e-12)


def test_wilson_edges():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(0, 5)
    assert lo == 0.0 and 0 < hi < 1
    with pytest.raises(AbliterateError, match="between 0 and n"):
        wilson(6, 5)


def test_rate_str_and_dict():
    r = Rate(4, 39)
    assert str(r) == "4/39 (10%; 95% CI 4-24%)"
    d = r.to_dict()
    assert d == {"count": 4, "n": 39, "rate": 0.1026, "ci95": [0.0406, 0.2358]}
    assert str(Rate(450, 1000)) == "450/1000 (45.0%; 95% CI 41.9-48.1%)"
    assert Rate(0, 0).to_dict()["rate"] is None and math.isnan(Rate(0, 0).value)
    with pytest.raises(AbliterateError, match="5/4"):
        Rate(5, 4)


@pytest.mark.parametrize("gl", list(MCNEMAR))
def test_mcnemar_matches_scipy(gl):
    assert mcnemar_exact(*gl) == pytest.approx(MCNEMAR[gl], rel=1e-12)
    assert mcnemar_exact(*gl) == mcnemar_exact(*reversed(gl))


def test_mcnemar_large_counts_do_not_overflow():
    p = mcnemar_exact(5000, 5200)
    assert 0 < p < 0.2 and mcnemar_exact(0, 0) == 1.0


@pytest.mark.parametrize("table", list(NEWCOMBE))
def test_newcombe_matches_reference(table):
    assert newcombe_paired(*table) == pytest.approx(NEWCOMBE[table], abs=1e-12)


@pytest.mark.parametrize("table", list(NAM_RATIO))
def test_ratio_close_to_tang_score_interval(table):
    lo, hi = ratio_interval(*table[:3])
    ref = NAM_RATIO[table]
    tol = 0.002 if sum(table) >= 1000 else 0.015  # two recommended methods; they converge as n grows
    assert lo == pytest.approx(ref[0], abs=tol) and hi == pytest.approx(ref[1], abs=tol)
    assert lo < (table[0] + table[1]) / (table[0] + table[2]) < hi


def _table(rng, n, p_before, p_gain, p_loss):
    a = [rng.random() < p_before for _ in range(n)]
    b = [(x and rng.random() >= p_loss) or (not x and rng.random() < p_gain) for x in a]
    return a, b


def test_intervals_cover_the_truth_about_95_percent():
    """Seeded simulation: true difference and ratio known in closed form; coverage must be near 95%."""
    rng = random.Random(0)
    n, p_before, p_gain, p_loss, reps = 300, 0.45, 0.08, 0.15, 1000
    p_after = p_before * (1 - p_loss) + (1 - p_before) * p_gain
    cover_d = cover_r = 0
    for _ in range(reps):
        s = paired(*_table(rng, n, p_before, p_gain, p_loss))
        lo, hi = s.interval
        cover_d += lo <= p_after - p_before <= hi
        lo, hi = s.ratio_interval
        cover_r += lo <= p_after / p_before <= hi
    # 1000 replicates: a 95% interval's coverage estimate has a standard error of 0.7 points
    assert 0.93 <= cover_d / reps <= 0.975
    assert 0.93 <= cover_r / reps <= 0.975


def test_paired_counts_and_symmetry():
    a = [True, True, False, False, True, False, True]
    b = [True, False, True, True, True, False, False]
    s = paired(a, b)
    assert (s.n, s.both, s.gained, s.lost, s.neither) == (7, 2, 2, 2, 1)
    t = paired(b, a)
    assert t.difference == -s.difference
    assert t.interval == pytest.approx((-s.interval[1], -s.interval[0]), abs=1e-12)
    assert t.p_value == s.p_value
    u = paired([True] * 30 + [False] * 10, [True] * 20 + [False] * 20)
    v = paired([True] * 20 + [False] * 20, [True] * 30 + [False] * 10)
    assert u.difference == -0.25 and v.difference == 0.25 and u.significant and v.significant
    assert u.interval == pytest.approx((-v.interval[1], -v.interval[0]), abs=1e-12)
    assert u.ratio == pytest.approx(2 / 3) and v.ratio == pytest.approx(1.5)


def test_identical_outcomes():
    a = [True, False, True, True, False] * 20
    s = paired(a, list(a))
    assert s.difference == 0 and s.p_value == 1.0 and not s.significant
    assert s.gained == s.lost == 0 and s.ratio == 1.0
    lo, hi = s.interval
    assert lo < 0 < hi  # no change observed is not proof of no change
    lo, hi = s.ratio_interval
    assert lo < 1 < hi
    d = s.to_dict()
    assert d["mcnemar_p"] == 1.0 and d["difference"] == 0 and d["gained"] == 0


def test_paired_edge_cases():
    s = paired([], [])
    assert s.n == 0 and s.difference == 0 and s.p_value == 1.0 and s.interval == (-1.0, 1.0)
    all_true = paired([True] * 10, [True] * 10)
    assert all_true.interval[0] < 0 <= all_true.interval[1] <= 1 and all_true.ratio == 1
    all_false = paired([False] * 10, [False] * 10)
    assert math.isnan(all_false.ratio) and all_false.ratio_interval == (0.0, math.inf)
    flip = paired([True] * 10, [False] * 10)
    assert flip.difference == -1 and flip.interval[0] == -1.0 and flip.p_value == pytest.approx(2 / 2**10)
    with pytest.raises(AbliterateError, match="3 before and 2 after"):
        paired([True] * 3, [True] * 2)


def test_every_rate_that_run_prints_and_saves_has_its_n_and_interval(capsys, tmp_path, model_dirs):
    """`run` on a tiny model: each count in the table reads k/n (x%; 95% CI lo-hi%) with Wilson's interval,
    the change column has a paired interval and McNemar's p, and metrics.json carries the same."""
    import json
    import re

    out = tmp_path / "out"
    code, text, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *FAST)
    assert code == 0, err
    pattern = re.compile(r"(\d+)/(\d+) \((\d+)%; 95% CI (\d+)-(\d+)%\)")
    rows = [line for line in text.splitlines() if line.startswith(("refusals (harmful)", "over-refusals"))]
    assert len(rows) == 2
    for row in rows:
        found = pattern.findall(row)
        assert len(found) == 2, row  # original and edited
        for k, n, pct, lo, hi in found:
            k, n = int(k), int(n)
            w = wilson(k, n)
            assert (int(lo), int(hi)) == (round(100 * w[0]), round(100 * w[1])), row
            assert int(lo) <= int(pct) <= int(hi)
        assert re.search(r"[+-]\d+% \([+-]\d+% to [+-]\d+%; p = [\d.e-]+\)", row), row
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("before", "after"):
        m = metrics[side]
        for key, n in (("refusals", "n_harmful"), ("over_refusals", "n_harmless")):
            lo, hi = m[f"{key}_ci95"]
            assert [round(x, 4) for x in wilson(m[key], m[n])] == [lo, hi]
    for key in ("refusals", "over_refusals"):
        change = metrics["change"][key]
        assert change["n"] == metrics["before"]["n_harmful" if key == "refusals" else "n_harmless"]
        assert 0 <= change["mcnemar_p"] <= 1 and change["difference_ci95"][0] <= change["difference"]
