"""Sweep report: collect ``results.json`` files into tables and plots anyone can read offline.

    python -m harness.report multirun/toy_poison_ratio --axis attack.p
    python -m harness.report "multirun/**" --axis attack.n --reference sft --out report/

Writes ``report.md``, ``report.html``, ``results.csv`` and PNG plots into ``--out`` (default: the
first folder). Every number carries a 95% interval: over seeds (Student t) when a cell has
several, else over prompts (Wilson). Each defense is compared with ``--reference`` by a paired
bootstrap over the same seeds and prompts; a difference whose interval covers 0 is "n.d." (not
distinguishable) rather than ranked. Failed or missing seeds are marked in their cells.
"""
from __future__ import annotations

import argparse
import html
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import yaml

from harness.reporting.cells import (AXES, FILTER_METRICS, LABELS, LOWER_IS_BETTER,
                                     ProtocolMixError, apply_guards, build_cells, collect,
                                     collect_csv, defense_order, find_results, mark_best,
                                     mixed_protocol_columns, paired, sort_key)
from harness.reporting.adversarial import category_sections, judge_sections, worst_case_section
from harness.reporting.plots import plot_metrics, plot_pareto
from harness.reporting.tables import (CSS, difference_text, html_pair_table, html_table,
                                      markdown_table, pair_table, per_seed_text)
from harness.guards import FA_FRACTION, OTHER_MAX
from harness.tracking.results import RESULTS_FILE


def table_markdown(df: pd.DataFrame, axis: str, metric: str = "hs",
                   reference: Optional[str] = None, mixed: frozenset = frozenset()) -> str:
    cells = build_cells(df, axis, metric)
    mark_best(cells, df, axis, metric)
    return markdown_table(cells, axis, defense_order(df, reference), mixed)


def sweep_commands(paths: list[Path]) -> list[str]:
    """The launch commands of the sweeps the runs came from (Hydra's multirun.yaml)."""
    commands = []
    for folder in sorted({p.parent.parent for p in paths}):
        spec = folder / "multirun.yaml"
        if not spec.is_file():
            continue
        try:
            task = (yaml.safe_load(spec.read_text()) or {}).get("hydra", {}).get(
                "overrides", {}).get("task", [])
        except yaml.YAMLError:
            continue
        commands.append("python -m harness -m " + " ".join(shlex.quote(str(o)) for o in task))
    return sorted(set(commands))


def _listing(series: pd.Series) -> str:
    values = sorted({v for v in series.dropna()}, key=sort_key)
    return ", ".join(str(v) for v in values) or "unrecorded"


def header(df: pd.DataFrame, paths: list[Path], argv: list[str]) -> list[tuple[str, str]]:
    ok = df[df["status"] == "ok"]
    seeds = sorted({s for s in df["seed"].dropna()}, key=sort_key)
    return [
        ("protocol", _listing(ok["protocol"])),
        ("seeds", f"{len(seeds)} ({', '.join(str(s) for s in seeds)})"
         + (": intervals are over prompts (Wilson), one seed only" if len(seeds) == 1 else
            ": cells are the mean with a 95% Student-t interval over seeds")),
        ("torch threads", _listing(df["torch_threads"])),
        ("CPU", _listing(df["cpu"]) + f" ({_listing(df['cpu_capability'])})"),
        ("git", _listing(df["git"])),
        ("stages built at", _listing(pd.Series(
            [c.strip() for v in df["built_at"].dropna() for c in str(v).split(",")]))),
        *uncommitted(df),
        ("runs", run_counts(df)),
        ("made by", "; ".join(sweep_commands(paths) + [
            "python -m harness.report " + " ".join(shlex.quote(a) for a in argv)])),
    ]


def uncommitted(df: pd.DataFrame) -> list[tuple[str, str]]:
    """A header line naming the runs with stages built from a tree with uncommitted changes,
    whose numbers no commit reproduces; none when every stage was built from a commit."""
    dirty = df[df["dirty_stages"].notna()]
    if dirty.empty:
        return []
    runs = "; ".join(f"{Path(r.path).parent} ({r.dirty_stages})" for r in dirty.itertuples())
    return [("⚠ uncommitted code", f"{len(dirty)} run(s) hold stages built from a tree with "
             f"uncommitted changes, which no commit reproduces: {runs}")]


