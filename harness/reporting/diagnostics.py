"""Ref-Teacher's two diagnostic figures, drawn from plain data: the gradient SNR and the
user/alignment gradient cosine over finetune steps (its Figure A2), and each model's per-prompt
refusal-feature cosines by prompt kind (its Figures A3/A4, box plots)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from harness.reporting.plots import MARKERS, headless_pyplot

# one colour per prompt kind, the same in every model's group
KIND_COLOURS = {"harmful": "tab:red", "harmless": "tab:blue", "task": "tab:green"}


def plot_snr_over_steps(series: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> Path:
    """Two panels, one line per run: the user gradient's SNR (log scale: it spans decades) and
    the cosine between the user and alignment gradients, against the finetune step."""
    plt = headless_pyplot()
    fig, (snr_ax, cos_ax) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for i, (label, points) in enumerate(series.items()):
        steps = [p["step"] for p in points]
        style = {"marker": MARKERS[i % len(MARKERS)], "ms": 3, "label": label}
        snr_ax.plot(steps, [p["grad_snr"] for p in points], **style)
        cos_ax.plot(steps, [p["grad_cosine_user_alignment"] for p in points], **style)
    snr_ax.set_yscale("log")
    snr_ax.set_ylabel("user-gradient SNR (4 chunks of the batch)")
    cos_ax.axhline(0.0, color="k", lw=0.8, alpha=0.5)  # below it the two gradients conflict
    cos_ax.set_ylabel("cos(user gradient, alignment gradient)")
    for ax in (snr_ax, cos_ax):
        ax.set_xlabel("finetune step")
        ax.grid(alpha=0.3)
    snr_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_refusal_cosines(models: Sequence[Mapping], path: Path, title: str = "") -> Path:
    """A group of boxes per model (``label``), one box per prompt kind of its ``cosines``
    (whiskers at the 5th and 95th percentiles), each prompt a faint dot over its box: a box
    hides two clusters, the dots show them. cos(f_l(x), R_l) with the model's own R_l; the
    dashed line at 0 separates prompts the feature calls harmful-like (above) from
    harmless-like (below)."""
    import numpy as np

    plt = headless_pyplot()
    jitter = np.random.default_rng(0)  # fixed: the same figure from the same data
    kinds = [k for k in KIND_COLOURS if any(k in m["cosines"] for m in models)]
    kinds += sorted({k for m in models for k in m["cosines"]} - set(kinds))
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.9 * len(models) + 1.5), 4.2))
    for j, kind in enumerate(kinds):
        at = [(i, m["cosines"][kind]) for i, m in enumerate(models) if kind in m["cosines"]]
        positions = [i - 0.4 + width * (j + 0.5) for i, _ in at]
        boxes = ax.boxplot([values for _, values in at], positions=positions,
                           widths=width * 0.85, whis=(5, 95), patch_artist=True,
                           showfliers=False)
        colour = KIND_COLOURS.get(kind, f"C{j % 10}")
        for x, (_, values) in zip(positions, at):
            ax.scatter(x + jitter.uniform(-0.3, 0.3, len(values)) * width, values, s=2,
                       color=colour, alpha=0.35, linewidths=0, zorder=3)
        for box in boxes["boxes"]:
            box.set(facecolor=colour, alpha=0.45)
        for median in boxes["medians"]:
            median.set(color="k")
        ax.plot([], [], "s", color=colour, alpha=0.6, label=kind)  # the legend's swatch
    ax.axhline(0.0, color="k", ls="--", lw=0.8, alpha=0.5)
    ax.set_xticks(range(len(models)), [m["label"] for m in models], fontsize=8)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylabel("cos(f_l(x), R_l)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="prompts", title_fontsize=8)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
