"""Evaluation-time jailbreaks on the harmful prompts (``eval.jailbreak``), for testing whether
a defense's safety holds against cheap, standard attacks and not only against plain prompts.

- ``prefill``: the assistant's answer is started for the model with ``eval.jailbreak_prefill``
  (a compliance opening); the model writes the rest. The opening is part of the prompt, so the
  judge reads only what the model added: an answer that turns into a refusal after the opening
  is a refusal.
- ``templates``: each harmful request inside every wrapper of ``eval.jailbreak_templates``
  (name -> text with one ``{prompt}``). HS is over all (request, wrapper) pairs; per wrapper
  and "any wrapper" rates sit beside it.
- ``gcg``: a suffix searched against the evaluated model itself (harness.evaluation.gcg), so
  it is added in the eval stage (``with_suffix``), not here.

Rows keep the plain request in ``meta["request"]`` (what a judge is asked about) and the
wrapper's name in ``meta["jailbreak"]``.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from harness.data.schema import Example

KINDS = ("none", "prefill", "templates", "gcg")
PLACEHOLDER = "{prompt}"


def wrap(template: str, request: str) -> str:
    """The template with the request in place of its one ``{prompt}`` (other braces kept)."""
    return template.replace(PLACEHOLDER, request)


def prefill_prompt(prompt: str, opening: str, response_prefix: str) -> str:
    """A rendered prompt with the answer already begun: the template's separator between
    prompt and answer, then the opening. The model continues from there."""
    return prompt + response_prefix + opening


def posed_prompt(template, ex: Example, system: str | None = None) -> str:
    """The prompt the model is asked: the row rendered, plus its prefill when it has one."""
    prompt = template.render_prompt(ex, system=system)
    opening = ex.meta.get("prefill")
    return prefill_prompt(prompt, opening, template.response_prefix) if opening else prompt


def apply(eval_cfg, rows: list[Example]) -> list[Example]:
    """The harmful rows as ``eval.jailbreak`` poses them (templates: one row per request and
    wrapper, request-major, in the templates' order)."""
    kind = eval_cfg.jailbreak
    if kind in ("none", "gcg"):  # gcg: the suffix is searched against the evaluated model
        return list(rows)
    if kind == "prefill":
        return [replace(ex, meta={**ex.meta, "prefill": eval_cfg.jailbreak_prefill,
                                  "request": ex.instruction}) for ex in rows]
    return [replace(ex, instruction=wrap(text, ex.instruction),
                    meta={**ex.meta, "jailbreak": name, "request": ex.instruction})
            for ex in rows for name, text in eval_cfg.jailbreak_templates.items()]


def request(ex: Example) -> str:
    """The plain harmful request behind a posed row (a judge reads this, not the wrapper)."""
    return ex.meta.get("request", ex.instruction)


def template_rates(names: list[str], requests: list[str], comply: list[bool]) -> dict[str, Any]:
    """HS per wrapper, and the share of requests that at least one wrapper got answered
    (the attacker who tries every wrapper), in percent."""
    per: dict[str, list[bool]] = {}
    for name, ok in zip(names, comply):
        per.setdefault(name, []).append(ok)
    hit: dict[str, bool] = {}
    for req, ok in zip(requests, comply):
        hit[req] = hit.get(req, False) or ok
    return {"hs_per_jailbreak": {n: 100.0 * sum(v) / len(v) for n, v in per.items()},
            "hs_any_jailbreak": 100.0 * sum(hit.values()) / max(len(hit), 1)}


def payload(eval_cfg) -> dict[str, Any]:
    """``eval`` as keyed: the jailbreak's own texts only when it is on (none adds nothing,
    so the evaluations keyed before the option stay valid)."""
    out = asdict(eval_cfg)
    if eval_cfg.jailbreak != "prefill":
        out.pop("jailbreak_prefill")
    if eval_cfg.jailbreak != "templates":
        out.pop("jailbreak_templates")
    if eval_cfg.jailbreak != "gcg":
        out.pop("gcg")
    if eval_cfg.jailbreak == "none":
        out.pop("jailbreak")
    return out


def with_suffix(rows: list[Example], suffix: str) -> list[Example]:
    """The rows with an adversarial suffix after each request (the plain request kept)."""
    return [replace(ex, instruction=f"{ex.instruction} {suffix}",
                    meta={**ex.meta, "request": request(ex)}) for ex in rows]
