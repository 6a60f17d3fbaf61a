"""Per-prompt refusal-feature cosines: the distributions behind ``refusal_separation``.

A run's evaluation records only the mean ``cos(f_l(x), R_l)`` of held-out harmful and harmless
prompts and their gap; Ref-Teacher's appendix draws each prompt's cosine, per model. These
functions return those cosines, with R_l measured on the model's own held feature sets at the
same layer and batch size, so their means are the recorded ones.

They live apart from ``refusal.py`` because that file's bytes are part of every evaluation key
and of Ref-Teacher's stage keys: an analysis added there would rebuild every cached stage.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor

from harness.analysis.refusal import cosine, features, measure_refusal_direction


def prompt_cosines(model, tokenizer, prompts: Sequence[str], layer: int, direction: Tensor,
                   batch_size: int = 64) -> Tensor:
    """``cos(f_l(x), direction)`` of each rendered prompt, in order (float32, on the CPU)."""
    return cosine(features(model, tokenizer, prompts, layer, batch_size), direction)


def separation_cosines(model, tokenizer, held_harmful: Sequence[str],
                       held_harmless: Sequence[str], prompt_sets: Mapping[str, Sequence[str]],
                       layer: int, batch_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """(R_l measured on the held sets, each prompt set's per-prompt cosines with it)."""
    direction = measure_refusal_direction(model, tokenizer, held_harmful, held_harmless, layer,
                                          batch_size)
    return direction, {kind: prompt_cosines(model, tokenizer, prompts, layer, direction,
                                            batch_size)
                       for kind, prompts in prompt_sets.items()}
