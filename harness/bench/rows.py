"""The bench's rows 1-5, its Markdown report, and the command line."""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from harness.artifacts import provenance, write_json_atomic
from harness.evaluation.generate import generate
from harness.bench.format import _fmt, _ratio
from harness.bench.setup import (CONF, FINETUNE_STEPS, METHOD_NOTES, METHOD_ROWS,
                                  POSTHOC_METHODS, SIZES, SWEEP_DEFENSES, SWEEP_PS, TARGETS,
                                  MethodRow, Setup, Workload, make_setup, make_workload)
from harness.bench.timing import (engine_profiles, finetune_stage, lightning_fit, method_module,
                                   op_profile, peak_rss_mib, posthoc_stage, time_bare, time_hf,
                                   time_lightning)
# ==================================================================== rows 1, 2, 5
def bench_training(wl: Workload, warmup: int, steps: int, repeats: int, overhead_repeats: int,
                   methods: list[MethodRow]) -> tuple[list[dict], dict]:
    sft = "harness.defenses.sft.SFT"
    variants: dict[str, Callable[[], float]] = {
        "harness": lambda: time_lightning(wl, sft, False, {}, warmup, steps),
        "bare": lambda: time_bare(wl, warmup, steps),
        "hf": lambda: time_hf(wl, warmup, steps),
        "sft (LoRA)": lambda: time_lightning(wl, sft, True, {}, warmup, steps),
    }
    for m in methods:
        window = m.cycle * math.ceil(steps / m.cycle)
        variants[m.name] = (lambda m=m, window=window:
                            time_lightning(wl, m.module, m.lora, m.params, warmup, window))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    overhead = ("harness", "bare", "hf")
    for r in range(max(repeats, overhead_repeats)):
        # Interleaved, each round in a rotated order, so no variant always follows the same one.
        names = [n for n in variants if r < repeats or (n in overhead and r < overhead_repeats)]
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(variants[name]())
    sec = {k: statistics.median(v) for k, v in samples.items()}
    label = wl.size.label
    rows = [throughput_row(wl, "harness SFT step (full weights)", samples["harness"], False),
            throughput_row(wl, "harness SFT step (LoRA)", samples["sft (LoRA)"], True)]
    for ref, what in (("bare", "bare PyTorch loop"), ("hf", "HF transformers.Trainer")):
        rows.append(ratio_row(1, "harness overhead", label,
                              f"harness SFT step / {what} step (full weights)",
                              TARGETS[ref], samples["harness"], samples[ref]))
    for m in methods:
        ref = "harness" if not m.lora else "sft (LoRA)"
        rows.append(ratio_row(2, "defense step cost", label,
                              f"{m.name} step / SFT step ({'LoRA' if m.lora else 'full'})",
                              m.target, samples[m.name], samples[ref]))
        for other in m.versus:  # a variant against the method it varies (T-Vaccine, Vaccine)
            rows.append(ratio_row(2, "defense step cost", label,
                                  f"{m.name} step / {other} step "
                                  f"({'LoRA' if m.lora else 'full'})",
                                  None, samples[m.name], samples[other]))
    return rows, sec


def throughput_row(wl: Workload, what: str, s: list[float], lora: bool) -> dict:
    """Supervised-and-context tokens a second: the non-pad tokens of the timed batches (every
    fit sees the same batches in order) over the median step."""
    loader = iter(wl.loader(lora))
    tokens = statistics.mean(int(next(loader)["attention_mask"].sum()) for _ in range(4))
    t = statistics.median(s)
    return {"row": 1, "group": "throughput", "size": wl.size.label, "what": f"{what}, tokens/s",
            "value": tokens / t, "unit": "tok/s", "target": None, "met": None,
            "detail": f"{1000 * t:.1f} ms/step (median), batch {wl.size.batch_size}, "
                      f"{tokens:.0f} non-pad tokens a batch"}


def ratio_row(row: int, group: str, size: str, what: str, target: Optional[float],
              s: list[float], s_ref: list[float], per: str = "ms/step") -> dict:
    """The median of per-repeat ratios: the two runs of a pair ran back to back, under the
    same background load, so their ratio is steadier than a ratio of medians."""
    ratio = statistics.median(a / b for a, b in zip(s, s_ref))
    t, t_ref = statistics.median(s), statistics.median(s_ref)
    return {"row": row, "group": group, "size": size, "what": what, "value": ratio,
            "unit": "x", "target": None if target is None else f"<= {target}",
            "met": None if target is None else ratio <= target,
            "detail": f"{1000 * t:.1f} vs {1000 * t_ref:.1f} {per} (medians); "
                      f"per-repeat ratios {_ratio(min(a / b for a, b in zip(s, s_ref)))}"
                      f"-{_ratio(max(a / b for a, b in zip(s, s_ref)))}",
            "ms": 1000 * t, "ref_ms": 1000 * t_ref,
            "samples_ms": [1000 * x for x in s], "ref_samples_ms": [1000 * x for x in s_ref]}


