"""Ref-Teacher's two diagnostic figures, from finished runs:

    python -m harness.diagnostics <run dir> [<run dir> ...] --out DIR [--only snr|cosines]
                                  [--stages base,align] [--artifacts STORE]

- ``snr_over_steps.png`` and ``snr_over_steps.csv``: the user gradient's SNR and its cosine
  with the alignment gradient every N finetune steps, one line per run, read from
  ``metrics.analysis.gradient_conflict_finetune`` in each ``results.json``. A run records it
  when its finetune ran with ``defense.finetune.gradient_conflict_every=N`` (25 for
  ``ref_teacher``, 0 for every other defense). The paper draws it for SFT on the aligned model.
- ``refusal_cosines.png`` and ``refusal_cosines.json``: every prompt's cos(f_l(x), R_l) in each
  run's base and aligned model (Ref-Teacher's aligned model is its teacher), over the
  held-out harmful prompts, the held-out harmless ones and the task's test prompts, as box
  plots. R_l is measured on each model's own held feature sets at ``eval.feature_layer``,
  as the evaluation's ``refusal_separation`` measures it; the JSON carries the recorded means
  beside the recomputed ones where the run evaluated that stage. The models are read from the
  artifact store the run wrote (``--artifacts`` where it has moved); a model two runs share
  is measured once.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import harness  # noqa: F401 - offline defaults before HF imports
from harness.analysis.refusal import num_layers, resolve_layer
from harness.analysis.separation import separation_cosines
from harness.artifacts import write_json_atomic
from harness.export import evaluated_model, read_results, run_config
from harness.reporting.diagnostics import plot_refusal_cosines, plot_snr_over_steps
from harness.reproducibility import pin_threads
from harness.stages import ModelRef

SNR_KEY = "gradient_conflict_finetune"
SNR_SWITCH = "defense.finetune.gradient_conflict_every"
SNR_FIELDS = ("run", "step", "grad_snr", "grad_cosine_user_alignment")
STAGES = ("base", "align", "final")
PROMPT_KINDS = {"harmful": "held-out harmful prompts (eval.harmful)",
                "harmless": "held-out harmless prompts (the separation's harmless set)",
                "task": "the task's test prompts (the user's downstream task)"}


class MissingSeries(ValueError):
    """A run lacks the gradient-conflict series the SNR figure reads."""


def run_label(results: dict[str, Any]) -> str:
    cfg = results["config"]
    return f"{cfg['defense']['name']} p={cfg['attack']['p']} seed={cfg['seed']}"


def gradient_conflict_series(results: dict[str, Any], source: str) -> list[dict[str, float]]:
    """The run's finetune gradient-conflict entries ({step, grad_cosine_user_alignment,
    grad_snr}), or an error naming the missing key and the override that records it."""
    series = results.get("metrics", {}).get("analysis", {}).get(SNR_KEY)
    if not series:
        raise MissingSeries(
            f"{source}: no metrics.analysis.{SNR_KEY} (its finetune ran with {SNR_SWITCH}="
            f"{results['config']['defense']['finetune'].get('gradient_conflict_every', 0)}); "
            f"rerun it with {SNR_SWITCH}=N to record the SNR every N steps. It does not change "
            "the trained weights, but it is part of the finetune's key, so that stage is built "
            "anew; or pass --only cosines")
    return series


def write_snr(runs: Sequence[tuple[str, dict[str, Any]]], out: Path) -> dict[str, list]:
    """snr_over_steps.csv and .png for ``runs`` ((source, results) pairs); the series by run."""
    series = {}
    for source, results in runs:
        label = run_label(results)
        if label in series:
            label = f"{label} ({source})"
        series[label] = gradient_conflict_series(results, source)
    with open(out / "snr_over_steps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SNR_FIELDS)
        writer.writeheader()
        for label, points in series.items():
            writer.writerows({"run": label, **{k: p[k] for k in SNR_FIELDS[1:]}}
                             for p in points)
    plot_snr_over_steps(series, out / "snr_over_steps.png")
    return series


def stage_model(results: dict[str, Any], stage: str) -> ModelRef:
    """The model of ``stage``: the one the run's evaluation of it read, else (base, align) the
    training stage's own artifact."""
    artifacts = results.get("artifacts", {})
    if f"eval_{stage}" in artifacts:
        return evaluated_model(results, stage)[0]
    if stage in ("base", "align") and stage in artifacts:
        return ModelRef(stage, artifacts[stage]["key"])
    raise ValueError(f"--stages {stage}: the run built no {stage} model it can be read from "
                     f"(artifacts: {sorted(artifacts)}); final needs eval.stages to hold it")


def model_label(results: dict[str, Any], stage: str) -> str:
    """base; align: the align method's class (SFT, RefTeacher: the teacher); final: the
    defense."""
    defense = results["config"]["defense"]
    if stage == "base":
        return "base"
    if stage == "align":
        return f"align: {str(defense['align']['module']).rpartition('.')[2]}"
    return f"final: {defense['name']}"


