"""Step clocks inside each engine (the harness's Lightning fit through ``build_trainer``, a
bare PyTorch loop, ``transformers.Trainer``), where the time goes, and peak memory."""
from __future__ import annotations

import copy
import ctypes
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, SequentialSampler

from harness.config import TrainerConfig, TrainStageConfig
from harness.defenses.sft import SFT
from harness.training import build_trainer
from harness.bench.setup import MethodRow, Workload


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
    """A fit with the pipeline's own Trainer (``training.build_trainer``, default trainer
    group), minus the W&B/CSV logger and the progress bar, as sweeps run it."""
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        trainer_cfg = TrainerConfig(enable_progress_bar=False)
        build_trainer(trainer_cfg, train_cfg, module, Path(work), False,
                      tuple(callbacks)).fit(module, loader)


def method_module(wl: Workload, module: str, lora: bool, params: dict, total: int):
    from harness.stages import method_class

    cls = method_class(module)
    return cls(model=wl.model(lora), train_cfg=wl.stage_cfg(lora), total_steps=total,
               params=cls.Params(**params), context=wl.context)


def time_lightning(wl: Workload, module: str, lora: bool, params: dict, warmup: int,
                   steps: int, clock: Optional[Clock] = None) -> float:
    clock = clock or Clock(warmup, steps)
    stage = method_module(wl, module, lora, params, clock.total)
    lightning_fit(stage, wl.loader(lora), wl.stage_cfg(lora), [_LightningClock(clock)])
    return clock.per_step()


def _optimizer(model: torch.nn.Module, train_cfg: TrainStageConfig, total: int):
    """The harness's own AdamW + schedule (StageModule.configure_optimizers), for the other
    engines: the same optimizer, parameter groups and schedule by construction."""
    conf = SFT(model=model, train_cfg=train_cfg, total_steps=total).configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def _lm_batch(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def time_bare(wl: Workload, warmup: int, steps: int, clock: Optional[Clock] = None) -> float:
    """The loop a researcher writes by hand: forward, backward, clip, AdamW, schedule."""
    clock = clock or Clock(warmup, steps)
    model, cfg = wl.model(False), wl.stage_cfg(False)
    opt, sched = _optimizer(model, cfg, clock.total)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(wl.loader(False))
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


def time_hf(wl: Workload, warmup: int, steps: int, clock: Optional[Clock] = None) -> float:
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
    model, cfg = wl.model(False), wl.stage_cfg(False)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=clock.total,
            max_grad_norm=cfg.grad_clip, logging_steps=TrainerConfig().log_every_n_steps,
            save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
            dataloader_num_workers=0, dataloader_pin_memory=False,
            remove_unused_columns=False, seed=0)
        trainer = Sequential(model=model, args=args, train_dataset=wl.data(False),
                             data_collator=lambda rows: _lm_batch(wl.collate(rows)),
                             optimizers=_optimizer(model, cfg, clock.total), callbacks=[Tick()])
        trainer.remove_callback(PrinterCallback)  # it prints the final train-summary dict
        trainer.train()
    return clock.per_step()


# ==================================================================== stage wall times
def finetune_stage(wl: Workload, steps: int) -> tuple[float, torch.nn.Module]:
    """(wall seconds, the finetuned peft model) of one LoRA SFT stage on the user data: the
    model copy and LoRA wrapping, then the pipeline's fit of ``steps`` steps."""
    t0 = time.perf_counter()
    stage = method_module(wl, "harness.defenses.sft.SFT", True, {}, steps)
    lightning_fit(stage, wl.loader(True), wl.stage_cfg(True), [])
    return time.perf_counter() - t0, stage.model


def posthoc_stage(wl: Workload, finetuned: torch.nn.Module, module: str, params: dict
                  ) -> tuple[float, dict]:
    """(wall seconds, the method's stats) of a post-hoc stage on a copy of ``finetuned``: the
    method's ``apply`` (its own model loads, the calibration pass) and the adapter's save, as
    ``harness/editing.py`` builds it; the copy stands in for loading the finetune artifact."""
    from harness.posthoc.base import PosthocContext
    from harness.stages import method_class

    cls = method_class(module)
    model = copy.deepcopy(finetuned).eval()
    context = PosthocContext(load_model=wl.context.load_model,
                             harmful_batches=wl.harmful_batches)
    with tempfile.TemporaryDirectory(prefix="bench-posthoc-") as tmp:
        t0 = time.perf_counter()
        stats = cls(cls.Params(**params)).apply(model, context)
        model.save_pretrained(Path(tmp) / "adapter")
        return time.perf_counter() - t0, stats


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


def engine_profiles(wl: Workload, warmup: int, steps: int) -> dict[str, dict]:
    """The step of each row-1 engine, sampled: the share of wall time in forward, backward,
    optimizer, clip, data and in the engine's own Python code."""
    runs = {"harness": lambda c: time_lightning(wl, "harness.defenses.sft.SFT", False, {},
                                                warmup, steps, clock=c),
            "bare": lambda c: time_bare(wl, warmup, steps, clock=c),
            "hf": lambda c: time_hf(wl, warmup, steps, clock=c)}
    out = {}
    for name, run in runs.items():
        clock = Clock(warmup, steps)
        with StackSampler(clock) as sampler:
            ms = 1000 * run(clock)
        out[name] = {"ms_per_step": ms, "shares": sampler.shares(),
                     "samples": sum(sampler.counts.values())}
    return out


def op_profile(wl: Workload, m: MethodRow, steps: int = 3) -> list[dict]:
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
        stage = method_module(wl, module, lora, params, steps + 2)
        lightning_fit(stage, wl.loader(lora), wl.stage_cfg(lora), [window])
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