def bench_memory(wl: Workload, methods: list[MethodRow], steps: int) -> list[dict]:
    """Peak RSS of a short fit of each training stage, model copy and optimizer included."""
    stages = [("SFT (full)", "harness.defenses.sft.SFT", False, {}),
              ("SFT (LoRA)", "harness.defenses.sft.SFT", True, {})]
    stages += [(m.name, m.module, m.lora, m.params) for m in methods]
    rows = []
    for name, module, lora, params in stages:
        def fit(module=module, lora=lora, params=params):
            stage = method_module(wl, module, lora, params, steps)
            lightning_fit(stage, wl.loader(lora), wl.stage_cfg(lora), [])
        mib = peak_rss_mib(fit)
        rows.append({"row": 5, "group": "peak memory", "size": wl.size.label,
                     "what": f"{name} stage, peak RSS above start "
                             f"({'LoRA' if lora else 'full weights'})",
                     "value": mib, "unit": "MiB", "target": None, "met": None,
                     "detail": f"{steps} steps, batch {wl.size.batch_size}"
                     if mib is not None else "no /proc: not measured"})
    return rows


# ==================================================================== row 6
def bench_posthoc(wl: Workload, repeats: int, steps: int,
                  methods: list[str] = POSTHOC_METHODS) -> list[dict]:
    """Each post-hoc stage's wall time against the finetune stage it edits: every repeat
    finetunes once, then runs every method on a copy of that adapter."""
    from omegaconf import OmegaConf

    confs = {m: OmegaConf.to_container(OmegaConf.load(CONF / "posthoc" / f"{m}.yaml"))
             for m in methods}
    samples: dict[str, list[float]] = {k: [] for k in ["finetune", *methods]}
    stats: dict[str, dict] = {}
    for r in range(repeats):
        seconds, finetuned = finetune_stage(wl, steps)
        samples["finetune"].append(seconds)
        for m in methods[r % len(methods):] + methods[:r % len(methods)]:
            seconds, stats[m] = posthoc_stage(wl, finetuned, confs[m]["module"],
                                              confs[m]["params"])
            samples[m].append(seconds)
    rows = []
    for m in methods:
        row = ratio_row(6, "post-hoc stage", wl.size.label,
                        f"posthoc={m} stage wall time / finetune stage wall time "
                        f"({steps} LoRA steps)", None, samples[m], samples["finetune"], "ms")
        s = stats[m]
        row["detail"] += (f"; projected {s['n_projected']} of {s['n_modules']} LoRA modules"
                          if "n_projected" in s else
                          f"; {s['calibration_rows']} calibration rows, pruned "
                          f"{s['weights_pruned']} of {s['adapter_weights']} adapter weights")
        row["params"] = confs[m]["params"]
        rows.append(row)
    return rows


# ==================================================================== row 3
def _answer_tokens(tokenizer, answers: list[list[str]]) -> int:
    return sum(len(tokenizer(a[0], add_special_tokens=False)["input_ids"]) for a in answers)


