"""AsFT's narrow safety basin, measured (METHODS.md section 9): HS and FA of the aligned model
under random perturbations of every adapted weight W, drawn inside the column space of its
alignment direction V = W_aligned - W_base (``along``) or orthogonal to it (``orthogonal``), of
norm eps * ||W||_F, over a grid of eps and a few draws each.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m harness.basin --out DIR \\
        [--eps 0,0.01,0.02,0.05,0.1,0.2] [--directions along,orthogonal] [--draws 3] \\
        [--draw-seed 0] [hydra override ...]

The base and align stages are built or reused from the artifact store (``paths.artifacts``);
evaluation is the harness's own (generation, the run's judge, the task's scorer) on the run's
evaluation sample (``eval.harmful_size``, ``eval.task_size``). Writes DIR/results.json and
DIR/basin.png.

V comes from the align stage's LoRA factors when that stage trained one on the base (exact,
of rank <= r_align, as AsFT and SafeLoRA read it); the adapted weights are then that adapter's.
Otherwise V is the difference of the merged weights, which must be float32 (a low-precision
difference carries rounding noise of full rank), over the weights the finetune's LoRA targets.
A V whose columns span W's whole output space (a full-weight alignment of a square layer)
leaves no orthogonal direction: align with a LoRA (``train.align.lora=${train.finetune.lora}``).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import to_absolute_path

from harness.analysis.basin import DIRECTIONS, along_share, basin_delta
from harness.artifacts import git_hash, provenance, write_json_atomic
from harness.config import register
from harness.config.schema import LoraConfig
from harness.data import attacks
from harness.defenses.math import column_basis, factored_column_basis
from harness.evaluation.evaluate import model_outputs, score
from harness.evaluation.judges import AfterOpening
from harness.evaluation.registry import build_judge
from harness.models.loading import adapter_factors, apply_lora
from harness.posthoc.base import lora_layers
from harness.reproducibility import pin_threads
from harness.stats import prompt_interval, seed_interval
from harness.validation import validate

log = logging.getLogger("harness")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SCHEMA_VERSION = 1
DEFAULT_EPS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m harness.basin", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for results.json and basin.png")
    parser.add_argument("--eps", type=_floats, default=DEFAULT_EPS,
                        help="||delta||_F / ||W||_F, comma-separated (default %(default)s)")
    parser.add_argument("--directions", type=_directions, default=DIRECTIONS,
                        help="along, orthogonal or both, comma-separated")
    parser.add_argument("--draws", type=int, default=3, help="random deltas per (direction, eps)")
    parser.add_argument("--draw-seed", type=int, default=0,
                        help="seeds the deltas' Gaussians (the run's seed= keys the stages)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the harness config")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws: must be >= 1, got {args.draws}")
    if any(e < 0 for e in args.eps):
        parser.error(f"--eps: relative norms, must be >= 0, got {args.eps}")
    return args


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _directions(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in DIRECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"got {text!r}, allowed: {', '.join(DIRECTIONS)}")
    return names


def compose_run(overrides: Sequence[str]):
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", "trainer.enable_progress_bar=false",
                                           *overrides])
    run = validate(cfg)
    if run.eval.jailbreak == "gcg":
        raise ValueError("eval.jailbreak=gcg searches a suffix per evaluated model; the basin "
                         "measures plain HS and FA: leave eval.jailbreak at none")
    run.paths.artifacts = to_absolute_path(run.paths.artifacts)
    return run


def alignment_bases(pipe, refs, model) -> tuple[str, dict[str, torch.Tensor]]:
    """(where V comes from, {adapted weight: orthonormal basis of V's column space})."""
    if refs["align"] == refs["base"]:
        raise ValueError("the basin is measured around an aligned model, and this run has no "
                         "align stage (defense.align.module is null): V is undefined")
    folder = pipe.models.align_adapter(refs["align"], refs["base"])
    if folder is not None:
        return "align_adapter", {name: factored_column_basis(V_B, V_A)
                                 for name, (V_B, V_A) in sorted(adapter_factors(folder).items())}
    # a full-weight or pretrained alignment: the float32 difference of the merged weights,
    # over the modules the finetune's LoRA adapts (AsFT's adapted weights)
    run = pipe.run
    lora = run.train.finetune.lora or LoraConfig()  # a full finetune: the model's LoRA targets
    adapted = lora_layers(apply_lora(pipe.models.load(refs["base"]), lora, run.model))
    bases = {}
    for name, layer, _ in sorted(adapted, key=lambda t: t[0]):
        W_base, W_aligned = layer.get_base_layer().weight, model.get_submodule(name).weight
        if W_base.dtype != torch.float32 or W_aligned.dtype != torch.float32:
            raise ValueError(
                f"the align stage trained no LoRA on the base, so V = W_aligned - W_base comes "
                f"from merged weights, which are {W_aligned.dtype} here ({name}): a difference "
                "below float32 carries rounding noise of full rank. Use model.dtype=float32, "
                "or align with a LoRA (train.align.lora=${train.finetune.lora})")
        bases[name] = column_basis(W_aligned.detach().cpu() - W_base.detach().cpu())
    return "weights", bases


def check_directions(bases: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                     directions: Sequence[str]) -> None:
    """Fail before any evaluation where a requested direction does not exist for a weight."""
    if "along" in directions:
        zero = [n for n, Q in bases.items() if Q.shape[1] == 0]
        if zero:
            raise ValueError(f"V = 0 in {len(zero)} adapted weights ({zero[0]}, ...): the "
                             "align stage did not change them, so there is no along direction")
    full = [n for n, Q in bases.items() if Q.shape[1] >= weights[n].shape[0]]
    if full and "along" in directions:  # P_V = I there: along is any direction at all
        log.warning("[basin] V has full row rank in %d of %d adapted weights (%s): there "
                    "the along perturbation is isotropic", len(full), len(bases), full[0])
    if "orthogonal" in directions:
        if full:
            raise ValueError(
                f"V's columns span the whole output space in {len(full)} of {len(bases)} "
                f"adapted weights ({full[0]}: rank {bases[full[0]].shape[1]} of "
                f"{weights[full[0]].shape[0]}), so no direction is orthogonal to it. A "
                "full-weight alignment does this; align with a LoRA "
                "(train.align.lora=${train.finetune.lora}), or ask for --directions along")


def draw_generator(draw_seed: int, draw: int) -> torch.Generator:
    """One generator per (seed, draw): every eps and both directions of a draw split and scale
    the same Gaussians, so the curves differ by eps and direction alone."""
    seed = int(np.random.SeedSequence([draw_seed, draw]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def draw_deltas(weights: dict[str, torch.Tensor], bases: dict[str, torch.Tensor],
                direction: str, eps: float, draw_seed: int, draw: int
                ) -> dict[str, torch.Tensor]:
    """Every adapted weight's delta for one (direction, eps, draw), in name order."""
    generator = draw_generator(draw_seed, draw)
    return {name: basin_delta(weights[name], bases[name], direction, eps, generator)
            for name in sorted(bases)}


def evaluate(pipe, model, judge, openings) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """(metrics, {"harmful": answers, "task": answers}) of an in-memory model, by the
    evaluation stage's own generation and scoring on the run's evaluation sample (the cached
    stage evaluates stored models only)."""
    r, data = pipe.run, pipe.inputs.data
    harmful, task = data.eval_harmful, data.task_test
    h_records, t_records = model_outputs(model, pipe.models.tokenizer, r.template, harmful,
                                         task, r.eval, r.task, openings, r.seed)
    metrics, _ = score(harmful, h_records, task, t_records, judge, r.eval, r.task)
    return metrics, {"harmful": [x["answer"] for x in h_records],
                     "task": [x["answer"] for x in t_records]}


def changed(answers: dict[str, list[str]], reference: dict[str, list[str]]) -> dict[str, int]:
    """How many answers differ from the unperturbed model's, per prompt kind: how far a
    perturbation moved the generations, whether or not it moved the rates."""
    return {kind: sum(a != b for a, b in zip(answers[kind], reference[kind]))
            for kind in reference}


def build_judge_for(run):
    """The run's judge as the evaluation stage builds it: after the attack's answer opening."""
    judge = build_judge(run)
    opening = attacks.get(run.attack.name).eval_opening(run.attack)
    return AfterOpening(judge, opening) if opening else judge


# the rates a row reports, each with its Wilson interval, and the count it is a share of
RATES = (("hs", "n_harmful"), ("refusal_rate", "n_harmful"), ("other_rate", "n_harmful"),
         ("fa", "n_task"))


def row_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """HS, the judge's refusal and other (fragment) rates, and FA, in percent, each with its
    Wilson prompt interval."""
    row = {"n_harmful": metrics["n_harmful"], "n_task": metrics["n_task"]}
    for rate, n_key in RATES:
        n = metrics[n_key]
        row[rate] = metrics[rate]
        row[f"{rate}_interval"] = (list(prompt_interval(round(metrics[rate] * n / 100), n))
                                   if n else None)
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (direction, eps) and rate: the mean over draws, their range, the Student-t
    half-width over draws (as the harness aggregates seeds), and the rate pooled over draws
    with its Wilson interval (prompts x draws as trials: it leaves out the spread between
    draws, and at eps = 0, where every draw is the same model, it counts each prompt once per
    draw)."""
    out = []
    for direction in dict.fromkeys(r["direction"] for r in rows):
        for eps in dict.fromkeys(r["eps"] for r in rows):
            cell = [r for r in rows if r["direction"] == direction and r["eps"] == eps]
            if not cell:
                continue
            entry: dict[str, Any] = {"direction": direction, "eps": eps, "draws": len(cell)}
            for rate, n_key in RATES:
                values = [r[rate] for r in cell]
                hits = sum(round(r[rate] * r[n_key] / 100) for r in cell)
                trials = sum(r[n_key] for r in cell)
                entry[rate], entry[f"{rate}_draw_halfwidth"] = seed_interval(values)
                entry[f"{rate}_range"] = [min(values), max(values)]
                entry[f"{rate}_pooled_interval"] = (list(prompt_interval(hits, trials))
                                                    if trials else None)
            out.append(entry)
    return out


def paired_differences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per eps where both directions ran: HS along minus HS orthogonal for each draw (one
    Gaussian split two ways, scored on the same prompts), their mean with the Student-t
    half-width over draws, and how many draws each direction is the higher in."""
    hs = {(r["direction"], r["eps"], r["draw"]): r["hs"] for r in rows}
    out = []
    for eps in dict.fromkeys(r["eps"] for r in rows):
        draws = sorted({d for (_, e, d) in hs if e == eps})
        diffs = [hs["along", eps, d] - hs["orthogonal", eps, d] for d in draws
                 if ("along", eps, d) in hs and ("orthogonal", eps, d) in hs]
        if not diffs:
            continue
        mean, half = seed_interval(diffs)
        out.append({"eps": eps, "hs_differences": diffs, "hs_difference": mean,
                    "hs_difference_halfwidth": half, "along_higher": sum(d > 0 for d in diffs),
                    "orthogonal_higher": sum(d < 0 for d in diffs)})
    return out


def plot(results: dict[str, Any], path: Path) -> Path:
    """HS, the judge's other (fragment) rate and FA against eps, one colour per direction: each
    draw with its Wilson interval, the mean over draws as a line; the aligned and base models
    as reference lines. eps on a symmetric log scale (eps = 0 included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("hs", "HS (%)"), ("other_rate", "other: fragments (%)"), ("fa", "FA (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.9))
    positive = [e for e in results["eps"] if e > 0]
    for ax, (rate, label) in zip(axes, panels):
        for i, direction in enumerate(results["directions"]):
            cells = [c for c in results["summary"] if c["direction"] == direction]
            line, = ax.plot([c["eps"] for c in cells], [c[rate] for c in cells],
                            marker="os"[i % 2], ms=4, label=f"{direction} (mean of draws)")
            for r in (r for r in results["rows"] if r["direction"] == direction):
                lo, hi = r[f"{rate}_interval"] or (r[rate], r[rate])
                ax.errorbar(r["eps"], r[rate], yerr=[[r[rate] - lo], [hi - r[rate]]], fmt=".",
                            ms=3, alpha=0.35, color=line.get_color(), elinewidth=0.8)
        for stage, style in (("aligned", "--"), ("base", ":")):
            ax.axhline(results[stage][rate], ls=style, color="grey", lw=1,
                       label=f"{stage} model")
        if positive:
            ax.set_xscale("symlog", linthresh=min(positive))
            ax.set_xlim(-0.3 * min(positive), 1.4 * max(positive))
        ax.set_xlabel("eps = ||delta||_F / ||W||_F")
        ax.set_ylabel(label)
        ax.set_ylim(-2, 102)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("The aligned model with every adapted weight perturbed inside the column space "
                 "of V = W_aligned - W_base (along) or orthogonal to it; dots: draws with their "
                 "Wilson 95% intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def measure(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    from harness.pipeline import Pipeline

    run = compose_run(args.overrides)
    pin_threads(run.torch_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(run, args.out)
    pipe.prepare()
    refs = pipe.build_aligned()
    model = pipe.models.eval_model(refs["align"])
    source, bases = alignment_bases(pipe, refs, model)
    params = {name: model.get_submodule(name).weight for name in bases}
    aligned = {name: W.detach().clone() for name, W in params.items()}
    check_directions(bases, aligned, args.directions)
    # the harness's own evaluation stage (cached) of the unperturbed models: eps = 0 must
    # reproduce the aligned one exactly
    stages = {"aligned": row_metrics(pipe.evaluator.evaluate("align", refs["align"])),
              "base": row_metrics(pipe.evaluator.evaluate("base", refs["base"]))}
    judge = build_judge_for(run)
    openings = judge.openings()
    t0 = time.perf_counter()
    # the unperturbed model through this path: it must agree with the stage's evaluation
    unperturbed, reference = evaluate(pipe, model, judge, openings)
    rows = []
    with torch.no_grad():
        for direction in args.directions:
            for draw in range(args.draws):
                for eps in args.eps:
                    deltas = draw_deltas(aligned, bases, direction, eps, args.draw_seed, draw)
                    for name, W in params.items():
                        W.copy_(aligned[name] + deltas[name].to(W.device))
                    metrics, answers = evaluate(pipe, model, judge, openings)
                    row = {"direction": direction, "eps": eps, "draw": draw,
                           **applied_checks(params, aligned, bases, eps),
                           **row_metrics(metrics),
                           "answers_changed": changed(answers, reference)}
                    rows.append(row)
                    print(f"[basin] {direction:10s} eps={eps:<6g} draw={draw} "
                          f"HS {row['hs']:5.1f} {_interval(row['hs_interval'])}  "
                          f"FA {row['fa']:5.1f} {_interval(row['fa_interval'])}", flush=True)
        for name, W in params.items():
            W.copy_(aligned[name])
    data, built_by = pipe.inputs.data, provenance()
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "python -m harness.basin " + " ".join(shlex.quote(a) for a in argv),
        "git": git_hash(), "cpu": built_by["cpu_model"],
        "cpu_capability": built_by["cpu_capability"],
        "torch_threads": torch.get_num_threads(), "precision": run.trainer.precision,
        "model_dtype": run.model.dtype, "provenance": built_by,
        "overrides": list(args.overrides), "eps": list(args.eps),
        "directions": list(args.directions), "draws": args.draws, "draw_seed": args.draw_seed,
        "eval": {"harmful_size": run.eval.harmful_size, "task_size": run.eval.task_size,
                 "sample_seed": run.eval.sample_seed, "n_harmful": len(data.eval_harmful),
                 "n_task": len(data.task_test), "judge": run.judge.name, "task": run.task.name,
                 "max_new_tokens": run.eval.max_new_tokens},
        "artifacts": {stage: {"key": ref.key, "reused": pipe.record.artifacts[stage]["reused"]}
                      for stage, ref in refs.items()},
        "v_source": source,
        "weights": {name: {"shape": list(aligned[name].shape), "v_rank": int(Q.shape[1]),
                           "norm": float(torch.linalg.matrix_norm(aligned[name]))}
                    for name, Q in bases.items()},
        **stages, "unperturbed": row_metrics(unperturbed),
        "rows": rows, "summary": summarise(rows), "paired": paired_differences(rows),
        "seconds": round(time.perf_counter() - t0, 1)}


def applied_checks(params, aligned, bases, eps: float) -> dict[str, Any]:
    """The deltas as applied (read back from the model): the largest relative error of
    ||delta||_F against eps * ||W||_F, and the range over weights of the share of ||delta||^2
    inside V's column space (1 along, 0 orthogonal; None at eps = 0, where there is no delta)."""
    errors, shares = [], []
    for name, W in params.items():
        applied = (W.detach() - aligned[name]).double()
        target = eps * float(torch.linalg.matrix_norm(aligned[name].double()))
        norm = float(torch.linalg.matrix_norm(applied))
        errors.append(abs(norm - target) / target if target > 0 else norm)
        shares.append(along_share(applied, bases[name]))
    return {"norm_error": max(errors),
            "along_share": [min(shares), max(shares)] if eps > 0 else None}


def _interval(ci: Optional[list[float]]) -> str:
    return f"[{ci[0]:5.1f}, {ci[1]:5.1f}]" if ci else "[  -  ]"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # the stages' progress and reuse lines, as a harness run prints them
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = measure(args, argv)
    write_json_atomic(args.out / "results.json", results)
    plot(results, args.out / "basin.png")
    print(f"[basin] {len(results['rows'])} evaluations in {results['seconds']} s; "
          f"results: {args.out / 'results.json'}", flush=True)
    return results


if __name__ == "__main__":
    main()
