"""Small text views of results for the terminal."""
from __future__ import annotations


def summary_table(results: dict) -> str:
    rows = [("stage", "HS", "FA", "refuse", "other", "P(comply)")]
    for stage in ("base", "align", "final"):
        m = results.get("metrics", {}).get(stage)
        if not m:
            continue
        pc = m.get("p_comply_opening")
        rows.append((stage, f"{m['hs']:.1f}", f"{m['fa']:.1f}", f"{m['refusal_rate']:.1f}",
                     f"{m['other_rate']:.1f}", "-" if pc is None else f"{pc:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def status_line(results: dict, label: str, note: str = "") -> str:
    """One line per sweep job: what ran and how it came out."""
    final = results.get("metrics", {}).get("final")
    seconds = results.get("timings", {}).get("total")
    if results.get("status") != "ok" or not final:
        error = (results.get("error") or "").splitlines()[:1]
        return f"{label}: FAILED {error[0] if error else ''}"
    took = f", {seconds:.0f}s" if seconds is not None else ""
    return f"{label}: HS {final['hs']:.1f}  FA {final['fa']:.1f}{took}{note}"
