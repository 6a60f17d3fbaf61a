"""``make bench-gpu``: the GPU path run for real, in one capped run of at most 8 minutes.

    python -m harness.bench --device cuda --out bench/gpu [--budget 480]
    python -m harness.bench --device cpu --tiny --out /tmp/bench-cpu   # the same rows, tiny

Rows, in priority order (each written to ``results.md`` and ``results.json`` as it finishes,
each under its own time cap, all under ``--budget`` seconds):
  1. one whole tiny pipeline run with ``trainer=gpu`` (placement, bf16-mixed, evaluation),
     and its HS and FA against the prompt interval of the same run with ``trainer=cpu``;
  2. the 7B Llama shape (random weights, bf16, LoRA at the real protocol's batch and
     length): the SFT step's tokens/s and MFU, with and without gradient checkpointing;
  3. at 7B, LoRA: each method's step time against SFT's and its peak GPU memory;
  4. the same at the 1B shape;
  5. at 7B: batched greedy generation against one prompt at a time, tokens/s and the share of
     identical outputs.

A row that runs past its cap is stopped (SIGALRM raises ``RowCapped`` in the main thread at
its next Python bytecode, which a training or decoding loop reaches every few milliseconds)
and recorded as ``capped``; a row that fails is recorded as ``error`` with the exception; the
next row starts either way.
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import shutil
import signal
import statistics
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch

from harness.artifacts import provenance, write_json_atomic
from harness.bench.format import _fmt
from harness.bench.setup import CONF, METHOD_ROWS, Setup, Size, Workload, make_setup
from harness.bench.timing import Clock, method_module, peak_rss_mib
from harness.config import LoraConfig, ModelConfig, TrainerConfig, TrainStageConfig
from harness.data.collate import PadCollator, left_pad, prompt_ids
from harness.defenses.base import StageContext

# Shapes from each model's published config (vocab, hidden, MLP, layers, heads, KV heads).
LLAMA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}
LLAMA_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,  # Llama 3.2
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "tie_word_embeddings": True}
TINY_SHAPE = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity), matched on torch.cuda.get_device_name.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# The methods of rows 3-4, each run as its paper's protocol does at 7B: LoRA on every stage
# (full-weight AdamW of a 7B model does not fit in 80 GB).
GPU_METHODS = ["vaccine", "booster", "repnoise", "t_vaccine", "lisa", "asft", "ref_student"]

# Row 1's run: the toy protocol, shortened so both runs fit the row's cap on the GPU machine.
PIPELINE = ["logger=none", "trainer.enable_progress_bar=false", "world.base_size=600",
            "world.align_size=200", "train.base.max_steps=120", "train.align.max_steps=30",
            "train.finetune.max_steps=30", "attack.n=100", "eval.harmful_size=64",
            "eval.task_size=32", "eval.max_new_tokens=12", "model.tokenizer_vocab_size=400"]
PIPELINE_TINY = ["logger=none", "trainer.enable_progress_bar=false", "world.base_size=300",
                 "world.align_size=100", "train.base.max_steps=4", "train.align.max_steps=3",
                 "train.finetune.max_steps=3", "attack.n=40", "eval.harmful_size=16",
                 "eval.task_size=8", "eval.max_new_tokens=4", "model.tokenizer_vocab_size=400"]

# Seconds per row (per method for rows 3-4); ``--cap NAME=SECONDS`` overrides one.
CAPS = {"pipeline": 150.0, "sft_7b": 90.0, "method_7b": 22.0, "sft_1b": 40.0,
        "method_1b": 12.0, "generation_7b": 60.0}
CAPS_TINY = {"pipeline": 60.0, "sft_7b": 30.0, "method_7b": 15.0, "sft_1b": 30.0,
             "method_1b": 15.0, "generation_7b": 20.0}

FLOPS_FORMULA = ("FLOPs per step = tokens x (4 N_linear + 6 N_lora + 8 L d s): the frozen "
                 "weights' forward (2 N_linear) and activation gradients (2 N_linear), no "
                 "weight gradients for them; the LoRA factors' forward, activation and weight "
                 "gradients (6 N_lora); attention scores and values, forward and backward "
                 "(8 L d s, L layers, width d, sequence s, causal mask not discounted). N_linear "
                 "counts every Linear weight (LM head included, embedding lookup excluded); "
                 "tokens = batch x s, every position real. Gradient checkpointing's recomputed "
                 "forward is not counted (model FLOPs, not hardware FLOPs).")


# ==================================================================== the FLOPs estimate
def lora_step_flops(n_linear: int, n_lora: int, layers: int, hidden: int, seq: int,
                    tokens: int) -> float:
    """Model FLOPs of one LoRA training step (``FLOPS_FORMULA``)."""
    return tokens * (4.0 * n_linear + 6.0 * n_lora + 8.0 * layers * hidden * seq)


def bf16_peak(device_name: str) -> Optional[float]:
    """The card's dense bf16 peak in FLOP/s, or None for a card not in ``BF16_PEAK_TFLOPS``."""
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


