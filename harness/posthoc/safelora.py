"""SafeLoRA (Hsu et al. 2024): project a LoRA update onto the alignment subspace where it
strays from it. METHODS.md "More methods" 4; the math is harness.posthoc.math.safelora_project."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.posthoc.base import PosthocContext, PosthocMethod, lora_layers
from harness.posthoc.math import safelora_project, safelora_selected


class SafeLoRA(PosthocMethod):
    needs_align_stage = True

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
        base = dict(context.load_model("base").named_parameters())
        aligned = dict(context.load_model("align").named_parameters())
        layers, cosines, projected = lora_layers(model), [], []
        for name, layer, adapter in layers:
            V = aligned[f"{name}.weight"].float() - base[f"{name}.weight"].float()
            B, A = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
            cos, M = safelora_project(V, B, A)
            cosines.append(cos)
            projected.append(M)
        p = self.params
        chosen = safelora_selected(cosines, p.mode, p.threshold, p.num_layers)
        for (_, layer, adapter), M, pick in zip(layers, projected, chosen):
            if pick:  # B <- C B; A unchanged
                weight = layer.lora_B[adapter].weight
                weight.copy_(M.to(weight.dtype))
        return {"method": "safelora", "n_modules": len(layers), "n_projected": sum(chosen),
                "projected": [n for (n, _, _), c in zip(layers, chosen) if c],
                "cosines": {n: c for (n, _, _), c in zip(layers, cosines)},
                "threshold": (p.threshold if p.mode == "threshold" else
                              sorted(cosines)[min(p.num_layers, len(cosines)) - 1]
                              if cosines else None)}
