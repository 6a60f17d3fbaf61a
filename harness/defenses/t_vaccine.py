"""T-Vaccine: Vaccine's perturbation on sampled layers only (METHODS.md, "### 3. T-Vaccine").

Each step (``t`` the global step):

1. probe, when ``t % K == 0`` (step 0 included): one pass on **one** harmful row of the probe
   pool (the first ``probe_pool_size`` rows of alignment.harmful) records ``||dL/dh_l||`` at
   every attention output (Vaccine's hook point); ``p_l = ||g_l|| / sum_j ||g_j||``, and the
   pass's weight gradients are discarded;
2. resample, when ``t % J == 0``: S layers drawn without replacement with probabilities p;
3. Vaccine's two passes with hooks on the sampled layers only:
   ``eps_l = rho * g_l / ||g_S||``, the norm over the sampled layers' hidden gradients;
4. gate: the attention parameters (LoRA or full) of unsampled layers get no gradient, so the
   optimizer leaves them (and their state) untouched; the MLP's too with ``gate_mlp`` (the
   anchor gates attention only). Gating by dropping the gradient, not by freezing, keeps the
   set of parameters DDP reduces fixed; the other parameters' gradients are the same.

The probe row and the draw are functions of (seed, step) alone, not of the rank: every DDP rank
samples the same layers. The activation-checkpointing memory trick is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from harness.defenses.math import layer_probabilities, sample_layers
from harness.defenses.repnoise import decoder_submodules
from harness.defenses.vaccine import Vaccine

PROBE_SALT, SAMPLE_SALT = 0x45, 0x46


class TVaccine(Vaccine):
    stages = ("align",)
    needs_harmful_data = True  # the probe pool

    @dataclass
    class Params:  # script/alignment/T-Vaccine.sh (argparse: S=5, pool 100, rho 0.1)
        rho: float = 3.0
        sampled_layers: int = 8  # S
        resample_every: int = 20  # J
        probe_every: int = 200  # K
        probe_pool_size: int = 200
        gate_mlp: bool = False  # the anchor leaves the MLP trainable in every layer
        too_few: str = "raise"  # fewer non-zero p_l than S: raise (numpy's way) | uniform

        def __post_init__(self) -> None:
            if self.rho < 0:
                raise ValueError(f"rho must be >= 0, got {self.rho}")
            for name in ("sampled_layers", "resample_every", "probe_every", "probe_pool_size"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.too_few not in ("raise", "uniform"):
                raise ValueError(f"too_few must be 'raise' or 'uniform', got {self.too_few!r}")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        n = len(self.attention)
        if self.params.sampled_layers > n:
            raise ValueError(f"defense.align.params.sampled_layers={self.params.sampled_layers}: "
                             f"the model has {n} layers")
        self.probe_pool = self.require_harmful_data()
        self.probe_pool_len = min(self.params.probe_pool_size, len(self.probe_pool))
        mlps = decoder_submodules(self.model, "mlp") if self.params.gate_mlp else []
        gated = [self.attention[i] for i in range(n)]
        self.gated_params = [
            [p for p in m.parameters() if p.requires_grad]
            + ([p for p in mlps[i].parameters() if p.requires_grad] if mlps else [])
            for i, m in enumerate(gated)]
        self.probs: Optional[list[float]] = None
        self.sampled: Optional[list[int]] = None

    # ---------------------------------------------------------------- probe and draw
    def _rng(self, step: int, salt: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.stage_seed, step, salt]))

    def probe(self, step: int) -> list[float]:
        """``||dL/dh_l||`` of every attention output on one harmful row; grads discarded."""
        row = int(self._rng(step, PROBE_SALT).integers(self.probe_pool_len))
        batch = self.context.collate([self.probe_pool[row]])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        opt = self.optimizers()
        opt.zero_grad()
        grads: dict[int, torch.Tensor] = {}

        def record(i: int, h: torch.Tensor) -> torch.Tensor:
            if not h.requires_grad:
                h = h.detach().requires_grad_()
            h.register_hook(lambda g: grads.__setitem__(i, g.detach()))
            return h

        with self._hooked(record):
            loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
            self.manual_backward(loss)
        opt.zero_grad()
        return [float(grads[i].float().norm()) for i in range(len(self.attention))]

    def perturbed_layers(self) -> list[int]:
        step = self.global_step
        if self.probs is None or step % self.params.probe_every == 0:
            self.probs = layer_probabilities(self.probe(step))
        if self.sampled is None or step % self.params.resample_every == 0:
            self.sampled = sample_layers(self.probs, self.params.sampled_layers,
                                         self._rng(step, SAMPLE_SALT), self.params.too_few)
        return self.sampled

    def before_optimizer_step(self) -> None:
        for i, params in enumerate(self.gated_params):
            if i not in self.sampled:
                for p in params:
                    p.grad = None

    # ---------------------------------------------------------------- resuming
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["t_vaccine"] = {"probs": self.probs, "sampled": self.sampled}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("t_vaccine") or {}
        self.probs, self.sampled = state.get("probs"), state.get("sampled")
