"""Runs -> cells: one (defense, axis value) cell per metric, with its interval and its failures.

A cell over several seeds is their mean with a Student-t interval over seeds; a cell over one
seed is that run's rate with its Wilson interval over prompts. Comparisons between two cells
are paired (the same seeds and the same prompts; ``harness.stats.paired_difference``).
"""
from __future__ import annotations

import glob
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pandas as pd


from harness.data import attacks
from harness.guards import alignment, capability
from harness.stages import method_class
from harness.stats import (Difference, paired_difference, prompt_interval, seed_difference,
                           seed_interval, unpack)
from harness.tracking.results import RESULTS_FILE

log = logging.getLogger(__name__)

METRICS = ("hs", "fa", "refusal_rate", "other_rate", "p_comply_opening", "hs_sampled",
           "over_refusal", "hs_triggered")
# the user-data filter's quality (metrics.filter), in percent: what it catches and wrongly drops
FILTER_METRICS = ("filter_recall", "filter_precision", "filter_harmless_dropped")
LABELS = {"hs": "HS (%)", "fa": "FA (%)", "refusal_rate": "refusal (%)",
          "other_rate": "other (%)", "p_comply_opening": "P(compliance opening) (%)",
          "hs_sampled": "HS, sampled (%)",
          "hs_triggered": "HS with the trigger (%)",
          "over_refusal": "over-refusal on harmless-but-scary prompts (%)",
          "filter_recall": "filter recall (%)", "filter_precision": "filter precision (%)",
          "filter_harmless_dropped": "harmless user rows the filter dropped (%)"}
LOWER_IS_BETTER = {"hs": True, "fa": False, "hs_triggered": True}
# the prompts a rate is a proportion over: harmful prompts, or the task's test set
DENOMINATOR = {"hs": "n_harmful", "hs_triggered": "n_harmful", "refusal_rate": "n_harmful", "other_rate": "n_harmful",
               "fa": "n_task", "over_refusal": "over_refusal_n"}
AXES = {"attack.p": ("attack", "p"), "attack.n": ("attack", "n"), "attack.k": ("attack", "k"),
        "task": ("task", "name"),
        "model": ("model", "name"), "seed": ("seed",), "defense": ("defense", "name"),
        "protocol": ("protocol", "name"), "attack": ("attack", "name"),
        "torch_threads": ("torch_threads",), "eval.jailbreak": ("eval", "jailbreak")}


# config leaves that do not change what a run measures, besides the seed (a cell's runs are
# seeds of one setting: runs of one seed that differ elsewhere are not averaged)
NOT_A_SETTING = ("seed", "paths", "logger", "study", "sweep", "trainer.enable_progress_bar",
                 "torch_threads", "hydra")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix[:-1]: node} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def setting_of(config: dict) -> str:
    """The run's config less NOT_A_SETTING, as one comparable string."""
    flat = {k: v for k, v in _flat(config).items()
            if not any(k == p or k.startswith(p + ".") for p in NOT_A_SETTING)}
    return json.dumps(flat, sort_keys=True, default=str)


def differing_leaves(settings: pd.Series) -> list[str]:
    """The config leaves whose values differ between ``settings`` (setting_of strings)."""
    flats = [json.loads(s) for s in settings.unique()]
    keys = set().union(*flats)
    return sorted(k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1)