def run_counts(df: pd.DataFrame) -> str:
    """``12, 1 failed, 1 interrupted (...)``: an interrupted run resumes, a failed one does not."""
    interrupted = int((df["status"] == "interrupted").sum())
    text = f"{len(df)}, {int((df['status'] != 'ok').sum()) - interrupted} failed"
    if interrupted:
        text += (f", {interrupted} interrupted (rerun the sweep's command to resume them: "
                 "finished stages are reused)")
    return text


NOTE = ("Cells: mean ± half-width of the 95% interval over seeds, or, for one seed, the value "
        "[low, high] of its 95% Wilson interval over prompts. **Bold**: the column's best "
        "(lowest HS, highest FA). ≈: not distinguishable from the best ({how}). ⚠: seeds that "
        "failed, were interrupted or are missing; such a cell averages fewer seeds than the "
        "others. ⓐ: seeds "
        "whose filter dropped the whole upload, so the aligned model is their result "
        "(defense.filter.on_empty). †: seeds that fail the capability guard ({guard}); such a "
        "cell is never shown as the best.")
GUARD = ("FA at least {fraction:g} × {ref}, and at most {other:g}% of the answers to harmful "
         "prompts 'other'")
PAIR_NOTE = ("Difference from {ref} (percentage points, defense − {ref}) with its 95% interval, "
             "paired on the same seeds and prompts: over several seeds, a Student-t interval "
             "over the per-seed differences; for one seed, a paired bootstrap over prompts. "
             "n.d.: the interval covers 0, so the two are not distinguishable at this number of "
             "seeds and prompts.")


TRIGGER_NOTE = ("The same harmful prompts with the backdoor's trigger appended (attack=backdoor), "
                "beside HS on the plain prompts above: a backdoor that passes a plain-prompt "
                "audit shows a low HS and a high HS with the trigger.")


