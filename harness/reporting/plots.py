"""Plots people would rather look at than read: metrics against the swept axis with their
interval bands, and HS against FA zoomed to where the points are."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from harness.reporting.cells import LABELS, Cell, build_cells, sort_key

MARKERS = "osD^vP*Xh<>"


def headless_pyplot():
    """pyplot on the file-only backend: reports are drawn on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(df: pd.DataFrame, axis: str, out: Path, metrics: tuple[str, ...],
                 order: list[str], title: str = "") -> Optional[Path]:
    """One panel per metric against the axis, one line per defense, its interval as a band
    (Student t over seeds, or the prompt interval for one seed: the table's interval)."""
    ok = df[df["status"] == "ok"]
    metrics = tuple(m for m in metrics if m in ok and ok[m].notna().any())
    if ok.empty or not metrics:
        return None
    plt = headless_pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    values = sorted(ok[axis].dropna().unique(), key=sort_key)
    numeric = all(isinstance(v, (int, float)) for v in values)
    position = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    drawn = False
    for ax, metric in zip(axes[0], metrics):
        cells = build_cells(df, axis, metric)
        lo_all, hi_all = [], []
        for i, defense in enumerate(order):
            line: list[Cell] = sorted((c for (d, _), c in cells.items()
                                       if d == defense and c.mean is not None),
                                      key=lambda c: sort_key(c.value))
            if not line:
                continue
            x = [position[c.value] for c in line]
            y = [c.mean for c in line]
            ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], ms=4, label=defense)
            lo = [c.low if c.low is not None else c.mean for c in line]
            hi = [c.high if c.high is not None else c.mean for c in line]
            ax.fill_between(x, lo, hi, alpha=0.15)
            lo_all += lo
            hi_all += hi
            drawn = True
        if not numeric:
            ax.set_xticks(list(position.values()), [str(v) for v in values], rotation=30)
        ax.set_xlabel(axis)
        ax.set_ylabel(LABELS[metric])
        if not lo_all:  # every cell mixed or failed: nothing to draw, say why
            ax.text(0.5, 0.5, "no cell has a value\n(mixed or failed runs)", ha="center",
                    va="center", transform=ax.transAxes)
            continue
        pad = max((max(hi_all) - min(lo_all)) * 0.06, 1.0)
        ax.set_ylim(max(min(lo_all) - pad, -2), min(max(hi_all) + pad, 102))
        ax.grid(alpha=0.3)
    if not drawn:  # every cell mixed or failed: no plot rather than empty axes
        plt.close(fig)
        return None
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / f"{'_'.join(metrics)}_vs_{axis.replace('.', '_')}.png"
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


def plot_pareto(df: pd.DataFrame, axis: str, out: Path, order: list[str],
                title: str = "") -> Optional[Path]:
    """HS against FA, each defense a path through the axis values (labelled at its ends), the
    axes zoomed to the points: the best sit bottom right; the dashed line joins the
    non-dominated points."""
    ok = df[(df["status"] == "ok") & df["hs"].notna() & df["fa"].notna()]
    if ok.empty:
        return None
    # the tables' cells: a mean over seeds, and no point for a mixed cell
    hs, fa = build_cells(ok, axis, "hs"), build_cells(ok, axis, "fa")
    points = pd.DataFrame([{"defense": d, axis: v, "hs": c.mean, "fa": fa[(d, v)].mean}
                           for (d, v), c in hs.items()
                           if c.mean is not None and fa[(d, v)].mean is not None])
    if points.empty:
        return None
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    for i, defense in enumerate(order):
        group = points[points["defense"] == defense]
        if group.empty:
            continue
        group = group.iloc[sorted(range(len(group)), key=lambda j: sort_key(group[axis].iloc[j]))]
        color = f"C{i % 10}"
        ax.plot(group["fa"], group["hs"], color=color, lw=0.8, alpha=0.6)
        ax.scatter(group["fa"], group["hs"], color=color, marker=MARKERS[i % len(MARKERS)],
                   s=30, label=defense, zorder=3)
        for j, (value, fa, hs) in enumerate(zip(group[axis], group["fa"], group["hs"])):
            if j in (0, len(group) - 1):  # the ends of each path say which way the axis runs
                ax.annotate(f"{value}", (fa, hs), fontsize=7, color=color, xytext=(4, 3),
                            textcoords="offset points")
    front = pareto_front(points)
    ax.plot(front["fa"], front["hs"], "k--", lw=0.8, alpha=0.5, label="Pareto front")
    for col, setter in (("fa", ax.set_xlim), ("hs", ax.set_ylim)):
        lo, hi = float(points[col].min()), float(points[col].max())
        pad = max((hi - lo) * 0.08, 1.0)
        setter(max(lo - pad, -2), min(hi + pad, 102))
    ax.set_xlabel(LABELS["fa"])
    ax.set_ylabel(LABELS["hs"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title((title + "\n" if title else "")
                 + f"each path runs through {axis}; its ends are labelled", fontsize=8)
    fig.tight_layout()
    path = out / f"pareto_hs_fa_by_{axis.replace('.', '_')}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