def one_run_per_seed(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """(runs with one per seed, []) when runs of a seed are the same setting (the same run
    reported from two folders counts once); (runs, the leaves they differ in) otherwise."""
    if "setting" not in runs or not runs["seed"].duplicated().any():
        return runs, []
    if (runs.groupby("seed", dropna=False)["setting"].nunique() > 1).any():
        return runs, differing_leaves(runs["setting"])
    return runs.drop_duplicates("seed"), []


class ProtocolMixError(ValueError):
    """Runs under different protocols (hashes) would share a table cell."""


def _get(config: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config if config != {} else None


def defense_label(cfg: dict, name: Any) -> Any:
    """The defense as a report names it: its name, or its finetune method's ``report_label``
    (name, params) where the name alone would pool different doses into one cell."""
    module = _get(cfg, ("defense", "finetune", "module"))
    try:
        label = getattr(method_class(module), "report_label", None) if module else None
    except Exception:  # noqa: BLE001 - a module gone since the run: its name alone
        label = None
    return label(name, _get(cfg, ("defense", "finetune", "params")) or {}) if label else name


def find_results(patterns: list[str]) -> list[Path]:
    paths: set[Path] = set()
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            paths.update(p.rglob(RESULTS_FILE))
        else:
            for match in glob.glob(pattern, recursive=True):
                m = Path(match)
                paths.update(m.rglob(RESULTS_FILE) if m.is_dir() else
                             [m] if m.name == RESULTS_FILE else [])
    return sorted(paths)


def collect(paths: list[Path], stage: str = "final") -> pd.DataFrame:
    """One row per run: its axes, status, provenance and the stage's metrics and outcomes."""
    rows = []
    for path in paths:
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping %s: %s", path, err)
            continue
        cfg = res.get("config", {})
        row: dict[str, Any] = {"path": str(path), "status": res.get("status"),
                               "setting": setting_of(cfg)}
        for axis, keys in AXES.items():
            row[axis] = _get(cfg, keys)
        if row["attack"] in attacks.ATTACKS:  # harmful_shots k=10 beside k=100
            row["attack"] = attacks.get(row["attack"]).label(SimpleNamespace(**cfg["attack"]))
        row["defense"] = defense_label(cfg, row["defense"])  # safety_mix n=10 beside n=100
        posthoc = _get(cfg, ("posthoc", "name"))
        if posthoc and posthoc != "none":  # its own row: "sft+safelora" beside "sft"
            row["defense"] = f"{row['defense']}+{posthoc}"
        record = res.get("protocol") or {}
        row["protocol"] = record.get("name", row["protocol"])
        row["protocol_hash"] = record.get("hash")
        versions = res.get("versions") or {}
        row["git"] = res.get("git") or versions.get("git")
        row["cpu"] = versions.get("cpu_model")
        row["cpu_capability"] = versions.get("cpu_capability")
        if row["torch_threads"] is None:  # runs made before the key: what was in force
            row["torch_threads"] = versions.get("torch_threads")
        # each stage's builder (a reused stage was built by an earlier process and commit)
        builders = [a.get("built_by") or {} for a in (res.get("artifacts") or {}).values()
                    if isinstance(a, dict)]
        row["built_at"] = ", ".join(sorted({str(b["git"]) for b in builders
                                            if isinstance(b, dict) and b.get("git")})) or None
        row["dirty_stages"] = ", ".join(res.get("dirty_stages") or []) or None
        metrics = res.get("metrics", {}).get(stage, {})
        for m in METRICS:
            row[m] = metrics.get(m)
        for m in ("n_harmful", "n_task", "over_refusal_n"):
            row[m] = metrics.get(m)
        row["over_refusal_ci"] = metrics.get("over_refusal_interval")
        # a report rebuilt from this file alone keeps its per-category tables
        per_category = metrics.get("hs_per_category")
        row["hs_per_category"] = json.dumps(per_category, sort_keys=True) if per_category else None
        filt = res.get("metrics", {}).get("filter") or {}
        for m, k in zip(FILTER_METRICS, ("recall", "precision", "harmless_dropped_share")):
            row[m] = 100.0 * filt[k] if filt.get(k) is not None else None  # None: undefined
        row["served_aligned"] = bool(filt.get("served_aligned"))  # the whole upload dropped
        interval = metrics.get("interval") or {}
        outcomes = metrics.get("outcomes") or {}
        for m in ("hs", "fa", "hs_triggered"):
            row[f"{m}_ci"] = interval.get(m)
            row[f"{m}_outcomes"] = outcomes.get(m)
            row[f"{m}_prompts"] = outcomes.get(f"{m}_prompts")
        stages = res.get("metrics", {})
        verdict = alignment(stages.get("base"), stages.get("align"))
        row["aligned"] = verdict.ok
        row["alignment_guard"] = verdict.reason or None
        row["seconds"] = (res.get("timings") or {}).get("total")
        row["error"] = (res.get("error") or "").split("\n")[0] or None
        rows.append(row)
    return pd.DataFrame(rows)


def collect_csv(path: Path) -> pd.DataFrame:
    """A report's own results.csv, for studies whose run folders are gone: the columns a
    results.json would give, those it never recorded (prompt counts, outcomes) left empty, so
    their one-seed cells say they have no interval rather than invent one."""
    df = pd.read_csv(path, dtype={"hs_outcomes": str, "fa_outcomes": str})
    for col in ("capable", "aligned"):  # a verdict: True, False or None (unchecked)
        if col in df:
            df[col] = df[col].map({True: True, False: False, "True": True, "False": False})
            df[col] = df[col].astype(object).where(df[col].notna(), None)
    for m, n in (("hs", "n_harmful"), ("fa", "n_task")):  # read back by a tool that took
        col = f"{m}_outcomes"                           # "0110" for the number 110: drop those
        if col in df:
            text = df[col].where(df[col].astype(str).str.fullmatch(r"[01]+"), None)
            width = df[n] if n in df else pd.Series(text.str.len().max(), index=df.index)
            df[col] = text.where(text.str.len() == width, None)
    if "served_aligned" not in df:
        df["served_aligned"] = False
    for col in ("n_harmful", "n_task", "over_refusal_n", "over_refusal_ci", "torch_threads",
                "git", "cpu", "cpu_capability", "aligned", "alignment_guard", "seconds",
                "built_at", "dirty_stages", "hs_per_category",
                *(f"{m}_{k}" for m in ("hs", "fa", "hs_triggered")
                  for k in ("ci", "outcomes", "prompts"))):
        if col not in df:
            df[col] = None
    return df


def sort_key(v: Any):
    """Numbers first, in order; text in natural order ("k=50" before "k=100")."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v))
    return (1, tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                     for part in re.split(r"(\d+)", str(v))))


@dataclass
class Cell:
    """One metric of one (defense, axis value): the runs behind it and their summary."""
    defense: str
    value: Any
    metric: str
    mean: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None
    interval: str = "none"  # "seeds" (Student t), "prompts" (Wilson) or "none"
    per_seed: list[tuple[Any, float, str]] = field(default_factory=list)  # (seed, value, path)
    n_ok: int = 0
    n_failed: int = 0
    n_interrupted: int = 0  # stopped by a signal: rerunning the sweep's command resumes them
    n_expected: int = 0
    failed_paths: list[str] = field(default_factory=list)
    n_served_aligned: int = 0  # seeds whose filter dropped the whole upload: nothing finetuned
    # ok seeds whose value is undefined (a filter's precision when it dropped nothing, its
    # recall with no harmful row): left out of the mean, never counted as 0 or 100
    n_undefined: int = 0
    best: bool = False
    like_best: bool = False  # not distinguishable from the column's best
    mixed: list[str] = field(default_factory=list)  # leaves that runs of one seed differ in
    incapable: list[Any] = field(default_factory=list)  # seeds failing the capability guard

    @property
    def missing(self) -> int:
        return max(self.n_expected - self.n_ok - self.n_failed - self.n_interrupted
                   - self.n_undefined, 0)

    @property
    def half_width(self) -> Optional[float]:
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / 2


def _prompt_ci(row: pd.Series, metric: str) -> Optional[tuple[float, float]]:
    ci = row.get(f"{metric}_ci") if f"{metric}_ci" in row else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return float(ci[0]), float(ci[1])
    n = row.get(DENOMINATOR.get(metric, ""), None)
    value = row.get(metric)
    if n is None or pd.isna(n) or int(n) <= 0 or value is None or pd.isna(value):
        return None
    return prompt_interval(round(float(value) * int(n) / 100), int(n))


def build_cell(runs: pd.DataFrame, defense: str, value: Any, metric: str,
               n_expected: int) -> Cell:
    cell = Cell(defense, value, metric, n_expected=n_expected)
    ok = runs[(runs["status"] == "ok") & runs[metric].notna()]
    cell.n_undefined = int(((runs["status"] == "ok") & runs[metric].isna()).sum())
    failed = runs[runs["status"] != "ok"]
    cell.n_interrupted = int((failed["status"] == "interrupted").sum())
    cell.n_failed = len(failed) - cell.n_interrupted
    cell.failed_paths = failed["path"].tolist()
    if "served_aligned" in ok:
        cell.n_served_aligned = int(ok["served_aligned"].fillna(False).astype(bool).sum())
    ok, cell.mixed = one_run_per_seed(ok)
    cell.n_ok = len(ok)
    if "capable" in ok:
        cell.incapable = sorted((s for s, c in zip(ok["seed"], ok["capable"]) if c is False),
                                key=sort_key)
    cell.per_seed = sorted(((r.seed, float(getattr(r, metric)), r.path)
                            for r in ok.itertuples()), key=lambda t: sort_key(t[0]))
    if ok.empty or cell.mixed:  # runs that differ are not seeds: no mean of them
        return cell
    values = [v for _, v, _ in cell.per_seed]
    if len(values) >= 2:
        cell.mean, half = seed_interval(values)
        cell.low, cell.high, cell.interval = cell.mean - half, cell.mean + half, "seeds"
    else:
        cell.mean = values[0]
        ci = _prompt_ci(ok.iloc[0], metric)
        if ci is not None:
            cell.low, cell.high, cell.interval = ci[0], ci[1], "prompts"
    return cell


def build_cells(df: pd.DataFrame, axis: str, metric: str) -> dict[tuple[str, Any], Cell]:
    expected = int(df.groupby(["defense", axis], dropna=False)["seed"].nunique().max()) \
        if not df.empty else 0
    cells = {}
    for (defense, value), runs in df.groupby(["defense", axis], dropna=False):
        cells[(defense, value)] = build_cell(runs, defense, value, metric, expected)
    return cells


def paired(df: pd.DataFrame, axis: str, metric: str, defense: str, other: str,
           value: Any) -> tuple[Optional[Difference], str]:
    """(defense - other) on ``metric`` at ``axis=value``, paired over their common seeds and
    prompts; (None, why) when the runs cannot be paired."""
    col = f"{metric}_outcomes"
    ok = df[(df["status"] == "ok") & (df[axis] == value)]
    (a, mixed_a), (b, mixed_b) = (one_run_per_seed(ok[ok["defense"] == d]) for d in (defense, other))
    if mixed_a or mixed_b:
        return None, f"runs of one seed differ in {', '.join(mixed_a or mixed_b)}"
    a, b = a.set_index("seed"), b.set_index("seed")
    seeds = sorted(set(a.index) & set(b.index), key=sort_key)
    if not seeds:
        return None, "no common seed"
    prompts = f"{metric}_prompts"
    for s in seeds:  # a recorded prompt digest on both sides must agree
        x, y = (t.loc[s].get(prompts) for t in (a, b))
        if isinstance(x, str) and isinstance(y, str) and x != y:
            return None, f"seed {s}: the two runs were scored on different prompts"
    outcomes = [(a.loc[s].get(col), b.loc[s].get(col)) for s in seeds]
    if all(isinstance(x, str) and isinstance(y, str) for x, y in outcomes):
        return paired_difference([unpack(x) for x, _ in outcomes],
                                 [unpack(y) for _, y in outcomes]), ""
    values = [(float(a.loc[s][metric]), float(b.loc[s][metric])) for s in seeds]
    if len(seeds) >= 2 and not any(map(math.isnan, sum(values, ()))):
        # per-seed values are enough for a Student t over seeds
        return seed_difference([x for x, _ in values], [y for _, y in values]), ""
    return None, "no per-prompt outcomes (one seed: a paired bootstrap over prompts needs them)"


def mark_best(cells: dict[tuple[str, Any], Cell], df: pd.DataFrame, axis: str,
              metric: str) -> str:
    """Mark each column's best cell and the cells a paired test cannot tell from it; return
    how "not distinguishable" was decided (for the table's note)."""
    lower = LOWER_IS_BETTER.get(metric, True)
    how = set()
    for value in {v for _, v in cells}:
        # a cell with a seed that fails the capability guard is never the best, nor like it
        column = [c for (d, v), c in cells.items() if _same(v, value) and c.mean is not None
                  and not c.incapable]
        if len(column) < 2:
            continue
        best = min(column, key=lambda c: c.mean if lower else -c.mean)
        best.best = True
        for c in column:
            if c is best:
                continue
            diff, _ = paired(df, axis, metric, c.defense, best.defense, value)
            if diff is not None:
                c.like_best = not diff.distinguishable
                how.add(f"paired, {diff.method}")
            elif None not in (c.low, c.high, best.low, best.high):
                c.like_best = c.low <= best.high and best.low <= c.high
                how.add("overlapping intervals (no per-prompt outcomes to pair)")
    return " and ".join(sorted(how))


# axes whose values change what the task accuracy can be: each value has its own reference
OWN_REFERENCE = ("task", "model", "protocol")


def reference_fa(df: pd.DataFrame, reference: Optional[str], axis: str) -> dict[Any, float]:
    """The capability guard's reference: the mean FA of ``reference``'s unattacked runs
    (attack.p = 0), per axis value when the axis changes the task or model, else one for all
    (key None). Empty when the report holds no such run."""
    ok = df[(df["status"] == "ok") & (df["defense"] == reference) & df["fa"].notna()]
    if "attack.p" in ok:
        ok = ok[pd.to_numeric(ok["attack.p"], errors="coerce") == 0]
    else:
        ok = ok.iloc[:0]
    if ok.empty:
        return {}
    if axis in OWN_REFERENCE:
        return {v: float(g["fa"].mean()) for v, g in ok.groupby(axis)}
    return {None: float(ok["fa"].mean())}


def apply_guards(df: pd.DataFrame, reference: Optional[str], axis: str) -> pd.DataFrame:
    """``df`` with each ok run's guard verdicts: ``capable`` (True, False or None: unchecked)
    with ``capability_guard`` (why) and ``reference_fa``; ``aligned`` likewise, from the run's
    recorded alignment verdict."""
    refs = reference_fa(df, reference, axis)
    df = df.copy()
    capable, why, ref_col = [], [], []
    for row in df.to_dict("records"):
        ref = refs.get(row.get(axis) if axis in OWN_REFERENCE else None)
        if row.get("status") != "ok":
            verdict = None
        else:
            verdict = capability(_number(row.get("fa")), _number(row.get("other_rate")), ref)
        capable.append(None if verdict is None else verdict.ok)
        why.append(None if verdict is None else verdict.reason or None)
        ref_col.append(ref)
    df["capable"] = pd.Series(capable, index=df.index, dtype=object)
    df["capability_guard"] = why
    df["reference_fa"] = ref_col
    if "aligned" not in df:
        df["aligned"] = None
    return df


def _number(x: Any) -> Optional[float]:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a)
                      and math.isnan(b))


def mixed_protocol_columns(df: pd.DataFrame, axis: str, allow: bool = False) -> set:
    """The axis values whose cells hold runs of more than one protocol hash.

    Such runs were scored or trained differently, so their mean is not a number any paper
    reports: refuse unless ``allow`` (``--mix-protocols``), and then the header says so.
    """
    ok = df[df["status"] == "ok"]
    if ok.empty or "protocol_hash" not in ok:
        return set()
    keyed = ok.assign(protocol_hash=ok["protocol_hash"].astype(object).fillna("unrecorded"))
    counts = keyed.groupby(["defense", axis])["protocol_hash"].nunique()
    mixed = counts[counts > 1]
    if len(mixed) and not allow:
        cells = []
        for defense, value in mixed.index:
            runs = keyed[(keyed["defense"] == defense) & (keyed[axis] == value)]
            kinds = sorted({f"{n} ({h})" for n, h in zip(runs["protocol"].fillna("?"),
                                                         runs["protocol_hash"])})
            cells.append(f"{defense} at {axis}={value}: {', '.join(kinds)}")
        raise ProtocolMixError(
            "runs under different protocols would share a table cell; report them separately, "
            "use --axis protocol, or pass --mix-protocols to average them anyway:\n  "
            + "\n  ".join(cells))
    return set(mixed.index.get_level_values(axis))


def defense_order(df: pd.DataFrame, reference: Optional[str]) -> list[str]:
    """The reference first, then the others ranked by mean HS over every cell (lowest first)."""
    ok = df[(df["status"] == "ok") & df["hs"].notna()]
    means = ok.groupby("defense")["hs"].mean()
    names = sorted(df["defense"].dropna().unique(), key=lambda d: (means.get(d, math.inf), d))
    if reference in names:
        names.remove(reference)
        names.insert(0, reference)
    return names