# ==================================================================== caps
class RowCapped(BaseException):
    """Raised in the main thread when a row's cap runs out. A BaseException, so library code
    that catches ``Exception`` (a retry, a fallback) cannot swallow it."""


@contextmanager
def cap(seconds: float):
    """Raise ``RowCapped`` in the main thread once ``seconds`` have passed (SIGALRM)."""
    def fire(signum, frame):
        raise RowCapped(f"over its {seconds:g} s cap")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Report:
    """The rows so far, rewritten to ``out/results.{json,md}`` after every row."""

    def __init__(self, out: Path, args: dict, budget: float):
        self.out, self.args, self.rows, self.budget = out, args, [], budget
        self.t0 = time.perf_counter()
        self.device = (torch.cuda.get_device_name(0) if args["device"] == "cuda"
                       else f"CPU ({torch.get_num_threads()} torch threads)")
        self.prov = provenance()
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def run(self, name: str, row: int, what: str, size: str, cap_s: float,
            fn: Callable[[], list[dict]]) -> list[dict]:
        """``fn``'s rows, or one ``capped`` / ``error`` / ``skipped`` row in their place."""
        limit = min(cap_s, self.left())
        base = {"row": row, "name": name, "what": what, "size": size, "value": None,
                "unit": "", "cap_s": round(limit, 3), "detail": ""}
        t0 = time.perf_counter()
        if self.left() < 1.0:
            out = [base | {"status": "skipped", "detail": "the run's budget is spent"}]
        else:
            print(f"[bench-gpu] {name}: {what} (cap {limit:.0f} s)", flush=True)
            try:
                with cap(limit):
                    out = [base | {"status": "ok"} | r for r in fn()]
            except RowCapped as err:
                out = [base | {"status": "capped", "detail": str(err)}]
            except Exception as err:  # noqa: BLE001 - recorded; the next row still runs
                out = [base | {"status": "error",
                               "detail": f"{type(err).__name__}: {err}".replace("\n", " ")[:400],
                               "traceback": traceback.format_exc()[-3000:]}]
            free_device()
        for r in out:
            r["seconds"] = round(time.perf_counter() - t0, 1)
        self.rows += out
        self.write()
        return out

    def write(self) -> None:
        results = {"provenance": self.prov, "device": self.device, "args": self.args,
                   "flops_formula": FLOPS_FORMULA, "rows": self.rows,
                   "wall_s": round(time.perf_counter() - self.t0, 1)}
        write_json_atomic(self.out / "results.json", results)
        tmp = self.out / "results.md.tmp"
        tmp.write_text(to_markdown(results))
        tmp.replace(self.out / "results.md")


