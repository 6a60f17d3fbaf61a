"""Gradient conflict: how the user-data gradient points against the alignment-data gradient.

Every N steps, before the optimizer step, a callback takes the gradient of the LM loss on the
current user batch (as the mean of equal chunks) and on an alignment batch, and logs their cosine
and the user gradient's signal-to-noise ratio ``||mean g||^2 / mean ||g_i - mean g||^2`` over the
chunks. It uses ``torch.autograd.grad``, so the training step's own ``.grad`` is untouched, and a
forked random state, so switching it on leaves the trained weights as they were.
"""
from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

ALIGNMENT_SALT = 7919  # draws differ from a method's own alignment batches at the same step


def flat_grad(loss: Tensor, params: list[torch.nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params)])


def gradient_stats(user_grads: list[Tensor], align_grad: Tensor) -> dict[str, float]:
    stacked = torch.stack(user_grads)
    mean = stacked.mean(0)
    noise = (stacked - mean).pow(2).sum(1).mean()
    cos = torch.nn.functional.cosine_similarity(mean, align_grad, dim=0)
    return {"grad_cosine_user_alignment": float(cos),
            "grad_snr": float(mean.pow(2).sum() / noise.clamp_min(1e-20))}


def split_batch(batch: dict[str, Tensor], chunks: int) -> list[dict[str, Tensor]]:
    n = batch["input_ids"].shape[0]
    chunks = max(1, min(chunks, n))
    size = n // chunks
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(chunks)]


class GradientConflict(L.Callback):
    def __init__(self, every_n_steps: int, chunks: int = 4):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.chunks = chunks
        self.history: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or pl_module.context.alignment_data is None:
            return
        params = pl_module.trainable_parameters()
        # the extra forward passes draw dropout masks: on a forked generator, so the run trains
        # on the draws it would have made with the analysis off, and ends on the same weights
        device = pl_module.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.enable_grad():
            user = [flat_grad(pl_module.lm_loss(c), params) for c in split_batch(batch, self.chunks)]
            align = flat_grad(pl_module.lm_loss(pl_module.alignment_batch(step, ALIGNMENT_SALT)),
                              params)
        stats = gradient_stats(user, align)
        self.history.append({"step": step, **stats})
        pl_module.log_dict({f"analysis/{k}": v for k, v in stats.items()}, batch_size=1)

    # the history is part of the stage's artifact: a resumed fit must keep what came before
    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
