"""Sweep report: collect ``results.json`` files into a table and plots anyone can read offline.

    python -m harness.report multirun/2026-11-23/10-00-00            # a sweep folder
    python -m harness.report "multirun/**" --axis attack.p --out report/

Writes ``report.md``, ``report.html``, ``results.csv`` and PNG plots (HS and FA against the swept
axis, one line per defense, with a ±1 std band over seeds; a Pareto plot of HS against FA) into
``--out`` (default: the folder).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from harness.tracking.results import RESULTS_FILE

log = logging.getLogger(__name__)

METRICS = ("hs", "fa", "refusal_rate", "other_rate", "p_comply_opening", "hs_sampled")
LABELS = {"hs": "HS (%)", "fa": "FA (%)", "refusal_rate": "refusal (%)",
          "other_rate": "other (%)", "p_comply_opening": "P(compliance opening) (%)",
          "hs_sampled": "HS, sampled (%)"}
AXES = {"attack.p": ("attack", "p"), "attack.n": ("attack", "n"), "task": ("task", "name"),
        "model": ("model", "name"), "seed": ("seed",), "defense": ("defense", "name"),
        "protocol": ("protocol", "name"), "attack": ("attack", "name")}


class ProtocolMixError(ValueError):
    """Runs under different protocols (hashes) would share a table cell."""


def _get(config: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config if config != {} else None


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
    """One row per run: its axes, status and the stage's metrics."""
    rows = []
    for path in paths:
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping %s: %s", path, err)
            continue
        cfg = res.get("config", {})
        row: dict[str, Any] = {"path": str(path.parent), "status": res.get("status")}
        for axis, keys in AXES.items():
            row[axis] = _get(cfg, keys)
        record = res.get("protocol") or {}
        row["protocol"] = record.get("name", row["protocol"])
        row["protocol_hash"] = record.get("hash")
        metrics = res.get("metrics", {}).get(stage, {})
        for m in METRICS:
            row[m] = metrics.get(m)
        row["error"] = (res.get("error") or "").split("\n")[0] or None
        rows.append(row)
    return pd.DataFrame(rows)


def aggregate(df: pd.DataFrame, axis: str, metrics=("hs", "fa")) -> pd.DataFrame:
    ok = df[df["status"] == "ok"]
    agg = ok.groupby(["defense", axis])[list(metrics)].agg(["mean", "std", "count"])
    return agg


def mixed_protocol_columns(df: pd.DataFrame, axis: str, allow: bool = False) -> set:
    """The axis values whose cells hold runs of more than one protocol hash.

    Such runs were scored or trained differently, so their mean is not a number any paper
    reports: refuse unless ``allow`` (``--mix-protocols``), and then the header says so.
    """
    ok = df[df["status"] == "ok"]
    if ok.empty or "protocol_hash" not in ok:
        return set()
    keyed = ok.assign(protocol_hash=ok["protocol_hash"].fillna("unrecorded"))
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


