"""Safety-data mixing (Qi et al., ICLR 2024, Table 4): the provider adds refusal rows from its
own alignment data (harmful prompt -> refusal) to the user's data, then finetunes plainly.

A data transform, not a loss: the pipeline calls ``mix_user_data`` on the user's rows (after
the user-data filter, if any) before the finetune, and the objective is SFT's. The added rows
are marked kind "safety" (``harness.data.schema.SAFETY``): alignment rows in the user's data
by design, not a leak. Their count is ``safety_n`` rows, or ``safety_fraction`` times the
number of user rows; the rows are drawn with the run's seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from harness.data.mixing import mix_in, safety_rows
from harness.data.schema import Example
from harness.defenses.sft import SFT


def safety_count(n_user: int, safety_n: Optional[int], safety_fraction: Optional[float]) -> int:
    """The refusal rows to add: ``safety_n`` when given, else ``safety_fraction * n_user``
    rounded to the nearest row."""
    return safety_n if safety_n is not None else int(round(safety_fraction * n_user))


class SafetyMix(SFT):
    stages = ("finetune",)
    mixes_refusal_rows = True  # keys.uses_refusal_rows: the alignment data enters the key

    @dataclass
    class Params:  # default: Qi et al.'s largest mix, 100 safety rows beside 100 harmful shots
        safety_n: Optional[int] = 100
        safety_fraction: Optional[float] = None  # of the user's rows; set safety_n: null

        def __post_init__(self) -> None:
            if (self.safety_n is None) == (self.safety_fraction is None):
                raise ValueError("give exactly one of safety_n (rows) and safety_fraction (of "
                                 f"the user's rows); got safety_n={self.safety_n}, "
                                 f"safety_fraction={self.safety_fraction}")
            if self.safety_n is not None and self.safety_n < 0:
                raise ValueError(f"safety_n must be >= 0, got {self.safety_n}")
            if self.safety_fraction is not None and self.safety_fraction < 0:
                raise ValueError(f"safety_fraction must be >= 0, got {self.safety_fraction}")

    @classmethod
    def report_label(cls, name: str, params: dict) -> str:
        """The defense as a report names it: each mixing level its own row."""
        if params.get("safety_fraction") is not None:
            return f"{name} {params['safety_fraction']:g}x"
        return f"{name} n={params.get('safety_n', cls.Params.safety_n)}"

    @classmethod
    def mix_user_data(cls, params: "SafetyMix.Params", user: list[Example],
                      refusals: list[Example], seed: int) -> list[Example]:
        """The user's rows plus the refusal rows drawn from ``refusals``, shuffled."""
        n = safety_count(len(user), params.safety_n, params.safety_fraction)
        key = ("defense.finetune.params.safety_n" if params.safety_n is not None
               else "defense.finetune.params.safety_fraction")
        return mix_in(user, safety_rows(refusals, n, seed, key), seed)
