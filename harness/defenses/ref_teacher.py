"""Ref-Teacher (Ham et al. 2025): a refusal-feature teacher that filters and distills.

Teacher (align stage): SFT on the alignment data from the base model, plus a cosine regulariser
that pulls the last prompt token's hidden state at layer l towards the refusal feature R_l on
harmful prompts and away from it on harmless ones. R_l is recomputed from the current weights on
a held set every K steps and is a constant in between. The stage's artifact keeps the teacher's
weights and its final R_l.

Student (finetune stage): a fresh LoRA on the *base* model, trained on the user data the teacher's
filter kept (the pipeline's ``refusal_feature`` filter) plus KL distillation from the frozen
teacher on the response tokens of alignment batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from harness.analysis.refusal import (cosine, cosine_regularizer, gather_rows,
                                      last_prompt_index, measure_refusal_direction, num_layers,
                                      resolve_layer, save_refusal_feature)
from harness.defenses.base import StageModule
from harness.defenses.math import distillation_kl

class RefTeacher(StageModule):
    stages = ("align",)
    needs_refusal_feature = True  # the pipeline checks the safety data holds both kinds

    @dataclass
    class Params:
        layer: Union[int, float] = 0.5  # an index (negative from the top) or a fraction of depth
        lambda_cos: float = 1.0
        refresh_every: int = 20  # K; 0 computes R_l once from the starting weights (static)
        feature_batch_size: int = 64

        def __post_init__(self) -> None:
            if self.lambda_cos < 0:
                raise ValueError(f"lambda_cos must be >= 0, got {self.lambda_cos}")
            if self.refresh_every < 0:
                raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
            if isinstance(self.layer, float) and not self.layer.is_integer() \
                    and not 0 < self.layer <= 1:
                raise ValueError(f"layer: a fraction must lie in (0, 1], got {self.layer}")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        held = self.context.extras.get("feature_prompts")
        if held is None or self.context.tokenizer is None:
            raise ValueError("RefTeacher needs held harmful/harmless prompts "
                             "(context.extras['feature_prompts']) and the tokenizer")
        self.held_harmful, self.held_harmless = held
        self.layer = resolve_layer(self.params.layer, num_layers(self.model),
                                   "defense.align.params.layer")
        self.direction: Optional[Tensor] = None
        self.refreshed_at: list[int] = []

    # ---------------------------------------------------------------- the refusal feature
    def refresh(self, step: int) -> None:
        """R_l from the current weights, without gradients: a constant until the next refresh."""
        self.direction = measure_refusal_direction(
            self.model, self.context.tokenizer, self.held_harmful, self.held_harmless, self.layer,
            self.params.feature_batch_size).to(self.device)
        self.refreshed_at.append(step)

    def maybe_refresh(self, step: int) -> None:
        k = self.params.refresh_every
        due = k > 0 and step % k == 0 and (not self.refreshed_at or self.refreshed_at[-1] != step)
        if self.direction is None or due:
            self.refresh(step)

    # ---------------------------------------------------------------- the objective
    def objective(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        self.maybe_refresh(self.global_step)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], output_hidden_states=True)
        feats = gather_rows(out.hidden_states[self.layer], last_prompt_index(batch["labels"]))
        cos = cosine(feats.float(), self.direction)
        counts = None
        if self.world_size > 1:  # class means over the global batch, not this rank's rows
            harmful_rows = batch["harmful"].bool()
            local = torch.stack([harmful_rows.sum(), (~harmful_rows).sum()])
            counts = tuple(self.all_gather(local).reshape(-1, 2).sum(0))
        reg = cosine_regularizer(cos, batch["harmful"], counts, self.world_size)
        ce = self.global_token_mean(out.loss, batch["labels"])
        terms: dict[str, Any] = {"loss": ce + self.params.lambda_cos * reg, "ce": ce,
                                 "cos_regularizer": reg}
        harmful = batch["harmful"].bool()
        if harmful.any():
            terms["cos_harmful"] = cos[harmful].mean()
        if (~harmful).any():
            terms["cos_harmless"] = cos[~harmful].mean()
        return terms

    # ---------------------------------------------------------------- artifact and resuming
    def export(self, directory: Path) -> None:
        """The final R_l: from the final weights, unless the feature is static."""
        if self.params.refresh_every > 0 or self.direction is None:
            self.refresh(self.global_step)
        save_refusal_feature(directory, self.layer, self.direction,
                             refreshed_at=self.refreshed_at)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.direction is not None:
            checkpoint["ref_teacher"] = {"direction": self.direction.cpu(),
                                         "refreshed_at": list(self.refreshed_at)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ref_teacher")
        if state is not None:
            self.direction = state["direction"]
            self.refreshed_at = list(state["refreshed_at"])

    def on_fit_start(self) -> None:
        if self.direction is not None:
            self.direction = self.direction.to(self.device)


class RefStudent(StageModule):
    stages = ("finetune",)
    starts_from = "base"  # the student learns the task from base; alignment comes by distillation

    @dataclass
    class Params:
        lambda_kd: float = 1.0
        temperature: float = 2.0
        align_ce_weight: float = 0.0  # optional CE on the alignment batch

        def __post_init__(self) -> None:
            for name in ("lambda_kd", "align_ce_weight"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def __init__(self, *args: Any, teacher: Optional[torch.nn.Module] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.uses_alignment = self.params.lambda_kd > 0 or self.params.align_ce_weight > 0
        self._teacher: list[torch.nn.Module] = []  # a list keeps it out of state_dict and DDP
        if self.uses_alignment:
            self.require_alignment_data()
        if self.params.lambda_kd > 0:
            if teacher is None:
                if self.context.load_model is None:
                    raise ValueError("RefStudent needs the teacher: context.load_model('align')")
                teacher = self.context.load_model("align")
            teacher.requires_grad_(False).eval()  # frozen: no gradients, no optimizer state
            self._teacher.append(teacher)

    @property
    def teacher(self) -> Optional[torch.nn.Module]:
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def objective(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        ce = self.lm_loss(batch)
        terms: dict[str, Any] = {"ce": ce}
        loss = ce
        if self.uses_alignment:
            aligned = self.alignment_batch(self.global_step)
            student = self.model(input_ids=aligned["input_ids"],
                                 attention_mask=aligned["attention_mask"],
                                 labels=aligned["labels"] if self.params.align_ce_weight else None)
            if self.params.align_ce_weight > 0:
                align_ce = self.global_token_mean(student.loss, aligned["labels"])
                terms["align_ce"] = align_ce
                loss = loss + self.params.align_ce_weight * align_ce
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(input_ids=aligned["input_ids"],
                                                  attention_mask=aligned["attention_mask"]).logits
                kd = self.global_token_mean(distillation_kl(  # a mean over response tokens
                    student.logits, teacher_logits, aligned["labels"], self.params.temperature),
                    aligned["labels"])
                terms["kd"] = kd
                loss = loss + self.params.lambda_kd * kd
        terms["loss"] = loss
        return terms