def to_markdown(results: dict) -> str:
    p, a = results["provenance"], results["args"]
    lines = ["# GPU bench", "",
             f"`python -m harness.bench --device {a['device']}{' --tiny' if a['tiny'] else ''}` "
             f"on {results['device']}; torch {p.get('torch')}, transformers "
             f"{p.get('transformers')}, lightning {p.get('lightning')}, git {p.get('git')}; "
             f"{results['wall_s']:.0f} s of a {a['budget']:.0f} s budget; a step time is the "
             f"mean over {a['steps']} timed steps (rounded up to a method's cycle) after "
             f"{a['warmup']} warm-up steps, one fit per row.", "",
             "| row | what | model | value | status | detail |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        lines.append(f"| {r['row']} | {r['what']} | {r['size']} | {_fmt(r)} | {status} "
                     f"({r['seconds']:.0f} s of {r['cap_s']:.0f}) | {r['detail']} |")
    lines += ["", "## How it is measured", "",
              f"- MFU: {results['flops_formula']} MFU = FLOPs per step / step time / the "
              "card's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s).",
              "- Step time: the wall time between the starts of step `warmup` and step "
              "`warmup + steps` of the pipeline's own Lightning fit (`training.build_trainer`, "
              "trainer=gpu's accelerator and precision), CUDA synchronised at each step start.",
              "- Peak memory: `torch.cuda.max_memory_allocated` over the stage's fit above what "
              "was allocated before it (the bench's resident copy of the weights): the stage's "
              "own model copy, LoRA factors, optimizer state, activations and the method's "
              "extra models (a teacher, AsFT's base) and state, what the stage alone holds. "
              "On CPU: peak RSS above the start.",
              "- Models: built from each shape's config with random weights (weights cannot "
              "travel to the GPU machine); batches of random token ids at the protocol's "
              "length, the loss on the second half of each row."]
    return "\n".join(lines) + "\n"


# ==================================================================== workloads
@dataclass
class GpuWorkload(Workload):
    """A ``Workload`` of random token rows at the protocol's fixed length, trained as the
    protocol trains (its LoRA, batch, length and lr), on ``device``."""

    train_cfg: TrainStageConfig = None
    trainer_cfg: TrainerConfig = None
    n_linear: int = 0

    def stage_cfg(self, lora: bool) -> TrainStageConfig:
        return self.train_cfg

    def model(self, lora: bool) -> torch.nn.Module:
        model = copy.deepcopy(self.aligned)
        model.train()
        return apply_protocol_lora(model, self.train_cfg.lora)


def apply_protocol_lora(model, lora_cfg: LoraConfig):
    from peft import LoraConfig as PeftLora, get_peft_model

    return get_peft_model(model, PeftLora(r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                                          lora_dropout=lora_cfg.dropout,
                                          target_modules=list(lora_cfg.targets),
                                          task_type="CAUSAL_LM"))


def protocol_train_cfg(name: str = "vaccine", stage: str = "finetune") -> TrainStageConfig:
    """The real protocol's training settings (``conf/protocol/<name>.yaml``, train.<stage>)."""
    from omegaconf import OmegaConf

    t = OmegaConf.to_container(OmegaConf.load(CONF / "protocol" / f"{name}.yaml"))["train"][stage]
    return TrainStageConfig(lr=t["lr"], batch_size=t["batch_size"], max_length=t["max_length"],
                            weight_decay=t["weight_decay"], lora=LoraConfig(**t["lora"]),
                            checkpoint_every_n_steps=10**6)


