"""Training one stage: the Lightning Trainer every fit uses (``build_trainer``, also the
bench's), the context a stage module reads, and a stage's build (model in, artifact out)."""
from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from harness.analysis.gradients import GradientConflict
from harness.checkpoints import AtomicCheckpointIO, RngState, resumable_checkpoint
from harness.config.schema import StageMethodConfig, TrainerConfig, TrainStageConfig
from harness.data.assemble import RunInputs
from harness.data.collate import PadCollator, StageData, TokenizedDataset
from harness.data.schema import Example
from harness.defenses.base import StageContext, StageModule
from harness.distributed import full_state_dict
from harness.keys import SFT_MODULE
from harness.interrupts import RequeueAtStepEnd  # SLURM: a requeue stops at a step end
from harness.artifacts import artifact_key, write_json_atomic
from harness.models import loading
from harness.models.store import ModelStore
from harness.stages import ModelRef, StageRecorder, method_class

log = logging.getLogger("harness")

STAGE_SEED_OFFSET = {"base": 0, "align": 1, "finetune": 2}


def stage_steps(train_cfg: TrainStageConfig, n_rows: int, min_steps: Optional[int] = None) -> int:
    """A stage's optimizer steps: max_steps, else epochs over the rows; at least min_steps."""
    steps = train_cfg.max_steps or math.ceil(
        train_cfg.epochs * math.ceil(n_rows / train_cfg.batch_size))
    return max(steps, min_steps or 0)


class ProgressLog(Callback):
    """With the progress bar off (sweeps, SLURM logs), a log line at most every ``every_s``
    seconds and at the last step: step / total, loss, s/step, time left. A stage of a real
    model runs for tens of minutes; a silent log cannot tell slow from stuck."""

    def __init__(self, label: str, every_s: float = 60.0, clock=time.monotonic):
        self.label, self.every_s, self.clock = label, every_s, clock
        self.t0 = self.last = None
        self.first_step = 0

    def on_train_start(self, trainer, module) -> None:
        self.t0 = self.last = self.clock()
        self.first_step = trainer.global_step  # a resume counts its own pace

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now, step, total = self.clock(), trainer.global_step, trainer.max_steps
        if step == self.first_step or (now - self.last < self.every_s and step < total):
            return
        self.last = now
        pace = (now - self.t0) / (step - self.first_step)
        loss = trainer.callback_metrics.get("train/loss")
        if trainer.is_global_zero:
            log.info("[%s] step %d/%d, loss %s, %.2f s/step, about %.0f s left", self.label, step,
                     total, "-" if loss is None else f"{float(loss):.4f}", pace,
                     pace * (total - step))


def build_trainer(trainer_cfg: TrainerConfig, train_cfg: TrainStageConfig, module: StageModule,
                  work: Path, logger: Any = False, callbacks: tuple = ()) -> L.Trainer:
    """The one Trainer of every fit: checkpoints (written atomically) every
    ``train_cfg.checkpoint_every_n_steps`` under ``work/checkpoints``, the random states saved
    with them (RngState), a SLURM requeue stopping at a step end (RequeueAtStepEnd), and no
    distributed sampler (StageData splits each global batch)."""
    checkpoint = ModelCheckpoint(dirpath=Path(work) / "checkpoints", save_last=True,
                                 save_top_k=0,
                                 every_n_train_steps=train_cfg.checkpoint_every_n_steps)
    trainer_args = asdict(trainer_cfg)
    if trainer_cfg.strategy == "fsdp":  # layer-wise units, LoRA-safe (distributed.fsdp_strategy)
        from harness.distributed import fsdp_strategy

        trainer_args["strategy"] = fsdp_strategy(module.model)
    progress = () if trainer_cfg.enable_progress_bar else (ProgressLog(type(module).__name__),)
    return L.Trainer(
        **trainer_args, max_steps=module.total_steps, max_epochs=-1, logger=logger,
        callbacks=[checkpoint, RngState(), RequeueAtStepEnd(), *progress, *callbacks],
        enable_model_summary=False,
        default_root_dir=str(work), plugins=[AtomicCheckpointIO()],
        gradient_clip_val=train_cfg.grad_clip if module.automatic_optimization else None,
        num_sanity_val_steps=0, use_distributed_sampler=False)


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN runs bf16 matmuls natively here (AVX512-BF16 or AMX); on an AVX2 CPU it
    does not, and bf16 autocast costs more than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: go by the vector unit
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")


def warn_slow_precision(trainer_cfg: TrainerConfig) -> Optional[str]:
    """A start-up warning (returned, and logged) when a CPU run asks for bf16 the CPU lacks."""
    if trainer_cfg.accelerator != "cpu" or not str(trainer_cfg.precision).startswith("bf16") \
            or cpu_has_bf16_kernels():
        return None
    msg = (f"trainer.precision={trainer_cfg.precision} on a CPU without bf16 kernels (torch "
           f"reports {torch.backends.cpu.get_cpu_capability()}): every training step emulates "
           "bf16 and runs many times slower than fp32 (a bf16 matmul's forward and backward 17x "
           "slower on an AVX2 EPYC; SmolLM2's 120-step alignment took over 45 min there). Set trainer.precision=32-true for speed; precision is in the stage keys, "
           "so its artifacts are built anew and its numbers are not the bf16 run's")
    log.warning(msg)
    return msg


