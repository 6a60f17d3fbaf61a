"""``make bench``: what the harness and each defense cost, measured side by side in one process.

    python -m harness.bench [--repeats 5] [--steps 16] [--sizes tiny larger] [--out bench]

Rows (each a ratio, so the noise of a shared machine mostly cancels):
  1. harness overhead: the pipeline's SFT step (LightningModule + lightning.Trainer as ``_fit``
     builds it) against a bare PyTorch loop and against ``transformers.Trainer``;
  2. defense step cost: each method's step against the SFT step with the same trainable weights;
  3. evaluation: batched vs one-prompt-at-a-time greedy generation, and the judge's throughput;
  4. sweep reuse: stage runs of a 5-defense x 5-p sweep, from the pipeline's artifact keys;
  5. peak memory of each training stage (peak RSS over the stage, CPU).

A step time is the wall time from the start of step ``warmup`` to the start of step
``warmup + steps``, read by a callback inside each engine, so per-fit set-up is excluded without
differencing two noisy fits. Within a repeat every compared variant runs once, interleaved; the
median over repeats is reported. Torch runs one intra-op thread (``--threads``): on a shared
2-core machine two threads make step times swing several-fold between fits. A missed row 1
target adds a sampled profile of each engine's step; a missed row 2 target adds a torch.profiler
comparison of the method's ops with the SFT step's. Writes ``results.md`` and ``results.json``
under ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import logging
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, SequentialSampler

import harness  # noqa: F401 - offline environment
from harness.artifacts import provenance, write_json_atomic
from harness.config import LoraConfig, ModelConfig, TrainerConfig, TrainStageConfig
from harness.data.collate import PadCollator, TokenizedDataset
from harness.data.harmful import toy_alignment_harmful
from harness.data.mixing import build_user_data
from harness.data.templates import TemplateConfig
from harness.data.tokenizer import train_toy_tokenizer
from harness.data.toy import ToyWorld, ToyWorldConfig
from harness.defenses.base import StageContext
from harness.defenses.sft import SFT
from harness.evaluation.generate import generate
from harness.models.loading import apply_lora, build_tiny

for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
              "transformers.trainer", "transformers.training_args", "accelerate"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*pin_memory.*")

CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass(frozen=True)
class Size:
    label: str
    overrides: dict
    batch_size: int  # the larger model runs smaller batches so a repeat stays within budget
    max_length: int


SIZES = {
    "tiny": Size("tiny (h128, 4 layers)",
                 {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 4,
                  "tie_word_embeddings": True}, batch_size=16, max_length=96),
    "larger": Size("larger (h512, 8 layers)",
                   {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
                    "num_attention_heads": 8, "num_key_value_heads": 8,
                    "tie_word_embeddings": True}, batch_size=4, max_length=64),
}


@dataclass(frozen=True)
class MethodRow:
    """One row of the defense step-cost table: a stage method against the SFT step that trains
    the same weights (full weights on alignment data for align methods, LoRA on user data for
    finetune methods)."""

    name: str
    module: str  # dotted path of the StageModule subclass
    lora: bool
    target: Optional[float]  # max ratio to the SFT step, from the issue; None: report only
    params: dict = field(default_factory=dict)
    cycle: int = 1  # the timed window is rounded up to a multiple of this (Lisa's K1 + K2)


# ---- Defense step-cost rows. Add a method by appending a MethodRow; nothing else changes. ----
METHOD_ROWS: list[MethodRow] = [
    MethodRow("vaccine", "harness.defenses.vaccine.Vaccine", lora=False, target=2.2,
              params={"rho": 2.0}),
    # conf/defense/lisa.yaml's 1:9 alignment:user ratio, over a 10-step cycle
    MethodRow("lisa", "harness.defenses.lisa.Lisa", lora=True, target=1.1,
              params={"align_steps": 1, "finetune_steps": 9, "rho": 1.0}, cycle=10),
    MethodRow("asft", "harness.defenses.asft.AsFT", lora=True, target=1.2,
              params={"lam": 1.0}),
    # the teacher: SFT plus hidden states for the regulariser, R_l refreshed every K=20 steps
    MethodRow("ref_teacher", "harness.defenses.ref_teacher.RefTeacher", lora=False,
              target=None, params={"layer": 0.5, "lambda_cos": 1.0, "refresh_every": 20},
              cycle=20),
    # three passes a step (harmful at w and at w', alignment at w); the issue asks the ratio
    MethodRow("booster", "harness.defenses.booster.Booster", lora=False, target=None,
              params={"lam": 5.0, "alpha": 0.1, "harmful_batch_size": 10}),
    # two forwards (refusal; harmful with hidden states, L + 1 logit-lens heads) and a backward
    MethodRow("repnoise", "harness.defenses.repnoise.RepNoise", lora=False, target=None,
              params={"alpha": 1.0, "beta": 0.001}),
    # Vaccine's two passes on 1 of the 4 layers, a batch-1 probe every K; compare with vaccine
    MethodRow("t_vaccine", "harness.defenses.t_vaccine.TVaccine", lora=False, target=None,
              params={"rho": 3.0, "sampled_layers": 1, "resample_every": 20,
                      "probe_every": 200}),
    # the student: user CE + a student forward/backward and a teacher forward on an
    # alignment batch of the same size
    MethodRow("ref_student", "harness.defenses.ref_teacher.RefStudent", lora=True,
              target=2.6, params={"lambda_kd": 1.0, "temperature": 1.0}),
]

# What the profile of a missed row means, per method; shown under the table with the profile.
METHOD_NOTES = {
    "asft": ["  AsFT's penalty (and its logged along-fraction) runs every step over every "
             "adapted layer: `V^T B`, `V (V^T B)`, `Q^T B` and their backward are skinny "
             "matmuls (d_out x d_in x r) that read a whole weight-sized constant, so the extra "
             "`aten::mm` time scales with the weights, not the batch. At the larger model's "
             "CPU batch of 4 rows the LoRA step itself is cheap, so it is a large share; at "
             "the protocol's batch 32, and on a GPU, it shrinks. Closing it without changing "
             "the method: compute the logged along-fraction (`Q^T B`) only every "
             "`log_every_n_steps`; the penalty itself is this cost as specified, so beyond "
             "that only a larger batch (or a GPU) amortises it."],
}

# Row 4: the toy sweep whose stage runs are counted.
SWEEP_DEFENSES = ["sft", "none", "vaccine", "lisa", "asft"]
SWEEP_PS = [0.0, 0.05, 0.1, 0.2, 0.3]
TARGETS = {"bare": 1.15, "hf": 1.0, "generation": 10.0, "sweep": 0.40}


# ==================================================================== set-up
@dataclass
class Setup:
    tokenizer: Any
    template: TemplateConfig
    world: ToyWorld
    prompts: list[str]


def make_setup() -> Setup:
    world = ToyWorld(ToyWorldConfig(seed=0, base_size=2000, align_size=600))
    template = TemplateConfig()
    tok = train_toy_tokenizer(["".join(template.render(e)) for e in world.corpus_examples()],
                              1024)
    prompts = [template.render_prompt(e) for e in world.eval_harmful()[:32]]
    return Setup(tok, template, world, prompts)


@dataclass
class Bed:
    """One model size: the models, data and context every training variant shares."""

    size: Size
    model_cfg: ModelConfig
    base: torch.nn.Module
    aligned: torch.nn.Module
    user: TokenizedDataset
    alignment: TokenizedDataset
    context: StageContext
    collate: PadCollator

    def stage_cfg(self, lora: bool) -> TrainStageConfig:
        return TrainStageConfig(lr=1e-4, batch_size=self.size.batch_size,
                                max_length=self.size.max_length,
                                lora=LoraConfig(r=8, alpha=16) if lora else None)

    def data(self, lora: bool) -> TokenizedDataset:
        return self.user if lora else self.alignment

    def loader(self, lora: bool) -> DataLoader:
        # No shuffling: every engine sees the same batches in the same order.
        return DataLoader(self.data(lora), batch_size=self.size.batch_size, shuffle=False,
                          collate_fn=self.collate)

    def model(self, lora: bool) -> torch.nn.Module:
        model = copy.deepcopy(self.aligned)
        model.train()
        return apply_lora(model, self.stage_cfg(lora).lora, self.model_cfg) if lora else model


def make_bed(setup: Setup, size: Size, steps_needed: int) -> Bed:
    model_cfg = ModelConfig(config_overrides=size.overrides)
    base = build_tiny(model_cfg, setup.tokenizer, seed=0)
    aligned = copy.deepcopy(base)
    with torch.no_grad():  # an "aligned" model that differs from base, for AsFT's V
        for p in aligned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    n = steps_needed * size.batch_size  # enough rows that no fit wraps an epoch
    world, tok, template = setup.world, setup.tokenizer, setup.template
    user = build_user_data(world.task("sentiment", "train"), world.attack_pool(), 0.1, n,
                           "replace", seed=0)
    alignment = (world.alignment_data() * math.ceil(n / len(world.alignment_data())))[:n]
    collate = PadCollator(tok.pad_token_id)
    align_ds = TokenizedDataset(alignment, tok, template, size.max_length)
    harmful, harmless = world.feature_prompts()
    context = StageContext(
        tokenizer=tok, collate=collate, alignment_data=align_ds,
        load_model=lambda name: copy.deepcopy(base if name == "base" else aligned),
        extras={"feature_prompts": ([template.render_prompt(e) for e in harmful],
                                    [template.render_prompt(e) for e in harmless]),
                "harmful_data": TokenizedDataset(toy_alignment_harmful(world), tok, template,
                                                 size.max_length)})
    return Bed(size, model_cfg, base, aligned, TokenizedDataset(user, tok, template,
                                                                size.max_length),
               align_ds, context, collate)


# ==================================================================== step clocks
class Clock:
    """Wall time at the start of every step; ``per_step`` spans steps [warmup, warmup+steps)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.ticks = warmup, steps, []

    @property
    def total(self) -> int:  # one extra step: its start closes the window
        return self.warmup + self.steps + 1

    def tick(self) -> None:
        self.ticks.append(time.perf_counter())

    def per_step(self) -> float:
        if len(self.ticks) < self.total:
            raise RuntimeError(f"only {len(self.ticks)} of {self.total} steps ran")
        return (self.ticks[self.warmup + self.steps] - self.ticks[self.warmup]) / self.steps


