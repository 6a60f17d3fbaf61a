"""The interval arithmetic behind every reported number, on hand-checkable cases."""
import math

import numpy as np
import pytest

from harness.stats import (outcome_digest, pack, paired_difference, prompt_interval,
                           seed_interval, unpack)


def test_wilson_interval_matches_its_formula():
    z = 1.959963984540054
    for k, n in ((0, 320), (80, 320), (320, 320), (3, 16)):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = prompt_interval(k, n)
        assert low == pytest.approx(100 * (centre - half), abs=1e-9)
        assert high == pytest.approx(100 * (centre + half), abs=1e-9)
    assert prompt_interval(0, 320) == pytest.approx((0.0, 1.186), abs=1e-3)  # not [0, 0]
    assert prompt_interval(160, 320)[1] - prompt_interval(160, 320)[0] == pytest.approx(
        10.9, abs=0.05)  # the "about +-5 points at 320 prompts"
    with pytest.raises(ValueError, match="n=0"):
        prompt_interval(0, 0)


def test_seed_interval_is_student_t():
    mean, half = seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert seed_interval([5.0]) == (5.0, None)


def test_pack_round_trip_and_digest():
    x = [True, False, False, True, True]
    assert pack(x) == "10011" and unpack(pack(x)).tolist() == [1, 0, 0, 1, 1]
    assert outcome_digest(["a", "b"]) != outcome_digest(["ab"])  # the separator counts


def test_paired_difference_edges_and_width():
    ones, zeros = np.ones(200), np.zeros(200)
    d = paired_difference([ones], [zeros])
    assert (d.mean, d.low, d.high, d.distinguishable) == (100.0, 100.0, 100.0, True)
    same = paired_difference([ones * 0 + (np.arange(200) % 3 == 0)] * 2,
                             [ones * 0 + (np.arange(200) % 3 == 0)] * 2)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.distinguishable
    # one seed: close to the normal paired interval, 1.96 sd(d) / sqrt(n)
    rng = np.random.default_rng(0)
    a, b = rng.random(400) < 0.4, rng.random(400) < 0.3
    d = paired_difference([a], [b])
    diff = a.astype(float) - b
    assert d.mean == pytest.approx(100 * diff.mean())
    normal = 1.96 * diff.std(ddof=1) / math.sqrt(400) * 100
    assert (d.high - d.low) / 2 == pytest.approx(normal, rel=0.1)
    # several seeds: Student t over the per-seed differences (here 10, 20, 30 points)
    base = np.zeros(100)
    runs = [np.r_[np.ones(k), np.zeros(100 - k)] for k in (10, 20, 30)]
    three = paired_difference(runs, [base] * 3)
    assert three.mean == pytest.approx(20.0)
    assert (three.high - three.low) / 2 == pytest.approx(10 / math.sqrt(3) * 4.302653, rel=1e-5)
    assert three.seeds == 3 and three.method == "Student t over seeds"


def test_paired_difference_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([np.ones(3)], [])
    with pytest.raises(ValueError, match="3 vs 4 prompts"):
        paired_difference([np.ones(3)], [np.ones(4)])
