"""Cells -> Markdown and HTML tables: ``mean ± half-width`` (several seeds) or ``value [low,
high]`` (one seed, the prompt interval), the column's best in bold, cells a paired test cannot
tell from the best marked ≈, failed or missing seeds marked ⚠."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Callable, Optional

from harness.reporting.cells import Cell, sort_key


def fmt(cell: Optional[Cell]) -> str:
    if cell is None:
        return "—"
    if cell.mixed:
        text = "mixed"
    elif cell.mean is None:
        text = "failed" if cell.n_failed else "interrupted" if cell.n_interrupted else "—"
    elif cell.interval == "seeds":
        text = f"{cell.mean:.1f} ± {cell.half_width:.1f}"
    elif cell.interval == "prompts":
        text = f"{cell.mean:.1f} [{cell.low:.1f}, {cell.high:.1f}]"
    else:
        text = f"{cell.mean:.1f} (no interval)"
    return text


def flags(cell: Optional[Cell]) -> str:
    if cell is None:
        return ""
    out = []
    if cell.like_best:
        out.append("≈")
    if cell.mixed:  # never a silent average of runs that are not seeds of one setting
        shown = ", ".join(cell.mixed[:4]) + (", ..." if len(cell.mixed) > 4 else "")
        out.append(f"⚠ {len(cell.per_seed)} runs of {len({s for s, _, _ in cell.per_seed})} "
                   f"seed(s) differ in {shown}: give one as --axis")
    if cell.incapable:  # never bold: its HS is not a working model's
        out.append(f"† {len(cell.incapable)}/{cell.n_ok} seeds fail the capability guard")
    if cell.n_undefined and cell.n_ok:  # the mean is of the seeds where it is defined
        out.append(f"({cell.n_undefined} seed(s) undefined)")
    if cell.n_served_aligned:  # not a finetuned model: the filter left nothing to train on
        out.append(f"ⓐ {cell.n_served_aligned}/{cell.n_ok} filtered whole")
    if not cell.mixed and (cell.n_failed or cell.n_interrupted or cell.missing):
        got = cell.n_ok
        parts = [f"{cell.n_failed} failed"] if cell.n_failed else []
        parts += [f"{cell.n_interrupted} interrupted"] if cell.n_interrupted else []
        parts += [f"{cell.missing} missing"] if cell.missing else []
        out.append(f"⚠ {got}/{cell.n_expected} seeds ({', '.join(parts)})")
    return " ".join(out)


def markdown_cell(cell: Optional[Cell]) -> str:
    text = fmt(cell)
    if cell is not None and cell.best:
        text = f"**{text}**"
    f = flags(cell)
    return f"{text} {f}" if f else text


def values_of(cells: dict) -> list[Any]:
    return sorted({v for _, v in cells}, key=sort_key)


def markdown_table(cells: dict[tuple[str, Any], Cell], axis: str, order: list[str],
                   mixed: frozenset = frozenset()) -> str:
    values = values_of(cells)
    head = "| defense | " + " | ".join(
        f"{axis}={v}" + (" (mixed protocols)" if v in mixed else "") for v in values) + " |"
    lines = [head, "|" + "---|" * (len(values) + 1)]
    for d in order:
        if not any(k[0] == d for k in cells):
            continue
        lines.append(f"| {d} | " + " | ".join(markdown_cell(cells.get((d, v))) for v in values)
                     + " |")
    return "\n".join(lines)


def pair_table(cells: dict[tuple[str, Any], tuple[Any, str]], axis: str, order: list[str],
               render: Callable[[Any, str], str]) -> str:
    """Rows: defenses; columns: axis values; each cell rendered from (difference, reason)."""
    values = values_of(cells)
    lines = ["| defense | " + " | ".join(f"{axis}={v}" for v in values) + " |",
             "|" + "---|" * (len(values) + 1)]
    for d in order:
        if not any(k[0] == d for k in cells):
            continue
        lines.append(f"| {d} | " + " | ".join(
            render(*cells[(d, v)]) if (d, v) in cells else "—" for v in values) + " |")
    return "\n".join(lines)


def difference_text(diff, reason: str) -> str:
    if diff is None:
        return f"unpaired ({reason})"
    text = f"{diff.mean:+.1f} [{diff.low:+.1f}, {diff.high:+.1f}]"
    text = text if diff.distinguishable else f"{text} n.d."
    return f"{text} ⚠ {reason}" if reason else text


# ---------------------------------------------------------------- HTML
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
td.best { background: #d8f0d8; font-weight: bold; }
td.like-best { background: #eef8ee; }
td.warn { outline: 2px solid #d08000; }
td.guard { color: #999; text-decoration: line-through dotted; }
td.nd { color: #777; }
td.sig-worse { background: #fbe3e3; }
td.sig-better { background: #dff0df; }
a.run { font-size: 0.75em; color: #36c; margin-left: 0.25em; text-decoration: none; }
.meta { font-size: 0.9em; color: #444; }
.meta code { background: #f5f5f5; padding: 0 0.25em; }
.note { font-size: 0.88em; color: #555; max-width: 60em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
"""


