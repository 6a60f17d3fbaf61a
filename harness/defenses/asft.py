"""AsFT: finetuning anchored to the alignment direction.

For each LoRA-adapted weight the alignment direction is ``V = W_aligned - W_base``. The LoRA
update ``B A`` is penalised by ``lam * ||(I - C) B A||_F^2`` with ``C = V V^T / ||V||_F``, a soft
pull towards the directions alignment moved the weights in, so finetuning stays in the narrow
basin where safety holds. V is constant, computed once before the first step.

When the align stage trained a LoRA, V is exactly that adapter's scaled ``B A``: the factors are
read from its artifact (``context.extras["align_adapter"]``) in float32, which is exact (a
difference of merged bf16 weights is not: rounding noise of full rank) and keeps the penalty's
products r x r. Otherwise V is the float32 difference of the float32-upcast weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from harness.defenses.base import StageModule
from harness.defenses.math import (asft_penalty, asft_penalty_factored, column_basis,
                                   factored_column_basis, fraction_in_basis)
from harness.models.loading import adapter_factors

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
        # adapted module -> V (float32), or its factors (V_B, V_A) after a LoRA alignment
        self.directions: dict[str, Union[Tensor, tuple[Tensor, Tensor]]] = {}
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
        adapter = self.context.extras.get("align_adapter")
        if adapter is not None:
            self._directions_from_adapter(Path(adapter))
        else:
            self._directions_from_weights()
        if all(not (V[0].any() if isinstance(V, tuple) else V.any())
               for V in self.directions.values()):
            raise ValueError("AsFT: the aligned model equals the base model in every adapted "
                             "layer; it needs an align stage (defense.align.module)")

    def _directions_from_weights(self) -> None:
        base_weights = dict(self.context.load_model("base").named_parameters())
        for name, (aligned, _, _) in self.layers.items():
            key = f"{name}.weight"
            if key not in base_weights:
                raise KeyError(f"AsFT: the base model has no weight {key!r} to compare with")
            # both upcast before subtracting, and V kept in float32: a bf16 V would round the
            # small alignment difference again
            V = aligned.float() - base_weights[key].to(aligned.device).float()
            self.directions[name] = V
            self.bases[name] = column_basis(V)

    def _directions_from_adapter(self, folder: Path) -> None:
        """V = scaling * B_align A_align per layer, from the align stage's saved adapter."""
        factors = adapter_factors(folder)
        for name, (aligned, _, _) in self.layers.items():
            if name not in factors:  # a layer the alignment LoRA did not adapt: V = 0
                factors[name] = (aligned.new_zeros((aligned.shape[0], 1)).float(),
                                 aligned.new_zeros((1, aligned.shape[1])).float())
            V_B, V_A = (t.to(aligned.device) for t in factors[name])
            self.directions[name] = (V_B, V_A)
            self.bases[name] = factored_column_basis(V_B, V_A)

    def on_fit_start(self) -> None:
        self.prepare_directions()

    def penalty(self) -> Tensor:
        terms = []
        for name, (_, A, B) in self.layers.items():
            V = self.directions[name]
            if isinstance(V, tuple):
                terms.append(asft_penalty_factored(A.float(), B.float(), *V, self.params.lam))
            else:  # float32 factors of a float32 model: as they are (.float() is a no-op)
                terms.append(asft_penalty(A.float(), B.float(), V, self.params.lam))
        return sum(terms)

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