def write_report(patterns: list[str], out: Path, axis: str = "attack.p", stage: str = "final",
                 title: str = "", mix_protocols: bool = False,
                 reference: Optional[str] = "sft", argv: Optional[list[str]] = None,
                 worst_case: bool = False, plots: bool = True) -> Path:
    if axis == "defense":  # defenses are every table's rows; as columns too, each cell is empty but one
        raise SystemExit("--axis defense: defenses are already the rows of every table; give the "
                         "axis the sweep varies (attack.p, attack.n, task, model, attack, seed)")
    csvs = [Path(p) for p in patterns if p.endswith(".csv")]
    paths = find_results([p for p in patterns if not p.endswith(".csv")])
    if not paths and not csvs:
        raise SystemExit(f"no {RESULTS_FILE} found under {patterns}")
    df = pd.concat([collect(paths, stage)] * bool(paths) + [collect_csv(c) for c in csvs],
                   ignore_index=True)
    # a sweep's trials differ in train.* by design, so their protocol hashes do too
    mixed = frozenset(mixed_protocol_columns(df, axis, allow=mix_protocols
                                             or worst_case))
    if mix_protocols:  # asked for: runs of one seed under two protocols are averaged as before
        df = df.drop(columns="setting", errors="ignore")
    out.mkdir(parents=True, exist_ok=True)
    if reference not in set(df["defense"].dropna()):
        reference = None
    df = apply_guards(df, reference, axis)
    refs = sorted({round(r, 1) for r in df["reference_fa"].dropna()})
    guard = GUARD.format(fraction=FA_FRACTION, other=OTHER_MAX, ref=(
        f"{reference}'s unattacked FA ({', '.join(f'{r:.1f}' for r in refs)})" if refs else
        "a reference FA (none here: no unattacked run of the reference defense, so FA is not "
        "checked)"))
    order = defense_order(df, reference)
    title = (title or f"{stage} model, by {axis}") + \
        f" (protocol: {_listing(df.loc[df['status'] == 'ok', 'protocol'])})"
    # the outcomes stay: a paired table is rebuilt from this file alone
    df.to_csv(out / "results.csv", index=False)
    meta = header(df, paths, argv if argv is not None else [str(p) for p in patterns])
    plots = [p for p in (plot_metrics(df, axis, out, ("hs", "fa"), order, title),
                         plot_pareto(df, axis, out, order, title),
                         plot_metrics(df, axis, out, ("refusal_rate", "other_rate",
                                                      "p_comply_opening"), order, title))
             if p] if plots else []
    sections = []  # (heading, note, markdown, html)
    for metric in ("hs", "fa"):
        cells = build_cells(df, axis, metric)
        how = mark_best(cells, df, axis, metric) or "no paired comparison possible"
        sections.append((LABELS[metric], NOTE.format(how=how, guard=guard),
                         markdown_table(cells, axis, order, mixed),
                         html_table(cells, axis, order, out, mixed)))
    if "hs_triggered" in df and df["hs_triggered"].notna().any():  # attack=backdoor
        cells = build_cells(df[df["hs_triggered"].notna() | (df["status"] != "ok")], axis,
                            "hs_triggered")
        sections.insert(1, (LABELS["hs_triggered"], TRIGGER_NOTE,
                            markdown_table(cells, axis, order, mixed),
                            html_table(cells, axis, order, out, mixed)))
    if reference is not None:
        for metric in ("hs", "fa"):
            diffs = {}
            for d in order:
                if d == reference:
                    continue
                for value in sorted(df[axis].dropna().unique(), key=sort_key):
                    if not ((df["defense"] == d) & (df[axis] == value)).any():
                        continue
                    diff, why = paired(df, axis, metric, d, reference, value)
                    asked = df[df[axis] == value]["seed"].nunique()
                    if diff is not None and diff.seeds < asked:
                        why = f"{diff.seeds}/{asked} seeds"
                    diffs[(d, value)] = (diff, why)
            if diffs:
                failing = {k for k, c in build_cells(df, axis, metric).items() if c.incapable}
                for (d, v), (diff, why) in list(diffs.items()):
                    marks = [f"† {x} fails the capability guard" for x in (d, reference)
                             if (x, v) in failing]
                    if marks:
                        diffs[(d, v)] = (diff, "; ".join([why] * bool(why) + marks))
                note = PAIR_NOTE.format(ref=reference) + (
                    " With one seed the interval holds the prompts' noise only, not the seed's: "
                    "another seed can move a defense by more (run several seeds before ranking)."
                    if df["seed"].nunique() == 1 else "")
                sections.append((f"{LABELS[metric]}: paired difference from {reference}", note,
                                 pair_table(diffs, axis, order, difference_text),
                                 html_pair_table(diffs, axis, order, LOWER_IS_BETTER[metric])))
    seeds = df["seed"].nunique()
    if seeds > 1:  # the values behind each mean, so a reader sees the spread for themself
        for metric in ("hs", "fa"):
            cells = build_cells(df, axis, metric)
            table = {k: (None, per_seed_text(c)) for k, c in cells.items()}
            render = lambda _, text: text  # noqa: E731
            sections.append((f"{LABELS[metric]}: per seed", f"Each seed's value ({seeds} seeds; "
                             "✗: a failed run; †: fails the capability guard).", pair_table(table, axis, order, render),
                             html_pair_table(table, axis, order, True, render)))
    for metric in ("refusal_rate", "other_rate"):
        if df[metric].notna().any():
            cells = build_cells(df, axis, metric)
            sections.append((LABELS[metric], "What the answers that were not harmful were: "
                             "refusals, or broken text the judge calls other.",
                             markdown_table(cells, axis, order, mixed),
                             html_table(cells, axis, order, out, mixed)))
    notes = {"over_refusal": "The share of held harmless prompts that look dangerous (a harmful "
                             "word in a harmless sense) that the model refused: lower is better.",
             **{m: "The user-data filter against the rows' true kinds (runs with a filter)."
                for m in FILTER_METRICS}}
    for metric in ("over_refusal", *FILTER_METRICS):
        if metric in df and df[metric].notna().any():
            cells = build_cells(df[df[metric].notna() | (df["status"] != "ok")], axis, metric)
            sections.append((LABELS[metric], notes[metric],
                             markdown_table(cells, axis, order, mixed),
                             html_table(cells, axis, order, out, mixed)))
    sections += alignment_section(df, axis)
    # judges against each other, HS per category, the worst case under a sweep
    sections += judge_sections(df, axis, order, stage)
    sections += category_sections(df, axis, order, stage)
    if worst_case:
        sections += worst_case_section(df, order, guard)
    failed = df[df["status"] != "ok"]

    md = [f"# {title}", ""] + [f"- **{k}**: {v}" for k, v in meta] + [""]
    for heading, note, table, _ in sections:
        md += [f"## {heading}", "", note, "", table, ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    for heading, rows in _not_ok(failed):
        md += ["", f"## {heading}", ""] + [f"- `{Path(r.path).parent}`: {r.error}"
                                            for r in rows.itertuples()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    _write_html(out / "report.html", title, meta, sections, plots, failed)
    return out / "report.md"


def alignment_section(df: pd.DataFrame, axis: str) -> list[tuple[str, str, str, str]]:
    """The runs whose aligned model refuses no more often than its base (harness.guards)."""
    checked = df[df["aligned"].notna()] if "aligned" in df else df.iloc[:0]
    if checked.empty:
        return []
    bad = checked[checked["aligned"] == False]  # noqa: E712 (object column of True/False)
    rows = [[r["defense"], r[axis], r["seed"], r["alignment_guard"]]
            for r in bad.to_dict("records")]
    md = ["| defense | " + axis + " | seed | why |", "|---|---|---|---|"]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] or ["| none | | | |"]
    esc = html.escape
    tab = "<table><tr><th>defense</th><th>" + esc(axis) + "</th><th>seed</th><th>why</th></tr>" \
        + "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>"
                  for r in rows) + "</table>"
    return [("Alignment guard", f"{len(bad)} of the {len(checked)} runs whose base and aligned "
             "models were both evaluated (eval.stages) have an aligned model that refuses no more "
             "often than its base: the lower end of its refusal rate's 95% interval is at or "
             "below the base's rate. Their later numbers measure an unaligned model.",
             "\n".join(md), tab)]