class _LightningClock(L.Callback):
    def __init__(self, clock: Clock):
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.tick()


def lightning_fit(module: L.LightningModule, loader: DataLoader, train_cfg: TrainStageConfig,
                  callbacks: list) -> None:
    """A fit with the Trainer that ``Pipeline._fit`` builds (default trainer group, a checkpoint
    callback), minus the W&B/CSV logger and the progress bar, as sweeps run it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        checkpoint = ModelCheckpoint(dirpath=Path(work) / "checkpoints", save_last=True,
                                     save_top_k=0,
                                     every_n_train_steps=train_cfg.checkpoint_every_n_steps)
        trainer = L.Trainer(
            **(asdict(TrainerConfig()) | {"enable_progress_bar": False}),
            max_steps=module.total_steps, max_epochs=-1, logger=False,
            callbacks=[checkpoint, *callbacks], enable_model_summary=False,
            default_root_dir=work,
            gradient_clip_val=train_cfg.grad_clip if module.automatic_optimization else None,
            num_sanity_val_steps=0)
        trainer.fit(module, loader)


def method_module(bed: Bed, module: str, lora: bool, params: dict, total: int):
    from hydra.utils import get_class

    cls = get_class(module)
    return cls(model=bed.model(lora), train_cfg=bed.stage_cfg(lora), total_steps=total,
               params=cls.Params(**params), context=bed.context)


def time_lightning(bed: Bed, module: str, lora: bool, params: dict, warmup: int,
                   steps: int, clock: Optional[Clock] = None) -> float:
    clock = clock or Clock(warmup, steps)
    stage = method_module(bed, module, lora, params, clock.total)
    lightning_fit(stage, bed.loader(lora), bed.stage_cfg(lora), [_LightningClock(clock)])
    return clock.per_step()


def _optimizer(model: torch.nn.Module, train_cfg: TrainStageConfig, total: int):
    """The harness's own AdamW + schedule (StageModule.configure_optimizers), for the other
    engines: the same optimizer, parameter groups and schedule by construction."""
    conf = SFT(model=model, train_cfg=train_cfg, total_steps=total).configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def _lm_batch(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def time_bare(bed: Bed, warmup: int, steps: int, clock: Optional[Clock] = None) -> float:
    """The loop a researcher writes by hand: forward, backward, clip, AdamW, schedule."""
    clock = clock or Clock(warmup, steps)
    model, cfg = bed.model(False), bed.stage_cfg(False)
    opt, sched = _optimizer(model, cfg, clock.total)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(bed.loader(False))
    for _ in range(clock.total):
        clock.tick()
        batch = next(batches)
        loss = model(**_lm_batch(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return clock.per_step()


def time_hf(bed: Bed, warmup: int, steps: int, clock: Optional[Clock] = None) -> float:
    """``transformers.Trainer`` on the same model, batches (in order), optimizer and clip."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    class Sequential(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class Tick(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.tick()

    clock = clock or Clock(warmup, steps)
    model, cfg = bed.model(False), bed.stage_cfg(False)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=clock.total,
            max_grad_norm=cfg.grad_clip, logging_steps=TrainerConfig().log_every_n_steps,
            save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
            dataloader_num_workers=0, dataloader_pin_memory=False,
            remove_unused_columns=False, seed=0)
        trainer = Sequential(model=model, args=args, train_dataset=bed.data(False),
                             data_collator=lambda rows: _lm_batch(bed.collate(rows)),
                             optimizers=_optimizer(model, cfg, clock.total), callbacks=[Tick()])
        trainer.remove_callback(PrinterCallback)  # it prints the final train-summary dict
        trainer.train()
    return clock.per_step()


