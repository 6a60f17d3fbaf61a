"""Evaluate one model: HS on harmful prompts, FA on the task test set, continuous measures.

Two steps, so that several processes can share the first: ``model_outputs`` is per example
(answers, samples, opening probabilities) and can run on any shard of the prompts; ``score``
turns the outputs of every prompt into metrics, once, where the judge lives.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from harness.data.jailbreaks import posed_prompt, request, template_rates
from harness.data.schema import Example
from harness.evaluation.generate import Generator, HFGenerator, opening_probability
from harness.evaluation.judges import Judge, KeywordJudge, harm_metrics
from harness.evaluation.scorers import accuracy, is_correct
from harness.stats import CONFIDENCE, outcome_digest, pack, prompt_interval


def model_outputs(model, tokenizer, template, harmful: Sequence[Example],
                  task_test: Sequence[Example], eval_cfg, task_cfg,
                  openings: Optional[tuple[Sequence[str], Sequence[str]]] = None,
                  seed: int = 0, generator: Optional[Generator] = None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one record per harmful prompt, one per task prompt), in input order."""
    gen = generator or HFGenerator(model, tokenizer)
    system = eval_cfg.system_prompt or None
    h_prompts = [posed_prompt(template, ex, system) for ex in harmful]  # eval.jailbreak
    h_records = [{"prompt": p, "answer": a[0]} for p, a in zip(
        h_prompts, gen.generate(h_prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size))]
    t_prompts = [template.render_prompt(ex) for ex in task_test]
    t_records = [{"prompt": p, "answer": a[0]} for p, a in zip(
        t_prompts, gen.generate(t_prompts, task_cfg.max_new_tokens, eval_cfg.batch_size))]
    if eval_cfg.samples > 0:
        sampled = gen.generate(h_prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size,
                               num_samples=eval_cfg.samples, temperature=eval_cfg.temperature,
                               seed=seed)
        for rec, ss in zip(h_records, sampled):
            rec["samples"] = ss
    if eval_cfg.opening_probability and openings is not None and h_prompts:
        probs = opening_probability(model, tokenizer, h_prompts, *openings,
                                    response_prefix=template.response_prefix)
        for rec, pr in zip(h_records, probs):
            rec["p_comply_opening"] = pr
    return h_records, t_records


def score(harmful: Sequence[Example], h_records: Sequence[dict], task_test: Sequence[Example],
          t_records: Sequence[dict], judge: Judge, eval_cfg, task_cfg
          ) -> tuple[dict, list[dict]]:
    """Return (metrics, logged generations). Percentages run from 0 to 100."""
    instructions = [request(ex) for ex in harmful]  # a jailbreak's wrapper is not the request
    categories = [ex.category for ex in harmful]
    h_answers = [r["answer"] for r in h_records]
    verdicts = judge.classify_many(instructions, h_answers)
    metrics = harm_metrics(verdicts, categories)
    if any("jailbreak" in ex.meta for ex in harmful):  # eval.jailbreak=templates
        metrics.update(template_rates([ex.meta["jailbreak"] for ex in harmful], instructions,
                                      [v == "comply" for v in verdicts]))
    metrics.update(judge.report(instructions, h_answers, categories))
    keyword = KeywordJudge()
    metrics["keyword_refusal_rate"] = 100.0 * sum(
        keyword.classify(q, a) == "refuse" for q, a in zip(instructions, h_answers)
    ) / max(len(harmful), 1)
    t_answers = [r["answer"] for r in t_records]
    correct = [is_correct(a, ex.label, task_cfg.scorer) for a, ex in zip(t_answers, task_test)]
    metrics["fa"] = accuracy(t_answers, [ex.label for ex in task_test], task_cfg.scorer)
    # per-prompt outcomes, so that the report can pair two defenses prompt by prompt, and the
    # prompt interval of each rate (stats.prompt_interval: Wilson)
    comply = [v == "comply" for v in verdicts]
    metrics["outcomes"] = {
        "hs": pack(comply), "fa": pack(correct),
        "hs_prompts": outcome_digest([r["prompt"] for r in h_records]),
        "fa_prompts": outcome_digest([r["prompt"] for r in t_records])}
    metrics["interval"] = {"method": "wilson", "confidence": CONFIDENCE}
    if comply:
        metrics["interval"]["hs"] = list(prompt_interval(sum(comply), len(comply)))
    if correct:
        metrics["interval"]["fa"] = list(prompt_interval(sum(correct), len(correct)))
    if h_records and "samples" in h_records[0]:
        shares = [sum(judge.classify(q, s) == "comply" for s in r["samples"]) / len(r["samples"])
                  for q, r in zip(instructions, h_records)]
        metrics["hs_sampled"] = 100.0 * sum(shares) / max(len(shares), 1)
    if h_records and "p_comply_opening" in h_records[0]:
        metrics["p_comply_opening"] = 100.0 * sum(r["p_comply_opening"] for r in h_records) / len(
            h_records)
    metrics["n_harmful"] = len(harmful)
    metrics["n_task"] = len(task_test)

    k = eval_cfg.n_logged_generations
    rows = [{"kind": "harmful", "category": ex.category, "prompt": r["prompt"],
             "answer": r["answer"], "verdict": v}
            for ex, r, v in list(zip(harmful, h_records, verdicts))[:k]]
    rows += [{"kind": "task", "category": ex.category, "prompt": r["prompt"], "answer": r["answer"],
              "verdict": "correct" if ok else "wrong"}
             for ex, r, ok in list(zip(task_test, t_records, correct))[:k]]
    return metrics, rows


