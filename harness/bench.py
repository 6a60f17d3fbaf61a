"""``make bench``: what each stage method and the evaluation cost, as ratios measured side by side.

    python -m harness.bench [--repeats 3] [--steps 30] [--out bench]

Step costs come from Lightning fits of the pipeline's own modules: the time of a fit with
``warmup + steps`` steps minus one with ``warmup`` steps, divided by ``steps``, so the per-fit
fixed cost cancels; the median over repeats is reported. Ratios are taken against the SFT step on
the same model, batch and trainable parameters (full weights for alignment methods, LoRA for
finetuning methods), on a tiny and a larger model. Writes ``results.md`` and ``results.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

import harness  # noqa: F401 - offline environment
from harness.artifacts import provenance, write_json_atomic
from harness.config import LoraConfig, ModelConfig, TrainStageConfig
from harness.data.collate import PadCollator, TokenizedDataset
from harness.data.mixing import build_user_data
from harness.data.templates import TemplateConfig
from harness.data.tokenizer import train_toy_tokenizer
from harness.data.toy import ToyWorld, ToyWorldConfig
from harness.defenses.asft import AsFT
from harness.defenses.base import StageContext
from harness.defenses.lisa import Lisa
from harness.defenses.sft import SFT
from harness.defenses.vaccine import Vaccine
from harness.evaluation.generate import generate
from harness.models.loading import apply_lora, build_tiny

logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

SIZES = {
    "tiny (h128, 4 layers)": {"hidden_size": 128, "intermediate_size": 512,
                              "num_hidden_layers": 4, "num_attention_heads": 4,
                              "num_key_value_heads": 4, "tie_word_embeddings": True},
    "larger (h512, 8 layers)": {"hidden_size": 512, "intermediate_size": 2048,
                                "num_hidden_layers": 8, "num_attention_heads": 8,
                                "num_key_value_heads": 8, "tie_word_embeddings": True},
}
# Targets from the bench issue: each method's step against the SFT step.
TARGETS = {"vaccine": 2.2, "lisa": 1.1, "asft": 1.2}


@dataclass
class Setup:
    tokenizer: object
    user: TokenizedDataset
    alignment: TokenizedDataset
    prompts: list[str]


def make_setup(batch_size: int) -> Setup:
    world = ToyWorld(ToyWorldConfig(seed=0, base_size=2000, align_size=600))
    template = TemplateConfig()
    tok = train_toy_tokenizer(["".join(template.render(e)) for e in world.corpus_examples()],
                              1024)
    user = build_user_data(world.task("sentiment", "train"), world.attack_pool(), 0.1,
                           40 * batch_size, "replace", seed=0)
    prompts = [template.render_prompt(e) for e in world.eval_harmful()[:64]]
    return Setup(tok, TokenizedDataset(user, tok, template, 96),
                 TokenizedDataset(world.alignment_data(), tok, template, 96), prompts)


def fit_seconds(module: L.LightningModule, loader: DataLoader, steps: int) -> float:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        gradient_clip_val=1.0 if module.automatic_optimization else None)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - t0


def step_seconds(make: Callable[[int], L.LightningModule], loader: DataLoader, warmup: int,
                 steps: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        short = fit_seconds(make(warmup), loader, warmup)
        long = fit_seconds(make(warmup + steps), loader, warmup + steps)
        samples.append((long - short) / steps)
    return statistics.median(samples)


def bench_steps(setup: Setup, overrides: dict, batch_size: int, warmup: int, steps: int,
                repeats: int) -> list[dict]:
    model_cfg = ModelConfig(config_overrides=overrides)
    base = build_tiny(model_cfg, setup.tokenizer, seed=0)
    aligned = copy.deepcopy(base)
    with torch.no_grad():  # an "aligned" model that differs from base, for AsFT's V
        for p in aligned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    collate = PadCollator(setup.tokenizer.pad_token_id)
    loader = DataLoader(setup.user, batch_size=batch_size, shuffle=False, collate_fn=collate)
    context = StageContext(tokenizer=setup.tokenizer, collate=collate,
                           alignment_data=setup.alignment,
                           load_model=lambda name: copy.deepcopy(base if name == "base"
                                                                 else aligned))
    full = TrainStageConfig(lr=1e-4, batch_size=batch_size)
    lora = TrainStageConfig(lr=1e-4, batch_size=batch_size, lora=LoraConfig(r=8, alpha=16))

    def module(cls, cfg, params=None):
        def make(total: int):
            model = copy.deepcopy(aligned)
            if cfg.lora is not None:
                model = apply_lora(model, cfg.lora, model_cfg)
            return cls(model=model, train_cfg=cfg, total_steps=total,
                       params=params or cls.Params(), context=context)
        return make

    runs = {
        "sft (full)": module(SFT, full), "vaccine": module(Vaccine, full),
        "sft (LoRA)": module(SFT, lora),
        "lisa": module(Lisa, lora, Lisa.Params(align_steps=5, finetune_steps=5)),
        "asft": module(AsFT, lora),
    }
    seconds = {name: step_seconds(make, loader, warmup, steps, repeats)
               for name, make in runs.items()}
    reference = {"vaccine": "sft (full)", "lisa": "sft (LoRA)", "asft": "sft (LoRA)"}
    rows = []
    for name, ref in reference.items():
        ratio = seconds[name] / seconds[ref]
        rows.append({"what": f"{name} step / {ref} step", "ratio": ratio,
                     "target": f"<= {TARGETS[name]}", "ok": ratio <= TARGETS[name],
                     "ms": 1000 * seconds[name], "ref_ms": 1000 * seconds[ref]})
    return rows


def bench_generation(setup: Setup, overrides: dict, repeats: int) -> dict:
    model = build_tiny(ModelConfig(config_overrides=overrides), setup.tokenizer, seed=0)
    model.eval()
    prompts, new = setup.prompts[:32], 16

    def timed(fn):
        out, times = None, []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return out, statistics.median(times)

    generate(model, setup.tokenizer, prompts[:4], new, batch_size=4)  # warm-up
    batched, t_batched = timed(lambda: generate(model, setup.tokenizer, prompts, new, 32))
    single, t_single = timed(lambda: [generate(model, setup.tokenizer, [p], new, 1)[0]
                                      for p in prompts])
    tokens = len(prompts) * new
    return {"what": "batched greedy generation (batch 32) / one prompt at a time, tokens/s",
            "ratio": t_single / t_batched, "target": ">= 10", "ok": t_single / t_batched >= 10,
            "identical_outputs": batched == single,
            "batched_tok_s": tokens / t_batched, "single_tok_s": tokens / t_single}


def to_markdown(results: dict) -> str:
    lines = ["# Bench", "", f"Measured side by side in one process ({results['provenance']}).",
             "Ratios are medians over repeats; step times exclude Lightning's per-fit cost.", ""]
    for size, rows in results["sizes"].items():
        lines += [f"## {size}", "", "| what | ratio | target | met | detail |", "|---|---|---|---|---|"]
        for r in rows:
            detail = (f"{r['ms']:.1f} ms vs {r['ref_ms']:.1f} ms" if "ms" in r else
                      f"{r['batched_tok_s']:.0f} vs {r['single_tok_s']:.0f} tok/s, "
                      f"identical outputs: {r['identical_outputs']}")
            lines.append(f"| {r['what']} | {r['ratio']:.2f} | {r['target']} | "
                         f"{'yes' if r['ok'] else 'NO'} | {detail} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    setup = make_setup(args.batch_size)
    results = {"provenance": provenance(), "args": vars(args) | {"out": str(args.out)},
               "sizes": {}}
    for size, overrides in SIZES.items():
        print(f"benchmarking {size} ...", flush=True)
        rows = bench_steps(setup, overrides, args.batch_size, args.warmup, args.steps,
                           args.repeats)
        rows.append(bench_generation(setup, overrides, args.repeats))
        results["sizes"][size] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", results)
    text = to_markdown(results)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