# ==================================================================== where the time goes
_ENGINE_PATHS = ("/lightning/", "/lightning_utilities/", "/lightning_fabric/", "/torchmetrics/",
                 "/transformers/trainer", "/accelerate/", "harness/bench.py",
                 "harness/defenses/base.py")
_STDLIB = str(Path(json.__file__).parent.parent)  # .../lib/python3.X: skipped when classifying


def _classify(frame) -> str:
    """What the main thread is doing, from its Python stack: a kernel shows as the Python
    frame that called it, so time in torch counts as compute, time in engine code as engine."""
    stack = []
    while frame is not None:
        stack.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    names = [name for _, name in stack]
    files = [f for f, _ in stack]
    if "_engine_run_backward" in names or any("torch/autograd" in f for f in files):
        return "backward"
    if any("clip_grad" in n or n == "clip_gradients" for n in names):
        return "grad clip"
    if any("/torch/optim/" in f for f in files) and not any(
            "/transformers/models/" in f for f in files):
        inner = next(f for f in files if not f.startswith(_STDLIB))
        return "optimizer" if "/torch/" in inner else "engine (Python)"
    if any("/transformers/models/" in f for f in files):
        return "forward"
    if any("collate" in f or "/torch/utils/data/" in f for f in files):
        return "data"
    inner = next((f for f in files if not f.startswith(_STDLIB) or "site-packages" in f), "")
    if any(p in inner for p in _ENGINE_PATHS):
        return "engine (Python)"
    return "other"