def random_rows(n: int, length: int, vocab: int, seed: int,
                prompts_of: Optional[list[dict]] = None) -> list[dict]:
    """``n`` rows of ``length`` random ids, the loss on the second half (a response); with
    ``prompts_of``, each row keeps that row's prompt half (RepNoise pairs rows by prompt)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g).tolist()
    half = length // 2
    if prompts_of is not None:
        ids = [p["input_ids"][:half] + r[half:] for p, r in zip(prompts_of, ids)]
    return [{"input_ids": r, "labels": [-100] * half + r[half:], "harmful": 1} for r in ids]


def perturbed_copy(model, scale: float = 1e-3):
    """A copy of ``model`` that differs from it in every weight (a stand-in base model, so
    AsFT's aligned-minus-base direction is not zero)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn_like(p))
    return out


def align_adapter(model, lora_cfg: LoraConfig, folder: Path) -> Path:
    """A saved LoRA adapter with non-zero factors on a copy of ``model``: the align stage's
    adapter that AsFT reads its directions from (``context.extras['align_adapter']``), as a
    run with a LoRA align stage gives it; dense directions of a 7B model would be 27 GB."""
    peft = apply_protocol_lora(copy.deepcopy(model), lora_cfg)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    peft.save_pretrained(str(folder))
    del peft
    free_device()
    return folder


def build_model(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: a 7B init on CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def make_gpu_workload(setup: Setup, label: str, shape: dict, device: str, tiny: bool,
                      rows_needed: int, work: Path) -> GpuWorkload:
    train_cfg = protocol_train_cfg()
    if tiny:
        train_cfg = replace(train_cfg, batch_size=2, max_length=32)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    trainer_cfg = TrainerConfig(accelerator="gpu" if device == "cuda" else "cpu",
                                precision="bf16-mixed" if device == "cuda" else "32-true",
                                enable_progress_bar=False)
    aligned = build_model(shape, device, dtype)
    n_linear = sum(m.weight.numel() for m in aligned.modules()
                   if isinstance(m, torch.nn.Linear))
    tok, template, world = setup.tokenizer, setup.template, setup.world
    n, length = rows_needed * train_cfg.batch_size, train_cfg.max_length
    user = random_rows(n, length, shape["vocab_size"], seed=1)
    alignment = random_rows(n, length, shape["vocab_size"], seed=2)
    harmful, harmless = world.feature_prompts()
    context = StageContext(
        tokenizer=tok, collate=PadCollator(0), alignment_data=alignment,
        # one resident copy: "base" is a perturbed copy of it, made when a stage asks
        load_model=lambda name: perturbed_copy(aligned) if name == "base"
        else copy.deepcopy(aligned),
        extras={"feature_prompts": ([template.render_prompt(e) for e in harmful],
                                    [template.render_prompt(e) for e in harmless]),
                "harmful_data": random_rows(n, length, shape["vocab_size"], seed=3,
                                            prompts_of=alignment),
                "align_adapter": align_adapter(aligned, train_cfg.lora, work / (
                    "align-adapter-" + "".join(c for c in label if c.isalnum())))})
    prompts = [template.render_prompt(e) for e in world.eval_harmful()[:32]]
    size = Size(label, shape, train_cfg.batch_size, length)
    return GpuWorkload(size, ModelConfig(config_overrides=shape), aligned, aligned, user,
                       alignment, context, PadCollator(0), tok, prompts,
                       train_cfg=train_cfg, trainer_cfg=trainer_cfg, n_linear=n_linear)


# ==================================================================== a timed fit
class _SyncClock(L.Callback):
    def __init__(self, clock: Clock):
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.clock.tick()


def timed_fit(wl: GpuWorkload, module: str, params: dict, warmup: int, steps: int,
              checkpointing: bool = False) -> dict:
    """One fit of ``module`` through the pipeline's Trainer: seconds per step, peak memory
    above the resident weights, and the stage's trainable parameters."""
    from harness.training import build_trainer

    clock = Clock(warmup, steps)
    out: dict[str, Any] = {}

    def fit():
        model = copy.deepcopy(wl.aligned)
        model.train()
        if checkpointing:  # as training.py enables it for a LoRA stage
            getattr(model, "activation_checkpointing_enable",  # transformers 5's name
                    getattr(model, "gradient_checkpointing_enable", None))()
            model.enable_input_require_grads()
        wl_model = apply_protocol_lora(model, wl.train_cfg.lora)
        from harness.stages import method_class

        cls = method_class(module)
        stage = cls(model=wl_model, train_cfg=wl.train_cfg, total_steps=clock.total,
                    params=cls.Params(**params), context=wl.context)
        out["n_lora"] = sum(p.numel() for p in wl_model.parameters() if p.requires_grad)
        loader = torch.utils.data.DataLoader(wl.user, batch_size=wl.train_cfg.batch_size,
                                             shuffle=False, collate_fn=wl.collate)
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
            build_trainer(wl.trainer_cfg, wl.train_cfg, stage, Path(work), False,
                          (_SyncClock(clock),)).fit(stage, loader)

    free_device()  # the previous fit's model copy (held in reference cycles) goes first
    if torch.cuda.is_available() and wl.trainer_cfg.accelerator == "gpu":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fit()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        out["memory"] = "GPU max_memory_allocated above the bench's resident weights"
    else:
        out["peak_mib"] = peak_rss_mib(fit)
        out["memory"] = "peak RSS above start"
    out["s_per_step"] = clock.per_step()
    return out


# ==================================================================== rows
def pipeline_row(device: str, tiny: bool, work: Path) -> list[dict]:
    """A whole run with ``trainer=<device>``, and the same run with ``trainer=cpu``: HS and FA
    of each evaluated stage, each inside the other run's Wilson interval."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.config import register
    from harness.run import execute

    register()
    trainer = "gpu" if device == "cuda" else "cpu"
    metrics, seconds = {}, {}
    for name in dict.fromkeys([trainer, "cpu"]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            # one artifact store per trainer: with device=cpu the reference reuses the first
            # run's stages (a check of the row's machinery, not of a device)
            cfg = compose("config", overrides=[f"paths.artifacts={work}/artifacts-{name}",
                                               f"trainer={name}",
                                               *(PIPELINE_TINY if tiny else PIPELINE)])
        t0 = time.perf_counter()
        results = execute(cfg, work / f"run-{name}")
        seconds[name] = time.perf_counter() - t0
        if results["status"] != "ok":
            raise RuntimeError(f"trainer={name}: {results.get('error')}")
        metrics[name] = {k: v for k, v in results["metrics"].items()
                         if isinstance(v, dict) and "hs" in v}
    GlobalHydra.instance().clear()
    if trainer == "cpu":
        metrics["cpu-ref"] = metrics["cpu"]
        seconds["cpu-ref"] = seconds["cpu"]
    ref_name = "cpu" if trainer != "cpu" else "cpu-ref"
    dev, ref = metrics[trainer], metrics[ref_name]
    inside, parts = True, []
    for stage in dev:
        for m in ("hs", "fa"):
            if dev[stage].get(m) is None or m not in ref[stage].get("interval", {}):
                continue  # a rate with no prompts to count (an undefined FA)
            v, (lo, hi) = dev[stage][m], ref[stage]["interval"][m]
            ok = lo - 1e-9 <= v <= hi + 1e-9
            inside &= ok
            parts.append(f"{stage} {m.upper()} {v:.1f} vs {ref[stage][m]:.1f} "
                         f"[{lo:.1f}, {hi:.1f}]{'' if ok else ' OUTSIDE'}")
    same = " (the same run: with --device cpu this row checks its own machinery)" \
        if trainer == "cpu" else ""
    return [{"value": sum("OUTSIDE" not in x for x in parts) / len(parts), "unit": "share",
             "detail": f"share of HS/FA values inside the reference's interval; "
                       f"trainer={trainer} {seconds[trainer]:.0f} s, trainer=cpu "
                       f"{seconds[ref_name]:.0f} s{same}; {trainer} value vs cpu value [cpu's 95% "
                       "Wilson prompt interval]: " + "; ".join(parts),
             "inside_interval": inside, "metrics": metrics, "run_seconds": seconds}]


def sft_rows(wl: GpuWorkload, warmup: int, steps: int, peak: Optional[float]) -> list[dict]:
    """The SFT step's tokens/s and MFU, without and with gradient checkpointing."""
    shape, cfg = wl.size.overrides, wl.train_cfg
    tokens = cfg.batch_size * cfg.max_length
    out = []
    for ckpt in (False, True):
        fit = timed_fit(wl, "harness.defenses.sft.SFT", {}, warmup, steps, ckpt)
        flops = lora_step_flops(wl.n_linear, fit["n_lora"], shape["num_hidden_layers"],
                                shape["hidden_size"], cfg.max_length, tokens)
        achieved = flops / fit["s_per_step"]
        mfu = achieved / peak if peak else None
        out.append({
            "what": f"SFT step, LoRA r={cfg.lora.r}, gradient checkpointing "
                    f"{'on' if ckpt else 'off'}, tokens/s",
            "value": tokens / fit["s_per_step"], "unit": "tok/s", "mfu": mfu,
            "tflops": achieved / 1e12, "flops_per_step": flops, "s_per_step": fit["s_per_step"],
            "peak_mib": fit["peak_mib"], "n_linear": wl.n_linear, "n_lora": fit["n_lora"],
            "checkpointing": ckpt,
            "detail": f"{1000 * fit['s_per_step']:.1f} ms/step, batch {cfg.batch_size} x "
                      f"{cfg.max_length} tokens; {achieved / 1e12:.3g} TFLOP/s model FLOPs, "
                      + (f"MFU {mfu:.1%} of {peak / 1e12:.0f}" if mfu is not None
                         else "MFU n/a (no bf16 peak known for this device)")
                      + f"; peak {fit['peak_mib']:.0f} MiB ({fit['memory']})"})
    return out


def method_row(wl: GpuWorkload, name: str, warmup: int, steps: int, sft: dict) -> list[dict]:
    """One method's step time against SFT's (the same LoRA, batch and length) and its peak
    memory."""
    m = next(m for m in METHOD_ROWS if m.name == name)
    window = m.cycle * math.ceil(steps / m.cycle)
    fit = timed_fit(wl, m.module, m.params, warmup, window)
    ratio = fit["s_per_step"] / sft["s_per_step"]
    return [{"what": f"{name} step / SFT step (LoRA), and peak memory", "value": ratio,
             "unit": "x", "s_per_step": fit["s_per_step"], "peak_mib": fit["peak_mib"],
             "sft_peak_mib": sft["peak_mib"], "params": m.params,
             "detail": f"{1000 * fit['s_per_step']:.1f} vs {1000 * sft['s_per_step']:.1f} "
                       f"ms/step over {window} steps; peak {fit['peak_mib']:.0f} MiB vs SFT "
                       f"{sft['peak_mib']:.0f} MiB ({fit['memory']})"}]


def generation_row(wl: GpuWorkload, new_tokens: int, batch: int) -> list[dict]:
    """Batched greedy decoding (left padding, KV cache, as ``evaluation.generate``) against one
    prompt at a time: tokens/s, and the share of prompts whose tokens are identical. Every
    answer runs exactly ``new_tokens`` (min_new_tokens): random weights emit EOS at random."""
    model = wl.aligned
    model.eval()
    tok = wl.tokenizer
    encoded = [prompt_ids(tok, p) for p in wl.prompts]
    device = next(model.parameters()).device

    @torch.no_grad()
    def decode(group: list[list[int]]) -> list[list[int]]:
        ids, mask = left_pad(group, 0)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=2, use_cache=True)
        return out[:, ids.shape[1]:].tolist()

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, res

    decode(encoded[:2])  # warm-up
    t_b, batched = timed(lambda: [a for i in range(0, len(encoded), batch)
                                  for a in decode(encoded[i:i + batch])])
    t_s, single = timed(lambda: [decode([e])[0] for e in encoded])
    model.train()
    n_tokens = len(encoded) * new_tokens
    same = sum(a == b for a, b in zip(batched, single)) / len(encoded)
    return [{"what": f"batched greedy generation (batch {batch}) / one prompt at a time, "
                     "tokens/s", "value": t_s / t_b, "unit": "x",
             "batched_tok_s": n_tokens / t_b, "single_tok_s": n_tokens / t_s,
             "identical_share": same, "prompts": len(encoded), "max_new_tokens": new_tokens,
             "detail": f"{n_tokens / t_b:.0f} vs {n_tokens / t_s:.0f} tok/s over "
                       f"{len(encoded)} prompts x {new_tokens} new tokens; identical greedy "
                       f"outputs: {same:.0%} of prompts"}]


# ==================================================================== the run
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("GPU bench (--device)")
    g.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="run the GPU bench's rows on this device instead of `make bench`'s")
    g.add_argument("--tiny", action="store_true",
                   help="tiny shapes for every row (the CPU mode the test suite runs)")
    g.add_argument("--budget", type=float, default=480.0, help="seconds for all rows together")
    g.add_argument("--cap", action="append", default=[], metavar="NAME=SECONDS",
                   help=f"one row's cap; names: {', '.join(CAPS)} (method_* per method)")
    g.add_argument("--methods", nargs="+", default=GPU_METHODS, choices=GPU_METHODS)
    g.add_argument("--skip", nargs="*", default=[], choices=list(CAPS),
                   help="rows not to run")
    g.add_argument("--gpu-steps", type=int, default=8, help="timed steps per fit")
    g.add_argument("--gpu-warmup", type=int, default=2, help="untimed steps per fit")
    g.add_argument("--gpu-new-tokens", type=int, default=32, help="row 5's answer length")
    g.add_argument("--gen-batch", type=int, default=32)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's dense bf16 peak, where its name is not known")