def bench_generation(setup: Setup, wl: Workload, repeats: int, new_tokens: int) -> list[dict]:
    model, tok, prompts = copy.deepcopy(wl.aligned).eval(), wl.tokenizer, wl.prompts
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
    return [{"row": 3, "group": "evaluation", "size": wl.size.label,
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
    """Stage runs of a defense x p sweep with artifact reuse, from ``keys.stage_keys`` (nothing
    is built), against the naive count that reruns every stage at every sweep point."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.config import register

    from harness.validation import validate
    from harness.data.assemble import RunInputs
    from harness.keys import stage_keys

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
                keys = stage_keys(RunInputs(run))
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
def to_markdown(results: dict) -> str:
    prov = results["provenance"]
    a = results["args"]
    lines = [
        "# Bench", "",
        f"`make bench` on CPU ({results['cpu_threads']} torch threads), "
        f"torch {prov.get('torch')}, transformers {prov.get('transformers')}, "
        f"lightning {prov.get('lightning')}, git {prov.get('git')}; "
        f"tiny: {a['repeats']} repeats x {a['steps']} timed steps (row 1: "
        f"{max(a['repeats'], a['overhead_repeats'])} repeats), larger and smollm2: {a['larger_repeats']} x "
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
              "runs the Trainer of `training.build_trainer` (default `trainer` group, checkpoint "
              "callback, `log_every_n_steps=10`) without the W&B logger and progress bar, as "
              "sweeps run it; HF `Trainer` with `logging_steps=10`, no saving, no reporting.",
              "- Row 2: each method against the SFT step with the same trainable weights: full "
              "weights on alignment batches (align methods), LoRA r=8 on user batches "
              "(finetune methods).",
              "- Row 3: the harness's `generate` at batch 32 against 32 calls at batch 1, on the "
              "same 32 toy harmful prompts, greedy; tokens are the answers' tokens. The prefill "
              "share is a batched run with `max_new_tokens=1` over the full batched run.",
              "- Row 4: stage runs counted from `keys.stage_keys` of each composed sweep "
              "config (nothing built). A stage runs once per distinct key: tokenizer, base, "
              "align, finetune, and one evaluation per distinct (evaluated stage, model) for "
              "`eval.stages` of the toy protocol (base, align, final). Naive: every sweep point "
              "runs every stage it has again (no align stage for `none`).",
              "- Row 5: peak resident set size (Linux VmHWM, reset before each stage, freed heap "
              "returned first) above the RSS at the stage's start, over a short fit that "
              "includes the stage's model copy, LoRA wrapping, gradients, optimizer state and "
              "the method's own extra state. CPU RSS, not a torch allocator figure.",
              "- Row 6: one finetune stage (model copy, LoRA r=8, the pipeline's fit of "
              f"{a.get('finetune_steps', FINETUNE_STEPS)} SFT steps on user batches; the toy "
              "protocol's finetune is 96 steps) against each post-hoc stage on a copy of that "
              "adapter (`apply` at its `conf/posthoc/` params, its own base/aligned model "
              "loads and calibration pass, the adapter's save), "
              f"{a.get('posthoc_repeats', 3)} repeats, the methods in rotating order."]
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
    parser = argparse.ArgumentParser(prog="python -m harness.bench",
                                     description=sys.modules["harness.bench"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="repeats on the tiny model")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per fit, tiny")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per fit")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES),
                        help="smollm2 needs `make setup`'s wheels; without them it is skipped")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"),
                        help="where the real model's converted GGUF is kept (a run's paths.artifacts)")
    parser.add_argument("--overhead-repeats", type=int, default=9,
                        help="extra rounds of row 1 alone on the tiny model (it is cheap)")
    parser.add_argument("--larger-repeats", type=int, default=3)
    parser.add_argument("--larger-overhead-repeats", type=int, default=4)
    parser.add_argument("--larger-gen-repeats", type=int, default=2,
                        help="one-at-a-time generation on the larger model is ~20 s a repeat")
    parser.add_argument("--larger-steps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS,
                        help="row 6: LoRA steps of the finetune stage the post-hoc stage edits")
    parser.add_argument("--posthoc-repeats", type=int, default=3, help="row 6, every size")
    # One thread: on a shared 2-core machine two OpenMP threads contend with the other
    # processes and a step's time swings 3-30x from one fit to the next (measured), which
    # measures the scheduler, not the engines.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    from harness.bench.gpu import add_arguments, run_gpu_bench

    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.device is not None:
        return run_gpu_bench(args)
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
        reason = size.unavailable()
        if reason:
            print(f"skipping {size.label}: {reason}", flush=True)
            continue
        steps = args.steps if name == "tiny" else args.larger_steps
        repeats = args.repeats if name == "tiny" else args.larger_repeats
        overhead = args.overhead_repeats if name == "tiny" else args.larger_overhead_repeats
        print(f"benchmarking {size.label}: {steps} timed steps x {repeats} repeats ...",
              flush=True)
        longest = max(args.warmup + max([m.cycle * math.ceil(steps / m.cycle)
                                         for m in METHOD_ROWS] + [steps]) + 1,
                      args.finetune_steps)
        wl = phase(f"{name}: load", lambda: make_workload(
            setup, size, max(longest, args.memory_steps), args.artifacts))
        train_rows, sec = phase(f"{name}: steps", lambda: bench_training(
            wl, args.warmup, steps, repeats, overhead, METHOD_ROWS))
        rows += train_rows
        seconds[size.label] = sec
        for m in METHOD_ROWS:
            if any(r["row"] == 2 and r["met"] is False and r["what"].startswith(f"{m.name} ")
                   for r in train_rows):
                op_profiles[f"{m.name}, {size.label}"] = phase(
                    f"{name}: {m.name} ops", lambda m=m: op_profile(wl, m))
        if any(r["row"] == 1 and r["met"] is False for r in train_rows):
            profiles[size.label] = phase(f"{name}: profile",
                                         lambda: engine_profiles(wl, args.warmup, steps))
        rows += phase(f"{name}: generation",
                      lambda: bench_generation(setup, wl, repeats if name == "tiny"
                                               else args.larger_gen_repeats, args.new_tokens))
        rows += phase(f"{name}: memory",
                      lambda: bench_memory(wl, METHOD_ROWS, args.memory_steps))
        rows += phase(f"{name}: post-hoc", lambda: bench_posthoc(
            wl, args.posthoc_repeats, args.finetune_steps))
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
