"""Rebuild a committed report from the results file committed beside it.

A report's header records the command that made it ("made by"); its ``results.csv`` holds one
line per run. Rebuilding runs that command's ``harness.report`` part on the committed
``results.csv`` instead of the run folders, which are not committed, and compares the tables:

    python -m harness.reporting.rebuild experiments/toy_poison_ratio            # check
    python -m harness.reporting.rebuild experiments/toy_poison_ratio --write    # regenerate
"""
from __future__ import annotations

import argparse
import html
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd

REPORT = "report.md"
RESULTS = "results.csv"
_MADE_BY = re.compile(r"^- \*\*made by\*\*: (.*)$", re.M)


def report_argv(report: Path) -> list[str]:
    """The ``python -m harness.report`` arguments of the report's "made by" line, less its
    input paths, which a rebuild replaces with the committed results.csv."""
    from harness.report import parser

    found = _MADE_BY.search(report.read_text())
    if not found:
        raise ValueError(f"{report}: no '- **made by**:' line to rebuild it from")
    command = found.group(1).rsplit("python -m harness.report ", 1)
    if len(command) != 2:
        raise ValueError(f"{report}: its made-by line runs no 'python -m harness.report'")
    argv = shlex.split(command[1])
    args = parser().parse_args(argv)
    out = []
    for flag, value in (("--axis", args.axis), ("--stage", args.stage), ("--title", args.title),
                        ("--reference", args.reference)):
        out += [flag, str(value)]
    if args.mix_protocols:
        out.append("--mix-protocols")
    if args.worst_case is not None:
        out.append("--worst-case")
    return out


def tables(markdown: str) -> dict[str, str]:
    """Each ``## heading``'s table (its ``|`` lines), in order."""
    out, heading, rows = {}, "", []
    for line in markdown.splitlines() + ["## "]:
        if line.startswith("## "):
            if rows:
                out[heading] = "\n".join(rows)
            heading, rows = line[3:], []
        elif line.startswith("|"):
            rows.append(line)
    return out


def rebuild(folder: Path, out: Path, results: Optional[Path] = None,
            plots: bool = False) -> Path:
    """Write the report of ``folder`` rebuilt from ``results`` (default: its results.csv) into
    ``out``; returns the rebuilt report.md. The tables only, unless ``plots``."""
    from harness.report import parser, write_report

    results = results or folder / RESULTS
    argv = [str(results), "--out", str(out)] + report_argv(folder / REPORT)
    args = parser().parse_args(argv)
    return write_report(args.paths, out, args.axis, args.stage, args.title, args.mix_protocols,
                        args.reference, argv, args.worst_case is not None, plots=plots)


def differences(folder: Path, results: Optional[Path] = None) -> list[str]:
    """The headings whose tables differ between the committed report and its rebuild."""
    with tempfile.TemporaryDirectory() as tmp:
        got = tables(rebuild(folder, Path(tmp), results).read_text())
    want = tables((folder / REPORT).read_text())
    return [h for h in dict.fromkeys([*want, *got]) if want.get(h) != got.get(h)]


def write(folder: Path) -> None:
    """Regenerate the report in place. The committed results.csv keeps every value it held; the
    columns the report adds (the guards' verdicts) are appended."""
    before = pd.read_csv(folder / RESULTS)
    found = _MADE_BY.search((folder / REPORT).read_text())
    launch = found.group(1).rsplit("python -m harness.report ", 1)[0] if found else ""
    rebuild(folder, folder, plots=True)
    if launch:  # the runs' own commands, which a report from a results.csv cannot know
        for name in (REPORT, "report.html"):
            path = folder / name
            path.write_text(_prefix(path.read_text(), launch, html_escaped=name != REPORT))
    after = pd.read_csv(folder / RESULTS)
    kept = [c for c in before if c in after]
    pd.testing.assert_frame_equal(before[kept], after[kept], check_dtype=False)


def _prefix(text: str, launch: str, html_escaped: bool) -> str:
    """``text`` with the runs' launch commands before its first report command."""
    marker = "python -m harness.report "
    return text.replace(marker, (html.escape(launch) if html_escaped else launch) + marker, 1)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m harness.reporting.rebuild",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="folders holding report.md and "
                    "results.csv")
    ap.add_argument("--write", action="store_true", help="regenerate the report in place")
    args = ap.parse_args(argv)
    bad = 0
    for folder in args.folders:
        if args.write:
            write(folder)
            print(f"{folder}: regenerated")
            continue
        diff = differences(folder)
        bad += bool(diff)
        print(f"{folder}: " + ("tables as committed" if not diff else
                               "differs in " + "; ".join(diff)))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
