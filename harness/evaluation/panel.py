"""Several judges on the same answers (``eval.judges``), checked against each other: each
judge's HS with its Wilson interval and per-category HS, and for every pair Cohen's kappa on
"counted as harmful" (sklearn) with the 2x2 confusion counts. A paper's numbers should not hinge
on one judge (beaver-dam at 0.5 flags far more than Llama-Guard).

Names: any judge.name (toy, keyword, llm_rubric, beaver_dam, llama_guard), ``hs_plus`` (Booster's
HS+ over the run's own judge) or ``hs_plus:<name>`` (over that judge)."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Sequence

from harness.evaluation.hs_plus import HSPlusJudge
from harness.evaluation.judges import Judge, harm_metrics
from harness.evaluation.registry import JUDGES, build_judge
from harness.stats import pack, prompt_interval

BASE_NAMES = tuple(JUDGES)  # the registry's


def base_name(name: str, default: str) -> str:
    """The plain judge a panel name runs on (hs_plus: the run's own judge)."""
    if name == "hs_plus":
        return default
    return name.split(":", 1)[1] if name.startswith("hs_plus:") else name


def check_names(names: Sequence[str], key: str = "eval.judges") -> None:
    """Raise ValueError("<key>: ...") for an unknown or repeated name."""
    for name in names:
        plain = name.split(":", 1)[1] if name.startswith("hs_plus:") else name
        if name != "hs_plus" and plain not in BASE_NAMES:
            raise ValueError(f"{key}: unknown judge {name!r}; allowed: {', '.join(BASE_NAMES)}, "
                             "hs_plus, hs_plus:<judge>")
    if len(set(names)) != len(names):
        raise ValueError(f"{key}: {list(names)} names a judge twice")


def build_panel(names: Sequence[str], run,
                wrap: Callable[[Judge], Judge] = lambda j: j) -> dict[str, Judge]:
    """One judge per name, each with its settings node of ``run`` and wrapped as the attack's
    answers need (``wrap``); the keyword judge keeps judge.refusal_phrases."""
    built: dict[str, Judge] = {}

    def plain(name: str) -> Judge:
        if name not in built:
            built[name] = build_judge(run, dataclasses.replace(run.judge, name=name))
        return built[name]

    panel = {}
    for name in names:
        base = plain(base_name(name, run.judge.name))
        panel[name] = wrap(HSPlusJudge(base) if name.startswith("hs_plus") else base)
    return panel


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]):
    """sklearn's kappa; None where it is undefined (both judges give one constant label, so
    chance agreement is 1)."""
    from sklearn.metrics import cohen_kappa_score

    if len(set(a) | set(b)) < 2:
        return None
    value = float(cohen_kappa_score(list(a), list(b), labels=[False, True]))
    return None if math.isnan(value) else value


def agreement(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Kappa and the 2x2 counts of two judges' harmful calls on the same answers."""
    both = sum(x and y for x, y in zip(a, b))
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    n = len(a)
    return {"kappa": cohen_kappa(a, b), "n": n,
            "agree": 100.0 * (n - a_only - b_only) / max(n, 1),
            "confusion": {"both": both, "a_only": a_only, "b_only": b_only,
                          "neither": n - both - a_only - b_only}}


def panel_metrics(panel: dict[str, Judge], instructions: Sequence[str],
                  answers: Sequence[str], categories: Sequence[str]) -> dict:
    """{"judges": {name: HS, interval, per category, outcomes}, "agreement": [pair, ...]}."""
    calls: dict[str, list[bool]] = {}
    judges = {}
    for name, judge in panel.items():
        verdicts = judge.classify_many(instructions, answers)
        m = harm_metrics(verdicts, categories)
        calls[name] = [v == "comply" for v in verdicts]
        judges[name] = {"hs": m["hs"], "refusal_rate": m["refusal_rate"],
                        "hs_per_category": m["hs_per_category"], "outcomes": pack(calls[name])}
        if calls[name]:
            judges[name]["interval"] = list(prompt_interval(sum(calls[name]), len(calls[name])))
    pairs = [{"a": a, "b": b, **agreement(calls[a], calls[b])}
             for a, b in itertools.combinations(panel, 2)]
    return {"judges": judges, "agreement": pairs}
