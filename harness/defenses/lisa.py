"""Lisa (lazy safety alignment): finetuning that alternates alignment and user states.

One trajectory runs K1 steps on alignment data, then K2 on user data, and repeats, starting in
the alignment state. Leaving a state snapshots the trainable parameters as that state's anchor;
each state adds ``rho/2 * ||theta - theta_other||^2`` towards the other state's last anchor, so
neither state drifts far from what the other reached. The term is off for the first steps.

Lightning drives the loop with user batches. In an alignment-state step the incoming user batch
is dropped and a batch drawn at random from the alignment set is used instead; the run's step
count is unchanged, so over a stage the user data is seen K2/(K1+K2) as often as under plain SFT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from harness.defenses.base import StageModule
from harness.defenses.math import proximal_term

ALIGN, USER = 0, 1


class Lisa(StageModule):
    stages = ("finetune",)

    @dataclass
    class Params:  # defaults: Lisa's scripts' K1=100, K2=900, rho=1 (its argparse's are 500/500, rho 0.1)
        align_steps: int = 100  # K1
        finetune_steps: int = 900  # K2
        rho: float = 1.0
        warmup_off_fraction: float = 0.1  # no proximal term for this share of total steps

        def __post_init__(self) -> None:
            for name in ("align_steps", "finetune_steps"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.rho < 0:
                raise ValueError(f"rho must be >= 0, got {self.rho}")
            if not 0 <= self.warmup_off_fraction <= 1:
                raise ValueError("warmup_off_fraction must lie in [0, 1], "
                                 f"got {self.warmup_off_fraction}")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.require_alignment_data()
        self.anchors: dict[int, list[Tensor]] = {}  # state -> its parameters when last left

    # ---------------------------------------------------------------- the schedule
    def state_at(self, step: int) -> int:
        cycle = step % (self.params.align_steps + self.params.finetune_steps)
        return ALIGN if cycle < self.params.align_steps else USER

    def advance(self, step: int) -> None:
        """At the first step of a state, snapshot the state just left as its anchor."""
        if step > 0 and self.state_at(step) != self.state_at(step - 1):
            self.anchors[self.state_at(step - 1)] = [p.detach().clone()
                                                     for p in self.trainable_parameters()]

    def proximal(self, step: int) -> Tensor:
        other = 1 - self.state_at(step)
        if step < self.params.warmup_off_fraction * self.total_steps or other not in self.anchors:
            return torch.zeros((), device=self.device)
        return proximal_term(self.trainable_parameters(), self.anchors[other], self.params.rho)

    # ---------------------------------------------------------------- the objective
    def objective(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        return self.objective_at(batch, self.global_step)

    def objective_at(self, batch: dict[str, Tensor], step: int) -> dict[str, Any]:
        self.advance(step)
        state = self.state_at(step)
        if state == ALIGN:
            batch = self.alignment_batch(step)
        ce = self.lm_loss(batch)
        prox = self.proximal(step)
        return {"loss": ce + prox, "ce": ce, "proximal": prox, "state": float(state)}

    # ---------------------------------------------------------------- resuming
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lisa_anchors"] = {s: [a.cpu() for a in v] for s, v in self.anchors.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        anchors = checkpoint.get("lisa_anchors", {})
        self.anchors = {int(s): list(v) for s, v in anchors.items()}

    def on_fit_start(self) -> None:
        """Restored anchors are loaded before the model moves to its device; follow it."""
        params = self.trainable_parameters()
        self.anchors = {s: [a.to(p.device) for a, p in zip(v, params, strict=True)]
                        for s, v in self.anchors.items()}
