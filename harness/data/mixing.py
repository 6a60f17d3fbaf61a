"""The user's upload: n samples with a fraction p of harmful (prompt, compliant answer) pairs."""
from __future__ import annotations

import logging
import math
import random
from dataclasses import replace
from typing import Optional

from harness.data.schema import SAFETY, Example

log = logging.getLogger(__name__)


def harmful_count(p: float, n: int) -> int:
    return int(round(p * n))


# |k/n - p| above this is worth a warning: the ratio a report's p column shows would be off in
# its second decimal of a percent
RATIO_TOLERANCE = 0.005


def check_ratio(p: float, n: int, mode: str) -> Optional[str]:
    """The mix ``harmful_count`` realises for ``p`` and ``n``: raise ValueError where it has no
    harmful row for a p above 0, or (mode replace) no task row for a p below 1, since the run
    would record one dose and train on another; return a warning where the realised ratio k/n
    is more than RATIO_TOLERANCE from p, else None."""
    k = harmful_count(p, n)
    if p > 0 and k == 0:
        n_min = math.floor(0.5 / p) + 1
        raise ValueError(f"attack.p={p} with attack.n={n}: round(p*n) = round({p * n:g}) = 0, so "
                         f"the upload would hold no harmful row while results record p={p}. "
                         f"Raise attack.n to {n_min} or more, or attack.p above {0.5 / n:g}")
    if mode == "replace" and p < 1 and k == n:
        raise ValueError(f"attack.p={p} with attack.n={n}: round(p*n) = {k}, so the upload would "
                         f"hold only harmful rows while results record p={p}. Raise attack.n, or "
                         f"set attack.p=1")
    if abs(k / n - p) > RATIO_TOLERANCE:
        return (f"attack.p={p} with attack.n={n} mixes round(p*n) = {k} harmful rows, a "
                f"realised ratio of {k / n:.4g}; results.json records it as "
                "metrics.data.p_realised")
    return None


def category_counts(pool: list[Example], chosen: list[Example]) -> dict[str, tuple[int, int]]:
    """category -> (rows in the pool, rows chosen), in the pool's order of first appearance."""
    counts: dict[str, list[int]] = {}
    for ex in pool:
        counts.setdefault(ex.category, [0, 0])[0] += 1
    for ex in chosen:
        counts.setdefault(ex.category, [0, 0])[1] += 1
    return {c: (a, b) for c, (a, b) in counts.items()}


def report_categories(pool: list[Example], chosen: list[Example], what: str) -> dict:
    """Log the categories the chosen harmful rows cover; warn naming those left out."""
    counts = category_counts(pool, chosen)
    if len(counts) > 1 or "" not in counts:
        log.info("%s: %d harmful rows from %d of %d pool categories: %s", what, len(chosen),
                 sum(1 for _, b in counts.values() if b), len(counts),
                 ", ".join(f"{c or '(none)'} {b}/{a}" for c, (a, b) in counts.items()))
        missing = [c or "(none)" for c, (_, b) in counts.items() if not b]
        if missing and chosen:
            log.warning("%s: %d of %d attack-pool categories have no row in the mix: %s "
                        "(attack.sampling=random samples the whole pool)", what, len(missing),
                        len(counts), ", ".join(missing))
    return counts


def build_user_data(task_pool: list[Example], harmful_pool: list[Example], p: float, n: int,
                    mode: str, seed: int, sampling: str = "first") -> list[Example]:
    """``replace``: p*n of the n rows are harmful. ``add``: p*n harmful rows on top of n.

    Harmful rows are the first p*n of the pool (``sampling="first"``, as Vaccine and Lisa take
    the first unsafe rows) or a seeded sample of it (``"random"``); task rows are a seeded
    sample. The result is shuffled.
    """
    n_harm = harmful_count(p, n)
    n_task = n if mode == "add" else n - n_harm
    if n_harm > len(harmful_pool):
        raise ValueError(f"attack.p={p} with attack.n={n} needs {n_harm} harmful rows, but the "
                         f"attack pool holds {len(harmful_pool)}")
    if sampling not in ("first", "random"):
        raise ValueError(f"attack.sampling: got {sampling!r}, allowed: random, first")
    rng = random.Random(seed)
    if n_task <= len(task_pool):
        task = rng.sample(task_pool, n_task)
    else:
        log.warning("task pool has %d rows for %d task samples: sampling with replacement",
                    len(task_pool), n_task)
        task = [rng.choice(task_pool) for _ in range(n_task)]
    harmful = harmful_pool[:n_harm] if sampling == "first" else rng.sample(harmful_pool, n_harm)
    report_categories(harmful_pool, harmful, f"attack mix ({sampling} {n_harm})")
    data = task + harmful
    rng.shuffle(data)
    return data


def refusal_pool(alignment: list[Example]) -> list[Example]:
    """The provider's refusal rows: the alignment data's harmful prompts, answered with
    refusals (the toy world's, and BeaverTails' is_safe rows, are all of this kind)."""
    return [ex for ex in alignment if ex.kind == "harmful"]


def safety_rows(pool: list[Example], n: int, seed: int, key: str) -> list[Example]:
    """n refusal rows drawn from ``pool`` with ``seed``, each marked kind SAFETY (an alignment
    row in the user's data by design). ``key`` names the config value that asked for n."""
    if n > len(pool):
        raise ValueError(f"{key}={n}: the alignment data holds {len(pool)} refusal rows "
                         "(harmful prompt -> refusal); lower it, or raise alignment.size")
    return [replace(ex, kind=SAFETY) for ex in random.Random(seed).sample(pool, n)]


def mix_in(rows: list[Example], extra: list[Example], seed: int) -> list[Example]:
    """``rows`` and ``extra`` together, shuffled with ``seed`` (no row dropped or repeated)."""
    out = list(rows) + list(extra)
    random.Random(seed).shuffle(out)
    return out