def _link(path: str, out: Path, label: str) -> str:
    rel = os.path.relpath(path, out)
    return f'<a class="run" href="{html.escape(rel)}" title="{html.escape(path)}">{label}</a>'


def html_table(cells: dict[tuple[str, Any], Cell], axis: str, order: list[str],
               out: Path, mixed: frozenset = frozenset()) -> str:
    values = values_of(cells)
    head = "".join(f"<th>{html.escape(f'{axis}={v}')}"
                   + (" (mixed protocols)" if v in mixed else "") + "</th>" for v in values)
    rows = [f"<tr><th>defense</th>{head}</tr>"]
    for d in order:
        if not any(k[0] == d for k in cells):
            continue
        tds = []
        for v in values:
            c = cells.get((d, v))
            cls = []
            if c is not None:
                cls += ["best"] if c.best else ["like-best"] if c.like_best else []
                cls += ["warn"] if (c.n_failed or c.missing) else []
                cls += ["guard"] if c.incapable else []
            links = "" if c is None else "".join(
                _link(p, out, f"s{s}") for s, _, p in c.per_seed) + "".join(
                _link(p, out, "✗") for p in c.failed_paths)
            f = flags(c)
            tds.append(f'<td class="{" ".join(cls)}">{html.escape(fmt(c))}'
                       + (f" {html.escape(f)}" if f else "") + f"{links}</td>")
        rows.append(f"<tr><td>{html.escape(str(d))}</td>{''.join(tds)}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def html_pair_table(cells: dict, axis: str, order: list[str], lower_is_better: bool,
                    render: Callable[[Any, str], str] = difference_text) -> str:
    values = values_of(cells)
    rows = ["<tr><th>defense</th>" + "".join(f"<th>{html.escape(f'{axis}={v}')}</th>"
                                             for v in values) + "</tr>"]
    for d in order:
        if not any(k[0] == d for k in cells):
            continue
        tds = []
        for v in values:
            diff, reason = cells.get((d, v), (None, "no runs"))
            if render is not difference_text:
                cls = ""
            elif diff is None:
                cls = "nd"
            elif not diff.distinguishable:
                cls = "nd"
            else:
                better = diff.mean < 0 if lower_is_better else diff.mean > 0
                cls = "sig-better" if better else "sig-worse"
            tds.append(f'<td class="{cls}">{html.escape(render(diff, reason))}</td>')
        rows.append(f"<tr><td>{html.escape(str(d))}</td>{''.join(tds)}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def per_seed_text(cell: Optional[Cell]) -> str:
    """``s0 22.2, s1 30.1 †, s2 ✗``: each seed's value, failed seeds and seeds failing the
    capability guard marked."""
    if cell is None:
        return "—"
    parts = [f"s{seed} {value:.1f}" + (" †" if seed in cell.incapable else "")
             for seed, value, _ in cell.per_seed]
    parts += ["✗"] * cell.n_failed
    return ", ".join(parts) or "—"