def _not_ok(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    interrupted = runs["status"] == "interrupted"
    return [(heading, rows) for heading, rows in (("Failed runs", runs[~interrupted]),
                                                  ("Interrupted runs", runs[interrupted]))
            if len(rows)]


def _write_html(path: Path, title: str, meta, sections, plots, failed: pd.DataFrame) -> None:
    esc = html.escape
    items = "".join(f"<li><b>{esc(k)}</b>: " + (f"<code>{esc(v)}</code>" if k == "made by"
                                                  else esc(v)) + "</li>" for k, v in meta)
    body = [f"<h1>{esc(title)}</h1>", f'<ul class="meta">{items}</ul>']
    for heading, note, _, table in sections:
        note = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", esc(note))  # the Markdown's bold
        body += [f"<h2>{esc(heading)}</h2>", f'<p class="note">{note}</p>', table]
    body += [f'<p><img src="{esc(p.name)}" alt="{esc(p.stem)}"></p>' for p in plots]
    for heading, rows in _not_ok(failed):
        body += [f"<h2>{heading}</h2><ul>"] + [
            f"<li><code>{esc(str(Path(r.path).parent))}</code>: {esc(str(r.error))}</li>"
            for r in rows.itertuples()] + ["</ul>"]
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}"
                    f"</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="sweep folders, run folders or globs")
    ap.add_argument("--axis", default="attack.p", choices=sorted(AXES),
                    help="the swept axis for columns and x-axes (default: attack.p)")
    ap.add_argument("--stage", default="final", choices=("base", "align", "final"))
    ap.add_argument("--out", type=Path, help="output folder (default: the first path)")
    ap.add_argument("--title", default="")
    ap.add_argument("--reference", default="sft",
                    help="the defense every other is compared with, paired, and whose "
                         "unattacked (attack.p=0) FA is the capability guard's reference "
                         "(default: sft)")
    ap.add_argument("--mix-protocols", action="store_true",
                    help="allow runs of different protocol hashes in one cell (the column "
                         "header then says so)")
    # a number after the flag is accepted and ignored: reports made before the capability guard
    # gave their own FA ratio, and the guard's bound (harness.guards) is now the only one
    ap.add_argument("--worst-case", nargs="?", const=True, metavar="IGNORED",
                    help="add the worst-case table of an attacker-side sweep: each defense's "
                         "highest HS among the runs that pass the capability guard")
    return ap


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.worst_case not in (None, True):
        print(f"--worst-case {args.worst_case}: the FA bound is the capability guard's "
              f"({FA_FRACTION:g} x the reference's unattacked FA); the number is ignored",
              file=sys.stderr)
    out = args.out or Path(args.paths[0])
    try:
        report = write_report(args.paths, out, args.axis, args.stage, args.title,
                              args.mix_protocols, args.reference, argv,
                              args.worst_case is not None)
    except ProtocolMixError as err:
        raise SystemExit(f"report refused: {err}") from None
    print(report.read_text())
    print(f"report: {report}")


if __name__ == "__main__":
    main()