def table_markdown(df: pd.DataFrame, axis: str, mixed: frozenset = frozenset(),
                   metrics: tuple[str, str] = ("hs", "fa")) -> str:
    """Rows: defenses; columns: the swept values; cells: HS / FA (or another pair of
    ``metrics``) as mean ± std over seeds.

    ``mixed``: axis values whose cells average runs of several protocols (marked in the header).
    """
    first, second = metrics
    agg = aggregate(df, axis, metrics)
    values = sorted(agg.index.get_level_values(axis).unique(), key=_sort_key)
    head = "| defense | " + " | ".join(
        f"{axis}={v}" + (" (mixed protocols)" if v in mixed else "") for v in values) + " |"
    lines = [head, "|" + "---|" * (len(values) + 1)]
    for defense in sorted(agg.index.get_level_values("defense").unique()):
        cells = []
        for v in values:
            if (defense, v) not in agg.index:
                cells.append("—")
                continue
            r = agg.loc[(defense, v)]
            cells.append(f"{_pm(r[(first, 'mean')], r[(first, 'std')])} / "
                         f"{_pm(r[(second, 'mean')], r[(second, 'std')])}")
        lines.append(f"| {defense} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.1f}" if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def _sort_key(v: Any):
    return (0, float(v)) if isinstance(v, (int, float)) else (1, str(v))


def plot_metrics(df: pd.DataFrame, axis: str, out: Path, metrics: tuple[str, ...],
                 title: str = "") -> Optional[Path]:
    """One panel per metric against the axis, one line per defense, ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"]
    metrics = tuple(m for m in metrics if ok[m].notna().any())
    if ok.empty or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    numeric = pd.api.types.is_numeric_dtype(ok[axis])
    for ax, metric in zip(axes[0], metrics):
        for defense, group in ok.groupby("defense"):
            stats = group.groupby(axis)[metric].agg(["mean", "std"]).sort_index(
                key=lambda idx: idx.map(_sort_key))
            x = stats.index if numeric else range(len(stats))
            ax.plot(x, stats["mean"], marker="o", label=defense)
            ax.fill_between(x, stats["mean"] - stats["std"].fillna(0),
                            stats["mean"] + stats["std"].fillna(0), alpha=0.2)
            if not numeric:
                ax.set_xticks(list(x), [str(v) for v in stats.index], rotation=30)
        ax.set_xlabel(axis)
        ax.set_ylabel(LABELS[metric])
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out / f"{'_'.join(metrics)}_vs_{axis.replace('.', '_')}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(df: pd.DataFrame, axis: str, out: Path, title: str = "") -> Optional[Path]:
    """HS against FA, one marker series per defense, each point a value of the axis: the best
    defenses sit bottom right (high FA, low HS); the dashed line joins the non-dominated points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[(df["status"] == "ok") & df["hs"].notna() & df["fa"].notna()]
    if ok.empty:
        return None
    points = ok.groupby(["defense", axis])[["hs", "fa"]].mean().reset_index()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for defense, group in points.groupby("defense"):
        ax.scatter(group["fa"], group["hs"], label=defense, s=28)
        for value, fa, hs in zip(group[axis], group["fa"], group["hs"]):
            ax.annotate(str(value), (fa, hs), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    front = pareto_front(points)
    ax.plot(front["fa"], front["hs"], "k--", lw=0.8, alpha=0.6, label="Pareto front")
    ax.set_xlabel(LABELS["fa"])
    ax.set_ylabel(LABELS["hs"])
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title((title + "\n" if title else "") + f"points labelled by {axis}", fontsize=8)
    fig.tight_layout()
    path = out / f"pareto_hs_fa_by_{axis.replace('.', '_')}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Points no other point beats on both counts (FA at least as high and HS at least as low,
    one strictly), sorted by FA."""
    keep = [not ((points["fa"] >= r.fa) & (points["hs"] <= r.hs)
                 & ((points["fa"] > r.fa) | (points["hs"] < r.hs))).any()
            for r in points.itertuples()]
    return points[keep].sort_values("fa")


def protocol_names(df: pd.DataFrame) -> str:
    names = sorted({str(n) for n in df.loc[df["status"] == "ok", "protocol"].dropna()})
    return ", ".join(names) or "unrecorded"


def write_report(patterns: list[str], out: Path, axis: str = "attack.p", stage: str = "final",
                 title: str = "", mix_protocols: bool = False) -> Path:
    paths = find_results(patterns)
    if not paths:
        raise SystemExit(f"no {RESULTS_FILE} found under {patterns}")
    df = collect(paths, stage)
    mixed = mixed_protocol_columns(df, axis, allow=mix_protocols)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    title = (title or f"{stage} model, by {axis}") + f" (protocol: {protocol_names(df)})"
    plots = [p for p in (plot_metrics(df, axis, out, ("hs", "fa"), title),
                         plot_metrics(df, axis, out, ("p_comply_opening", "hs_sampled",
                                                      "other_rate"), title),
                         plot_pareto(df, axis, out, title)) if p]
    failed = df[df["status"] != "ok"]
    md = [f"# {title}", "", f"{len(df)} runs, {len(failed)} failed. Cells: HS / FA "
          f"(mean ± std over seeds, percent).", "", table_markdown(df, axis, frozenset(mixed)),
          ""]
    if df["refusal_rate"].notna().any() and df["other_rate"].notna().any():
        # a low HS is a refusal or a broken answer: the judge's other two classes tell which
        md += ["Refusal / other (percent): what the answers that were not harmful were.", "",
               table_markdown(df, axis, frozenset(mixed), ("refusal_rate", "other_rate")), ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    if len(failed):
        md += ["", "## Failed runs", ""] + [f"- `{r.path}`: {r.error}" for r in
                                             failed.itertuples()]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    _write_html(out / "report.html", title, df, axis, plots)
    return out / "report.md"


def _write_html(path: Path, title: str, df: pd.DataFrame, axis: str, plots: list[Path]) -> None:
    ok = df[df["status"] == "ok"]
    table = ok.groupby(["defense", axis])[["hs", "fa"]].agg(["mean", "std"]).round(1).to_html()
    imgs = "".join(f'<p><img src="{p.name}" style="max-width:100%"></p>' for p in plots)
    path.write_text(f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>"
                    f"<h1>{title}</h1>{table}{imgs}</body></html>")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="sweep folders, run folders or globs")
    parser.add_argument("--axis", default="attack.p", choices=sorted(AXES),
                        help="the swept axis for columns and x-axes (default: attack.p)")
    parser.add_argument("--stage", default="final", choices=("base", "align", "final"))
    parser.add_argument("--out", type=Path, help="output folder (default: the first path)")
    parser.add_argument("--title", default="")
    parser.add_argument("--mix-protocols", action="store_true",
                        help="allow runs of different protocol hashes in one cell (the column "
                             "header then says so)")
    args = parser.parse_args(argv)
    out = args.out or Path(args.paths[0])
    try:
        report = write_report(args.paths, out, args.axis, args.stage, args.title,
                              args.mix_protocols)
    except ProtocolMixError as err:
        raise SystemExit(f"report refused: {err}") from None
    print(report.read_text())
    print(f"report: {report}")


if __name__ == "__main__":
    main(sys.argv[1:])
