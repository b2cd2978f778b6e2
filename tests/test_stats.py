"""dat.stats: statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from dat.errors import DatError
from dat.stats import (
    attack_success_rate,
    bootstrap_ci,
    mean_se,
    paired_difference,
    summarize,
    wilson_interval,
)


def test_mean_and_standard_error():
    m, se = mean_se([1, 2, 3, 4])
    assert m == 2.5
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)  # s = sqrt(5/3), SE = s / sqrt(4)
    assert mean_se([7.0]) == (7.0, None)
    assert mean_se([]) == (None, None)
    with pytest.raises(DatError):
        mean_se([1.0, float("nan")])


def test_bootstrap_ci_hand_checked():
    # Two values: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5 % and 97.5 % quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0], n_boot=4000, seed=1) == (0.0, 1.0)
    assert bootstrap_ci([3.0] * 10) == (3.0, 3.0)
    assert bootstrap_ci([1.0]) is None
    # 50 zeros, 50 ones: means ~ N(0.5, 0.05^2) -> [0.402, 0.598] (binomial: [0.40, 0.60])
    x = [0.0] * 50 + [1.0] * 50
    lo, hi = bootstrap_ci(x, n_boot=20_000, seed=0)
    assert lo == pytest.approx(0.40, abs=0.011) and hi == pytest.approx(0.60, abs=0.011)
    assert bootstrap_ci(x, n_boot=2000, seed=5) == bootstrap_ci(x, n_boot=2000, seed=5)
    lo90, hi90 = bootstrap_ci(x, n_boot=20_000, level=0.90, seed=0)
    assert lo < lo90 < hi90 < hi
    assert lo90 == pytest.approx(0.5 - 1.645 * 0.05, abs=0.011)


def test_summarize_fields():
    s = summarize([1.0, 2.0, 3.0], n_boot=1000)
    assert s["mean"] == 2.0 and s["n"] == 3 and s["se"] == pytest.approx(1 / math.sqrt(3))
    assert 1.0 <= s["ci"][0] <= 2.0 <= s["ci"][1] <= 3.0
    assert summarize([]) == {"mean": None, "se": None, "ci": None, "n": 0}


def test_paired_difference_matches_by_episode_id():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 3: 10.0, 5: None}
    b = {0: 0.0, 1: 1.0, 2: 1.0, 3: 5.0, 4: 9.0, 5: 2.0}  # 4 and 5 have no pair
    d = paired_difference(a, b, n_boot=2000)
    assert d["n"] == 4
    assert d["mean"] == pytest.approx(2.25)  # diffs 1, 1, 2, 5
    assert d["se"] == pytest.approx(math.sqrt(10.75 / 3) / 2)
    assert 1.0 <= d["ci"][0] <= 2.25 <= d["ci"][1] <= 5.0
    # a constant shift gives a zero-width CI at the shift, whatever the spread of the values
    base = {i: float(i * i) for i in range(20)}
    d = paired_difference({i: v + 0.5 for i, v in base.items()}, base)
    assert d["mean"] == pytest.approx(0.5) and d["ci"] == pytest.approx([0.5, 0.5])


def test_paired_difference_resamples_scenarios_when_they_have_several_samples():
    values = {0: 1.0, 1: 3.0, 2: 0.0, 3: 0.0, 4: 2.0, 5: 2.0}
    base = dict.fromkeys(values, 0.0)
    groups = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c"}
    d = paired_difference(values, base, n_boot=2000, groups=groups)
    assert (d["n"], d["pairs"]) == (3, 6)  # scenario means 2, 0, 2
    assert d["mean"] == pytest.approx(4 / 3)
    assert d["se"] == pytest.approx(math.sqrt(4 / 3) / math.sqrt(3))
    # one episode per scenario: the plain paired difference
    single = paired_difference(values, base, n_boot=2000, groups={k: k for k in values})
    assert single == paired_difference(values, base, n_boot=2000)


def test_attack_success_rate_and_wilson():
    asr = attack_success_rate([True, False, False, True, False], n_boot=2000)
    assert asr["rate"] == pytest.approx(0.4) and asr["successes"] == 2 and asr["n"] == 5
    assert asr["wilson"] == pytest.approx([0.1176, 0.7693], abs=1e-4)  # textbook values for 2/5
    assert 0.0 <= asr["ci"][0] <= 0.4 <= asr["ci"][1] <= 1.0
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) is None
