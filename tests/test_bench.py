"""``make bench`` smoke test: one tiny repeat writes a table with every row."""
import json
import math

import pytest

from harness import bench


@pytest.mark.slow  # 42-74 s on 2 cores: every row's workload, once
def test_bench_smoke_writes_every_row(tmp_path):
    results = bench.main(["--sizes", "tiny", "--repeats", "1", "--overhead-repeats", "1",
                          "--steps", "2", "--warmup", "1", "--memory-steps", "2",
                          "--new-tokens", "4", "--finetune-steps", "2",
                          "--posthoc-repeats", "1", "--out", str(tmp_path)])
    rows = results["rows"]
    assert {r["row"] for r in rows} == {1, 2, 3, 4, 5, 6}
    whats = {r["what"] for r in rows}
    for m in bench.METHOD_ROWS:  # a step-cost row per reference (SFT, versus) and a memory row
        assert sum(r["what"].startswith(f"{m.name} ") for r in rows) == 2 + len(m.versus), m.name
    tv = next(r for r in rows if r["what"] == "t_vaccine step / vaccine step (full)")
    step = {r["what"].split(" ")[0]: r["ms"] for r in rows
            if r["row"] == 2 and "/ SFT step" in r["what"]}
    assert tv["ms"] == step["t_vaccine"] and tv["ref_ms"] == step["vaccine"]
    posthoc = [r for r in rows if r["row"] == 6]  # one per posthoc= method, on a 2-step finetune
    assert [r["what"].split(" ")[0] for r in posthoc] == [
        f"posthoc={m}" for m in bench.POSTHOC_METHODS] == ["posthoc=safelora", "posthoc=antidote"]
    for r in posthoc:
        assert r["unit"] == "x" and len(r["samples_ms"]) == len(r["ref_samples_ms"]) == 1
        assert r["value"] == pytest.approx(r["samples_ms"][0] / r["ref_samples_ms"][0])
        assert "(2 LoRA steps)" in r["what"]
    assert "300 calibration rows" in posthoc[1]["detail"]  # the bench world's harmful rows
    assert any("bare PyTorch loop" in w for w in whats)
    assert any("HF transformers.Trainer" in w for w in whats)
    assert any("judge throughput" in w for w in whats)
    for r in rows:
        if r["unit"] in ("x", "share", "answers/s"):
            assert math.isfinite(r["value"]) and r["value"] > 0, r
        if r["target"] is not None:
            assert isinstance(r["met"], bool), r
    sweep = next(r for r in rows if r["row"] == 4)
    assert sweep["points"] == 25 and sweep["with_reuse"]["finetune"] == 25
    assert sweep["with_reuse"]["base"] == 1 and sweep["naive"]["base"] == 25
    gen = next(r for r in rows if r["row"] == 3 and r["unit"] == "x")
    assert gen["identical_outputs"] is True
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") >= len(rows) + 1  # header plus one line per row
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(
        json.dumps(rows))


def test_posthoc_and_versus_rows_on_a_tiny_workload():
    """Row 6 and T-Vaccine / Vaccine alone, 1-2 steps: positive finite ratios, each the ratio
    of its own samples, with the post-hoc methods' stats in the detail."""
    from harness.bench.rows import bench_posthoc, bench_training
    from harness.bench.setup import make_setup, make_workload

    wl = make_workload(make_setup(), bench.SIZES["tiny"], 4)
    methods = [m for m in bench.METHOD_ROWS if m.name in ("vaccine", "t_vaccine")]
    rows, sec = bench_training(wl, warmup=1, steps=1, repeats=1, overhead_repeats=1,
                               methods=methods)
    tv = next(r for r in rows if r["what"] == "t_vaccine step / vaccine step (full)")
    assert tv["value"] == pytest.approx(sec["t_vaccine"] / sec["vaccine"])
    rows = bench_posthoc(wl, repeats=2, steps=2)
    assert [r["what"] for r in rows] == [
        f"posthoc={m} stage wall time / finetune stage wall time (2 LoRA steps)"
        for m in ("safelora", "antidote")]
    for r in [tv, *rows]:
        assert math.isfinite(r["value"]) and r["value"] > 0, r
    for r in rows:  # two repeats: the median of the two per-repeat ratios
        assert r["value"] == pytest.approx(sum(
            a / b for a, b in zip(r["samples_ms"], r["ref_samples_ms"])) / 2)
    assert rows[0]["params"] == {"mode": "threshold", "threshold": 0.5, "num_layers": 10}
    assert "of 28 LoRA modules" in rows[0]["detail"]  # 4 layers x 7 linear targets
    assert "300 calibration rows, pruned" in rows[1]["detail"]
