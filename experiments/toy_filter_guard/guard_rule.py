"""The upload split's decision under the current guard (defense.filter.split_min_eta and
split_max_share at their defaults), recomputed from the scores guard_stat.py saved: the scores
depend on the base and the teacher only, not on the guard. Writes guard_rule.json.

    PYTHONPATH=. python experiments/toy_filter_guard/guard_rule.py
"""
import json
import platform
import subprocess
from pathlib import Path

import numpy as np

from harness.config.schema import FilterConfig
from harness.filtering import upload_split_tau

here = Path(__file__).parent
defaults = FilterConfig()
held = {(r["seed"], r["p"]): r["held_threshold"]
        for r in json.loads((here / "results.json").read_text())["rows"]}
rows = []
for (seed, p), held_tau in sorted(held.items()):
    saved = json.loads((here / f"scores_seed{seed}_p{p}.json").read_text())
    scores, harmful = np.array(saved["scores"]), np.array(saved["harmful"])
    tau, split = upload_split_tau(saved["scores"], held_tau, defaults.split_min_eta,
                                  defaults.split_max_share)
    dropped = scores > tau
    rows.append({"seed": seed, "p": p, "n": len(scores), "groups": split["groups"],
                 "eta": round(split["eta"], 4), "upper_share": round(split["upper_share"], 4),
                 "threshold_used": round(tau, 4), "n_dropped": int(dropped.sum()),
                 "recall": round(float(dropped[harmful].mean()), 4) if harmful.any() else None,
                 "harmless_dropped": int((dropped & ~harmful).sum()),
                 "harmless_dropped_share": round(float(dropped[~harmful].mean()), 4),
                 "reason": split["reason"]})
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True, cwd=here).stdout.strip()
(here / "guard_rule.json").write_text(json.dumps({
    "command": "PYTHONPATH=. python experiments/toy_filter_guard/guard_rule.py",
    "git": commit, "cpu": platform.processor() or platform.machine(),
    "split_min_eta": defaults.split_min_eta, "split_max_share": defaults.split_max_share,
    "rows": rows}, indent=1) + "\n")
for r in rows:
    print(r)
