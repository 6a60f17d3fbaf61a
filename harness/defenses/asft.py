"""AsFT: finetuning anchored to the alignment direction.

For each LoRA-adapted weight the alignment direction is ``V = W_aligned - W_base``. The LoRA
update ``B A`` is penalised by ``lam * ||(I - C) B A||_F^2`` with ``C = V V^T / ||V||_F``, a soft
pull towards the directions alignment moved the weights in, so finetuning stays in the narrow
basin where safety holds. V is constant, computed once before the first step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from harness.defenses.base import StageModule
from harness.defenses.math import asft_penalty, column_basis, fraction_in_basis

PEFT_PREFIX = "base_model.model."


def plain_name(name: str) -> str:
    """A PEFT module name as the unwrapped model spells it."""
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    return name.replace(".base_layer", "")


class AsFT(StageModule):
    stages = ("finetune",)
    needs_align_stage = True  # V = W_aligned - W_base
    needs_lora = True

    @dataclass
    class Params:
        lam: float = 1.0  # the anchor scripts' value

        def __post_init__(self) -> None:
            if self.lam < 0:
                raise ValueError(f"lam must be >= 0, got {self.lam}")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.context.load_model is None:
            raise ValueError("AsFT needs context.load_model to read the base model's weights")
        self.layers: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.directions: dict[str, Tensor] = {}  # adapted module -> V, a constant
        self.bases: dict[str, Tensor] = {}  # adapted module -> orthonormal basis of col(V)

    def lora_layers(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Adapted Linear layers: name -> (aligned weight, lora_A weight, lora_B weight)."""
        from peft.tuners.lora import LoraLayer

        layers = {}
        for name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            base = module.get_base_layer()
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if not isinstance(base, torch.nn.Linear) or not adapters:
                continue
            (adapter,) = adapters  # one adapter trains per stage
            layers[plain_name(name)] = (base.weight, module.lora_A[adapter].weight,
                                        module.lora_B[adapter].weight)
        return layers

    @torch.no_grad()
    def prepare_directions(self) -> None:
        """Compute every adapted layer's V (and its column basis, for logging) once."""
        self.layers = self.lora_layers()
        if not self.layers:
            raise ValueError("AsFT penalises a LoRA update: train.finetune.lora must be set")
        base_weights = dict(self.context.load_model("base").named_parameters())
        for name, (aligned, _, lora_b) in self.layers.items():
            key = f"{name}.weight"
            if key not in base_weights:
                raise KeyError(f"AsFT: the base model has no weight {key!r} to compare with")
            V = aligned.float() - base_weights[key].to(aligned.device).float()
            self.directions[name] = V.to(lora_b.dtype)
            self.bases[name] = column_basis(V)
        if all(not V.any() for V in self.directions.values()):
            raise ValueError("AsFT: the aligned model equals the base model in every adapted "
                             "layer; it needs an align stage (defense.align.module)")

    def on_fit_start(self) -> None:
        self.prepare_directions()

    def penalty(self) -> Tensor:
        return sum(asft_penalty(A, B, self.directions[name], self.params.lam)
                   for name, (_, A, B) in self.layers.items())

    def along_fraction(self) -> Tensor:
        fractions = [fraction_in_basis(A, B, self.bases[name])
                     for name, (_, A, B) in self.layers.items()]
        return torch.stack(fractions).mean()

    def objective(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        ce = self.lm_loss(batch)
        # full precision: bf16 autocast would round the d_out x r products of a small penalty
        with torch.autocast(device_type=self.device.type, enabled=False):
            penalty = self.penalty()
        # Lightning divides the loss by the accumulation count; the spec divides only CE
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1
        terms = {"loss": ce + accumulate * penalty, "ce": ce, "penalty": penalty}
        # a diagnostic with weight-sized products: only on steps the logger records
        if self._trainer is None or self.global_step % self.trainer.log_every_n_steps == 0:
            with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
                terms["along_fraction"] = self.along_fraction()
        return terms
