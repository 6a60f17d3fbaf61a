"""Evaluate one model: HS on harmful prompts, FA on the task test set, continuous measures."""
from __future__ import annotations

import time
from harness.data.schema import Example
from harness.evaluation.generate import generate, opening_probability
from harness.evaluation.judges import Judge, KeywordJudge, harm_metrics
from harness.evaluation.scorers import accuracy


def evaluate_model(model, tokenizer, template, harmful: list[Example], task_test: list[Example],
                   judge: Judge, eval_cfg, task_cfg, seed: int = 0) -> tuple[dict, list[dict]]:
    """Return (metrics, logged generations). Percentages run from 0 to 100."""
    t0 = time.perf_counter()
    system = eval_cfg.system_prompt or None
    h_prompts = [template.render_prompt(ex, system=system) for ex in harmful]
    h_answers = [a[0] for a in generate(model, tokenizer, h_prompts, eval_cfg.max_new_tokens,
                                        eval_cfg.batch_size)]
    verdicts = judge.classify_many([ex.instruction for ex in harmful], h_answers)
    metrics = harm_metrics(verdicts, [ex.category for ex in harmful])
    metrics.update(judge.report([ex.instruction for ex in harmful], h_answers,
                                [ex.category for ex in harmful]))
    keyword = KeywordJudge()
    metrics["keyword_refusal_rate"] = 100.0 * sum(
        keyword.classify(ex.instruction, a) == "refuse" for ex, a in zip(harmful, h_answers)
    ) / max(len(harmful), 1)

    t_prompts = [template.render_prompt(ex) for ex in task_test]
    t_answers = [a[0] for a in generate(model, tokenizer, t_prompts, task_cfg.max_new_tokens,
                                        eval_cfg.batch_size)]
    metrics["fa"] = accuracy(t_answers, [ex.label for ex in task_test], task_cfg.scorer)

    if eval_cfg.samples > 0:
        sampled = generate(model, tokenizer, h_prompts, eval_cfg.max_new_tokens,
                           eval_cfg.batch_size, num_samples=eval_cfg.samples,
                           temperature=eval_cfg.temperature, seed=seed)
        shares = [sum(judge.classify(ex.instruction, s) == "comply" for s in ss) / len(ss)
                  for ex, ss in zip(harmful, sampled)]
        metrics["hs_sampled"] = 100.0 * sum(shares) / max(len(shares), 1)
    openings = judge.openings()
    if eval_cfg.opening_probability and openings is not None:
        probs = opening_probability(model, tokenizer, h_prompts, *openings,
                                    response_prefix=template.response_prefix)
        metrics["p_comply_opening"] = 100.0 * sum(probs) / max(len(probs), 1)
    metrics["n_harmful"] = len(harmful)
    metrics["n_task"] = len(task_test)
    metrics["seconds"] = time.perf_counter() - t0

    k = eval_cfg.n_logged_generations
    rows = [{"kind": "harmful", "category": ex.category, "prompt": p, "answer": a, "verdict": v}
            for ex, p, a, v in list(zip(harmful, h_prompts, h_answers, verdicts))[:k]]
    rows += [{"kind": "task", "category": ex.category, "prompt": p, "answer": a,
              "verdict": "correct" if accuracy([a], [ex.label], task_cfg.scorer) else "wrong"}
             for ex, p, a in list(zip(task_test, t_prompts, t_answers))[:k]]
    return metrics, rows

