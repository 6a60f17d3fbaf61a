"""The user's upload: n samples with a fraction p of harmful (prompt, compliant answer) pairs."""
from __future__ import annotations

import logging
import random

from harness.data.schema import Example

log = logging.getLogger(__name__)


def harmful_count(p: float, n: int) -> int:
    return int(round(p * n))


def build_user_data(task_pool: list[Example], harmful_pool: list[Example], p: float, n: int,
                    mode: str, seed: int) -> list[Example]:
    """``replace``: p*n of the n rows are harmful. ``add``: p*n harmful rows on top of n.

    Harmful rows are the first p*n of the pool (as Vaccine and Lisa take the first unsafe rows);
    task rows are a seeded sample. The result is shuffled.
    """
    n_harm = harmful_count(p, n)
    n_task = n if mode == "add" else n - n_harm
    if n_harm > len(harmful_pool):
        raise ValueError(f"attack.p={p} with attack.n={n} needs {n_harm} harmful rows, but the "
                         f"attack pool holds {len(harmful_pool)}")
    rng = random.Random(seed)
    if n_task <= len(task_pool):
        task = rng.sample(task_pool, n_task)
    else:
        log.warning("task pool has %d rows for %d task samples: sampling with replacement",
                    len(task_pool), n_task)
        task = [rng.choice(task_pool) for _ in range(n_task)]
    data = task + harmful_pool[:n_harm]
    rng.shuffle(data)
    return data