def parse_caps(items: list[str], tiny: bool) -> dict[str, float]:
    caps = dict(CAPS_TINY if tiny else CAPS)
    for item in items:
        name, _, value = item.partition("=")
        if name not in caps or not value:
            raise SystemExit(f"--cap {item}: expected NAME=SECONDS with NAME one of "
                             f"{', '.join(caps)}")
        caps[name] = float(value)
    return caps


def run_gpu_bench(args: argparse.Namespace) -> dict:
    device, tiny = args.device, args.tiny
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu "
                         "--tiny for the CPU mode")
    caps = parse_caps(args.cap, tiny)
    warmup, steps = (1, 2) if tiny else (args.gpu_warmup, args.gpu_steps)
    new_tokens = 4 if tiny else args.gpu_new_tokens
    report = Report(args.out, {"device": device, "tiny": tiny, "budget": args.budget,
                               "warmup": warmup, "steps": steps, "caps": caps,
                               "methods": args.methods, "new_tokens": new_tokens,
                               "out": str(args.out)}, args.budget)
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else
            bf16_peak(report.device) if device == "cuda" else None)
    torch.manual_seed(0)
    setup = make_setup()
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        run_rows(args, report, setup, work, device, tiny, caps, warmup, steps, new_tokens, peak)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.write()
    print((args.out / "results.md").read_text(), flush=True)
    return {"rows": report.rows, "device": report.device,
            "wall_s": round(time.perf_counter() - report.t0, 1)}


