"""SafeLoRA (Hsu et al. 2024): project a LoRA update onto the alignment subspace where it
strays from it. METHODS.md "More methods" 4; the math is harness.posthoc.math.safelora_project.

V = W_aligned - W_base. When the align stage trained a LoRA on the base model, V is exactly that
adapter's scaled B A, of rank <= r_align: it is read from the adapter's factors in float32
(``context.extras["align_adapter"]``), as AsFT reads it, since a difference of merged bf16
weights carries rounding noise of full rank that moves the cosines and the selection.
Otherwise (a full-weight or pretrained alignment) V is the float32 difference of the upcast
weights. V's rank per module is in the stats."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.models.loading import adapter_factors
from harness.posthoc.base import PosthocContext, PosthocMethod, lora_layers
from harness.posthoc.math import (factored_rank, numerical_rank, safelora_project,
                                  safelora_project_factored, safelora_selected)

log = logging.getLogger("harness")


class SafeLoRA(PosthocMethod):
    needs_align_stage = True
    v_from_align_adapter = True  # keyed: V's source follows the align stage's artifact

    @dataclass
    class Params:
        # threshold: project where cos <= threshold; number: the num_layers lowest cosines
        # (the anchor's default mode, k=10)
        mode: str = "threshold"
        threshold: float = 0.5
        num_layers: int = 10

        def __post_init__(self) -> None:
            if self.mode not in ("threshold", "number"):
                raise ValueError(f"mode: got {self.mode!r}, allowed: threshold, number")
            if not -1.0 <= self.threshold <= 1.0:
                raise ValueError(f"threshold: a cosine, must lie in [-1, 1], got "
                                 f"{self.threshold}")
            if self.num_layers < 1:
                raise ValueError(f"num_layers: must be >= 1, got {self.num_layers}")

    @torch.no_grad()
    def apply(self, model, context: PosthocContext) -> dict[str, Any]:
        layers = lora_layers(model)
        folder = context.extras.get("align_adapter")
        per_module = _from_adapter(Path(folder), layers) if folder is not None else \
            _from_weights(context, layers)
        ranks = {name: rank for (name, _, _), (rank, _, _) in zip(layers, per_module)}
        cosines = [cos for _, cos, _ in per_module]
        projected = [M for _, _, M in per_module]
        p = self.params
        chosen = safelora_selected(cosines, p.mode, p.threshold, p.num_layers)
        for (_, layer, adapter), M, pick in zip(layers, projected, chosen):
            if pick:  # B <- C B; A unchanged
                weight = layer.lora_B[adapter].weight
                weight.copy_(M.to(weight.dtype))
        source = "align_adapter" if folder is not None else "weights"
        if ranks:
            log.info("[posthoc] safelora: V from %s, rank %d to %d over %d modules", source,
                     min(ranks.values()), max(ranks.values()), len(ranks))
        return {"method": "safelora", "n_modules": len(layers), "n_projected": sum(chosen),
                "projected": [n for (n, _, _), c in zip(layers, chosen) if c],
                "cosines": {n: c for (n, _, _), c in zip(layers, cosines)},
                # the align stage's adapter factors (exact), or W_aligned - W_base in float32
                "v_source": source, "v_rank": ranks,
                "threshold": (p.threshold if p.mode == "threshold" else
                              sorted(cosines)[min(p.num_layers, len(cosines)) - 1]
                              if cosines else None)}


def _from_adapter(folder: Path, layers) -> list[tuple[int, float, torch.Tensor]]:
    """Per module: (V's rank, cos, projected B), V = the alignment LoRA's scaled B A."""
    factors = adapter_factors(folder)
    out = []
    for name, layer, adapter in layers:
        if name not in factors:
            raise ValueError(f"SafeLoRA: the alignment adapter {folder} does not adapt "
                             f"{name}, which the finetune's LoRA does: V is zero there. Give "
                             "train.align.lora the finetune's targets (train.finetune.lora)")
        B, A = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
        V_B, V_A = (t.to(B.device) for t in factors[name])
        out.append((factored_rank(V_B, V_A), *safelora_project_factored(V_B, V_A, B, A)))
    return out


def _from_weights(context: PosthocContext, layers) -> list[tuple[int, float, torch.Tensor]]:
    """Per module: (V's rank, cos, projected B), V = W_aligned - W_base with both upcast first
    (a bf16 difference would round the small alignment update again); one V at a time."""
    base = dict(context.load_model("base").named_parameters())
    aligned = dict(context.load_model("align").named_parameters())
    out = []
    for name, layer, adapter in layers:
        key = f"{name}.weight"
        B, A = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
        V = aligned[key].to(B.device).float() - base[key].to(B.device).float()
        out.append((numerical_rank(V), *safelora_project(V, B, A)))
    return out
