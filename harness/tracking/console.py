"""Small text views of results for the terminal. Each rate carries its 95% prompt interval."""
from __future__ import annotations


def with_interval(m: dict, metric: str) -> str:
    """``28.4 [23.7, 33.6]``: the rate and its prompt interval, when the run recorded one."""
    ci = (m.get("interval") or {}).get(metric)
    return f"{m[metric]:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def summary_table(results: dict) -> str:
    stages = [(s, m) for s in ("base", "align", "final")
              if (m := results.get("metrics", {}).get(s))]
    triggered = any("hs_triggered" in m for _, m in stages)  # attack=backdoor: both HS
    rows = [("stage", "HS [95% CI]", *(("HS triggered [95% CI]",) if triggered else ()),
             "FA [95% CI]", "refuse", "other", "P(comply)")]
    for stage, m in stages:
        pc = m.get("p_comply_opening")
        trig = ((with_interval(m, "hs_triggered") if "hs_triggered" in m else "-",)
                if triggered else ())
        rows.append((stage, with_interval(m, "hs"), *trig, with_interval(m, "fa"),
                     f"{m['refusal_rate']:.1f}", f"{m['other_rate']:.1f}",
                     "-" if pc is None else f"{pc:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    guard = (results.get("metrics", {}).get("guards") or {}).get("alignment") or {}
    if guard.get("ok") is False:
        lines.append(f"ALIGNMENT GUARD: the aligned model refuses no more often than the base "
                     f"({guard.get('reason')}); this defense's numbers measure an unaligned model")
    ci = (results.get("metrics", {}).get("final") or {}).get("interval") or {}
    if ci:
        lines.append(f"(intervals: {ci.get('method', '?')}, {ci.get('confidence', 0.95):.0%}, over "
                     "prompts; one seed)")
    return "\n".join(lines)


def status_line(results: dict, label: str, note: str = "") -> str:
    """One line per sweep job: what ran and how it came out."""
    final = results.get("metrics", {}).get("final")
    seconds = results.get("timings", {}).get("total")
    if results.get("status") != "ok" or not final:
        error = (results.get("error") or "").splitlines()[:1]
        return f"{label}: FAILED {error[0] if error else ''}"
    took = f", {seconds:.0f}s" if seconds is not None else ""
    trig = (f"  HS triggered {with_interval(final, 'hs_triggered')}"
            if "hs_triggered" in final else "")
    return (f"{label}: HS {with_interval(final, 'hs')}{trig}  FA {with_interval(final, 'fa')}"
            f"{took}{note}")