def summary(values: Sequence[float]) -> dict[str, float]:
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"n": len(values), "mean": float(t.mean()), "q05": q[0], "median": q[1],
            "q95": q[2]}


def measure_cosines(runs: Sequence[tuple[Path, dict[str, Any]]], stages: Sequence[str],
                    artifacts: Optional[Path] = None
                    ) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Each run's models at ``stages``, each model once: its per-prompt cosines by kind, their
    summaries, and the run's recorded ``refusal_separation`` of that stage (or None); and the
    rendered prompts of each kind, which every run shares, in the cosines' order."""
    from harness.pipeline import Pipeline

    models: dict[ModelRef, dict[str, Any]] = {}
    prompts_seen: Optional[dict[str, list[str]]] = None
    for run_dir, results in runs:
        root = artifacts or Path(results["artifacts"]["base"]["path"]).parents[1]
        run = run_config(results, root)
        pin_threads(run.torch_threads)  # the evaluation's own count: its float sums
        pipeline = Pipeline(run, run_dir)
        pipeline.inputs.load()
        inputs, tok = pipeline.inputs, pipeline.models.tokenizer
        prompts = {"harmful": inputs.render(inputs.data.eval_harmful),
                   "harmless": inputs.render(inputs.eval_harmless()),
                   "task": inputs.render(inputs.data.task_test)}
        if prompts_seen is not None and prompts != prompts_seen:
            raise ValueError(f"{run_dir}: its held-out prompts differ from the first run's (a "
                             "different world, task or eval set); one figure would compare "
                             "models on different prompts")
        prompts_seen = prompts
        held_harmful, held_harmless = (inputs.render(s) for s in inputs.feature_sets())
        for stage in stages:
            ref = stage_model(results, stage)
            recorded = results["metrics"].get(stage, {}).get("refusal_separation")
            if ref in models:
                models[ref]["recorded_refusal_separation"] = \
                    models[ref]["recorded_refusal_separation"] or recorded
                continue
            model = pipeline.models.eval_model(ref)
            layer = resolve_layer(run.eval.feature_layer, num_layers(model),
                                  "eval.feature_layer")
            _, cosines = separation_cosines(model, tok, held_harmful, held_harmless, prompts,
                                            layer, run.eval.batch_size)
            values = {kind: c.tolist() for kind, c in cosines.items()}
            models[ref] = {"label": model_label(results, stage), "stage": stage,
                           "run": str(run_dir), "model": {"stage": ref.stage, "key": ref.key},
                           "layer": layer, "summary": {k: summary(v) for k, v in values.items()},
                           "recorded_refusal_separation": recorded, "cosines": values}
    labels = [m["label"] for m in models.values()]
    for m in models.values():  # two models of one kind (two seeds' teachers): tell them apart
        if labels.count(m["label"]) > 1:
            m["label"] = f"{m['label']} [{m['model']['key'][:6]}]"
    return list(models.values()), prompts_seen or {}


def write_cosines(runs: Sequence[tuple[Path, dict[str, Any]]], stages: Sequence[str],
                  out: Path, artifacts: Optional[Path] = None) -> list[dict[str, Any]]:
    models, prompts = measure_cosines(runs, stages, artifacts)
    write_json_atomic(out / "refusal_cosines.json",
                      {"prompt_kinds": PROMPT_KINDS, "runs": [str(d) for d, _ in runs],
                       "models": models, "prompts": prompts})
    layers = sorted({m["layer"] for m in models})
    plot_refusal_cosines(models, out / "refusal_cosines.png",
                         f"R_l from each model's own held feature sets; hidden_states index "
                         f"{', '.join(map(str, layers))}")
    return models


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.diagnostics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished runs' folders")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write into")
    parser.add_argument("--only", choices=("snr", "cosines"), help="one figure alone")
    parser.add_argument("--stages", default="base,align",
                        help="the models of each run the cosine figure draws (default: "
                             "base,align; final needs eval.stages to hold it)")
    parser.add_argument("--artifacts", type=Path,
                        help="the artifact store, where it has moved since the runs")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    try:
        for s in stages:
            if s not in STAGES:
                raise ValueError(f"--stages {s}: expected one of {', '.join(STAGES)}")
        runs = [(d, read_results(d)) for d in args.run_dirs]
        args.out.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "snr"):
            write_snr([(str(d), r) for d, r in runs], args.out)
            print(f"wrote {args.out / 'snr_over_steps.png'} and snr_over_steps.csv")
        if args.only in (None, "cosines"):
            for m in write_cosines(runs, stages, args.out, args.artifacts):
                print(f"{m['label']}: " + "; ".join(
                    f"{k} mean {s['mean']:+.3f} (5-95% {s['q05']:+.3f}..{s['q95']:+.3f})"
                    for k, s in m["summary"].items()))
            print(f"wrote {args.out / 'refusal_cosines.png'} and refusal_cosines.json")
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"diagnostics failed: {err}") from None


if __name__ == "__main__":
    main()
