"""The provider's harmful set: harmful prompts with harmful answers, at alignment time.

Booster and RepNoise train against it, and T-Vaccine probes layers with it. It comes from the
provider's side, apart from the user's attack pool and the evaluation prompts.
"""
from __future__ import annotations

import random
from dataclasses import replace

from harness.data.schema import Example
from harness.data.toy import ToyWorld

SEED_OFFSET = 8  # the world's own datasets draw with seeds cfg.seed + 1 ... + 7


def toy_alignment_harmful(world: ToyWorld) -> list[Example]:
    """The toy world's: the harmful prompts of ``alignment_data()`` (the align pool, which no
    other pool shares), in its order, each with a compliant answer in its group's style (as
    the attack pool writes them). So row i shares its prompt with the i-th harmful alignment
    row, whose answer is a refusal: RepNoise's (harmful answer, refusal) pairs, and Booster's
    "same prompts" as its anchor's."""
    rng = random.Random(world.cfg.seed + SEED_OFFSET)
    return [replace(ex, output=world.compliant_answer(ex.meta["group"], rng))
            for ex in world.alignment_data() if ex.kind == "harmful"]