class StageTrainer:
    """Builds the training stages of one run (base on the toy world, align, finetune)."""

    def __init__(self, run, inputs: RunInputs, models: ModelStore, record: StageRecorder,
                 tracker=None):
        self.run = run
        self.inputs = inputs
        self.models = models
        self.record = record
        self.tracker = tracker
        self.refs: dict[str, ModelRef] = {}  # the stages built so far, for the context
        self.analysis: dict[str, Any] = {}  # per-stage training analyses, for results.json
        warn_slow_precision(run.trainer)

    def fit(self, module: StageModule, dataset, train_cfg: TrainStageConfig, stage: str,
            work: Path, callbacks: tuple = ()) -> tuple[L.Trainer, dict[str, Any]]:
        seed = self.run.seed * 1000 + STAGE_SEED_OFFSET[stage]
        # train.<stage>.batch_size is the global batch: k processes split each step's rows
        data = StageData(dataset, train_cfg.batch_size, seed,
                         PadCollator(self.models.tokenizer.pad_token_id),
                         f"train.{stage}.batch_size")
        logger = self.tracker.stage_logger(stage) if self.tracker else False
        # a resume restores the data position (StageData) and the random states (RngState),
        # so it trains on what the uninterrupted run would have
        trainer = build_trainer(self.run.trainer, train_cfg, module, work, logger, callbacks)
        # a damaged checkpoint is set aside (rank 0) for an older one or a fresh start
        last = resumable_checkpoint(work / "checkpoints", stage,
                                    set_aside=self.models.store.rank == 0)
        if last is not None:
            log.info("[%s] resuming from %s", stage, last)
        with warnings.catch_warnings():  # Lightning checks the loader; StageData holds the state
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before")
            trainer.fit(module, datamodule=data,
                        ckpt_path=str(last) if last is not None else None)
        loss = trainer.callback_metrics.get("train/loss")
        return trainer, {"steps": trainer.global_step,
                         "final_train_loss": float(loss) if loss is not None else None}

    def context(self) -> StageContext:
        r, tok, data = self.run, self.models.tokenizer, self.inputs.data
        align_ds = TokenizedDataset(data.alignment, tok, r.template, r.train.align.max_length,
                                    max_length_key="train.align.max_length",
                                    truncation=r.train.align.truncation)
        refs = {"base": self.refs.get("base"), "align": self.refs.get("align")}
        harmful, harmless = self.inputs.feature_sets()
        extras = {"feature_prompts": (self.inputs.render(harmful), self.inputs.render(harmless))}
        if data.alignment_harmful:
            extras["harmful_data"] = TokenizedDataset(
                data.alignment_harmful, tok, r.template, r.train.align.max_length,
                max_length_key="train.align.max_length", truncation=r.train.align.truncation)
        adapter = self.models.align_adapter(refs["align"], refs["base"])
        if adapter is not None:  # AsFT: V is exactly this LoRA's B A
            extras["align_adapter"] = adapter
        return StageContext(tokenizer=tok, collate=PadCollator(tok.pad_token_id),
                            alignment_data=align_ds,
                            load_model=lambda name: self.models.load(refs[name]),
                            extras=extras)

    def train(self, stage: str, payload: dict, input_ref: Optional[ModelRef],
              method: StageMethodConfig, train_cfg: TrainStageConfig,
              examples: list[Example]) -> ModelRef:
        key = artifact_key(payload)
        cls = method_class(method.module)
        if method.lr_scale != 1.0:
            train_cfg = replace(train_cfg, lr=train_cfg.lr * method.lr_scale)
        run, tok, store = self.run, self.models.tokenizer, self.models.store

        def build(tmp: Path, work: Path) -> dict:
            L.seed_everything(run.seed * 1000 + STAGE_SEED_OFFSET[stage], verbose=False)
            if input_ref is None:
                model = loading.build_tiny(run.model, tok, run.seed)
            else:
                model = self.models.load(input_ref)
            model.train()  # from_pretrained returns eval mode, which Lightning keeps
            if run.model.gradient_checkpointing:
                model.activation_checkpointing_enable()  # transformers 5 name
                model.config.use_cache = False
                if train_cfg.lora is not None:  # frozen embeddings: checkpointed inputs need grad
                    model.enable_input_require_grads()
            if train_cfg.lora is not None:
                model = loading.apply_lora(model, train_cfg.lora, run.model)
            dataset = TokenizedDataset(examples, tok, run.template, train_cfg.max_length,
                                       train_cfg.loss_on, f"train.{stage}.max_length",
                                       train_cfg.truncation)
            steps = stage_steps(train_cfg, len(dataset), method.min_steps)
            if steps != stage_steps(train_cfg, len(dataset)):
                log.info("[%s] %s trains %d steps (defense.%s.min_steps); its data alone gives "
                         "%d", stage, cls.__name__, steps, stage,
                         stage_steps(train_cfg, len(dataset)))
            module = cls(model=model, train_cfg=train_cfg, total_steps=steps,
                         params=cls.Params(**method.params), context=self.context())
            log.info("[%s] training %s: %d examples, %d steps", stage, cls.__name__,
                     len(dataset), steps)
            callbacks = ((GradientConflict(method.gradient_conflict_every),)
                         if method.gradient_conflict_every else ())
            trainer, stats = self.fit(module, dataset, train_cfg, stage, work, callbacks)
            state = full_state_dict(trainer)  # collective under FSDP: every rank calls it
            if store.rank != 0:  # rank 0 alone writes the artifact
                return {}
            module.export(tmp)
            if callbacks:
                write_json_atomic(tmp / "gradient_conflict.json", callbacks[0].history)
            if train_cfg.lora is not None:
                module.model.save_pretrained(tmp / "adapter", state_dict=state)
                return {"format": "adapter", "parent": asdict(input_ref), **stats}
            module.model.save_pretrained(tmp / "model", state_dict=state)
            return {"format": "full", **stats}

        ref = self.record(stage, key, payload, build, collective=True)
        history = store.path(stage, key) / "gradient_conflict.json"
        if history.is_file():
            self.analysis[f"gradient_conflict_{stage}"] = json.loads(history.read_text())
        return ref
