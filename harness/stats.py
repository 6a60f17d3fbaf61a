"""Uncertainty for every number the harness prints.

- One run: HS and FA are proportions over prompts, so each carries a Wilson score interval
  (``prompt_interval``; scipy's ``binomtest``), which stays inside [0, 100] and keeps its width
  at 0% and 100%, where the normal approximation collapses to zero.
- Several seeds: the mean with a Student-t interval over the per-seed values (``seed_interval``).
- Two defenses: the paired difference (``paired_difference``), on the same prompts and seeds.
  Over several seeds the seed is the unit: each seed's mean per-prompt difference, then a
  Student-t interval over seeds (prompt noise is inside each seed's difference). A bootstrap
  that resamples 3 seeds is too narrow (its spread ignores the t correction, by a factor of
  about 2 at 3 seeds), so it is not used there. With one seed: a paired bootstrap over prompts.
  An interval that covers 0 is "not distinguishable".
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def prompt_interval(successes: int, n: int, confidence: float = CONFIDENCE
                    ) -> tuple[float, float]:
    """Wilson interval of a proportion, in percent."""
    if n <= 0:
        raise ValueError("an interval needs at least one prompt (n=0)")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return 100.0 * float(ci.low), 100.0 * float(ci.high)


def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE
                  ) -> tuple[float, Optional[float]]:
    """(mean, half-width of the Student-t interval); the half-width is None for one value."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    if x.size == 1:
        return float(x[0]), None
    sem = stats.sem(x)
    return float(x.mean()), float(sem * stats.t.ppf(0.5 + confidence / 2, x.size - 1))


def outcome_digest(prompts: Sequence[str]) -> str:
    """Identifies the prompt list a per-prompt outcome vector is over: pairing needs the same."""
    return hashlib.sha256("\x1f".join(prompts).encode()).hexdigest()[:16]


def pack(outcomes: Sequence[bool]) -> str:
    """Per-prompt 0/1 outcomes as a short string for results.json ("0110...")."""
    return "".join("1" if o else "0" for o in outcomes)


def unpack(packed: str) -> np.ndarray:
    return np.frombuffer(packed.encode(), dtype=np.uint8) - ord("0")


@dataclass(frozen=True)
class Difference:
    """``mean`` and interval of (a - b) in percentage points, over ``seeds`` paired seeds."""
    mean: float
    low: float
    high: float
    seeds: int
    method: str = ""

    @property
    def distinguishable(self) -> bool:
        return self.low > 0 or self.high < 0


def seed_difference(a: Sequence[float], b: Sequence[float],
                    confidence: float = CONFIDENCE) -> Difference:
    """mean(a - b), ``a[s]`` and ``b[s]`` the two defenses' metric (percent) on seed s: Student
    t over the per-seed differences. It needs no per-prompt outcomes, so it also pairs runs
    read from a results.csv; it is what ``paired_difference`` computes for two or more seeds."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a Student-t difference over seeds needs the same two or more seeds "
                         f"on both sides ({len(a)} vs {len(b)})")
    mean, half = seed_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float),
                               confidence)
    return Difference(mean, mean - half, mean + half, len(a), "Student t over seeds")


def paired_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray],
                      confidence: float = CONFIDENCE, resamples: int = 4000,
                      rng_seed: int = 0) -> Difference:
    """mean(a) - mean(b) in percent, paired; ``a[s]`` and ``b[s]`` are the 0/1 outcomes of the
    two defenses on seed s's prompts, in the same order (the same prompt list: check
    ``outcome_digest`` before calling).

    Several seeds: Student t over the per-seed mean differences. One seed: the percentile
    interval of a paired bootstrap over prompts (``resamples`` draws, seeded).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes need the same seeds on both sides ({len(a)} vs "
                         f"{len(b)})")
    diffs = []
    for s, (x, y) in enumerate(zip(a, b)):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"seed #{s}: {len(x)} vs {len(y)} prompts; pairing needs the same")
        diffs.append(np.asarray(x, dtype=float) - np.asarray(y, dtype=float))
    if len(diffs) >= 2:
        return seed_difference([100.0 * d.mean() for d in diffs], [0.0] * len(diffs),
                               confidence)
    (d,) = diffs
    rng = np.random.default_rng(rng_seed)
    boot = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Difference(100.0 * float(d.mean()), 100.0 * float(low), 100.0 * float(high), 1,
                      "paired bootstrap over prompts")
