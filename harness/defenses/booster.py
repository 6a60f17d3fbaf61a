"""Booster (Huang et al. 2024): alignment that attenuates harmful perturbation.

Alignment minimises ``f(w) + lam * [h(w) - h(w - alpha * g_h / ||g_h||)]``, f the CE on the
alignment batch, h the CE on a batch of the provider's harmful (prompt, harmful answer) pairs,
``g_h = grad h(w)``: the penalty limits how far one normalised harmful step can lower the
harmful loss. Each step takes three passes (METHODS.md, "### 1. Booster"):

1. h at w on a harmful batch: ``g_h``; stored, grads zeroed;
2. h at ``w' = w - alpha g_h / (||g_h|| + 1e-7)`` on the *same* harmful batch: ``g_h'``; stored,
   grads zeroed, and w restored from a saved copy (bit-exact);
3. f at w on the alignment batch: ``g_f``;

then one optimizer step with ``g_f + lam * (g_h - g_h')``. First order: no gradient flows
through the normalised direction. Finetuning afterwards is plain SFT. ``||.||`` is one norm over
every trainable tensor; under DDP each backward's gradients are already the global batch's
(``global_token_mean``), so the norm and both shifted weights are one process's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from harness.defenses.base import StageModule
from harness.defenses.math import booster_diagnostics, booster_gradient, booster_shift

HARMFUL_SALT = 0x42  # the harmful batch's draw, apart from any alignment_batch draw


class Booster(StageModule):
    stages = ("align",)
    needs_harmful_data = True

    @dataclass
    class Params:  # Booster's scripts (script/alignment/smooth_align.sh); argparse's lam=0.001
        lam: float = 5.0  # lambda; per task in the anchor (GSM8K: 5 or 25)
        alpha: float = 0.1  # the normalised harmful step
        harmful_batch_size: int = 10  # global; hard-coded in the anchor

        def __post_init__(self) -> None:
            for name in ("lam", "alpha"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
            if self.harmful_batch_size < 1:
                raise ValueError(f"harmful_batch_size must be >= 1, got {self.harmful_batch_size}")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False  # three passes per optimizer step
        self.harmful_data = self.require_harmful_data()

    def harmful_batch(self, step: int) -> dict[str, Tensor]:
        """This rank's share of the step's global harmful batch (every rank at least a row)."""
        if self.params.harmful_batch_size < self.world_size:
            raise ValueError(f"defense.align.params.harmful_batch_size="
                             f"{self.params.harmful_batch_size} is the global harmful batch; "
                             f"it needs a row for each of the {self.world_size} processes")
        return self.global_random_batch(self.harmful_data, step, HARMFUL_SALT,
                                        self.params.harmful_batch_size)

    def _pass(self, batch: dict[str, Tensor], params: list[torch.nn.Parameter]
              ) -> tuple[Tensor, list[Tensor]]:
        """One forward and backward; returns the loss and takes the gradients out of .grad."""
        loss = self.lm_loss(batch)
        self.manual_backward(loss)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return loss.detach(), grads

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        params = self.trainable_parameters()
        opt.zero_grad()
        harmful = self.harmful_batch(self.global_step)
        h, g_h = self._pass(harmful, params)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, booster_shift(g_h, self.params.alpha), strict=True):
                p.sub_(s)
        h_shifted, g_h_shifted = self._pass(harmful, params)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        loss, g_f = self._pass(batch, params)
        sizes = booster_diagnostics(g_f, g_h, g_h_shifted, self.params.lam)  # before clipping
        for p, g in zip(params, booster_gradient(g_f, g_h, g_h_shifted, self.params.lam),
                        strict=True):
            p.grad = g
        if self.train_cfg.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.train_cfg.grad_clip,
                                gradient_clip_algorithm="norm")
        opt.step()
        self.lr_schedulers().step()
        self.log_terms({"loss": loss, "harmful_loss": h, "harmful_loss_shifted": h_shifted,
                        "penalty": self.params.lam * (h - h_shifted), **sizes},
                       batch["input_ids"].shape[0])
        return loss
