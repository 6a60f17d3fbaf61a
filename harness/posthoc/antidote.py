"""Antidote: prune the adapter weights a harmful calibration set scores highest (Wanda-style
|W| * ||X||). METHODS.md "More methods" 5; the math is in harness.posthoc.math."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from harness.posthoc.base import PosthocContext, PosthocMethod, lora_layers
from harness.posthoc.math import RunningSquares, antidote_mask, wanda_scores


class Antidote(PosthocMethod):
    needs_harmful_data = True

    @dataclass
    class Params:
        dense_ratio: float = 0.1  # the share of each row's weights pruned (the anchor's 0.1)
        calibration_size: Optional[int] = None  # rows of alignment.harmful; null: all; 0: |W|
        batch_size: int = 8

        def __post_init__(self) -> None:
            if not 0.0 <= self.dense_ratio <= 1.0:
                raise ValueError(f"dense_ratio: must lie in [0, 1], got {self.dense_ratio}")
            if self.calibration_size is not None and self.calibration_size < 0:
                raise ValueError(f"calibration_size: must be >= 0 or null, got "
                                 f"{self.calibration_size}")
            if self.batch_size < 1:
                raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")

    @torch.no_grad()
    def apply(self, model, context: PosthocContext) -> dict[str, Any]:
        p = self.params
        targets = [(f"{name}.{part}", getattr(layer, part)[adapter])
                   for name, layer, adapter in lora_layers(model)
                   for part in ("lora_A", "lora_B")]
        norms, samples = self._calibrate(model, targets, context)
        pruned, total = {}, 0
        for name, linear in targets:
            W = linear.weight
            scores = W.abs() if norms is None else wanda_scores(W.float(), norms[name])
            mask = antidote_mask(scores, p.dense_ratio)
            W.masked_fill_(mask, 0.0)
            pruned[name] = int(mask.sum())
            total += W.numel()
        n = sum(pruned.values())
        return {"method": "antidote", "dense_ratio": p.dense_ratio, "calibration_rows": samples,
                "n_modules": len(targets), "weights_pruned": n, "adapter_weights": total,
                "pruned_share": n / total if total else 0.0, "pruned": pruned}

    def _calibrate(self, model, targets, context: PosthocContext):
        """s_j per target from one hooked forward pass over the calibration rows (the anchor's
        layer-by-layer pass with unpruned weights computes the same); None at 0 rows."""
        p = self.params
        if p.calibration_size == 0:
            return None, 0
        stats = {name: RunningSquares() for name, _ in targets}
        mask: dict[str, torch.Tensor] = {}

        def hook(name):
            def record(module, inputs, output):
                x = inputs[0].float()
                stats[name].add(((x ** 2) * mask["m"].unsqueeze(-1)).sum(1))  # pads excluded
            return record

        handles = [linear.register_forward_hook(hook(name)) for name, linear in targets]
        model.eval()
        device = next(model.parameters()).device
        try:
            for batch in context.harmful_batches(p.batch_size, p.calibration_size):
                mask["m"] = batch["attention_mask"].to(device).float()
                model(input_ids=batch["input_ids"].to(device),
                      attention_mask=batch["attention_mask"].to(device))
        finally:
            for h in handles:
                h.remove()
        samples = stats[targets[0][0]].samples if targets else 0
        if not samples:
            raise ValueError("posthoc=antidote: no calibration rows (alignment.harmful is empty)")
        return {name: s.mean for name, s in stats.items()}, samples