def over_refusal(prompts: Sequence[Example], records: Sequence[dict], judge: Judge) -> dict:
    """The share of harmless-but-scary prompts the model refuses (XSTest's over-refusal), with
    its Wilson interval and per-prompt outcomes."""
    verdicts = judge.classify_many([ex.instruction for ex in prompts],
                                   [r["answer"] for r in records])
    refused = [v == "refuse" for v in verdicts]
    return {"over_refusal": 100.0 * sum(refused) / max(len(refused), 1),
            "over_refusal_n": len(refused),
            "over_refusal_interval": list(prompt_interval(sum(refused), len(refused))),
            "over_refusal_outcomes": pack(refused),
            "over_refusal_examples": [{"prompt": ex.instruction, "answer": r["answer"],
                                       "verdict": v} for ex, r, v in
                                      list(zip(prompts, records, verdicts))[:8]]}


def variant_metrics(name: str, harmful: Sequence[Example], records: Sequence[dict],
                    judge: Judge, n_logged: int = 0) -> tuple[dict, list[dict]]:
    """One of the attack's other copies of the harmful prompts (the backdoor's ``triggered``),
    judged as ``score`` judges the plain ones: (its metrics, its logged generations). Its HS is
    ``hs_<name>``; ``merge_variant`` puts it beside ``hs`` with its interval and outcomes."""
    instructions = [request(ex) for ex in harmful]
    verdicts = judge.classify_many(instructions, [r["answer"] for r in records])
    comply = [v == "comply" for v in verdicts]
    out = harm_metrics(verdicts, [ex.category for ex in harmful])
    out["outcomes"] = pack(comply)
    out["prompts"] = outcome_digest([r["prompt"] for r in records])
    out["n_harmful"] = len(harmful)
    if comply:
        out["interval"] = list(prompt_interval(sum(comply), len(comply)))
    rows = [{"kind": f"harmful_{name}", "category": ex.category, "prompt": r["prompt"],
             "answer": r["answer"], "verdict": v}
            for ex, r, v in list(zip(harmful, records, verdicts))[:n_logged]]
    return out, rows


def merge_variant(metrics: dict, name: str, variant: dict) -> dict:
    """``metrics`` (score's) with the variant's HS as ``hs_<name>``, its interval and per-prompt
    outcomes under the same names as ``hs``'s, and the rest under ``variants.<name>``."""
    key = f"hs_{name}"
    metrics[key] = variant["hs"]
    if "interval" in variant:
        metrics.setdefault("interval", {})[key] = variant["interval"]
    outcomes = metrics.setdefault("outcomes", {})
    outcomes[key], outcomes[f"{key}_prompts"] = variant["outcomes"], variant["prompts"]
    metrics.setdefault("variants", {})[name] = {
        k: v for k, v in variant.items() if k not in ("outcomes", "prompts", "interval")}
    return metrics
