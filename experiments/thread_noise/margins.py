"""The end-to-end test's margins on every seed and thread count of the noise-floor study.

    python experiments/thread_noise/margins.py multirun/toy_thread_noise > experiments/thread_noise/margins.md

A margin >= 0 passes. The test asserts a check only if its smallest margin here is >= 0.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.e2e_checks import CHECKS, RUNS  # noqa: E402


def main(root: str) -> None:
    groups: dict[tuple, dict] = defaultdict(dict)
    for path in Path(root).rglob("results.json"):
        res = json.loads(path.read_text())
        if res.get("status") != "ok":
            continue
        c = res["config"]
        for name, (defense, p) in RUNS.items():
            if c["defense"]["name"] == defense and float(c["attack"]["p"]) == p:
                groups[(c["seed"], c["torch_threads"])][name] = res["metrics"]
    cols = sorted(k for k, v in groups.items() if len(v) == len(RUNS))
    print("| check | " + " | ".join(f"seed {s}, {t} thr" for s, t in cols) + " | min |")
    print("|" + "---|" * (len(cols) + 2))
    for name, check in CHECKS.items():
        values = [check(groups[k]) for k in cols]
        cells = " | ".join(f"{v:.3g}" for v in values)
        low = min(values) if values else float("nan")
        print(f"| {name} | {cells} | {'**' if low < 0 else ''}{low:.3g}"
              f"{'** fails' if low < 0 else ''} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "multirun/toy_thread_noise")
