"""Vaccine (Huang et al. 2024): perturbation-aware alignment.

Alignment solves ``min_w max_{||eps|| <= rho} L(w, h + eps)`` over the hidden outputs h of every
decoder layer's attention block. Each step takes two passes on the same batch: the first finds
``dL/dh`` and turns it into the worst-case ``eps`` (one global norm), the second adds ``eps`` as a
constant and its gradients alone step the optimizer. Finetuning afterwards is plain SFT.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from harness.defenses.base import StageModule
from harness.defenses.math import vaccine_perturbation


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every decoder layer's attention block, in layer order.

    Llama, Qwen2, Gemma2 and Mistral all name it ``<layer>.self_attn`` and return a tuple whose
    first element is the block's output before the residual add, so matching on the name works
    across families and under a PEFT wrapper.
    """
    return [m for name, m in model.named_modules() if name.endswith(".self_attn")]


def _split(output: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """The hidden output of an attention block, and a way to rebuild the block's return value."""
    if isinstance(output, tuple):
        return output[0], lambda h: (h, *output[1:])
    return output, lambda h: h


class Vaccine(StageModule):
    stages = ("align",)

    @dataclass
    class Params:
        rho: float = 2.0  # perturbation radius; Booster runs the baseline at 5, T-Vaccine at 3

        def __post_init__(self) -> None:
            if self.rho < 0:
                raise ValueError(f"rho must be >= 0, got {self.rho}")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False  # two forward/backward passes per optimizer step
        self.attention = attention_modules(self.model)
        if not self.attention:
            raise ValueError("Vaccine found no '*.self_attn' modules to perturb in the model")

    @contextmanager
    def _hooked(self, hook: Callable[[int, Tensor], Tensor],
                layers: Optional[Sequence[int]] = None) -> Iterator[None]:
        """Route the attention outputs of ``layers`` (default: every layer) through
        ``hook(layer, h)`` for the duration.

        The hooks stay on through the backward pass, so layers that gradient checkpointing
        recomputes see the same hook again; results are keyed by layer, the last write wins.
        """
        def make(i: int):
            def forward_hook(module, args, output):
                h, rebuild = _split(output)
                return rebuild(hook(i, h))
            return forward_hook

        layers = range(len(self.attention)) if layers is None else layers
        handles = [self.attention[i].register_forward_hook(make(i)) for i in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _record_pass(self, batch: dict[str, Tensor], layers: Optional[Sequence[int]] = None
                     ) -> tuple[Tensor, list[Tensor]]:
        """Pass 1: the clean loss and ``dL/dh_l`` for each of ``layers`` (default: all)."""
        grads: dict[int, Tensor] = {}

        def record(i: int, h: Tensor) -> Tensor:
            if not h.requires_grad:  # nothing trainable upstream: make h a leaf to read dL/dh
                h = h.detach().requires_grad_()
            h.register_hook(lambda g: grads.__setitem__(i, g.detach()))
            return h

        layers = list(range(len(self.attention)) if layers is None else layers)
        with self._hooked(record, layers):
            loss = self.lm_loss(batch)
            self.manual_backward(loss)
        return loss.detach(), [grads[i] for i in layers]

    def _perturbed_pass(self, batch: dict[str, Tensor], eps: Sequence[Tensor],
                        layers: Optional[Sequence[int]] = None) -> Tensor:
        """Pass 2: the loss with ``h_l + eps_l`` (eps a constant) on ``layers``, backpropagated."""
        layers = list(range(len(self.attention)) if layers is None else layers)
        by_layer = dict(zip(layers, eps, strict=True))
        with self._hooked(lambda i, h: h + by_layer[i], layers):
            loss = self.lm_loss(batch)
            self.manual_backward(loss)
        return loss.detach()

    def _sum_over_ranks(self, value: Tensor) -> Tensor:
        return self.all_gather(value).sum()

    def perturbed_layers(self) -> Optional[list[int]]:
        """The layers this step perturbs; None: every layer (Vaccine)."""
        return None

    def before_optimizer_step(self) -> None:
        """A hook between the perturbed backward and gradient clipping (T-Vaccine gates here)."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        layers = self.perturbed_layers()
        loss_clean, grads = self._record_pass(batch, layers)
        reduce = None
        if self.world_size > 1:
            # one global norm over every rank's rows. global_token_mean scales a rank's loss by
            # k (k / N tokens against 1 / N), and so its hidden gradients: undone, they are the
            # one-process gradients of the same rows, and the 1e-7 guard weighs alike
            grads = [g / self.world_size for g in grads]
            reduce = self._sum_over_ranks
        eps = vaccine_perturbation(grads, self.params.rho, all_reduce=reduce)
        opt.zero_grad()  # pass-1 gradients only located eps; they must not step the weights
        loss = self._perturbed_pass(batch, eps, layers)
        self.before_optimizer_step()
        if self.train_cfg.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.train_cfg.grad_clip,
                                gradient_clip_algorithm="norm")
        opt.step()
        self.lr_schedulers().step()
        eps_norm = torch.sqrt(sum(e.float().pow(2).sum() for e in eps))
        self.log_terms({"loss": loss, "loss_clean": loss_clean, "eps_norm": eps_norm},
                       batch["input_ids"].shape[0])
        return loss
