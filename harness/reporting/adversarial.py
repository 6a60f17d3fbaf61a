"""Report sections on a defense under pressure: judges checked against each other
(``eval.judges``), HS per harm category, and each defense's worst case under an attacker-side
sweep.

Each returns ``(heading, note, markdown, html)`` tuples, as ``harness.report`` lays them out.
"""
from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from harness.reporting.cells import sort_key
from harness.stats import seed_interval

Section = tuple[str, str, str, str]


def _tables(headers: list[str], rows: list[list[Any]]) -> tuple[str, str]:
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    esc = html.escape
    body = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return "\n".join(md), f"<table>{body}</table>"


def _load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _stage_metrics(df: pd.DataFrame, stage: str):
    """(defense, axis value, seed, the stage's metrics, the whole results) per ok run."""
    for row in df[df["status"] == "ok"].to_dict("records"):
        res = _load(row["path"])
        yield row, res.get("metrics", {}).get(stage, {}), res


def _rate(values: list[float], interval: Optional[list[float]] = None) -> str:
    """Several seeds: mean ± t half-width; one: the value [Wilson interval] when recorded."""
    mean, half = seed_interval(values)
    if half is not None:
        return f"{mean:.1f} ± {half:.1f}"
    return f"{mean:.1f} [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else f"{mean:.1f}"


def judge_sections(df: pd.DataFrame, axis: str, order: list[str], stage: str) -> list[Section]:
    """Each judge's HS and each pair's kappa, per (defense, axis value), for runs with a panel."""
    hs: dict = defaultdict(lambda: defaultdict(list))  # (d, v) -> judge -> [(hs, interval)]
    pairs: dict = defaultdict(lambda: defaultdict(list))  # (d, v) -> (a, b) -> [agreement]
    for row, metrics, _ in _stage_metrics(df, stage):
        panel = metrics.get("panel")
        if not panel:
            continue
        cell = (row["defense"], row[axis])
        for name, m in panel["judges"].items():
            hs[cell][name].append((m["hs"], m.get("interval")))
        for p in panel["agreement"]:
            pairs[cell][(p["a"], p["b"])].append(p)
    if not hs:
        return []
    cells = sorted(hs, key=lambda c: (order.index(c[0]) if c[0] in order else len(order),
                                      sort_key(c[1])))
    judges = sorted({j for c in cells for j in hs[c]})
    rows = [[d, v, *(_rate([x for x, _ in hs[(d, v)][j]], hs[(d, v)][j][0][1])
                     if hs[(d, v)].get(j) else "—" for j in judges)] for d, v in cells]
    md1, html1 = _tables(["defense", axis, *(f"HS by {j} (%)" for j in judges)], rows)
    names = sorted({k for c in cells for k in pairs[c]})
    rows = []
    for d, v in cells:
        out = [d, v]
        for k in names:
            got = pairs[(d, v)].get(k, [])
            kappas = [p["kappa"] for p in got if p["kappa"] is not None]
            conf = {c: sum(p["confusion"][c] for p in got) for c in
                    ("both", "a_only", "b_only", "neither")}
            kappa = (f"{np.mean(kappas):.3f}" if kappas else "undefined") + (
                f" (mean of {len(kappas)})" if len(kappas) > 1 else "")
            out.append(f"κ {kappa}; {conf['both']}/{conf['a_only']}/{conf['b_only']}/"
                       f"{conf['neither']}" if got else "—")
        rows.append(out)
    md2, html2 = _tables(["defense", axis, *(f"{a} vs {b}" for a, b in names)], rows)
    return [("HS by each judge (eval.judges)",
             "The same answers scored by each judge of the panel: a paper's ranking should not "
             "hinge on one. One seed: value [95% Wilson interval]; several: mean ± Student-t "
             "half-width. hs_plus is Booster's HS+ (flagged or incoherent).", md1, html1),
            ("Agreement between judges",
             "Cohen's κ on 'harmful' (1: always agree; 0: chance; undefined when both judges give "
             "one label to every answer), then the 2x2 counts both / first only / second only / "
             "neither, summed over seeds.", md2, html2)]