def run_rows(args, report: Report, setup: Setup, work: Path, device: str, tiny: bool,
             caps: dict, warmup: int, steps: int, new_tokens: int, peak: Optional[float]):
    skip = set(args.skip)
    run = report.run
    if "pipeline" not in skip:
        trainer = "gpu" if device == "cuda" else "cpu"
        run("pipeline", 1, f"one tiny pipeline run with trainer={trainer}: HS and FA inside "
            "trainer=cpu's prompt interval", "tiny (toy protocol)",
            caps["pipeline"], lambda: pipeline_row(device, tiny, work))
    workloads: dict[str, GpuWorkload] = {}
    rows_needed = warmup + max(10 * math.ceil(steps / 10), 20 * math.ceil(steps / 20)) + 2
    for key, label, shape, row in (("7b", "Llama-2-7B shape", LLAMA_7B, 3),
                                   ("1b", "Llama-3.2-1B shape", LLAMA_1B, 4)):
        if tiny:
            shape, label = TINY_SHAPE, f"tiny stand-in for the {label}"
        sft: dict = {}

        def sft_fn(key=key, label=label, shape=shape, sft=sft):
            workloads[key] = make_gpu_workload(setup, label, shape, device, tiny, rows_needed,
                                               work)
            rows = sft_rows(workloads[key], warmup, steps, peak)
            sft.update(rows[0])
            return rows

        if f"sft_{key}" in skip:
            continue
        got = run(f"sft_{key}", 2 if key == "7b" else 4, "SFT step (LoRA) tokens/s and MFU",
                  label, caps[f"sft_{key}"], sft_fn)
        if got[0]["status"] != "ok" or f"method_{key}" in skip:
            continue
        for name in args.methods:
            run(f"method_{key}", row, f"{name} step / SFT step (LoRA), and peak memory", label,
                caps[f"method_{key}"],
                lambda key=key, name=name, sft=sft: method_row(workloads[key], name, warmup,
                                                                steps, sft))
    if "generation_7b" not in skip and "7b" in workloads:
        run("generation_7b", 5, "batched / one-at-a-time greedy generation, tokens/s",
            workloads["7b"].size.label, caps["generation_7b"],
            lambda: generation_row(workloads["7b"], new_tokens, args.gen_batch))
