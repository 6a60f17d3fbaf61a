"""The shared LightningModule every stage method subclasses.

The base owns what all methods share: the LM loss on masked batches, AdamW with a warm-up
schedule, logging, and checkpoints that hold only trainable weights (a LoRA stage on a 7B model
would otherwise write the frozen base into every checkpoint). A method overrides ``objective``
and declares its knobs in a nested ``Params`` dataclass whose defaults are the paper's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch
from transformers import get_scheduler

from harness.data.collate import IGNORE_INDEX


@dataclass
class StageContext:
    """What a stage may need beyond its own batches; methods take only what they use."""

    tokenizer: Any = None
    collate: Optional[Callable] = None
    alignment_data: Any = None  # a TokenizedDataset of the provider's safety data
    load_model: Optional[Callable[[str], torch.nn.Module]] = None  # "base" | "align" -> model
    extras: dict[str, Any] = field(default_factory=dict)


class StageModule(L.LightningModule):
    stages: tuple[str, ...] = ("align", "finetune")
    # what the method needs of the run, checked at start-up (config.validate), not mid-fit
    needs_align_stage: bool = False  # reads the aligned model's weights against the base's
    needs_lora: bool = False  # acts on a LoRA update
    # trains against harmful (prompt, harmful answer) pairs at alignment time: alignment.harmful
    needs_harmful_data: bool = False
    # reads the refusal feature of the safety data: the data checks it holds both kinds
    needs_refusal_feature: bool = False
    # "base": a finetune method that trains on the base model (alignment comes another way)
    starts_from: str = "align"
    # batch-level terms not reduced across processes: one training process only
    single_process_only: bool = False
    # adds the alignment data's refusal rows to the user's before the finetune
    # (``mix_user_data``): the alignment data then enters the finetune's key
    mixes_refusal_rows: bool = False

    @dataclass
    class Params:
        pass

    def __init__(self, model: torch.nn.Module, train_cfg, total_steps: int,
                 params: Optional["StageModule.Params"] = None,
                 context: Optional[StageContext] = None):
        super().__init__()
        self.model = model
        self.train_cfg = train_cfg
        self.total_steps = total_steps
        self.params = params if params is not None else self.Params()
        self.context = context or StageContext()
        self.strict_loading = False  # checkpoints hold trainable weights only
        self.stage_seed = torch.initial_seed()  # the pipeline seeds each stage before building it

    @property
    def world_size(self) -> int:
        """Training processes; 1 outside a fit (unit tests call steps directly)."""
        return self._trainer.world_size if self._trainer is not None else 1

    # ---------------------------------------------------------------- alignment batches
    def require_alignment_data(self) -> None:
        if self.context.alignment_data is None or self.context.collate is None:
            raise ValueError(f"{type(self).__name__} needs the alignment data and a collate in "
                             "its context")

    def alignment_batch(self, step: int, salt: int = 0) -> dict[str, torch.Tensor]:
        """A random alignment batch, a function of (seed, rank, step, salt) alone: a resumed run
        draws what the uninterrupted one would have, and DDP ranks draw different batches."""
        seed = np.random.SeedSequence([self.stage_seed, self.global_rank, step] + ([salt] if salt else []))
        data = self.context.alignment_data
        size = max(1, self.train_cfg.batch_size // self.world_size)  # the batch size is global
        idx = torch.randint(len(data), (size,), generator=torch.Generator()
                            .manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0])))
        batch = self.context.collate([data[int(i)] for i in idx])
        return {k: v.to(self.device) for k, v in batch.items()}

    def global_random_batch(self, data, step: int, salt: int,
                            global_size: int) -> dict[str, torch.Tensor]:
        """This rank's share of a random global batch of ``global_size`` rows, a function of
        (seed, step, salt) alone: every rank draws the same rows and takes rows rank, rank +
        world, ..., so k processes see the one-process batch, split (as StageData does)."""
        seed = np.random.SeedSequence([self.stage_seed, step, salt])
        idx = torch.randint(len(data), (global_size,), generator=torch.Generator()
                            .manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0])))
        mine = idx[self.global_rank::self.world_size] if self.world_size > 1 else idx
        batch = self.context.collate([data[int(i)] for i in mine])
        return {k: v.to(self.device) for k, v in batch.items()}

    def require_harmful_data(self):
        """The provider's harmful (prompt, harmful answer) rows: ``context.extras['harmful_data']``
        (the pipeline tokenises alignment.harmful into it)."""
        data = self.context.extras.get("harmful_data")
        if data is None or len(data) == 0 or self.context.collate is None:
            raise ValueError(f"{type(self).__name__} needs harmful (prompt, harmful answer) rows "
                             "(context.extras['harmful_data'], from alignment.harmful) and a "
                             "collate in its context")
        return data

    def export(self, directory) -> None:
        """Write whatever the method adds to its stage's artifact beside the weights."""

    # ---------------------------------------------------------------- the objective
    def lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"])
        return self.global_token_mean(out.loss, batch["labels"])

    def global_token_mean(self, loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A rank's token-mean LM loss, rescaled so that DDP's gradient average is the mean
        over every rank's tokens, as one process computes it on the whole global batch (a
        plain average weighs a rank with few response tokens like one with many). One process:
        the loss as it is. Every rank calls this as often per step (it all-gathers)."""
        if self.world_size == 1:
            return loss
        n_local = (labels[:, 1:] != IGNORE_INDEX).sum()
        n_global = self.all_gather(n_local).sum().clamp(min=1)
        return loss * (n_local * self.world_size / n_global)

    def objective(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the loss to minimise under "loss", plus anything worth logging."""
        return {"loss": self.lm_loss(batch)}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.objective(batch)
        self.log_terms(terms, batch["input_ids"].shape[0])
        return terms["loss"]

    def log_terms(self, terms: dict[str, Any], batch_size: int) -> None:
        values = {f"train/{k}": (v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}
        self.log_dict(values, prog_bar=False, batch_size=batch_size)
        self.log("loss", values["train/loss"], prog_bar=True, logger=False, batch_size=batch_size)

    # ---------------------------------------------------------------- optimisation
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        cfg = self.train_cfg
        decay = [p for p in self.trainable_parameters() if p.ndim >= 2]
        no_decay = [p for p in self.trainable_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        scheduler = get_scheduler(cfg.scheduler, optimizer,
                                  num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
                                  num_training_steps=self.total_steps)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trainable}