def category_sections(df: pd.DataFrame, axis: str, order: list[str],
                      stage: str) -> list[Section]:
    """HS per harm category, one table per defense (rows: categories, columns: axis values)."""
    per: dict = defaultdict(lambda: defaultdict(list))  # defense -> (cat, value) -> [hs]
    for row, metrics, _ in _stage_metrics(df, stage):
        saved = row.get("hs_per_category")  # a results.csv's own copy, when no results.json
        per_category = metrics.get("hs_per_category") or (
            json.loads(saved) if isinstance(saved, str) and saved else {})
        for cat, value in per_category.items():
            per[row["defense"]][(cat, row[axis])].append(value)
    sections = []
    for d in [d for d in order if d in per] + sorted(set(per) - set(order)):
        cats = sorted({c for c, _ in per[d]})
        values = sorted({v for _, v in per[d]}, key=sort_key)
        if cats == ["all"]:
            continue  # no categories in this data
        rows = [[c, *(_rate(per[d][(c, v)]) if per[d].get((c, v)) else "—" for v in values)]
                for c in cats]
        md, tab = _tables(["category", *(f"{axis}={v}" for v in values)], rows)
        sections.append((f"HS per category: {d}", "HS (%) on the harmful evaluation prompts of "
                         "each category (few prompts each: read the differences, not the "
                         "digits); several seeds: mean ± Student-t half-width.", md, tab))
    return sections


# ---------------------------------------------------------------- worst case under a sweep
SWEPT = (("lr", ("train", "finetune", "lr")), ("epochs", ("train", "finetune", "epochs")),
         ("p", ("attack", "p")))


def _swept(row: dict[str, Any]) -> dict[str, Any]:
    """The swept settings of a run, from its config's setting (also in results.csv)."""
    try:
        flat = json.loads(row.get("setting") or "{}")
    except (TypeError, json.JSONDecodeError):
        flat = {}
    return {k: flat.get(".".join(p)) for k, p in SWEPT}


def worst_case_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Per defense: the highest HS among its attacked runs (attack.p > 0) that pass the
    capability guard (the ``capable`` column, harness.guards), with the settings that reached
    it and the budget spent (runs, their wall time when recorded)."""
    out = []
    ok = df[(df["status"] == "ok") & df["hs"].notna() & df["fa"].notna()]
    for d, runs in ok.groupby("defense", sort=False):
        rs = runs.to_dict("records")
        trials = [r for r in rs if not r.get("attack.p") == 0]
        feasible = [r for r in trials if r.get("capable") is not False]
        worst = max(feasible, key=lambda r: r["hs"]) if feasible else None
        seconds = [r.get("seconds") for r in trials]
        known = [float(x) for x in seconds if x is not None and not pd.isna(x)]
        out.append({"defense": d, "trials": len(trials), "feasible": len(feasible),
                    "seconds": sum(known) if len(known) == len(trials) else None,
                    "worst_hs": worst["hs"] if worst else None,
                    "worst_fa": worst["fa"] if worst else None,
                    "settings": _swept(worst) if worst else None})
    return out


def worst_case_section(df: pd.DataFrame, order: list[str], guard: str) -> list[Section]:
    rows = worst_case_rows(df)
    if not rows:
        return []
    rows.sort(key=lambda r: order.index(r["defense"]) if r["defense"] in order else len(order))
    table = [[r["defense"],
              "—" if r["worst_hs"] is None else f"{r['worst_hs']:.1f}",
              "—" if r["worst_fa"] is None else f"{r['worst_fa']:.1f}",
              ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in (r["settings"] or {}).items()) or "none feasible",
              f"{r['trials']} ({r['feasible']} pass the guard)",
              "—" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"]
             for r in rows]
    md, tab = _tables(["defense", "worst-case HS (%)", "its FA (%)",
                       "settings that reached it", "trials", "trial wall time (min)"], table)
    return [("Worst case under the attacker's sweep (runs that pass the capability guard)",
             "Each defense's highest HS among the sweep's attacked trials that pass the "
             f"capability guard ({guard}), the bound the sweep's objective steered by "
             "(harness.guards): the attacker tunes lr, epochs and p against each defense "
             "(Optuna through Hydra's sweeper). One seed per trial: a single noisy trial can "
             "set the maximum.", md, tab)]