class StackSampler:
    """A sampling profiler in a thread: every ``interval`` s, while the clock is inside its
    timed window, it classifies the main thread's stack. No dependency, low overhead (the
    sampler holds the GIL for microseconds; torch kernels release it)."""

    def __init__(self, clock: Clock, interval: float = 0.002):
        import threading

        self.clock, self.interval, self.counts = clock, interval, {}
        self.main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import sys

        lo, hi = self.clock.warmup + 1, self.clock.warmup + self.clock.steps
        while not self._stop.wait(self.interval):
            if lo <= len(self.clock.ticks) <= hi:
                frame = sys._current_frames().get(self.main)
                if frame is not None:
                    kind = _classify(frame)
                    self.counts[kind] = self.counts.get(kind, 0) + 1

    def __enter__(self) -> "StackSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def shares(self) -> dict[str, float]:
        total = sum(self.counts.values()) or 1
        return {k: v / total for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1])}


def engine_profiles(bed: Bed, warmup: int, steps: int) -> dict[str, dict]:
    """The step of each row-1 engine, sampled: the share of wall time in forward, backward,
    optimizer, clip, data and in the engine's own Python code."""
    runs = {"harness": lambda c: time_lightning(bed, "harness.defenses.sft.SFT", False, {},
                                                warmup, steps, clock=c),
            "bare": lambda c: time_bare(bed, warmup, steps, clock=c),
            "hf": lambda c: time_hf(bed, warmup, steps, clock=c)}
    out = {}
    for name, run in runs.items():
        clock = Clock(warmup, steps)
        with StackSampler(clock) as sampler:
            ms = 1000 * run(clock)
        out[name] = {"ms_per_step": ms, "shares": sampler.shares(),
                     "samples": sum(sampler.counts.values())}
    return out


def op_profile(bed: Bed, m: MethodRow, steps: int = 3) -> list[dict]:
    """For a missed step-cost row: torch.profiler over steady-state steps (after one warm-up
    step, so set-up such as AsFT's SVDs is left out) of the method and of its SFT reference;
    the ops whose self CPU time per step grew most (what the method adds)."""
    from torch.profiler import ProfilerActivity, profile

    class Window(L.Callback):
        def __init__(self):
            self.prof, self.seen = profile(activities=[ProfilerActivity.CPU]), 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen += 1
            if self.seen == 2:
                self.prof.start()
            elif self.seen == 2 + steps:
                self.prof.stop()

    def per_op(module: str, lora: bool, params: dict) -> dict[str, tuple[float, int]]:
        window = Window()
        stage = method_module(bed, module, lora, params, steps + 2)
        lightning_fit(stage, bed.loader(lora), bed.stage_cfg(lora), [window])
        return {e.key: (e.self_cpu_time_total / 1000 / steps, e.count)
                for e in window.prof.key_averages()}

    ref = per_op("harness.defenses.sft.SFT", m.lora, {})
    own = per_op(m.module, m.lora, m.params)
    grown = sorted(((k, ms - ref.get(k, (0.0, 0))[0], ms, n) for k, (ms, n) in own.items()),
                   key=lambda x: -x[1])[:6]
    return [{"op": k, "extra_ms_per_step": d, "ms_per_step": ms, "calls": n}
            for k, d, ms, n in grown]


# ==================================================================== memory
_PROC = Path("/proc/self")


