"""The noise-floor study's two tables, from its results.json files.

    python experiments/thread_noise/analyse.py experiments/thread_noise multirun/toy_thread_noise \
        multirun/toy_thread_noise_sft

- noise_floor.md: for each defense, p and seed, HS and FA at 1 and at 2 torch threads and the
  difference; then, per metric, the mean and largest |difference| and the paired difference
  (2 threads - 1 thread) over seeds and prompts with its 95% interval (harness.stats).
- margins.md: the end-to-end test's checks (tests/e2e_checks.py) on every seed and thread
  count; a margin >= 0 passes, and the test asserts only checks whose smallest margin is >= 0.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from harness.stats import paired_difference, unpack  # noqa: E402
from tests.e2e_checks import CHECKS, RUNS  # noqa: E402


def load(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.rglob("results.json")):
        res = json.loads(path.read_text())
        if res.get("status") == "ok":
            runs.append(res)
    return runs


def noise_floor(runs: list[dict]) -> str:
    by = defaultdict(dict)  # (defense, p, seed) -> threads -> final metrics
    for r in runs:
        c = r["config"]
        by[(c["defense"]["name"], float(c["attack"]["p"]), c["seed"])][c["torch_threads"]] = \
            r["metrics"]["final"]
    lines = ["| defense | p | seed | HS, 1 thread | HS, 2 threads | Δ HS | FA, 1 | FA, 2 | Δ FA |",
             "|---|---|---|---|---|---|---|---|---|"]
    deltas = {"hs": [], "fa": []}
    pairs = {"hs": ([], []), "fa": ([], [])}
    for (d, p, s), t in sorted(by.items()):
        if not {1, 2} <= set(t):
            continue
        one, two = t[1], t[2]
        for m in ("hs", "fa"):
            deltas[m].append(two[m] - one[m])
            pairs[m][0].append(unpack(two["outcomes"][m]))
            pairs[m][1].append(unpack(one["outcomes"][m]))
        lines.append(f"| {d} | {p} | {s} | {one['hs']:.1f} | {two['hs']:.1f} | "
                     f"{two['hs'] - one['hs']:+.1f} | {one['fa']:.1f} | {two['fa']:.1f} | "
                     f"{two['fa'] - one['fa']:+.1f} |")
    out = ["\n".join(lines), ""]
    for m in ("hs", "fa"):
        x = deltas[m]
        if not x:
            continue
        diff = paired_difference(*pairs[m])
        out.append(f"- **{m.upper()}**: {len(x)} pairs; mean |Δ| {sum(abs(v) for v in x) / len(x):.1f}"
                   f" points, largest |Δ| {max(abs(v) for v in x):.1f}; paired difference "
                   f"2 − 1 threads {diff.mean:+.1f} [{diff.low:+.1f}, {diff.high:+.1f}]"
                   + (" (not distinguishable from 0)" if not diff.distinguishable else ""))
    return "\n".join(out) + "\n"


def margins(runs: list[dict]) -> str:
    groups: dict[tuple, dict] = defaultdict(dict)
    for r in runs:
        c = r["config"]
        for name, (defense, p) in RUNS.items():
            if c["defense"]["name"] == defense and float(c["attack"]["p"]) == p:
                groups[(c["seed"], c["torch_threads"])][name] = r["metrics"]
    cols = sorted(groups)
    lines = ["| check | " + " | ".join(f"seed {s}, {t} thr" for s, t in cols) + " | min |",
             "|" + "---|" * (len(cols) + 2)]
    for name, check in CHECKS.items():
        values = []
        for k in cols:
            try:
                values.append(check(groups[k]))
            except KeyError:  # a run this check needs was not made at that seed and count
                values.append(None)
        low = min(v for v in values if v is not None)
        lines.append(f"| {name} | " + " | ".join("—" if v is None else f"{v:.3g}" for v in values)
                     + f" | {'**' + format(low, '.3g') + ' fails**' if low < 0 else format(low, '.3g')} |")
    return "\n".join(lines) + "\n"


def main(out: str, *roots: str) -> None:
    runs = [r for root in roots for r in load(Path(root))]
    Path(out, "noise_floor.md").write_text(noise_floor(runs))
    Path(out, "margins.md").write_text(margins(runs))
    print(Path(out, "noise_floor.md").read_text())
    print(Path(out, "margins.md").read_text())


if __name__ == "__main__":
    main(*sys.argv[1:])
