"""Evaluation caps (``eval.harmful_size``, ``eval.task_size``): a random sample of the rows,
fixed by ``eval.sample_seed`` rather than the run's seed, so every run seed scores the same
prompts and paired comparisons across seeds hold. Where the rows carry more than one category
the sample is stratified: each category keeps its share of the cap (largest remainders), so a
file sorted by category is not cut to its first categories. The sample keeps the file's order.
``python -m harness.inspect`` and the pipeline both call ``cap_rows``."""
from __future__ import annotations

import math
import random
from typing import Optional

from harness.data.schema import Example


def quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """``total`` split over strata in proportion to their sizes (Hamilton's largest remainders;
    a tie goes to the stratum met first)."""
    n = sum(sizes.values())
    exact = {k: total * v / n for k, v in sizes.items()}
    out = {k: math.floor(x) for k, x in exact.items()}
    order = sorted(sizes, key=lambda k: -(exact[k] - out[k]))  # stable: first met wins ties
    for k in order[:total - sum(out.values())]:
        out[k] += 1
    return out


def sample_rows(rows: list[Example], size: Optional[int], seed: int) -> list[Example]:
    """Every row when ``size`` is null or covers them; else ``size`` rows drawn with ``seed``,
    stratified by ``category`` where the rows have more than one, in the rows' own order."""
    if size is None or size >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    strata: dict[str, list[int]] = {}
    for i, ex in enumerate(rows):
        strata.setdefault(ex.category, []).append(i)
    if len(strata) == 1:
        chosen = rng.sample(range(len(rows)), size)
    else:
        share = quotas({k: len(v) for k, v in strata.items()}, size)
        chosen = [i for k, idx in strata.items() for i in rng.sample(idx, share[k])]
    return [rows[i] for i in sorted(chosen)]


def cap_rows(rows: list[Example], size: Optional[int], seed: int,
             key: str) -> tuple[list[Example], Optional[str]]:
    """``sample_rows`` and a note saying what it kept (None when it kept every row)."""
    kept = sample_rows(rows, size, seed)
    if len(kept) == len(rows):
        return kept, None
    n_cats = len({ex.category for ex in rows})
    how = f", stratified by {n_cats} categories" if n_cats > 1 else ""
    return kept, (f"{key}={size}: a random sample of {len(kept)} of {len(rows)} rows "
                  f"(eval.sample_seed={seed}{how})")