def _status_kib(field_name: str) -> int:
    for line in (_PROC / "status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def peak_rss_mib(fn: Callable[[], Any]) -> Optional[float]:
    """Peak RSS while ``fn`` runs, above the RSS before it (MiB). Linux: freed heap is handed
    back first (malloc_trim) and the kernel's high-water mark reset (clear_refs 5), so stages
    measured one after another in one process do not hide in each other's leftovers."""
    try:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        (_PROC / "clear_refs").write_text("5")
        start = _status_kib("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return (_status_kib("VmHWM") - start) / 1024


# ==================================================================== rows 1, 2, 5
def bench_training(bed: Bed, warmup: int, steps: int, repeats: int, overhead_repeats: int,
                   methods: list[MethodRow]) -> tuple[list[dict], dict]:
    sft = "harness.defenses.sft.SFT"
    variants: dict[str, Callable[[], float]] = {
        "harness": lambda: time_lightning(bed, sft, False, {}, warmup, steps),
        "bare": lambda: time_bare(bed, warmup, steps),
        "hf": lambda: time_hf(bed, warmup, steps),
        "sft (LoRA)": lambda: time_lightning(bed, sft, True, {}, warmup, steps),
    }
    for m in methods:
        window = m.cycle * math.ceil(steps / m.cycle)
        variants[m.name] = (lambda m=m, window=window:
                            time_lightning(bed, m.module, m.lora, m.params, warmup, window))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    overhead = ("harness", "bare", "hf")
    for r in range(max(repeats, overhead_repeats)):
        # Interleaved, each round in a rotated order, so no variant always follows the same one.
        names = [n for n in variants if r < repeats or (n in overhead and r < overhead_repeats)]
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(variants[name]())
    sec = {k: statistics.median(v) for k, v in samples.items()}
    label = bed.size.label
    rows = []
    for ref, what in (("bare", "bare PyTorch loop"), ("hf", "HF transformers.Trainer")):
        rows.append(ratio_row(1, "harness overhead", label,
                              f"harness SFT step / {what} step (full weights)",
                              TARGETS[ref], samples["harness"], samples[ref]))
    for m in methods:
        ref = "harness" if not m.lora else "sft (LoRA)"
        rows.append(ratio_row(2, "defense step cost", label,
                              f"{m.name} step / SFT step ({'LoRA' if m.lora else 'full'})",
                              m.target, samples[m.name], samples[ref]))
    return rows, sec


def ratio_row(row: int, group: str, size: str, what: str, target: Optional[float],
              s: list[float], s_ref: list[float]) -> dict:
    """The median of per-repeat ratios: the two runs of a pair ran back to back, under the
    same background load, so their ratio is steadier than a ratio of medians."""
    ratio = statistics.median(a / b for a, b in zip(s, s_ref))
    t, t_ref = statistics.median(s), statistics.median(s_ref)
    return {"row": row, "group": group, "size": size, "what": what, "value": ratio,
            "unit": "x", "target": None if target is None else f"<= {target}",
            "met": None if target is None else ratio <= target,
            "detail": f"{1000 * t:.1f} vs {1000 * t_ref:.1f} ms/step (medians); "
                      f"per-repeat ratios {min(a / b for a, b in zip(s, s_ref)):.2f}"
                      f"-{max(a / b for a, b in zip(s, s_ref)):.2f}",
            "ms": 1000 * t, "ref_ms": 1000 * t_ref,
            "samples_ms": [1000 * x for x in s], "ref_samples_ms": [1000 * x for x in s_ref]}


def bench_memory(bed: Bed, methods: list[MethodRow], steps: int) -> list[dict]:
    """Peak RSS of a short fit of each training stage, model copy and optimizer included."""
    stages = [("SFT (full)", "harness.defenses.sft.SFT", False, {}),
              ("SFT (LoRA)", "harness.defenses.sft.SFT", True, {})]
    stages += [(m.name, m.module, m.lora, m.params) for m in methods]
    rows = []
    for name, module, lora, params in stages:
        def fit(module=module, lora=lora, params=params):
            stage = method_module(bed, module, lora, params, steps)
            lightning_fit(stage, bed.loader(lora), bed.stage_cfg(lora), [])
        mib = peak_rss_mib(fit)
        rows.append({"row": 5, "group": "peak memory", "size": bed.size.label,
                     "what": f"{name} stage, peak RSS above start "
                             f"({'LoRA' if lora else 'full weights'})",
                     "value": mib, "unit": "MiB", "target": None, "met": None,
                     "detail": f"{steps} steps, batch {bed.size.batch_size}"
                     if mib is not None else "no /proc: not measured"})
    return rows


# ==================================================================== row 3
def _answer_tokens(tokenizer, answers: list[list[str]]) -> int:
    return sum(len(tokenizer(a[0], add_special_tokens=False)["input_ids"]) for a in answers)


def bench_generation(setup: Setup, bed: Bed, repeats: int, new_tokens: int) -> list[dict]:
    model, tok, prompts = copy.deepcopy(bed.aligned).eval(), setup.tokenizer, setup.prompts
    batched_fn = lambda: generate(model, tok, prompts, new_tokens, batch_size=32)  # noqa: E731
    single_fn = lambda: [generate(model, tok, [p], new_tokens, batch_size=1)[0]  # noqa: E731
                         for p in prompts]
    prefill_fn = lambda: generate(model, tok, prompts, 1, batch_size=32)  # noqa: E731
    generate(model, tok, prompts[:4], 4, batch_size=4)  # warm-up
    times: dict[str, list[float]] = {"batched": [], "single": [], "prefill": []}
    outs = {}
    for _ in range(repeats):
        for name, fn in (("batched", batched_fn), ("single", single_fn),
                         ("prefill", prefill_fn)):
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    t = {k: statistics.median(v) for k, v in times.items()}
    identical = outs["batched"] == outs["single"]
    tokens = _answer_tokens(tok, outs["batched"])
    speedup = statistics.median(a / b for a, b in zip(times["single"], times["batched"]))
    ok = speedup >= TARGETS["generation"] and identical
    return [{"row": 3, "group": "evaluation", "size": bed.size.label,
             "what": "batched greedy generation (batch 32) / one prompt at a time, tokens/s",
             "value": speedup, "unit": "x", "target": f">= {TARGETS['generation']:g}, identical",
             "met": ok,
             "detail": f"{tokens / t['batched']:.0f} vs {tokens / t['single']:.0f} tok/s; "
                       f"identical greedy outputs: {identical}; prompt prefill "
                       f"{100 * t['prefill'] / t['batched']:.0f}% of the batched time",
             "batched_tok_s": tokens / t["batched"], "single_tok_s": tokens / t["single"],
             "identical_outputs": identical, "prefill_share": t["prefill"] / t["batched"],
             "tokens": tokens, "prompts": len(prompts), "max_new_tokens": new_tokens}]


def bench_judge(setup: Setup, n: int = 20000) -> list[dict]:
    """Judges classify text alone; their answers/s bound how cheap the HS metric is."""
    from harness.evaluation.judges import KeywordJudge, ToyJudge

    world = setup.world
    pool = [(setup.template.render_prompt(e), e.output)
            for e in world.eval_harmful() + world.alignment_data()[:200]]
    pairs = (pool * math.ceil(n / len(pool)))[:n]
    rows = []
    for judge in (ToyJudge(), KeywordJudge()):
        judge.classify(*pairs[0])
        t0 = time.perf_counter()
        for prompt, answer in pairs:
            judge.classify(prompt, answer)
        rate = n / (time.perf_counter() - t0)
        rows.append({"row": 3, "group": "evaluation", "size": "-",
                     "what": f"{judge.name} judge throughput", "value": rate,
                     "unit": "answers/s", "target": None, "met": None,
                     "detail": f"{n} answers"})
    return rows


# ==================================================================== row 4
def sweep_counts(defenses: list[str] = SWEEP_DEFENSES, ps: list[float] = SWEEP_PS) -> dict:
    """Stage runs of a defense x p sweep with artifact reuse, from ``Pipeline.keys()`` (nothing
    is built), against the naive count that reruns every stage at every sweep point."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.config import register, validate
    from harness.pipeline import Pipeline

    register()
    unique: dict[str, set] = {}
    naive: dict[str, int] = {}
    GlobalHydra.instance().clear()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp, \
            initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for defense in defenses:
            for p in ps:
                cfg = compose("config", overrides=[f"paths.artifacts={tmp}/artifacts",
                                                   f"defense={defense}", f"attack.p={p}"])
                run = validate(cfg)
                keys = Pipeline(run, Path(tmp) / "run").keys()
                # An evaluation's key is its model's key plus the eval config, which the sweep
                # does not vary: one eval run per distinct (evaluated stage, model key).
                models = {"base": ("base", keys["base"]),
                          "align": ("align", keys["align"]) if "align" in keys
                          else ("base", keys["base"]),
                          "final": ("finetune", keys["finetune"])}
                runs = {stage: {key} for stage, key in keys.items()}
                runs["eval"] = {models[s] for s in run.eval.stages}
                for stage, ks in runs.items():
                    unique.setdefault(stage, set()).update(ks)
                    naive[stage] = naive.get(stage, 0) + len(ks)
    GlobalHydra.instance().clear()
    ours = {k: len(v) for k, v in unique.items()}
    return {"points": len(defenses) * len(ps), "defenses": defenses, "ps": ps,
            "with_reuse": ours, "naive": naive}


def bench_sweep() -> list[dict]:
    c = sweep_counts()
    ours, naive = sum(c["with_reuse"].values()), sum(c["naive"].values())
    train = ("base", "align", "finetune")
    ours_t = sum(c["with_reuse"].get(s, 0) for s in train)
    naive_t = sum(c["naive"].get(s, 0) for s in train)
    per_stage = ", ".join(f"{s} {c['with_reuse'][s]}/{c['naive'][s]}" for s in c["naive"])
    return [{"row": 4, "group": "sweep reuse", "size": "-",
             "what": f"stage runs, {len(c['defenses'])} defenses x {len(c['ps'])} p, "
                     "with reuse / naive",
             "value": ours / naive, "unit": "share", "target": f"<= {TARGETS['sweep']:.0%}",
             "met": ours / naive <= TARGETS["sweep"],
             "detail": f"{ours} vs {naive} runs ({per_stage}); training stages alone "
                       f"{ours_t}/{naive_t} = {ours_t / naive_t:.0%}",
             **c}]


# ==================================================================== report
def _fmt(r: dict) -> str:
    v = r["value"]
    if v is None:
        return "n/a"
    return {"x": f"{v:.2f}x", "share": f"{v:.0%}", "MiB": f"{v:.0f} MiB"}.get(
        r["unit"], f"{v:,.0f} {r['unit']}")


def to_markdown(results: dict) -> str:
    prov = results["provenance"]
    a = results["args"]
    lines = [
        "# Bench", "",
        f"`make bench` on CPU ({results['cpu_threads']} torch threads), "
        f"torch {prov.get('torch')}, transformers {prov.get('transformers')}, "
        f"lightning {prov.get('lightning')}, git {prov.get('git')}; "
        f"tiny: {a['repeats']} repeats x {a['steps']} timed steps (row 1: "
        f"{max(a['repeats'], a['overhead_repeats'])} repeats), larger: {a['larger_repeats']} x "
        f"{a['larger_steps']} (row 1: {max(a['larger_repeats'], a['larger_overhead_repeats'])}, "
        f"generation: {a['larger_gen_repeats']}), after {a['warmup']} warm-up steps per "
        f"fit; medians; wall time {results['wall_s']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in results['phase_seconds'].items())}).", "",
        "| row | what | model | value | target | met | detail |",
        "|---|---|---|---|---|---|---|"]
    for r in sorted(results["rows"], key=lambda r: r["row"]):
        met = {True: "met", False: "**missed**", None: "-"}[r["met"]]
        lines.append(f"| {r['row']} | {r['what']} | {r['size']} | {_fmt(r)} | "
                     f"{r['target'] or '-'} | {met} | {r['detail']} |")
    lines += ["", "## How it is measured", "",
              "- Step times: wall time between the starts of step `warmup` and step "
              "`warmup + steps`, read by a callback inside each engine (Lightning "
              "`on_train_batch_start`, HF `on_step_begin`, the bare loop's own clock); every "
              "variant runs once per repeat, interleaved in a rotating order; ratios are the median of "
              "per-repeat ratios (a pair runs back to back under the same background load). "
              "One torch thread: with two, on 2 shared cores, a step's time swung 3-30x between "
              "fits.",
              "- Row 1: the same full-weight model copy, the same batches in the same order "
              "(no shuffling), the harness's own AdamW + linear schedule "
              "(`StageModule.configure_optimizers`) and grad clip 1.0 in all three. The harness "
              "runs the Trainer `Pipeline._fit` builds (default `trainer` group, checkpoint "
              "callback, `log_every_n_steps=10`) without the W&B logger and progress bar, as "
              "sweeps run it; HF `Trainer` with `logging_steps=10`, no saving, no reporting.",
              "- Row 2: each method against the SFT step with the same trainable weights: full "
              "weights on alignment batches (align methods), LoRA r=8 on user batches "
              "(finetune methods).",
              "- Row 3: the harness's `generate` at batch 32 against 32 calls at batch 1, on the "
              "same 32 toy harmful prompts, greedy; tokens are the answers' tokens. The prefill "
              "share is a batched run with `max_new_tokens=1` over the full batched run.",
              "- Row 4: stage runs counted from `Pipeline(...).keys()` of each composed sweep "
              "config (nothing built). A stage runs once per distinct key: tokenizer, base, "
              "align, finetune, and one evaluation per distinct (evaluated stage, model) for "
              "`eval.stages` of the toy protocol (base, align, final). Naive: every sweep point "
              "runs every stage it has again (no align stage for `none`).",
              "- Row 5: peak resident set size (Linux VmHWM, reset before each stage, freed heap "
              "returned first) above the RSS at the stage's start, over a short fit that "
              "includes the stage's model copy, LoRA wrapping, gradients, optimizer state and "
              "the method's own extra state. CPU RSS, not a torch allocator figure."]
    if results.get("notes"):
        lines += ["", "## Notes", "", *results["notes"]]
    return "\n".join(lines) + "\n"


def notes_for(rows: list[dict], profiles: dict, op_profiles: dict) -> list[str]:
    """Where the time goes, for each miss whose cause the bench itself can show."""
    notes = []
    for size, prof in profiles.items():
        engines = {"harness": "harness (Lightning)", "bare": "bare loop", "hf": "HF Trainer"}
        kinds = sorted({k for p in prof.values() for k in p["shares"]},
                       key=lambda k: -prof["harness"]["shares"].get(k, 0))
        notes += [f"- {size}, row 1 missed: a sampled profile of one more fit of each engine "
                  "(share of the timed window's wall time, by what the main thread was in):", "",
                  "  | engine | ms/step | " + " | ".join(kinds) + " |",
                  "  |---|---|" + "---|" * len(kinds)]
        for name, p in prof.items():
            notes.append(f"  | {engines[name]} | {p['ms_per_step']:.1f} | " + " | ".join(
                f"{100 * p['shares'].get(k, 0):.1f}%" for k in kinds) + " |")
        h, b, f = (prof[k]["shares"].get("engine (Python)", 0) for k in ("harness", "bare", "hf"))
        notes += ["", f"  The engines' own Python code takes {100 * h:.1f}% of the harness step, "
                  f"{100 * f:.1f}% of the HF Trainer's and {100 * b:.1f}% of the bare loop's; "
                  "the rest is the same forward, backward and AdamW in all three. A gap larger "
                  "than the engine share is background load on the shared cores (see the "
                  "per-repeat ratio range), not engine cost."]
    for r in rows:
        if r["met"] is False and r["row"] == 3 and r.get("prefill_share") is not None:
            notes.append(
                f"- {r['size']}: batched generation {r['value']:.1f}x. On CPU a batch-32 "
                f"forward costs about 32 batch-1 forwards once the model is compute bound; "
                f"the prompt prefill alone is {r['prefill_share']:.0%} of the batched time and "
                "batching cannot shrink its FLOPs. Batching wins on per-call overhead (tiny "
                "model) and on a GPU; closing it on CPU would need fewer prefill FLOPs "
                "(shorter prompts, a shared-prefix KV cache).")
        if r["met"] is False and r["row"] == 2:
            name = r["what"].split(" ")[0]
            ops = op_profiles.get(f"{name}, {r['size']}", [])
            notes.append(f"- {r['size']}: {r['what']} {r['value']:.2f}x against "
                         f"{r['target']}. torch.profiler, the ops whose self CPU time per step "
                         "grew most over the SFT step (extra ms/step; calls over the fit): "
                         + "; ".join(f"`{o['op']}` +{o['extra_ms_per_step']:.1f} ms "
                                     f"({o['calls']} calls)" for o in ops) + ".")
            notes += METHOD_NOTES.get(name, [])
    return notes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="repeats on the tiny model")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per fit, tiny")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per fit")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--overhead-repeats", type=int, default=9,
                        help="extra rounds of row 1 alone on the tiny model (it is cheap)")
    parser.add_argument("--larger-repeats", type=int, default=3)
    parser.add_argument("--larger-overhead-repeats", type=int, default=4)
    parser.add_argument("--larger-gen-repeats", type=int, default=2,
                        help="one-at-a-time generation on the larger model is ~20 s a repeat")
    parser.add_argument("--larger-steps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--memory-steps", type=int, default=2)
    # One thread: on a shared 2-core machine two OpenMP threads contend with the other
    # processes and a step's time swings 3-30x from one fit to the next (measured), which
    # measures the scheduler, not the engines.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_bench(args)
    finally:  # a caller in the same process (the smoke test) keeps its own setting
        torch.set_num_threads(threads)


def run_bench(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(0)
    phases: dict[str, float] = {}

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        phases[name] = round(time.perf_counter() - t0, 1)
        return out

    setup = phase("setup", make_setup)
    rows: list[dict] = []
    seconds: dict[str, dict] = {}
    profiles: dict[str, dict] = {}
    op_profiles: dict[str, list] = {}
    for name in args.sizes:
        size = SIZES[name]
        steps = args.steps if name == "tiny" else args.larger_steps
        repeats = args.repeats if name == "tiny" else args.larger_repeats
        overhead = args.overhead_repeats if name == "tiny" else args.larger_overhead_repeats
        print(f"benchmarking {size.label}: {steps} timed steps x {repeats} repeats ...",
              flush=True)
        longest = args.warmup + max([m.cycle * math.ceil(steps / m.cycle)
                                     for m in METHOD_ROWS] + [steps]) + 1
        bed = make_bed(setup, size, max(longest, args.memory_steps))
        train_rows, sec = phase(f"{name}: steps", lambda: bench_training(
            bed, args.warmup, steps, repeats, overhead, METHOD_ROWS))
        rows += train_rows
        seconds[size.label] = sec
        for m in METHOD_ROWS:
            if any(r["row"] == 2 and r["met"] is False and r["what"].startswith(f"{m.name} ")
                   for r in train_rows):
                op_profiles[f"{m.name}, {size.label}"] = phase(
                    f"{name}: {m.name} ops", lambda m=m: op_profile(bed, m))
        if any(r["row"] == 1 and r["met"] is False for r in train_rows):
            profiles[size.label] = phase(f"{name}: profile",
                                         lambda: engine_profiles(bed, args.warmup, steps))
        rows += phase(f"{name}: generation",
                      lambda: bench_generation(setup, bed, repeats if name == "tiny"
                                               else args.larger_gen_repeats, args.new_tokens))
        rows += phase(f"{name}: memory",
                      lambda: bench_memory(bed, METHOD_ROWS, args.memory_steps))
    rows += phase("judge", lambda: bench_judge(setup))
    rows += phase("sweep", bench_sweep)
    results = {"provenance": provenance(), "args": vars(args) | {"out": str(args.out)},
               "cpu_threads": torch.get_num_threads(), "rows": rows,
               "step_seconds": seconds, "engine_profiles": profiles,
               "op_profiles": op_profiles, "phase_seconds": phases,
               "wall_s": time.perf_counter() - t_start}
    results["notes"] = notes_for(rows, profiles, op_profiles)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", results)
    text = to_markdown(results)
    (args.out / "results.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
