"""How a bench row's value is written in its tables (shared by the CPU and the GPU bench)."""
from __future__ import annotations


def _ratio(v: float) -> str:
    """Two decimals; two significant digits below 0.1 (a post-hoc stage is ~0.004x)."""
    return f"{v:.2f}" if v >= 0.1 else f"{v:.2g}"


def _fmt(r: dict) -> str:
    v = r["value"]
    if v is None:
        return "n/a"
    return {"x": f"{_ratio(v)}x", "share": f"{v:.0%}", "MiB": f"{v:.0f} MiB"}.get(
        r["unit"], f"{v:,.0f} {r['unit']}")
