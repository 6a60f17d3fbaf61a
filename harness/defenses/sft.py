"""Plain supervised finetuning: the no-defense baseline, and base pretraining on the toy world."""
from __future__ import annotations

from harness.defenses.base import StageModule


class SFT(StageModule):
    stages = ("base", "align", "finetune")
